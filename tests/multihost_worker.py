"""One process of a two-process run on localhost (used by test_multihost.py).

Usage: python multihost_worker.py PORT PROCESS_ID MODE OUT.npz WORKDIR
Each process has two faked CPU devices and feeds its half of each global batch.
"""
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jreg import distributed  # noqa: E402
from jreg import train  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import test_train  # noqa: E402  (the model, loss and data of the engine tests)


class ProcessSlice:
  """This process's half of each global batch of `CountingIterator`."""

  def __init__(self):
    self.inner = test_train.CountingIterator()

  def __next__(self):
    batch = next(self.inner)
    n = test_train.GLOBAL_BATCH // jax.process_count()
    i = jax.process_index()
    return {k: v[i * n:(i + 1) * n] for k, v in batch.items()}

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def main():
  port, process_id, mode, out, workdir = sys.argv[1:]
  distributed.initialize(f'localhost:{port}', 2, int(process_id))
  assert jax.process_count() == 2 and jax.device_count() == 4
  state, _ = test_train._fit(workdir, mode, num_steps=6, iterator=ProcessSlice())
  # Evaluation: each process sees its half of every batch; the means are global.
  n = test_train.GLOBAL_BATCH // 2
  eval_batches = [{k: v[jax.process_index() * n:(jax.process_index() + 1) * n]
                   for k, v in next(test_train.CountingIterator()).items()}]
  eval_mse = train.evaluate(test_train.per_example_mse, state.params, {},
                            eval_batches)['mse']
  if jax.process_index() == 0:
    np.savez(out, eval_mse=eval_mse,
             **{'/'.join(map(str, path)): np.asarray(leaf) for path, leaf in
                jax.tree_util.tree_flatten_with_path(state.params)[0]})


if __name__ == '__main__':
  main()
