"""Mixed-precision DEQs: the cell in bfloat16 / float16, solver and gradients in float32.

Tolerances. With unit roundoff u (bfloat16: 2^-8, float16: 2^-11) every cell
evaluation carries a relative error of a few u; at a fixed point of a map
with contraction factor L the error of z* (and of the backward solution u)
is amplified by 1 / (1 - L) (Bai et al., 2019, Thm. 1: z* and u solve
linear systems with I - J_f). The gradient checks below use L = 0.5 and
allow a relative error of 4 u / (1 - L) = 8 u: 3.1e-2 for bfloat16 and
3.9e-3 for float16 (measured: 1.6e-2 and 1.2e-3).
"""
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreg import cli
from jreg import deq
from jreg import layers
from jreg.models import mdeq
from jreg.tasks import deq as deq_task
from jreg.tasks import deq_lm
from jreg.tasks import deq_synthetic
from jreg.tasks import mdeq as mdeq_task

LOW = [jnp.bfloat16, jnp.float16]
UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}
CONTRACTION = 0.5


def _tolerance(dtype):
  return 4 * UNIT_ROUNDOFF[dtype] / (1 - CONTRACTION)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in jax.tree.leaves(tree)])


def _relative_error(tree, reference):
  a, b = _flat(tree), _flat(reference)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _tanh_problem(batch=4, dim=16, in_dim=8, seed=1):
  """z -> tanh(z W + x U + b) with ||W||_2 = CONTRACTION (a contraction)."""
  rng = np.random.RandomState(seed)
  w = rng.randn(dim, dim)
  params = {'w': jnp.asarray(CONTRACTION * w / np.linalg.norm(w, 2), jnp.float32),
            'u': jnp.asarray(rng.randn(in_dim, dim), jnp.float32),
            'b': jnp.asarray(0.1 * rng.randn(dim), jnp.float32)}
  x = jnp.asarray(rng.randn(batch, in_dim), jnp.float32)
  target = jnp.asarray(rng.randn(batch, dim), jnp.float32)
  return params, x, target


_SEEN_DTYPES = []


def _tanh_cell(params, z, x):
  _SEEN_DTYPES.append((z.dtype, x.dtype, params['w'].dtype))  # at trace time
  return jnp.tanh(z @ params['w'] + x @ params['u'] + params['b'])


_TIGHT = deq.SolverConfig('anderson', max_iter=50, tol=1e-6)
_BACKWARD = deq.BackwardConfig(solver=_TIGHT)


@functools.lru_cache(maxsize=None)
def _gradients(compute_dtype, loss_scale):
  """(gradients, dtypes the cell saw) of a fixed-point loss (compiled once)."""
  params, x, target = _tanh_problem()

  def loss(p, x):
    z_star, _ = deq.fixed_point(_tanh_cell, p, x, jnp.zeros_like(target),
                                forward=_TIGHT, backward=_BACKWARD,
                                compute_dtype=compute_dtype)
    assert z_star.dtype == jnp.float32  # the state stays float32
    return loss_scale * jnp.mean(jnp.square(z_star - target))

  _SEEN_DTYPES.clear()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  return grads, set(_SEEN_DTYPES)


# loss_scale 1e-6 gives cotangents dl/dz* of ~1e-8, below float16's smallest
# subnormal (6e-8): without the power-of-two scaling of the float16 VJPs
# their relative error was 0.76; with it it is 1.1e-3.
@pytest.mark.parametrize('loss_scale', [1.0, 1e-6])
@pytest.mark.parametrize('dtype', LOW)
def test_fixed_point_gradients_match_float32(dtype, loss_scale):
  reference, seen32 = _gradients(None, loss_scale)
  grads, seen = _gradients(dtype, loss_scale)
  # The cell ran in the compute dtype (inputs, state and parameters cast).
  assert seen32 == {(jnp.dtype(jnp.float32),) * 3}
  assert seen == {(jnp.dtype(dtype),) * 3}
  # Gradients of the float32 master parameters and inputs are float32 ...
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
  # ... within 8 u of float32's, and not float32's bit for bit.
  error = _relative_error(grads, reference)
  assert error < _tolerance(dtype), error
  assert np.any(_flat(grads) != _flat(reference))


def _haiku_deq(compute_dtype):
  """A Haiku DEQ of a tanh layer, its loss with the Jacobian term, and rho."""

  def cell(z, x):
    _SEEN_DTYPES.append(z.dtype)
    w_init = hk.initializers.Orthogonal(CONTRACTION)
    return jnp.tanh(hk.Linear(z.shape[-1], w_init=w_init, name='w')(z)
                    + hk.Linear(z.shape[-1], name='u')(x))

  def forward(x, target):
    layer = deq.DEQ(cell, forward=_TIGHT, backward=_BACKWARD,
                    spectral_radius_iters=20, compute_dtype=compute_dtype)
    z_star, info = layer(x, jnp.zeros_like(target), jacobian_loss=True,
                         spectral_radius=True, rng=jax.random.key(7))
    loss = jnp.mean(jnp.square(z_star - target)) + info['jacobian_loss']
    return loss, info

  return hk.transform(forward)


@functools.lru_cache(maxsize=None)
def _module_results(compute_dtype):
  """(params, loss, info, grads) of `_haiku_deq` (compiled once per dtype)."""
  _, x, target = _tanh_problem()
  model = _haiku_deq(compute_dtype)
  params = model.init(jax.random.key(0), x, target)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  _SEEN_DTYPES.clear()
  (loss, info), grads = jax.jit(jax.value_and_grad(
      lambda p: model.apply(p, None, x, target), has_aux=True))(params)
  assert set(_SEEN_DTYPES) == {jnp.dtype(compute_dtype or jnp.float32)}
  assert info['jacobian_loss'].dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
  return params, loss, info, grads


@pytest.mark.parametrize('dtype', LOW)
def test_module_jacobian_term_and_gradients_match_float32(dtype):
  """`DEQ(compute_dtype=...)`: float32 master parameters, and the loss with
  the Jacobian term (a VJP differentiated again: reverse over reverse),
  its gradient and the spectral radius within 8 u of float32's."""
  params32, loss32, info32, grads32 = _module_results(None)
  params_low, loss_low, info_low, grads_low = _module_results(dtype)
  for a, b in zip(jax.tree.leaves(params32), jax.tree.leaves(params_low)):
    np.testing.assert_array_equal(a, b)  # the same float32 initialisation
  tol = _tolerance(dtype)
  assert float(info32['jacobian_loss']) > 0.05
  for key in ('jacobian_loss', 'spectral_radius'):
    assert abs(float(info_low[key]) / float(info32[key]) - 1) < tol, key
  assert abs(float(loss_low) / float(loss32) - 1) < tol
  error = _relative_error(grads_low, grads32)
  assert error < tol, error
  assert np.any(_flat(grads_low) != _flat(grads32))


def test_tiny_mdeq_converges_in_bfloat16_with_float32_nfe():
  """Broyden on the tiny MDEQ cell: the NFE to reach a relative residual of
  1e-1 and 3e-2 (about 8 bfloat16 ulps; the bfloat16 residual floor of this
  cell is about 9e-3) in bfloat16 is float32's +- 1.

  The cell's injection is made to dominate (GroupNorm gain 4 after the
  injection, weight-norm gain 0.1 on the second convolution), so that Broyden
  converges in about ten steps, as for Jacobian-regularised MDEQs; the cell at
  initialisation needs 25-30 steps, and the NFE of such an ill-conditioned
  solve moves by a few steps under any rounding perturbation.
  """
  config = mdeq.mdeq_config('tiny')
  stem = hk.without_apply_rng(hk.transform(lambda im: mdeq.Stem(config)(im)))
  cell = hk.without_apply_rng(hk.transform(
      lambda z, x: mdeq.MDEQCell(config)(z, x)))
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  x = {'injection': stem.apply(stem.init(jax.random.key(1), images), images)}
  z0 = mdeq.initial_state(config, x['injection'])
  params = cell.init(jax.random.key(3), z0, x)
  params = {module: {name: value * (4.0 if module.endswith('gn2') and name == 'scale'
                                    else 0.1 if module.endswith('conv2') and name == 'g'
                                    else 1.0)
                     for name, value in values.items()}
            for module, values in params.items()}
  nfe = {}
  for dtype in (None, jnp.bfloat16):
    f = deq.mixed_precision_cell(cell.apply, dtype)
    solve = jax.jit(lambda p, tol, f=f: deq.solve(
        lambda z: f(p, z, x), z0, deq.SolverConfig('broyden', 40, tol)))
    for tol in (1e-1, 3e-2):
      z_star, stats = solve(params, tol)
      assert bool(stats.all_converged), (dtype, tol, stats.rel_residual)
      assert all(z.dtype == jnp.float32 for z in z_star)
      nfe[dtype, tol] = int(stats.nfe)
  for tol in (1e-1, 3e-2):
    assert abs(nfe[jnp.bfloat16, tol] - nfe[None, tol]) <= 1, nfe
    assert nfe[None, tol] < 40


@pytest.mark.parametrize('name', ['deq_cifar10', 'deq_imagenet', 'deq_synthetic',
                                  'deq_wikitext'])
def test_config_flag_is_range_checked(name):
  config = cli.get_config(name, 'quickstart')
  assert config.deq.compute_dtype == 'float32'
  assert deq_task.compute_dtype(config.deq) is None
  for value, dtype in (('bfloat16', jnp.bfloat16), ('float16', jnp.float16)):
    changed = cli.get_config(name, 'quickstart', {'deq.compute_dtype': value})
    assert deq_task.compute_dtype(changed.deq) == dtype
  with pytest.raises(cli.ConfigError, match=r'deq.compute_dtype must be one of'):
    cli.get_config(name, 'quickstart', {'deq.compute_dtype': 'float64'})


# The task tests below keep compilation short: few-step fixed-point solves
# and (MDEQ) the one-VJP 'jfb' backward; the implicit backward solve in low
# precision is tested above.
_CHEAP_DEQ = {'deq.forward.solver': 'fixed_point', 'deq.forward.max_iter': 3,
              'deq.backward.mode': 'jfb'}


def test_mdeq_task_trains_one_step_in_bfloat16():
  config = cli.get_config('deq_cifar10', 'quickstart', dict(
      _CHEAP_DEQ, **{'deq.compute_dtype': 'bfloat16', 'jacobian.weight': 0.0,
                     'jacobian.weight_final': 0.0}))
  fns = mdeq_task.build(config, (8, 8, 3), num_classes=10)
  params, state = jax.jit(fns.init_fn)(jax.random.key(0))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(2, 8, 8, 3)).astype(np.float32),
           'label': np.array([1, 7], np.int32)}
  # The flag reaches the cell: its convolutions run in bfloat16.
  args = (params, state, jax.random.key(1), batch)
  assert 'bf16' in str(jax.make_jaxpr(fns.loss_fn)(*args))
  (loss, (_, metrics)), grads = jax.jit(fns.grad_fn)(*args)
  assert np.isfinite(float(loss))
  assert 1 <= float(metrics['forward_nfe']) <= config.deq.forward.max_iter
  assert float(metrics['backward_nfe']) == 1  # 'jfb'
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))


def test_float32_default_has_no_low_precision_op():
  config = cli.get_config('deq_cifar10', 'quickstart')
  fns = mdeq_task.build(config, (8, 8, 3), num_classes=10)
  params, state = jax.eval_shape(fns.init_fn, jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(fns.predict_fn)(params, state, images)
  assert 'f16' not in str(jaxpr)  # neither bf16 nor f16


def test_transformer_task_trains_one_step_in_bfloat16():
  cheap = {'deq.forward.solver': 'fixed_point', 'deq.forward.max_iter': 3,
           'deq.backward.solver': 'fixed_point', 'deq.backward.max_iter': 3}
  config = cli.get_config('deq_wikitext', 'quickstart', dict(
      cheap, **{'deq.compute_dtype': 'bfloat16', 'batch_size': 2,
                'data.seq_len': 6, 'model.cutoffs': (), 'model.div_val': 1,
                'model.mem_len': 6, 'model.d_inner': 32}))
  built = deq_lm.build(config, vocab_size=50)
  params, state = built.init_fn(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(0, 50, (2, 6)).astype(np.int32),
           'targets': rng.integers(0, 50, (2, 6)).astype(np.int32)}
  args = (params, state, jax.random.key(1), batch)
  assert 'bf16' in str(jax.make_jaxpr(built.loss_fn)(*args))
  (loss, (new_state, _)), grads = jax.jit(built.grad_fn)(*args)
  assert np.isfinite(float(loss))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
  # The memory (the solver's float32 state) stays float32.
  memory = new_state['deq_transformer_lm']['memory_z']
  assert memory.dtype == jnp.float32


def test_synthetic_task_trains_one_step_in_float16():
  config = cli.get_config('deq_synthetic', 'quickstart', {
      'deq.compute_dtype': 'float16', 'jacobian.weight': 1.0})
  params, state = jax.jit(deq_synthetic.init_fn(config))(jax.random.key(0))
  x = np.linspace(-2, 2, 8, dtype=np.float32)[:, None]
  batch = {'x': x, 'y': np.sin(x)}
  loss_fn = deq_synthetic.loss_fn(config)
  args = (params, state, jax.random.key(1), batch)
  assert 'f16' in str(jax.make_jaxpr(loss_fn)(*args))
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(*args)
  assert np.isfinite(float(loss))
  assert all(leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
             for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize('impl', ['custom', 'xla'])
def test_group_norm_statistics_in_float32_for_bfloat16(impl):
  """GroupNorm of a bfloat16 input whose mean (3) exceeds its std (1): the
  one-pass variance E[x^2] - mean^2 in bfloat16 would keep about one digit
  (ulp(10) = 0.0625), and x * gain + bias in bfloat16 cancels digits too
  (measured error 0.043 with float32 statistics); computed in float32 and
  rounded once, the output is within one bfloat16 ulp (2^-8 relative to its
  largest entry) of the float64 normalisation of the same bfloat16 values."""
  x = (3.0 + jax.random.normal(jax.random.key(0), (2, 8, 8, 8))).astype(
      jnp.bfloat16)
  out = layers.group_norm(x, 2, impl=impl)
  assert out.dtype == jnp.bfloat16
  ref = np.asarray(x, np.float64).reshape(2, 64, 2, 4)
  ref = ((ref - ref.mean(axis=(1, 3), keepdims=True))
         / np.sqrt(ref.var(axis=(1, 3), keepdims=True) + 1e-5)).reshape(x.shape)
  error = np.max(np.abs(np.asarray(out, np.float64) - ref))
  assert error <= 2.0**-8 * np.max(np.abs(ref)), error
