"""jreg.layers: the custom-VJP convolution and the one-pass GroupNorm against
`lax.conv_general_dilated` / autodiff and the GroupNorm formula."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jreg import layers


def _conv_xla(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


CONV_CASES = [  # (H, W, C_in, C_out, kernel, strides, padding)
    (8, 8, 3, 5, 3, (1, 1), 'SAME'),
    (9, 7, 4, 6, 3, (2, 2), 'SAME'),
    (8, 8, 6, 2, 3, (2, 2), ((1, 1), (1, 1))),
    (6, 6, 5, 7, 1, (1, 1), 'VALID'),
    (7, 8, 2, 3, 3, (2, 1), 'VALID'),
]


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_value_and_vjp_match_autodiff(case):
  h, w_, c_in, c_out, k, strides, padding = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, h, w_, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), jnp.float32)
  out, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, strides, padding,
                                                impl='custom'), x, w)
  ref, ref_vjp = jax.vjp(lambda x, w: _conv_xla(x, w, strides, padding), x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  for got, want in zip(vjp(g), ref_vjp(g)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_second_order_matches_autodiff():
  """The Jacobian term differentiates a VJP: d/dw of <v, J_x^T u> and d/dx."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)

  def penalty(conv, x, w):  # ||J_x^T u||^2 + ||J_w^T u||^2 through a tanh
    f = lambda x, w: jnp.tanh(conv(x, w, (2, 2), 'SAME'))
    gx, gw = jax.vjp(f, x, w)[1](u)
    return jnp.sum(jnp.square(gx)) + jnp.sum(jnp.square(gw))

  custom = lambda x, w, s, p: layers.conv2d(x, w, s, p, impl='custom')
  got = jax.grad(penalty, argnums=(1, 2))(custom, x, w)
  want = jax.grad(penalty, argnums=(1, 2))(_conv_xla, x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_conv_gradient_inside_while_loop_matches_autodiff():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(0.2 * rng.normal(size=(3, 3, 4, 4)), jnp.float32)

  def loop(conv):
    _, vjp = jax.vjp(lambda z: conv(z, w, (1, 1), 'SAME'), x)
    return jax.lax.fori_loop(0, 3, lambda i, u: 0.5 * vjp(u)[0] + x, x)

  np.testing.assert_allclose(
      loop(lambda *a: layers.conv2d(*a, impl='custom')), loop(_conv_xla),
      rtol=1e-4, atol=1e-4)


def test_conv_module_matches_haiku_conv():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.float32)
  ours = hk.transform(lambda x: layers.Conv2D(4, 3, stride=2)(x))
  theirs = hk.transform(lambda x: hk.Conv2D(4, 3, stride=2)(x))
  params = theirs.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == (
      jax.tree.map(jnp.shape, params))
  np.testing.assert_allclose(ours.apply(params, None, x),
                             theirs.apply(params, None, x), rtol=1e-5, atol=1e-5)


def _group_norm_reference(x, groups, scale, offset, eps=1e-5):
  b, c = x.shape[0], x.shape[-1]
  grouped = x.reshape(b, -1, groups, c // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  return ((grouped - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + offset


@pytest.mark.parametrize('impl', ['custom', 'xla'])
def test_group_norm_formula_and_gradient(impl):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(3, 5, 4, 12)), jnp.float32)
  scale = jnp.asarray(rng.normal(size=12), jnp.float32)
  offset = jnp.asarray(rng.normal(size=12), jnp.float32)
  got = layers.group_norm(x, 4, scale, offset, impl=impl)
  np.testing.assert_allclose(got, _group_norm_reference(x, 4, scale, offset),
                             rtol=1e-4, atol=1e-4)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  loss = lambda fn, *a: jnp.sum(weights * fn(*a))
  got = jax.grad(lambda *a: loss(
      lambda x, s, o: layers.group_norm(x, 4, s, o, impl=impl), *a),
                 argnums=(0, 1, 2))(x, scale, offset)
  want = jax.grad(lambda *a: loss(
      lambda x, s, o: _group_norm_reference(x, 4, s, o), *a),
                  argnums=(0, 1, 2))(x, scale, offset)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_group_norm_module_matches_haiku():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 4, 8)), jnp.float32)
  ours = hk.transform(lambda x: layers.GroupNorm(2)(x))
  theirs = hk.transform(lambda x: hk.GroupNorm(2)(x))
  params = theirs.init(None, x)
  params = jax.tree.map(lambda p: p + 0.3, params)
  assert jax.tree.map(jnp.shape, ours.init(None, x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_allclose(ours.apply(params, None, x),
                             theirs.apply(params, None, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('window, strides, padding, reshaped', [
    (4, None, 'VALID', True),        # the reshape-mean path
    ((3, 2), (3, 2), 'VALID', True),
    (3, 2, 'VALID', False),          # overlapping windows: hk.avg_pool
    (5, None, 'VALID', False),       # H not divisible: hk.avg_pool
    (2, None, 'SAME', False),
])
def test_avg_pool_matches_haiku_in_value_and_gradient(window, strides, padding,
                                                      reshaped):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 12, 8, 3)), jnp.float32)
  k = (window, window) if isinstance(window, int) else window
  s = k if strides is None else (
      (strides, strides) if isinstance(strides, int) else strides)
  haiku_pool = lambda x: hk.avg_pool(x, (1, *k, 1), (1, *s, 1), padding)
  ours = lambda x: layers.avg_pool(x, window, strides, padding)
  np.testing.assert_allclose(ours(x), haiku_pool(x), rtol=1e-6, atol=1e-6)
  weights = jnp.asarray(rng.normal(size=haiku_pool(x).shape), jnp.float32)
  grad = lambda fn: jax.grad(lambda x: jnp.sum(weights * fn(x)))(x)
  np.testing.assert_allclose(grad(ours), grad(haiku_pool), rtol=1e-6, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(ours)(x))
  assert ('reduce_window' not in jaxpr) == reshaped


def test_implementation_context_and_bad_name():
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  with layers.implementation('xla'):
    assert layers.current_implementation() == 'xla'
    jaxpr = str(jax.make_jaxpr(lambda x: layers.conv2d(x, w))(x))
  assert 'custom_vjp' not in jaxpr
  assert layers.current_implementation() == 'custom'
  assert 'custom_vjp' in str(jax.make_jaxpr(lambda x: layers.conv2d(x, w))(x))
  with pytest.raises(ValueError, match='unknown layer implementation'):
    layers.conv2d(x, w, impl='cudnn')
