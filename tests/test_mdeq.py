"""Tests of the multiscale DEQ (jreg/models/mdeq.py), its task (jreg/tasks/mdeq.py)
and its experiments."""
import json
import math
import os
import time

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jreg import cli
from jreg import deq
from jreg import metrics as metrics_lib
from jreg.models import count_params
from jreg.models import mdeq
from jreg.tasks import mdeq as mdeq_task

TINY = mdeq.mdeq_config('tiny')
IMAGE = 8  # side of the tiny configuration's images


def _expected_cell_params(cfg: mdeq.MDEQConfig) -> int:
  """Parameters of one MDEQCell counted from the architecture's definition.

  Residual block of width C, inner width I = E*C (weight-normalised 3x3 convs
  without bias: v plus one g per output channel; GroupNorm scale + offset):
  9*C*I + I, 2*I, 9*I*C + C, 2*C, 2*C. Fusion j -> i (no bias): upsampling
  1x1 conv C_j*C_i + GroupNorm 2*C_i; downsampling (i - j) 3x3 convs, the
  first i-j-1 keeping C_j channels, the last mapping to C_i, each followed by
  a GroupNorm. Post-fusion: weight-normalised 1x1 conv C_i^2 + C_i, GroupNorm
  without affine parameters.
  """
  total = 0
  channels = cfg.num_channels
  for i, c in enumerate(channels):
    inner = int(cfg.expansion * c)
    total += 9 * c * inner + inner + 2 * inner + 9 * inner * c + c + 4 * c
    for j, cj in enumerate(channels):
      if j > i:
        total += cj * c + 2 * c
      elif j < i:
        for k in range(i - j):
          out = c if k == i - j - 1 else cj
          total += 9 * cj * out + 2 * out
    total += c * c + c
  return total


def _param_shapes(cfg: mdeq.MDEQConfig):
  """Parameter shapes of the full classifier (no allocation: eval_shape)."""
  settings = mdeq_task.TrainingSettings(
      forward=deq.SolverConfig('broyden', 4), backward=deq.BackwardConfig())
  side = cfg.image_size
  fns = mdeq_task.build_classifier(cfg, settings, (side, side, 3))
  params, state = jax.eval_shape(fns.init_fn, jax.random.key(0))
  return params, state, fns


@pytest.mark.parametrize('name', ['tiny', 'cifar10_small', 'cifar10',
                                  'imagenet_small'])
def test_parameter_counts_and_shapes(name):
  cfg = mdeq.mdeq_config(name)
  params, state, fns = _param_shapes(cfg)
  cell = {k: v for k, v in params.items() if '/deq/cell/' in k}
  assert count_params(cell) == _expected_cell_params(cfg)
  # The cell's convolutions are weight-normalised: g has one entry per output
  # channel of v.
  for module, values in cell.items():
    if 'v' in values:
      assert values['g'].shape == (values['v'].shape[-1],), module
  # The step counter and the head's BatchNorm statistics (the equilibrium
  # cell is stateless; the backward-stats probe is not state).
  assert '~' in set(state)
  assert all(k == '~' or k.startswith('mdeq/head/') for k in state), sorted(state)
  side = cfg.image_size
  images = jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)
  logits, info = jax.eval_shape(fns.predict_fn, params, state, images)
  assert logits.shape == (2, cfg.num_classes)
  assert info['forward_nfe'].shape == ()
  total = count_params(params)
  if name == 'imagenet_small':
    # MDEQ-small on ImageNet has 18M parameters (Bai et al. 2020, Table 3).
    assert abs(total - 18e6) / 18e6 < 0.05, total


def test_equilibrium_state_shapes():
  cfg = mdeq.mdeq_config('imagenet_small')
  shapes = mdeq.dropout_mask_shapes(cfg, 3, 224)
  assert shapes == [(3, 56, 56, 32), (3, 28, 28, 64), (3, 14, 14, 128),
                    (3, 7, 7, 256)]


def test_weight_norm_conv_matches_formula():
  conv = hk.without_apply_rng(hk.transform(
      lambda x: mdeq.WeightNormConv2D(5, 3, stride=2)(x)))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  params = conv.init(jax.random.key(1), x)
  p = params['weight_norm_conv2_d']
  # At initialisation g = ||v|| per output channel, so w = v.
  np.testing.assert_allclose(p['g'], np.linalg.norm(
      np.asarray(p['v']).reshape(-1, 5), axis=0), rtol=1e-6)
  g = jnp.arange(1.0, 6.0)
  out = conv.apply({'weight_norm_conv2_d': {'v': p['v'], 'g': g}}, x)
  w = p['v'] / jnp.linalg.norm(p['v'].reshape(-1, 5), axis=0) * g
  ref = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert out.shape == (2, 3, 3, 5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  # Scaling v leaves the layer unchanged (only its direction matters).
  out2 = conv.apply({'weight_norm_conv2_d': {'v': 7.0 * p['v'], 'g': g}}, x)
  np.testing.assert_allclose(out2, out, rtol=1e-4, atol=1e-5)


# A cell and injection shared by the fixed-point and gradient tests.
_stem = hk.without_apply_rng(hk.transform(lambda im: mdeq.Stem(TINY)(im)))
_cell = hk.without_apply_rng(hk.transform(
    lambda z, x: mdeq.MDEQCell(TINY)(z, x)))


@pytest.fixture(scope='module')
def tiny_problem():
  images = jax.random.normal(jax.random.key(0), (3, IMAGE, IMAGE, 3))
  injection = _stem.apply(_stem.init(jax.random.key(1), images), images)
  z0 = mdeq.initial_state(TINY, injection)
  shapes = [z.shape for z in z0]
  masks = mdeq.variational_dropout_masks(jax.random.key(2), shapes, 0.3)
  x = {'injection': injection, 'dropout_masks': masks}
  params = _cell.init(jax.random.key(3), z0, x)
  return params, x, z0


_SOLVE = deq.SolverConfig('broyden', max_iter=100, tol=1e-5)


@jax.jit
def _solve(params, x, z0):
  return deq.solve(lambda z: _cell.apply(params, z, x), z0, _SOLVE)


def _residual(params, x, z):
  fz = _cell.apply(params, z, x)
  num = math.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(fz, z)))
  den = math.sqrt(sum(float(jnp.sum(a ** 2)) for a in fz))
  return num / den


def test_multiscale_cell_reaches_its_fixed_point(tiny_problem):
  params, x, z0 = tiny_problem
  z_star, stats = _solve(params, x, z0)
  assert [z.shape for z in z_star] == [(3, 8, 8, 4), (3, 4, 4, 8)]
  assert bool(stats.all_converged), stats.rel_residual
  # Recomputed independently of the solver's bookkeeping (whole-batch norm).
  assert _residual(params, x, z_star) < 1e-4
  assert _residual(params, x, z0) > 0.5


def test_dropout_masks_are_fixed_across_solver_iterations(tiny_problem):
  params, x, z0 = tiny_problem
  masks = x['dropout_masks']
  for mask in masks:
    values = np.unique(np.asarray(mask))
    np.testing.assert_allclose(values, [0.0, 1 / 0.7], rtol=1e-6)
    assert 0.2 < float(np.mean(np.asarray(mask) == 0)) < 0.4
  z_star, _ = _solve(params, x, z0)
  # z* is the fixed point of f(., x) with the masks drawn once: the solver's
  # map kept them fixed over all its iterations. With other masks it is not.
  assert _residual(params, x, z_star) < 1e-4
  other = mdeq.variational_dropout_masks(jax.random.key(9),
                                         [m.shape for m in masks], 0.3)
  assert _residual(params, dict(x, dropout_masks=other), z_star) > 1e-2

  # Through the classifier: the masks are drawn once per call from the call's
  # rng, outside the cell (the DEQ layer transforms its cell without an rng, so
  # a cell cannot draw new masks per iteration), and only in training mode.
  cfg = TINY.replace(dropout=0.3)

  def forward(images, is_training):
    model = mdeq.MDEQClassifier(
        cfg, forward=_SOLVE, backward=deq.BackwardConfig(), name='mdeq')
    return model(images, is_training=is_training, unrolled=True)[0]

  model = hk.transform_with_state(forward)
  images = jax.random.normal(jax.random.key(0), (3, IMAGE, IMAGE, 3))
  p, s = model.init(jax.random.key(1), images, True)
  apply = jax.jit(model.apply, static_argnums=4)
  logits = [apply(p, s, jax.random.key(k), images, True)[0] for k in (5, 5, 6)]
  np.testing.assert_array_equal(logits[0], logits[1])
  assert float(jnp.max(jnp.abs(logits[0] - logits[2]))) > 1e-4
  evals = [apply(p, s, jax.random.key(k), images, False)[0] for k in (5, 6)]
  np.testing.assert_array_equal(evals[0], evals[1])

  def cell_with_own_dropout(z, x):
    del x
    return [hk.dropout(hk.next_rng_key(), 0.3, a) for a in z]

  def bad(images):
    layer = deq.DEQ(cell_with_own_dropout, name='bad')
    return layer({'injection': images}, [images])[0]

  with pytest.raises(Exception):
    hk.transform_with_state(bad).init(jax.random.key(0), images)


def test_implicit_gradient_matches_finite_differences(tiny_problem):
  """d/dt L(theta + t u) at t=0 for L = <w, z*(theta)>, implicit vs central
  finite differences of converged forward solves."""
  params, x, z0 = tiny_problem
  weights = [jax.random.normal(k, z.shape) for k, z in
             zip(jax.random.split(jax.random.key(4), 2), z0)]
  backward = deq.BackwardConfig(
      mode='implicit', solver=deq.SolverConfig('broyden', 100, tol=1e-6))

  def objective(p):
    z_star, _ = deq.fixed_point(_cell.apply, p, x, z0, forward=_SOLVE,
                                backward=backward)
    return sum(jnp.sum(w * z) for w, z in zip(weights, z_star))

  grads = jax.jit(jax.grad(objective))(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  direction = jax.tree.unflatten(treedef, [
      jax.random.normal(k, l.shape) * (0.05 * float(jnp.std(l)) + 1e-3)
      for k, l in zip(keys, leaves)])
  implicit = sum(float(jnp.vdot(g, u)) for g, u in zip(
      jax.tree.leaves(grads), jax.tree.leaves(direction)))

  def value(t):
    p = jax.tree.map(lambda a, u: a + t * u, params, direction)
    z_star, stats = _solve(p, x, z0)
    assert float(jnp.max(stats.rel_residual)) < 1e-4
    return sum(float(jnp.sum(w * z)) for w, z in zip(weights, z_star))

  # Small steps: the map is only piecewise smooth (ReLU); float32 solves to a
  # relative residual of ~1e-5 leave about 1% noise in the difference.
  eps = 0.005
  finite = (value(eps) - value(-eps)) / (2 * eps)
  assert abs(implicit) > 1e-2
  assert implicit == pytest.approx(finite, rel=0.04)


def test_explicit_network_has_similar_size():
  cfg = mdeq.mdeq_config('cifar10')
  explicit = mdeq.explicit_config(cfg, 4)
  net = hk.transform_with_state(
      lambda im: mdeq.ExplicitMDEQ(explicit, 4)(im, True))
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  explicit_params, _ = jax.eval_shape(net.init, jax.random.key(0), images)
  n_explicit = count_params(explicit_params)
  params, _, _ = _param_shapes(cfg)
  n_deq = count_params(params)
  assert abs(n_explicit - n_deq) / n_deq < 0.3
  # Four untied cells.
  assert len([k for k in explicit_params if k.endswith('block_0/conv1')]) == 4


def _history(workdir):
  """The run's metrics.jsonl with phases (from its saved config.json)."""
  with open(workdir / 'config.json') as f:
    saved = ml_collections.ConfigDict(json.load(f))
  return mdeq_task.with_phases(saved,
                               metrics_lib.read_jsonl(str(workdir / 'metrics.jsonl')))


def test_cifar10_experiment_end_to_end(tmp_path, shared_data):
  from experiments import deq_cifar10
  config = cli.get_config('deq_cifar10', 'quickstart', {
      'data.dir': str(shared_data), 'model.dropout': 0.2, 'num_steps': 3,
      'deq.pretrain_steps': 1, 'log_every': 1, 'jacobian.weight': 0.5,
      'jacobian.weight_final': 1.0})
  results = cli.execute('deq_cifar10', deq_cifar10.run, config, str(tmp_path))
  assert json.load(open(tmp_path / 'results.json')) == json.loads(
      json.dumps(results))
  history = _history(tmp_path)
  phases = [r['phase'] for r in history if r['split'] == 'train']
  assert phases == ['pretrain', 'mdeq', 'mdeq']
  deq_steps = [r for r in history if r['split'] == 'train' and
               r['phase'] == 'mdeq']
  # gamma ramps linearly from 0.5 at step 0 to 1.0 at step num_steps = 3;
  # the counter includes the pre-training step.
  assert [r['jacobian_weight'] for r in deq_steps] == pytest.approx(
      [0.5 + 0.5 / 3, 0.5 + 1.0 / 3])
  for record in deq_steps:
    assert 1 <= record['forward_nfe'] <= config.deq.forward.max_iter
    assert 1 <= record['backward_nfe'] <= config.deq.backward.max_iter
    assert record['jacobian_applied'] == 1.0  # p = 1 in this configuration
    assert record['jacobian_loss'] > 0
    assert record['loss'] == pytest.approx(
        record['cross_entropy'] +
        record['jacobian_weight'] * record['jacobian_loss'], rel=1e-5)
  assert 0 <= results['test']['accuracy'] <= 1
  assert 1 <= results['test']['probe_nfe_to_tol'] <= config.probe.max_iter
  for name in ('convergence.png', 'accuracy_vs_time.png'):
    assert os.path.getsize(tmp_path / name) > 1000
  # A resumed run's training time goes on from its last kept evaluation (here
  # set to 1000 s) instead of starting again at 0.
  records = metrics_lib.read_history(str(tmp_path))
  for record in records:
    if record['split'] == 'eval':
      record['train_wall_time'] = 1000.0
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(record) + '\n' for record in records)
  config.num_steps = 4
  start = time.perf_counter()
  results = cli.execute('deq_cifar10', deq_cifar10.run, config, str(tmp_path),
                        allow_config_change=True)
  elapsed = time.perf_counter() - start
  (last,) = [r for r in _history(tmp_path) if r['split'] == 'eval' and r['step'] == 4]
  assert last['train_wall_time'] == results['test']['train_wall_time']
  assert 1000 < last['train_wall_time'] < 1000 + elapsed


def test_imagenet_experiment_end_to_end(tmp_path, shared_data):
  """The ImageNet folder pipeline through the unrolled (pre-training) phase,
  with the reference's small Jacobian weight on every pre-training step."""
  from experiments import deq_imagenet
  config = cli.get_config('deq_imagenet', 'quickstart', {
      'data.dir': str(shared_data), 'num_steps': 2, 'deq.pretrain_steps': 2,
      'probe.examples': 0})
  results = cli.execute('deq_imagenet', deq_imagenet.run, config, str(tmp_path))
  assert results['num_classes'] == 10  # imagenet-mini
  history = _history(tmp_path)
  train = [r for r in history if r['split'] == 'train']
  assert [(r['step'], r['phase']) for r in train] == [(1, 'pretrain'),
                                                      (2, 'pretrain')]
  for record in train:
    assert np.isfinite(record['loss'])
    assert record['forward_nfe'] == mdeq.mdeq_config('tiny').num_layers
    assert record['jacobian_applied'] == 1.0
    assert record['jacobian_weight'] == pytest.approx(0.03)
    assert record['loss'] == pytest.approx(
        record['cross_entropy'] + 0.03 * record['jacobian_loss'], rel=1e-5)
  assert len([r for r in history if r['split'] == 'eval']) == 1
  assert 0 <= results['test']['accuracy'] <= 1


def test_bad_configuration_is_refused():
  with pytest.raises(cli.ConfigError, match='jacobian.probability'):
    cli.get_config('deq_cifar10', 'paper', {'jacobian.probability': 1.5})
  with pytest.raises(cli.ConfigError, match='Unknown MDEQ configuration'):
    cli.get_config('deq_cifar10', 'paper', {'model.name': 'big'})
  with pytest.raises(cli.ConfigError, match='3 classes but the data has 10'):
    cli.get_config('deq_cifar10', 'quickstart', {'model.num_classes': 3})
  with pytest.raises(cli.ConfigError, match='multiple of 2'):
    cli.get_config('deq_imagenet', 'paper', {'data.image_size': 200})
  with pytest.raises(cli.ConfigError, match='deq.forward.solver'):
    cli.get_config('deq_imagenet', 'paper', {'deq.forward.solver': 'newton'})
