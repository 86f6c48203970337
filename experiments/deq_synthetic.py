"""Jacobian regularisation of a tiny DEQ on the synthetic 1-D task.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization" (ICML 2021), Sec. 5 / Fig. 5 and Appendix A.1 / Table 4:
a scalar DEQ

    f(z; x) = W2^T ReLU(W1 z + U x + b),   hidden 50,   prediction = z*(x),

trained on y = 1.5x^3 + x^2 - 5x + 2 sin x - 3 + delta (jreg.data) for 50
epochs, batch 64, Adam 1e-3 with cosine decay, forward / backward NFE limits
6 / 6 and tolerances 1e-3 / 1e-4, the Jacobian term
gamma ||J_f(z*)||_F^2 / d (Hutchinson, one vector) applied on a fraction
p = 0.4 of the steps, for gamma in {0, 1, 2, 4}.

Measured per gamma on the validation split: MSE of z* (training solver
budget), NFE to reach the tolerance with a high budget, residual after 6 NFE,
spectral radius |df/dz| at z* (1-D, so the radius is |J|). Figures: the
surface z_out = f(z; x) with the plane z_out = z and the learned z*(x), and the
slice x = -1 with the solver's iterates, for gamma = 0 and the largest gamma.

    python -m experiments.deq_synthetic --workdir=runs/deq_synthetic
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jreg import cli
from jreg import data
from jreg import plotting
from jreg import train
import jreg.deq

SLICE_X = -1.0


def default_config() -> dict[str, Any]:
  return dict(
      gammas=(0.0, 1.0, 2.0, 4.0),  # Jacobian-term weights, one run each
      jacobian_prob=0.4,            # p: fraction of steps with the term
      hidden=50,
      init_std=0.1,                 # N(0, 0.01) read as variance 0.01
      epochs=50,
      batch_size=64,
      learning_rate=1e-3,           # Adam, cosine-decayed to 0
      solver='broyden',             # forward and backward (locuslab/deq's)
      forward_max_iter=6, forward_tol=1e-3,
      backward_max_iter=6, backward_tol=1e-4,
      stop_mode='abs',              # z is a scalar: absolute residual
      eval_max_iter=100,            # "high limit" for NFE-to-tolerance
      seed=0,
      parallel='single',
      log_every=64,
      checkpoint_every=0,
  )


def quickstart_config() -> dict[str, Any]:
  # A larger step so that a few epochs already fit the cubic (as synthetic_mlp).
  return dict(default_config(), epochs=3, gammas=(0.0, 2.0), learning_rate=1e-2,
              log_every=32)


def _cell_fn(hidden, init_std):
  init = hk.initializers.RandomNormal(init_std)

  def cell(z, x):  # z, x: [B, 1]
    pre = (hk.Linear(hidden, w_init=init, b_init=init, name='w1')(z) +
           hk.Linear(hidden, with_bias=False, w_init=init, name='u')(x))
    return hk.Linear(1, with_bias=False, w_init=init, name='w2')(
        jax.nn.relu(pre))                                          # [B, 1]
  return cell


def _solver(config, max_iter, tol, unroll=False):
  return jreg.deq.SolverConfig(name=config['solver'], max_iter=max_iter,
                               tol=tol, stop_mode=config['stop_mode'],
                               unroll=unroll)


def _model(config, gamma):
  cell = _cell_fn(config['hidden'], config['init_std'])

  def forward(batch, is_training):
    layer = jreg.deq.DEQ(
        cell, name='deq',
        forward=_solver(config, config['forward_max_iter'], config['forward_tol']),
        backward=jreg.deq.BackwardConfig(mode='implicit', solver=_solver(
            config, config['backward_max_iter'], config['backward_tol'])))
    apply_jr = False
    if is_training and gamma > 0:
      apply_jr = jreg.deq.regularization_gate(hk.next_rng_key(),
                                              config['jacobian_prob'])
    z0 = jnp.zeros_like(batch['x'])
    z_star, info = layer(batch['x'], z0, jacobian_loss=apply_jr)  # [B, 1]
    mse = jnp.mean(jnp.square(z_star - batch['y']))
    info = dict(info, mse=mse)
    loss = mse + gamma * info['jacobian_loss'] if gamma > 0 else mse
    return loss, info

  return hk.transform_with_state(forward), hk.without_apply_rng(
      hk.transform(cell))


def _evaluator(config, cell):
  """Per-example validation metrics of the learned f (jitted once)."""
  train_solver = _solver(config, config['forward_max_iter'], config['forward_tol'])
  budget_only = _solver(config, config['forward_max_iter'], 0.0)
  high_limit = _solver(config, config['eval_max_iter'], config['forward_tol'])

  @jax.jit
  def per_example(params, model_state, batch):
    del model_state
    inner = jreg.deq.cell_params(params)

    def one(x, y):  # one example as a batch of 1, so NFE is per example
      f = lambda z: cell.apply(inner, z, x[None])
      z0 = jnp.zeros((1, 1))
      z_train, _ = jreg.deq.solve(f, z0, train_solver)
      _, after_budget = jreg.deq.solve(f, z0, budget_only)
      z_high, high = jreg.deq.solve(f, z0, high_limit)
      rho = jreg.deq.spectral_radius(f, z_high, jax.random.PRNGKey(0), 4)
      return {'mse': jnp.sum(jnp.square(z_train[0] - y)),
              'nfe_to_tol': high.nfe.astype(jnp.float32),
              'converged_high_limit': high.converged[0].astype(jnp.float32),
              'residual_after_budget': after_budget.abs_residual[0],
              'spectral_radius': rho[0]}

    return jax.vmap(one)(batch['x'], batch['y'])

  return per_example


def _trajectory(f, config, z0=0.0, max_iter=12):
  """The points at which the solver evaluates f (eager, unrolled loop)."""
  visited = []

  def recording_f(z):
    visited.append(float(np.asarray(z)[0, 0]))
    return f(z)

  solver = _solver(config, max_iter, 0.0, unroll=True)
  jreg.deq.solve(recording_f, jnp.full((1, 1), z0), solver)
  return np.array(visited)


def _figures(workdir, config, runs, cell):
  """Surface + plane + z*(x), and the x = -1 slice with solver iterates."""
  shown = [g for g in (min(runs), max(runs))]
  shown = sorted(set(shown))
  xs = np.linspace(-2, 2, 41, dtype=np.float32)
  zs = np.linspace(-6, 8, 57, dtype=np.float32)
  grid_x, grid_z = np.meshgrid(xs, zs)                             # [Z, X]
  curve_x = np.linspace(-2, 2, 101, dtype=np.float32)[:, None]     # [N, 1]
  with plotting.figure(os.path.join(workdir, 'surface.png'), ncols=len(shown),
                       size=(5.5, 4.8)) as (fig, axes):
    axes = np.atleast_1d(axes)
    for i, gamma in enumerate(shown):
      axes[i].remove()
      ax = fig.add_subplot(1, len(shown), i + 1, projection='3d')
      inner = jreg.deq.cell_params(runs[gamma]['params'])
      out = np.asarray(cell.apply(inner, grid_z.reshape(-1, 1),
                                  grid_x.reshape(-1, 1))).reshape(grid_z.shape)
      ax.plot_surface(grid_x, grid_z, out, cmap='viridis', alpha=0.6)
      ax.plot_surface(grid_x, grid_z, grid_z, color='grey', alpha=0.25)
      f = lambda z: cell.apply(inner, z, curve_x)
      z_star, _ = jreg.deq.solve(f, jnp.zeros_like(curve_x),
                                 _solver(config, config['eval_max_iter'],
                                         config['forward_tol']))
      z_star = np.asarray(z_star)[:, 0]
      ax.plot(curve_x[:, 0], z_star, z_star, 'r-', lw=2.5, label='z*(x)')
      ax.set(xlabel='x', ylabel='z', zlabel='f(z; x)',
             title=f'gamma = {gamma:g}')
      ax.legend(fontsize='small')
  with plotting.figure(os.path.join(workdir, 'slice_x-1.png'), ncols=len(shown)
                       ) as (fig, axes):
    axes = np.atleast_1d(axes)
    for i, gamma in enumerate(shown):
      inner = jreg.deq.cell_params(runs[gamma]['params'])
      x = jnp.full((1, 1), SLICE_X)
      f = lambda z: cell.apply(inner, z, x)
      visited = _trajectory(f, config)
      z_line = np.linspace(visited[-1] - 3, visited[-1] + 3, 121,
                           dtype=np.float32)[:, None]                # around z*
      out = np.asarray(cell.apply(inner, z_line, np.full_like(z_line, SLICE_X)))
      values = np.array([float(f(jnp.full((1, 1), v))[0, 0]) for v in visited])
      ax = axes[i]
      ax.plot(z_line[:, 0], out[:, 0], label='f(z; x=-1)')
      ax.plot(z_line[:, 0], z_line[:, 0], 'k--', lw=0.8, label='z_out = z')
      ax.plot(visited, values, 'o-', color='C3', ms=4, lw=0.8,
              label=f'{config["solver"]} iterates')
      for k, (v, w) in enumerate(zip(visited[:6], values[:6])):
        ax.annotate(str(k), (v, w), fontsize=7)
      ax.set(xlabel='z', ylabel='f(z; x = -1)', title=f'gamma = {gamma:g}')
      ax.legend(fontsize='small')
      ax.grid(alpha=0.3)


def run(config: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Trains one DEQ per gamma; writes results.json and PNGs under workdir."""
  config = dict(default_config(), **config)
  if config['epochs'] < 1 or config['batch_size'] < 1:
    raise ValueError('epochs and batch_size must be positive.')
  if not 0.0 <= config['jacobian_prob'] <= 1.0:
    raise ValueError(f'jacobian_prob={config["jacobian_prob"]} is not in [0, 1].')
  if any(g < 0 for g in config['gammas']):
    raise ValueError(f'gammas must be >= 0, got {config["gammas"]}.')
  num_train = data.load_synthetic_1d('train')['x'].shape[0]
  num_steps = config['epochs'] * (num_train // config['batch_size'])
  schedule = optax.cosine_decay_schedule(config['learning_rate'], num_steps)
  results, runs = {}, {}
  for gamma in config['gammas']:
    model, cell = _model(config, gamma)
    per_example = _evaluator(config, cell)

    def loss_fn(params, model_state, rng, batch, model=model):
      (loss, info), model_state = model.apply(params, model_state, rng, batch,
                                              True)
      return loss, (model_state, info)

    def eval_fn(params, model_state, per_example=per_example):
      batches = data.synthetic_1d_iterator('validation', 250, mode='eval')
      return train.evaluate(per_example, params, model_state, batches)

    sample = {'x': np.zeros((1, 1), np.float32), 'y': np.zeros((1, 1), np.float32)}
    run_dir = os.path.join(workdir, f'gamma_{gamma:g}')
    state, history = train.fit(
        workdir=run_dir,
        init_fn=lambda rng, model=model: model.init(rng, sample, True),
        grad_fn=jreg.deq.value_and_grad(loss_fn),
        optimizer=optax.adam(schedule),
        train_iter=data.synthetic_1d_iterator('train', config['batch_size'],
                                              seed=config['seed']),
        num_steps=num_steps, seed=config['seed'], parallel=config['parallel'],
        eval_fn=eval_fn, log_every=config['log_every'],
        checkpoint_every=config['checkpoint_every'], learning_rate_fn=schedule)
    train_records = [r for r in history if r['split'] == 'train']
    evaluation = [r for r in history if r['split'] == 'eval'][-1]
    results[f'{gamma:g}'] = {
        'validation_mse': evaluation['mse'],
        'nfe_to_tol': evaluation['nfe_to_tol'],
        'converged_fraction_high_limit': evaluation['converged_high_limit'],
        'residual_after_6_nfe': evaluation['residual_after_budget'],
        'spectral_radius': evaluation['spectral_radius'],
        # Training-time solver behaviour, averaged over the logged windows.
        'train_forward_nfe': float(np.mean(
            [r['forward_nfe'] for r in train_records])),
        'train_backward_nfe': float(np.mean(
            [r['backward_nfe'] for r in train_records])),
        'train_forward_unconverged_fraction': float(np.mean(
            [1.0 - r['forward_converged_fraction'] for r in train_records])),
        'train_backward_unconverged_fraction': float(np.mean(
            [1.0 - r['backward_converged_fraction'] for r in train_records])),
        'final_train_mse': train_records[-1]['mse'],
        'final_jacobian_loss': (train_records[-1]['jacobian_loss']
                                if gamma > 0 else None),
    }
    runs[gamma] = {'params': state.params, 'history': history}
    print(f'gamma={gamma:g}: ' + json.dumps(results[f'{gamma:g}']), flush=True)

  summary = {'per_gamma': results, 'steps_per_run': num_steps,
             'noise_variance': data.synthetic.NOISE_VARIANCE,
             'config': {k: list(v) if isinstance(v, tuple) else v
                        for k, v in config.items()}}
  if jax.process_index() == 0:
    _figures(workdir, config, runs, _model(config, 0.0)[1])
    with plotting.figure(os.path.join(workdir, 'training.png'),
                         ncols=3) as (fig, axes):
      panels = (('mse', axes[0], True), ('forward_abs_residual', axes[1], True),
                ('jacobian_loss', axes[2], False))
      for key, ax, logy in panels:
        series = {f'gamma={g:g}': train.metrics_lib.series(r['history'], key)
                  for g, r in runs.items()}
        plotting.curves(ax, series, 'step', key, logy=logy)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


def define_flags():
  flags.DEFINE_integer('epochs', 50, 'Training epochs per gamma.')
  flags.DEFINE_list('gammas', ['0', '1', '2', '4'], 'Jacobian-term weights.')
  flags.DEFINE_float('jacobian_prob', 0.4, 'Fraction of steps with the term.')
  flags.DEFINE_float('learning_rate', 1e-3, 'Peak Adam learning rate.')
  flags.DEFINE_enum('solver', 'broyden', ['broyden', 'anderson', 'fixed_point'],
                    'Forward and backward solver.')


def main(argv):
  del argv
  workdir = cli.start()
  if cli.QUICKSTART.value:
    config = quickstart_config()
  else:
    f = flags.FLAGS
    try:
      gammas = tuple(float(g) for g in f.gammas)
    except ValueError:
      raise app.UsageError(f'--gammas must be numbers, got {f.gammas}.') from None
    if (f.epochs < 1 or any(g < 0 for g in gammas) or
        not 0 <= f.jacobian_prob <= 1 or f.learning_rate <= 0):
      raise app.UsageError('--epochs must be >= 1, --gammas >= 0, '
                           '--jacobian_prob in [0, 1], --learning_rate > 0.')
    config = dict(epochs=f.epochs, gammas=gammas, jacobian_prob=f.jacobian_prob,
                  solver=f.solver, learning_rate=f.learning_rate)
  config.update(seed=cli.SEED.value, parallel=cli.PARALLEL.value,
                log_every=cli.LOG_EVERY.value,
                checkpoint_every=cli.CHECKPOINT_EVERY.value)
  print(json.dumps(run(config, workdir)))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
