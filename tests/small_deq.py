"""A small DEQ problem and its exact references, shared by the DEQ tests.

The cell z -> tanh(z W + x U + b) with ||W||_2 = scale < 1 is a contraction,
so z* is unique; the references solve the implicit-function-theorem system
densely, per example.
"""
import jax
import jax.numpy as jnp
import numpy as np


def tanh_params(dim=4, in_dim=3, seed=1, scale=0.5, dtype=None):
  """W [D, D] with spectral norm `scale`, U [I, D], b [D]."""
  rng = np.random.RandomState(seed)
  w = rng.randn(dim, dim)
  w = scale * w / np.linalg.norm(w, 2)                        # contraction
  return {'w': jnp.asarray(w, dtype),
          'u': jnp.asarray(rng.randn(in_dim, dim), dtype),
          'b': jnp.asarray(0.1 * rng.randn(dim), dtype)}


def tanh_cell(params, z, x):
  """z -> tanh(z W + x U + b); z [B, D], x [B, I]."""
  return jnp.tanh(z @ params['w'] + x @ params['u'] + params['b'])


def dense_backward(cell, params, x, z_star, g):
  """u with (I - J_f(z*)^T) u = g, by a dense solve per example.

  Args:
    cell: (params, z, x) -> z, batched over axis 0 of z [B, D] and of every
      leaf of x.
    g: dl/dz*, [B, D].
  """
  one = lambda zb, xb: cell(params, zb[None], jax.tree.map(
      lambda leaf: leaf[None], xb))[0]
  jac = jax.vmap(jax.jacfwd(one))(z_star, x)                    # [B, D, D]
  eye = jnp.eye(z_star.shape[-1])
  return jnp.linalg.solve(eye - jnp.swapaxes(jac, 1, 2), g[..., None])[..., 0]


def dense_ift_grad(cell, params, x, z_star, g):
  """dl/dtheta = u^T df/dtheta at z* (Bai et al., NeurIPS 2019, Thm. 1)."""
  u = dense_backward(cell, params, x, z_star, g)
  _, vjp = jax.vjp(lambda p: cell(p, z_star, x), params)
  return vjp(u)[0]
