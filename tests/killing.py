"""A simulated kill for restart tests: an iterator that stops the run."""


class Killed(Exception):
  """Stands for the process being killed at an injected moment."""


class KilledAfter:
  """A training iterator that is 'killed' when asked for batch `n + 1`.

  It passes the data position (`get_state` / `set_state`) through, so the
  run's checkpoints are those of an uninterrupted run.
  """

  def __init__(self, inner, n):
    self.inner, self.left = inner, n

  def __iter__(self):
    return self

  def __next__(self):
    if self.left == 0:
      raise Killed()
    self.left -= 1
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)
