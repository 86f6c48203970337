"""Batched fixed-point solvers: fixed-point iteration, Anderson, Broyden.

Every solver finds z* with z* = f(z*) for a batch of independent problems. The
state z is any pytree whose leaves share a leading batch axis B. Fixed-point
iteration and Anderson work on one array of rows per example, `[B, N, C]`
(`flatten_rows`): C is the state's last axis (channels, features) when every
leaf ends in the same C, else the flat example `[B, D]`. Keeping
the channel axis innermost matters on CPU: XLA fuses the cell's last
elementwise ops (a normalisation's per-channel scale and shift) into the
solver's updates, and over a flat `[B, D]` view it must recover the channel
of every element by division, which made those fused updates about 3x
slower (BUILD_NOTES.md, DEQ training speed). Broyden, the public helpers and
user solvers work on the flat `[B, D]` matrix of `flatten_batch`.

Residuals are measured per example at every evaluated point z:

  abs residual  r_abs(z) = ||f(z) - z||_2
  rel residual  r_rel(z) = ||f(z) - z||_2 / (||f(z)||_2 + 1e-8)

(the definitions of locuslab/deq `lib/solvers.py` and locuslab/torchdeq
`torchdeq/solver/`). An example has *converged* once the residual chosen by
`stop_mode` ('abs' or 'rel') of its best point is <= `tol`.

Stopping rule for a batch: iterate while `nfe < max_iter` and **not all**
examples have converged; i.e. the batch stops when every example converged or
the evaluation budget is spent. Examples that converged early keep iterating
with the rest of the batch (that costs nothing extra in a batched evaluation),
and for every example the lowest-residual point seen is returned ("keep the
best iterate", as in the reference solvers). The returned point is a point at
which f was evaluated, so `SolverStats.abs_residual` / `rel_residual` are its
exact residuals. `nfe` counts evaluations of f, including the one at z0.

With `unroll=True` the loop is written out as straight-line code for exactly
`max_iter` evaluations (no `lax.while_loop`, no early stop; `tol` then only
decides the `converged` flag). This exists because XLA:CPU runs some ops
(convolution gradients) much slower inside while loops; see BUILD_NOTES.md (DEQ layers).

Solvers are looked up by name in a registry (`register_solver`,
`registered_solvers`, `get_solver`); `solve` dispatches through it. A solver
is a function `solve_fn(f, z0, config) -> (z, SolverStats)`;
`fixed_point_loop` gives a user's solver this module's stopping rule and
statistics. Solvers registered with `affine_only=True` (the Krylov methods of
`jreg.deq.krylov`) are valid only for affine maps, such as the backward
system of the implicit function theorem.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg
from jax import lax

PyTree = Any
_EPS = 1e-8


class SolverStats(NamedTuple):
  """What a solve did. Per-example fields have shape [B]."""
  nfe: jax.Array           # int32 []: evaluations of f (including f(z0))
  abs_residual: jax.Array  # float [B]: ||f(z) - z|| at the returned z
  rel_residual: jax.Array  # float [B]: ||f(z) - z|| / (||f(z)|| + 1e-8)
  converged: jax.Array     # bool [B]: residual (by stop_mode) <= tol

  @property
  def mean_abs_residual(self) -> jax.Array:
    return jnp.mean(self.abs_residual)

  @property
  def mean_rel_residual(self) -> jax.Array:
    return jnp.mean(self.rel_residual)

  @property
  def converged_fraction(self) -> jax.Array:
    return jnp.mean(self.converged.astype(jnp.float32))

  @property
  def all_converged(self) -> jax.Array:
    return jnp.all(self.converged)

  def as_metrics(self, prefix: str = '') -> dict:
    """Flat dict of scalars: nfe, mean residuals, converged fraction/count."""
    return {
        f'{prefix}nfe': self.nfe.astype(jnp.float32),
        f'{prefix}abs_residual': self.mean_abs_residual,
        f'{prefix}rel_residual': self.mean_rel_residual,
        f'{prefix}converged_fraction': self.converged_fraction,
        f'{prefix}unconverged': jnp.sum(
            (~self.converged).astype(jnp.float32)),
    }


class SolverConfig(NamedTuple):
  """Hashable settings of one solve (usable as a static argument).

  Attributes:
    name: a registered solver: 'fixed_point' | 'anderson' | 'broyden' |
      'reversible' (`jreg.deq.reversible`; its relaxation beta is
      `damping`) | 'gmres' | 'bicgstab' (the last two for affine maps only)
      or a name added by `register_solver`.
    max_iter: the evaluation budget (max NFE), >= 1.
    tol: tolerance on the residual chosen by `stop_mode`; 0 runs the budget out.
    stop_mode: 'abs' or 'rel' (see module docstring).
    history: Anderson history size m.
    ridge: Anderson Tikhonov term lambda (> 0).
    ridge_relative: scale lambda by the mean of the diagonal of G G^T
      (scale-free, as SciPy's `anderson` w0); False adds lambda as it is, as
      locuslab/deq and torchdeq do.
    damping: Anderson beta / fixed-point step tau:
      z <- (1 - tau) z + tau f(z).
    broyden_rank: number of low-rank Broyden updates kept (oldest replaced);
      None keeps all (max_iter), as locuslab/deq does.
    unroll: straight-line loop of exactly max_iter evaluations (see above).
    restart: GMRES restart length m (Krylov vectors per cycle); None: as
      many as the budget allows (max_iter - 2).
    on_unconverged: what a DEQ layer (`jreg.deq.fixed_point`, `DEQ`) does
      when this solve ends with examples above `tol` (`tol > 0`): 'warn'
      (a `jreg.deq.ConvergenceWarning` at run time), 'raise' (a
      `jreg.deq.ConvergenceError`; under `jax.jit` the runtime hands it on
      as `jax.errors.JaxRuntimeError` with the same sentence) or 'ignore'.
      The solvers themselves (`solve`, ...) only return the statistics.
  """
  name: str = 'anderson'
  max_iter: int = 30
  tol: float = 1e-3
  stop_mode: str = 'rel'
  history: int = 5
  ridge: float = 1e-4
  damping: float = 1.0
  broyden_rank: Optional[int] = None
  unroll: bool = False
  ridge_relative: bool = True
  restart: Optional[int] = None
  on_unconverged: str = 'warn'


ON_UNCONVERGED = ('warn', 'raise', 'ignore')


def flatten_batch(tree: PyTree):
  """Flattens a pytree of [B, ...] leaves into [B, D]; returns (flat, unflatten)."""
  return _flatten(tree, rows_of=None)


def flatten_rows(tree: PyTree):
  """Flattens a pytree of [B, ...] leaves into rows [B, N, C]; (rows, unflatten).

  If every leaf has ndim >= 2 and they share the last dimension C, the leaves
  are reshaped to [B, N_i, C] and concatenated along N; otherwise the rows
  are the flat examples, [B, D], as `flatten_batch` gives them (a [B, 1, D]
  view instead doubled the MDEQ's solver memory: XLA copied Broyden's
  history to reconcile the two layouts). Either way `rows.reshape(B, -1)`
  equals `flatten_batch(tree)[0]` (row-major order is the same), and for one
  leaf both are reshapes of it, not copies.
  """
  leaves = jax.tree.leaves(tree)
  channels = {l.shape[-1] for l in leaves if l.ndim >= 2}
  shared = len(channels) == 1 and all(l.ndim >= 2 for l in leaves)
  return _flatten(tree, rows_of=channels.pop() if shared else None)


def _flatten(tree: PyTree, rows_of: Optional[int]):
  """Leaves reshaped to [B, -1] (rows_of None) or [B, -1, rows_of] and
  concatenated along axis 1, in the promoted dtype; (array, unflatten)."""
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    raise ValueError('The fixed-point state z has no array leaves.')
  batch = leaves[0].shape[0] if leaves[0].ndim else None
  for leaf in leaves:
    if leaf.ndim == 0 or leaf.shape[0] != batch:
      raise ValueError('Every leaf of the fixed-point state must have the same '
                       f'leading batch axis; got shapes {[l.shape for l in leaves]}.')
  row = () if rows_of is None else (rows_of,)
  shapes = [l.shape for l in leaves]
  dtypes = [l.dtype for l in leaves]
  dtype = jnp.result_type(*dtypes)
  parts = [l.reshape((batch, -1) + row).astype(dtype) for l in leaves]
  sizes = [p.shape[1] for p in parts]
  flat = jnp.concatenate(parts, axis=1)

  def unflatten(flat_z):
    out, start = [], 0
    for shape, dt, size in zip(shapes, dtypes, sizes):
      out.append(flat_z[:, start:start + size].reshape(shape).astype(dt))
      start += size
    return jax.tree.unflatten(treedef, out)

  return flat, unflatten


def _features(x):
  """The non-batch axes of x: what a per-example sum runs over."""
  return tuple(range(1, x.ndim))


def _per_example(v, like):
  """v [B] reshaped to broadcast against `like` [B, ...]."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _accumulation_dtype(dtype):
  """float32 for low-precision states, else the state's own float type."""
  return jnp.promote_types(dtype, jnp.float32)


def _residuals(fz, z):
  """Per-example abs and rel residuals of rows ([B, ...]): [B] each."""
  acc = _accumulation_dtype(fz.dtype)
  norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(acc)), _features(x)))
  abs_res = norm(fz - z)
  rel_res = abs_res / (norm(fz) + _EPS)
  return abs_res, rel_res


class _Best(NamedTuple):
  z: jax.Array        # [B, N, C] lowest-residual point so far
  abs_res: jax.Array  # [B]
  rel_res: jax.Array  # [B]


def _update_best(best: _Best, z, fz, stop_mode) -> _Best:
  abs_res, rel_res = _residuals(fz, z)
  if stop_mode == 'abs':
    new, old = abs_res, best.abs_res
  else:
    new, old = rel_res, best.rel_res
  better = new < old  # [B]; NaN residuals never replace a finite best
  return _Best(jnp.where(_per_example(better, z), z, best.z),
               jnp.where(better, abs_res, best.abs_res),
               jnp.where(better, rel_res, best.rel_res))


def _init_best(z, fz) -> _Best:
  abs_res, rel_res = _residuals(fz, z)
  return _Best(z, abs_res, rel_res)


def _converged(best: _Best, tol, stop_mode):
  res = best.abs_res if stop_mode == 'abs' else best.rel_res
  return res <= tol


def _run(init, step, max_iter, tol, stop_mode, unroll, record=()):
  """Drives a solver loop.

  `init()` -> (carry, best, nfe); `step(carry, best)` does one evaluation of f.
  With `record` (static tuple of evaluation counts) also returns the states
  recorded by `_Recorder`; with `record=()` the traced program is unchanged.
  """
  carry, best, nfe = init()
  recorder = _Recorder(record, max_iter, best.z) if record else None
  if recorder:
    recorder.write(nfe, best)
  if unroll:
    for k in range(nfe, max_iter):
      carry, best = step(carry, best)
      if recorder:
        recorder.write(k + 1, best)
    nfe_out = jnp.asarray(max(max_iter, nfe), jnp.int32)
  else:
    def cond(state):
      _, best, k = state[:3]
      return (k < max_iter) & ~jnp.all(_converged(best, tol, stop_mode))

    def body(state):
      carry, best, k = state[:3]
      carry, best = step(carry, best)
      if recorder:
        recorder.buffer = state[3]
        recorder.write(k + 1, best)
        return carry, best, k + 1, recorder.buffer
      return carry, best, k + 1

    state = (carry, best, jnp.asarray(nfe, jnp.int32))
    if recorder:
      state += (recorder.buffer,)
    state = lax.while_loop(cond, body, state)
    carry, best, nfe_out = state[:3]
    if recorder:
      recorder.buffer = state[3]
  stats = SolverStats(nfe=nfe_out, abs_residual=best.abs_res,
                      rel_residual=best.rel_res,
                      converged=_converged(best, tol, stop_mode))
  if recorder:
    return best.z, stats, recorder.finish(nfe_out, best)
  return best.z, stats


class _Recorder:
  """The solver's point after given numbers of evaluations, in a fixed buffer.

  Slot j holds `best.z` (the point the solver returns: the lowest-residual
  evaluated point so far) once the evaluation count equals `record[j]`, i.e.
  exactly what the same solver run with `max_iter=record[j]` returns; as in
  torchdeq's `indexing` (locuslab/torchdeq `torchdeq/solver/fp_iter.py`).
  Counts the loop never reached (the batch converged earlier) are filled
  with the final point, which is again what a run with that budget returns.
  """

  def __init__(self, record, max_iter, z):
    if any(not 1 <= k <= max_iter for k in record):
      raise ValueError(f'recorded evaluation counts must lie in [1, max_iter='
                       f'{max_iter}]; got {record}.')
    self.record = tuple(int(k) for k in record)
    self.buffer = jnp.zeros((len(record),) + z.shape, z.dtype)  # [n, B, ...]

  def write(self, k, best):
    if isinstance(k, int):  # unrolled loop: the count is static
      for j, index in enumerate(self.record):
        if index == k:
          self.buffer = self.buffer.at[j].set(best.z)
    else:
      hit = jnp.asarray(self.record, jnp.int32) == k  # [n]
      self.buffer = jnp.where(_per_example(hit, self.buffer), best.z[None],
                              self.buffer)

  def finish(self, nfe, best):
    unreached = jnp.asarray(self.record, jnp.int32) > nfe  # [n]
    return jnp.where(_per_example(unreached, self.buffer), best.z[None],
                     self.buffer)


def _check(max_iter, stop_mode):
  if max_iter < 1:
    raise ValueError(f'max_iter must be >= 1, got {max_iter}.')
  if stop_mode not in ('abs', 'rel'):
    raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}.")


def _unflatten_outputs(out, unflatten):
  """(z, stats[, states [n, B, D]]) of `_run` with z and states as pytrees."""
  if len(out) == 2:
    return unflatten(out[0]), out[1]
  z, stats, states = out
  return unflatten(z), stats, tuple(unflatten(s) for s in states)


def fixed_point_iteration(f: Callable[[PyTree], PyTree], z0: PyTree, *,
                          max_iter: int = 30, tol: float = 1e-3,
                          stop_mode: str = 'rel', damping: float = 1.0,
                          unroll: bool = False, record: tuple = ()):
  """Damped fixed-point (Picard) iteration z_{k+1} = (1 - tau) z_k + tau f(z_k).

  Args:
    f: the map, pytree -> pytree of the same structure (batched).
    z0: initial point.
    max_iter, tol, stop_mode, unroll: see `SolverConfig`.
    damping: tau in (0, 1].
    record: evaluation counts at which to record the solver's point (see
      `solve`).

  Returns:
    (z, SolverStats) with z the lowest-residual evaluated point; with
    `record`, (z, SolverStats, recorded states).
  """
  _check(max_iter, stop_mode)
  flat0, unflatten = flatten_rows(z0)
  ff = lambda z: flatten_rows(f(unflatten(z)))[0]

  def init():
    fz = ff(flat0)
    z_init = flat0
    return (z_init, fz), _init_best(z_init, fz), 1

  def step(carry, best):
    z, fz = carry
    z = (1.0 - damping) * z + damping * fz
    fz = ff(z)
    return (z, fz), _update_best(best, z, fz, stop_mode)

  out = _run(init, step, max_iter, tol, stop_mode, unroll, record)
  return _unflatten_outputs(out, unflatten)


def anderson(f: Callable[[PyTree], PyTree], z0: PyTree, *, max_iter: int = 30,
             tol: float = 1e-3, stop_mode: str = 'rel', history: int = 5,
             ridge: float = 1e-4, damping: float = 1.0, unroll: bool = False,
             ridge_relative: bool = True, record: tuple = ()):
  """Anderson acceleration (type II), as locuslab/deq `anderson`.

  With G_i = f(z_i) - z_i over the last n = min(k, m) points, solve

    min_alpha ||sum_i alpha_i G_i||^2 + lambda ||alpha||^2  s.t. sum_i alpha_i = 1

  via the bordered system [[0, 1^T], [1, G G^T + lambda I]] [nu; alpha] = [1; 0]
  (solved in closed form, `_anderson_weights`), then
  z_{k+1} = beta sum_i alpha_i f(z_i) + (1 - beta) sum_i alpha_i z_i
  (Walker & Ni, 2011; Bai et al., 2019, DEQ). Unfilled history slots are
  masked out of the system (their alpha is exactly 0), so the first step is a
  damped fixed-point step and the solve is fixed-size and jit-able.

  Deviation (default `ridge_relative=True`): the reference adds lambda I as
  is; once ||G||^2 << lambda (small states, tight tolerances) that term
  dominates, alpha tends to uniform weights and Anderson becomes slower than
  plain iteration (measured: 39 vs 24 evaluations on a 5-d linear map to
  rel. tol 1e-5). Scaling lambda by mean_i ||G_i||^2 keeps the method
  scale-invariant. `ridge_relative=False` reproduces the reference.

  Args:
    f: the map (batched pytree -> pytree).
    z0: initial point.
    history: m.
    ridge: lambda > 0.
    damping: beta.
    ridge_relative: lambda relative to mean diag(G G^T) (see above).
    max_iter, tol, stop_mode, unroll: see `SolverConfig`.
    record: evaluation counts at which to record the point (see `solve`).

  Returns:
    (z, SolverStats), and the recorded states with `record`.
  """
  _check(max_iter, stop_mode)
  if history < 1 or not ridge > 0:
    raise ValueError('Anderson needs history >= 1 and ridge > 0.')
  flat0, unflatten = flatten_rows(z0)
  ff = lambda z: flatten_rows(f(unflatten(z)))[0]
  batch, features = flat0.shape[0], flat0.shape[1:]   # [N, C]
  m = history
  acc = _accumulation_dtype(flat0.dtype)  # dtype of the small m x m system

  def init():
    fz = ff(flat0)
    z_init = flat0
    g = fz - z_init
    zeros = jnp.zeros((batch, m) + features, z_init.dtype)
    fs = zeros.at[:, 0].set(fz)                                   # [B, m, N, C]
    gs = zeros.at[:, 0].set(g)                                    # [B, m, N, C]
    g32 = g.astype(acc)
    gram = jnp.zeros((batch, m, m), acc).at[:, 0, 0].set(
        jnp.sum(g32 * g32, axis=_features(g32)))                    # [B, m, m]
    return (fs, gs, gram, jnp.asarray(1, jnp.int32)), _init_best(z_init, fz), 1

  def step(carry, best):
    fs, gs, gram, k = carry
    valid = (jnp.arange(m) < jnp.minimum(k, m)).astype(acc)  # [m]
    if ridge_relative:
      diag = jnp.diagonal(gram, axis1=1, axis2=2)                      # [B, m]
      scale = jnp.sum(diag * valid, -1) / jnp.sum(valid) + 1e-30       # [B]
      regulariser = ridge * scale[:, None, None] * jnp.eye(m)
    else:
      regulariser = ridge * jnp.eye(m)
    alpha = _anderson_weights(gram + regulariser, valid).astype(flat0.dtype)
    # sum_i alpha_i z_i = sum_i alpha_i (f(z_i) - G_i), so only F and G are kept.
    z = jnp.einsum('bi,bi...->b...', alpha, fs)
    if damping != 1.0:
      z = z - (1.0 - damping) * jnp.einsum('bi,bi...->b...', alpha, gs)
    fz = ff(z)
    g = fz - z
    slot = k % m
    # Only the new row/column of the Gram matrix G G^T changes: <G_i, g>
    # against the history before the update (so that XLA reads the history
    # once and then updates it in place, measured: two fewer copies of G per
    # iteration), and <g, g> in the slot that g replaces.
    g32 = g.astype(acc)
    row = jnp.einsum('bi...,b...->bi', gs.astype(acc), g32)          # [B, m]
    row = lax.dynamic_update_index_in_dim(
        row, jnp.sum(g32 * g32, axis=_features(g32))[:, None], slot, axis=1)
    fs = lax.dynamic_update_index_in_dim(fs, fz, slot, axis=1)
    gs = lax.dynamic_update_index_in_dim(gs, g, slot, axis=1)
    gram = lax.dynamic_update_index_in_dim(gram, row[:, None, :], slot, axis=1)
    gram = lax.dynamic_update_index_in_dim(gram, row[:, :, None], slot, axis=2)
    return (fs, gs, gram, k + 1), _update_best(best, z, fz, stop_mode)

  out = _run(init, step, max_iter, tol, stop_mode, unroll, record)
  return _unflatten_outputs(out, unflatten)


def _anderson_weights(h, valid):
  """Anderson's mixing weights: alpha = H^-1 v / (v^T H^-1 v).

  The minimiser of alpha^T H alpha subject to v^T alpha = 1, for the
  regularised Gram matrix H = G G^T + lambda I ([B, m, m], symmetric positive
  definite) and the mask v of filled history slots ([m]): the solution of the
  bordered system [[0, v^T], [v, H]] [nu; alpha] = [1; 0] of locuslab/deq,
  in closed form. Unfilled slots have zero rows in G G^T, so their weight
  is exactly 0. Solved by Cholesky: on CPU a general solve pivots in a loop
  of small XLA ops, which cost a third of the toy DEQ's training step
  (BUILD_NOTES.md, DEQ training speed).
  """
  v = jnp.broadcast_to(valid, h.shape[:-1])                           # [B, m]
  chol = jnp.linalg.cholesky(h)
  weights = jax.scipy.linalg.cho_solve((chol, True), v[..., None])[..., 0]
  return weights / jnp.sum(weights * v, -1, keepdims=True)


def broyden(f: Callable[[PyTree], PyTree], z0: PyTree, *, max_iter: int = 30,
            tol: float = 1e-3, stop_mode: str = 'rel',
            rank: Optional[int] = None, unroll: bool = False,
            record: tuple = ()):
  """Broyden's ("good") method on g(z) = f(z) - z, as locuslab/deq `broyden`.

  Keeps the inverse Jacobian of g as B = -I + sum_i u_i v_i^T (low rank), takes
  the step dz = -B g(z) (no line search), and after each step applies the
  Sherman-Morrison update with dz and dg = g(z_new) - g(z):

    v^T = dz^T B,  u = (dz - B dg) / (v^T dg)

  (Broyden, 1965; Bai et al., 2019, Sec. 3.1.2). NaNs in u, v are zeroed.

  Args:
    f: the map (batched pytree -> pytree).
    z0: initial point.
    rank: number of (u, v) pairs kept; the oldest is replaced when full.
      None keeps max_iter, as the reference does.
    max_iter, tol, stop_mode, unroll: see `SolverConfig`.
    record: evaluation counts at which to record the point (see `solve`).

  Returns:
    (z, SolverStats), and the recorded states with `record`.
  """
  _check(max_iter, stop_mode)
  # Flat rows: Broyden's work is matvecs with its history (dots), which
  # XLA:CPU ran 14% slower over [B, N, C] rows in the DEQ-Transformer's
  # step (BUILD_NOTES.md, "The solvers' layout").
  flat0, unflatten = flatten_batch(z0)
  ff = lambda z: flatten_batch(f(unflatten(z)))[0]
  batch, dim = flat0.shape
  r = max_iter if rank is None else rank
  if r < 1:
    raise ValueError(f'Broyden rank must be >= 1, got {r}.')

  def matvec(us, vs, x):   # B x = -x + sum_i u_i (v_i . x); x [B, D]
    return -x + jnp.einsum('bid,bi->bd', us, jnp.einsum('bid,bd->bi', vs, x))

  def rmatvec(us, vs, x):  # x^T B = -x + sum_i (x . u_i) v_i
    return -x + jnp.einsum('bid,bi->bd', vs, jnp.einsum('bid,bd->bi', us, x))

  def init():
    fz = ff(flat0)
    z_init = flat0
    gz = fz - z_init
    us = jnp.zeros((batch, r, dim), z_init.dtype)  # [B, r, D]
    vs = jnp.zeros((batch, r, dim), z_init.dtype)  # [B, r, D]
    carry = (z_init, gz, us, vs, gz, jnp.asarray(0, jnp.int32))
    return carry, _init_best(z_init, fz), 1

  def step(carry, best):
    z, gz, us, vs, update, k = carry
    z_new = z + update
    fz = ff(z_new)
    gz_new = fz - z_new
    dz, dg = update, gz_new - gz
    v = rmatvec(us, vs, dz)
    u = (dz - matvec(us, vs, dg)) / jnp.sum(v * dg, axis=-1, keepdims=True)
    v = jnp.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    u = jnp.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
    slot = k % r
    us = lax.dynamic_update_index_in_dim(us, u, slot, axis=1)
    vs = lax.dynamic_update_index_in_dim(vs, v, slot, axis=1)
    update = -matvec(us, vs, gz_new)
    return (z_new, gz_new, us, vs, update, k + 1), _update_best(
        best, z_new, fz, stop_mode)

  out = _run(init, step, max_iter, tol, stop_mode, unroll, record)
  return _unflatten_outputs(out, unflatten)


# ------------------------------------------------- building blocks, registry


def residuals(fz: jax.Array, z: jax.Array):
  """Per-example residuals of rows z, fz = f(z) ([B, ...]): (abs, rel) [B].

  abs = ||f(z) - z||_2,  rel = ||f(z) - z||_2 / (||f(z)||_2 + 1e-8), computed
  in float32 for low-precision states (module docstring).
  """
  return _residuals(fz, z)


def point_stats(z: jax.Array, fz: jax.Array, nfe, tol: float,
                stop_mode: str) -> SolverStats:
  """`SolverStats` of a returned point z ([B, D] or [B, ...]), f evaluated at it.

  Args:
    z: the returned rows.
    fz: f(z), evaluated (so the residuals are exact).
    nfe: evaluations of f the solve made, including fz.
    tol, stop_mode: see `SolverConfig`; converged = residual <= tol.
  """
  best = _init_best(z, fz)
  return SolverStats(nfe=jnp.asarray(nfe, jnp.int32),
                     abs_residual=best.abs_res, rel_residual=best.rel_res,
                     converged=_converged(best, tol, stop_mode))


def fixed_point_loop(f: Callable[[PyTree], PyTree], z0: PyTree,
                     config: SolverConfig,
                     update: Callable[[jax.Array, jax.Array, Any],
                                      tuple[jax.Array, Any]],
                     init_state: Callable[[jax.Array, jax.Array], Any] = (
                         lambda z, fz: ())):
  """Runs a user's iteration z_{k+1} = update(z_k, f(z_k), state) to a fixed point.

  The loop of the built-in solvers: f is evaluated at z0 and at every new
  point; each example keeps its lowest-residual evaluated point; the batch
  stops when every example has converged (residual by `config.stop_mode` <=
  `config.tol`) or after `config.max_iter` evaluations (`config.unroll`:
  exactly max_iter, straight-line). So a solver written with it gets the
  statistics and stopping rule of the module docstring.

  Args:
    f: the map (batched pytree -> pytree).
    z0: initial point.
    config: max_iter, tol, stop_mode, unroll are used; other fields are the
      solver's to read.
    update: (z [B, D], fz [B, D], state) -> (z_next [B, D], state_next), on
      the flattened rows (`flatten_batch`); state is any pytree of arrays
      whose shapes do not change.
    init_state: (z0 [B, D], f(z0) [B, D]) -> the first state.

  Returns:
    (z, SolverStats), z the lowest-residual evaluated point, shaped as z0.
  """
  _check(config.max_iter, config.stop_mode)
  flat0, unflatten = flatten_batch(z0)
  ff = lambda z: flatten_batch(f(unflatten(z)))[0]

  def init():
    fz = ff(flat0)
    return (flat0, fz, init_state(flat0, fz)), _init_best(flat0, fz), 1

  def step(carry, best):
    z, fz, state = carry
    z, state = update(z, fz, state)
    fz = ff(z)
    return (z, fz, state), _update_best(best, z, fz, config.stop_mode)

  z, stats = _run(init, step, config.max_iter, config.tol, config.stop_mode,
                  config.unroll)
  return unflatten(z), stats


class RegisteredSolver(NamedTuple):
  """A solver of the registry."""
  name: str
  solve_fn: Callable    # (f, z0, SolverConfig) -> (z, SolverStats)
  affine_only: bool     # valid only for affine f(z) = L z + b
  records_states: bool  # solve_fn takes `record=` (fixed-point correction)


_REGISTRY: dict[str, RegisteredSolver] = {}


def register_solver(name: str, solve_fn: Callable, *,
                    affine_only: bool = False, records_states: bool = False,
                    replace: bool = False):
  """Makes `solve_fn` available as `SolverConfig(name=name)`.

  Args:
    name: the solver's name in configs (`deq.forward.solver`, ...).
    solve_fn: (f, z0, config: SolverConfig) -> (z, SolverStats), with the
      statistics of the module docstring (`fixed_point_loop` provides them).
    affine_only: the solver is valid only for affine maps f(z) = L z + b (the
      backward solve of the implicit function theorem); refused as a forward
      solver (`get_solver(name, nonlinear=True)`).
    records_states: `solve_fn(f, z0, config, record=ks)` also returns the
      iterates after ks evaluations (see `solve`), as the built-ins do; needed
      for fixed-point correction (`jreg.deq.fixed_point_states`).
    replace: allow replacing a registered name.

  Returns:
    solve_fn.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'A solver name must be a non-empty string, got {name!r}.')
  if name in _REGISTRY and not replace:
    raise ValueError(f'A solver named {name!r} is already registered; pass '
                     'replace=True to replace it.')
  _REGISTRY[name] = RegisteredSolver(name, solve_fn, bool(affine_only),
                                    bool(records_states))
  return solve_fn


def unregister_solver(name: str) -> None:
  """Removes a registered solver (`get_solver` then refuses its name)."""
  get_solver(name)
  del _REGISTRY[name]


def registered_solvers(*, nonlinear: bool = False) -> tuple[str, ...]:
  """Names of the registered solvers, in registration order.

  Args:
    nonlinear: only those valid for nonlinear maps (not `affine_only`).
  """
  return tuple(name for name, entry in _REGISTRY.items()
               if not (nonlinear and entry.affine_only))


def get_solver(name: str, *, nonlinear: bool = False) -> RegisteredSolver:
  """The registry entry of `name`; one-sentence ValueError if there is none.

  Args:
    name: a registered name.
    nonlinear: the map to solve is nonlinear (a forward solve): refuse
      solvers registered with `affine_only=True`.
  """
  if name not in _REGISTRY:
    raise ValueError(f'Unknown solver {name!r}; the registered solvers are '
                     f'{", ".join(map(repr, _REGISTRY))}.')
  entry = _REGISTRY[name]
  if nonlinear and entry.affine_only:
    raise ValueError(
        f'Solver {name!r} solves affine maps only (the backward solve), so it '
        'cannot solve the forward fixed point; use one of '
        f'{", ".join(map(repr, registered_solvers(nonlinear=True)))}.')
  return entry


def solve(f: Callable[[PyTree], PyTree], z0: PyTree, config: SolverConfig,
          record: tuple = ()):
  """Runs the solver named by `config` on f from z0; returns (z, SolverStats).

  With `record` (a static tuple of evaluation counts k_j in [1, max_iter])
  returns (z, SolverStats, states): states[j] is the point the same solve
  returns with `max_iter=k_j` (the lowest-residual point after k_j
  evaluations of f, f(z0) included; the final point where the loop stopped
  before k_j), a pytree like z0. Only solvers registered with
  `records_states=True` record (the built-in fixed-point, Anderson and
  Broyden solvers).
  """
  entry = get_solver(config.name)
  if not record:
    return entry.solve_fn(f, z0, config)
  if not entry.records_states:
    raise ValueError(
        f'Solver {config.name!r} does not record its intermediate states; '
        'fixed-point correction needs one of '
        f'{", ".join(repr(n) for n, e in _REGISTRY.items() if e.records_states)}.')
  return entry.solve_fn(f, z0, config, record=tuple(record))


def _common(config: SolverConfig) -> dict:
  return dict(max_iter=config.max_iter, tol=config.tol,
              stop_mode=config.stop_mode, unroll=config.unroll)


register_solver('fixed_point', lambda f, z0, config, **record: (
    fixed_point_iteration(f, z0, damping=config.damping, **_common(config),
                          **record)), records_states=True)
register_solver('anderson', lambda f, z0, config, **record: anderson(
    f, z0, history=config.history, ridge=config.ridge, damping=config.damping,
    ridge_relative=config.ridge_relative, **_common(config), **record),
                records_states=True)
register_solver('broyden', lambda f, z0, config, **record: broyden(
    f, z0, rank=config.broyden_rank, **_common(config), **record),
                records_states=True)
