"""Two processes on localhost (gloo collectives) reach the one-process result."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import test_train
from jreg import train

WORKER = pathlib.Path(__file__).with_name('multihost_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('mode', ['sharded', 'pmap'])
def test_two_processes_match_one(tmp_path, mode):
  port = _free_port()
  out = tmp_path / 'params.npz'
  env = dict(os.environ, PYTHONPATH=str(WORKER.parents[1]))
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(port), str(i), mode, str(out),
       str(tmp_path / 'run')], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  reference, _ = test_train._fit(tmp_path / 'one', 'single', num_steps=6)
  got = np.load(out)
  flat = jax.tree_util.tree_flatten_with_path(reference.params)[0]
  assert len(flat) == len(got.files) - 1
  expected_mse = train.evaluate(test_train.per_example_mse, reference.params, {},
                                [next(test_train.CountingIterator())])['mse']
  np.testing.assert_allclose(got['eval_mse'], expected_mse, rtol=1e-5)
  for path, leaf in flat:
    np.testing.assert_allclose(got['/'.join(map(str, path))], leaf, rtol=1e-5,
                               atol=1e-6)
  # Both processes resumed nothing and wrote one set of checkpoints.
  assert (tmp_path / 'run' / 'checkpoints').is_dir()
