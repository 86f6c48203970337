"""Checkpoints carry a checksum; a damaged one is moved aside and the run falls back."""
import logging as pylogging
import os
import shutil
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import test_train
from jreg import checkpoint
from jreg import errors
from jreg import metrics as metrics_lib
from jreg import train

NUM_STEPS = 6  # checkpoints at steps 3 and 6

_mlp = hk.transform(lambda x: hk.Linear(1)(jnp.tanh(hk.Linear(64)(x))))
_OPTIMIZER = optax.adam(1e-2)


def _init(rng):
  return _mlp.init(rng, jnp.zeros((1, 3))), {}


def _loss(params, model_state, rng, batch):
  loss = jnp.mean((_mlp.apply(params, rng, batch['x']) - batch['y']) ** 2)
  return loss, (model_state, {})


def _fit(workdir, iterator=None):
  return train.fit(workdir=str(workdir), init_fn=_init,
                   grad_fn=train.value_and_grad(_loss), optimizer=_OPTIMIZER,
                   train_iter=iterator or test_train.CountingIterator(),
                   num_steps=NUM_STEPS, checkpoint_every=3, log_every=2,
                   tensorboard=False, progress=False)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """An uninterrupted run: its workdir, final state and metrics rows."""
  workdir = tmp_path_factory.mktemp('finished')
  state, history = _fit(workdir)
  return workdir, state, history


def _copy(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run, workdir)
  return workdir


def _array_files(step_dir):
  """The files under a checkpoint's `state/` item, largest (the chunks) first."""
  found = []
  for root, _, names in os.walk(step_dir / 'state'):
    found += [os.path.join(root, n) for n in names]
  return sorted(found, key=os.path.getsize, reverse=True)


def _raw_restore(step_dir):
  """The stored state read by orbax alone, without jreg's checksum check."""
  target = jax.tree.map(np.asarray, train.init_state(_init, _OPTIMIZER, 0))
  return train.TrainState(*ocp.StandardCheckpointer().restore(
      step_dir / 'state', target))


def _flip_a_stored_bit(step_dir):
  """Flips one bit of one stored parameter so that orbax still reads it.

  The checkpoint's `state/` item is rewritten by orbax itself with the same
  arrays but one bit of one weight flipped, and its checksum item is kept: a
  checkpoint that every storage layer reads without complaint but that holds
  another value than the one saved, which only jreg's checksum can catch.
  (Flipping a bit of the files themselves is caught, or not, by the storage
  format's own CRCs depending on the versions installed; this is not.)
  """
  state = _raw_restore(step_dir)
  weights = np.array(state.params['linear_1']['w'])
  weights.reshape(-1).view(np.uint32)[weights.size // 2] ^= 1
  params = {**state.params, 'linear_1': {**state.params['linear_1'],
                                         'w': weights}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(step_dir / 'state', state._replace(params=params),
                    force=True)
  checkpointer.wait_until_finished()
  read = _raw_restore(step_dir).params['linear_1']['w']
  assert not np.array_equal(read, state.params['linear_1']['w'])
  np.testing.assert_array_equal(read, weights)


def _resume_ends_as_uninterrupted(workdir, finished_run, caplog):
  _, reference, reference_history = finished_run
  with caplog.at_level(pylogging.WARNING):
    iterator = test_train.CountingIterator()
    state, history = _fit(workdir, iterator=iterator)
  jax.tree.map(np.testing.assert_array_equal, state.params, reference.params)
  assert history == reference_history
  return iterator, [r.getMessage() for r in caplog.records
                    if 'is damaged' in r.getMessage()]


def test_flipped_bit_is_detected_and_the_run_falls_back(finished_run, tmp_path,
                                                        caplog):
  workdir = _copy(finished_run[0], tmp_path)
  _flip_a_stored_bit(workdir / 'checkpoints' / '6')
  iterator, warnings = _resume_ends_as_uninterrupted(workdir, finished_run, caplog)
  assert iterator.position == NUM_STEPS  # restarted from the data position of step 3
  (warning,) = warnings
  assert 'checkpoint of step 6' in warning and 'falling back' in warning
  assert 'step 3' in warning
  # Moved aside, not deleted; the fresh checkpoint of step 6 replaces it.
  (aside,) = os.listdir(workdir / 'checkpoints' / 'damaged')
  assert aside.startswith('6-') and _array_files(
      workdir / 'checkpoints' / 'damaged' / aside)
  assert sorted(d for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) == [
      '3', '6']


@pytest.mark.parametrize('which', ['largest', 'state/d'])
def test_truncated_checkpoint_falls_back(finished_run, tmp_path, caplog,
                                         monkeypatch, which):
  workdir = _copy(finished_run[0], tmp_path)
  files = _array_files(workdir / 'checkpoints' / '6')
  if which == 'state/d':  # the merged array data orbax reads first
    files = [f for f in files
             if os.path.dirname(f) == str(workdir / 'checkpoints' / '6' / 'state' / 'd')]
  with open(files[0], 'r+b') as f:
    f.truncate(os.path.getsize(files[0]) // 2)
  # Reports Python could not raise (printed as tracebacks on the console).
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  _, warnings = _resume_ends_as_uninterrupted(workdir, finished_run, caplog)
  assert len(warnings) == 1 and 'falling back' in warnings[0]
  # The warning alone: no traceback of the failed read's leftovers beside it.
  assert not [u.exc_value for u in unraisable]


def test_flipped_bit_in_the_checksum_record_falls_back(finished_run, tmp_path,
                                                       caplog):
  """A flipped bit in the checksum record (here a digit of a recorded
  shape, so that it still parses as JSON) is damage like a flipped bit of an
  array, not a sign of another model in the workdir."""
  workdir = _copy(finished_run[0], tmp_path)
  path = workdir / 'checkpoints' / '6' / 'checksum' / 'metadata'
  text = path.read_bytes()
  at = text.index(b'[64, 1]') + 1
  path.write_bytes(text[:at] + bytes([text[at] ^ 0x02]) + text[at + 1:])
  assert b'[44, 1]' in path.read_bytes()
  iterator, warnings = _resume_ends_as_uninterrupted(workdir, finished_run, caplog)
  assert iterator.position == NUM_STEPS
  (warning,) = warnings
  assert 'checkpoint of step 6' in warning and 'falling back' in warning


def test_no_usable_checkpoint_starts_afresh(finished_run, tmp_path, caplog):
  workdir = _copy(finished_run[0], tmp_path)
  for step in ('3', '6'):
    for path in _array_files(workdir / 'checkpoints' / step):
      with open(path, 'wb') as f:
        f.write(b'garbage')
  iterator, warnings = _resume_ends_as_uninterrupted(workdir, finished_run, caplog)
  assert iterator.position == NUM_STEPS  # all six steps trained again
  assert len(warnings) == 2 and 'starts afresh' in warnings[-1]
  assert len(os.listdir(workdir / 'checkpoints' / 'damaged')) == 2


def test_checksum_covers_bytes_dtypes_shapes_and_position():
  state = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  base = checkpoint.contents_record(state, {'position': 1})['sha256']
  flipped = state['w'].copy()
  flipped.view(np.uint32)[1, 2] ^= 1
  variants = [
      ({'w': flipped}, {'position': 1}),
      ({'w': state['w'].reshape(3, 2)}, {'position': 1}),
      ({'w': state['w'].view(np.int32)}, {'position': 1}),
      (state, {'position': 2}),
  ]
  digests = {checkpoint.contents_record(s, p)['sha256'] for s, p in variants}
  assert base not in digests and len(digests) == len(variants)
  assert checkpoint.contents_record(state, {'position': 1})['sha256'] == base


def test_checkpoint_of_another_model_is_a_sentence(tmp_path):
  saver = checkpoint.Checkpointer(str(tmp_path))
  saver.save(1, {'w': np.zeros(3, np.float32)}, {'position': 1})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"holds another model.*\['w'\]: saved \['<f4', \[3\]\], "
                           r"expected \['<f4', \[4\]\]") as error:
    saver.restore_latest({'w': np.zeros(4, np.float32)})
  assert isinstance(error.value, errors.UserError)
  # What to do, for the command line and for Python.
  assert '`--workdir`' in str(error.value) and '`restart=True`' in str(error.value)
  # Not treated as damage: the checkpoint stays where it is.
  assert saver.all_steps() == [1]
  saver.close()
  assert metrics_lib.read_history(str(tmp_path)) == []
