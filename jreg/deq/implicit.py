"""The fixed-point layer and its gradients (implicit, phantom, Jacobian-free).

For z* = f(z*, x; theta), the implicit function theorem gives, for a loss l,

  dl/dtheta = u^T df/dtheta,   dl/dx = u^T df/dx,   where
  u^T = u^T J_f(z*) + dl/dz*   (J_f = df/dz at z*),

(Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, Thm. 1). The
backward fixed point u is found with any solver of `jreg.deq.solvers`, applied
to h(u) = J_f(z*)^T u + dl/dz*, where J_f^T u is a VJP of f linearised once at
z* (`jax.vjp` outside the loop; only the transposed linear map runs per
iteration). Cheaper backward modes:

  * 'phantom': gradient of k damped unrolled steps from z* (held constant),
    z <- (1 - tau) z + tau f(z)  (Geng et al., "On Training Implicit Models",
    NeurIPS 2021, phantom gradients);
  * 'jfb': u = dl/dz*, i.e. one VJP of f (Fung et al., "JFB: Jacobian-Free
    Backpropagation for Implicit Networks", AAAI 2022).

The forward solve stores no iterates (only z*), so memory is O(1) in NFE.

Backward statistics. A `jax.custom_vjp` backward cannot return auxiliary
outputs. The layer therefore takes a `stats_probe` input, a float32 [4] array
that does not influence the output; the backward pass returns as its
"cotangent" the vector

  [backward nfe, mean abs residual, mean rel residual, converged fraction]

so `jax.grad` with respect to the probe yields the backward solver's
statistics (zero if the backward pass did not run). `jreg.deq.value_and_grad`
does this for Haiku models: it hands each `DEQ` a probe at trace time.

Unconverged solves. When the forward solve, or the implicit backward solve,
ends with examples whose residual (by `stop_mode`) is above its `tol` (> 0),
the layer says so at run time, under `jax.jit`, `jax.grad` and `pmap` too:
a `jax.debug.callback`, run (under `lax.cond`) only for an unconverged
solve, hands the host three scalars (the count of unconverged examples, the
largest residual, the NFE), and the host acts by the solve's
`SolverConfig.on_unconverged`: 'warn' issues a
`ConvergenceWarning` naming the fraction of examples unconverged, the
residual reached and the budget (the 1st, 10th, 100th, ... unconverged solve
of each layer and direction in a process, so that a training loop is not
flooded); 'raise' raises `ConvergenceError` with the same sentence every time
(under `jax.jit` the runtime re-raises it as `jax.errors.JaxRuntimeError`, a
`RuntimeError` whose message contains the sentence); 'ignore' does nothing.
Under `vmap` and `pmap` the callback runs once per mapped example or device,
each with its own share of the batch. Cost: a jitted function that contains a
host callback leaves JAX's C++ dispatch path for the Python one, about 0.3 ms
per call on CPU whether or not the callback runs; 'ignore' on both solves
compiles no callback.
"""
import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jreg import errors
from jreg.deq import precision
from jreg.deq import solvers

PyTree = Any
STATS_PROBE_SIZE = 4  # [nfe, abs residual, rel residual, converged fraction]


class BackwardConfig(NamedTuple):
  """How the fixed-point layer is differentiated (hashable, static).

  Attributes:
    mode: 'implicit' (IFT with a solver), 'phantom', 'jfb', or 'reversible'
      (exact backward through the reversible forward solve, which it
      requires: `jreg.deq.reversible`).
    solver: the solver for u = J_f^T u + g (mode 'implicit').
    phantom_steps: k, the number of unrolled steps (mode 'phantom').
    phantom_damping: tau (mode 'phantom').
  """
  mode: str = 'implicit'
  solver: solvers.SolverConfig = solvers.SolverConfig(
      name='fixed_point', max_iter=30, tol=1e-4)
  phantom_steps: int = 5
  phantom_damping: float = 0.5


class ConvergenceWarning(UserWarning):
  """A DEQ's forward or backward solve ended with examples above its tolerance."""


class ConvergenceError(errors.UserError, RuntimeError):
  """A solve with `on_unconverged='raise'` ended with examples above its tolerance."""


class StateMismatchError(errors.UserError, ValueError):
  """The cell's output differs from z0 in structure, shape or dtype."""


# Unconverged solves seen per (layer, direction) in this process; the 1st,
# 10th, 100th, ... of each issue a ConvergenceWarning.
_UNCONVERGED_SOLVES: dict[tuple[str, str], int] = {}


def reset_convergence_reports() -> None:
  """Forgets the unconverged solves counted so far (the next one warns again)."""
  _UNCONVERGED_SOLVES.clear()


def unconverged_message(label: str, direction: str,
                        config: solvers.SolverConfig, unconverged: int,
                        batch: int, residual: float, nfe: int) -> str:
  """The one sentence that reports an unconverged solve."""
  return (f'{label}: the {direction} solve left {unconverged} of {batch} '
          f'examples unconverged ({unconverged / max(batch, 1):.1%}) after '
          f'{nfe} evaluations of a budget of max_iter={config.max_iter} '
          f'({config.name}), with {config.stop_mode} residual up to '
          f'{residual:.3g} > tol={config.tol:g}; raise max_iter, loosen tol or '
          'make the cell more contractive (e.g. with the Jacobian penalty).')


def _on_host(label, direction, config, batch, unconverged, residual, nfe):
  """The host side of `report_unconverged`'s callback."""
  unconverged = int(unconverged)
  if unconverged <= 0:
    return
  message = unconverged_message(label, direction, config, unconverged, batch,
                                float(residual), int(nfe))
  if config.on_unconverged == 'raise':
    raise ConvergenceError(message)
  key = (label, direction)
  count = _UNCONVERGED_SOLVES.get(key, 0) + 1
  _UNCONVERGED_SOLVES[key] = count
  if count == 10 ** (len(str(count)) - 1):  # 1, 10, 100, ...
    if count > 1:
      message = (f'{message[:-1]} (unconverged {direction} solve number '
                 f'{count} of this layer; the 1st, 10th, 100th, ... are '
                 'reported).')
    warnings.warn(message, ConvergenceWarning)


def report_unconverged(stats: solvers.SolverStats,
                       config: solvers.SolverConfig, label: str,
                       direction: str) -> None:
  """Warns or raises at run time if `stats` has unconverged examples.

  Acts by `config.on_unconverged` (module docstring); nothing for 'ignore' or
  `tol == 0` (a budget run out on purpose).

  Args:
    stats: the solve's statistics ([B] per-example fields).
    config: the solve's settings.
    label: names the layer in the message, e.g. "DEQ 'model/deq'".
    direction: 'forward' or 'backward'.
  """
  if config.on_unconverged not in solvers.ON_UNCONVERGED:
    raise ValueError(f'SolverConfig.on_unconverged must be one of '
                     f'{solvers.ON_UNCONVERGED}, got {config.on_unconverged!r}.')
  if config.on_unconverged == 'ignore' or not config.tol > 0:
    return
  missed = ~stats.converged
  residual = (stats.abs_residual if config.stop_mode == 'abs'
              else stats.rel_residual).astype(jnp.float32)
  worst = jnp.max(jnp.where(missed, residual, -jnp.inf))
  count = jnp.sum(missed.astype(jnp.int32))
  host = functools.partial(_on_host, label, direction, config,
                           int(stats.converged.shape[0]))
  # Only an unconverged solve pays the callback's round trip to the host.
  jax.lax.cond(count > 0,
               lambda: jax.debug.callback(host, count, worst, stats.nfe),
               lambda: None)


def _shapes(tree) -> str:
  """'(4, 8) float32' for one array, else the list of the leaves' shapes."""
  leaves = [jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l))
            for l in jax.tree.leaves(tree)]
  text = [f'{tuple(l.shape)} {l.dtype}' for l in leaves]
  return text[0] if len(text) == 1 else '[' + ', '.join(text) + ']'


def checked_cell(cell: Callable[[PyTree, PyTree, PyTree], PyTree],
                 label: str) -> Callable[[PyTree, PyTree, PyTree], PyTree]:
  """`cell` that refuses, at trace time, an output unlike its state z.

  A fixed point z* = f(z*, x) needs f's output to have z0's pytree
  structure, shapes and dtypes; otherwise the solvers fail deep inside
  (`TypeError: sub got incompatible shapes for broadcasting`). The check
  costs nothing at run time.

  Raises:
    StateMismatchError: one sentence naming z0, the cell's output and x.
  """

  def cell_checked(params, z, x):
    out = cell(params, z, x)
    z_leaves, z_tree = jax.tree.flatten(z)
    out_leaves, out_tree = jax.tree.flatten(out)
    same = z_tree == out_tree and all(
        jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
        for a, b in zip(z_leaves, out_leaves))
    if not same:
      structure = ('' if z_tree == out_tree else
                   f' (structure {out_tree} where z0 has {z_tree})')
      raise StateMismatchError(
          f'{label}: the cell maps z0 of {_shapes(z)} to an output of '
          f'{_shapes(out)}{structure}, with x of {_shapes(x)}; a fixed point '
          'needs the output shaped and typed like z0, so give z0 the shape '
          'and dtype of the cell\'s output or change the cell.')
    return out

  return cell_checked


def backward_nfe_if_fixed(config: BackwardConfig) -> Optional[int]:
  """The backward VJP count for modes where it is a constant (phantom, jfb)."""
  if config.mode == 'phantom':
    return config.phantom_steps
  if config.mode == 'jfb':
    return 1
  return None


def stats_probe_values(stats: solvers.SolverStats) -> jax.Array:
  """The [4] vector a backward pass returns through the stats probe."""
  return jnp.stack([stats.nfe.astype(jnp.float32), stats.mean_abs_residual,
                    stats.mean_rel_residual, stats.converged_fraction])


def probe_to_metrics(probe_grad: jax.Array, prefix: str = 'backward_') -> dict:
  """Names the entries of a stats-probe gradient."""
  return {f'{prefix}nfe': probe_grad[0],
          f'{prefix}abs_residual': probe_grad[1],
          f'{prefix}rel_residual': probe_grad[2],
          f'{prefix}converged_fraction': probe_grad[3]}


def _zeros_like_tree(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _fixed_point_impl(cell, forward, params, x, z0):
  f = lambda z: cell(params, z, x)
  return solvers.solve(f, jax.lax.stop_gradient(z0), forward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fixed_point(cell, forward, backward, label, params, x, z0, stats_probe):
  del backward, label, stats_probe
  return _fixed_point_impl(cell, forward, params, x, z0)


def _fixed_point_fwd(cell, forward, backward, label, params, x, z0,
                     stats_probe):
  del backward, label
  z_star, stats = _fixed_point_impl(cell, forward, params, x, z0)
  return (z_star, stats), (params, x, z_star, z0, stats_probe)


def _fixed_point_bwd(cell, forward, backward, label, residuals, cotangents):
  del forward
  params, x, z_star, z0, stats_probe = residuals
  g = cotangents[0]  # dl/dz*, same pytree as z*; stats cotangents are ignored
  if backward.mode == 'implicit':
    # Linearise f at z* once; the loop applies only the transposed map.
    _, vjp_all = jax.vjp(lambda p, z, xx: cell(p, z, xx), params, z_star, x)
    h = lambda u: jax.tree.map(jnp.add, vjp_all(u)[1], g)
    u, bstats = solvers.solve(h, _zeros_like_tree(g), backward.solver)
    report_unconverged(bstats, backward.solver, label, 'backward')
    g_params, _, g_x = vjp_all(u)
    probe_ct = stats_probe_values(bstats).astype(stats_probe.dtype)
  elif backward.mode in ('phantom', 'jfb'):
    steps = backward.phantom_steps if backward.mode == 'phantom' else 1
    tau = backward.phantom_damping if backward.mode == 'phantom' else 1.0

    def unrolled(p, xx):
      z = z_star
      for _ in range(steps):
        fz = cell(p, z, xx)
        z = jax.tree.map(lambda a, b: (1.0 - tau) * a + tau * b, z, fz)
      return z

    _, vjp_px = jax.vjp(unrolled, params, x)
    g_params, g_x = vjp_px(g)
    probe_ct = jnp.zeros_like(stats_probe).at[0].set(steps)
  else:
    raise ValueError(f"Unknown backward mode {backward.mode!r}; use "
                     "'implicit', 'phantom' or 'jfb'.")
  return g_params, g_x, _zeros_like_tree(z0), probe_ct


_fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def fixed_point(cell: Callable[[PyTree, PyTree, PyTree], PyTree],
                params: PyTree, x: PyTree, z0: PyTree, *,
                forward: solvers.SolverConfig = solvers.SolverConfig(),
                backward: BackwardConfig = BackwardConfig(),
                stats_probe: Optional[jax.Array] = None,
                compute_dtype=None, name: Optional[str] = None):
  """Solves z* = cell(params, z*, x) and differentiates by `backward`.

  A solve that ends with examples above its tolerance warns or raises at run
  time, by `forward.on_unconverged` / `backward.solver.on_unconverged`
  (module docstring).

  Args:
    cell: pure function (params, z, x) -> z-like pytree; batched over axis 0.
    params: the cell's parameters (differentiated).
    x: the cell's other inputs, any pytree (differentiated where float);
      per-call randomness (dropout masks) belongs here so that it is the same
      at every iteration.
    z0: initial point (no gradient flows into it).
    forward: the forward solver's settings (a solver for nonlinear maps:
      affine-only ones such as 'gmres' are refused).
    backward: the backward mode and solver settings (any registered solver,
      'gmres' and 'bicgstab' included: the backward map is affine).
    stats_probe: optional float32 [4]; its gradient is the backward stats
      (see module docstring).
    compute_dtype: None, 'bfloat16' or 'float16': evaluate the cell (and its
      VJPs) in that dtype, solver state and gradients in float32
      (`jreg.deq.precision.mixed_precision_cell`).
    name: names the layer in warnings and errors (`DEQ` passes its module
      path); None: 'jreg.deq.fixed_point'.

  Returns:
    (z*, SolverStats of the forward solve).

  Raises:
    StateMismatchError: (at trace time) the cell's output is not shaped and
      typed like z0.
  """
  label = _label(name)
  cell = checked_cell(precision.mixed_precision_cell(cell, compute_dtype),
                      label)
  solvers.get_solver(forward.name, nonlinear=True)  # refuses affine-only ones
  if backward.mode == 'reversible':
    from jreg.deq import reversible  # pylint: disable=g-import-not-at-top
    z_star, stats = reversible.reversible_fixed_point(
        cell, params, x, z0, forward=forward, stats_probe=stats_probe)
  else:
    if stats_probe is None:
      stats_probe = jnp.zeros((STATS_PROBE_SIZE,), jnp.float32)
    z_star, stats = _fixed_point(cell, forward, backward, label, params, x,
                                 z0, stats_probe)
  report_unconverged(stats, forward, label, 'forward')
  return z_star, stats


def _label(name: Optional[str], default: str = 'jreg.deq.fixed_point') -> str:
  return default if name is None else f'DEQ {name!r}'


@jax.custom_vjp
def _report_through_probe(z, stats_probe, values):
  del stats_probe, values
  return z


def _report_fwd(z, stats_probe, values):
  del stats_probe
  return z, values


def _report_bwd(values, g):
  return g, values, jnp.zeros_like(values)


_report_through_probe.defvjp(_report_fwd, _report_bwd)


def report_exact_backward(z: PyTree, stats_probe: jax.Array,
                          num_vjps: int) -> PyTree:
  """Identity on z whose backward reports [num_vjps, 0, 0, 1] to the probe.

  For layers differentiated by ordinary backprop (unrolled pre-training):
  the backward costs `num_vjps` cell VJPs and solves nothing, so its residual
  is 0 and it counts as converged.
  """
  values = jnp.array([num_vjps, 0.0, 0.0, 1.0], stats_probe.dtype)
  return _report_through_probe(z, stats_probe, values)


def unrolled_fixed_point(cell, params, x, z0, num_steps: int, *,
                         tol: float = 0.0, stop_mode: str = 'rel',
                         name: Optional[str] = None):
  """Weight-tied unrolled pre-training: z_{k+1} = cell(params, z_k, x), k < N.

  Ordinary backprop through all N applications (Bai et al., 2021, Sec. 5:
  unrolled pre-training of DEQs). Stats report N evaluations; the residual is
  ||z_N - z_{N-1}||, the exact residual of z_{N-1} (no extra evaluation).

  Returns:
    (z_N, SolverStats) with `converged` = (residual of z_{N-1} by
    `stop_mode`) <= tol.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  cell = checked_cell(cell, _label(name, 'jreg.deq.unrolled_fixed_point'))
  z_prev, z = None, z0
  for _ in range(num_steps):
    z_prev, z = z, cell(params, z, x)
  fz, _ = solvers.flatten_batch(jax.lax.stop_gradient(z))
  zp, _ = solvers.flatten_batch(jax.lax.stop_gradient(z_prev))
  abs_res, rel_res = solvers._residuals(fz, zp)  # pylint: disable=protected-access
  stats = solvers.SolverStats(
      nfe=jnp.asarray(num_steps, jnp.int32), abs_residual=abs_res,
      rel_residual=rel_res,
      converged=(abs_res if stop_mode == 'abs' else rel_res) <= tol)
  return z, stats


# Fixed-point correction (Bai, Koltun & Kolter, "Deep Equilibrium Optical Flow
# Estimation", CVPR 2022, Sec. 3.3): intermediate solver states, each with a
# gradient of its own.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _state_with_gradient(cell, backward, label, params, x, z, stats_probe):
  del cell, backward, label, params, x, stats_probe
  return z


def _state_with_gradient_fwd(cell, backward, label, params, x, z,
                             stats_probe):
  del cell, backward, label
  return z, (params, x, z, stats_probe)


def _state_with_gradient_bwd(cell, backward, label, residuals, g):
  params, x, z, stats_probe = residuals
  g_params, g_x, g_z, probe_ct = _fixed_point_bwd(
      cell, None, backward, label, (params, x, z, z, stats_probe), (g, None))
  return g_params, g_x, g_z, probe_ct


_state_with_gradient.defvjp(_state_with_gradient_fwd, _state_with_gradient_bwd)


def fixed_point_states(cell: Callable[[PyTree, PyTree, PyTree], PyTree],
                       params: PyTree, x: PyTree, z0: PyTree,
                       indices: tuple, *,
                       forward: solvers.SolverConfig = solvers.SolverConfig(),
                       backward: BackwardConfig = BackwardConfig(),
                       stats_probe: Optional[jax.Array] = None,
                       name: Optional[str] = None):
  """z* = cell(params, z*, x) and the solver's states after `indices` evaluations.

  One forward solve records, for each k in `indices` (static, each in
  [1, forward.max_iter]), the point the solver returns with budget k
  (`solvers.solve(..., record=indices)`). Each state z_k is returned as it is
  (detached, so no gradient flows along the solver's path) and differentiated
  by the phantom gradient from z_k: the VJP of `backward.phantom_steps`
  damped steps z <- (1 - tau) z + tau f(z), tau = `backward.phantom_damping`,
  taken from z_k (Geng et al., NeurIPS 2021), as torchdeq's `DEQIndexing`
  does for its sampled states (locuslab/torchdeq `torchdeq/core.py`). The
  final state z* is differentiated by `backward` (any mode), exactly as
  `fixed_point` does. torchdeq returns the phantom steps' output as the
  value of a sampled state; here the value is z_k itself.

  Args:
    cell, params, x, z0, forward, backward, stats_probe, name: as
      `fixed_point`;
      the probe's gradient sums the backward statistics over the states
      (its NFE entry is the total number of backward VJPs).
    indices: tuple of evaluation counts of the intermediate states.

  Returns:
    ([z_{k_1}, ..., z_{k_n}, z*], SolverStats of the forward solve).
  """
  if stats_probe is None:
    stats_probe = jnp.zeros((STATS_PROBE_SIZE,), jnp.float32)
  indices = tuple(int(k) for k in indices)
  if indices and backward.mode == 'reversible':
    raise ValueError('Fixed-point correction (supervise_states) does not '
                     'work with the reversible backward mode; use '
                     "'implicit', 'phantom' or 'jfb'.")
  if not indices:
    z_star, stats = fixed_point(cell, params, x, z0, forward=forward,
                                backward=backward, stats_probe=stats_probe,
                                name=name)
    return [z_star], stats
  label = _label(name)
  cell = checked_cell(cell, label)
  frozen_params, frozen_x = jax.lax.stop_gradient((params, x))
  f = lambda z: cell(frozen_params, z, frozen_x)
  z_star, stats, states = solvers.solve(f, jax.lax.stop_gradient(z0), forward,
                                        record=indices)
  phantom = backward._replace(mode='phantom')
  report_unconverged(stats, forward, label, 'forward')
  out = [_state_with_gradient(cell, phantom, label, params, x, z, stats_probe)
         for z in states]
  out.append(_state_with_gradient(cell, backward, label, params, x, z_star,
                                  stats_probe))
  return out, stats
