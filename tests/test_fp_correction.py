"""Fixed-point correction: recorded solver states, their gradients, the weights."""
import haiku as hk
import jax
from x64 import enable_x64
import jax.numpy as jnp
import numpy as np
import pytest

import jreg.deq as deq
from small_deq import dense_ift_grad
from small_deq import tanh_cell
from small_deq import tanh_params


def _problem(batch=2, seed=2):
  params = tanh_params(scale=0.8)
  x = jnp.asarray(np.random.RandomState(seed).randn(batch, 3))
  return params, x, jnp.zeros((batch, 4))


@pytest.mark.parametrize('name, unroll', [
    ('fixed_point', False), ('anderson', False), ('broyden', False),
    ('anderson', True)])  # `unroll` shares the loop driver of all solvers
def test_recorded_states_equal_solves_with_that_budget(name, unroll):
  with enable_x64():
    params, x, z0 = _problem()
    f = lambda z: tanh_cell(params, z, x)
    config = deq.SolverConfig(name=name, max_iter=7, tol=0.0, unroll=unroll)
    record = (1, 2, 5, 7)
    z, stats, states = deq.solve(f, z0, config, record=record)
    plain_z, plain_stats = deq.solve(f, z0, config)
    np.testing.assert_allclose(z, plain_z, rtol=0, atol=1e-14)  # unchanged
    np.testing.assert_array_equal(stats.nfe, plain_stats.nfe)
    assert len(states) == len(record)
    for k, state in zip(record, states):
      want, _ = deq.solve(f, z0, config._replace(max_iter=k, unroll=True))
      np.testing.assert_allclose(state, want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(states[-1], z, rtol=0, atol=1e-13)
    # The states differ (the test can fail): the solver moves.
    assert np.linalg.norm(states[0] - states[2]) > 1e-2


def test_unreached_states_are_the_final_point():
  with enable_x64():
    params, x, z0 = _problem()
    f = lambda z: tanh_cell(params, z, x)
    config = deq.SolverConfig(name='anderson', max_iter=40, tol=1e-6)
    z, stats, states = deq.solve(f, z0, config, record=(3, 38, 40))
    assert int(stats.nfe) < 38  # stopped early
    np.testing.assert_array_equal(states[1], z)
    np.testing.assert_array_equal(states[2], z)
    want, _ = deq.solve(f, z0, config._replace(max_iter=3))
    np.testing.assert_allclose(states[0], want, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match='max_iter'):
      deq.solve(f, z0, config, record=(41,))


def test_correction_gradient_is_weighted_sum_of_state_gradients():
  with enable_x64():
    params, x, z0 = _problem()
    forward = deq.SolverConfig(name='anderson', max_iter=30, tol=1e-12,
                               stop_mode='abs', ridge=1e-10)
    backward = deq.BackwardConfig(
        mode='implicit', phantom_steps=3, phantom_damping=0.6,
        solver=deq.SolverConfig(name='fixed_point', max_iter=200, tol=1e-13,
                                stop_mode='abs'))
    indices = (2, 5)
    target = jnp.asarray(np.random.RandomState(7).randn(*z0.shape))
    state_loss = lambda z: jnp.sum(jnp.square(z - target))

    def loss(params):
      states, _ = deq.fixed_point_states(tanh_cell, params, x, z0, indices,
                                         forward=forward, backward=backward)
      return deq.fp_correction([state_loss(z) for z in states], 'exponential',
                               gamma=0.7)

    got = jax.jit(jax.grad(loss))(params)

    # By hand: phantom gradient from each recorded state (autodiff through
    # 3 damped steps from the stopped state, cotangent dl/dz at the state),
    # the dense IFT gradient at z*, weighted by torchdeq's formulas.
    n = len(indices) + 1
    weights = [0.7 ** (n - 1 - i) for i in range(n)]
    f = lambda z: tanh_cell(params, z, x)
    want = jax.tree.map(jnp.zeros_like, params)
    for w, k in zip(weights, indices):
      z_k, _ = deq.solve(f, z0, forward._replace(max_iter=k, unroll=True))

      def unrolled(p, z=z_k):
        for _ in range(3):
          z = 0.4 * z + 0.6 * tanh_cell(p, z, x)
        return z

      _, vjp = jax.vjp(unrolled, params)
      (g_k,) = vjp(jax.grad(state_loss)(z_k))
      want = jax.tree.map(lambda a, b, w=w: a + w * b, want, g_k)
    z_star, _ = deq.solve(f, z0, forward)
    g_star = dense_ift_grad(tanh_cell, params, x, z_star,
                            jax.grad(state_loss)(z_star))
    want = jax.tree.map(lambda a, b: a + weights[-1] * b, want, g_star)
    for key in params:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-8, atol=1e-10)
    # The intermediate terms matter (the test can fail).
    assert not np.allclose(got['w'], weights[-1] * g_star['w'], rtol=1e-3)


def test_weights_follow_torchdeq():
  # torchdeq/loss/correction.py: _exp = gamma ** (n-k-1),
  # _linear = 1 - (n-k-1) / n * gamma + bias, _const = c * ones(n).
  np.testing.assert_allclose(deq.correction_weights(3, 'exponential'),
                             [0.64, 0.8, 1.0], rtol=1e-15)
  np.testing.assert_allclose(deq.correction_weights(4, 'linear'),
                             [1 - 0.675, 1 - 0.45, 1 - 0.225, 1.0], rtol=1e-15)
  np.testing.assert_allclose(deq.correction_weights(4, 'linear', gamma=1.0),
                             [0.25, 0.5, 0.75, 1.0], rtol=1e-15)
  np.testing.assert_allclose(deq.correction_weights(2, 'constant'), [1, 1])
  losses = [jnp.float32(2.0), jnp.float32(3.0), jnp.float32(5.0)]
  np.testing.assert_allclose(deq.fp_correction(losses, 'exponential', 0.5),
                             0.25 * 2 + 0.5 * 3 + 5, rtol=1e-7)
  with pytest.raises(ValueError, match='weighting'):
    deq.correction_weights(3, 'exp')


def test_state_indices_follow_torchdeq():
  # torchdeq/core.py DEQIndexing._compute_f_iter: delta = T // n; (k+1) delta
  # when n divides T, else T - (n-k-1) delta; indexing + [T].
  assert deq.state_indices(12, 3) == (4, 8, 12)
  assert deq.state_indices(10, 3) == (4, 7, 10)
  assert deq.state_indices(2, 5) == (1, 2)
  assert deq.state_indices(10, 1) == (10,)
  assert deq.state_indices(10, (2, 5)) == (2, 5, 10)
  with pytest.raises(ValueError):
    deq.state_indices(10, (0,))


def test_module_states_and_default_path():
  """DEQ(supervise_states=...) returns [z_k..., z*]; z* and its gradient are
  those of the layer without supervision."""
  forward = deq.SolverConfig(name='fixed_point', max_iter=12, tol=0.0)
  backward = deq.BackwardConfig(mode='phantom', phantom_steps=2)

  def model(x, supervise):
    cell = lambda z, x: jnp.tanh(hk.Linear(4)(z) + x)
    layer = deq.DEQ(cell, forward=forward, backward=backward,
                    supervise_states=supervise, name='deq')
    return layer(x, jnp.zeros_like(x))

  net = hk.transform(model)
  apply = jax.jit(net.apply, static_argnums=3)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 4), jnp.float32)
  params = net.init(jax.random.PRNGKey(0), x, None)
  z_star, info = apply(params, None, x, None)
  states, info_s = apply(params, None, x, 3)
  assert len(states) == 3
  np.testing.assert_array_equal(states[-1], z_star)
  assert float(info['backward_nfe']) == 2
  assert float(info_s['backward_nfe']) == 2 + 2 * 2
  f = lambda z: tanh_cell_lin(params, z, x)
  for k, state in zip((4, 8), states[:2]):
    want, _ = deq.solve(f, jnp.zeros_like(x), forward._replace(max_iter=k))
    np.testing.assert_allclose(state, want, rtol=1e-6, atol=1e-6)

  def last_loss(params, supervise):
    out, _ = apply(params, None, x, supervise)
    z = out[-1] if supervise else out
    return jnp.sum(jnp.sin(z))

  grad = jax.jit(jax.grad(last_loss), static_argnums=1)
  plain, supervised = grad(params, None), grad(params, 3)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(supervised)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def tanh_cell_lin(params, z, x):
  lin = params['deq/cell/linear']
  return jnp.tanh(z @ lin['w'] + lin['b'] + x)


def test_solvers_that_do_not_record_are_refused_with_a_sentence():
  params, x, z0 = _problem()
  forward = deq.SolverConfig(name='reversible', max_iter=6, tol=0.0,
                             damping=0.8)
  with pytest.raises(ValueError, match="Solver 'reversible' does not record "
                                       'its intermediate states'):
    deq.fixed_point_states(tanh_cell, params, x, z0, (2,), forward=forward)
  with pytest.raises(ValueError, match='does not work with the reversible '
                                       'backward mode'):
    deq.fixed_point_states(tanh_cell, params, x, z0, (2,), forward=forward,
                           backward=deq.BackwardConfig(mode='reversible'))
