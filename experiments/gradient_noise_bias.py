r"""How much gradient noise inflates ‖∇L_B‖² on MNIST, and the unbiased estimate.

On a minibatch B drawn from a population of N examples (here: MNIST's
training set, or its first `train_examples`), the squared norm of the batch
gradient overestimates the squared norm of the full-batch gradient G = ∇L:

    E‖ḡ_B‖² = ‖G‖² + (tr Σ / B)·(N − B)/(N − 1)       (B drawn without replacement)

with Σ the population covariance of one example's gradient. Splitting the
batch into halves A, B' gives U = ⟨g_A, g_B'⟩ with E[U] = ‖G‖² − tr Σ/(N − 1)
(exactly ‖G‖² for independent draws), the estimate the unbiased penalty
(`jreg.gradient_regularization.unbiased_penalty_grad_fn`) penalises.

For a one-hidden-layer ReLU MLP, at initialisation and after `train_steps`
steps of plain SGD, this computes G and tr Σ exactly from per-example
gradients of the whole population, then averages ‖ḡ_B‖² and U over
`num_draws` random batches at each batch size, and compares the measured bias
with the closed form.

    python -m experiments.gradient_noise_bias --workdir=/tmp/noise_bias \
        [--config=experiments/configs/gradient_noise_bias.py:PRESET]
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jreg import cli
from jreg import data
from jreg.data import augment
from jreg import gradient_regularization as gr
from jreg.models import count_params
from jreg import plotting
from jreg import tasks
from jreg import train


def mlp(width: int) -> hk.Transformed:
  """[B, 28, 28, 1] -> [B, 10] logits through one hidden ReLU layer."""
  def forward(images):
    return hk.nets.MLP([width, 10])(images.reshape((images.shape[0], -1)))
  return hk.without_apply_rng(hk.transform(forward))


def population_statistics(loss, params, images, labels, chunk_size):
  """(‖G‖², tr Σ) with G the mean gradient, from every example's gradient.

  tr Σ = (1/N) Σₙ ‖gₙ‖² − ‖G‖² (population covariance of one example's
  gradient gₙ).
  """
  @jax.jit
  def chunk_sums(x, y):   # x [C, 28, 28, 1]
    summed = jax.grad(lambda p: loss(p, x, y) * x.shape[0])(params)  # Σₙ gₙ
    norms_sq = jax.vmap(lambda xn, yn: gr.gradient_norm_sq(
        jax.grad(loss)(params, xn[None], yn[None])))(x, y)           # [C]
    return summed, jnp.sum(norms_sq)

  n = len(labels)
  if n % chunk_size:
    raise ValueError(f'The population of {n} examples is not a multiple of '
                     f'chunk_size={chunk_size}.')
  total, total_sq = None, 0.0
  for start in range(0, n, chunk_size):
    summed, norms_sq = chunk_sums(images[start:start + chunk_size],
                                  labels[start:start + chunk_size])
    total = summed if total is None else jax.tree.map(jnp.add, total, summed)
    total_sq += float(norms_sq)
  norm_sq = float(gr.gradient_norm_sq(total)) / n ** 2
  return norm_sq, total_sq / n - norm_sq


def measure(loss, params, images, labels, config, rng) -> dict[str, Any]:
  """The naive and split estimates against the exact values at `params`."""
  n = len(labels)
  norm_sq, trace = population_statistics(loss, params, images, labels,
                                         config['chunk_size'])

  @jax.jit
  def estimates(x, y):   # x [B, 28, 28, 1]: (‖ḡ_B‖², U from two halves)
    halves = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(
        params, x.reshape((2, -1) + x.shape[1:]), y.reshape(2, -1))
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), halves)
    return gr.gradient_norm_sq(mean), gr.unbiased_gradient_norm_sq(halves)

  rows = []
  for batch in config['batch_sizes']:
    draws = np.array([
        jax.device_get(estimates(images[index], labels[index]))
        for index in (rng.choice(n, batch, replace=False)
                      for _ in range(config['num_draws']))])  # [draws, 2]
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    rows.append(dict(
        batch_size=batch,
        naive_mean=float(mean[0]), naive_se=float(se[0]),
        naive_bias=float(mean[0] - norm_sq),
        predicted_naive_bias=trace / batch * (n - batch) / (n - 1),
        unbiased_mean=float(mean[1]), unbiased_se=float(se[1]),
        unbiased_bias=float(mean[1] - norm_sq),
        predicted_unbiased_bias=-trace / (n - 1)))
    logging.info('B=%d: ‖G‖² %.4g, naive bias %.4g ± %.2g (predicted %.4g), '
                 'split bias %.3g ± %.2g', batch, norm_sq, rows[-1]['naive_bias'],
                 se[0], rows[-1]['predicted_naive_bias'],
                 rows[-1]['unbiased_bias'], se[1])
  return dict(full_grad_norm_sq=norm_sq, trace_sigma=trace, population=n,
              rows=rows)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Measures at initialisation and after training; writes results.json and
  gradient_noise_bias.png under `workdir`; returns the results."""
  settings = config.to_dict()
  config = dict(width=config.model.width,
                train_examples=config.data.train_examples,
                batch_sizes=list(config.measure.batch_sizes),
                num_draws=config.measure.num_draws,
                chunk_size=config.measure.chunk_size,
                train_steps=config.num_steps,
                train_batch_size=config.batch_size,
                learning_rate=config.learning_rate, seed=config.seed,
                log_every=config.log_every,
                data=tasks.data_source(config.data.source, config.data.dir))
  os.makedirs(workdir, exist_ok=True)
  source, data_dir = config['data']
  arrays = data.first_examples(
      data.load_mnist('train', source=source, data_dir=data_dir),
      config['train_examples'])
  images = jnp.asarray(augment.normalize(     # [N, 28, 28, 1]
      arrays['image'], augment.MNIST_MEAN, augment.MNIST_STD))
  labels = jnp.asarray(arrays['label'])       # [N]
  model = mlp(config['width'])

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(params, x), y).mean()

  def loss_fn(params, model_state, rng, batch):
    del rng
    return loss(params, batch['image'], batch['label']), (model_state, {})

  init_fn = lambda rng: (model.init(rng, images[:1]), {})  # noqa: E731
  optimizer = optax.sgd(config['learning_rate'])
  points = {'initialisation': train.init_state(init_fn, optimizer,
                                               config['seed']).params}
  if config['train_steps']:   # restartable: a finished run is read back
    state, _ = train.fit(
        workdir=os.path.join(workdir, 'train'), init_fn=init_fn,
        grad_fn=train.value_and_grad(loss_fn), optimizer=optimizer,
        train_iter=data.mnist_iterator('train', config['train_batch_size'],
                                       seed=config['seed'], arrays=arrays),
        num_steps=config['train_steps'], seed=config['seed'],
        log_every=config['log_every'], checkpoint_every=0,
        tensorboard=False)
    points[f'after {config["train_steps"]} SGD steps'] = state.params
  rng = np.random.default_rng(config['seed'])
  results = dict(config=settings, num_params=count_params(
      points['initialisation']), points={})
  for name, params in points.items():
    logging.info('measuring at %s', name)
    results['points'][name] = measure(loss, params, images, labels, config, rng)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  _plot(results, os.path.join(workdir, 'gradient_noise_bias.png'))
  return results


def _plot(results, path):
  points = results['points']
  with plotting.figure(path, ncols=len(points)) as (_, axes):
    axes = np.atleast_1d(axes)
    for ax, (name, point) in zip(axes, points.items()):
      rows = point['rows']
      batch = [r['batch_size'] for r in rows]
      ax.errorbar(batch, [r['naive_bias'] for r in rows],
                  yerr=[2 * r['naive_se'] for r in rows], fmt='o',
                  label='measured E‖ḡ_B‖² − ‖G‖² (±2 SE)')
      ax.plot(batch, [r['predicted_naive_bias'] for r in rows], '-',
              label='tr Σ/B · (N−B)/(N−1)')
      ax.errorbar(batch, [abs(r['unbiased_bias']) for r in rows],
                  yerr=[2 * r['unbiased_se'] for r in rows], fmt='s',
                  label='|E⟨g_A, g_B⟩ − ‖G‖²| (±2 SE)')
      ax.axhline(point['full_grad_norm_sq'], color='k', ls=':',
                 label='‖G‖² (full batch)')
      ax.set(xscale='log', yscale='log', xlabel='batch size B',
             ylabel='squared gradient norm ((nat / param. unit)²)',
             title=f'MNIST MLP, {name}')
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize='x-small')


if __name__ == '__main__':
  cli.main(run, 'gradient_noise_bias')
