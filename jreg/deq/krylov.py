"""Krylov solvers for affine fixed points u = h(u) = L u + b: GMRES, BiCGStab.

The backward pass of a DEQ solves u = J_f(z*)^T u + dl/dz* (`jreg.deq.implicit`),
an affine map h(u) = L u + b. Its fixed point solves the linear system

  A u = b,   A = I - L,   b = h(0),

which Krylov methods solve with one product A v per evaluation of h. Both
methods here are registered solvers (`SolverConfig(name='gmres')`,
`'bicgstab'`) with `affine_only=True`: for a nonlinear map the products below
are not those of any fixed matrix, so they are refused as forward solvers.

Products with A. With u0 the initial point and s = ||h(u0)|| + ||u0|| per
example (1 if zero), a direction d is applied as

  A d = d - (h(u0 + sigma d) - h(u0)) / sigma,   sigma = s / ||d||,

which equals d - (h(d) - h(0)) for affine h, costs one evaluation of h, and
keeps the rounding error of the difference at the scale of h's values (for
the backward solve u0 = 0, so h(u0) = b).

Every example is its own system: inner products, Krylov bases, restarts and
step lengths are per row of the flattened [B, D] state, and one evaluation of
h serves all rows. Vectors and small systems are kept in float32 for
low-precision states (as the solvers of `jreg.deq.solvers` accumulate).

Statistics and stopping are those of `jreg.deq.solvers`: `nfe` counts every
evaluation of h (h(u0) included); the returned u is the lowest-residual point
at which h was evaluated, so `abs_residual` = ||h(u) - u|| and `rel_residual`
= ||h(u) - u|| / (||h(u)|| + 1e-8) are exact. One evaluation of h per loop
iteration is either a product A d (for the rows still iterating) or, for a
row whose method's own residual estimate reached `tol` (by `stop_mode`), whose
cycle is full or which broke down, the true residual h(x) - x at its current
iterate x; that row then restarts its method from x with this residual. The
last evaluation of the budget checks every row's iterate. The batch stops
when every example's checked residual is <= tol, or after `max_iter`
evaluations; `unroll=True` runs exactly max_iter evaluations in straight-line
code.

References: Saad & Schultz, "GMRES: A generalized minimal residual algorithm
for solving nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7, 1986
(Arnoldi with modified Gram-Schmidt, Givens rotations; Saad, "Iterative
Methods for Sparse Linear Systems", 2003, Alg. 6.9); van der Vorst,
"Bi-CGSTAB", SIAM J. Sci. Stat. Comput. 13, 1992 (Saad 2003, Alg. 7.7).
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jreg.deq import solvers

PyTree = Any
# pylint: disable=protected-access
_check = solvers._check
_accumulation_dtype = solvers._accumulation_dtype
_init_best = solvers._init_best
_update_best = solvers._update_best
_converged = solvers._converged
# pylint: enable=protected-access


def _norm(x):
  return jnp.linalg.norm(x, axis=-1)


def _dot(a, b):
  return jnp.sum(a * b, axis=-1)


def _safe_div(num, den):
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _select_rows(mask, a, b):
  """Row-wise where over two pytrees with leading batch axis."""
  def pick(x, y):
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(pick, a, b)


class _Method(NamedTuple):
  """A Krylov method as the driver `_affine_solve` uses it (all per row)."""
  restart: Callable   # (x [B, D], r = b - A x [B, D]) -> state
  current: Callable   # state -> (x, r estimate) of the current iterate
  direction: Callable  # state -> d [B, D], whose product A d comes next
  absorb: Callable    # (state, A d) -> state
  fresh: Callable     # state -> bool [B]: nothing done since the restart
  stalled: Callable   # state -> bool [B]: cycle full or breakdown


def _affine_solve(h, u0, max_iter, tol, stop_mode, unroll, make_method):
  """The loop shared by the Krylov methods (module docstring)."""
  _check(max_iter, stop_mode)
  flat0, unflatten = solvers.flatten_batch(u0)
  dtype = flat0.dtype
  acc = _accumulation_dtype(dtype)
  hh = lambda u: solvers.flatten_batch(h(unflatten(u)))[0]
  method = make_method(flat0.shape, acc)

  h0 = hh(flat0)                                           # [B, D]
  base, hbase = flat0.astype(acc), h0.astype(acc)
  scale = _norm(hbase) + _norm(base)                       # [B]
  scale = jnp.where(scale > 0, scale, 1.0)
  carry = (method.restart(base, hbase - base), _init_best(flat0, h0))

  def step(carry, last):
    state, best = carry
    x, r = method.current(state)
    est = _norm(r)
    if stop_mode == 'rel':
      est = est / (_norm(x + r) + solvers._EPS)  # pylint: disable=protected-access
    check = ~method.fresh(state) & ((est <= tol) | method.stalled(state) | last)
    d = method.direction(state)
    d_norm = _norm(d)
    sigma = (scale / jnp.where(d_norm > 0, d_norm, 1.0))[:, None]
    point = jnp.where(check[:, None], x, base + sigma * d).astype(dtype)
    h_point = hh(point)
    point_acc, h_acc = point.astype(acc), h_point.astype(acc)
    advanced = method.absorb(state, d - (h_acc - hbase) / sigma)
    restarted = method.restart(point_acc, h_acc - point_acc)
    state = _select_rows(check, restarted, advanced)
    best = _select_rows(check, _update_best(best, point, h_point, stop_mode),
                        best)
    return state, best

  if unroll:
    for k in range(1, max_iter):
      carry = step(carry, k == max_iter - 1)
    nfe = jnp.asarray(max_iter, jnp.int32)
  else:
    def cond(loop):
      (_, best), k = loop
      return (k < max_iter) & ~jnp.all(_converged(best, tol, stop_mode))

    def body(loop):
      carry, k = loop
      return step(carry, k == max_iter - 1), k + 1

    carry, nfe = lax.while_loop(cond, body,
                                (carry, jnp.asarray(1, jnp.int32)))
  best = carry[1]
  stats = solvers.SolverStats(nfe=nfe, abs_residual=best.abs_res,
                              rel_residual=best.rel_res,
                              converged=_converged(best, tol, stop_mode))
  return unflatten(best.z), stats


# ---------------------------------------------------------------- GMRES


class _GmresState(NamedTuple):
  x0: jax.Array     # [B, D] start of the cycle
  beta: jax.Array   # [B] ||r0||
  basis: jax.Array  # [B, m+1, D] Arnoldi vectors v_0..v_j (zeros after)
  hess: jax.Array   # [B, m+1, m] Hessenberg matrix H (A V_j = V_{j+1} H)
  tri: jax.Array    # [B, m+1, m] Q H, upper triangular
  rot: jax.Array    # [B, m+1, m+1] Q, the product of the Givens rotations
  g: jax.Array      # [B, m+1] Q beta e_1
  j: jax.Array      # int32 [B] Arnoldi vectors applied in this cycle


def _gmres_method(m):
  """GMRES(m): Arnoldi (modified Gram-Schmidt) with Givens least squares."""

  def make(shape, acc):
    batch, dim = shape

    def restart(x, r):
      beta = _norm(r)
      v0 = r / jnp.where(beta > 0, beta, 1.0)[:, None]
      return _GmresState(
          x0=x, beta=beta,
          basis=jnp.zeros((batch, m + 1, dim), acc).at[:, 0].set(v0),
          hess=jnp.zeros((batch, m + 1, m), acc),
          tri=jnp.zeros((batch, m + 1, m), acc),
          rot=jnp.broadcast_to(jnp.eye(m + 1, dtype=acc), (batch, m + 1, m + 1)),
          g=jnp.zeros((batch, m + 1), acc).at[:, 0].set(beta),
          j=jnp.zeros((batch,), jnp.int32))

    def current(state):
      # y = argmin ||beta e_1 - H y|| over the first j columns: R y = g.
      filled = jnp.arange(m)[None, :] < state.j[:, None]          # [B, m]
      tri = state.tri[:, :m, :]
      diag = jnp.diagonal(tri, axis1=1, axis2=2)                   # [B, m]
      safe = jnp.where(filled & (diag != 0), diag, 1.0)
      tri = tri + (safe - diag)[:, :, None] * jnp.eye(m, dtype=acc)
      rhs = jnp.where(filled, state.g[:, :m], 0.0)
      y = lax.linalg.triangular_solve(tri, rhs[:, :, None], left_side=True,
                                      lower=False)[:, :, 0]       # [B, m]
      x = state.x0 + jnp.einsum('bk,bkd->bd', y, state.basis[:, :m])
      coeff = (-jnp.einsum('bik,bk->bi', state.hess, y)
               ).at[:, 0].add(state.beta)                          # [B, m+1]
      r = jnp.einsum('bk,bkd->bd', coeff, state.basis)
      return x, r

    def direction(state):
      return jnp.einsum('bk,bkd->bd', jax.nn.one_hot(state.j, m + 1,
                                                     dtype=acc), state.basis)

    def absorb(state, w):
      def gram_schmidt(i, loop):
        w, col = loop
        v = lax.dynamic_index_in_dim(state.basis, i, axis=1, keepdims=False)
        coef = _dot(w, v)  # zero for the unused (zero) slots
        return w - coef[:, None] * v, col.at[:, i].set(coef)

      w, col = lax.fori_loop(0, m + 1, gram_schmidt,
                             (w, jnp.zeros((batch, m + 1), acc)))
      h_next = _norm(w)
      v_next = w / jnp.where(h_next > 0, h_next, 1.0)[:, None]
      at_j, at_next = (jax.nn.one_hot(state.j, m + 1, dtype=acc),
                       jax.nn.one_hot(state.j + 1, m + 1, dtype=acc))
      col = col + at_next * h_next[:, None]
      column_j = jax.nn.one_hot(state.j, m, dtype=acc)[:, None, :]  # [B, 1, m]
      hess = state.hess + column_j * col[:, :, None]

      # The earlier rotations (their product Q), then the rotation G_j that
      # zeroes entry j+1 of the column: rows j, j+1 of Q and g turn by G_j.
      col = jnp.einsum('bik,bk->bi', state.rot, col)
      a, b = _dot(col, at_j), _dot(col, at_next)
      radius = jnp.hypot(a, b)
      c = jnp.where(radius > 0, a / jnp.where(radius > 0, radius, 1.0), 1.0)
      s = _safe_div(b, radius)
      col = col + at_j * (radius - a)[:, None] - at_next * b[:, None]

      def turn(x):  # G_j on the rows j, j+1 of x [B, m+1, ...]
        tail = (1,) * (x.ndim - 2)  # x [B, m+1, *tail]
        x_j = jnp.einsum('bi,bi...->b...', at_j, x)
        x_next = jnp.einsum('bi,bi...->b...', at_next, x)
        cos, sin = c.reshape((-1,) + tail), s.reshape((-1,) + tail)
        new_j = cos * x_j + sin * x_next
        new_next = cos * x_next - sin * x_j
        return (x + at_j.reshape(at_j.shape + tail) * (new_j - x_j)[:, None]
                + at_next.reshape(at_next.shape + tail)
                * (new_next - x_next)[:, None])

      return state._replace(
          basis=state.basis + at_next[:, :, None] * v_next[:, None, :],
          hess=hess, tri=state.tri + column_j * col[:, :, None],
          rot=turn(state.rot), g=turn(state.g), j=state.j + 1)

    return _Method(restart, current, direction, absorb,
                   fresh=lambda state: state.j == 0,
                   stalled=lambda state: state.j >= m)

  return make


def gmres(h: Callable[[PyTree], PyTree], u0: PyTree, *, max_iter: int = 30,
          tol: float = 1e-3, stop_mode: str = 'rel',
          restart: Optional[int] = None, unroll: bool = False):
  """Restarted GMRES(m) for the fixed point u = h(u) of an affine h.

  Solves (I - L) u = h(0) for h(u) = L u + b (module docstring). A cycle
  from x_0 with r_0 = h(x_0) - x_0, beta = ||r_0|| builds the Arnoldi basis
  V_{k+1} of the Krylov space K_k(A, r_0) by modified Gram-Schmidt,
  A V_k = V_{k+1} H_k, and takes x_k = x_0 + V_k y_k with
  y_k = argmin_y ||beta e_1 - H_k y|| (Givens rotations); ||b - A x_k|| is
  the method's residual estimate (Saad & Schultz, 1986; Saad 2003, Alg. 6.9).
  A cycle ends after m products, at the estimate's tolerance, or at the end
  of the budget, with one evaluation of h at x_k (the exact residual).

  Memory: the basis is [B, m+1, D].

  Args:
    h: the affine map (batched pytree -> pytree).
    u0: initial point.
    max_iter: evaluations of h, h(u0) and the residual checks included.
    tol, stop_mode, unroll: see `jreg.deq.SolverConfig`.
    restart: m, Krylov vectors per cycle; None: max(max_iter - 2, 1), i.e.
      no restart within the budget.

  Returns:
    (u, SolverStats).
  """
  m = max(max_iter - 2, 1) if restart is None else restart
  if m < 1:
    raise ValueError(f'GMRES needs restart >= 1, got {m}.')
  return _affine_solve(h, u0, max_iter, tol, stop_mode, unroll,
                       _gmres_method(m))


# ------------------------------------------------------------- BiCGStab


class _BicgstabState(NamedTuple):
  x: jax.Array       # [B, D] current iterate (x_k, or x_k + alpha p_k)
  r: jax.Array       # [B, D] its recursive residual (r_k, or s_k)
  r_hat: jax.Array   # [B, D] shadow residual (the restart's r)
  p: jax.Array       # [B, D] search direction
  v: jax.Array       # [B, D] A p
  rho: jax.Array     # [B] (r_hat, r_k)
  alpha: jax.Array   # [B]
  half: jax.Array    # bool [B]: A p is done, A s comes next
  j: jax.Array       # int32 [B] products since the restart
  broken: jax.Array  # bool [B] a denominator vanished


def _bicgstab_method(shape, acc):
  """BiCGStab (van der Vorst, 1992; Saad 2003, Alg. 7.7), one product a step."""
  del shape

  def restart(x, r):
    zeros = jnp.zeros_like(r)
    false = jnp.zeros(r.shape[:1], bool)
    return _BicgstabState(x=x, r=r, r_hat=r, p=r, v=zeros, rho=_dot(r, r),
                          alpha=jnp.zeros(r.shape[:1], acc), half=false,
                          j=jnp.zeros(r.shape[:1], jnp.int32), broken=false)

  def absorb(st, ad):
    # First half: v = A p, alpha = rho / (r_hat, v), s = r - alpha v.
    rv = _dot(st.r_hat, ad)
    alpha = _safe_div(st.rho, rv)
    first = st._replace(x=st.x + alpha[:, None] * st.p,
                        r=st.r - alpha[:, None] * ad, v=ad, alpha=alpha,
                        half=jnp.ones_like(st.half), broken=rv == 0)
    # Second half: t = A s, omega = (t, s) / (t, t), x += omega s,
    # r = s - omega t, beta = (rho' / rho)(alpha / omega),
    # p = r + beta (p - omega v).
    s = st.r
    tt = _dot(ad, ad)
    omega = _safe_div(_dot(ad, s), tt)
    r = s - omega[:, None] * ad
    rho = _dot(st.r_hat, r)
    beta = _safe_div(rho, st.rho) * _safe_div(st.alpha, omega)
    second = st._replace(x=st.x + omega[:, None] * s, r=r,
                         p=r + beta[:, None] * (st.p - omega[:, None] * st.v),
                         rho=rho, half=jnp.zeros_like(st.half),
                         broken=(omega == 0) | (rho == 0))
    out = _select_rows(st.half, second, first)
    return out._replace(j=st.j + 1)

  return _Method(
      restart, current=lambda st: (st.x, st.r),
      direction=lambda st: jnp.where(st.half[:, None], st.r, st.p),
      absorb=absorb, fresh=lambda st: st.j == 0,
      stalled=lambda st: st.broken)


def bicgstab(h: Callable[[PyTree], PyTree], u0: PyTree, *, max_iter: int = 30,
             tol: float = 1e-3, stop_mode: str = 'rel', unroll: bool = False):
  """BiCGStab for the fixed point u = h(u) of an affine h.

  Solves (I - L) u = h(0) for h(u) = L u + b (module docstring). From x_0,
  r_0 = h(x_0) - x_0, r_hat = r_0, p_0 = r_0, each iteration takes two
  products: v = A p, alpha = (r_hat, r) / (r_hat, v), s = r - alpha v;
  t = A s, omega = (t, s) / (t, t), x += alpha p + omega s, r = s - omega t,
  p = r + (rho' / rho)(alpha / omega)(p - omega v) (van der Vorst, 1992;
  Saad 2003, Alg. 7.7). Both x + alpha p (residual s) and the full step are
  iterates whose recursive residual is checked against tol. A vanishing
  denominator (breakdown) restarts the method from the exact residual.

  Args:
    h: the affine map (batched pytree -> pytree).
    u0: initial point.
    max_iter: evaluations of h, h(u0) and the residual checks included.
    tol, stop_mode, unroll: see `jreg.deq.SolverConfig`.

  Returns:
    (u, SolverStats).
  """
  return _affine_solve(h, u0, max_iter, tol, stop_mode, unroll,
                       _bicgstab_method)


solvers.register_solver('gmres', lambda f, z0, config: gmres(
    f, z0, max_iter=config.max_iter, tol=config.tol,
    stop_mode=config.stop_mode, restart=config.restart, unroll=config.unroll),
                        affine_only=True)
solvers.register_solver('bicgstab', lambda f, z0, config: bicgstab(
    f, z0, max_iter=config.max_iter, tol=config.tol,
    stop_mode=config.stop_mode, unroll=config.unroll), affine_only=True)
