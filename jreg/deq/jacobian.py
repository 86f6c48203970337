"""Jacobian regularisation of fixed points and spectral-radius monitoring.

Jacobian regulariser (Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by
Jacobian Regularization", ICML 2021, Sec. 4, Eq. (6)): the training loss gets
gamma * ||J_f(z*)||_F^2 / d, with the Frobenius norm estimated by Hutchinson's
estimator,

  ||J||_F^2 = E_{eps ~ N(0, I)} ||eps^T J||_2^2
            ~ (1/M) sum_m ||eps_m^T J_f(z*)||_2^2,

one vector-Jacobian product per eps_m. As in the reference implementation
(locuslab/deq `lib/jacobian.py::jac_loss_estimate`, and torchdeq
`torchdeq/loss/jacobian.py::jac_reg`) z* is a constant (`stop_gradient`): the
term is differentiated with respect to the layer's parameters and inputs only,
and the squared norm is divided by M times the number of elements of z* (batch
included), i.e. it is the batch mean of ||J||_F^2 / d with d features per
example.

The spectral radius rho(J_f(z*)) is estimated per example by power iteration
with Jacobian-vector products (monitoring only; no gradient).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jreg.deq import solvers

PyTree = Any


def jacobian_frobenius_estimate(f: Callable[[PyTree], PyTree], z_star: PyTree,
                                rng: jax.Array, num_vectors: int = 1
                                ) -> jax.Array:
  """Hutchinson estimate of ||J_f(z*)||_F^2 / d, averaged over the batch.

  Computes sum_m ||eps_m^T J_f(z*)||^2 / (M * B * d) with eps_m ~ N(0, I) of
  z*'s shape (B * d elements in all), one VJP per vector; z* is held constant
  (stop_gradient) as in the reference implementation, so gradients flow only
  into the parameters and inputs f closes over. Unbiased for
  mean_b ||J_b||_F^2 / d.

  Args:
    f: z -> f(z), closing over parameters and inputs (batched pytree map).
    z_star: the fixed point (any pytree of [B, ...] leaves).
    rng: PRNG key.
    num_vectors: M >= 1.

  Returns:
    Scalar estimate.
  """
  if num_vectors < 1:
    raise ValueError(f'num_vectors must be >= 1, got {num_vectors}.')
  z_star = lax.stop_gradient(z_star)
  _, vjp = jax.vjp(f, z_star)
  leaves, treedef = jax.tree.flatten(z_star)
  num_elements = sum(l.size for l in leaves)
  total = 0.0
  for key in jax.random.split(rng, num_vectors):
    keys = jax.random.split(key, len(leaves))
    eps = jax.tree.unflatten(treedef, [
        jax.random.normal(k, l.shape, l.dtype)
        for k, l in zip(keys, leaves)])
    (eps_j,) = vjp(eps)
    total = total + sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(eps_j))
  return total / (num_vectors * num_elements)


def jacobian_frobenius_exact(f: Callable[[jax.Array], jax.Array],
                             z_star: jax.Array) -> jax.Array:
  """Exact ||J_f(z*)||_F^2 / (B d) for a [B, d] state, via the full Jacobian.

  The full [B, d, B, d] Jacobian (cross-example terms included, zero for
  models without batch mixing) is built with `jax.jacrev` (reverse mode, so
  cells with custom VJPs such as `jreg.layers.conv2d` work): small sizes only
  (tests, monitoring of toy models).
  """
  batch, dim = z_star.shape
  jac = jax.jacrev(f)(z_star)  # [B, d, B, d]
  return jnp.sum(jnp.square(jac)) / (batch * dim)


def spectral_radius(f: Callable[[PyTree], PyTree], z_star: PyTree,
                    rng: jax.Array, num_iters: int = 100) -> jax.Array:
  """Per-example power-iteration estimate of rho(J_f(z*)): [B].

  Iterates v_{k+1} = J^T v_k / ||J^T v_k|| with VJPs (f linearised once at
  z*; J^T has the eigenvalues of J, and reverse mode works through cells
  with custom VJPs such as `jreg.layers.conv2d`, which have no JVP) and
  returns exp(mean_{k >= N/2} log ||J v_k||), the geometric-mean growth rate
  over the second half. This converges to `|lambda_max|` also when the dominant
  eigenvalues are a complex-conjugate pair (where the single-step ratio
  oscillates); cf. locuslab/deq `lib/jacobian.py::power_method`.

  Args:
    f: z -> f(z) (batched pytree map, no batch mixing).
    z_star: point at which J is taken.
    rng: PRNG key for the start vector.
    num_iters: power iterations (>= 2).

  Returns:
    [B] estimates (no gradient).
  """
  if num_iters < 2:
    raise ValueError(f'num_iters must be >= 2, got {num_iters}.')
  z_star = lax.stop_gradient(z_star)
  flat, unflatten = solvers.flatten_batch(z_star)
  _, vjp_fn = jax.vjp(lambda z: solvers.flatten_batch(f(unflatten(z)))[0],
                      flat)
  v0 = jax.random.normal(rng, flat.shape, flat.dtype)
  v0 = v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True)
  start = num_iters // 2

  def body(k, carry):
    v, log_sum = carry
    (jv,) = vjp_fn(v)  # J^T v
    norm = jnp.linalg.norm(jv.astype(jnp.float32), axis=-1)  # [B]
    log_sum = log_sum + jnp.where(k >= start, jnp.log(norm + 1e-30), 0.0)
    v = jv / (norm[:, None] + 1e-30).astype(jv.dtype)
    return v, log_sum

  _, log_sum = lax.fori_loop(0, num_iters, body,
                             (v0, jnp.zeros_like(flat[:, 0], jnp.float32)))
  return lax.stop_gradient(jnp.exp(log_sum / (num_iters - start)))


def regularization_gate(rng: jax.Array, probability) -> jax.Array:
  """Bernoulli(p) decision to apply the Jacobian term this step (bool []).

  The paper applies the regulariser on a random fraction p of training steps
  (Bai et al., 2021, Sec. 5 / Appendix A); with `lax.cond` on this flag the
  VJPs are skipped on the other steps. `probability` may be a traced value
  (e.g. an optax schedule evaluated at the step).
  """
  return jax.random.uniform(rng) < probability
