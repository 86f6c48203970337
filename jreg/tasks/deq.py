"""DEQ settings from configs: solvers, backward passes, and the gamma / p schedules.

The one translation from a config's `deq.forward.*` / `deq.backward.*` groups
(`solver`, `max_iter`, `tol`, `stop_mode`; see `experiments/configs`) to the
hashable `jreg.deq.SolverConfig` / `jreg.deq.BackwardConfig` the layers take,
and of `deq.compute_dtype` to the layers' mixed-precision dtype, shared by
every DEQ task, experiment, benchmark and notebook.

The Jacobian term of Bai, Koltun & Kolter (ICML 2021, Sec. 3.3 and Appendix
A) is gamma(t) * ||J_f(z*)||_F^2 / d on a random fraction p(t) of the training
steps; `linear_ramp` is the schedule both follow when a paper ramps them.
With `jacobian.adaptive` set, gamma is instead adapted during training to hold
a measured quantity at `jacobian.target` (`controller_config`,
`adaptive_weight`; the law is in `jreg.deq.adaptive`).

`log_unconverged` wraps a DEQ task's training `grad_fn` so that the run's log
gets a warning line when training steps' solves ended unconverged.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp

from jreg import deq as deq_lib
from jreg.deq import precision
from jreg.deq import adaptive

STOP_MODES = ('abs', 'rel')
BACKWARD_MODES = ('implicit', 'phantom', 'jfb', 'reversible')
COMPUTE_DTYPES = precision.COMPUTE_DTYPES
# jacobian.adaptive: what the gamma controller holds at jacobian.target.
ADAPTIVE = ('none', 'nfe', 'spectral_radius')


def solver_config(group: Mapping[str, Any], name: str = 'deq.forward',
                  *, affine: bool = False,
                  **changes) -> deq_lib.SolverConfig:
  """`jreg.deq.SolverConfig` of a config's solver group, range-checked.

  `solver` is any name of the solver registry (`jreg.deq.registered_solvers`,
  including those added by `jreg.deq.register_solver`).

  Args:
    group: a mapping with `solver`, `max_iter`, `tol`, `stop_mode`, and
      optionally `damping` (the 'reversible' solver's beta, required there).
    name: the group's dotted name, for error messages.
    affine: the group solves an affine map (the backward solve), so solvers
      registered as affine-only ('gmres', 'bicgstab') are allowed; False (a
      forward solve) refuses them.
    **changes: fields to replace (e.g. `max_iter` of an evaluation budget).

  Raises:
    ValueError: one sentence naming the key and its allowed values.
  """
  values = dict(name=group['solver'], max_iter=group['max_iter'],
                tol=group['tol'], stop_mode=group['stop_mode'])
  if 'damping' in group:
    values['damping'] = group['damping']
  values.update(changes)
  allowed = deq_lib.registered_solvers(nonlinear=not affine)
  if values['name'] not in allowed:
    affine_only = values['name'] in deq_lib.registered_solvers()
    raise ValueError(
        f'{name}.solver must be one of {allowed}, got {values["name"]!r}'
        + (' (a solver for affine maps, valid only for the backward solve).'
           if affine_only else '.'))
  if values['max_iter'] < 1:
    raise ValueError(f'{name}.max_iter must be >= 1, got {values["max_iter"]}.')
  if values['tol'] < 0:
    raise ValueError(f'{name}.tol must be >= 0, got {values["tol"]}.')
  if values['stop_mode'] not in STOP_MODES:
    raise ValueError(f'{name}.stop_mode must be one of {STOP_MODES}, got '
                     f'{values["stop_mode"]!r}.')
  if values['name'] == 'reversible':
    deq_lib.reversible.check_beta(values.get('damping', 1.0), f'{name}.damping')
  return deq_lib.SolverConfig(**values)


def backward_config(group: Mapping[str, Any],
                    name: str = 'deq.backward') -> deq_lib.BackwardConfig:
  """`jreg.deq.BackwardConfig` of a config's `deq.backward` group.

  `mode` (default 'implicit': the implicit-function-theorem solve with the
  group's solver; 'phantom' / 'jfb' take `phantom_steps`, `phantom_damping`;
  'reversible' needs `deq.forward.solver = 'reversible'`, checked by the layer).
  """
  mode = group.get('mode', 'implicit')
  if mode not in BACKWARD_MODES:
    raise ValueError(f'{name}.mode must be one of {BACKWARD_MODES}, got {mode!r}.')
  extra = {key: group[key] for key in ('phantom_steps', 'phantom_damping')
           if key in group}
  return deq_lib.BackwardConfig(
      mode=mode, solver=solver_config(group, name, affine=True), **extra)


def compute_dtype(group: Mapping[str, Any], name: str = 'deq.compute_dtype'):
  """The DEQ cell's compute dtype of a config's `deq` group, range-checked.

  `deq.compute_dtype` is 'float32' (the default, also when the key is
  absent: no casting), 'bfloat16' or 'float16'; the latter two evaluate the
  equilibrium cell and its VJPs in that dtype while parameters, gradients,
  the solver state and the solvers stay float32
  (`jreg.deq.precision`). The speed-up needs an accelerator with fast
  bfloat16 / float16 units; on CPU the option is for correctness checks.

  Returns:
    None (float32) or the bfloat16 / float16 dtype, for `jreg.deq.DEQ`'s
    `compute_dtype`.

  Raises:
    ValueError: one sentence naming the key and its allowed values.
  """
  value = group.get('compute_dtype', 'float32')
  if value not in COMPUTE_DTYPES:
    raise ValueError(f'{name} must be one of {COMPUTE_DTYPES}, got {value!r}.')
  return precision.compute_dtype_of(value)


def check_jacobian(group: Mapping[str, Any]) -> None:
  """Ranges of a `jacobian` group (gamma >= 0, p in [0, 1], vectors >= 1).

  The adaptive-gamma keys are checked by `controller_config`.
  """
  for key in ('weight', 'weight_final', 'pretrain_weight'):
    if key in group and group[key] < 0:
      raise ValueError(f'jacobian.{key} (gamma) must be >= 0, got {group[key]}.')
  for key in ('probability', 'probability_final'):
    if key in group and not 0 <= group[key] <= 1:
      raise ValueError(f'jacobian.{key} must be a probability in [0, 1], got '
                       f'{group[key]}.')
  if group.get('num_vectors', 1) < 1:
    raise ValueError(f'jacobian.num_vectors must be >= 1, got '
                     f'{group["num_vectors"]}.')
  controller_config(group)


def controller_config(group: Mapping[str, Any]
                      ) -> adaptive.ControllerConfig | None:
  """The gamma controller of a `jacobian` group; None for adaptive='none'.

  Keys: `adaptive` ('none' | 'nfe': the training forward NFE |
  'spectral_radius': the power-iteration estimate of rho(J_f(z*)), measured
  on the steps that carry the Jacobian term), `target` (> 0), `gain` (>= 0),
  `weight_min`, `weight_max` (0 < weight_min <= weight <= weight_max; the
  run starts at gamma = `weight`), `ema` (decay in [0, 1)), `radius_iters`
  (power iterations, >= 2).

  Raises:
    ValueError: one sentence naming the key and its allowed values.
  """
  mode = group.get('adaptive', 'none')
  if mode not in ADAPTIVE:
    raise ValueError(f'jacobian.adaptive must be one of {ADAPTIVE}, got '
                     f'{mode!r}.')
  if mode == 'none':
    return None
  if not group['target'] > 0:
    raise ValueError(f'jacobian.target must be > 0, got {group["target"]}.')
  if group['gain'] < 0:
    raise ValueError(f'jacobian.gain must be >= 0, got {group["gain"]}.')
  if not 0 < group['weight_min'] <= group['weight'] <= group['weight_max']:
    raise ValueError(
        'an adaptive gamma needs 0 < jacobian.weight_min <= jacobian.weight '
        f'<= jacobian.weight_max, got {group["weight_min"]}, '
        f'{group["weight"]}, {group["weight_max"]}.')
  if not 0 <= group['ema'] < 1:
    raise ValueError(f'jacobian.ema must be in [0, 1), got {group["ema"]}.')
  if group['radius_iters'] < 2:
    raise ValueError(f'jacobian.radius_iters must be >= 2, got '
                     f'{group["radius_iters"]}.')
  return adaptive.ControllerConfig(
      target=float(group['target']), gain=float(group['gain']),
      weight_min=float(group['weight_min']),
      weight_max=float(group['weight_max']), ema_decay=float(group['ema']))


def adaptive_weight(controller: adaptive.ControllerConfig, mode: str,
                    initial_weight: float, info: Mapping[str, jax.Array],
                    is_training: bool) -> tuple[jax.Array, dict]:
  """gamma_t of an adaptive run, from Haiku state, after the DEQ call.

  Measures m_t = info['forward_nfe'] (mode 'nfe', every step) or
  info['spectral_radius'] (mode 'spectral_radius', on the steps where
  info['jacobian_applied'] is 1, the only steps where the layer estimated it:
  pass `spectral_radius=gate` to the layer), and stores the controller's
  update when `is_training`.

  Returns:
    (gamma_t, info plus `jacobian_weight` = gamma_t and
    `jacobian_controller_ema` = the smoothed measurement after this step;
    without the per-step `spectral_radius`, which is 0 on unmeasured steps).
  """
  info = dict(info)
  if mode == 'nfe':
    measurement, measured = info['forward_nfe'], True
  else:  # the per-step value is 0 on unmeasured steps: not a metric to average
    measurement = info.pop('spectral_radius')
    measured = info['jacobian_applied'] > 0
  weight, state = adaptive.haiku_weight(controller, initial_weight,
                                        measurement, measured, is_training)
  return weight, dict(info, jacobian_weight=weight,
                      jacobian_controller_ema=state.ema)


def linear_ramp(start: float, end: float, steps: int,
                step: jax.Array) -> jax.Array:
  """start + (end - start) * min(step / steps, 1): a gamma or p schedule.

  Constant when `start == end`; `step` may be traced (float32 []).
  """
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
  return start + (end - start) * frac


class UnconvergedLog:
  """Host side of `log_unconverged`: a window of training steps.

  `step(...)` is called once per training step with the step's unconverged
  fractions and mean residuals; after every `log_every` steps, if any step
  of the window had unconverged examples, one warning line is logged and
  returned (None otherwise), and the window restarts.
  """

  def __init__(self, log_every: int, forward_max_iter: int,
               backward_max_iter: int | None, stop_mode: str = 'rel'):
    self.log_every = max(int(log_every), 1)
    self.forward_max_iter = forward_max_iter
    self.backward_max_iter = backward_max_iter
    self.stop_mode = stop_mode
    self._reset()

  def _reset(self):
    self.steps = self.unconverged_steps = 0
    self.worst = {'forward': (0.0, 0.0), 'backward': (0.0, 0.0)}

  def step(self, forward_fraction, backward_fraction, forward_residual,
           backward_residual) -> str | None:
    self.steps += 1
    fractions = {'forward': (float(forward_fraction), float(forward_residual)),
                 'backward': (float(backward_fraction),
                              float(backward_residual))}
    if any(f > 0 for f, _ in fractions.values()):
      self.unconverged_steps += 1
    for key, (fraction, residual) in fractions.items():
      if fraction > 0:
        old = self.worst[key]
        self.worst[key] = (max(old[0], fraction), max(old[1], residual))
    if self.steps < self.log_every:
      return None
    line = None
    if self.unconverged_steps:
      parts = []
      for key, budget in (('forward', self.forward_max_iter),
                          ('backward', self.backward_max_iter)):
        fraction, residual = self.worst[key]
        if fraction > 0:
          parts.append(f'{key} up to {fraction:.1%} of examples (mean '
                       f'{self.stop_mode} residual up to {residual:.3g}, '
                       f'budget deq.{key}.max_iter={budget})')
      line = (f'DEQ solves were unconverged in {self.unconverged_steps} of the '
              f'last {self.steps} training steps: {"; ".join(parts)}.')
      logging.warning('%s', line)
    self._reset()
    return line


def log_unconverged(grad_fn: Callable, *, log_every: int,
                    forward_max_iter: int, backward_max_iter: int | None,
                    stop_mode: str = 'rel') -> Callable:
  """A training `grad_fn` that logs a warning line for unconverged solves.

  Reads the metrics `jreg.deq.DEQ` and `jreg.deq.value_and_grad` add
  (`forward_converged_fraction`, `backward_converged_fraction`, the mean
  residuals) and hands them to an `UnconvergedLog` on the host with one
  `jax.debug.callback` per step (under `pmap`: averaged over the devices,
  from the first device only): every `log_every` steps the log says, if
  any step of those had unconverged examples, how many, the largest
  unconverged fraction, residual and the budget of each direction.
  Backward modes without a backward solve report no backward fraction.

  Args:
    grad_fn: `jreg.train`'s grad_fn contract, with DEQ metrics.
    log_every: steps per window (the run's `log_every`).
    forward_max_iter, backward_max_iter: the budgets, for the message.
    stop_mode: the residual reported ('rel' or 'abs').

  Returns:
    grad_fn with the same outputs.
  """
  monitor = UnconvergedLog(log_every, forward_max_iter, backward_max_iter,
                           stop_mode)

  def wrapped(params, model_state, rng, batch, axis_name=None):
    out = grad_fn(params, model_state, rng, batch, axis_name)
    metrics = out[0][1][1]
    one, zero = jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32)
    values = [1.0 - metrics.get('forward_converged_fraction', one),
              1.0 - metrics.get('backward_converged_fraction', one),
              metrics.get(f'forward_{stop_mode}_residual', zero),
              metrics.get(f'backward_{stop_mode}_residual', zero)]
    values = [jnp.asarray(v, jnp.float32) for v in values]
    if axis_name is None:
      jax.debug.callback(monitor.step, *values)
    else:
      values = jax.lax.pmean(values, axis_name)
      jax.lax.cond(jax.lax.axis_index(axis_name) == 0,
                   lambda: jax.debug.callback(monitor.step, *values),
                   lambda: None)
    return out

  wrapped.monitor = monitor
  return wrapped


def log_unconverged_from_config(grad_fn: Callable, config) -> Callable:
  """`log_unconverged` with the run's `log_every` and `deq.*` budgets."""
  backward = config.deq.backward
  implicit = backward.get('mode', 'implicit') == 'implicit'
  return log_unconverged(
      grad_fn, log_every=config.log_every,
      forward_max_iter=config.deq.forward.max_iter,
      backward_max_iter=backward.max_iter if implicit else None,
      stop_mode=config.deq.forward.stop_mode)
