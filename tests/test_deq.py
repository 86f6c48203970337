"""Tests of jreg.deq: solvers, implicit gradients, Jacobian terms, Haiku DEQ."""
import haiku as hk
import jax
from x64 import enable_x64
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jreg.deq as deq
from jreg import train
from small_deq import tanh_cell
from small_deq import tanh_params

SOLVERS = ['fixed_point', 'anderson', 'broyden']


def _linear_problem(batch=3, dim=5, seed=0):
  """f(z) = A z + b per example, ||A||_2 = 0.5: exact z* = (I - A)^-1 b."""
  rng = np.random.RandomState(seed)
  a = 0.5 * np.linalg.qr(rng.randn(dim, dim))[0]             # [D, D]
  b = rng.randn(batch, dim)                                   # [B, D]
  exact = np.linalg.solve(np.eye(dim) - a, b.T).T             # [B, D]
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), exact


@pytest.mark.parametrize('name, unroll', [
    ('fixed_point', False), ('anderson', False), ('broyden', False),
    ('fixed_point', True)])  # `unroll` shares the loop driver of all solvers
def test_solver_linear_map_exact_solution(name, unroll):
  a, b, exact = _linear_problem()
  f = lambda z: z @ a.T + b
  config = deq.SolverConfig(name=name, max_iter=30, tol=1e-5, stop_mode='rel',
                            unroll=unroll)
  z, stats = jax.jit(lambda z0: deq.solve(f, z0, config))(jnp.zeros_like(b))
  assert bool(stats.all_converged)
  # For a contraction with constant q = 0.5: ||z - z*|| <= ||f(z) - z|| / (1 - q).
  error = np.linalg.norm(np.asarray(z) - exact, axis=-1)
  assert np.all(error <= np.asarray(stats.abs_residual) / 0.5 + 1e-5)
  assert np.all(error < 2e-4)
  assert 1 <= int(stats.nfe) <= 30
  # The reported residuals are those of the returned point.
  fz = f(z)
  abs_res = np.linalg.norm(fz - z, axis=-1)
  np.testing.assert_allclose(stats.abs_residual, abs_res, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
      stats.rel_residual, abs_res / (np.linalg.norm(fz, axis=-1) + 1e-8),
      rtol=1e-4, atol=1e-7)


def test_accelerated_solvers_need_fewer_evaluations():
  a, b, _ = _linear_problem()
  f = lambda z: z @ a.T + b
  nfe = {}
  for name in SOLVERS:
    _, stats = deq.solve(f, jnp.zeros_like(b),
                         deq.SolverConfig(name=name, max_iter=60, tol=1e-5))
    nfe[name] = int(stats.nfe)
  assert nfe['anderson'] < nfe['fixed_point']
  assert nfe['broyden'] < nfe['fixed_point']
  # The reference's absolute ridge stalls Anderson on this small problem.
  _, stats = deq.solve(f, jnp.zeros_like(b), deq.SolverConfig(
      name='anderson', max_iter=60, tol=1e-5, ridge_relative=False))
  assert int(stats.nfe) > nfe['anderson']


@pytest.mark.parametrize('name', SOLVERS)
def test_solver_tanh_layer_pytree_state(name):
  """A tanh layer whose state is a dict of two leaves of different shapes."""
  params = tanh_params(dim=6, dtype=jnp.float32)
  x = jnp.asarray(np.random.RandomState(2).randn(4, 3), jnp.float32)

  def f(state):  # {'a': [B, 2], 'b': [B, 2, 2]}
    z = jnp.concatenate([state['a'], state['b'].reshape(4, 4)], axis=1)
    out = tanh_cell(params, z, x)
    return {'a': out[:, :2], 'b': out[:, 2:].reshape(4, 2, 2)}

  z0 = {'a': jnp.zeros((4, 2)), 'b': jnp.zeros((4, 2, 2))}
  z, stats = deq.solve(f, z0, deq.SolverConfig(name=name, max_iter=50,
                                               tol=1e-5, stop_mode='abs'))
  reference = jnp.zeros((4, 6))
  for _ in range(300):
    reference = tanh_cell(params, reference, x)
  got = jnp.concatenate([z['a'], z['b'].reshape(4, 4)], axis=1)
  np.testing.assert_allclose(got, reference, atol=1e-5)
  assert z['b'].shape == (4, 2, 2)
  assert bool(stats.all_converged)


@pytest.mark.parametrize('name', SOLVERS)
def test_nonconvergence_is_reported(name):
  a, b, _ = _linear_problem()
  # f(z) = -1.5 z + b has a fixed point, but plain iteration diverges, and a
  # tolerance below float32 resolution cannot be met by any solver.
  f = lambda z: -1.5 * z + b if name == 'fixed_point' else z @ a.T + b
  tol = 1e-3 if name == 'fixed_point' else 1e-12
  _, stats = deq.solve(f, jnp.zeros_like(b),
                       deq.SolverConfig(name=name, max_iter=12, tol=tol))
  assert int(stats.nfe) == 12
  assert not bool(stats.all_converged)
  assert float(stats.as_metrics()['unconverged']) > 0


def test_batch_stops_when_all_examples_converged():
  # Example 0 is already at its fixed point; example 1 needs iterations.
  b = jnp.array([[0.0], [1.0]])
  f = lambda z: 0.5 * z + b
  _, stats = deq.fixed_point_iteration(f, jnp.zeros((2, 1)), max_iter=100,
                                       tol=1e-3, stop_mode='abs')
  assert bool(stats.all_converged)
  # Example 1's residual at z_k is 0.5^k <= 1e-3 first at k = 10: the batch
  # stops after evaluating z_0..z_10 (11 evaluations), not at the budget.
  assert int(stats.nfe) == 11


# ---------------------------------------------------------------- gradients

FORWARD = deq.SolverConfig(name='anderson', max_iter=60, tol=1e-6,
                           stop_mode='abs')


def _implicit_loss(backward):
  def loss(params, x):
    z, _ = deq.fixed_point(tanh_cell, params, x, jnp.zeros((x.shape[0], 4)),
                           forward=FORWARD, backward=backward)
    return jnp.sum(jnp.sin(z))
  return loss


def _unrolled_loss(params, x, steps=200):
  z = jax.lax.fori_loop(0, steps, lambda _, z: tanh_cell(params, z, x),
                        jnp.zeros((x.shape[0], 4)))
  return jnp.sum(jnp.sin(z))


@pytest.fixture(scope='module')
def unrolled_reference():
  """Autodiff through 200 iterations (q = 0.5: exact to float32)."""
  params = tanh_params(dtype=jnp.float32)
  x = jnp.asarray(np.random.RandomState(3).randn(5, 3), jnp.float32)
  return params, x, jax.jit(jax.grad(_unrolled_loss, argnums=(0, 1)))(params, x)


IMPLICIT = deq.BackwardConfig(mode='implicit', solver=deq.SolverConfig(
    name='fixed_point', max_iter=100, tol=1e-7, stop_mode='abs'))


@pytest.mark.parametrize('solver', ['fixed_point', 'anderson', 'broyden'])
def test_implicit_gradient_matches_unrolled_autodiff(solver, unrolled_reference):
  params, x, want = unrolled_reference
  backward = IMPLICIT._replace(solver=IMPLICIT.solver._replace(name=solver))
  got = jax.jit(jax.grad(_implicit_loss(backward), argnums=(0, 1)))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_implicit_gradient_matches_finite_differences():
  with enable_x64():
    params = jax.tree.map(lambda v: v.astype(jnp.float64),
                          tanh_params(dtype=jnp.float32))
    x = jnp.asarray(np.random.RandomState(4).randn(2, 3), jnp.float64)
    tight = deq.SolverConfig(name='anderson', max_iter=80, tol=1e-12,
                             stop_mode='abs', ridge=1e-10)
    backward = deq.BackwardConfig(mode='implicit', solver=tight._replace(
        name='fixed_point', max_iter=200))

    def loss(params, x):
      z, _ = deq.fixed_point(tanh_cell, params, x, jnp.zeros((2, 4)),
                             forward=tight, backward=backward)
      return jnp.sum(jnp.sin(z) * jnp.arange(1.0, 5.0))

    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    loss = jax.jit(loss)
    eps = 1e-6
    for key in ('w', 'u', 'b'):
      flat = np.asarray(params[key]).ravel()
      for i in range(0, flat.size, max(1, flat.size // 4)):
        bump = np.zeros_like(flat)
        bump[i] = eps
        plus = dict(params, **{key: (flat + bump).reshape(params[key].shape)})
        minus = dict(params, **{key: (flat - bump).reshape(params[key].shape)})
        numeric = (loss(plus, x) - loss(minus, x)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grads[0][key]).ravel()[i],
                                   numeric, rtol=1e-5, atol=1e-8)
    bump = np.zeros(x.shape)
    bump[1, 2] = eps
    numeric = (loss(params, x + bump) - loss(params, x - bump)) / (2 * eps)
    np.testing.assert_allclose(grads[1][1, 2], numeric, rtol=1e-5, atol=1e-8)


def test_phantom_and_jfb_gradients():
  params = tanh_params(dtype=jnp.float32)
  x = jnp.asarray(np.random.RandomState(5).randn(3, 3), jnp.float32)
  exact = jax.grad(_implicit_loss(IMPLICIT))(params, x)
  # Many undamped phantom steps converge to the implicit gradient.
  long_phantom = deq.BackwardConfig(mode='phantom', phantom_steps=25,
                                    phantom_damping=1.0)
  phantom = jax.jit(jax.grad(_implicit_loss(long_phantom)))(params, x)
  for g, w in zip(jax.tree.leaves(phantom), jax.tree.leaves(exact)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # JFB is one VJP of f at z*: dl/dz* . df/dtheta.
  jfb = jax.grad(_implicit_loss(deq.BackwardConfig(mode='jfb')))(params, x)
  z_star, _ = deq.fixed_point(tanh_cell, params, x, jnp.zeros((3, 4)),
                              forward=FORWARD)
  _, vjp = jax.vjp(lambda p: tanh_cell(p, z_star, x), params)
  (want,) = vjp(jnp.cos(z_star))
  for g, w in zip(jax.tree.leaves(jfb), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # And it differs from the implicit gradient (the test can fail).
  assert not np.allclose(jfb['w'], exact['w'], rtol=1e-2)


def test_backward_stats_through_probe():
  params = tanh_params(dtype=jnp.float32)
  x = jnp.asarray(np.random.RandomState(6).randn(3, 3), jnp.float32)
  backward = deq.BackwardConfig(mode='implicit', solver=deq.SolverConfig(
      name='fixed_point', max_iter=40, tol=1e-5, stop_mode='abs'))

  def loss(params, probe):
    z, _ = deq.fixed_point(tanh_cell, params, x, jnp.zeros((3, 4)),
                           forward=FORWARD, backward=backward, stats_probe=probe)
    return jnp.sum(z)

  probe_grad = jax.jit(jax.grad(loss, argnums=1))(params, jnp.zeros(4))
  metrics = deq.probe_to_metrics(probe_grad)
  assert 2 <= float(metrics['backward_nfe']) < 40
  assert float(metrics['backward_abs_residual']) <= 1e-5
  assert float(metrics['backward_converged_fraction']) == 1.0
  # A budget too small is reported, not hidden.
  short = backward._replace(solver=backward.solver._replace(max_iter=2))
  probe_grad = jax.grad(
      lambda p, pr: jnp.sum(deq.fixed_point(
          tanh_cell, p, x, jnp.zeros((3, 4)), forward=FORWARD,
          backward=short, stats_probe=pr)[0]), argnums=1)(params, jnp.zeros(4))
  assert float(probe_grad[0]) == 2.0 and float(probe_grad[3]) < 1.0


# ------------------------------------------------------- Jacobian functions

def test_hutchinson_estimate_is_unbiased():
  params = tanh_params(dim=5, scale=1.5, dtype=jnp.float32)
  x = jnp.asarray(np.random.RandomState(7).randn(4, 3), jnp.float32)
  z = jnp.asarray(np.random.RandomState(8).randn(4, 5), jnp.float32)
  f = lambda zz: tanh_cell(params, zz, x)
  exact = float(deq.jacobian_frobenius_exact(f, z))
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: deq.jacobian_frobenius_estimate(f, z, k, num_vectors=1)))(keys))
  stderr = draws.std() / np.sqrt(draws.size)
  assert abs(draws.mean() - exact) < 4 * stderr
  assert stderr < 0.05 * exact  # enough draws that the check is informative
  # More vectors: same mean, smaller variance.
  draws4 = np.asarray(jax.jit(jax.vmap(
      lambda k: deq.jacobian_frobenius_estimate(f, z, k, num_vectors=4)))(
          keys[:1000]))
  assert draws4.std() < 0.7 * draws.std()
  assert abs(draws4.mean() - exact) < 4 * draws4.std() / np.sqrt(draws4.size)


def test_hutchinson_gradient_wrt_params_only():
  params = tanh_params(dim=5, dtype=jnp.float32)
  x = jnp.asarray(np.random.RandomState(9).randn(2, 3), jnp.float32)
  z = jnp.asarray(np.random.RandomState(10).randn(2, 5), jnp.float32)

  def estimate(params, z, key):
    return deq.jacobian_frobenius_estimate(
        lambda zz: tanh_cell(params, zz, x), z, key, num_vectors=1)

  keys = jax.random.split(jax.random.PRNGKey(1), 3000)
  grads = jax.jit(jax.vmap(jax.grad(estimate, argnums=(0, 1)),
                           in_axes=(None, None, 0)))(params, z, keys)
  # z* is a constant: no gradient flows into it.
  np.testing.assert_array_equal(grads[1], 0.0)
  # The expected gradient is the gradient of the exact term.
  exact_grad = jax.grad(lambda p: deq.jacobian_frobenius_exact(
      lambda zz: tanh_cell(p, zz, x), z))(params)
  mean = np.asarray(grads[0]['w']).mean(0)
  stderr = np.asarray(grads[0]['w']).std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(mean - exact_grad['w']) < 5 * stderr + 1e-6)


def test_spectral_radius_matches_eigenvalues():
  rng = np.random.RandomState(11)
  mats = jnp.asarray(rng.randn(3, 6, 6) / np.sqrt(6), jnp.float32)  # [B, D, D]
  z = jnp.asarray(rng.randn(3, 6), jnp.float32)
  f = lambda zz: jnp.tanh(jnp.einsum('bij,bj->bi', mats, zz))
  jac = jax.vmap(jax.jacfwd(lambda m, v: jnp.tanh(m @ v), argnums=1))(mats, z)
  want = np.abs(np.linalg.eigvals(np.asarray(jac, np.float64))).max(-1)
  got = deq.spectral_radius(f, z, jax.random.PRNGKey(0), num_iters=400)
  np.testing.assert_allclose(got, want, rtol=0.03)


def test_regularization_gate_frequency():
  keys = jax.random.split(jax.random.PRNGKey(2), 2000)
  flags = jax.vmap(lambda k: deq.regularization_gate(k, 0.4))(keys)
  assert abs(float(flags.mean()) - 0.4) < 0.05


# ----------------------------------------------------------- Haiku module

def _cell(z, x):
  """A Haiku tanh cell with an input mask in x (as for dropout)."""
  h = hk.Linear(8, w_init=hk.initializers.RandomNormal(0.2))(z) + x['inj']
  return jnp.tanh(hk.Linear(z.shape[-1], w_init=hk.initializers.RandomNormal(
      0.2))(jnp.tanh(h)) * x['mask'])


def _model(unrolled, jacobian=True):
  def forward(batch, is_training):
    inj = hk.Linear(8, name='stem')(batch['x'])                      # [B, 8]
    mask = jnp.ones((inj.shape[0], 4))
    layer = deq.DEQ(_cell, forward=deq.SolverConfig('anderson', 30, 1e-5),
                    backward=deq.BackwardConfig(solver=deq.SolverConfig(
                        'fixed_point', 30, 1e-5)),
                    unrolled_steps=6, name='deq')
    step = deq.step_count(increment=is_training)
    gamma = optax.linear_schedule(0.0, 1.0, 4)(step)
    apply_jr = (deq.regularization_gate(hk.next_rng_key(), 0.5) if jacobian
                else False)
    z, info = layer({'inj': inj, 'mask': mask}, jnp.zeros((inj.shape[0], 4)),
                    unrolled=unrolled, jacobian_loss=apply_jr)
    pred = hk.Linear(1, name='head')(z)
    loss = jnp.mean(jnp.square(pred - batch['y']))
    info = dict(info, gamma=gamma)
    if jacobian:
      loss = loss + gamma * info['jacobian_loss']
    return loss, info
  return hk.transform_with_state(forward)


IMPLICIT_MODEL, UNROLLED_MODEL = _model(False), _model(True)
IMPLICIT_NO_JR, UNROLLED_NO_JR = _model(False, False), _model(True, False)


def _loss_fn(model):
  def loss_fn(params, model_state, rng, batch):
    (loss, info), model_state = model.apply(params, model_state, rng, batch,
                                            True)
    return loss, (model_state, info)
  return loss_fn


def _batch(n=8, seed=0):
  x = np.random.RandomState(seed).uniform(-1, 1, (n, 2)).astype(np.float32)
  return {'x': x, 'y': np.sin(x[:, :1] * 2).astype(np.float32)}


def test_module_params_info_and_backward_stats():
  batch = _batch()
  params, state = IMPLICIT_MODEL.init(jax.random.PRNGKey(0), batch, True)
  assert set(params) == {'stem', 'head', 'deq/cell/linear', 'deq/cell/linear_1'}
  grad_fn = jax.jit(deq.value_and_grad(_loss_fn(IMPLICIT_MODEL)))
  (loss, (state2, metrics)), grads = grad_fn(params, state, jax.random.PRNGKey(1),
                                             batch)
  assert np.isfinite(loss)
  for key in ('forward_nfe', 'forward_abs_residual', 'forward_rel_residual',
              'forward_converged_fraction', 'forward_unconverged',
              'backward_nfe', 'backward_abs_residual', 'backward_rel_residual',
              'backward_converged_fraction', 'jacobian_loss',
              'jacobian_applied'):
    assert key in metrics and np.ndim(metrics[key]) == 0, key
  assert float(metrics['forward_converged_fraction']) == 1.0
  assert float(metrics['backward_nfe']) >= 2
  assert float(state2['~']['step_count']) == 1.0
  # The probe never enters the parameters or their gradients.
  assert set(grads) == set(params)
  # The plain grad function gives the same parameter gradients.
  (_, _), plain = jax.jit(train.value_and_grad(_loss_fn(IMPLICIT_MODEL)))(
      params, state, jax.random.PRNGKey(1), batch)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(plain)):
    np.testing.assert_allclose(g, w, rtol=1e-6)


def test_module_jacobian_gate_and_unrolled_mode():
  batch = _batch()
  params, state = IMPLICIT_MODEL.init(jax.random.PRNGKey(0), batch, True)

  def run(rng):
    (loss, info), _ = IMPLICIT_MODEL.apply(params, state, rng, batch, True)
    return info

  infos = [jax.jit(run)(jax.random.PRNGKey(i)) for i in range(12)]
  applied = [float(i['jacobian_applied']) for i in infos]
  assert 0 < sum(applied) < len(applied)
  for info in infos:
    assert (float(info['jacobian_loss']) > 0) == (info['jacobian_applied'] > 0)
  # Unrolled pre-training = 6 weight-tied applications with ordinary backprop.
  (_, info), _ = UNROLLED_MODEL.apply(params, state, jax.random.PRNGKey(0),
                                      batch, True)
  assert float(info['forward_nfe']) == 6.0

  def manual(params):
    cell = hk.without_apply_rng(hk.transform(_cell))
    cell_params = {k[len('deq/cell/'):]: v for k, v in params.items()
                   if k.startswith('deq/cell/')}
    inj = batch['x'] @ params['stem']['w'] + params['stem']['b']
    x = {'inj': inj, 'mask': jnp.ones((8, 4))}
    z = jnp.zeros((8, 4))
    for _ in range(6):
      z = cell.apply(cell_params, z, x)
    return z

  def unrolled_z(params):
    def f(batch):
      layer = deq.DEQ(_cell, unrolled_steps=6, name='deq')
      inj = hk.Linear(8, name='stem')(batch['x'])
      return layer({'inj': inj, 'mask': jnp.ones((8, 4))}, jnp.zeros((8, 4)),
                   unrolled=True)[0]
    return hk.transform_with_state(f).apply(params, state, None, batch)[0]

  sub = {k: v for k, v in params.items() if k != 'head'}
  got = jax.jacrev(lambda p: jnp.sum(unrolled_z(p) ** 2))(sub)
  want = jax.jacrev(lambda p: jnp.sum(manual(p) ** 2))(sub)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_module_spectral_radius_info():
  batch = _batch()

  def f(batch):
    layer = deq.DEQ(_cell, forward=deq.SolverConfig('anderson', 30, 1e-6),
                    name='deq')
    inj = hk.Linear(8, name='stem')(batch['x'])
    return layer({'inj': inj, 'mask': jnp.ones((8, 4))}, jnp.zeros((8, 4)),
                 spectral_radius=True)[1]

  model = hk.transform_with_state(f)
  params, state = model.init(jax.random.PRNGKey(0), batch)
  info, _ = model.apply(params, state, jax.random.PRNGKey(1), batch)
  assert 0 < float(info['spectral_radius']) < 1  # a converging contraction


class _ListIterator:
  """A tiny stand-in for a jreg.data iterator (next, get/set_state)."""

  def __init__(self, batches):
    self.batches, self.position = batches, 0

  def __next__(self):
    batch = self.batches[self.position % len(self.batches)]
    self.position += 1
    return batch

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = state['position']


def _fit(parallel, jacobian, workdir):
  """Pre-training (steps 1-2, unrolled) then the implicit layer (steps 3-4)."""
  batches = [_batch(8, seed=s) for s in range(4)]
  models = ((UNROLLED_MODEL, IMPLICIT_MODEL) if jacobian else
            (UNROLLED_NO_JR, IMPLICIT_NO_JR))
  phases = [(2, deq.value_and_grad(_loss_fn(models[0]))),
            (4, deq.value_and_grad(_loss_fn(models[1])))]
  init_fn = lambda rng: models[1].init(rng, batches[0], True)
  state, history = train.fit(
      workdir=str(workdir), init_fn=init_fn, grad_fn=phases,
      optimizer=optax.adam(1e-2), train_iter=_ListIterator(batches),
      num_steps=4, seed=0, parallel=parallel, log_every=1, tensorboard=False)
  return state, [r for r in history if r['split'] == 'train'], init_fn


@pytest.fixture(scope='module')
def single_runs(tmp_path_factory):
  return {jac: _fit('single', jac, tmp_path_factory.mktemp(f'single{jac}'))
          for jac in (True, False)}


# Per-device Hutchinson vectors and per-device solver stopping differ under
# pmap, so pmap is compared on the model without the Jacobian term.
@pytest.mark.parametrize('parallel, jacobian', [('sharded', True),
                                                ('pmap', False)])
def test_module_trains_same_in_parallel_modes(parallel, jacobian, single_runs,
                                              tmp_path):
  s1, records, init_fn = single_runs[jacobian]
  s2, _, _ = _fit(parallel, jacobian, tmp_path)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  initial = jax.tree.leaves(init_fn(jax.random.split(jax.random.PRNGKey(0))[0])[0])
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(s1.params),
                                                   initial))
  assert [int(r['forward_nfe']) for r in records[:2]] == [6, 6]
  assert [int(r['backward_nfe']) for r in records[:2]] == [6, 6]
  assert records[-1]['backward_nfe'] >= 2
  assert records[-1]['forward_converged_fraction'] == 1.0
  assert float(s1.model_state['~']['step_count']) == 4.0
  assert float(s2.model_state['~']['step_count']) == 4.0
