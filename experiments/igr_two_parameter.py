r"""Implicit gradient regularisation in a two-parameter model ([BD21] Section 4).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 4 and
Fig. 1: the loss of one data point (x, y) under the model ŷ = a·b·x,
E(a, b) = ½ (y − a·b·x)², has a curve of global minima a·b = y/x, the
flattest of which (smallest ‖∇²E‖ and ‖θ‖) is a = b = √(y/x). Gradient
descent with learning rate h is compared with the exact flow θ' = −∇E and the
modified flow θ' = −∇Ẽ, Ẽ = E + (h/4)‖∇E‖² = E + λR_IG (λ = h·m/4, m = 2),
both integrated by RK4 in float64 (`jreg.tasks.igr`). Backward error analysis
([BD21] Theorem 3.1) predicts, after the same time T = n·h,
‖θₙ − θ_E(T)‖ = O(h) and ‖θₙ − θ_Ẽ(T)‖ = O(h²): the fitted slopes of both
errors against h are reported. The exact flow conserves a² − b²; a GD step
multiplies it by 1 − h²(y − abx)²x², so larger h ends nearer the flattest
minimum.

    python -m experiments.igr_two_parameter --workdir=runs/igr2
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jreg import cli
from jreg import gradient_regularization as gr
from jreg import plotting
from jreg.tasks import igr


def study(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict]:
  """The error orders, the endpoints and the trajectories (float64)."""
  loss = functools.partial(igr.two_parameter_loss, x=config.data.x, y=config.data.y)
  fields = (igr.exact_flow_field(loss), igr.modified_flow_field(loss))
  flows = jax.jit(lambda theta, h, time, keep_path=False: [  # exact, modified
      igr.rk4(f, theta, h, time, config.rk4_substeps, keep_path)
      for f in fields], static_argnums=3)
  descend = lambda h, n: igr.check_finite(  # noqa: E731
      f'gradient descent with h={h}', igr.gradient_descent(loss, theta0, h, n))
  theta0 = jnp.array([config.start.a, config.start.b], jnp.float64)
  flattest = np.full(2, np.sqrt(config.data.y / config.data.x))

  # 1. Error orders after the same time T = n·h.
  hs = [config.orders.time / n for n in config.orders.num_steps]
  errors = {'exact': [], 'modified': []}
  for h, n in zip(hs, config.orders.num_steps):
    theta = descend(h, n)[-1]
    for e, (end, _) in zip(errors.values(), flows(theta0, h, config.orders.time)):
      e.append(float(np.linalg.norm(theta - end)))

  # 2. Where gradient descent ends after the horizon, for each h.
  endpoints = []
  for h in config.endpoints.learning_rates:
    theta = np.asarray(descend(h, round(config.horizon / h))[-1])
    endpoints.append(dict(
        learning_rate=h, a=float(theta[0]), b=float(theta[1]),
        param_norm=float(np.linalg.norm(theta)),
        distance_to_flattest=float(np.linalg.norm(theta - flattest)),
        final_loss=float(loss(theta))))

  # 3. Trajectories of the phase-plane figure.
  h_m = config.phase_plane.moderate_learning_rate
  paths = {h: np.asarray(descend(h, round(config.horizon / h))) for h in
           (config.phase_plane.small_learning_rate, h_m)}
  (_, exact_path), _ = flows(theta0, 0.0, config.horizon, True)
  _, (_, modified_path) = flows(theta0, h_m, config.horizon, True)
  exact_end = np.asarray(exact_path[-1])
  results = dict(
      order_learning_rates=hs, error_to_exact_flow=errors['exact'],
      error_to_modified_flow=errors['modified'],
      slope_exact_flow=igr.log_log_slope(hs, errors['exact']),
      slope_modified_flow=igr.log_log_slope(hs, errors['modified']),
      flattest_minimum=flattest.tolist(), exact_flow_endpoint=exact_end.tolist(),
      exact_flow_param_norm=float(np.linalg.norm(exact_end)),
      endpoints=endpoints,
      # After the whole horizon, is GD with h_M nearer the modified flow?
      moderate_gd_to_exact_flow=float(np.linalg.norm(
          paths[h_m][-1] - np.asarray(flows(theta0, h_m, config.horizon)[0][0]))),
      moderate_gd_to_modified_flow=float(np.linalg.norm(
          paths[h_m][-1] - np.asarray(modified_path[-1]))),
      igr_rate_moderate=gr.implicit_regularization_rate(h_m, 2))
  return results, dict(gd=paths, exact=np.asarray(exact_path),
                       modified=np.asarray(modified_path))


def _enable_x64():
  """`jax.enable_x64(True)`; JAX 0.7 has it as `jax.experimental.enable_x64`."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64(True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the study; writes results.json and three PNG figures under workdir."""
  cli.validate('igr_two_parameter', config)
  with _enable_x64():
    results, paths = study(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
    plot(config, results, paths, workdir)
  return {k: results[k] for k in ('slope_exact_flow', 'slope_modified_flow')}


def plot(config, results, paths, workdir) -> None:
  """Phase plane ([BD21] Fig. 1), error orders and endpoints."""
  every = lambda p: p[::max(1, len(p) // 400)]  # noqa: E731
  with plotting.figure(os.path.join(workdir, 'phase_plane.png'),
                       size=(5.5, 5.0)) as (_, ax):
    a = np.linspace(1.0, 3.0, 200)
    ax.plot(a, config.data.y / config.data.x / a, 'k--', lw=1,
            label='minima a·b = y/x')
    ax.plot(*results['flattest_minimum'], 'kx', ms=10, label='flattest minimum')
    ax.plot(*every(paths['exact']).T, 'g-', label='exact flow of E')
    ax.plot(*every(paths['modified']).T, 'm-', label='modified flow, h = '
            f'{config.phase_plane.moderate_learning_rate}')
    for (h, path), colour in zip(paths['gd'].items(), ('tab:green', 'tab:red')):
      ax.plot(*every(path).T, '.', color=colour, ms=3, label=f'GD, h = {h}')
    ax.set(xlim=(1.0, 3.0), ylim=(1.5, 3.6), xlabel='a (dimensionless)',
           ylabel='b (dimensionless)', title='E = ½(y − abx)²')
    ax.legend(fontsize='x-small')
  with plotting.figure(os.path.join(workdir, 'error_orders.png')) as (_, ax):
    hs = results['order_learning_rates']
    plotting.curves(ax, {
        f'‖GD − exact flow‖ (slope {results["slope_exact_flow"]:.2f})':
            (hs, results['error_to_exact_flow']),
        f'‖GD − modified flow‖ (slope {results["slope_modified_flow"]:.2f})':
            (hs, results['error_to_modified_flow'])},
        xlabel='learning rate h', ylabel=f'‖θ error‖ at T = {config.orders.time}',
        title='backward error analysis', logx=True, logy=True, marker='o')
  with plotting.figure(os.path.join(workdir, 'endpoints.png')) as (_, ax):
    ends = results['endpoints']
    hs = [e['learning_rate'] for e in ends]
    plotting.curves(ax, {
        '‖θ‖ at the end': (hs, [e['param_norm'] for e in ends]),
        'distance to the flattest minimum':
            (hs, [e['distance_to_flattest'] for e in ends])},
        xlabel='learning rate h', ylabel='‖θ‖, distance (dimensionless)',
        marker='o', title=f'GD after time T = {config.horizon}')
    plotting.budget(ax, float(np.linalg.norm(results['flattest_minimum'])),
                    '‖θ‖ of the flattest minimum')


if __name__ == '__main__':
  cli.main(run, 'igr_two_parameter')
