"""GMRES and BiCGStab backward solves against dense solves of (I - J^T) u = g.

Each example of a batch is its own system; references are
`jnp.linalg.solve` per example in float64.
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
from small_deq import dense_backward
from small_deq import tanh_cell
from small_deq import tanh_params

KRYLOV = ('gmres', 'bicgstab')


@pytest.fixture
def x64():
  with enable_x64():
    yield


def _affine(batch=3, dim=8, seed=0, radius=0.9):
  """h(u) = L_b u + b_b with a different, non-symmetric L_b per example."""
  rng = np.random.RandomState(seed)
  lin = rng.randn(batch, dim, dim)
  lin = radius * lin / np.linalg.norm(lin, 2, axis=(1, 2), keepdims=True)
  b = rng.randn(batch, dim)
  exact = np.linalg.solve(np.eye(dim) - lin, b[..., None])[..., 0]
  h = lambda u: jnp.einsum('bij,bj->bi', jnp.asarray(lin), u) + jnp.asarray(b)
  return h, exact


def _check_stats(h, u, stats, budget):
  """Residuals are ||h(u) - u|| recomputed; nfe within the budget."""
  hu = np.asarray(h(u))
  abs_res = np.linalg.norm(hu - np.asarray(u), axis=-1)
  np.testing.assert_allclose(stats.abs_residual, abs_res, rtol=1e-9,
                             atol=1e-14)
  np.testing.assert_allclose(
      stats.rel_residual, abs_res / (np.linalg.norm(hu, axis=-1) + 1e-8),
      rtol=1e-9, atol=1e-14)
  assert 1 <= int(stats.nfe) <= budget


# unroll=True compiles the whole budget as straight-line code: small budgets.
@pytest.mark.parametrize('name, stop_mode, unroll, restart, budget', [
    ('gmres', 'abs', False, None, 40), ('gmres', 'rel', True, None, 6),
    ('gmres', 'abs', False, 4, 60), ('bicgstab', 'abs', False, None, 40),
    ('bicgstab', 'rel', True, None, 6)])
def test_linear_systems_match_dense_solve(name, stop_mode, unroll, restart,
                                          budget, x64):
  h, exact = _affine()
  config = deq.SolverConfig(name=name, max_iter=budget, tol=1e-11,
                            stop_mode=stop_mode, unroll=unroll,
                            restart=restart)
  u0 = jnp.asarray(np.random.RandomState(1).randn(3, 8))  # any initial point
  u, stats = jax.jit(lambda u0: deq.solve(h, u0, config))(u0)
  _check_stats(h, u, stats, budget)
  # ||u - u*|| <= ||(I - L)^-1|| ||h(u) - u|| <= ||h(u) - u|| / (1 - 0.9).
  error = np.linalg.norm(np.asarray(u) - exact, axis=-1)
  assert np.all(error <= np.asarray(stats.abs_residual) / 0.1 + 1e-12)
  if unroll:
    assert int(stats.nfe) == budget
    # The straight-line form is the loop run to the budget (tol 0).
    loop_u, loop_stats = deq.solve(h, u0, config._replace(unroll=False, tol=0.0))
    assert int(loop_stats.nfe) == budget
    np.testing.assert_allclose(u, loop_u, rtol=1e-12, atol=1e-14)
  else:
    assert bool(stats.all_converged)
    np.testing.assert_allclose(u, exact, rtol=1e-8, atol=1e-9)
  if name == 'gmres' and restart is None and not unroll:
    # Full GMRES ends in at most D = 8 products (exact arithmetic): h(u0),
    # <= 8 products, one check; rounding may take one more cycle.
    assert int(stats.nfe) <= 8 + 2 + 2


def test_gmres_needs_no_contraction(x64):
  """Spectral radius of L above 1: plain iteration diverges, GMRES solves."""
  h, exact = _affine(radius=1.8, seed=2)
  config = deq.SolverConfig(name='gmres', max_iter=20, tol=1e-10,
                            stop_mode='abs')
  u, stats = deq.solve(h, jnp.zeros((3, 8)), config)
  np.testing.assert_allclose(u, exact, rtol=1e-8, atol=1e-9)
  _check_stats(h, u, stats, 20)
  _, plain = deq.solve(h, jnp.zeros((3, 8)), config._replace(
      name='fixed_point'))
  assert not bool(plain.all_converged)


@pytest.mark.parametrize('name', KRYLOV)
def test_budget_and_nonconvergence_are_reported(name, x64):
  h, _ = _affine(dim=30, radius=0.95, seed=3)
  config = deq.SolverConfig(name=name, max_iter=6, tol=1e-13, stop_mode='abs')
  u, stats = deq.solve(h, jnp.zeros((3, 30)), config)
  assert int(stats.nfe) == 6 and not bool(stats.all_converged)
  _check_stats(h, u, stats, 6)
  # Never worse than the initial point (best iterate); GMRES minimises the
  # residual, so its last iterate (checked by the last evaluation) is better.
  initial = np.linalg.norm(np.asarray(h(jnp.zeros((3, 30)))), axis=-1)
  assert np.all(np.asarray(stats.abs_residual) <= initial)
  if name == 'gmres':
    assert np.all(np.asarray(stats.abs_residual) < 0.9 * initial)


FORWARD = deq.SolverConfig(name='anderson', max_iter=60, tol=1e-13,
                           stop_mode='abs', ridge=1e-10)


@pytest.mark.parametrize('name', KRYLOV)
def test_backward_system_of_a_nonlinear_cell(name, x64):
  params = tanh_params(dim=5, seed=4, scale=0.8)
  x = jnp.asarray(np.random.RandomState(5).randn(4, 3))
  z_star, _ = deq.solve(lambda z: tanh_cell(params, z, x), jnp.zeros((4, 5)),
                        FORWARD)
  g = jnp.asarray(np.random.RandomState(6).randn(4, 5))
  _, vjp = jax.vjp(lambda z: tanh_cell(params, z, x), z_star)
  h = lambda u: vjp(u)[0] + g     # u = J_f(z*)^T u + g
  config = deq.SolverConfig(name=name, max_iter=30, tol=1e-12,
                            stop_mode='abs')
  u, stats = jax.jit(lambda u0: deq.solve(h, u0, config))(jnp.zeros_like(g))
  np.testing.assert_allclose(u, dense_backward(tanh_cell, params, x, z_star, g),
                             rtol=1e-9, atol=1e-10)
  assert bool(stats.all_converged)
  _check_stats(h, u, stats, 30)


def test_deq_gradients_with_krylov_backward(x64):
  params = tanh_params(dim=5, seed=4, scale=0.8)
  x = jnp.asarray(np.random.RandomState(7).randn(4, 3))
  weights = jnp.arange(1.0, 6.0)

  def loss(solver):
    backward = deq.BackwardConfig(solver=solver)

    def fn(params, probe):
      z, _ = deq.fixed_point(tanh_cell, params, x, jnp.zeros((4, 5)),
                             forward=FORWARD, backward=backward,
                             stats_probe=probe)
      return jnp.sum(jnp.sin(z) * weights)
    return jax.jit(jax.grad(fn, argnums=(0, 1)))

  z_star, _ = deq.fixed_point(tanh_cell, params, x, jnp.zeros((4, 5)),
                              forward=FORWARD)
  u = dense_backward(tanh_cell, params, x, z_star,
                     jnp.cos(z_star) * weights)
  _, vjp = jax.vjp(lambda p: tanh_cell(p, z_star, x), params)
  (dense,) = vjp(u)
  probe = jnp.zeros(4, jnp.float32)
  anderson, _ = loss(deq.SolverConfig(name='anderson', max_iter=60, tol=1e-12,
                                      stop_mode='abs', ridge=1e-10))(
                                          params, probe)
  for name in KRYLOV:
    grads, probe_grad = loss(deq.SolverConfig(name=name, max_iter=20,
                                              tol=1e-12, stop_mode='abs'))(
                                                  params, probe)
    for key in params:
      np.testing.assert_allclose(grads[key], dense[key], rtol=1e-9, atol=1e-11)
      np.testing.assert_allclose(grads[key], anderson[key], rtol=1e-8,
                                 atol=1e-10)
    metrics = deq.probe_to_metrics(probe_grad)
    assert 2 <= float(metrics['backward_nfe']) <= 20
    assert float(metrics['backward_converged_fraction']) == 1.0
    assert float(metrics['backward_abs_residual']) <= 1e-12


def test_bfloat16_states():
  """bfloat16 states; vectors and small systems are kept in float32."""
  rng = np.random.RandomState(8)
  lin = rng.randn(3, 6, 6)
  lin = 0.6 * lin / np.linalg.norm(lin, 2, axis=(1, 2), keepdims=True)
  lin, b = jnp.asarray(lin, jnp.bfloat16), jnp.asarray(rng.randn(3, 6),
                                                       jnp.bfloat16)
  h = lambda u: jnp.einsum('bij,bj->bi', lin, u) + b
  # The exact solution of the rounded system; ||(I - L)^-1|| <= 1 / 0.4.
  exact = np.linalg.solve(np.eye(6) - np.asarray(lin, np.float64),
                          np.asarray(b, np.float64)[..., None])[..., 0]
  for name in KRYLOV:
    u, stats = deq.solve(h, jnp.zeros((3, 6), jnp.bfloat16), deq.SolverConfig(
        name=name, max_iter=20, tol=2e-2, stop_mode='rel'))
    assert u.dtype == jnp.bfloat16
    assert bool(stats.all_converged)
    error = np.linalg.norm(np.asarray(u, np.float64) - exact, axis=-1)
    # The residual is evaluated in bfloat16: allow its rounding, 2^-8 |h(u)|.
    slack = 2.0 ** -8 * np.linalg.norm(exact, axis=-1) / 0.4
    assert np.all(error <= np.asarray(stats.abs_residual, np.float64) / 0.4
                  + slack), (name, error)


def test_affine_only_solvers_are_refused_for_the_forward_solve():
  params = tanh_params(dim=5, seed=4, scale=0.8, dtype=jnp.float32)
  x = jnp.zeros((2, 3))
  for name in KRYLOV:
    with pytest.raises(ValueError) as error:
      deq.fixed_point(tanh_cell, params, x, jnp.zeros((2, 5)),
                      forward=deq.SolverConfig(name=name))
    message = str(error.value)
    assert f"'{name}'" in message and 'affine' in message
    assert message.count('.') == 1 and message.endswith('.')

    def f(x, name=name):
      layer = deq.DEQ(lambda z, xx: jnp.tanh(hk.Linear(5)(z) + xx),
                      forward=deq.SolverConfig(name=name))
      return layer(x, jnp.zeros_like(x))[0]

    with pytest.raises(ValueError, match='affine'):
      hk.transform(f).init(jax.random.PRNGKey(0), jnp.zeros((2, 5)))


def test_configs_take_krylov_backward_and_refuse_krylov_forward():
  config = cli.get_config('deq_synthetic', 'quickstart',
                          {'deq.backward.solver': 'gmres'})
  backward = deq_task.backward_config(config.deq.backward)
  assert backward.solver.name == 'gmres'
  with pytest.raises(cli.ConfigError, match='deq.forward.solver') as error:
    cli.get_config('deq_synthetic', 'quickstart',
                   {'deq.forward.solver': 'bicgstab'})
  assert 'affine' in str(error.value)
  with pytest.raises(ValueError, match='backward solve'):
    deq_task.solver_config(config.deq.backward, 'deq.forward')
