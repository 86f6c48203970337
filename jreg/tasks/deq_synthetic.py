"""The synthetic 1-D DEQ of Bai, Koltun & Kolter (ICML 2021, Sec. 5 / Fig. 5).

A scalar equilibrium model

    f(z; x) = W2^T ReLU(W1 z + U x + b),    prediction z*(x) = f(z*(x); x),

fitted to y = 1.5x^3 + x^2 - 5x + 2 sin x - 3 + delta (`jreg.data.synthetic`)
with the loss MSE(z*, y) + gamma * ||J_f(z*)||_F^2 / d on a random fraction p
of the steps (d = 1 here). Shapes: B batch; z, x, y are [B, 1].

`model(config)`, `loss_fn(config)`, `per_example_metrics(config)` (validation:
MSE at the training budget, NFE to reach the tolerance with the probe's high
budget, residual after the training budget, spectral radius |df/dz| at z*),
`summarize(history)` (from a run's whole `metrics.jsonl`) and `figures`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from jreg import deq as deq_lib
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import xla_cpu
from jreg.tasks import deq as deq_task

SLICE_X = -1.0  # the x of the slice figure


def cell_fn(config) -> Any:
  """The cell f(z, x) as a Haiku function (z, x: [B, 1] -> [B, 1])."""
  init = hk.initializers.RandomNormal(config.model.init_std)

  def cell(z, x):
    pre = (hk.Linear(config.model.hidden, w_init=init, b_init=init, name='w1')(z)
           + hk.Linear(config.model.hidden, with_bias=False, w_init=init,
                       name='u')(x))                                  # [B, H]
    return hk.Linear(1, with_bias=False, w_init=init, name='w2')(
        jax.nn.relu(pre))                                             # [B, 1]
  return cell


def cell(config) -> hk.Transformed:
  """f as a pure function `apply(cell_params, z, x)`."""
  return hk.without_apply_rng(hk.transform(cell_fn(config)))


def model(config) -> hk.TransformedWithState:
  """`apply(params, state, rng, batch, is_training) -> (loss, info)`."""
  forward_solver = deq_task.solver_config(config.deq.forward, 'deq.forward')
  backward = deq_task.backward_config(config.deq.backward, 'deq.backward')
  compute_dtype = deq_task.compute_dtype(config.deq)
  gamma = config.jacobian.weight
  controller = deq_task.controller_config(config.jacobian)
  mode = config.jacobian.get('adaptive', 'none')

  def forward(batch, is_training):
    layer = deq_lib.DEQ(cell_fn(config), name='deq', forward=forward_solver,
                        backward=backward, compute_dtype=compute_dtype,
                        spectral_radius_iters=config.jacobian.get(
                            'radius_iters', 50))
    apply_jr = False
    if is_training and gamma > 0:
      apply_jr = deq_lib.regularization_gate(hk.next_rng_key(),
                                             config.jacobian.probability)
    measure_radius = apply_jr if mode == 'spectral_radius' else False
    z_star, info = layer(batch['x'], jnp.zeros_like(batch['x']),
                         jacobian_loss=apply_jr,
                         spectral_radius=measure_radius)              # [B, 1]
    mse = jnp.mean(jnp.square(z_star - batch['y']))
    if controller is not None and is_training:
      weight, info = deq_task.adaptive_weight(controller, mode, gamma, info,
                                              is_training)
      return mse + weight * info['jacobian_loss'], dict(info, mse=mse)
    loss = mse + gamma * info['jacobian_loss'] if gamma > 0 else mse
    return loss, dict(info, mse=mse)

  return hk.transform_with_state(forward)


def sample_batch() -> dict[str, np.ndarray]:
  return {'x': np.zeros((1, 1), np.float32), 'y': np.zeros((1, 1), np.float32)}


def loss_fn(config):
  """The training objective in the engine's `loss_fn` contract."""
  transformed = model(config)

  def loss(params, model_state, rng, batch):
    (value, info), model_state = transformed.apply(params, model_state, rng,
                                                   batch, True)
    return value, (model_state, info)

  return loss


def init_fn(config):
  transformed = model(config)
  return lambda rng: transformed.init(rng, sample_batch(), True)


def per_example_metrics(config):
  """`(params, model_state, batch) -> dict of [B] metrics` (jitted once)."""
  f_apply = deq_lib.mixed_precision_cell(
      cell(config).apply, deq_task.compute_dtype(config.deq))
  train_solver = deq_task.solver_config(config.deq.forward)
  budget_only = train_solver._replace(tol=0.0)
  high_limit = train_solver._replace(max_iter=config.probe.max_iter)

  @xla_cpu.jit
  def metrics(params, model_state, batch):
    del model_state
    inner = deq_lib.cell_params(params)

    def one(x, y):  # one example as a batch of 1, so NFE is per example
      f = lambda z: f_apply(inner, z, x[None])
      z0 = jnp.zeros((1, 1))
      z_train, _ = deq_lib.solve(f, z0, train_solver)
      _, after_budget = deq_lib.solve(f, z0, budget_only)
      z_high, high = deq_lib.solve(f, z0, high_limit)
      rho = deq_lib.spectral_radius(f, z_high, jax.random.PRNGKey(0), 4)
      return {'mse': jnp.sum(jnp.square(z_train[0] - y)),
              'nfe_to_tol': high.nfe.astype(jnp.float32),
              'converged_high_limit': high.converged[0].astype(jnp.float32),
              'residual_after_budget': after_budget.abs_residual[0],
              'spectral_radius': rho[0]}

    return jax.vmap(one)(batch['x'], batch['y'])

  return metrics


def summarize(history: list[dict]) -> dict[str, Any]:
  """A run's headline numbers from its whole `metrics.jsonl` (`history`)."""
  train = [r for r in history if r['split'] == 'train']
  final = [r for r in history if r['split'] == 'eval'][-1]
  mean = lambda key: float(np.mean([r[key] for r in train]))  # noqa: E731
  return {
      'validation_mse': final['mse'],
      'nfe_to_tol': final['nfe_to_tol'],
      'converged_fraction_high_limit': final['converged_high_limit'],
      'residual_after_budget': final['residual_after_budget'],
      'spectral_radius': final['spectral_radius'],
      # Training-time solver behaviour, averaged over the logged windows.
      'train_forward_nfe': mean('forward_nfe'),
      'train_backward_nfe': mean('backward_nfe'),
      'train_forward_unconverged_fraction':
          1.0 - mean('forward_converged_fraction'),
      'train_backward_unconverged_fraction':
          1.0 - mean('backward_converged_fraction'),
      'final_train_mse': train[-1]['mse'],
      'final_jacobian_loss': train[-1].get('jacobian_loss'),
  }


def trajectory(f, solver: deq_lib.SolverConfig, z0: float = 0.0,
               max_iter: int = 12) -> np.ndarray:
  """The points at which `solver` evaluates f from z0 (eager, unrolled loop)."""
  visited = []

  def recording_f(z):
    visited.append(float(np.asarray(z)[0, 0]))
    return f(z)

  deq_lib.solve(recording_f, jnp.full((1, 1), z0),
                solver._replace(max_iter=max_iter, tol=0.0, unroll=True))
  return np.array(visited)


def figures(workdir: str, config, params: Mapping[str, Any],
            histories: Mapping[str, list[dict]]) -> list[str]:
  """surface.png, slice_x-1.png and training.png.

  Args:
    workdir: where the PNGs go.
    config: a run's config (the cell and solver settings are shared by runs).
    params: label -> trained parameters of the runs shown in the first two
      figures (the surface f(z; x) with the plane z_out = z and z*(x); the
      slice x = -1 with the solver's iterates).
    histories: label -> a run's whole `metrics.jsonl`, for the training curves.
  """
  f_apply = cell(config).apply
  solver = deq_task.solver_config(config.deq.forward)
  xs = np.linspace(-2, 2, 41, dtype=np.float32)
  zs = np.linspace(-6, 8, 57, dtype=np.float32)
  grid_x, grid_z = np.meshgrid(xs, zs)                             # [Z, X]
  curve_x = np.linspace(-2, 2, 101, dtype=np.float32)[:, None]     # [N, 1]
  paths = [os.path.join(workdir, name) for name in
           ('surface.png', 'slice_x-1.png', 'training.png')]
  outs = {label: np.asarray(f_apply(deq_lib.cell_params(p), grid_z.reshape(-1, 1),
                                    grid_x.reshape(-1, 1))).reshape(grid_z.shape)
          for label, p in params.items()}
  # One z range for every panel, so that the γ panels compare by eye.
  z_range = (min(zs.min(), *(o.min() for o in outs.values())),
             max(zs.max(), *(o.max() for o in outs.values())))
  with plotting.figure(paths[0], ncols=len(params), size=(5.5, 4.8)) as (fig, axes):
    for i, (label, p) in enumerate(params.items()):
      np.atleast_1d(axes)[i].remove()
      ax = fig.add_subplot(1, len(params), i + 1, projection='3d')
      inner = deq_lib.cell_params(p)
      ax.plot_surface(grid_x, grid_z, outs[label], cmap='viridis', alpha=0.6)
      ax.plot_surface(grid_x, grid_z, grid_z, color='grey', alpha=0.25)
      z_star, _ = deq_lib.solve(lambda z: f_apply(inner, z, curve_x),
                                jnp.zeros_like(curve_x),
                                solver._replace(max_iter=config.probe.max_iter))
      z_star = np.asarray(z_star)[:, 0]
      ax.plot(curve_x[:, 0], z_star, z_star, 'r-', lw=2.5, label='z*(x)')
      ax.set(xlabel='x', ylabel='z', zlabel='f(z; x)', title=label,
             zlim=z_range)
      ax.legend(fontsize='small')
  with plotting.figure(paths[1], ncols=len(params)) as (fig, axes):
    for ax, (label, p) in zip(np.atleast_1d(axes), params.items()):
      inner = deq_lib.cell_params(p)
      f = lambda z, inner=inner: f_apply(inner, z, jnp.full((1, 1), SLICE_X))
      visited = trajectory(f, solver)
      z_line = np.linspace(visited[-1] - 3, visited[-1] + 3, 121,
                           dtype=np.float32)[:, None]                # around z*
      out = np.asarray(f_apply(inner, z_line, np.full_like(z_line, SLICE_X)))
      values = np.array([float(f(jnp.full((1, 1), v))[0, 0]) for v in visited])
      ax.plot(z_line[:, 0], out[:, 0], label='f(z; x=-1)')
      ax.plot(z_line[:, 0], z_line[:, 0], 'k--', lw=0.8, label='z_out = z')
      ax.plot(visited, values, 'o-', color='C3', ms=4, lw=0.8,
              label=f'{solver.name} iterates')
      for k, (v, w) in enumerate(zip(visited[:6], values[:6])):
        ax.annotate(str(k), (v, w), fontsize=7)
      ax.set(xlabel='z', ylabel='f(z; x = -1)', title=label)
      ax.legend(fontsize='small')
      ax.grid(alpha=0.3)
  with plotting.figure(paths[2], ncols=3) as (_, axes):
    for ax, (key, logy) in zip(axes, (('mse', True), ('forward_abs_residual', True),
                                      ('jacobian_loss', False))):
      series = {label: metrics_lib.series(history, key)
                for label, history in histories.items()}
      plotting.curves(ax, series, 'step', key, logy=logy)
  return paths
