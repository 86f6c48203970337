"""The training engine: parallel modes agree, resume is exact, NaN stops the run."""
import json
import logging as pylogging
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jreg import errors
from jreg import metrics as metrics_lib
from jreg import train

GLOBAL_BATCH = 8


class CountingIterator:
  """Deterministic batches of a fixed regression problem, with a position.

  Raises `RuntimeError` before batch `crash_at` to simulate a killed run.
  """

  def __init__(self, crash_at=None, poison_at=None, batch_size=GLOBAL_BATCH):
    self.position = 0
    self.crash_at = crash_at
    self.poison_at = poison_at
    self.batch_size = batch_size

  def __next__(self):
    if self.crash_at is not None and self.position == self.crash_at:
      raise RuntimeError('simulated crash')
    rng = np.random.default_rng(self.position)
    x = rng.normal(size=(self.batch_size, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
         + 0.1 * rng.normal(size=(self.batch_size, 1))).astype(np.float32)
    if self.poison_at is not None and self.position == self.poison_at:
      x[0, 0] = np.nan
    self.position += 1
    return {'x': x, 'y': y}

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = state['position']


def _forward(x, is_training=True):
  del is_training
  h = hk.Linear(4)(x)
  h = hk.BatchNorm(True, True, 0.9)(h, is_training=True)
  count = hk.get_state('count', [], jnp.int32, init=jnp.zeros)  # a step counter
  hk.set_state('count', count + 1)
  return hk.Linear(1)(jax.nn.relu(h))


_model = hk.transform_with_state(_forward)  # state: BatchNorm stats, counter


def init_fn(rng):
  return _model.init(rng, jnp.zeros((GLOBAL_BATCH, 3)))


def loss_fn(params, model_state, rng, batch):
  pred, model_state = _model.apply(params, model_state, rng, batch['x'])
  loss = jnp.mean((pred - batch['y']) ** 2)
  return loss, (model_state, {'mse': loss})


def _linear_init(rng):
  return hk.transform(lambda x: hk.Linear(1)(x)).init(rng, jnp.zeros((1, 3))), {}


def _linear_loss(params, model_state, rng, batch):
  pred = hk.transform(lambda x: hk.Linear(1)(x)).apply(params, rng, batch['x'])
  loss = jnp.mean((pred - batch['y']) ** 2)
  return loss, (model_state, {})


def per_example_mse(params, model_state, batch):
  del model_state
  pred = hk.transform(lambda x: hk.Linear(1)(x)).apply(params, None, batch['x'])
  return {'mse': jnp.mean((pred - batch['y']) ** 2, axis=-1)}


def _fit(workdir, parallel='single', num_steps=6, iterator=None, **kwargs):
  kwargs.setdefault('checkpoint_every', 3)
  kwargs.setdefault('grad_fn', train.value_and_grad(_linear_loss))
  return train.fit(
      workdir=str(workdir), init_fn=_linear_init,
      optimizer=optax.adam(1e-2), train_iter=iterator or CountingIterator(),
      num_steps=num_steps, parallel=parallel, log_every=2,
      tensorboard=False, **kwargs)


@pytest.mark.parametrize('parallel', ['sharded', 'pmap'])
def test_parallel_modes_match_single_device(tmp_path, parallel):
  assert jax.device_count() == 4
  reference, _ = _fit(tmp_path / 'single', 'single')
  state, history = _fit(tmp_path / parallel, parallel)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(chex_close, state.params, reference.params)
  jax.tree.map(chex_close, state.opt_state, reference.opt_state)
  assert int(state.step) == 6
  # Logged every 2 steps and at the checkpoint of step 3.
  assert [r['step'] for r in history if r['split'] == 'train'] == [2, 3, 4, 6]


def test_parallel_modes_average_batch_statistics():
  """Under pmap the BatchNorm statistics are averaged over devices."""
  par = train.Parallel('pmap')
  optimizer = optax.sgd(0.1)
  state = train.init_state(init_fn, optimizer, seed=0)
  update = par.compile(train.make_update(train.value_and_grad(loss_fn), optimizer,
                                         par.axis_name))
  batch = next(CountingIterator())
  new_state, metrics = update(par.put_state(state), par.put_batch(batch))
  new_state = par.get(new_state)
  stats = jax.tree.leaves(new_state.model_state)
  assert stats and all(np.all(np.isfinite(s)) for s in stats)
  # Integer state (a step counter) keeps its dtype through the pmean.
  assert jax.tree.map(lambda x: x.dtype, new_state.model_state) == jax.tree.map(
      lambda x: x.dtype, state.model_state)
  assert new_state.model_state['~']['count'].dtype == np.int32
  assert float(par.get(metrics)['loss']) > 0


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
  uninterrupted, _ = _fit(tmp_path / 'a', num_steps=8)
  with pytest.raises(RuntimeError, match='simulated crash'):
    _fit(tmp_path / 'b', num_steps=8, iterator=CountingIterator(crash_at=5))
  # The checkpoint of step 3 is there; the restart reads it and its data position.
  resumed, history = _fit(tmp_path / 'b', num_steps=8)
  assert int(resumed.step) == 8
  # The whole run's records, each step once, as the uninterrupted run's.
  assert history == metrics_lib.read_jsonl(str(tmp_path / 'a' / 'metrics.jsonl'))
  jax.tree.map(np.testing.assert_array_equal, resumed.params, uninterrupted.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.rng, uninterrupted.rng)


def test_interrupted_save_does_not_replace_the_last_good_checkpoint(tmp_path):
  """A save killed mid-write leaves orbax's temporary folder, never a step folder."""
  finished, _ = _fit(tmp_path, num_steps=6)
  half_written = tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp-1234'
  (half_written / 'state').mkdir(parents=True)
  (half_written / 'state' / 'garbage').write_bytes(b'\x00' * 10)
  checkpointer = train.checkpoint_lib.Checkpointer(str(tmp_path))
  assert checkpointer.latest_step() == 6
  restored, _ = checkpointer.restore(train.init_state(_linear_init, optax.adam(1e-2), 0))
  jax.tree.map(np.testing.assert_array_equal, train.TrainState(*restored).params,
               finished.params)
  checkpointer.close()
  # Re-running the finished run does no step and cleans the temporary folder up.
  iterator = CountingIterator()
  resumed, history = _fit(tmp_path, num_steps=6, iterator=iterator)
  assert not half_written.exists() and iterator.position == 0
  assert [r['step'] for r in history if r['split'] == 'train'] == [2, 3, 4, 6]


def test_phases_switch_grad_fn_at_the_given_step(tmp_path):
  """Pre-training phases: steps 1-2 use one grad function, the rest another."""
  def tagged(tag):
    plain = train.value_and_grad(_linear_loss)

    def grad_fn(*args):
      (loss, (model_state, metrics)), grads = plain(*args)
      return (loss, (model_state, dict(metrics, phase=jnp.float32(tag)))), grads

    return grad_fn

  _, history = _fit(tmp_path, num_steps=4, grad_fn=[(2, tagged(0)), (4, tagged(1))],
                    checkpoint_every=0)
  phases = [r['phase'] for r in history if r['split'] == 'train']
  assert phases == [0.0, 1.0]  # logged every 2 steps: steps 1-2, then 3-4
  with pytest.raises(ValueError, match='increasing last steps'):
    _fit(tmp_path / 'bad', grad_fn=[(4, tagged(0)), (2, tagged(1))])


def test_learning_rate_schedules():
  warm = train.learning_rate_schedule('warmup_cosine', 1.0, 100, warmup_steps=10)
  assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(1.0)
  assert float(warm(100)) == pytest.approx(0.0, abs=1e-6)
  cosine = train.learning_rate_schedule('cosine', 0.5, 10)
  assert float(cosine(0)) == 0.5 and float(cosine(5)) == pytest.approx(0.25)
  assert float(train.learning_rate_schedule('constant', 0.3, 10)(7)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match='warm-up of 20 steps'):
    train.learning_rate_schedule('warmup_cosine', 1.0, 10, warmup_steps=20)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(train.NonFiniteLossError,
                     match=r'step 5 produced a non-finite.*last good checkpoint '
                           r'\(step 3\) is kept'):
    _fit(tmp_path, num_steps=8, iterator=CountingIterator(poison_at=4))
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps == [3]
  restored, position = train.checkpoint_lib.Checkpointer(str(tmp_path)).restore(
      train.init_state(_linear_init, optax.adam(1e-2), 0))
  assert position == {'position': 3}
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


def test_metrics_jsonl_and_eval(tmp_path):
  evals = []

  def eval_fn(params, model_state):
    evals.append(1)
    return {'w_sum': float(jnp.sum(params['linear']['w']))}

  schedule = optax.cosine_decay_schedule(1e-2, 6)
  train.fit(workdir=str(tmp_path), init_fn=_linear_init,
            grad_fn=train.value_and_grad(_linear_loss),
            optimizer=optax.adam(schedule), train_iter=CountingIterator(),
            num_steps=6, log_every=3, eval_every=3, eval_fn=eval_fn,
            learning_rate_fn=schedule, tensorboard=True)
  records = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  train_records = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train_records] == [3, 6]
  assert {'loss', 'grad_norm', 'param_norm', 'update_norm',
          'learning_rate'} <= set(train_records[0])
  assert train_records[1]['learning_rate'] < train_records[0]['learning_rate']
  assert [r['step'] for r in records if r['split'] == 'eval'] == [3, 6]
  assert os.listdir(tmp_path / 'tensorboard')
  json.dumps(records)  # plain JSON values only


def test_evaluate_honours_the_padding_mask():
  params, _ = _linear_init(jax.random.PRNGKey(0))
  batch = next(CountingIterator())
  full = train.evaluate(per_example_mse, params, {}, [batch])['mse']
  first_half = {k: v[:4] for k, v in batch.items()}
  padded = dict({k: np.concatenate([v[:4], v[:4]]) for k, v in batch.items()},
                mask=np.arange(8) < 4)
  np.testing.assert_allclose(
      train.evaluate(per_example_mse, params, {}, [padded])['mse'],
      train.evaluate(per_example_mse, params, {}, [first_half])['mse'], rtol=1e-6)
  assert full > 0


def test_bad_parallel_mode_and_batch():
  with pytest.raises(ValueError, match='is not one of'):
    train.Parallel('model')
  with pytest.raises(train.BatchSizeError, match='cannot be split over 4 local devices'):
    train.Parallel('pmap').put_batch({'x': np.zeros((6, 3))})


def test_batch_not_divisible_by_devices_is_a_sentence_before_training(tmp_path):
  iterator = CountingIterator(batch_size=6)
  with pytest.raises(errors.UserError, match=r'batch of 6 examples cannot be split '
                     r'over 4 local devices.*divisible by the number of devices'):
    _fit(tmp_path, 'sharded', iterator=iterator)
  assert iterator.position == 1  # one batch read, no step taken
  assert not (tmp_path / 'checkpoints').exists() or not [
      d for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
  with pytest.raises(train.NonFiniteLossError) as error:
    _fit(tmp_path, num_steps=6, iterator=CountingIterator(poison_at=1))
  message = str(error.value)
  assert 'step 2 produced a non-finite' in message
  assert 'no checkpoint was written yet' in message and 'step 0' in message
  assert 'last good checkpoint' not in message
  assert isinstance(error.value, errors.UserError)


# ---------------------------------------------------------------------------
# Restartable runs: killed at any moment, the restart ends exactly like an
# uninterrupted run (parameters and metrics.jsonl rows).

RESTART_STEPS = 8  # checkpoints and evaluations at 3, 6 and 8; logs every 2


class Crash(Exception):
  """The simulated kill."""


def _eval_fn(crash_at=None):
  def eval_fn(params, model_state):
    del model_state
    step = eval_fn.calls = getattr(eval_fn, 'calls', 0) + 1
    if crash_at is not None and 3 * step >= crash_at:
      raise Crash(f'killed in the evaluation of step {crash_at}')
    return {'w_sum': float(jnp.sum(params['linear']['w']))}
  return eval_fn


def _restartable_fit(workdir, iterator=None, eval_crash_at=None, **kwargs):
  return _fit(workdir, num_steps=RESTART_STEPS, iterator=iterator,
              eval_fn=_eval_fn(eval_crash_at), eval_every=3, **kwargs)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  state, history = _restartable_fit(workdir)
  return workdir, state, history


@pytest.mark.parametrize('iterator_crash,eval_crash', [
    (2, None),     # during step 3, before any checkpoint
    (None, 3),     # after step 3's records, before its checkpoint
    (7, None),     # during the last step
    (None, 8),     # in the final evaluation, after the final checkpoint
])
def test_killed_and_restarted_run_ends_as_an_uninterrupted_one(
    tmp_path, uninterrupted, iterator_crash, eval_crash, capsys):
  reference_dir, reference, reference_history = uninterrupted
  with pytest.raises((Crash, RuntimeError)):
    _restartable_fit(tmp_path, iterator=CountingIterator(crash_at=iterator_crash),
                     eval_crash_at=eval_crash)
  assert not (tmp_path / '.lock').exists()  # released on the exception
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 9, "spl')  # as if killed in the middle of a write
  capsys.readouterr()
  state, history = _restartable_fit(tmp_path)
  resumed_from = {2: None, 3: None, 7: 6, 8: 8}[iterator_crash or eval_crash]
  said = capsys.readouterr().out
  if resumed_from == RESTART_STEPS:  # trained; only the final eval is done again
    assert 'finished training (step 8 of 8) but not its final evaluation' in said
  else:
    assert (f'resumed from the checkpoint of step {resumed_from}' in said
            if resumed_from else 'resumed' not in said)
  jax.tree.map(np.testing.assert_array_equal, state.params, reference.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, reference.opt_state)
  rows = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert rows == metrics_lib.read_jsonl(str(reference_dir / 'metrics.jsonl'))
  assert history == rows == reference_history
  steps = [(r['split'], r['step']) for r in rows]
  assert len(steps) == len(set(steps))  # no duplicates


def test_finished_run_is_not_trained_again(uninterrupted, capsys):
  workdir, reference, reference_history = uninterrupted
  # Importing the engine and using orbax add no filter to the global loggers.
  absl_logger = pylogging.getLogger('absl')
  assert not absl_logger.filters and not pylogging.getLogger().filters
  iterator = CountingIterator()
  state, history = _restartable_fit(workdir, iterator=iterator)
  assert iterator.position == 0  # no batch read, no step
  assert history == reference_history
  assert [r['step'] for r in history if r['split'] == 'eval'] == [3, 6, 8]
  jax.tree.map(np.testing.assert_array_equal, state.params, reference.params)
  assert 'already finished (step 8 of 8)' in capsys.readouterr().out
  assert not absl_logger.filters


def test_restart_moves_the_old_run_aside(tmp_path, capsys):
  _fit(tmp_path, num_steps=2, checkpoint_every=0)
  old_rows = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  iterator = CountingIterator()
  state, history = _fit(tmp_path, num_steps=2, checkpoint_every=0, restart=True,
                        iterator=iterator)
  assert iterator.position == 2 and int(state.step) == 2
  (previous,) = os.listdir(tmp_path / 'previous')
  moved = tmp_path / 'previous' / previous
  assert sorted(os.listdir(moved)) == ['checkpoints', 'metrics.jsonl']
  assert metrics_lib.read_jsonl(str(moved / 'metrics.jsonl')) == old_rows
  assert history == old_rows  # the same run again, from step 0
  assert 'restart: moved the previous run' in capsys.readouterr().out


def test_config_is_recorded_and_a_change_refused_or_logged(tmp_path):
  config = {'optimizer': {'learning_rate': 0.01, 'name': 'adam'}, 'steps': 2}
  _fit(tmp_path, num_steps=2, config=config)
  with open(tmp_path / 'config.json') as f:
    assert json.load(f) == config
  changed = {'optimizer': {'learning_rate': 0.02, 'name': 'adam'}, 'steps': 2}
  with pytest.raises(train.rundir.ConfigMismatchError,
                     match=r'optimizer\.learning_rate: 0\.01 → 0\.02') as error:
    _fit(tmp_path, num_steps=2, config=changed)
  assert isinstance(error.value, errors.UserError)
  _, history = _fit(tmp_path, num_steps=2, config=changed, allow_config_change=True)
  assert [r['step'] for r in history] == [2]
  with open(tmp_path / 'config.json') as f:
    assert json.load(f) == changed
  (change,) = metrics_lib.read_jsonl(str(tmp_path / 'config_changes.jsonl'))
  assert change['changes'] == {'optimizer.learning_rate': [0.01, 0.02]}

