"""One process of a two-process run that a signal stops (test_preemption.py).

Usage: python preemption_worker.py PORT PROCESS_ID WORKDIR OUT.npz [SIGNAL_STEP]
With SIGNAL_STEP, process 1 alone sends itself SIGUSR1 while it reads the
batch of that step; both processes must stop at that step. Without it the
run finishes and process 0 writes the final parameters to OUT.npz.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
import multihost_worker  # noqa: E402  (sets XLA_FLAGS: two CPU devices each)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jreg import distributed  # noqa: E402
from jreg import train  # noqa: E402
import test_train  # noqa: E402


class SignalledSlice(multihost_worker.ProcessSlice):

  def __init__(self, step):
    super().__init__()
    self.step = step

  def __next__(self):
    if (self.step is not None and jax.process_index() == 1 and
        self.inner.position == self.step - 1):
      os.kill(os.getpid(), signal.SIGUSR1)
    return super().__next__()


def main():
  port, process_id, workdir, out, *step = sys.argv[1:]
  distributed.initialize(f'localhost:{port}', 2, int(process_id))
  try:
    state, _ = test_train._fit(workdir, 'sharded', num_steps=8,
                               iterator=SignalledSlice(int(step[0]) if step else None))
  except train.Preempted as stopped:
    print(f'PREEMPTED {stopped.step}', flush=True)
    sys.exit(stopped.exit_status)
  if jax.process_index() == 0:
    np.savez(out, **{'/'.join(map(str, path)): np.asarray(leaf) for path, leaf in
                     jax.tree_util.tree_flatten_with_path(state.params)[0]})


if __name__ == '__main__':
  main()
