"""Tests of the finite-difference (SAM / gnp) family, the penalty warm-up,
per-block strengths and the unbiased split-batch penalty in
jreg.gradient_regularization: against `optax.contrib.sam`, the exact penalised
gradients (fitted orders of the finite-difference error), explicit per-group
computations, pmap with four faked devices, and Monte Carlo expectations
against closed forms on a linear regression."""
import functools

import jax
from x64 import enable_x64
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

from jreg import gradient_regularization as gr


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_abs(a):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


# --- a small tanh MLP -------------------------------------------------------


def _problem(dtype=np.float64, seed=1, batch=32):
  rng = np.random.default_rng(seed)
  params = {'w1': rng.normal(size=(3, 8)) / np.sqrt(3),
            'b1': 0.1 * rng.normal(size=8),
            'w2': rng.normal(size=(8, 2)) / np.sqrt(8)}
  x = rng.normal(size=(batch, 3))
  y = rng.normal(size=(batch, 2))
  cast = lambda t: jax.tree.map(lambda v: jnp.asarray(v, dtype), t)  # noqa: E731
  return cast(params), cast(x), cast(y)


def _loss(params, x, y):
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])  # [B, 8]
  return 0.5 * jnp.mean(jnp.sum((hidden @ params['w2'] - y) ** 2, axis=-1))


_grad = jax.jit(jax.grad(_loss))


def _unit(tree):
  norm = jnp.sqrt(gr.gradient_norm_sq(tree))
  return jax.tree.map(lambda g: g / norm, tree), norm


def _sam_reference(params, x, y, radius):
  """∇L(θ + r ∇L/‖∇L‖), written out."""
  unit, _ = _unit(_grad(params, x, y))
  return _grad(jax.tree.map(lambda p, u: p + radius * u, params, unit), x, y)


@jax.jit
def _exact_penalised(params, x, y, mu):
  """∇(L + μ‖∇L‖²) by autodiff."""
  return jax.grad(lambda p: _loss(p, x, y) +
                  mu * gr.gradient_norm_sq(_grad(p, x, y)))(params)


# --- SAM (α = 1) against optax.contrib.sam ----------------------------------


def test_alpha_one_is_sam_and_matches_optax_contrib_sam():
  params, x, y = _problem(np.float32)
  rho, lr = 0.05, 0.1
  _, grads = jax.jit(gr.finite_difference_value_and_grad(
      _loss, radius=rho, alpha=1.0))(params, x, y)
  sgd = optax.sgd(lr)
  ours = optax.apply_updates(params, sgd.update(grads, sgd.init(params))[0])

  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  # Opaque mode: one call does the adversarial step and the outer update.
  opaque = optax.contrib.sam(optax.sgd(lr), adversary, sync_period=2,
                             opaque_mode=True)
  updates, _ = opaque.update(_grad(params, x, y), opaque.init(params), params,
                             grad_fn=lambda p, _: _grad(p, x, y))
  from_opaque = optax.apply_updates(params, updates)
  # Transparent mode: the first call moves to θ + ρĝ, the second call takes
  # the gradient there and returns to θ − lr·∇L(θ + ρĝ).
  transparent = optax.contrib.sam(optax.sgd(lr), adversary, sync_period=2)
  state = transparent.init(params)
  p = params
  for _ in range(2):
    updates, state = transparent.update(_grad(p, x, y), state, p)
    p = optax.apply_updates(p, updates)
  assert _max_abs_diff(grads, _sam_reference(params, x, y, rho)) < 1e-6
  assert _max_abs_diff(ours, from_opaque) < 1e-6
  assert _max_abs_diff(ours, p) < 1e-6
  # ... and the SAM step is not the plain one.
  plain = optax.apply_updates(params, jax.tree.map(lambda g: -lr * g,
                                                   _grad(params, x, y)))
  assert _max_abs_diff(ours, plain) > 1e-4


# --- the small-r limits (float64, fitted orders) ----------------------------


def _slope(radii, errors):
  return np.polyfit(np.log(radii), np.log(errors), 1)[0]


def test_small_radius_limit_is_the_exact_penalty():
  """α = 2μ‖∇L‖/r: forward error O(r), central O(r²) against ∇L + 2μH∇L; the
  coefficient form is the same formula and equals the existing forward
  'finite_difference' method with ε = r."""
  with enable_x64():
    params, x, y = _problem()
    mu = 0.2
    exact = _exact_penalised(params, x, y, mu)
    norm = float(jnp.sqrt(gr.gradient_norm_sq(_grad(params, x, y))))
    radii = np.array([8e-2, 4e-2, 2e-2, 1e-2])
    errors = {'forward': [], 'central': []}
    for r in radii:
      alpha = 2 * mu * norm / r
      for difference in errors:
        _, got = gr.finite_difference_value_and_grad(
            _loss, radius=float(r), alpha=alpha, difference=difference)(
                params, x, y)
        errors[difference].append(_max_abs_diff(got, exact))
    r = float(radii[-1])
    _, by_mu = gr.finite_difference_value_and_grad(
        _loss, radius=r, coefficient=mu, difference='central')(params, x, y)
    assert _max_abs_diff(by_mu, got) < 1e-10
    _, existing = gr.penalized_value_and_grad(
        _loss, coefficient=mu, method='finite_difference', fd_epsilon=r)(
            params, x, y)
    _, forward = gr.finite_difference_value_and_grad(
        _loss, radius=r, coefficient=mu)(params, x, y)
    assert _max_abs_diff(forward, existing) < 1e-10
    assert 0.9 < _slope(radii, errors['forward']) < 1.1, errors
    assert 1.8 < _slope(radii, errors['central']) < 2.2, errors
    assert errors['central'][-1] < 0.1 * errors['forward'][-1]


def test_fixed_alpha_limit_is_the_gradient_norm_penalty():
  """α = λ/r fixed λ: g → ∇(L + λ‖∇L‖) ([ZZH22]), error O(r)."""
  with enable_x64():
    params, x, y = _problem()
    lam = 0.05
    exact = jax.grad(lambda p: _loss(p, x, y) + lam * jnp.sqrt(
        gr.gradient_norm_sq(_grad(p, x, y))))(params)
    radii = np.array([4e-2, 2e-2, 1e-2, 5e-3])
    errors = []
    for r in radii:
      _, got = gr.finite_difference_value_and_grad(
          _loss, radius=float(r), alpha=lam / r)(params, x, y)
      errors.append(_max_abs_diff(got, exact))
    assert 0.9 < _slope(radii, errors) < 1.1, errors
    assert errors[-1] < 0.02 * _max_abs_diff(exact, _grad(params, x, y))


# --- m-sharpness groups, per-group strengths --------------------------------


def test_groups_perturb_separately_with_per_group_alpha():
  with enable_x64():
    params, x, y = _problem()
    r, k = 0.05, 4
    alphas = [0.0, 0.5, 1.0, 2.0]
    xs, ys = x.reshape(k, -1, 3), y.reshape(k, -1, 2)
    expected = []
    for j in range(k):
      plain = _grad(params, xs[j], ys[j])
      sam = _sam_reference(params, xs[j], ys[j], r)
      expected.append(jax.tree.map(
          lambda a, b, al=alphas[j]: (1 - al) * a + al * b, plain, sam))
    expected = jax.tree.map(lambda *g: sum(g) / k, *expected)
    f = jax.jit(gr.finite_difference_value_and_grad(
        _loss, radius=r, alpha=alphas, num_groups=k, group_argnums=(1, 2)))
    loss, got = f(params, x, y)
    np.testing.assert_allclose(loss, _loss(params, x, y), rtol=1e-12)
    assert _max_abs_diff(got, expected) < 1e-12
    # One perturbation for the whole batch is a different direction.
    _, whole = gr.finite_difference_value_and_grad(
        _loss, radius=r, alpha=1.0)(params, x, y)
    _, grouped = gr.finite_difference_value_and_grad(
        _loss, radius=r, alpha=1.0, num_groups=k, group_argnums=(1, 2))(
            params, x, y)
    assert _max_abs_diff(whole, grouped) > 1e-3


# --- perturbations under pmap: global, per device, groups of devices --------


def test_pmap_perturbation_modes():
  assert jax.device_count() == 4, 'conftest fakes four CPU devices'
  params, x, y = _problem(np.float32)
  r, alpha = 0.05, 0.7
  shard = lambda a: a.reshape((4, -1) + a.shape[1:])  # noqa: E731

  def pmapped(**options):
    f = gr.finite_difference_value_and_grad(
        _loss, radius=r, alpha=alpha, axis_name='i', **options)

    def step(p, xb, yb):
      return jax.lax.pmean(f(p, xb, yb), 'i')   # what the engine does

    loss, grads = jax.pmap(step, axis_name='i', in_axes=(None, 0, 0))(
        params, shard(x), shard(y))
    return jax.tree.map(lambda g: g[0], grads)

  def single(groups):
    return jax.jit(gr.finite_difference_value_and_grad(
        _loss, radius=r, alpha=alpha, num_groups=groups,
        group_argnums=(1, 2)))(params, x, y)[1]

  cases = {'global': (dict(), 1),
           'per_device': (dict(perturbation='per_device'), 4),
           'pairs': (dict(inner_group_size=2), 2)}
  results = {}
  for name, (options, groups) in cases.items():
    results[name] = pmapped(**options)
    expected = single(groups)
    assert _max_abs_diff(results[name], expected) < 2e-6 * _max_abs(expected), name
  assert _max_abs_diff(results['global'], results['per_device']) > 1e-4
  assert _max_abs_diff(results['pairs'], results['per_device']) > 1e-4


# --- warm-up -----------------------------------------------------------------


def test_warmup_factors():
  steps = jnp.arange(6)
  ramp = gr.PenaltyWarmup(4, 'lambda')
  np.testing.assert_allclose(jax.vmap(ramp.factor)(steps),
                             [0, 0.25, 0.5, 0.75, 1, 1])
  np.testing.assert_allclose(jax.vmap(ramp.radius_scale)(steps), 1.0)
  gate = gr.PenaltyWarmup(4, 'zero')
  np.testing.assert_allclose(jax.vmap(gate.strength_scale)(steps),
                             [0, 0, 0, 0, 1, 1])
  radius = gr.PenaltyWarmup(4, 'r')
  np.testing.assert_allclose(jax.vmap(radius.radius_scale)(steps),
                             [0, 0.25, 0.5, 0.75, 1, 1])
  np.testing.assert_allclose(jax.vmap(radius.strength_scale)(steps), 1.0)
  assert float(gr.PenaltyWarmup(0, 'zero').factor(0)) == 1.0


def test_warmup_scales_the_penalty():
  with enable_x64():
    params, x, y = _problem()
    mu, warm = 0.3, gr.PenaltyWarmup(4, 'lambda')
    f = jax.jit(gr.penalized_value_and_grad(_loss, coefficient=mu,
                                            warmup=warm))
    for step in (0, 1, 3, 7):
      expected = _exact_penalised(params, x, y, mu * min(1.0, step / 4))
      assert _max_abs_diff(f(params, x, y, step=step)[1], expected) < 1e-12
    # 'r' ramps the radius with α fixed: at t = 0 the plain gradient.
    r, alpha = 0.05, 0.8
    fam = jax.jit(gr.finite_difference_value_and_grad(
        _loss, radius=r, alpha=alpha, warmup=gr.PenaltyWarmup(4, 'r')))
    assert _max_abs_diff(fam(params, x, y, step=0)[1],
                         _grad(params, x, y)) < 1e-12
    half = gr.finite_difference_value_and_grad(_loss, radius=r / 2,
                                               alpha=alpha)(params, x, y)[1]
    assert _max_abs_diff(fam(params, x, y, step=2)[1], half) < 1e-12
    with pytest.raises(ValueError, match='step'):
      f(params, x, y)


def test_grad_fn_warmup_through_the_engine(tmp_path):
  """fit in pmap mode with a warm-up: the counter lives in the model state
  (int32, kept unaveraged), the steps follow μ(t) = μ·min(1, t/T)."""
  from jreg import data  # pylint: disable=g-import-not-at-top
  from jreg import train  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  arrays = {'x': rng.normal(size=(32, 3)).astype(np.float32),
            'y': rng.normal(size=(32, 2)).astype(np.float32)}
  params0 = _problem(np.float32)[0]
  mu, lr, warm = 0.5, 0.1, gr.PenaltyWarmup(2, 'lambda')

  def loss_fn(params, model_state, rng_key, batch):
    del rng_key
    return _loss(params, batch['x'], batch['y']), (model_state, {})

  grad_fn = gr.gradient_penalty_grad_fn(loss_fn, coefficient=mu, warmup=warm)
  state, history = train.fit(
      workdir=str(tmp_path / 'warm'),
      init_fn=gr.with_penalty_step_counter(lambda _: (params0, {})),
      grad_fn=grad_fn, optimizer=optax.sgd(lr),
      train_iter=data.ArrayIterator(arrays, 16, seed=0), num_steps=3,
      parallel='pmap', log_every=1, tensorboard=False)
  assert int(state.model_state[gr.PENALTY_STATE_KEY]['step']) == 3
  assert [h['penalty_scale'] for h in history if 'penalty_scale' in h] == [
      0.0, 0.5, 1.0]
  # The same three steps by hand.
  it = data.ArrayIterator(arrays, 16, seed=0)
  params = params0
  for t in range(3):
    batch = next(it)
    g = _exact_penalised(params, jnp.asarray(batch['x']),
                         jnp.asarray(batch['y']), mu * min(1.0, t / 2))
    params = jax.tree.map(lambda p, gg: p - lr * gg, params, g)
  assert _max_abs_diff(state.params, params) < 1e-5
  # Without the counter in the state the grad_fn says how to add it.
  with pytest.raises(ValueError, match='with_penalty_step_counter'):
    grad_fn(params0, {}, None, {'x': arrays['x'], 'y': arrays['y']})


def test_family_grad_fn_with_radius_warmup():
  """finite_difference_grad_fn in the engine contract: the 'r' warm-up gives
  the plain gradient at t = 0 and SAM with r·t/T after; metrics follow."""
  params, x, y = _problem(np.float32)
  r, warm = 0.05, gr.PenaltyWarmup(2, 'r')

  def loss_fn(p, model_state, rng_key, batch):
    del rng_key
    loss = _loss(p, batch['x'], batch['y'])
    return loss, (model_state, {'mse': loss})

  grad_fn = jax.jit(gr.finite_difference_grad_fn(
      loss_fn, radius=r, alpha=1.0, warmup=warm, learning_rate=0.1))
  state = gr.add_penalty_step_counter({})
  batch = {'x': x, 'y': y}
  expected = [_grad(params, x, y), _sam_reference(params, x, y, r / 2),
              _sam_reference(params, x, y, r)]
  for t in range(3):
    (loss, (state, metrics)), grads = grad_fn(params, state, None, batch)
    assert _max_abs_diff(grads, expected[t]) < 1e-6, t
    np.testing.assert_allclose(metrics['perturbation_radius'], r * t / 2,
                               rtol=1e-6)
    norm = float(jnp.sqrt(gr.gradient_norm_sq(expected[0])))
    np.testing.assert_allclose(metrics['penalty'], r * t / 2 * norm, rtol=1e-5)
  assert int(state[gr.PENALTY_STATE_KEY]['step']) == 3
  assert float(metrics['mse']) == pytest.approx(float(loss))


# --- per-block strengths -----------------------------------------------------


def test_per_block_coefficients():
  """(1/k) Σⱼ ∇(Lⱼ + μⱼ‖∇Lⱼ‖²), block j = examples [j·B/k, (j+1)·B/k)."""
  with enable_x64():
    params, x, y = _problem()
    mus, k = (0.0, 0.1, 0.4, 1.0), 4
    xs, ys = x.reshape(k, -1, 3), y.reshape(k, -1, 2)
    expected = jax.tree.map(lambda *g: sum(g) / k, *[
        _exact_penalised(params, xs[j], ys[j], mus[j]) for j in range(k)])
    for method in ('double_backprop', 'hvp'):
      _, got = jax.jit(gr.penalized_value_and_grad(
          _loss, coefficient=mus, method=method, num_microbatches=k,
          microbatch_argnums=(1, 2)))(params, x, y)
      assert _max_abs_diff(got, expected) < 1e-12, method
    with pytest.raises(ValueError, match='one value per microbatch'):
      gr.penalized_value_and_grad(_loss, coefficient=(0.1, 0.2),
                                  num_microbatches=4)


# --- the unbiased split-batch penalty ----------------------------------------


@functools.partial(jax.jit, static_argnums=4)
def _split_penalised(params, xs, ys, mu, k):
  """∇(L + μU) with U = (1/(k(k−1))) Σ_{i≠j}⟨gᵢ, gⱼ⟩, written out."""

  def objective(p):
    gs = [ravel_pytree(jax.grad(_loss)(p, xs[i], ys[i]))[0] for i in range(k)]
    cross = sum(gs[i] @ gs[j] for i in range(k) for j in range(k) if i != j)
    loss = sum(_loss(p, xs[i], ys[i]) for i in range(k)) / k
    return loss + mu * cross / (k * (k - 1))

  return jax.grad(objective)(params)


def test_unbiased_penalty_gradient():
  """k = 2: ḡ + μ(H_A g_B + H_B g_A), three methods; k = 3 likewise."""
  with enable_x64():
    params, x, y = _problem(batch=24)
    mu = 0.3
    for k, methods in ((2, ('double_backprop', 'hvp', 'finite_difference')),
                       (3, ('double_backprop',))):
      expected = _split_penalised(params, x.reshape(k, -1, 3),
                                  y.reshape(k, -1, 2), mu, k)
      for method in methods:
        loss, got = jax.jit(gr.unbiased_penalty_value_and_grad(
            _loss, coefficient=mu, num_splits=k, split_argnums=(1, 2),
            method=method, fd_epsilon=1e-5))(params, x, y)
        tol = 1e-4 if method == 'finite_difference' else 1e-12
        assert _max_abs_diff(got, expected) < tol * _max_abs(expected), (k, method)
      np.testing.assert_allclose(loss, _loss(params, x, y), rtol=1e-12)
    # The naive penalty on the same batch is a different gradient.
    assert _max_abs_diff(expected, _exact_penalised(params, x, y, mu)) > 1e-3


def _linear_regression(n=24, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n) + 1.0
  w = 0.3 * rng.normal(size=d)
  return jnp.asarray(w), jnp.asarray(x), jnp.asarray(y)


def _lr_loss(w, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def test_unbiased_estimate_monte_carlo_against_closed_forms():
  """Linear regression, population = N examples. With replacement:
  E‖ḡ_B‖² = ‖G‖² + tr Σ/B and E[U] = ‖G‖², and E[penalised gradient] =
  ∇(L + μ‖∇L‖²) of the population; without replacement:
  E‖ḡ_B‖² = ‖G‖² + (tr Σ/B)(N−B)/(N−1) and E[U] = ‖G‖² − tr Σ/(N−1)."""
  with enable_x64():
    w, x, y = _linear_regression()
    n, batch, mu, draws = x.shape[0], 8, 0.5, 20000
    per_example = jax.vmap(jax.grad(_lr_loss), in_axes=(None, 0, 0))(
        w, x[:, None], y[:, None])                               # [N, d]
    full = per_example.mean(0)
    trace = float(jnp.sum((per_example - full) ** 2) / n)        # tr Σ
    norm_sq = float(full @ full)
    population = jax.grad(lambda v: _lr_loss(v, x, y) + mu * jnp.sum(
        jax.grad(_lr_loss)(v, x, y) ** 2))(w)
    penalised = gr.unbiased_penalty_value_and_grad(
        _lr_loss, coefficient=mu, num_splits=2, split_argnums=(1, 2))

    def estimates(xb, yb):
      split = jax.vmap(jax.grad(_lr_loss), in_axes=(None, 0, 0))(
          w, xb.reshape(2, -1, 3), yb.reshape(2, -1))            # [2, d]
      naive = gr.gradient_norm_sq(jax.grad(_lr_loss)(w, xb, yb))
      return naive, gr.unbiased_gradient_norm_sq(split), penalised(w, xb, yb)[1]

    def one_draw(key):
      with_replacement = jax.random.randint(key, (batch,), 0, n)
      without = jax.random.permutation(key, n)[:batch]
      return (estimates(x[with_replacement], y[with_replacement]),
              estimates(x[without], y[without]))

    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    both = jax.jit(jax.vmap(one_draw))(keys)
    se = lambda v: float(jnp.std(v) / np.sqrt(draws))  # noqa: E731
    for replace, (naive, unbiased, grads) in zip((True, False), both):
      if replace:
        naive_mean, unbiased_mean = norm_sq + trace / batch, norm_sq
      else:
        naive_mean = norm_sq + trace / batch * (n - batch) / (n - 1)
        unbiased_mean = norm_sq - trace / (n - 1)
      assert abs(float(naive.mean()) - naive_mean) < 4 * se(naive), replace
      assert abs(float(unbiased.mean()) - unbiased_mean) < 4 * se(unbiased)
      # The tests can fail: the bias is many standard errors.
      assert trace / batch > 20 * se(naive)
      if replace:
        assert abs(float(unbiased.mean()) - naive_mean) > 10 * se(unbiased)
        mean_grad, grad_se = grads.mean(0), grads.std(0) / np.sqrt(draws)
        assert np.all(np.abs(mean_grad - population) < 4 * grad_se)
      else:
        assert abs(float(unbiased.mean()) - norm_sq) > 4 * se(unbiased)


def test_unbiased_grad_fn_metrics_and_pmap():
  """grad_fn metrics; under pmap ('global') split i gathers slice i of every
  device, the same as one device on the batch reordered that way."""
  params, x, y = _problem(np.float32)
  mu, k, devices = 0.3, 2, 4

  def loss_fn(p, model_state, rng_key, batch):
    del rng_key
    return _loss(p, batch['x'], batch['y']), (model_state, {})

  grad_fn = gr.unbiased_penalty_grad_fn(loss_fn, coefficient=mu, num_splits=k,
                                        learning_rate=0.1)
  batch = {'x': x, 'y': y}
  (_, (_, metrics)), grads = jax.jit(grad_fn)(params, {}, None, batch)
  split = jax.vmap(_grad, in_axes=(None, 0, 0))(
      params, x.reshape(k, -1, 3), y.reshape(k, -1, 2))
  u = float(gr.unbiased_gradient_norm_sq(split))
  np.testing.assert_allclose(metrics['grad_norm_sq_unbiased'], u, rtol=1e-5)
  np.testing.assert_allclose(metrics['penalty'], mu * u, rtol=1e-5)
  np.testing.assert_allclose(
      metrics['grad_norm_sq'], gr.gradient_norm_sq(_grad(params, x, y)),
      rtol=1e-5)

  def step(p, xb, yb):
    out = grad_fn(p, {}, None, {'x': xb, 'y': yb}, axis_name='i')
    return jax.lax.pmean(out, 'i')

  shard = lambda a: a.reshape((devices, -1) + a.shape[1:])  # noqa: E731
  (_, (_, pmetrics)), pgrads = jax.pmap(step, axis_name='i',
                                        in_axes=(None, 0, 0))(
                                            params, shard(x), shard(y))
  # Device d holds rows [8d, 8d+8); its split i is rows [8d+4i, 8d+4i+4).
  order = np.concatenate([np.arange(8 * d + 4 * i, 8 * d + 4 * i + 4)
                          for i in range(k) for d in range(devices)])
  reordered = {'x': x[order], 'y': y[order]}
  (_, (_, rmetrics)), rgrads = jax.jit(grad_fn)(params, {}, None, reordered)
  assert _max_abs_diff(jax.tree.map(lambda g: g[0], pgrads), rgrads) < (
      2e-6 * _max_abs(rgrads))
  np.testing.assert_allclose(pmetrics['grad_norm_sq_unbiased'][0],
                             rmetrics['grad_norm_sq_unbiased'], rtol=1e-4)


# --- bad options --------------------------------------------------------------


def test_bad_options_raise():
  f = functools.partial(gr.finite_difference_value_and_grad, _loss)
  with pytest.raises(ValueError, match='radius'):
    f(radius=0.0, alpha=1.0)
  with pytest.raises(ValueError, match='exactly one'):
    f(radius=0.1, alpha=1.0, coefficient=0.1)
  with pytest.raises(ValueError, match='alpha'):
    f(radius=0.1, alpha=-1.0)
  with pytest.raises(ValueError, match='difference'):
    f(radius=0.1, alpha=1.0, difference='backward')
  with pytest.raises(ValueError, match='perturbation'):
    f(radius=0.1, alpha=1.0, perturbation='local')
  with pytest.raises(ValueError, match="perturbation='global'"):
    f(radius=0.1, alpha=1.0, perturbation='per_device', inner_group_size=2)
  with pytest.raises(ValueError, match="'r' warm-up"):
    f(radius=0.1, coefficient=0.1, warmup=gr.PenaltyWarmup(5, 'r'))
  with pytest.raises(ValueError, match='strategy'):
    gr.PenaltyWarmup(5, 'cosine')
  with pytest.raises(ValueError, match='warmup_steps'):
    gr.PenaltyWarmup(-1)
  with pytest.raises(ValueError, match='num_splits'):
    gr.unbiased_penalty_value_and_grad(_loss, coefficient=0.1, num_splits=1)
  with pytest.raises(ValueError, match='one value per microbatch'):
    f(radius=0.1, alpha=(1.0, 0.5), num_groups=3)


# --- the MNIST measurement script, on a small population ----------------------


def test_gradient_noise_bias_experiment(tmp_path, shared_data):
  from experiments import gradient_noise_bias  # pylint: disable=g-import-not-at-top
  from jreg import cli  # pylint: disable=g-import-not-at-top
  config = cli.get_config('gradient_noise_bias', 'quickstart', {
      'data.train_examples': 400, 'measure.chunk_size': 200,
      'measure.batch_sizes': (8, 40), 'measure.num_draws': 40,
      'num_steps': 4, 'log_every': 2, 'batch_size': 40, 'model.width': 16,
      'data.dir': str(shared_data)})
  results = gradient_noise_bias.run(config, str(tmp_path))
  assert (tmp_path / 'results.json').exists()
  assert (tmp_path / 'gradient_noise_bias.png').exists()
  point = results['points']['initialisation']
  assert point['population'] == 400 and point['trace_sigma'] > 0
  for row in point['rows']:
    assert abs(row['naive_bias'] - row['predicted_naive_bias']) < 4 * row['naive_se']
    assert abs(row['unbiased_bias'] - row['predicted_unbiased_bias']) < (
        4 * row['unbiased_se'])
  with pytest.raises(cli.ConfigError, match='even'):
    cli.get_config('gradient_noise_bias', 'quickstart',
                   {'measure.batch_sizes': (7,)})
