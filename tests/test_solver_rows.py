"""The solvers' row layout [B, N, C] and Anderson's closed-form weights."""
import jax
from x64 import enable_x64
import jax.numpy as jnp
import numpy as np
import pytest

import jreg.deq as deq
from jreg.deq import solvers


def test_flatten_rows_keeps_the_channel_axis_and_round_trips():
  rng = np.random.RandomState(0)
  image = jnp.asarray(rng.randn(2, 3, 4, 5), jnp.float32)       # [B, H, W, C]
  rows, unflatten = solvers.flatten_rows(image)
  assert rows.shape == (2, 12, 5)
  np.testing.assert_array_equal(rows.reshape(2, -1),
                                solvers.flatten_batch(image)[0])
  np.testing.assert_array_equal(unflatten(rows), image)

  # Leaves with the same last axis are stacked along N, in flatten_batch order.
  tree = {'a': image, 'b': jnp.asarray(rng.randn(2, 7, 5), jnp.bfloat16)}
  rows, unflatten = solvers.flatten_rows(tree)
  assert rows.shape == (2, 12 + 7, 5) and rows.dtype == jnp.float32
  np.testing.assert_array_equal(rows.reshape(2, -1),
                                solvers.flatten_batch(tree)[0])
  back = unflatten(rows)
  assert back['b'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(back['a'], tree['a'])
  np.testing.assert_array_equal(back['b'], tree['b'])

  # Different last axes, or a [B] leaf: the flat examples, as flatten_batch.
  for tree in ({'a': image, 'c': jnp.ones((2, 3))}, {'a': image, 'd': jnp.ones(2)}):
    rows, unflatten = solvers.flatten_rows(tree)
    size = sum(leaf.size // 2 for leaf in jax.tree.leaves(tree))
    assert rows.shape == (2, size)
    np.testing.assert_array_equal(rows, solvers.flatten_batch(tree)[0])
    jax.tree.map(np.testing.assert_array_equal, unflatten(rows), tree)

  with pytest.raises(ValueError, match='same leading batch axis'):
    solvers.flatten_rows({'a': image, 'b': jnp.ones((3, 5))})


@pytest.mark.parametrize('filled', [1, 3, 5])
def test_anderson_weights_solve_the_bordered_system(filled):
  """alpha = H^-1 v / (v^T H^-1 v) is the alpha of locuslab/deq's system."""
  m, batch = 5, 3
  rng = np.random.RandomState(filled)
  with enable_x64():
    g = rng.randn(batch, m, 8)
    g[:, filled:] = 0.0                                   # unfilled history
    valid = (np.arange(m) < filled).astype(np.float64)
    h = np.einsum('bid,bjd->bij', g, g) + 1e-3 * np.eye(m)
    got = np.asarray(solvers._anderson_weights(jnp.asarray(h),  # pylint: disable=protected-access
                                               jnp.asarray(valid)))
    for b in range(batch):
      system = np.zeros((m + 1, m + 1))
      system[0, 1:] = system[1:, 0] = valid
      system[1:, 1:] = h[b]
      want = np.linalg.solve(system, np.eye(m + 1)[0])[1:]
      np.testing.assert_allclose(got[b], want, rtol=1e-9, atol=1e-12)
    assert np.all(got[:, filled:] == 0.0)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize('name', ['fixed_point', 'anderson', 'broyden'])
def test_solvers_give_the_same_iterates_on_images_and_flat_rows(name):
  """A map on [B, H, W, C] states solved as rows [B, HW, C] and on [B, D].

  In float64, so that only the order of summation differs between the two.
  """
  rng = np.random.RandomState(1)
  shape = (2, 3, 3, 4)
  dim = int(np.prod(shape[1:]))
  with enable_x64():
    a = jnp.asarray(0.6 * np.linalg.qr(rng.randn(dim, dim))[0])
    bias = jnp.asarray(rng.randn(2, dim))
    flat_map = lambda z: jnp.tanh(z @ a.T + bias)               # z: [B, D]
    image_map = lambda z: flat_map(z.reshape(2, -1)).reshape(shape)
    config = deq.SolverConfig(name=name, max_iter=12, tol=0.0)
    z_image, stats_image = deq.solve(image_map, jnp.zeros(shape), config)
    z_flat, stats_flat = deq.solve(flat_map, jnp.zeros((2, dim)), config)
    assert z_image.dtype == jnp.float64
    np.testing.assert_allclose(z_image.reshape(2, -1), z_flat,
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats_image.abs_residual,
                               stats_flat.abs_residual, rtol=1e-8, atol=1e-14)
    assert float(stats_flat.abs_residual.max()) < 1e-2     # a real solve
    assert int(stats_image.nfe) == int(stats_flat.nfe) == 12
