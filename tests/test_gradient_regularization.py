"""Tests of jreg.gradient_regularization: penalised gradients against closed
forms and finite differences, the three methods, microbatch and data-parallel
penalties, Haiku state, and the R_IG bookkeeping."""
import functools

import haiku as hk
import jax
from x64 import enable_x64
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

from jreg import gradient_regularization as gr
from jreg.models import count_params

METHODS = gr.METHODS


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_abs(a):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


# --- a quadratic: L = ½θᵀAθ − bᵀθ, ∇L = Aθ − b, H∇L = A(Aθ − b) ------------


def _quadratic(seed=0, dim=6):
  rng = np.random.default_rng(seed)
  root = rng.normal(size=(dim, dim))
  a = root @ root.T / dim + np.eye(dim)
  b = rng.normal(size=dim)
  theta = rng.normal(size=dim)
  return a, b, theta


def _quadratic_loss(theta, a, b):
  return 0.5 * theta @ a @ theta - b @ theta


@pytest.mark.parametrize('method', METHODS)
def test_quadratic_closed_form(method):
  with enable_x64():
    a, b, theta = _quadratic()
    mu = 0.37
    grad = a @ theta - b
    expected = grad + 2 * mu * a @ grad
    f = jax.jit(gr.penalized_value_and_grad(
        _quadratic_loss, coefficient=mu, method=method, fd_epsilon=1e-5))
    loss, got = f(jnp.asarray(theta), jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(loss, _quadratic_loss(theta, a, b), rtol=1e-12)
    # A quadratic has a constant Hessian: even the forward difference is exact
    # up to rounding.
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)
    # The same penalty given as an IGR rate λ on R_IG = ‖∇L‖²/m: μ = λ/m.
    rate = mu * theta.size
    _, got_rate = jax.jit(gr.penalized_value_and_grad(
        _quadratic_loss, regularization_rate=rate, method=method,
        fd_epsilon=1e-5))(jnp.asarray(theta), jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(got_rate, expected, rtol=1e-8, atol=1e-8)


# --- a small tanh MLP (non-quadratic) -------------------------------------


def _mlp_problem(dtype=np.float64, seed=1):
  rng = np.random.default_rng(seed)
  params = {
      'w1': rng.normal(size=(3, 8)) / np.sqrt(3),
      'b1': 0.1 * rng.normal(size=8),
      'w2': rng.normal(size=(8, 2)) / np.sqrt(8),
  }
  x = rng.normal(size=(32, 3))
  y = rng.normal(size=(32, 2))
  cast = lambda t: jax.tree.map(lambda v: jnp.asarray(v, dtype), t)  # noqa: E731
  return cast(params), cast(x), cast(y)


def _mlp_loss(params, x, y):
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])  # [B, 8]
  return 0.5 * jnp.mean(jnp.sum((hidden @ params['w2'] - y) ** 2, axis=-1))


def _penalised_loss(params, x, y, mu):
  """L + μ‖∇L‖², the objective whose gradient the methods compute."""
  grads = jax.grad(_mlp_loss)(params, x, y)
  return _mlp_loss(params, x, y) + mu * gr.gradient_norm_sq(grads)


def test_mlp_penalised_gradient_matches_finite_differences_of_penalised_loss():
  """Exact methods vs central differences of L + μ‖∇L‖² itself (float64)."""
  with enable_x64():
    params, x, y = _mlp_problem()
    mu = 0.2
    flat, unravel = ravel_pytree(params)
    objective = jax.jit(lambda v: _penalised_loss(unravel(v), x, y, mu))
    step = 1e-5
    eye = np.eye(flat.size)
    numeric = np.array([
        (objective(flat + step * e) - objective(flat - step * e)) / (2 * step)
        for e in eye])
    for method in ('double_backprop', 'hvp'):
      _, grads = jax.jit(gr.penalized_value_and_grad(
          _mlp_loss, coefficient=mu, method=method))(params, x, y)
      got = ravel_pytree(grads)[0]
      np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-8)


def test_double_backprop_equals_grad_of_penalised_loss():
  with enable_x64():
    params, x, y = _mlp_problem()
    mu = 0.2
    reference = jax.grad(_penalised_loss)(params, x, y, mu)
    _, got = jax.jit(gr.penalized_value_and_grad(
        _mlp_loss, coefficient=mu, method='double_backprop'))(params, x, y)
    assert _max_abs_diff(got, reference) < 1e-12


def test_three_methods_agree_in_float32():
  params, x, y = _mlp_problem(np.float32)
  mu = 0.2
  results = {}
  for method in METHODS:
    f = jax.jit(gr.penalized_value_and_grad(_mlp_loss, coefficient=mu,
                                            method=method, fd_epsilon=1e-3))
    results[method] = f(params, x, y)[1]
  plain = jax.grad(_mlp_loss)(params, x, y)
  penalty_part = _max_abs_diff(results['double_backprop'], plain)
  assert penalty_part > 1e-2  # the penalty changes the gradient visibly
  assert _max_abs_diff(results['hvp'], results['double_backprop']) < 1e-5
  # Forward difference: O(ε) error, small against the penalty term.
  assert (_max_abs_diff(results['finite_difference'], results['double_backprop'])
          < 0.05 * penalty_part)


def test_finite_difference_error_is_first_order_in_epsilon():
  """err(ε) = ‖FD − exact‖ ∝ ε: log-log slope ≈ 1 (float64, no rounding)."""
  with enable_x64():
    params, x, y = _mlp_problem()
    mu = 0.2
    exact = jax.grad(_penalised_loss)(params, x, y, mu)
    epsilons = np.array([1e-1, 3e-2, 1e-2, 3e-3, 1e-3])
    errors = []
    for eps in epsilons:
      _, got = gr.penalized_value_and_grad(
          _mlp_loss, coefficient=mu, method='finite_difference',
          fd_epsilon=float(eps))(params, x, y)
      errors.append(_max_abs_diff(got, exact))
    slope = np.polyfit(np.log(epsilons), np.log(errors), 1)[0]
    assert 0.9 < slope < 1.1, (slope, errors)
    assert errors[-1] < 1e-2 * _max_abs(exact)


# --- bookkeeping ------------------------------------------------------------


def test_r_ig_bookkeeping():
  params, x, y = _mlp_problem(np.float32)
  grads = jax.grad(_mlp_loss)(params, x, y)
  m = count_params(params)
  assert m == 3 * 8 + 8 + 8 * 2
  norm_sq = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(gr.gradient_norm_sq(grads), norm_sq, rtol=1e-6)
  np.testing.assert_allclose(gr.implicit_regularizer(grads) * m, norm_sq,
                             rtol=1e-6)
  h = 0.05
  rate = gr.implicit_regularization_rate(h, m)
  assert rate == pytest.approx(h * m / 4)
  loss = _mlp_loss(params, x, y)
  np.testing.assert_allclose(loss + rate * gr.implicit_regularizer(grads),
                             loss + h / 4 * norm_sq, rtol=1e-6)
  np.testing.assert_allclose(gr.modified_loss(loss, grads, h),
                             loss + h / 4 * norm_sq, rtol=1e-6)
  assert gr.coefficient_from_rate(rate, m) == pytest.approx(h / 4)


def test_bad_options_raise():
  with pytest.raises(ValueError, match='exactly one'):
    gr.penalized_value_and_grad(_mlp_loss)
  with pytest.raises(ValueError, match='exactly one'):
    gr.gradient_penalty_grad_fn(_mlp_loss, coefficient=1.0,
                                regularization_rate=1.0)
  with pytest.raises(ValueError, match='>= 0'):
    gr.penalized_value_and_grad(_mlp_loss, coefficient=-1.0)
  with pytest.raises(ValueError, match='method'):
    gr.penalized_value_and_grad(_mlp_loss, coefficient=1.0, method='exact')
  with pytest.raises(ValueError, match='data_parallel'):
    gr.penalized_value_and_grad(_mlp_loss, coefficient=1.0,
                                data_parallel='local')
  params, x, y = _mlp_problem(np.float32)
  f = gr.penalized_value_and_grad(_mlp_loss, coefficient=1.0,
                                  num_microbatches=5, microbatch_argnums=(1, 2))
  with pytest.raises(ValueError, match='not divisible'):
    f(params, x, y)


# --- the SGD (microbatch) penalty -------------------------------------------


@pytest.mark.parametrize('method', ['double_backprop', 'finite_difference'])
def test_microbatch_penalty_matches_explicit_sum(method):
  """grad = (1/k) Σⱼ ∇(Lⱼ + μ‖∇Lⱼ‖²), loss = (1/k) Σⱼ Lⱼ."""
  with enable_x64():
    params, x, y = _mlp_problem()
    mu, k = 0.3, 4
    xs, ys = x.reshape(k, -1, 3), y.reshape(k, -1, 2)
    expected = jax.tree.map(
        lambda *g: sum(g) / k,
        *[jax.grad(_penalised_loss)(params, xs[j], ys[j], mu) for j in range(k)])
    f = jax.jit(gr.penalized_value_and_grad(
        _mlp_loss, coefficient=mu, method=method, num_microbatches=k,
        microbatch_argnums=(1, 2), fd_epsilon=1e-6))
    loss, got = f(params, x, y)
    np.testing.assert_allclose(loss, _mlp_loss(params, x, y), rtol=1e-12)
    assert _max_abs_diff(got, expected) < 1e-5
    # ... and differs from the full-batch penalty.
    full = jax.grad(_penalised_loss)(params, x, y, mu)
    assert _max_abs_diff(got, full) > 1e-3


# --- data parallelism: pmap over the four faked CPU devices -----------------


@pytest.mark.parametrize('method', METHODS)
def test_pmap_global_and_per_device_penalties(method):
  assert jax.device_count() == 4, 'conftest fakes four CPU devices'
  params, x, y = _mlp_problem(np.float32)
  mu, devices = 0.3, 4
  shard = lambda a: a.reshape((devices, -1) + a.shape[1:])  # noqa: E731

  def run(data_parallel):
    f = gr.penalized_value_and_grad(
        _mlp_loss, coefficient=mu, method=method, axis_name='i',
        data_parallel=data_parallel)

    def step(p, xb, yb):
      loss, grads = f(p, xb, yb)
      return jax.lax.pmean((loss, grads), 'i')  # what the engine does

    return jax.pmap(step, axis_name='i', in_axes=(None, 0, 0))(
        params, shard(x), shard(y))

  single = functools.partial(gr.penalized_value_and_grad, _mlp_loss,
                             coefficient=mu, method=method)
  _, full_batch = jax.jit(single())(params, x, y)
  _, microbatch = jax.jit(single(num_microbatches=devices,
                                 microbatch_argnums=(1, 2)))(params, x, y)
  tol = 1e-2 if method == 'finite_difference' else 1e-5
  for name, expected in (('global', full_batch), ('per_device', microbatch)):
    loss, grads = run(name)
    np.testing.assert_allclose(loss, _mlp_loss(params, x, y), rtol=1e-5)
    grads = jax.tree.map(lambda g: g[0], grads)
    scale = _max_abs(expected)
    assert _max_abs_diff(grads, expected) < tol * scale, name
  # The two penalties are different objectives.
  assert _max_abs_diff(full_batch, microbatch) > 0.05 * _max_abs(full_batch)


# --- Haiku state (BatchNorm) and the engine contract ------------------------


def _bn_net(x, is_training):
  x = hk.Linear(6)(x)
  x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(
      x, is_training=is_training)
  return hk.Linear(2)(jnp.tanh(x))


_bn_model = hk.transform_with_state(_bn_net)


def _bn_loss(params, model_state, rng, batch):
  out, new_state = _bn_model.apply(params, model_state, rng, batch['x'],
                                   is_training=True)
  loss = 0.5 * jnp.mean(jnp.sum((out - batch['y']) ** 2, axis=-1))
  return loss, (new_state, {'mse': loss})


def _bn_setup():
  rng = np.random.default_rng(3)
  batch = {'x': jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)}
  params, state = _bn_model.init(jax.random.PRNGKey(0), batch['x'],
                                 is_training=True)
  return params, state, batch


@pytest.mark.parametrize('method', METHODS)
def test_batchnorm_state_updated_once(method):
  params, state, batch = _bn_setup()
  rng = jax.random.PRNGKey(1)
  mu = 0.5
  plain_fn = jax.jit(jax.value_and_grad(_bn_loss, has_aux=True))
  (plain_loss, (plain_state, _)), _ = plain_fn(params, state, rng, batch)
  grad_fn = jax.jit(gr.gradient_penalty_grad_fn(
      _bn_loss, coefficient=mu, method=method, learning_rate=0.1))
  (loss, (new_state, metrics)), grads = grad_fn(params, state, rng, batch)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  # The state is the plain evaluation's: one EMA update of the batch statistics.
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(plain_state)):
    np.testing.assert_array_equal(a, b)
  # Chaining the state through a second evaluation would have differed.
  (_, (twice_state, _)), _ = plain_fn(params, plain_state, rng, batch)
  assert _max_abs_diff(twice_state, plain_state) > 1e-4
  # The gradient is that of L + μ‖∇L‖² with the state as input.
  def objective(p):
    inner = lambda q: _bn_loss(q, state, rng, batch)[0]  # noqa: E731
    return inner(p) + mu * gr.gradient_norm_sq(jax.grad(inner)(p))
  reference = jax.jit(jax.grad(objective))(params)
  tol = 2e-2 if method == 'finite_difference' else 1e-4
  assert _max_abs_diff(grads, reference) < tol * _max_abs(reference)
  assert float(metrics['mse']) == pytest.approx(float(plain_loss), rel=1e-6)


def test_grad_fn_metrics_and_zero_coefficient():
  params, state, batch = _bn_setup()
  rng = jax.random.PRNGKey(1)
  h, mu = 0.1, 0.25
  m = count_params(params)
  plain = jax.jit(jax.grad(lambda p: _bn_loss(p, state, rng, batch)[0]))(params)
  norm_sq = float(gr.gradient_norm_sq(plain))
  grad_fn = jax.jit(gr.gradient_penalty_grad_fn(
      _bn_loss, regularization_rate=mu * m, learning_rate=h))
  (_, (_, metrics)), _ = grad_fn(params, state, rng, batch)
  np.testing.assert_allclose(metrics['grad_norm_sq'], norm_sq, rtol=1e-5)
  np.testing.assert_allclose(metrics['r_ig'], norm_sq / m, rtol=1e-5)
  np.testing.assert_allclose(metrics['igr_rate'], h * m / 4, rtol=1e-6)
  np.testing.assert_allclose(metrics['penalty'], mu * norm_sq, rtol=1e-5)
  # μ = 0: the plain gradient, metrics still logged.
  zero_fn = jax.jit(gr.gradient_penalty_grad_fn(_bn_loss, coefficient=0.0))
  (_, (_, metrics)), grads = zero_fn(params, state, rng, batch)
  assert _max_abs_diff(grads, plain) < 1e-6
  assert float(metrics['penalty']) == 0.0
  assert 'igr_rate' not in metrics


def test_grad_fn_with_microbatches_and_optax():
  """Microbatch grad_fn: state/metrics averaged, gradient = mean of penalised
  microbatch gradients; one optax step with it lowers the penalised loss."""
  params, state, batch = _bn_setup()
  rng = jax.random.PRNGKey(1)
  k, mu = 2, 0.5
  grad_fn = jax.jit(gr.gradient_penalty_grad_fn(
      _bn_loss, coefficient=mu, num_microbatches=k, method='hvp'))
  (loss, (new_state, metrics)), grads = grad_fn(params, state, rng, batch)
  keys = jax.random.split(rng, k)
  halves = [jax.tree.map(lambda a: a[j * 8:(j + 1) * 8], batch) for j in range(k)]
  plain_fn = jax.jit(jax.value_and_grad(_bn_loss, has_aux=True))
  outs = [plain_fn(params, state, keys[j], halves[j]) for j in range(k)]
  np.testing.assert_allclose(loss, np.mean([o[0][0] for o in outs]), rtol=1e-6)
  mean_state = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][0][1][0],
                            outs[1][0][1][0])
  assert _max_abs_diff(new_state, mean_state) < 1e-6

  @jax.jit
  def objective(p, half, key):
    inner = lambda q: _bn_loss(q, state, key, half)[0]  # noqa: E731
    return inner(p) + mu * gr.gradient_norm_sq(jax.grad(inner)(p))
  objective_grad = jax.jit(jax.grad(objective))
  reference = jax.tree.map(
      lambda a, b: (a + b) / 2,
      *[objective_grad(params, halves[j], keys[j]) for j in range(k)])
  assert _max_abs_diff(grads, reference) < 1e-4 * _max_abs(reference)
  np.testing.assert_allclose(
      metrics['penalty'],
      mu * np.mean([float(gr.gradient_norm_sq(o[1])) for o in outs]), rtol=1e-5)

  optimizer = optax.sgd(0.01)
  updates, _ = optimizer.update(grads, optimizer.init(params))
  new_params = optax.apply_updates(params, updates)
  before = np.mean([objective(params, halves[j], keys[j]) for j in range(k)])
  after = np.mean([objective(new_params, halves[j], keys[j]) for j in range(k)])
  assert after < before


# --- through the engine: jreg.train.fit in its three parallel modes ---------


def _fit_tiny(tmp_path, name, parallel, **penalty):
  from jreg import data  # pylint: disable=g-import-not-at-top
  from jreg import train  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  arrays = {'x': rng.normal(size=(64, 3)).astype(np.float32),
            'y': rng.normal(size=(64, 2)).astype(np.float32)}
  params0 = jax.tree.map(lambda v: np.asarray(v, np.float32),
                         _mlp_problem(np.float32)[0])

  def loss_fn(params, model_state, rng_key, batch):
    del rng_key
    loss = _mlp_loss(params, batch['x'], batch['y'])
    return loss, (model_state, {})

  state, history = train.fit(
      workdir=str(tmp_path / name), init_fn=lambda _: (params0, {}),
      grad_fn=gr.gradient_penalty_grad_fn(loss_fn, learning_rate=0.1,
                                          **penalty),
      optimizer=optax.sgd(0.1),
      train_iter=data.ArrayIterator(arrays, 16, seed=0), num_steps=3,
      parallel=parallel, log_every=1, tensorboard=False)
  return state.params, history


def test_engine_parallel_modes(tmp_path):
  """Global penalty: single == sharded == pmap; per-device penalty under pmap
  == the 4-microbatch penalty on one device."""
  common = dict(coefficient=0.5, method='hvp')
  single, history = _fit_tiny(tmp_path, 'single', 'single', **common)
  sharded, _ = _fit_tiny(tmp_path, 'sharded', 'sharded', **common)
  pmapped, pmap_history = _fit_tiny(tmp_path, 'pmap', 'pmap', **common)
  assert _max_abs_diff(sharded, single) < 1e-5
  assert _max_abs_diff(pmapped, single) < 1e-5
  for key in ('r_ig', 'grad_norm_sq', 'igr_rate', 'penalty'):
    assert history[0][key] == pytest.approx(pmap_history[0][key], rel=1e-4)
  per_device, _ = _fit_tiny(tmp_path, 'per_device', 'pmap',
                            data_parallel='per_device', **common)
  microbatch, _ = _fit_tiny(tmp_path, 'microbatch', 'single',
                            num_microbatches=4, **common)
  assert _max_abs_diff(per_device, microbatch) < 1e-5
  assert _max_abs_diff(per_device, single) > 1e-4


def test_pmap_global_penalty_with_microbatches():
  """Global + k microbatches: microbatch j gathers slice j of every device."""
  params, x, y = _mlp_problem(np.float32)
  mu, devices, k = 0.3, 4, 2
  f = gr.penalized_value_and_grad(_mlp_loss, coefficient=mu, axis_name='i',
                                  num_microbatches=k, microbatch_argnums=(1, 2))
  _, grads = jax.pmap(f, axis_name='i', in_axes=(None, 0, 0))(
      params, x.reshape(devices, -1, 3), y.reshape(devices, -1, 2))
  xs, ys = x.reshape(devices, k, -1, 3), y.reshape(devices, k, -1, 2)
  single = jax.jit(gr.penalized_value_and_grad(_mlp_loss, coefficient=mu))
  expected = jax.tree.map(lambda *g: sum(g) / k, *[
      single(params, xs[:, j].reshape(-1, 3), ys[:, j].reshape(-1, 2))[1]
      for j in range(k)])
  assert _max_abs_diff(jax.tree.map(lambda g: g[0], grads), expected) < 1e-5
