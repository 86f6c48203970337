"""Spectral normalisation of Haiku weights (jreg.layers.spectral_normalize)."""
import haiku as hk
import jax
from x64 import enable_x64
import jax.numpy as jnp
import numpy as np
import pytest

import jreg.deq as deq
from jreg import layers


def _top_singular_values(w):
  s = np.linalg.svd(np.asarray(w).reshape(-1, w.shape[-1]), compute_uv=False)
  return s[0], s[1]


@pytest.mark.parametrize('shape', [(5, 3), (3, 7), (8, 8), (3, 3, 2, 4),
                                   (1, 1, 6, 5)])
def test_sigma_estimate_matches_svd(shape):
  with enable_x64():
    for seed in range(3):
      w = np.random.RandomState(seed).randn(*shape)
      s1, s2 = _top_singular_values(w)
      sigma = float(layers.spectral_norm_estimate(jnp.asarray(w), 50))
      # Power iteration: a lower bound, relative error ~ (s2/s1)^(2N), down to
      # ~eps / sigma from the eps = 1e-12 added to the norms.
      bound = max(4 * (s2 / s1) ** 100, 1e-11)
      assert sigma <= s1 * (1 + 1e-12)
      assert (s1 - sigma) / s1 <= bound, (shape, seed, s1, sigma)
      # One iteration is already a lower bound, and a rough one.
      one = float(layers.spectral_norm_estimate(jnp.asarray(w), 1))
      assert 0 < one <= s1 * (1 + 1e-12)


@pytest.mark.parametrize('scale, clip', [(1.0, False), (0.7, False),
                                         (50.0, True)])
def test_normalised_linear_has_target_norm(scale, clip):
  with enable_x64():
    def fn(x):
      return hk.Linear(5, w_init=hk.initializers.RandomNormal(2.0))(x)

    wrapped = hk.without_apply_rng(hk.transform(layers.spectral_normalize(
        fn, num_iters=50, scale=scale, clip=clip)))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 4))
    params = wrapped.init(jax.random.PRNGKey(1), x)
    raw_w, b = params['linear']['w'], params['linear']['b']
    s1, _ = _top_singular_values(raw_w)
    assert s1 > 1.5  # the raw weight is not normalised
    # The wrapped layer is x W' + b with W' the rescaled weight: recover W'.
    w_used = jax.jacobian(lambda x: wrapped.apply(params, x))(x[:1])[0, :, 0, :].T
    np.testing.assert_allclose(wrapped.apply(params, x), x @ w_used + b,
                               rtol=1e-12)
    want = min(scale, s1) if clip else scale
    np.testing.assert_allclose(_top_singular_values(w_used)[0], want,
                               rtol=1e-7)
    # Raw parameters are stored unchanged (normalised on reading).
    np.testing.assert_allclose(
        hk.transform(fn).init(jax.random.PRNGKey(1), x)['linear']['w'], raw_w)


def test_normalised_conv_kernel_and_operator_bound():
  with enable_x64():
    def fn(x):
      return layers.Conv2D(3, 3, w_init=hk.initializers.RandomNormal(1.0))(x)

    wrapped = hk.without_apply_rng(hk.transform(
        layers.spectral_normalize(fn, num_iters=50, scale=0.5)))
    x = jnp.asarray(np.random.RandomState(0).randn(1, 4, 4, 2))
    params = wrapped.init(jax.random.PRNGKey(0), x)
    raw = params['conv2_d']['w']                                # [3, 3, 2, 3]
    s1, _ = _top_singular_values(raw)
    normalised = layers.spectral_normalize_weight(raw, 50, 0.5)
    np.testing.assert_allclose(normalised * (s1 / 0.5), raw, rtol=1e-7)
    np.testing.assert_allclose(_top_singular_values(normalised)[0], 0.5,
                               rtol=1e-7)
    # The convolution operator (dense Jacobian on a 4x4 image): norm <= k c.
    f = lambda v: wrapped.apply(params, v.reshape(x.shape)).ravel()
    op_norm = np.linalg.norm(np.asarray(jax.jacobian(f)(x.ravel())), 2)
    assert op_norm <= 3 * 0.5 * (1 + 1e-7)
    raw_f = lambda v: hk.without_apply_rng(hk.transform(fn)).apply(
        params, v.reshape(x.shape)).ravel()
    raw_norm = np.linalg.norm(np.asarray(jax.jacobian(raw_f)(x.ravel())), 2)
    assert raw_norm > 3 * 0.5  # unnormalised, the bound does not hold


def test_deq_cell_contracts_and_converges():
  c = 0.9

  def cell(z, x):
    w_init = hk.initializers.RandomNormal(3.0)   # ||W|| >> 1 unnormalised
    return jnp.tanh(hk.Linear(6, w_init=w_init, name='w')(z) +
                    hk.Linear(6, name='u')(x))

  normalised = layers.spectral_normalize(cell, num_iters=30, scale=c)

  def model(x):
    layer = deq.DEQ(normalised, forward=deq.SolverConfig(
        name='fixed_point', max_iter=200, tol=1e-5, stop_mode='abs'),
                    backward=deq.BackwardConfig(mode='phantom'), name='deq')
    return layer(x, jnp.zeros((x.shape[0], 6)))

  net = hk.without_apply_rng(hk.transform(model))
  x = jnp.asarray(np.random.RandomState(0).randn(3, 4), jnp.float32)
  params = net.init(jax.random.PRNGKey(0), x)
  z_star, info = jax.jit(net.apply)(params, x)
  assert float(info['forward_converged_fraction']) == 1.0
  inner = deq.cell_params(params, 'deq')
  assert _top_singular_values(inner['w']['w'])[0] > 3.0
  f_apply = hk.without_apply_rng(hk.transform(normalised)).apply
  jac = jax.jacobian(lambda z: f_apply(inner, z, x[:1]))(z_star[:1])[0, :, 0]
  assert np.linalg.norm(np.asarray(jac), 2) <= c * (1 + 1e-5)
  # A contraction with constant c: ||z - z*|| <= ||f(z) - z|| / (1 - c).
  assert float(info['forward_abs_residual']) <= 1e-5


def test_gradients_match_finite_differences():
  with enable_x64():
    def fn(x):
      return jnp.tanh(hk.Linear(3, name='a')(x)) @ jnp.ones((3, 2))

    net = hk.without_apply_rng(hk.transform(
        layers.spectral_normalize(fn, num_iters=60, scale=0.8)))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 4))
    params = net.init(jax.random.PRNGKey(0), x)
    loss = lambda p: jnp.sum(jnp.sin(net.apply(p, x)))
    grads = jax.grad(loss)(params)
    w = np.asarray(params['a']['w'])
    eps = 1e-6
    for index in [(0, 0), (1, 2), (3, 1), (2, 0)]:
      bump = np.zeros_like(w)
      bump[index] = eps
      plus = {'a': dict(params['a'], w=jnp.asarray(w + bump))}
      minus = {'a': dict(params['a'], w=jnp.asarray(w - bump))}
      numeric = (loss(plus) - loss(minus)) / (2 * eps)
      np.testing.assert_allclose(grads['a']['w'][index], numeric, rtol=1e-6,
                                 atol=1e-9)
    # The normalisation is in the gradient: it differs from the raw layer's.
    raw = hk.without_apply_rng(hk.transform(fn))
    raw_grads = jax.grad(lambda p: jnp.sum(jnp.sin(raw.apply(p, x))))(params)
    assert not np.allclose(raw_grads['a']['w'], grads['a']['w'], rtol=1e-2)
