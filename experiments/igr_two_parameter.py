r"""Implicit gradient regularisation in a two-parameter model ([BD21] Section 4).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 4 and
Fig. 1: the loss of one data point (x, y) under the model ŷ = a·b·x,

    E(a, b) = ½ (y − a·b·x)²,

has a curve of global minima a·b = y/x. The flattest of them (smallest ‖∇²E‖,
smallest ‖θ‖) is a = b = √(y/x). Gradient descent with learning rate h,
θₙ₊₁ = θₙ − h∇E(θₙ), is compared with

  * the exact gradient flow        θ' = −∇E(θ),
  * the modified flow              θ' = −∇Ẽ(θ),  Ẽ = E + (h/4)‖∇E‖² = E + λR_IG,
                                   λ = h·m/4 = h/2 (m = 2 parameters),

both integrated by RK4 in `lax.scan` (float64, many substeps). Backward error
analysis ([BD21] Theorem 3.1) predicts, after the same time T = n·h,

    ‖θₙ − θ_E(T)‖ = O(h),     ‖θₙ − θ_Ẽ(T)‖ = O(h²);

the slopes of both errors against h on log-log axes are fitted and reported.
The flow of E conserves a² − b²; a GD step multiplies it by 1 − h²(y − abx)²x²,
so larger h ends nearer the balanced, flattest minimum a = b.

    python -m experiments.igr_two_parameter --workdir=/tmp/igr2
"""
from collections.abc import Mapping
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jreg import cli
from jreg import gradient_regularization as gr
from jreg import plotting


def default_config() -> dict[str, Any]:
  """The paper-scale configuration (seconds on a CPU)."""
  return dict(
      a0=2.8, b0=3.5,              # starting point (a₀, b₀), as in [BD21] Fig. 1
      x=1.0, y=3.0,                # the data point; minima lie on a·b = y/x
      small_learning_rate=0.005,   # h_S: GD close to the exact flow
      moderate_learning_rate=0.03,  # h_M: GD close to the modified flow
      horizon=20.0,                # time T of the plotted trajectories
      order_time=0.5,              # time T at which the error orders are measured
      order_num_steps=[20, 40, 80, 160, 320, 640],  # n; h = order_time / n
      # Up to ~2/λ_max(∇²E(θ₀)) = 0.075, the stability limit at the start.
      endpoint_learning_rates=[0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06],
      rk4_substeps=20000,          # RK4 steps per flow integration
  )


def quickstart_config() -> dict[str, Any]:
  """A configuration that runs in a few seconds."""
  return dict(default_config(), rk4_substeps=4000,
              order_num_steps=[20, 40, 80, 160, 320])


def _check_config(config: Mapping[str, Any]) -> None:
  for key in ('small_learning_rate', 'moderate_learning_rate', 'horizon',
              'order_time', 'x'):
    if not config[key] > 0:
      raise ValueError(f'{key} must be > 0, got {config[key]!r}.')
  if config['y'] / config['x'] <= 0:
    raise ValueError('y/x must be > 0 so that the minima a·b = y/x have a '
                     'balanced point a = b.')
  if len(config['order_num_steps']) < 3:
    raise ValueError('order_num_steps needs at least 3 values to fit a slope.')
  if min(config['order_num_steps']) < 1 or config['rk4_substeps'] < 10:
    raise ValueError('order_num_steps must be >= 1 and rk4_substeps >= 10.')
  if min(config['endpoint_learning_rates']) <= 0:
    raise ValueError('endpoint_learning_rates must all be > 0.')


def loss(theta: jax.Array, x: float, y: float) -> jax.Array:
  """E(a, b) = ½ (y − a·b·x)²; theta = [a, b]."""
  return 0.5 * (y - theta[0] * theta[1] * x) ** 2


def _fields(x, y):
  """The vector fields −∇E and −∇Ẽ (Ẽ = E + (h/4)‖∇E‖², via jreg)."""
  grad = jax.grad(loss)

  def exact_field(theta, h):
    del h
    return -grad(theta, x, y)

  def modified_field(theta, h):
    modified = lambda t: gr.modified_loss(loss(t, x, y), grad(t, x, y), h)  # noqa: E731
    return -jax.grad(modified)(theta)

  return grad, exact_field, modified_field


def _rk4(field, theta0, h, time, num_substeps: int, keep_path: bool):
  """Integrates θ' = field(θ, h) from θ₀ over [0, time] with classical RK4."""
  dt = time / num_substeps

  def step(theta, _):
    k1 = field(theta, h)
    k2 = field(theta + 0.5 * dt * k1, h)
    k3 = field(theta + 0.5 * dt * k2, h)
    k4 = field(theta + dt * k3, h)
    theta = theta + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return theta, theta if keep_path else None

  final, path = lax.scan(step, theta0, None, length=num_substeps)
  return final, path  # [2], [N, 2] or None


def _build(config):
  """Compiled GD and flow solvers for the configured data point."""
  x, y = float(config['x']), float(config['y'])
  grad, exact_field, modified_field = _fields(x, y)
  substeps = int(config['rk4_substeps'])

  @jax.jit
  def gd_endpoint(theta0, h, num_steps):
    return lax.fori_loop(0, num_steps, lambda _, t: t - h * grad(t, x, y), theta0)

  @jax.jit
  def flow_endpoints(theta0, h, time):
    exact, _ = _rk4(exact_field, theta0, h, time, substeps, False)
    modified, _ = _rk4(modified_field, theta0, h, time, substeps, False)
    return exact, modified

  @jax.jit
  def flow_paths(theta0, h, time):
    _, exact = _rk4(exact_field, theta0, h, time, substeps, True)
    _, modified = _rk4(modified_field, theta0, h, time, substeps, True)
    return exact, modified

  def gd_path(theta0, h, num_steps):
    def step(t, _):
      t = t - h * grad(t, x, y)
      return t, t
    _, path = jax.jit(lambda t0: lax.scan(step, t0, None, length=num_steps))(theta0)
    return jnp.concatenate([theta0[None], path])  # [n + 1, 2]

  return gd_endpoint, flow_endpoints, flow_paths, gd_path


def _fit_slope(hs, errors) -> float:
  """Least-squares slope of log(error) against log(h)."""
  return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


def _check_finite(name: str, value) -> np.ndarray:
  value = np.asarray(value)
  if not np.all(np.isfinite(value)):
    raise ValueError(f'{name} diverged (non-finite parameters): the learning '
                     'rate is beyond the stability limit of gradient descent '
                     'on this loss; use a smaller one.')
  return value


def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Runs the study, writes `results.json` and three PNGs, returns the results.

  Returns:
    A dict with the error orders ('slope_exact_flow' ≈ 1, 'slope_modified_flow'
    ≈ 2, with the errors and learning rates behind them) and the endpoints of
    GD for each of 'endpoint_learning_rates' (their ‖θ‖ and their distance to
    the flattest minimum a = b = √(y/x)).
  """
  config = dict(default_config(), **dict(config))
  _check_config(config)
  os.makedirs(workdir, exist_ok=True)
  with jax.enable_x64(True):
    results = _run(config, workdir)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  logging.info('two-parameter IGR: slopes %.3f (exact flow), %.3f (modified '
               'flow); results in %s', results['slope_exact_flow'],
               results['slope_modified_flow'], workdir)
  return results


def _run(config, workdir):
  gd_endpoint, flow_endpoints, flow_paths, gd_path = _build(config)
  theta0 = jnp.array([config['a0'], config['b0']], jnp.float64)
  x, y = config['x'], config['y']
  flattest = np.full(2, np.sqrt(y / x))

  # 1. Error orders after the same time T = n·h.
  time = float(config['order_time'])
  hs, exact_errors, modified_errors = [], [], []
  for n in config['order_num_steps']:
    h = time / n
    theta_gd = _check_finite(f'GD with h={h}', gd_endpoint(theta0, h, n))
    exact, modified = flow_endpoints(theta0, h, time)
    hs.append(h)
    exact_errors.append(float(np.linalg.norm(theta_gd - np.asarray(exact))))
    modified_errors.append(float(np.linalg.norm(theta_gd - np.asarray(modified))))
  slope_exact = _fit_slope(hs, exact_errors)
  slope_modified = _fit_slope(hs, modified_errors)

  # 2. Where GD ends, for a range of learning rates (same horizon).
  horizon = float(config['horizon'])
  endpoints = []
  for h in config['endpoint_learning_rates']:
    n = int(round(horizon / h))
    theta = _check_finite(f'GD with h={h}', gd_endpoint(theta0, h, n))
    endpoints.append(dict(
        learning_rate=float(h), a=float(theta[0]), b=float(theta[1]),
        param_norm=float(np.linalg.norm(theta)),
        distance_to_flattest=float(np.linalg.norm(theta - flattest)),
        final_loss=float(loss(jnp.asarray(theta), x, y))))
  exact_end, _ = flow_endpoints(theta0, 0.0, horizon)

  # 3. Trajectories for the phase-plane figure.
  paths = {}
  for label, h in (('small', config['small_learning_rate']),
                   ('moderate', config['moderate_learning_rate'])):
    n = int(round(horizon / h))
    paths[label] = _check_finite(f'GD with h={h}', gd_path(theta0, h, n))
  exact_path, _ = flow_paths(theta0, 0.0, horizon)
  _, modified_path = flow_paths(theta0, config['moderate_learning_rate'], horizon)
  # Which flow does GD with h_M end nearer, after the whole horizon?
  moderate_end = paths['moderate'][-1]
  exact_end_m, modified_end_m = flow_endpoints(
      theta0, config['moderate_learning_rate'], horizon)

  results = dict(
      config=config,
      order_time=time,
      order_learning_rates=hs,
      error_to_exact_flow=exact_errors,
      error_to_modified_flow=modified_errors,
      slope_exact_flow=slope_exact,
      slope_modified_flow=slope_modified,
      flattest_minimum=[float(v) for v in flattest],
      exact_flow_endpoint=[float(v) for v in np.asarray(exact_end)],
      exact_flow_param_norm=float(np.linalg.norm(np.asarray(exact_end))),
      endpoints=endpoints,
      moderate_gd_to_exact_flow=float(
          np.linalg.norm(moderate_end - np.asarray(exact_end_m))),
      moderate_gd_to_modified_flow=float(
          np.linalg.norm(moderate_end - np.asarray(modified_end_m))),
      igr_rate_moderate=gr.implicit_regularization_rate(
          config['moderate_learning_rate'], 2),
  )
  _plot(config, results, paths, np.asarray(exact_path), np.asarray(modified_path),
        workdir)
  return results


def _plot(config, results, paths, exact_path, modified_path, workdir):
  x, y = config['x'], config['y']
  with plotting.figure(os.path.join(workdir, 'phase_plane.png'),
                       size=(5.5, 5.0)) as (_, ax):
    every = lambda p: p[:: max(1, len(p) // 400)]  # noqa: E731
    a = np.linspace(1.0, 3.0, 200)
    ax.plot(a, y / x / a, 'k--', lw=1, label='minima a·b = y/x')
    ax.plot(*results['flattest_minimum'], 'kx', ms=10, label='flattest minimum')
    ax.plot(*every(exact_path).T, 'g-', label='exact flow of E')
    ax.plot(*every(modified_path).T, 'm-',
            label=f'modified flow, h={config["moderate_learning_rate"]}')
    for label, colour in (('small', 'tab:green'), ('moderate', 'tab:red')):
      h = config[f'{label}_learning_rate']
      ax.plot(*every(paths[label]).T, '.', color=colour, ms=3,
              label=f'GD, h={h}')
    ax.set_xlim(1.0, 3.0)
    ax.set_ylim(1.5, 3.6)
    ax.set_xlabel('a')
    ax.set_ylabel('b')
    ax.set_title('E = ½(y − abx)²')
    ax.legend(fontsize='x-small')
  with plotting.figure(os.path.join(workdir, 'error_orders.png')) as (_, ax):
    plotting.curves(ax, {
        f'‖GD − exact flow‖ (slope {results["slope_exact_flow"]:.2f})':
            (results['order_learning_rates'], results['error_to_exact_flow']),
        f'‖GD − modified flow‖ (slope {results["slope_modified_flow"]:.2f})':
            (results['order_learning_rates'], results['error_to_modified_flow']),
    }, xlabel='learning rate h', ylabel=f'error at T = {results["order_time"]}',
        logx=True, logy=True, marker='o')
  with plotting.figure(os.path.join(workdir, 'endpoints.png')) as (_, ax):
    hs = [e['learning_rate'] for e in results['endpoints']]
    plotting.curves(ax, {
        '‖θ‖ at the end': (hs, [e['param_norm'] for e in results['endpoints']]),
        'distance to the flattest minimum':
            (hs, [e['distance_to_flattest'] for e in results['endpoints']]),
    }, xlabel='learning rate h', ylabel='', marker='o',
        title=f'GD after time T = {config["horizon"]}')
    ax.axhline(np.linalg.norm(results['flattest_minimum']), color='k', ls=':',
               lw=1)


def define_flags():
  """Flags of this experiment (see `default_config` for their meaning)."""
  defaults = default_config()
  for key in ('a0', 'b0', 'x', 'y', 'small_learning_rate',
              'moderate_learning_rate', 'horizon', 'order_time'):
    flags.DEFINE_float(key, defaults[key], f'See default_config: {key}.')
  flags.DEFINE_list('order_num_steps', [str(n) for n in defaults['order_num_steps']],
                    'Step counts n; h = order_time / n.')
  flags.DEFINE_list('endpoint_learning_rates',
                    [str(h) for h in defaults['endpoint_learning_rates']],
                    'Learning rates whose endpoints are compared.')
  flags.DEFINE_integer('rk4_substeps', defaults['rk4_substeps'],
                       'RK4 steps per flow integration.')


def main(argv):
  del argv
  workdir = cli.start()
  fl = flags.FLAGS
  if cli.QUICKSTART.value:
    config = quickstart_config()
  else:
    try:
      config = {key: fl[key].value for key in default_config()
                if key not in ('order_num_steps', 'endpoint_learning_rates')}
      config['order_num_steps'] = [int(v) for v in fl.order_num_steps]
      config['endpoint_learning_rates'] = [float(v) for v in
                                           fl.endpoint_learning_rates]
    except ValueError as error:
      raise app.UsageError(f'A list flag has a non-numeric entry: {error}.')
  try:
    _check_config(dict(default_config(), **config))
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  results = run(config, workdir)
  print(json.dumps({k: results[k] for k in
                    ('slope_exact_flow', 'slope_modified_flow')}, indent=2))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
