"""Explicit-depth baseline on the synthetic 1-D regression task.

The task of Bai, Koltun & Kolter (ICML 2021), §5 and Appendix A.1: fit
y = 1.5x³ + x² − 5x + 2 sin x − 3 + δ from 4096 noisy pairs, validate on 1000
(`jreg.data.load_synthetic_1d` records the choices the paper leaves open).
The baseline is a small ReLU MLP (`jreg.models.mlp`) trained like the paper's
DEQ (`experiments/configs/synthetic_mlp.py`: Adam 1e-3 with cosine decay,
batch 64), the reference against which the DEQ of
`experiments/deq_synthetic.py` is read. The run resumes in its workdir;
`results.json` and `fit.png` are built from the whole `metrics.jsonl` and
the final checkpoint.

    python -m experiments.synthetic_mlp --workdir=runs/synthetic_mlp
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jreg import cli
from jreg import data
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import train
from jreg.models import count_params
from jreg.models import mlp
from jreg.tasks import igr
from jreg.tasks import optimizers
from jreg.tasks import regression


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the MLP; writes metrics.jsonl, results.json and fit.png to `workdir`."""
  cli.validate('synthetic_mlp', config)
  model = mlp.mlp(tuple(config.model.hidden_sizes) + (1,))  # [B, 1] -> [B, 1]
  optimizer, schedule = optimizers.make_optimizer(
      config.learning_rate, config.optimizer, config.num_steps)
  per_example = regression.per_example_squared_error(model)

  def eval_fn(params, model_state):
    batches = data.synthetic_1d_iterator('validation', config.eval_batch_size,
                                         mode='eval')
    return train.evaluate(per_example, params, model_state, batches)

  state, history = train.fit(
      workdir=workdir,
      init_fn=lambda rng: (model.init(rng, jnp.zeros((1, 1))), {}),
      grad_fn=train.value_and_grad(regression.squared_error_loss(model)),
      optimizer=optimizer,
      train_iter=data.synthetic_1d_iterator('train', config.batch_size,
                                            seed=config.seed),
      num_steps=config.num_steps, seed=config.seed, parallel=config.parallel,
      eval_fn=eval_fn, eval_every=config.eval_every, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every, learning_rate_fn=schedule,
      config=config.to_dict(), allow_config_change=True)

  final = igr.final_record(history, config.num_steps, workdir)
  results = dict(validation_mse=final['mse'],
                 noise_variance=data.synthetic.NOISE_VARIANCE,
                 num_params=count_params(state.params), steps=config.num_steps)
  if jax.process_index() == 0:
    plot(model, state.params, history, os.path.join(workdir, 'fit.png'))
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  return results


def plot(model, params, history, path) -> None:
  """The learned function over the data, and the MSE over the whole run."""
  validation = data.load_synthetic_1d('validation')
  x = np.linspace(-2, 2, 201, dtype=np.float32)[:, None]  # [201, 1]
  with plotting.figure(path, ncols=2) as (_, axes):
    axes[0].scatter(validation['x'][:, 0], validation['y'][:, 0], s=3, alpha=0.4,
                    label='validation data')
    axes[0].plot(x[:, 0], data.synthetic.target_function(x)[:, 0], 'k--',
                 label='target (no noise)')
    axes[0].plot(x[:, 0], np.asarray(model.apply(params, x))[:, 0], 'C3',
                 label='MLP')
    axes[0].set(xlabel='x', ylabel='y', title='explicit MLP on the 1-D task')
    axes[0].legend(fontsize='small')
    plotting.curves(axes[1], {
        'train': metrics_lib.series(history, 'mse'),
        'validation': metrics_lib.series(history, 'mse', 'eval')},
                    'step', 'MSE (y units²)', 'mean squared error', logy=True,
                    marker='.')


if __name__ == '__main__':
  cli.main(run, 'synthetic_mlp')
