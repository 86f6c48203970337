"""Errors a user can act on.

Every error that a user can fix by changing an input (a flag, a file, a
workdir) derives from `UserError`. Its message is one sentence that says what
is wrong and what to do; `jreg.cli.run` prints it as `FATAL: <sentence>` and
exits with status 1 instead of showing a traceback. Errors raised for
programming mistakes (a wrong argument type in library code) are not instances
of `UserError` and keep their traceback.

Subclasses are defined where they are raised and re-exported there:
`jreg.data.DataError`, `jreg.train.NonFiniteLossError`,
`jreg.train.BatchSizeError`, `jreg.rundir.WorkdirError`,
`jreg.rundir.WorkdirBusyError`, `jreg.rundir.ConfigMismatchError`,
`jreg.checkpoint.CheckpointError`.
"""


class UserError(Exception):
  """An error the user can act on, stated in one sentence."""
