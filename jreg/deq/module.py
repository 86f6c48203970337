"""Haiku integration: the `DEQ` module and a gradient function for DEQ losses.

`DEQ(cell)` turns a cell f(z, x), written as ordinary Haiku code, into a deep
equilibrium layer z* = f(z*, x) (Bai, Kolter & Koltun, NeurIPS 2019). The
module transforms the cell internally (`hk.transform`) and registers its
parameters in the enclosing transform with `hk.lift`, so the same parameters
are used at every iteration (weight tying) and appear under
`<deq module name>/cell/...` in the outer params.

Requirements on the cell: it is deterministic and stateless (no
`hk.next_rng_key`, no `hk.get_state`): per-call randomness such as dropout
masks must be drawn outside and passed in `x`, so that the map is the same at
every solver iteration (as in locuslab/deq, where variational dropout masks
are reset once per forward).

Backward statistics need no Haiku state: `jreg.deq.value_and_grad` hands
every `DEQ` called inside its loss a stats probe (see `jreg.deq.implicit`)
through a trace-time context and reads the probes' gradients. So `DEQ`
works under `hk.transform` and `hk.transform_with_state` alike; under plain
`jax.grad` / `jreg.train.value_and_grad` the parameter gradients are the same
and no backward statistics are reported.
"""
import contextlib
import contextvars
from typing import Any, Callable, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

from jreg.deq import correction
from jreg.deq import implicit
from jreg.deq import jacobian
from jreg.deq import precision
from jreg.deq import solvers

PyTree = Any
# Distinct DEQ modules one loss can report backward statistics for.
MAX_REPORTED_MODULES = 16


class _ProbeSlots:
  """The stats probes of one `value_and_grad` trace, handed out by module name.

  `probes` is a traced float32 [MAX_REPORTED_MODULES, 4] input of the
  differentiated function; the k-th distinct module name gets row k, so the
  row's gradient is that module's backward statistics (summed over its calls).
  """

  def __init__(self, probes: jax.Array):
    self.probes = probes
    self.names: list[str] = []

  def probe(self, module_name: str) -> jax.Array:
    if module_name not in self.names:
      if len(self.names) == MAX_REPORTED_MODULES:
        raise ValueError(
            f'jreg.deq.value_and_grad reports backward statistics for at most '
            f'{MAX_REPORTED_MODULES} DEQ modules; pass '
            'report_backward_stats=False to the others.')
      self.names.append(module_name)
    return self.probes[self.names.index(module_name)]


_PROBE_SLOTS: contextvars.ContextVar[Optional[_ProbeSlots]] = (
    contextvars.ContextVar('jreg_deq_probe_slots', default=None))


@contextlib.contextmanager
def _collect_probes(slots: _ProbeSlots):
  token = _PROBE_SLOTS.set(slots)
  try:
    yield slots
  finally:
    _PROBE_SLOTS.reset(token)


class DEQ(hk.Module):
  """Deep equilibrium layer with a Haiku cell.

  Call: `z_star, info = DEQ(cell, ...)(x, z0, unrolled=False,
  jacobian_loss=False, spectral_radius=False)`.

  `info` is a flat dict of scalars:
    forward_nfe, forward_abs_residual, forward_rel_residual (batch means),
    forward_converged_fraction, forward_unconverged (count of examples whose
    residual is above tol: never hidden), forward_max_iter (the budget:
    `forward.max_iter`, or N for unrolled calls);
    backward_max_iter (mode 'implicit': `backward.solver.max_iter`);
    backward_nfe (only for 'phantom'/'jfb', where it is a constant, and for
    unrolled calls without a probe: N; with backward modes 'implicit' and
    'reversible' the backward stats come from `jreg.deq.value_and_grad`
    (for 'reversible': VJPs, and the reconstruction error of the initial
    state as residual; see `jreg.deq.reversible`), and an unrolled call
    reports N VJPs, residual 0, converged 1 there);
    jacobian_loss and jacobian_applied (when requested);
    spectral_radius (batch mean, when requested).
  """

  def __init__(self, cell: Callable[[PyTree, PyTree], PyTree], *,
               forward: solvers.SolverConfig = solvers.SolverConfig(),
               backward: implicit.BackwardConfig = implicit.BackwardConfig(),
               unrolled_steps: int = 8,
               jacobian_vectors: int = 1,
               spectral_radius_iters: int = 50,
               report_backward_stats: bool = True,
               supervise_states: Optional[Union[int, Sequence[int]]] = None,
               compute_dtype=None,
               on_unconverged: Optional[str] = None,
               name: Optional[str] = None):
    """Builds the layer.

    A forward or backward solve that ends with examples above its tolerance
    issues a `jreg.deq.ConvergenceWarning` at run time (or raises
    `ConvergenceError`, or nothing: `on_unconverged`); `jreg.deq.implicit`
    has the details. The solves at `init` say nothing.

    Args:
      cell: f(z, x) -> z-like pytree, ordinary Haiku code (a function that
        creates modules, e.g. `lambda z, x: MyCell()(z, x)`).
      forward: forward solver settings.
      backward: backward mode and solver settings.
      unrolled_steps: N, the weight-tied applications used when called with
        `unrolled=True` (pre-training phase, ordinary backprop).
      jacobian_vectors: M, Hutchinson vectors for the Jacobian term.
      spectral_radius_iters: power iterations for `spectral_radius=True`.
      report_backward_stats: when the loss is differentiated by
        `jreg.deq.value_and_grad`, report the backward solver's NFE and
        residuals (and, for unrolled calls, the VJP count) as metrics, through
        a stats probe that value_and_grad passes in at trace time (no Haiku
        state: works under `hk.transform` and `hk.transform_with_state`).
        Under any other gradient (`jax.grad`, `jreg.train.value_and_grad`)
        there is no probe and the gradients are the same. Only used with
        backward modes 'implicit' and 'reversible'.
      supervise_states: None, or the solver states to return for
        fixed-point correction (`jreg.deq.fp_correction`): an int n (n
        states spread over forward.max_iter, torchdeq's `n_states`) or a
        sequence of evaluation counts (torchdeq's `indexing`); see
        `jreg.deq.correction.state_indices`. The call then returns the list
        [z_{k_1}, ..., z*] in place of z*: intermediate states with the
        phantom gradient from each state (`backward.phantom_steps`,
        `backward.phantom_damping`), z* with `backward`
        (`jreg.deq.fixed_point_states`). Unrolled calls return [z_N].
      compute_dtype: None / 'float32' (everything in the parameters' and
        state's dtype), 'bfloat16' or 'float16': every evaluation of the
        cell, and every VJP of it (backward solve, unrolled pre-training,
        Jacobian term, spectral radius), runs in that dtype, while the
        parameters (master weights), their gradients, the solver state and
        the solvers' arithmetic stay float32
        (`jreg.deq.precision.mixed_precision_cell`; Micikevicius et al.,
        ICLR 2018). Parameters are created by the uncast cell, in float32.
      on_unconverged: None (each solve's own `SolverConfig.on_unconverged`,
        'warn' by default), or 'warn', 'raise' or 'ignore' for both the
        forward and the backward solve. 'raise' raises
        `jreg.deq.ConvergenceError`; under `jax.jit` the caller sees
        `jax.errors.JaxRuntimeError` (a `RuntimeError`) with the same sentence.
      name: module name.
    """
    super().__init__(name=name)
    self._cell = hk.without_apply_rng(hk.transform(cell))
    if on_unconverged is not None:
      if on_unconverged not in solvers.ON_UNCONVERGED:
        raise ValueError(f'on_unconverged must be one of '
                         f'{solvers.ON_UNCONVERGED}, got {on_unconverged!r}.')
      forward = forward._replace(on_unconverged=on_unconverged)
      backward = backward._replace(solver=backward.solver._replace(
          on_unconverged=on_unconverged))
    self.forward_config = forward
    self.backward_config = backward
    self.unrolled_steps = unrolled_steps
    self.jacobian_vectors = jacobian_vectors
    self.spectral_radius_iters = spectral_radius_iters
    self.report_backward_stats = (report_backward_stats and
                                  backward.mode in ('implicit', 'reversible'))
    self.supervise_states = supervise_states
    self.compute_dtype = precision.compute_dtype_of(compute_dtype)

  def __call__(self, x: PyTree, z0: PyTree, *, unrolled: bool = False,
               jacobian_loss=False, spectral_radius=False,
               rng: Optional[jax.Array] = None):
    """Solves z* = cell(z*, x).

    Args:
      x: the cell's input pytree (injection, masks, memory, ...).
      z0: initial state (fixes z's pytree structure and shapes).
      unrolled: Python bool; True runs N weight-tied applications with
        ordinary backprop (pre-training), False the implicit layer.
      jacobian_loss: False, True, or a traced bool (e.g. from
        `jreg.deq.regularization_gate`): estimate ||J_f(z*)||_F^2 / d
        (`jacobian_frobenius_estimate`, z* held constant). With a traced
        flag the VJPs run under `lax.cond`, so they cost nothing when off.
      spectral_radius: False, True, or a traced bool: add the
        power-iteration estimate of rho(J_f(z*)) (mean over the batch) to
        info; with a traced flag it runs under `lax.cond` (0 when off).
      rng: key for Hutchinson / power iteration; default `hk.next_rng_key()`.

    Returns:
      (z*, info dict of scalars); with `supervise_states`,
      ([z_{k_1}, ..., z*], info).

    Raises:
      StateMismatchError: (at trace time) the cell's output is not shaped
        and typed like z0.
    """
    init_rng = hk.next_rng_key() if hk.running_init() else None
    params = hk.lift(self._cell.init, name='cell', allow_reuse=True)(
        init_rng, z0, x)
    cell = precision.mixed_precision_cell(  # (params, z, x) -> z
        self._cell.apply, self.compute_dtype)
    probe = None
    slots = _PROBE_SLOTS.get()
    if self.report_backward_stats and slots is not None:
      probe = slots.probe(self.module_name)

    forward, backward = self.forward_config, self.backward_config
    if hk.running_init():  # untrained parameters: nothing to report
      forward = forward._replace(on_unconverged='ignore')
      backward = backward._replace(solver=backward.solver._replace(
          on_unconverged='ignore'))
    info = {}
    if unrolled:
      z_star, stats = implicit.unrolled_fixed_point(
          cell, params, x, z0, self.unrolled_steps,
          tol=self.forward_config.tol, stop_mode=self.forward_config.stop_mode,
          name=self.module_name)
      if probe is not None:
        z_star = implicit.report_exact_backward(z_star, probe,
                                                self.unrolled_steps)
      else:
        info['backward_nfe'] = jnp.asarray(self.unrolled_steps, jnp.float32)
      budget = self.unrolled_steps
    else:
      indices = () if self.supervise_states is None else (
          correction.state_indices(self.forward_config.max_iter,
                                   self.supervise_states)[:-1])
      z_states, stats = implicit.fixed_point_states(
          cell, params, x, z0, indices, forward=forward, backward=backward,
          stats_probe=probe, name=self.module_name)
      z_star = z_states[-1]
      fixed_nfe = implicit.backward_nfe_if_fixed(self.backward_config)
      if fixed_nfe is not None:  # each supervised state adds its phantom VJPs
        info['backward_nfe'] = jnp.asarray(
            fixed_nfe + len(indices) * self.backward_config.phantom_steps,
            jnp.float32)
      if self.backward_config.mode == 'implicit':
        info['backward_max_iter'] = jnp.asarray(
            self.backward_config.solver.max_iter, jnp.float32)
      budget = self.forward_config.max_iter
    info.update(stats.as_metrics('forward_'))
    info['forward_max_iter'] = jnp.asarray(budget, jnp.float32)

    if jacobian_loss is not False or spectral_radius is not False:
      if rng is None:
        rng = hk.next_rng_key()
      jac_rng, rho_rng = jax.random.split(rng)
      f = lambda z: cell(params, z, x)
      if jacobian_loss is not False:
        info['jacobian_loss'] = _gated(
            jacobian_loss, lambda: jacobian.jacobian_frobenius_estimate(
                f, z_star, jac_rng, self.jacobian_vectors).astype(jnp.float32))
        info['jacobian_applied'] = jnp.asarray(jacobian_loss, jnp.float32)
      if spectral_radius is not False:
        info['spectral_radius'] = _gated(
            spectral_radius, lambda: jnp.mean(jacobian.spectral_radius(
                f, z_star, rho_rng, self.spectral_radius_iters)))
    if self.supervise_states is not None:
      return (z_states if not unrolled else [z_star]), info
    return z_star, info


def _gated(flag, value_fn: Callable[[], jax.Array]) -> jax.Array:
  """value_fn() for flag True; for a traced flag under `lax.cond` (0 when off)."""
  if flag is True:
    return value_fn()
  return lax.cond(jnp.asarray(flag, bool), value_fn,
                  lambda: jnp.zeros([], jnp.float32))


def cell_params(params: hk.Params, module_name: str = 'deq') -> hk.Params:
  """The cell's own params out of a model's params (as `DEQ` lifted them).

  `DEQ(name=module_name)` stores the cell's parameters under
  `<module path>/cell/<cell module>`; this returns them keyed as the cell's
  own `hk.transform(cell)` expects, e.g. for evaluating f outside the model
  (surfaces, spectral radius, solver studies).
  """
  prefix = f'{module_name}/cell/'
  inner = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
  if not inner:
    raise KeyError(f'no parameters under {prefix!r}; modules: {sorted(params)}')
  return inner


def step_count(increment: bool) -> jax.Array:
  """A Haiku-state counter of training calls (float32 []), for schedules.

  The `loss_fn` contract carries no step, so DEQ losses that schedule the
  Jacobian weight gamma(step) or probability p(step) keep their own count in
  the model state: this returns the count *before* this call and, when
  `increment` (training), stores count + 1. Needs `hk.transform_with_state`.
  Stored as float32 (exact to 2**24 steps) because `jreg.train`'s pmap mode
  averages the model state with `lax.pmean`, which would turn an int into a
  float and change the state's dtype.
  """
  count = hk.get_state('step_count', [], jnp.float32, init=jnp.zeros)
  if increment and not hk.running_init():
    hk.set_state('step_count', count + 1)
  return count


def value_and_grad(loss_fn: Callable) -> Callable:
  """A `grad_fn` (jreg.train contract) that also reports DEQ backward stats.

  Differentiates `loss_fn(params, model_state, rng, batch) -> (loss,
  (model_state, metrics))` with respect to params and, additionally, to the
  stats probes it hands to the `DEQ` modules the loss calls (a trace-time
  context, so models under `hk.transform` work too: pass `model_state={}`
  and ignore it in `loss_fn`); a probe's gradient is its layer's
  backward [nfe, abs residual, rel residual, converged fraction] (see
  `jreg.deq.implicit`), added to metrics as `backward_nfe`,
  `backward_abs_residual`, `backward_rel_residual`,
  `backward_converged_fraction` (prefixed by the module path when there is
  more than one DEQ). A probe gradient is the sum over calls of that module.

  Returns:
    grad_fn(params, model_state, rng, batch, axis_name=None)
      -> ((loss, (model_state, metrics)), grads).
  """

  def grad_fn(params, model_state, rng, batch, axis_name=None):
    del axis_name  # the engine averages gradients and metrics
    slots = _ProbeSlots(None)

    def wrapped(params, probes):
      slots.probes, slots.names = probes, []
      with _collect_probes(slots):
        return loss_fn(params, model_state, rng, batch)

    probes = jnp.zeros((MAX_REPORTED_MODULES, implicit.STATS_PROBE_SIZE),
                       jnp.float32)
    (loss, (new_state, metrics)), (grads, probe_grads) = jax.value_and_grad(
        wrapped, argnums=(0, 1), has_aux=True)(params, probes)
    metrics = dict(metrics)
    for index, module in enumerate(slots.names):
      prefix = 'backward_' if len(slots.names) == 1 else f'{module}/backward_'
      metrics.update(implicit.probe_to_metrics(probe_grads[index], prefix))
    return (loss, (new_state, metrics)), grads

  return grad_fn
