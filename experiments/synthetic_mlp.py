"""Explicit-depth baseline on the synthetic 1-D regression task.

The task of Bai, Koltun & Kolter (ICML 2021), §5 and Appendix A.1: fit
y = 1.5x³ + x² − 5x + 2 sin x − 3 + δ from 4096 noisy pairs, validate on 1000
(`jreg.data.load_synthetic_1d` records the choices the paper leaves open).
The baseline is a small ReLU MLP trained like the paper's DEQ (Adam 1e-3 with
cosine decay, batch 64), the reference against which the DEQ of
`experiments/deq_synthetic.py` is read.

    python -m experiments.synthetic_mlp --workdir=runs/synthetic_mlp
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


def default_config() -> dict[str, Any]:
  return dict(
      hidden_sizes=(50, 50),   # ReLU layers before the scalar output
      epochs=50,
      batch_size=64,
      learning_rate=1e-3,      # Adam, cosine-decayed to 0 over the run
      seed=0,
      parallel='single',
      log_every=64,
      checkpoint_every=0,
  )


def quickstart_config() -> dict[str, Any]:
  # A larger step so that a few epochs already fit the cubic.
  return dict(default_config(), epochs=10, learning_rate=1e-2)


def _model(hidden_sizes):
  return hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP(list(hidden_sizes) + [1])(x)))  # [B, 1] -> [B, 1]


def run(config: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Trains the MLP; writes metrics.jsonl, results.json and fit.png to `workdir`."""
  config = dict(default_config(), **config)
  if config['epochs'] < 1 or config['batch_size'] < 1:
    raise ValueError('epochs and batch_size must be positive.')
  model = _model(config['hidden_sizes'])
  steps_per_epoch = data.load_synthetic_1d('train')['x'].shape[0] // config['batch_size']
  num_steps = config['epochs'] * steps_per_epoch
  schedule = optax.cosine_decay_schedule(config['learning_rate'], num_steps)

  def loss_fn(params, model_state, rng, batch):
    del rng
    mse = jnp.mean((model.apply(params, batch['x']) - batch['y']) ** 2)
    return mse, (model_state, {'mse': mse})

  @jax.jit
  def squared_error(params, model_state, batch):
    del model_state
    return {'mse': jnp.sum((model.apply(params, batch['x']) - batch['y']) ** 2, -1)}

  def eval_fn(params, model_state):
    batches = data.synthetic_1d_iterator('validation', 250, mode='eval')
    return train.evaluate(squared_error, params, model_state, batches)

  state, history = train.fit(
      workdir=workdir,
      init_fn=lambda rng: (model.init(rng, jnp.zeros((1, 1))), {}),
      grad_fn=train.value_and_grad(loss_fn),
      optimizer=optax.adam(schedule),
      train_iter=data.synthetic_1d_iterator('train', config['batch_size'],
                                            seed=config['seed']),
      num_steps=num_steps, seed=config['seed'], parallel=config['parallel'],
      eval_fn=eval_fn, log_every=config['log_every'],
      checkpoint_every=config['checkpoint_every'], learning_rate_fn=schedule)

  results = {
      'validation_mse': history[-1]['mse'],
      'noise_variance': data.synthetic.NOISE_VARIANCE,
      'num_params': int(sum(p.size for p in jax.tree.leaves(state.params))),
      'steps': num_steps,
  }
  if jax.process_index() != 0:
    return results
  validation = data.load_synthetic_1d('validation')
  x = np.linspace(-2, 2, 201, dtype=np.float32)[:, None]
  with plotting.figure(os.path.join(workdir, 'fit.png'), ncols=2) as (fig, axes):
    axes[0].scatter(validation['x'][:, 0], validation['y'][:, 0], s=3, alpha=0.4,
                    label='validation data')
    axes[0].plot(x[:, 0], data.synthetic.target_function(x)[:, 0], 'k--',
                 label='target (no noise)')
    axes[0].plot(x[:, 0], np.asarray(model.apply(state.params, x))[:, 0], 'C3',
                 label='MLP')
    axes[0].set(xlabel='x', ylabel='y', title='explicit MLP on the 1-D task')
    axes[0].legend(fontsize='small')
    plotting.curves(axes[1], {
        'train': train.metrics_lib.series(history, 'mse'),
        'validation': train.metrics_lib.series(history, 'mse', 'eval')},
                    'step', 'MSE', 'mean squared error', logy=True, marker='.')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  return results


def define_flags():
  flags.DEFINE_integer('epochs', 50, 'Training epochs.')
  flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
  flags.DEFINE_float('learning_rate', 1e-3, 'Peak Adam learning rate.')


def main(argv):
  del argv
  workdir = cli.start()
  if cli.QUICKSTART.value:
    config = quickstart_config()
  else:
    f = flags.FLAGS
    if f.epochs < 1 or f.batch_size < 1 or f.learning_rate <= 0:
      raise app.UsageError('--epochs, --batch_size and --learning_rate must be '
                           'positive.')
    config = dict(epochs=f.epochs, batch_size=f.batch_size,
                  learning_rate=f.learning_rate)
  config.update(seed=cli.SEED.value, parallel=cli.PARALLEL.value,
                log_every=cli.LOG_EVERY.value,
                checkpoint_every=cli.CHECKPOINT_EVERY.value)
  print(json.dumps(run(config, workdir)))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
