"""An adaptive Jacobian weight gamma: a multiplicative integral controller.

Bai, Koltun & Kolter ("Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021, Appendix, discussion of the regularisation
strength) observe that under a fixed gamma the Jacobian norm ||J_f(z*)||_F
keeps growing over training. Instead of a hand-tuned gamma(t), this module
holds a measured stability quantity m_t near a target m* (for example the
forward solver's NFE, free because the solver reports it, or the spectral
radius rho(J_f(z*)) from `jreg.deq.spectral_radius`) by adapting gamma:

  mbar_t           = m_t                                      (first measurement)
                   = beta * mbar_{t-1} + (1 - beta) * m_t     (later ones)
  log gamma_{t+1}  = clip(log gamma_t + k * (mbar_t - m*) / m*,
                          log gamma_min, log gamma_max),

and gamma_t, mbar_t unchanged on steps without a measurement. Rationale:

  * integral action in log space: a persistent excess of m drives gamma up
    geometrically until the excess vanishes (no steady-state error for a
    constant disturbance, e.g. the growing Jacobian norm), and gamma stays
    positive whatever the sign of the error;
  * the relative error (m - m*) / m* makes the gain k dimensionless, so the
    same k suits an NFE target (~10) and a spectral-radius target (~0.5);
    with `|(m - m*)/m*|` ~ 1, k is the largest change of log gamma per step;
  * the EMA (decay beta) averages the per-batch noise of m (NFE is an integer
    per batch, the power-iteration estimate is random) before it is
    integrated;
  * the clip is the integrator's anti-windup: when the target cannot be met
    (say gamma_max is not enough) log gamma does not run away, and it comes
    back as soon as the error changes sign.

The controller's state is three float32 scalars (float, so that a data-
parallel engine may average it across devices like other model state:
devices that start equal stay equal). `haiku_weight` keeps it as Haiku state
next to `jreg.deq.step_count`, so that it is checkpointed and restored with
the model.
"""
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

STATE_NAME = 'adaptive_jacobian_weight'


class ControllerConfig(NamedTuple):
  """Hyperparameters of the gamma controller (hashable, Python scalars)."""
  target: float         # m*, the target of the measured quantity (> 0)
  gain: float           # k, change of log gamma per unit relative error (>= 0)
  weight_min: float     # gamma_min (> 0)
  weight_max: float     # gamma_max (>= gamma_min)
  ema_decay: float = 0.9  # beta in [0, 1); 0: no smoothing


class ControllerState(NamedTuple):
  """The controller's running state (float32 [] each)."""
  log_weight: jax.Array  # log gamma_t
  ema: jax.Array         # mbar_{t-1}, smoothed measurement
  count: jax.Array       # measurements so far (float32, exact to 2**24)


def init(weight: float) -> ControllerState:
  """State with gamma_0 = `weight` (> 0) and no measurement yet."""
  return ControllerState(jnp.log(jnp.asarray(weight, jnp.float32)),
                         jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))


def weight(state: ControllerState) -> jax.Array:
  """gamma_t = exp(log gamma_t) (float32 [], no gradient)."""
  return jax.lax.stop_gradient(jnp.exp(state.log_weight))


def update(state: ControllerState, measurement: jax.Array,
           config: ControllerConfig, measured=True) -> ControllerState:
  """One step of the law in the module docstring.

  Args:
    state: (log gamma_t, mbar_{t-1}, count).
    measurement: m_t (scalar; its gradient is stopped).
    config: target, gain, bounds, EMA decay.
    measured: bool or traced bool []; when False the state is returned
      unchanged (e.g. a spectral radius measured only on some steps).

  Returns:
    (log gamma_{t+1}, mbar_t, count + 1), or `state` when not measured.
  """
  m = jax.lax.stop_gradient(jnp.asarray(measurement, jnp.float32))
  ema = jnp.where(state.count > 0,
                  config.ema_decay * state.ema + (1 - config.ema_decay) * m, m)
  step = config.gain * (ema - config.target) / config.target
  log_weight = jnp.clip(state.log_weight + step, jnp.log(config.weight_min),
                        jnp.log(config.weight_max)).astype(jnp.float32)
  new = ControllerState(log_weight, ema.astype(jnp.float32), state.count + 1)
  if measured is True:
    return new
  flag = jnp.asarray(measured, bool)
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, state)


def haiku_weight(config: ControllerConfig, initial_weight: float,
                 measurement: jax.Array, measured=True,
                 increment: bool = True) -> tuple[jax.Array, ControllerState]:
  """gamma_t from Haiku state; stores the state after m_t when `increment`.

  Call it after the DEQ layer (m_t comes from its info) and multiply the
  Jacobian term by the returned gamma_t, which depends on measurements up to
  step t - 1 only. Needs `hk.transform_with_state`; the state is the three
  float32 scalars `<STATE_NAME>_{log_weight,ema,count}` at the top level of
  the model state.

  Returns:
    (gamma_t, the state after this step's update).
  """
  start = init(initial_weight)
  state = ControllerState(*[
      hk.get_state(f'{STATE_NAME}_{field}', [], jnp.float32,
                   init=lambda *_, v=value: v)
      for field, value in zip(ControllerState._fields, start)])
  new = update(state, measurement, config, measured)
  if increment and not hk.running_init():
    for field, value in zip(ControllerState._fields, new):
      hk.set_state(f'{STATE_NAME}_{field}', value)
  return weight(state), new
