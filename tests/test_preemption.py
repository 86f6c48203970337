"""Pre-emption: a signal saves a checkpoint and stops with status 75; time-based
checkpoints; the SLURM scripts requeue on 75. A stopped and resumed run ends
with the `metrics.jsonl` rows and parameters of an uninterrupted run."""
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import test_train
from jreg import checkpoint as checkpoint_lib
from jreg import metrics as metrics_lib
from jreg import rundir
from jreg import train
from launch import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 8  # log every 2, checkpoints and evaluations every 3 (test_train)


class SignalAt(test_train.CountingIterator):
  """Sends `signum` to this process while the batch of step `step` is read."""

  def __init__(self, step, signum):
    super().__init__()
    self.step, self.signum = step, signum

  def __next__(self):
    if self.position == self.step - 1:
      os.kill(os.getpid(), self.signum)
    return super().__next__()


def _run(workdir, iterator=None, **kwargs):
  return test_train._fit(workdir, num_steps=NUM_STEPS, iterator=iterator,
                         eval_fn=test_train._eval_fn(), eval_every=3, **kwargs)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  state, history = _run(workdir)
  return state, history


def _rows(workdir):
  return metrics_lib.read_jsonl(str(pathlib.Path(workdir) / 'metrics.jsonl'))


def _assert_same_run(workdir, state, history, reference):
  ref_state, ref_history = reference
  jax.tree.map(np.testing.assert_array_equal, state.params, ref_state.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state,
               ref_state.opt_state)
  assert history == _rows(workdir) == ref_history


@pytest.mark.parametrize('signum,step', [
    (signal.SIGTERM, 5),   # inside a logging window, between checkpoints
    (signal.SIGUSR1, 3),   # at a scheduled checkpoint and evaluation
    (signal.SIGTERM, 8),   # the last step: stops before the final evaluation
], ids=['SIGTERM-5', 'SIGUSR1-3', 'SIGTERM-8'])
def test_signal_saves_a_checkpoint_and_the_resumed_run_is_the_same(
    tmp_path, reference, signum, step):
  before = signal.getsignal(signum)
  with pytest.raises(train.Preempted) as stopped:
    _run(tmp_path, iterator=SignalAt(step, signum))
  name = signal.Signals(signum).name
  assert str(stopped.value) == (
      f'stopped by {name} at step {step}: checkpoint saved in '
      f'{tmp_path / "checkpoints"}; run the same command to resume.')
  assert stopped.value.exit_status == 75
  assert signal.getsignal(signum) is before  # the handler is restored
  assert not (tmp_path / rundir.LOCK_FILE).exists()
  assert checkpoint_lib.Checkpointer(str(tmp_path)).latest_step() == step
  assert all(r['step'] <= step for r in _rows(tmp_path))
  state, history = _run(tmp_path)
  _assert_same_run(tmp_path, state, history, reference)


def test_time_based_checkpoints_change_no_record(tmp_path, reference):
  # A checkpoint at every step (the clock is always due), then a crash in
  # step 6: the resume starts from step 5, inside a logging window.
  with pytest.raises(RuntimeError, match='simulated crash'):
    _run(tmp_path, checkpoint_every_seconds=1e-9,
         iterator=test_train.CountingIterator(crash_at=5))
  saved = checkpoint_lib.Checkpointer(str(tmp_path))
  assert saved.all_steps() == [3, 4, 5]  # the newest 3 are kept
  saved.close()
  state, history = _run(tmp_path, checkpoint_every_seconds=1e-9)
  _assert_same_run(tmp_path, state, history, reference)
  with pytest.raises(ValueError, match='checkpoint_every_seconds must be >= 0'):
    _run(tmp_path / 'bad', checkpoint_every_seconds=-1)


def test_command_default_checkpoint_seconds(tmp_path):
  with train.checkpoint_seconds(1e-9):
    _run(tmp_path, iterator=test_train.CountingIterator())
  saved = checkpoint_lib.Checkpointer(str(tmp_path))
  assert saved.all_steps() == [6, 7, 8]  # every step, not only 3, 6 and 8
  saved.close()
