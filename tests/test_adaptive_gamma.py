"""The adaptive Jacobian weight (jreg/deq/adaptive.py) and its wiring.

The law is checked against hand-computed values and against an independent
NumPy loop; on a toy DEQ f(z; x) = a tanh(z) + x (so rho(J_f(z*)) =
|a| sech^2(z*), and the fixed-point solver's NFE grows with a) gamma must rise
while the measured quantity is above its target and fall while it is below;
the default path is unchanged; bad values are refused in one sentence; and a
killed adaptive run resumes bit-identically (controller state included).
"""
import math
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import deq_synthetic
from jreg import cli
from jreg import data
from jreg import deq as deq_lib
from jreg.deq import adaptive
from jreg.tasks import deq as deq_task
from jreg.tasks import deq_synthetic as synthetic_task
from killing import Killed
from killing import KilledAfter


def _reference(measurements, config, weight0, measured=None):
  """The law of jreg.deq.adaptive, written out in float64 NumPy."""
  log_w, ema, count, weights = math.log(weight0), 0.0, 0, []
  for t, m in enumerate(measurements):
    weights.append(math.exp(log_w))
    if measured is not None and not measured[t]:
      continue
    ema = m if count == 0 else (config.ema_decay * ema
                                + (1 - config.ema_decay) * m)
    log_w = log_w + config.gain * (ema - config.target) / config.target
    log_w = min(max(log_w, math.log(config.weight_min)),
                math.log(config.weight_max))
    count += 1
  weights.append(math.exp(log_w))
  return np.array(weights), ema


def _run_law(measurements, config, weight0, measured=None):
  state = adaptive.init(weight0)
  update = jax.jit(adaptive.update, static_argnums=2)
  weights = []
  for t, m in enumerate(measurements):
    weights.append(float(adaptive.weight(state)))
    flag = True if measured is None else jnp.asarray(measured[t])
    state = update(state, jnp.float32(m), config, flag)
  weights.append(float(adaptive.weight(state)))
  return np.array(weights), state


def test_update_law_hand_computed_values():
  # target 2, gain 0.5, EMA decay 0.5, gamma_0 = 1; m = 4, 0, 1:
  # mbar = 4 -> log gamma = 0 + 0.5 * (4 - 2) / 2 = 0.5;
  # mbar = 0.5 * 4 + 0.5 * 0 = 2 -> 0.5 + 0 = 0.5;
  # mbar = 0.5 * 2 + 0.5 * 1 = 1.5 -> 0.5 + 0.5 * (-0.25) = 0.375.
  config = adaptive.ControllerConfig(target=2.0, gain=0.5, weight_min=0.1,
                                     weight_max=10.0, ema_decay=0.5)
  weights, state = _run_law([4.0, 0.0, 1.0], config, 1.0)
  np.testing.assert_allclose(np.log(weights), [0.0, 0.5, 0.5, 0.375],
                             rtol=0, atol=1e-6)
  assert float(state.ema) == 1.5 and float(state.count) == 3


def test_update_law_clips_and_matches_reference_loop():
  config = adaptive.ControllerConfig(target=0.5, gain=0.3, weight_min=0.2,
                                     weight_max=3.0, ema_decay=0.8)
  rng = np.random.default_rng(0)
  # Far above the target (gamma runs into gamma_max), then far below
  # (down to gamma_min), then noise around the target.
  measurements = np.concatenate([np.full(30, 2.0), np.full(60, 0.01),
                                 0.5 + 0.1 * rng.standard_normal(40)])
  weights, state = _run_law(measurements, config, 1.0)
  expected, ema = _reference(measurements, config, 1.0)
  np.testing.assert_allclose(weights, expected, rtol=2e-5)
  np.testing.assert_allclose(float(state.ema), ema, rtol=2e-5)
  assert weights.max() == pytest.approx(3.0, rel=1e-6)   # clipped above
  assert weights[25:31].min() == pytest.approx(3.0, rel=1e-6)
  assert weights.min() == pytest.approx(0.2, rel=1e-6)   # clipped below
  # Anti-windup: once the EMA falls below the target gamma leaves the clip at
  # once. mbar after n low values is 2 * 0.8^n + 0.01 (1 - 0.8^n): above 0.5
  # for n = 6 (0.53), below for n = 7 (0.43), i.e. at measurement 36.
  assert weights[36] == pytest.approx(3.0, rel=1e-6)
  assert weights[37] < weights[36] * 0.99


def test_steps_without_measurement_leave_the_state_unchanged():
  config = adaptive.ControllerConfig(target=1.0, gain=0.2, weight_min=0.01,
                                     weight_max=100.0, ema_decay=0.9)
  measurements = [3.0, 7.0, 0.5, 0.2, 4.0, 1.0]
  measured = [False, True, False, True, True, False]
  weights, state = _run_law(measurements, config, 0.5, measured)
  expected, ema = _reference(measurements, config, 0.5, measured)
  np.testing.assert_allclose(weights, expected, rtol=2e-6)
  np.testing.assert_allclose(float(state.ema), ema, rtol=2e-6)
  assert float(state.count) == 3
  assert weights[1] == weights[0] and weights[-1] == weights[-2]


def _toy_model(mode, controller, a, gate=True):
  """DEQ of f(z; x) = a tanh(z) + x with the controller after it."""
  solver = deq_lib.SolverConfig('fixed_point', max_iter=60, tol=1e-5,
                                stop_mode='abs')

  def cell(z, x):
    return a * jnp.tanh(z) + x

  def forward(x):
    layer = deq_lib.DEQ(cell, forward=solver, spectral_radius_iters=6,
                        name='deq')
    flag = jnp.asarray(gate)
    z_star, info = layer(x, jnp.zeros_like(x), jacobian_loss=flag,
                         spectral_radius=flag if mode == 'spectral_radius'
                         else False)
    radius = info.get('spectral_radius')
    weight, info = deq_task.adaptive_weight(controller, mode, 1.0, info, True)
    return z_star, weight, info, radius

  return hk.transform_with_state(forward)


@pytest.mark.parametrize('mode,target', [('nfe', 12.0),
                                         ('spectral_radius', 0.5)])
def test_toy_deq_gamma_follows_the_measured_quantity(mode, target):
  controller = adaptive.ControllerConfig(target=target, gain=0.2,
                                         weight_min=1e-3, weight_max=1e3,
                                         ema_decay=0.5)
  x = jnp.array([[0.3], [-0.2], [0.1], [0.05]])  # [B, 1]
  for a, direction in ((0.9, 1), (0.1, -1)):  # steep cell, then a flat one
    model = _toy_model(mode, controller, a)
    params, state = model.init(jax.random.PRNGKey(0), x)
    apply = jax.jit(model.apply)
    weights, measured = [], []
    for step in range(6):
      (z_star, weight, info, radius), state = apply(
          params, state, jax.random.PRNGKey(step), x)
      weights.append(float(weight))
      measured.append(float(info['forward_nfe'] if mode == 'nfe'
                            else radius))
    if mode == 'spectral_radius':
      # 1-D cell: rho = |a| sech^2(z*), batch mean (power iteration is exact).
      exact = float(jnp.mean(a / jnp.cosh(z_star[:, 0])**2))
      assert measured[-1] == pytest.approx(exact, rel=1e-4)
    assert (measured[0] - target) * direction > 0  # the case is as intended
    assert np.all(np.sign(np.diff(weights)) == direction), weights
    expected, _ = _reference(measured, controller, 1.0)
    np.testing.assert_allclose(weights, expected[:-1], rtol=1e-5)


def test_spectral_radius_measured_only_when_the_term_is_on():
  controller = adaptive.ControllerConfig(target=0.5, gain=0.2, weight_min=1e-3,
                                         weight_max=1e3)
  model = _toy_model('spectral_radius', controller, 0.9, gate=False)
  x = jnp.array([[0.3], [-0.2]])
  params, state = model.init(jax.random.PRNGKey(0), x)
  for step in range(3):
    (_, weight, info, radius), state = model.apply(
        params, state, jax.random.PRNGKey(step), x)
    assert float(weight) == 1.0 and float(radius) == 0.0
    assert 'spectral_radius' not in info  # 0 when unmeasured: not a metric
  assert float(state['~'][f'{adaptive.STATE_NAME}_count']) == 0.0


def _synthetic_loss(overrides):
  config = cli.get_config('deq_synthetic', 'quickstart', overrides)
  loss_fn = synthetic_task.loss_fn(config)
  params, state = synthetic_task.init_fn(config)(jax.random.PRNGKey(0))
  batch = {'x': jnp.linspace(-2, 2, 8)[:, None],
           'y': jnp.linspace(-1, 1, 8)[:, None]}
  (loss, (new_state, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params, state, jax.random.PRNGKey(3), batch)
  return loss, grads, state, new_state, metrics


def test_default_path_is_unchanged():
  base = {'jacobian.weight': 2.0, 'jacobian.probability': 1.0,
          'sweep.jacobian_weight': (2.0,)}
  loss, grads, state, _, metrics = _synthetic_loss(base)
  assert state == {} and 'jacobian_weight' not in metrics
  # Loss = MSE + gamma * Jacobian term, gamma fixed.
  assert float(loss) == pytest.approx(
      float(metrics['mse'] + 2.0 * metrics['jacobian_loss']), rel=1e-6)
  # An adaptive run with gain 0 keeps gamma = weight: same loss and gradients.
  loss0, grads0, state0, new0, metrics0 = _synthetic_loss(
      dict(base, **{'jacobian.adaptive': 'nfe', 'jacobian.gain': 0.0,
                    'jacobian.weight_min': 1.0, 'jacobian.weight_max': 4.0}))
  assert float(loss0) == float(loss)
  jax.tree.map(np.testing.assert_array_equal, grads0, grads)
  assert float(metrics0['jacobian_weight']) == pytest.approx(2.0, rel=1e-6)
  assert float(state0['~'][f'{adaptive.STATE_NAME}_count']) == 0
  assert float(new0['~'][f'{adaptive.STATE_NAME}_count']) == 1
  # MDEQ settings: no controller unless asked for.
  config = cli.get_config('deq_cifar10', 'quickstart', {})
  assert config.jacobian.adaptive == 'none'
  assert deq_task.controller_config(config.jacobian) is None


@pytest.mark.parametrize('key,bad', [
    ('jacobian.adaptive', 'loss'), ('jacobian.target', 0.0),
    ('jacobian.gain', -0.1), ('jacobian.weight_min', 0.0),
    ('jacobian.weight_max', 0.5), ('jacobian.ema', 1.0),
    ('jacobian.radius_iters', 1)])
@pytest.mark.parametrize('name', ['deq_synthetic', 'deq_cifar10'])
def test_bad_controller_values_are_refused_in_one_sentence(name, key, bad):
  overrides = {'jacobian.adaptive': 'nfe', 'jacobian.weight': 1.0,
               'sweep.jacobian_weight': (1.0,)}
  if name == 'deq_cifar10':
    del overrides['sweep.jacobian_weight']
  cli.get_config(name, 'quickstart', overrides)  # valid as it stands
  with pytest.raises(cli.ConfigError, match=key.split('.')[-1]):
    cli.get_config(name, 'quickstart', dict(overrides, **{key: bad}))


def test_adaptive_sweep_value_out_of_bounds_is_refused():
  with pytest.raises(cli.ConfigError, match='weight_min'):
    cli.get_config('deq_synthetic', 'quickstart',
                   {'jacobian.adaptive': 'spectral_radius',
                    'jacobian.weight': 1.0,
                    'sweep.jacobian_weight': (0.0, 1.0)})


def test_killed_adaptive_run_resumes_the_controller_bit_identically(
    tmp_path, monkeypatch):
  config = cli.get_config('deq_synthetic', 'quickstart', {
      'num_steps': 12, 'log_every': 1, 'checkpoint_every': 4,
      'probe.max_iter': 20, 'eval_batch_size': 500,
      'jacobian.adaptive': 'spectral_radius', 'jacobian.weight': 1.0,
      'jacobian.target': 0.2, 'jacobian.gain': 0.3, 'jacobian.radius_iters': 4,
      'jacobian.probability': 0.5, 'sweep.jacobian_weight': (1.0,)})

  def final(workdir):
    state, history = deq_synthetic.train_run(config, workdir)
    records = [{k: v for k, v in r.items()
                if k not in ('steps_per_sec', 'wall_time')} for r in history]
    return jax.device_get(state.model_state), records

  reference_state, reference = final(str(tmp_path / 'uninterrupted'))
  weights = [r['jacobian_weight'] for r in reference if r['split'] == 'train']
  assert len(set(weights)) > 3  # gamma moved during the run
  make_iterator = data.synthetic_1d_iterator
  monkeypatch.setattr(data, 'synthetic_1d_iterator',
                      lambda *a, **k: KilledAfter(make_iterator(*a, **k), 6))
  workdir = str(tmp_path / 'killed')
  with pytest.raises(Killed):
    final(workdir)
  monkeypatch.undo()
  assert os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
  state, records = final(workdir)
  assert records == reference
  jax.tree.map(np.testing.assert_array_equal, state, reference_state)
  assert float(state['~'][f'{adaptive.STATE_NAME}_count']) > 0


def test_pmap_replicas_follow_the_law_of_the_averaged_measurement(tmp_path):
  # Under pmap each device updates its controller from its own NFE and the
  # engine averages the model state (lax.pmean): with no clip active that is
  # the law applied to the device-mean NFE, which is the logged forward_nfe.
  config = cli.get_config('deq_synthetic', 'quickstart', {
      'num_steps': 6, 'log_every': 1, 'probe.max_iter': 20,
      'eval_batch_size': 500, 'parallel': 'pmap', 'jacobian.adaptive': 'nfe',
      'jacobian.weight': 1.0, 'jacobian.target': 2.0, 'jacobian.gain': 0.2,
      'jacobian.ema': 0.5, 'sweep.jacobian_weight': (1.0,)})
  state, history = deq_synthetic.train_run(config, str(tmp_path))
  train = [r for r in history if r['split'] == 'train']
  controller = deq_task.controller_config(config.jacobian)
  expected, ema = _reference([r['forward_nfe'] for r in train], controller, 1.0)
  np.testing.assert_allclose([r['jacobian_weight'] for r in train],
                             expected[:-1], rtol=1e-5)
  model_state = jax.device_get(state.model_state)['~']
  np.testing.assert_allclose(
      model_state[f'{adaptive.STATE_NAME}_log_weight'], math.log(expected[-1]),
      rtol=1e-5)
  np.testing.assert_allclose(model_state[f'{adaptive.STATE_NAME}_ema'], ema,
                             rtol=1e-5)
  assert expected[-1] > 1.1  # NFE above 2: gamma rose


def test_mdeq_state_holds_the_controller_in_both_phases():
  from jreg.models import mdeq  # pylint: disable=g-import-not-at-top
  from jreg.tasks import mdeq as mdeq_task  # pylint: disable=g-import-not-at-top
  config = cli.get_config('deq_cifar10', 'quickstart',
                          {'jacobian.adaptive': 'spectral_radius'})
  settings = mdeq_task.training_settings(config, config.num_steps)
  assert settings.jacobian_controller == adaptive.ControllerConfig(
      target=6.0, gain=0.05, weight_min=0.01, weight_max=50.0, ema_decay=0.9)
  fns = mdeq_task.build_classifier(mdeq.mdeq_config('tiny'), settings,
                                   (8, 8, 3))
  _, state = jax.eval_shape(fns.init_fn, jax.random.key(0))
  names = {f'{adaptive.STATE_NAME}_{field}'
           for field in adaptive.ControllerState._fields}
  assert names | {'step_count'} == set(state['~'])
  default = mdeq_task.training_settings(
      cli.get_config('deq_cifar10', 'quickstart', {}), 3)
  fns = mdeq_task.build_classifier(mdeq.mdeq_config('tiny'), default, (8, 8, 3))
  _, state = jax.eval_shape(fns.init_fn, jax.random.key(0))
  assert set(state['~']) == {'step_count'}
