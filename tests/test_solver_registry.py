"""The solver registry: a user's own solver in solve, fixed_point, DEQ, configs.

The user's solver below is written only with the public building blocks
(`fixed_point_loop`); references are dense solves in float64.
"""
import haiku as hk
import jax
from x64 import enable_x64
import jax.numpy as jnp
import numpy as np
import pytest

import jreg.deq as deq
from jreg import cli
from jreg.tasks import deq as deq_task
from small_deq import dense_ift_grad
from small_deq import tanh_cell
from small_deq import tanh_params

BUILT_IN = ('fixed_point', 'anderson', 'broyden', 'gmres', 'bicgstab')


def secant_solve(f, z0, config):
  """A user's solver: the one-step secant (Anderson(1)) iteration.

  With g_k = f(z_k) - z_k and the last differences dz, dg, per example
  theta = (g_k, dg) / (dg, dg) and z_{k+1} = f(z_k) - theta (f(z_k) - f(z_{k-1}))
  (a first step of plain iteration).
  """

  def update(z, fz, state):
    z_prev, fz_prev, started = state
    dg = (fz - z) - (fz_prev - z_prev)
    den = jnp.sum(dg * dg, -1, keepdims=True)
    theta = jnp.where(started & (den > 0),
                      jnp.sum((fz - z) * dg, -1, keepdims=True) /
                      jnp.where(den > 0, den, 1.0), 0.0)
    return fz - theta * (fz - fz_prev), (z, fz, jnp.ones_like(started))

  return deq.fixed_point_loop(
      f, z0, config, update,
      init_state=lambda z, fz: (z, fz, jnp.zeros((z.shape[0], 1), bool)))


@pytest.fixture
def secant():
  deq.register_solver('secant', secant_solve)
  yield 'secant'
  deq.unregister_solver('secant')


@pytest.fixture
def x64():
  with enable_x64():
    yield


def _linear(batch=3, dim=6, seed=0):
  """f(z) = A_b z + c_b, a different contraction per example (float64)."""
  rng = np.random.RandomState(seed)
  a = rng.randn(batch, dim, dim)
  a = 0.7 * a / np.linalg.norm(a, 2, axis=(1, 2), keepdims=True)
  c = rng.randn(batch, dim)
  exact = np.linalg.solve(np.eye(dim) - a, c[..., None])[..., 0]
  return jnp.asarray(a), jnp.asarray(c), exact


def test_registry_lists_builtins_and_refuses_unknown_names_in_one_sentence():
  assert deq.registered_solvers()[:5] == BUILT_IN
  assert deq.registered_solvers(nonlinear=True)[:3] == BUILT_IN[:3]
  assert 'gmres' not in deq.registered_solvers(nonlinear=True)
  assert deq.get_solver('gmres').affine_only
  assert not deq.get_solver('anderson').affine_only
  with pytest.raises(ValueError) as error:
    deq.solve(lambda z: z, jnp.zeros((2, 3)), deq.SolverConfig(name='newton'))
  message = str(error.value)
  assert message.count('.') == 1 and message.endswith('.')
  assert "'newton'" in message
  for name in BUILT_IN:
    assert repr(name) in message
  with pytest.raises(ValueError, match='already registered'):
    deq.register_solver('anderson', secant_solve)
  with pytest.raises(ValueError, match='Unknown solver'):
    deq.unregister_solver('newton')


def test_user_solver_forward_solution_and_statistics(secant, x64):
  a, c, exact = _linear()
  f = lambda z: jnp.einsum('bij,bj->bi', a, z) + c
  assert secant in deq.registered_solvers(nonlinear=True)
  for unroll in (False, True):
    config = deq.SolverConfig(name=secant, max_iter=40, tol=1e-10,
                              stop_mode='abs', unroll=unroll)
    z, stats = jax.jit(lambda z0, config=config: deq.solve(f, z0, config))(
        jnp.zeros_like(c))
    np.testing.assert_allclose(z, exact, atol=1e-9)
    # The statistics are those of the returned point, recomputed here.
    fz = np.asarray(f(z))
    abs_res = np.linalg.norm(fz - z, axis=-1)
    np.testing.assert_allclose(stats.abs_residual, abs_res, rtol=1e-10,
                               atol=1e-15)
    np.testing.assert_allclose(
        stats.rel_residual, abs_res / (np.linalg.norm(fz, axis=-1) + 1e-8),
        rtol=1e-10, atol=1e-15)
    assert bool(stats.all_converged)
    if unroll:
      assert int(stats.nfe) == 40
    else:  # the batch stops once every example converged
      assert 2 <= int(stats.nfe) < 40
  # Faster than plain iteration, so the user's update is what ran.
  _, plain = deq.solve(f, jnp.zeros_like(c), config._replace(
      name='fixed_point', unroll=False))
  _, own = deq.solve(f, jnp.zeros_like(c), config._replace(unroll=False))
  assert int(own.nfe) < int(plain.nfe)
  # A budget too small is reported.
  _, short = deq.solve(f, jnp.zeros_like(c), config._replace(
      unroll=False, max_iter=3))
  assert int(short.nfe) == 3 and not bool(short.all_converged)


def test_user_solver_in_fixed_point_forward_and_implicit_backward(secant, x64):
  params = tanh_params(scale=0.6)
  x = jnp.asarray(np.random.RandomState(2).randn(3, 3))
  config = deq.SolverConfig(name=secant, max_iter=60, tol=1e-12,
                            stop_mode='abs')
  backward = deq.BackwardConfig(solver=config)

  def loss(params):
    z, _ = deq.fixed_point(tanh_cell, params, x, jnp.zeros((3, 4)),
                           forward=config, backward=backward)
    return jnp.sum(jnp.sin(z) * jnp.arange(1.0, 5.0))

  z_star, stats = jax.jit(lambda p: deq.fixed_point(
      tanh_cell, p, x, jnp.zeros((3, 4)), forward=config))(params)
  reference = jax.lax.fori_loop(0, 400, lambda _, z: tanh_cell(params, z, x),
                                jnp.zeros((3, 4)))
  np.testing.assert_allclose(z_star, reference, atol=1e-11)
  assert bool(stats.all_converged)
  got = jax.jit(jax.grad(loss))(params)
  want = dense_ift_grad(tanh_cell, params, x, z_star,
                        jnp.cos(z_star) * jnp.arange(1.0, 5.0))
  for key in params:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-11)


def _deq_model(forward, backward):
  def cell(z, x):
    w = hk.get_parameter('w', [4, 4], init=hk.initializers.RandomNormal(0.3))
    return jnp.tanh(z @ w + x)

  def f(x):
    layer = deq.DEQ(cell, forward=forward, backward=backward,
                    jacobian_vectors=2, name='deq')
    z, info = layer(x, jnp.zeros_like(x), jacobian_loss=True,
                    rng=jax.random.PRNGKey(7))
    return z, info

  return hk.without_apply_rng(hk.transform(f)), cell


def test_user_solver_in_deq_module_stats_gradients_and_jacobian_term(secant,
                                                                     x64):
  x = jnp.asarray(np.random.RandomState(3).randn(5, 4))
  own = deq.SolverConfig(name=secant, max_iter=60, tol=1e-12, stop_mode='abs')
  model, cell = _deq_model(own, deq.BackwardConfig(solver=own))
  params = model.init(jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply)
  (z_star, info) = apply(params, x)
  # Forward statistics: those of the returned z*, recomputed.
  inner = hk.without_apply_rng(hk.transform(cell))
  cell_params = deq.cell_params(params, 'deq')
  fz = inner.apply(cell_params, z_star, x)
  abs_res = np.linalg.norm(np.asarray(fz - z_star), axis=-1)
  np.testing.assert_allclose(info['forward_abs_residual'], abs_res.mean(),
                             rtol=1e-9, atol=1e-16)
  assert float(info['forward_converged_fraction']) == 1.0
  assert 2 <= float(info['forward_nfe']) < 60
  # Gradients of a loss of z*: the dense implicit-function-theorem solve.
  weights = jnp.arange(1.0, 5.0)
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(jnp.sin(model.apply(p, x)[0]) * weights)))(params)
  want = dense_ift_grad(lambda p, z, xx: inner.apply(p, z, xx), cell_params, x,
                        z_star, jnp.cos(z_star) * weights)
  for g, w in zip(jax.tree.leaves(deq.cell_params(grads, 'deq')),
                  jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)
  # The Jacobian term (same random vectors) equals that of a built-in solve,
  # and its gradient too.
  anderson = deq.SolverConfig(name='anderson', max_iter=60, tol=1e-12,
                              stop_mode='abs', ridge=1e-10)
  reference_model, _ = _deq_model(anderson, deq.BackwardConfig(solver=anderson))
  _, reference_info = jax.jit(reference_model.apply)(params, x)
  np.testing.assert_allclose(info['jacobian_loss'],
                             reference_info['jacobian_loss'], rtol=1e-9)
  jac_grad = jax.jit(jax.grad(
      lambda p: model.apply(p, x)[1]['jacobian_loss']))(params)
  ref_grad = jax.jit(jax.grad(
      lambda p: reference_model.apply(p, x)[1]['jacobian_loss']))(params)
  for g, w in zip(jax.tree.leaves(jac_grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-12)
  assert float(info['jacobian_loss']) > 0


def test_configs_accept_registered_names(secant):
  group = {'solver': secant, 'max_iter': 10, 'tol': 1e-4, 'stop_mode': 'abs'}
  assert deq_task.solver_config(group).name == secant
  assert deq_task.backward_config(group).solver.name == secant
  config = cli.get_config('deq_synthetic', 'quickstart', {
      'deq.forward.solver': secant, 'deq.backward.solver': secant})
  assert config.deq.forward.solver == secant
  with pytest.raises(ValueError, match="deq.forward.solver must be one of"):
    deq_task.solver_config(dict(group, solver='newton'))
