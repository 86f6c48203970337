"""Reversible fixed-point solves: exact gradients of the solve, O(1) memory.

McCallum, Arora & Foster, "Reversible Deep Equilibrium Models" (RevDEQ),
arXiv:2509.12917, 2025 (reference code: sammccallum/reversible-deq,
`reversible_deq/_solver/reversible.py` and `_adjoint.py`). Two coupled states,
relaxation beta:

  forward:   y_{n+1} = (1 - beta) y_n + beta f(z_n, x)
             z_{n+1} = (1 - beta) z_n + beta f(y_{n+1}, x),   y_0 = z_0;
  backward:  z_n = (z_{n+1} - beta f(y_{n+1}, x)) / (1 - beta)
             y_n = (y_{n+1} - beta f(z_n, x)) / (1 - beta).

The forward step is algebraically invertible, so the backward pass rebuilds
the iterates in reverse from the last pair and backpropagates through each
step as it goes: the gradient is the exact gradient of the n steps taken (not
the implicit-function-theorem approximation at an approximate fixed point),
and nothing per step is stored. beta must lie in (0, 2) and differ from 1
(the inverse divides by 1 - beta).

One sequence. With u_{-1} = u_0 = z_0 the two updates are one two-term
recurrence,

  u_{k+1} = (1 - beta) u_{k-1} + beta f(u_k),   y_n = u_{2n-1}, z_n = u_{2n},

with one evaluation of f per step. The solver runs it with the stopping rule,
residuals and "keep the best iterate" of `jreg.deq.solvers` (module
docstring there): f(u_k) is evaluated once and serves both the residual of
u_k and the next step; nfe = k + 1 after k steps (f(u_0) included), and with
tol = 0 and max_iter = 2N + 1 the solve returns the paper's z_N. The checks
run after every evaluation, so a solve may also end on a y-iterate.

Backward (per example b, from the returned u_{k*_b}): with the pair
(a_k, b_k) = (u_{k-1}, u_k) and its cotangents (abar_k, bbar_k), starting at
bbar = dl/du_{k*}, abar = 0, each reverse step k -> k - 1 evaluates one VJP
of f at u_{k-1},

  (f(u_{k-1}), vjp) = vjp of f at u_{k-1},
  u_{k-2} = (u_k - beta f(u_{k-1})) / (1 - beta),
  abar_{k-1} = (1 - beta) bbar_k,
  bbar_{k-1} = abar_k + beta J_f(u_{k-1})^T bbar_k,
  dl/dtheta += beta (df/dtheta at u_{k-1})^T bbar_k   (and likewise for x).

The forward keeps only the best pair (u_{k*-1}, u_{k*}) and k* per example;
the backward is one `lax.while_loop` of max_b k*_b steps (examples whose k*
is smaller wait, at zero cotangent, until the loop reaches their k*). Cost:
one VJP per forward evaluation, i.e. backprop through the unrolled solve plus
one recomputed forward evaluation of f per step; memory independent of the
number of steps.

Numerics: a reverse step expands rounding errors by the factor the forward
step contracts them, so the rebuilt early states lose about
eps * (residual reduction of the solve); the gradient stays exact to rounding
because the cotangent reaching step k decays at the same rate (docs/deq.md,
Reversible DEQs, has the measured figures).

Backward statistics through the stats probe (see `jreg.deq.implicit`):
[VJPs = max_b k*_b (max_iter - 1 when unrolled),
mean ||(u_{-1}, u_0)_rebuilt - (z_0, z_0)|| (the reconstruction error of the
initial pair), the same divided by ||(u_{k*-1}, u_{k*})|| + 1e-8, 1].
"""
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jreg.deq import implicit
from jreg.deq import solvers

PyTree = Any
# The residuals, best-iterate record and stopping test shared with the solvers.
# pylint: disable=protected-access
_Best, _residuals, _converged = (solvers._Best, solvers._residuals,
                                 solvers._converged)
_check_budget, _EPS = solvers._check, solvers._EPS
# pylint: enable=protected-access


def check_beta(beta: float, name: str = 'beta') -> None:
  """Raises ValueError unless 0 < beta < 2 and beta != 1."""
  if not (0.0 < beta < 2.0 and beta != 1.0):
    raise ValueError(f'{name} (the reversible relaxation beta) must lie in '
                     f'(0, 2) and differ from 1, got {beta}.')


class _State(NamedTuple):
  u_prev: jax.Array         # [B, D] u_{k-1}
  u: jax.Array              # [B, D] u_k
  fu: jax.Array             # [B, D] f(u_k)
  best: Any                 # _Best: lowest-residual u_{k*} and its residuals
  best_prev: jax.Array      # [B, D] u_{k*-1}
  best_k: jax.Array         # int32 [B] k*
  nfe: jax.Array            # int32 []: k + 1


def _solve_flat(ff, u0, beta, max_iter, tol, stop_mode, unroll):
  """Runs the recurrence on rows [B, D]; returns (_State, SolverStats)."""
  fu0 = ff(u0)
  abs0, rel0 = _residuals(fu0, u0)
  state = _State(u0, u0, fu0, _Best(u0, abs0, rel0), u0,
                 jnp.zeros(u0.shape[:1], jnp.int32), jnp.asarray(1, jnp.int32))

  def step(s: _State) -> _State:
    u = (1.0 - beta) * s.u_prev + beta * s.fu
    fu = ff(u)
    abs_res, rel_res = _residuals(fu, u)
    if stop_mode == 'abs':
      better = abs_res < s.best.abs_res
    else:
      better = rel_res < s.best.rel_res
    rows = better[:, None]
    best = _Best(jnp.where(rows, u, s.best.z),
                 jnp.where(better, abs_res, s.best.abs_res),
                 jnp.where(better, rel_res, s.best.rel_res))
    return _State(s.u, u, fu, best, jnp.where(rows, s.u, s.best_prev),
                  jnp.where(better, s.nfe, s.best_k), s.nfe + 1)

  def converged(s: _State):
    return _converged(s.best, tol, stop_mode)

  if unroll:
    for _ in range(max_iter - 1):
      state = step(state)
  else:
    state = lax.while_loop(
        lambda s: (s.nfe < max_iter) & ~jnp.all(converged(s)), step, state)
  stats = solvers.SolverStats(nfe=state.nfe, abs_residual=state.best.abs_res,
                              rel_residual=state.best.rel_res,
                              converged=converged(state))
  return state, stats


def reversible_iteration(f: Callable[[PyTree], PyTree], z0: PyTree, *,
                         max_iter: int = 30, tol: float = 1e-3,
                         stop_mode: str = 'rel', beta: float = 0.8,
                         unroll: bool = False):
  """Reversible fixed-point solver: two coupled relaxed states (see module).

  Args:
    f: the map, batched pytree -> pytree of the same structure.
    z0: initial point (y_0 = z_0).
    max_iter, tol, stop_mode, unroll: see `jreg.deq.SolverConfig`.
    beta: relaxation in (0, 2), not 1 (`SolverConfig.damping`).

  Returns:
    (z, SolverStats) with z the lowest-residual evaluated iterate. Plain
    autodiff through this function stores every step; use
    `reversible_fixed_point` (or `BackwardConfig(mode='reversible')`) for the
    O(1)-memory exact backward.
  """
  _check_budget(max_iter, stop_mode)
  check_beta(beta)
  flat0, unflatten = solvers.flatten_batch(z0)
  ff = lambda u: solvers.flatten_batch(f(unflatten(u)))[0]
  state, stats = _solve_flat(ff, flat0, beta, max_iter, tol, stop_mode, unroll)
  return unflatten(state.best.z), stats


def _check_forward(forward: solvers.SolverConfig) -> None:
  if forward.name != 'reversible':
    raise ValueError("Backward mode 'reversible' needs the forward solver "
                     "'reversible' (SolverConfig(name='reversible', "
                     f"damping=beta)), got {forward.name!r}.")
  _check_budget(forward.max_iter, forward.stop_mode)
  check_beta(forward.damping, 'SolverConfig.damping')


def _split_inexact(tree):
  """Float leaves of a pytree, and functions to rebuild the tree from them.

  Returns (leaves, rebuild(leaves) -> tree with the other leaves as they
  are, cotangent(leaves) -> tree with float0 zeros for the other leaves).
  """
  leaves, treedef = jax.tree.flatten(tree)
  inexact = [jnp.issubdtype(jnp.result_type(l), jnp.inexact) for l in leaves]
  diff = [l for l, keep in zip(leaves, inexact) if keep]

  def rebuild(new):
    new = iter(new)
    return jax.tree.unflatten(
        treedef, [next(new) if keep else l for l, keep in zip(leaves, inexact)])

  def cotangent(new):
    new = iter(new)
    return jax.tree.unflatten(treedef, [
        next(new) if keep else np.zeros(np.shape(l), jax.dtypes.float0)
        for l, keep in zip(leaves, inexact)])

  return diff, rebuild, cotangent


def _forward(cell, forward, params, x, z0):
  flat0, unflatten = solvers.flatten_batch(lax.stop_gradient(z0))
  ff = lambda u: solvers.flatten_batch(cell(params, unflatten(u), x))[0]
  state, stats = _solve_flat(ff, flat0, forward.damping, forward.max_iter,
                             forward.tol, forward.stop_mode, forward.unroll)
  return unflatten(state.best.z), stats, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible_fixed_point(cell, forward, params, x, z0, stats_probe):
  del stats_probe
  z, stats, _ = _forward(cell, forward, params, x, z0)
  return z, stats


def _reversible_fixed_point_fwd(cell, forward, params, x, z0, stats_probe):
  z, stats, state = _forward(cell, forward, params, x, z0)
  # O(1) in the number of steps: the best pair and its index, no trajectory.
  residuals = (params, x, z0, state.best_prev, state.best.z, state.best_k,
               stats_probe)
  return (z, stats), residuals


def _reversible_fixed_point_bwd(cell, forward, residuals, cotangents):
  params, x, z0, a_best, b_best, k_best, stats_probe = residuals
  beta = forward.damping
  flat0, unflatten = solvers.flatten_batch(z0)
  g, _ = solvers.flatten_batch(cotangents[0])   # dl/du_{k*}: [B, D]
  g = g.astype(b_best.dtype)
  p_diff, p_rebuild, p_cotangent = _split_inexact(params)
  x_diff, x_rebuild, x_cotangent = _split_inexact(x)

  def f(p, u, xx):
    return solvers.flatten_batch(
        cell(p_rebuild(p), unflatten(u), x_rebuild(xx)))[0]

  def body(carry):
    k, a, b, abar, bbar, gp, gx = carry   # (a, b) = (u_{k-1}, u_k)
    fa, vjp = jax.vjp(f, p_diff, a, x_diff)
    dp, da, dx = vjp(beta * bbar)
    live = (k - 1 < k_best)[:, None]      # rows whose k* >= k
    start = (k - 1 == k_best)[:, None]    # rows whose backward starts now
    a_new = jnp.where(live, (b - beta * fa) / (1.0 - beta), a_best)
    b_new = jnp.where(live, a, b_best)
    abar_new = jnp.where(live, (1.0 - beta) * bbar, 0.0)
    bbar_new = jnp.where(live, abar + da, jnp.where(start, g, 0.0))
    gp = jax.tree.map(jnp.add, gp, dp)
    gx = jax.tree.map(jnp.add, gx, dx)
    return k - 1, a_new, b_new, abar_new, bbar_new, gp, gx

  # Unrolled: a fixed count of reverse steps (examples wait until their k*).
  k_start = (jnp.asarray(forward.max_iter - 1, jnp.int32) if forward.unroll
             else jnp.max(k_best))
  carry = (k_start, a_best, b_best, jnp.zeros_like(g),
           jnp.where((k_best == k_start)[:, None], g, 0.0),
           jax.tree.map(jnp.zeros_like, p_diff),
           jax.tree.map(jnp.zeros_like, x_diff))
  if forward.unroll:
    for _ in range(forward.max_iter - 1):
      carry = body(carry)
  else:
    carry = lax.while_loop(lambda c: c[0] > 0, body, carry)
  _, a0, b0, _, _, gp, gx = carry

  error = jnp.sqrt(jnp.sum((a0 - flat0) ** 2, -1) +
                   jnp.sum((b0 - flat0) ** 2, -1))               # [B]
  scale = jnp.sqrt(jnp.sum(a_best ** 2, -1) + jnp.sum(b_best ** 2, -1))
  bstats = solvers.SolverStats(
      nfe=k_start,
      abs_residual=error, rel_residual=error / (scale + _EPS),
      converged=jnp.ones_like(k_best, bool))
  probe_ct = implicit.stats_probe_values(bstats).astype(stats_probe.dtype)
  return (p_cotangent(gp), x_cotangent(gx), jax.tree.map(jnp.zeros_like, z0),
          probe_ct)


_reversible_fixed_point.defvjp(_reversible_fixed_point_fwd,
                               _reversible_fixed_point_bwd)


def reversible_fixed_point(cell: Callable[[PyTree, PyTree, PyTree], PyTree],
                           params: PyTree, x: PyTree, z0: PyTree, *,
                           forward: solvers.SolverConfig,
                           stats_probe: Optional[jax.Array] = None):
  """Solves z* = cell(params, z*, x) with the reversible solver; exact backward.

  Same conventions as `jreg.deq.fixed_point` (which calls this for
  `BackwardConfig(mode='reversible')`): gradients flow to params and the
  float leaves of x, none to z0.

  Args:
    cell: pure function (params, z, x) -> z-like pytree; batched over axis 0.
    params: the cell's parameters.
    x: the cell's other inputs.
    z0: initial point (y_0 = z_0).
    forward: `SolverConfig(name='reversible', damping=beta, ...)`.
    stats_probe: optional float32 [4]; its gradient is the backward stats
      (module docstring).

  Returns:
    (z, SolverStats of the forward solve).
  """
  _check_forward(forward)
  if stats_probe is None:
    stats_probe = jnp.zeros((implicit.STATS_PROBE_SIZE,), jnp.float32)
  return _reversible_fixed_point(cell, forward, params, x, z0, stats_probe)


solvers.register_solver('reversible', lambda f, z0, config: reversible_iteration(
    f, z0, beta=config.damping, max_iter=config.max_iter, tol=config.tol,
    stop_mode=config.stop_mode, unroll=config.unroll))
