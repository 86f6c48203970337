"""Tests of jreg.deq.reversible: the reversible solver and its exact backward.

References: autodiff through the same solver written as a plain Python loop
(exact to rounding), the implicit-function-theorem gradient by a dense solve
(close once the solve is tight), and the solver's own definition for stats.
"""
import contextlib
import io

import haiku as hk
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
import jreg.deq as deq
from jreg.tasks import deq as deq_task
from small_deq import dense_backward


@pytest.fixture(autouse=True)
def float64():
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


def _params(dim=4, in_dim=3, seed=1, scale=0.5):
  rng = np.random.RandomState(seed)
  w = rng.randn(dim, dim)
  return {'w': jnp.asarray(scale * w / np.linalg.norm(w, 2)),
          'u': jnp.asarray(rng.randn(in_dim, dim)),
          'b': jnp.asarray(0.1 * rng.randn(dim))}


def cell(params, z, x):
  """z -> tanh(z W + x['in'] U + b) * x['mask']; z [B, D]; mask is int."""
  pre = z @ params['w'] + x['in'] @ params['u'] + params['b']
  return jnp.tanh(pre) * x['mask']


def _inputs(batch=3, dim=4, in_dim=3, seed=2):
  rng = np.random.RandomState(seed)
  return {'in': jnp.asarray(rng.randn(batch, in_dim)),
          'mask': jnp.ones((batch, dim), jnp.int32)}


def _reference(params, x, z0, beta, num_evals, stop_mode='rel'):
  """The paper's two-state loop, unrolled in Python, with the best iterate.

  y_{n+1} = (1-beta) y_n + beta f(z_n), z_{n+1} = (1-beta) z_n + beta
  f(y_{n+1}), y_0 = z_0, for `num_evals` evaluations of f (the first at
  z_0); returns, per example, the evaluated iterate of lowest residual
  (first on ties) and the indices picked.
  """
  f = lambda z: cell(params, z, x)
  y = z = z0
  iterates = [z0]
  for k in range(1, num_evals):
    if k % 2:
      y = (1 - beta) * y + beta * f(z)
      iterates.append(y)
    else:
      z = (1 - beta) * z + beta * f(y)
      iterates.append(z)
  stacked = jnp.stack(iterates)                          # [K+1, B, D]
  fz = jax.vmap(f)(stacked)                              # [K+1, B, D]
  res = jnp.linalg.norm(jax.lax.stop_gradient(fz - stacked), axis=-1)
  if stop_mode == 'rel':
    res = res / (jnp.linalg.norm(jax.lax.stop_gradient(fz), axis=-1) + 1e-8)
  best = jnp.argmin(res, axis=0)                         # [B], first minimum
  picked = stacked[best, jnp.arange(stacked.shape[1])]
  return picked, best, res


def _loss_weights(batch=3, dim=4, seed=3):
  return jnp.asarray(np.random.RandomState(seed).randn(batch, dim))


def _layer_loss(params, inputs, forward, probe=None):
  z, _ = deq.fixed_point(cell, params, inputs, jnp.zeros_like(_loss_weights()),
                         forward=forward,
                         backward=deq.BackwardConfig(mode='reversible'),
                         stats_probe=probe)
  return jnp.sum(jnp.sin(z) * _loss_weights())


def _reference_loss(params, inputs, beta, num_evals, stop_mode='rel'):
  z, _, _ = _reference(params, inputs, jnp.zeros_like(_loss_weights()), beta,
                       num_evals, stop_mode)
  return jnp.sum(jnp.sin(z) * _loss_weights())


# Gradients with respect to params and x (its int leaf gets a float0 zero).
_layer_grad = jax.jit(jax.grad(_layer_loss, argnums=(0, 1), allow_int=True),
                      static_argnums=2)
_reference_grad = jax.jit(
    jax.grad(_reference_loss, argnums=(0, 1), allow_int=True),
    static_argnums=(2, 3, 4))


def _assert_trees_close(a, b, atol, rtol=0.0):
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(leaf_a), np.asarray(leaf_b),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize('beta, max_iter, tol, unroll', [
    (0.8, 21, 0.0, False),    # budget spent: z_10 of the paper
    (0.8, 40, 3e-5, False),   # early stop on a y-iterate (16 evaluations)
    (1.3, 8, 0.0, True),      # over-relaxation; unrolled loops, both directions
])
def test_gradient_equals_autodiff_through_unrolled_loop(beta, max_iter, tol,
                                                        unroll):
  params, inputs = _params(), _inputs()
  forward = deq.SolverConfig(name='reversible', damping=beta,
                             max_iter=max_iter, tol=tol, unroll=unroll)
  z, stats = jax.jit(lambda p, x: deq.fixed_point(
      cell, p, x, jnp.zeros((3, 4)), forward=forward,
      backward=deq.BackwardConfig(mode='reversible')))(params, inputs)
  num_evals = int(stats.nfe)
  z_ref, _, _ = _reference(params, inputs, jnp.zeros((3, 4)), beta, num_evals)
  np.testing.assert_allclose(z, z_ref, atol=1e-13)
  grads = _layer_grad(params, inputs, forward)
  ref = _reference_grad(params, inputs, beta, num_evals)
  _assert_trees_close(grads[0], ref[0], atol=1e-10)
  np.testing.assert_allclose(grads[1]['in'], ref[1]['in'], atol=1e-10)
  assert grads[1]['mask'].dtype == jax.dtypes.float0


def test_best_iterate_before_the_last_one():
  """An expansive map (||W|| = 1.6): residuals go up and down, so examples
  return different, earlier iterates; the backward starts each at its own."""
  params, inputs = _params(scale=1.6, seed=8), _inputs(seed=9)
  beta, num_evals = 1.5, 12
  _, best, _ = _reference(params, inputs, jnp.zeros((3, 4)), beta, num_evals)
  best = np.asarray(best)
  assert len(set(best.tolist())) > 1 and np.all(best < num_evals - 1)
  forward = deq.SolverConfig(name='reversible', damping=beta,
                             max_iter=num_evals, tol=0.0)
  grads = _layer_grad(params, inputs, forward)
  ref = _reference_grad(params, inputs, beta, num_evals)
  _assert_trees_close(grads[0], ref[0], atol=1e-10)
  probe = jax.grad(_layer_loss, argnums=3)(
      params, inputs, forward, jnp.zeros((deq.STATS_PROBE_SIZE,)))
  assert int(probe[0]) == best.max()   # reverse steps: the largest k*


@pytest.mark.parametrize('tol', [1e-12, 1e-3])
def test_implicit_gradient_differs_by_order_of_the_residual(tol):
  """The exact gradient of the finite solve against the IFT gradient (dense
  solve, linearised at the returned z): they differ by O(residual) since the
  IFT assumes an exact fixed point and ignores the truncated iteration.
  Measured max |difference| / max rel. residual: 3.6 (tol 1e-12, 43
  evaluations), 3.5 (tol 1e-3, 11 evaluations)."""
  params, inputs = _params(), _inputs()
  forward = deq.SolverConfig(name='reversible', damping=0.8, max_iter=400,
                             tol=tol)
  z, stats = deq.fixed_point(cell, params, inputs, jnp.zeros((3, 4)),
                             forward=forward,
                             backward=deq.BackwardConfig(mode='reversible'))
  assert bool(stats.all_converged)
  residual = float(jnp.max(stats.rel_residual))
  grads = _layer_grad(params, inputs, forward)

  # IFT by a dense solve per example: u = (I - J^T)^-1 dl/dz*.
  dl_dz = jnp.cos(z) * _loss_weights()
  u = dense_backward(cell, params, inputs, z, dl_dz)
  _, vjp = jax.vjp(lambda p, xin: cell(p, z, {**inputs, 'in': xin}),
                   params, inputs['in'])
  ift = vjp(u)
  difference = max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(
          jax.tree.leaves((grads[0], grads[1]['in'])), jax.tree.leaves(ift)))
  assert difference <= 10 * residual
  if tol == 1e-12:
    assert difference < 1e-10
  else:
    assert difference >= 0.1 * residual   # a real difference, not rounding


def test_reconstruction_error_and_backward_stats():
  """The rebuilt states lose about eps * (residual reduction of the solve):
  each reverse step expands errors by the factor the forward step contracts
  them. Measured (beta 0.8): 9e-13 at 11 evaluations, 3e-9 at 21."""
  params, inputs = _params(), _inputs()
  beta, eps = 0.8, np.finfo(np.float64).eps
  for num_evals in (11, 21):
    forward = deq.SolverConfig(name='reversible', damping=beta,
                               max_iter=num_evals, tol=0.0)
    probe = jax.grad(_layer_loss, argnums=3)(
        params, inputs, forward, jnp.zeros((deq.STATS_PROBE_SIZE,)))
    assert int(probe[0]) == num_evals - 1   # one VJP per forward step
    assert float(probe[3]) == 1.0
    _, _, res = _reference(params, inputs, jnp.zeros((3, 4)), beta, num_evals,
                           'abs')
    reduction = float(jnp.max(res[0] / res[-1]))
    assert 0.0 <= float(probe[1]) <= 10 * eps * reduction
  # Every reversed state, step by step, against the stored forward ones.
  f = lambda z: cell(params, z, inputs)
  u = [jnp.zeros((3, 4)), jnp.zeros((3, 4))]             # u_-1, u_0
  for _ in range(14):
    u.append((1 - beta) * u[-2] + beta * f(u[-1]))
  a, b = u[-2], u[-1]
  worst = 0.0
  for k in range(len(u) - 3, -1, -1):
    a, b = (b - beta * f(a)) / (1 - beta), a              # -> (u_{k-1}, u_k)
    worst = max(worst, float(jnp.max(jnp.abs(a - u[k]))))
  assert worst < 1e-9   # measured 7.5e-11


def test_gradient_exact_although_early_states_are_lost():
  """41 evaluations: the rebuilt u_0 is off by O(1), yet the gradient matches
  the unrolled loop to 1e-10, since the cotangent reaching step k decays at
  the rate at which the reconstruction error grows backwards from k*."""
  params, inputs = _params(), _inputs()
  forward = deq.SolverConfig(name='reversible', damping=0.8, max_iter=41,
                             tol=0.0)
  probe = jax.grad(_layer_loss, argnums=3)(
      params, inputs, forward, jnp.zeros((deq.STATS_PROBE_SIZE,)))
  assert float(probe[1]) > 1e-3
  grads = _layer_grad(params, inputs, forward)
  ref = _reference_grad(params, inputs, 0.8, 41)
  _assert_trees_close(grads[0], ref[0], atol=1e-10)


def test_solver_stats_follow_the_solver_rules():
  params, inputs = _params(), _inputs()
  f = lambda z: cell(params, z, inputs)
  tol = 1e-5
  z, stats = deq.solve(f, jnp.zeros((3, 4)), deq.SolverConfig(
      name='reversible', damping=0.8, max_iter=60, tol=tol))
  # nfe: the first evaluation count at which every example's best residual
  # is <= tol, from the reference's residuals of all iterates.
  _, _, res = _reference(params, inputs, jnp.zeros((3, 4)), 0.8, 60)
  best_so_far = np.minimum.accumulate(np.asarray(res), axis=0)   # [K+1, B]
  expected_nfe = int(np.argmax(np.all(best_so_far <= tol, axis=1))) + 1
  assert int(stats.nfe) == expected_nfe < 60
  fz = f(z)
  abs_res = np.linalg.norm(fz - z, axis=-1)
  np.testing.assert_allclose(stats.abs_residual, abs_res, rtol=1e-12)
  np.testing.assert_allclose(
      stats.rel_residual, abs_res / (np.linalg.norm(fz, axis=-1) + 1e-8),
      rtol=1e-12)
  assert bool(stats.all_converged)
  # Budget spent without convergence: nfe = max_iter, flags honest.
  _, stats = deq.reversible_iteration(f, jnp.zeros((3, 4)), max_iter=5,
                                      tol=1e-12, beta=0.8)
  assert int(stats.nfe) == 5 and not bool(jnp.any(stats.converged))


def _saved_residuals(fn, *args):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  return out.getvalue().strip().splitlines()


def _unrolled_loss(params, inputs, num_evals):
  return _reference_loss(params, inputs, 0.8, num_evals)


def test_memory_does_not_grow_with_the_number_of_steps():
  """Saved residuals and compiled temporary memory, n = 10 vs 40 steps."""
  params, inputs = _params(), _inputs()
  saved, temp = {}, {}
  for steps in (10, 40):
    forward = deq.SolverConfig(name='reversible', damping=0.8,
                               max_iter=steps + 1, tol=0.0)
    loss = lambda p: _layer_loss(p, inputs, forward)
    saved[steps] = _saved_residuals(loss, params)
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    temp[steps] = compiled.memory_analysis().temp_size_in_bytes
    unrolled = lambda p: _unrolled_loss(p, inputs, steps + 1)
    saved[('unrolled', steps)] = _saved_residuals(unrolled, params)
  assert saved[10] == saved[40]          # what the backward keeps: same list
  assert temp[10] == temp[40]
  # Control: plain autodiff through the loop keeps every step.
  assert (len(saved[('unrolled', 40)]) - len(saved[('unrolled', 10)])
          >= 30)


def test_haiku_layer_and_value_and_grad():
  beta, max_iter = 0.8, 13

  def model(x):
    layer = deq.DEQ(
        lambda z, xx: jnp.tanh(hk.Linear(4, name='mix')(z) +
                               hk.Linear(4, name='inject')(xx)),
        forward=deq.SolverConfig(name='reversible', damping=beta,
                                 max_iter=max_iter, tol=0.0),
        backward=deq.BackwardConfig(mode='reversible'), name='deq')
    return layer(x, jnp.zeros((x.shape[0], 4)))

  net = hk.transform(model)
  x = jnp.asarray(np.random.RandomState(0).randn(3, 3))
  params = net.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: 0.3 * p, params)

  def loss_fn(p, state, rng, batch):
    z, info = net.apply(p, rng, batch)
    return jnp.sum(z ** 2), (state, info)

  (_, (_, metrics)), grads = deq.value_and_grad(loss_fn)(
      params, {}, jax.random.PRNGKey(1), x)
  assert float(metrics['forward_nfe']) == max_iter
  assert float(metrics['backward_nfe']) == max_iter - 1
  assert float(metrics['backward_abs_residual']) < 1e-9

  cell_net = hk.without_apply_rng(hk.transform(
      lambda z, xx: jnp.tanh(hk.Linear(4, name='mix')(z) +
                             hk.Linear(4, name='inject')(xx))))

  def reference(p):
    inner = deq.cell_params(p, 'deq')
    f = lambda z: cell_net.apply(inner, z, x)
    y = z = jnp.zeros((3, 4))
    for k in range(1, max_iter):   # tol 0 and a contraction: best = last
      if k % 2:
        y = (1 - beta) * y + beta * f(z)
      else:
        z = (1 - beta) * z + beta * f(y)
    return jnp.sum(z ** 2)

  _assert_trees_close(grads, jax.grad(reference)(params), atol=1e-10)


def test_refuses_other_forward_solvers_and_bad_beta():
  params, inputs = _params(), _inputs()
  with pytest.raises(ValueError, match="needs the forward solver 'reversible'"):
    _layer_loss(params, inputs, deq.SolverConfig(name='anderson'))
  with pytest.raises(ValueError, match='differ from 1'):
    _layer_loss(params, inputs, deq.SolverConfig(name='reversible'))
  group = configs.solver('reversible', 9, 1e-4)
  with pytest.raises(ValueError, match='deq.forward.damping'):
    deq_task.solver_config(group)
  config = deq_task.solver_config(
      configs.solver('reversible', 9, 1e-4, damping=0.7))
  assert config == deq.SolverConfig(name='reversible', max_iter=9, tol=1e-4,
                                    damping=0.7)
  backward = deq_task.backward_config({
      'mode': 'reversible', 'solver': 'broyden', 'max_iter': 6, 'tol': 1e-4,
      'stop_mode': 'abs'})
  assert backward.mode == 'reversible'


def test_pytree_state_equals_flat_state():
  """z as a dict of two leaves of different shapes: the same solve and
  gradients as the flat [B, 4] state."""
  params, inputs = _params(), _inputs()
  forward = deq.SolverConfig(name='reversible', damping=0.8, max_iter=9,
                             tol=0.0)
  backward = deq.BackwardConfig(mode='reversible')

  def tree_cell(p, z, x):
    flat = jnp.concatenate([z['a'], z['b'].reshape(-1, 2)], axis=1)
    out = cell(p, flat, x)
    return {'a': out[:, :2], 'b': out[:, 2:].reshape(-1, 1, 2)}

  def tree_loss(p):
    z0 = {'a': jnp.zeros((3, 2)), 'b': jnp.zeros((3, 1, 2))}
    z, _ = deq.fixed_point(tree_cell, p, inputs, z0, forward=forward,
                           backward=backward)
    flat = jnp.concatenate([z['a'], z['b'].reshape(-1, 2)], axis=1)
    return jnp.sum(jnp.sin(flat) * _loss_weights())

  np.testing.assert_allclose(tree_loss(params),
                             _layer_loss(params, inputs, forward), atol=1e-14)
  _assert_trees_close(jax.grad(tree_loss)(params),
                      _layer_grad(params, inputs, forward)[0], atol=1e-14)
