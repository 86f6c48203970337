"""Flags shared by every experiment entrypoint, defined once.

Experiment modules import this module for the common flags and define their own
flags inside a `define_flags()` function called under `__main__`, so that tests
and the quickstart can import several experiments into one process.
"""
import sys

from absl import app
from absl import flags

from jreg import distributed as _distributed  # defines the --dist_* flags
from jreg import train as _train

WORKDIR = flags.DEFINE_string('workdir', None,
                              'Directory for checkpoints, metrics and figures.')
SEED = flags.DEFINE_integer('seed', 0, 'Random seed of the run.')
PARALLEL = flags.DEFINE_enum('parallel', 'single', list(_train.PARALLEL_MODES),
                             'single: jax.jit on one device; sharded: jax.jit '
                             'over a device mesh; pmap: jax.pmap with pmean.')
DATA_SOURCE = flags.DEFINE_enum('data_source', 'local', ['local', 'tfds'],
                                'local: the standard files under --data_dir; '
                                'tfds: tensorflow-datasets (downloads).')
DATA_DIR = flags.DEFINE_string('data_dir', None,
                               'Directory of the dataset files (local) or the '
                               'tfds data_dir; default: ../shared/data beside '
                               'the repository when it exists.')
LOG_EVERY = flags.DEFINE_integer('log_every', 50, 'Steps between logged records.')
EVAL_EVERY = flags.DEFINE_integer('eval_every', 0,
                                  'Steps between evaluations (0: at the end).')
CHECKPOINT_EVERY = flags.DEFINE_integer('checkpoint_every', 500,
                                        'Steps between checkpoints (0: at the end).')
QUICKSTART = flags.DEFINE_bool('quickstart', False,
                               'Use the small quickstart configuration.')


def start() -> str:
  """Validates the common flags, joins a multi-host run, returns the workdir.

  Raises:
    app.UsageError: a flag value is out of range.
  """
  if not WORKDIR.value:
    raise app.UsageError('--workdir is required: the directory for checkpoints, '
                         'metrics and figures.')
  for flag in (LOG_EVERY, EVAL_EVERY, CHECKPOINT_EVERY):
    if flag.value < 0:
      raise app.UsageError(f'--{flag.name}={flag.value} must be >= 0.')
  if LOG_EVERY.value == 0:
    raise app.UsageError('--log_every must be >= 1.')
  try:
    _distributed.initialize_from_flags()
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  return WORKDIR.value


def run(main) -> None:
  """`app.run(main)`, with the run-time errors a user can act on reported as
  one sentence and exit status 1 instead of a traceback: bad data
  (`jreg.data.DataError`) and a NaN or infinite loss
  (`jreg.train.NonFiniteLossError`, which keeps the last good checkpoint)."""
  from jreg import data  # pylint: disable=g-import-not-at-top

  def guarded(argv):
    try:
      return main(argv)
    except (data.DataError, _train.NonFiniteLossError) as error:
      print(f'FATAL: {error}', file=sys.stderr, flush=True)
      sys.exit(1)

  app.run(guarded)
