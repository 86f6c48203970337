r"""Explicit gradient regularisation of CIFAR-10 ResNets ([BD21] Section 6).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 6:
adding the implicit regulariser explicitly, L + μ‖∇L‖², to the training loss
of a ResNet-18 on CIFAR-10 raises its test accuracy over a range of μ. Each
point of the sweep over μ (μ = 0: plain training) and seeds
(`experiments/configs/egr_cifar10.py`) trains a CIFAR ResNet with batch norm
(`jreg.models.resnet`) with the standard augmentation (pad 4, random crop,
flip; `jreg.data`) in `W/runs/<name>/`, resuming there on its own. The
penalised gradient ∇L + 2μH∇L comes from `jreg.gradient_regularization`
(exact double backprop by default); batch-norm statistics are updated once
per step, by the plain evaluation.

`results.json` (test accuracy per run and its mean over seeds per μ) and the
figures are built from the runs' `metrics.jsonl` only.

    python -m experiments.egr_cifar10 --workdir=runs/egr
    python -m experiments.egr_cifar10 --workdir=runs/egr20 \
        --config.model.name=resnet20 --config.sweep.seed='(0,1,2)'
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import train
from jreg.tasks import igr
from jreg.tasks import optimizers
from jreg.tasks import runs as runs_lib


def train_run(config: ml_collections.ConfigDict, arrays, workdir: str) -> list[dict]:
  """Trains (or resumes, or reads back) one ResNet; returns its whole history."""
  task = igr.cifar_resnet_task(config.model.name, igr.conv_implementation(
      config.regularizer.coefficient, config.regularizer.method))
  optimizer, schedule = optimizers.make_optimizer(
      config.learning_rate, config.optimizer, config.num_steps)
  grad_fn = gr.gradient_penalty_grad_fn(
      task.loss_fn, coefficient=config.regularizer.coefficient,
      method=config.regularizer.method, fd_epsilon=config.regularizer.fd_epsilon)
  test_batches = lambda: data.cifar10_iterator(  # noqa: E731
      'test', config.eval_batch_size, mode='eval', arrays=arrays['test'])
  _, history = train.fit(
      workdir=workdir, init_fn=task.init, grad_fn=grad_fn, optimizer=optimizer,
      train_iter=data.cifar10_iterator('train', config.batch_size,
                                       seed=config.seed, arrays=arrays['train']),
      num_steps=config.num_steps, seed=config.seed, parallel=config.parallel,
      eval_fn=igr.classifier_evaluation(task, {'test': test_batches}),
      eval_every=config.eval_every, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every, learning_rate_fn=schedule,
      config=config.to_dict(), allow_config_change=True)
  return history


def run_result(config: ml_collections.ConfigDict, history: list[dict],
               run_dir: str) -> dict[str, Any]:
  """One run's line of results.json, from its config and its metrics.jsonl."""
  m = igr.cifar_resnet_task(config.model.name).num_params
  final = igr.final_record(history, config.num_steps, run_dir)
  last_train = [r for r in history if r['split'] == 'train'][-1]
  return dict(
      model=config.model.name, egr_coefficient=config.regularizer.coefficient,
      seed=config.seed, num_params=m, egr_rate=config.regularizer.coefficient * m,
      test_accuracy=final['test_accuracy'], test_loss=final['test_cross_entropy'],
      param_norm=final['param_norm'], final_train_loss=last_train['loss'],
      final_train_accuracy=last_train['accuracy'], final_r_ig=last_train['r_ig'],
      mean_train_loss=igr.training_mean(history, 'loss'),
      mean_r_ig=igr.training_mean(history, 'r_ig'))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every (μ, seed); writes results.json and two PNG figures."""
  cli.validate('egr_cifar10', config)
  arrays = igr.load_splits(config, data.load_cifar10)
  results, histories = {}, {}
  points = runs_lib.expand(config)
  for index, point in enumerate(points):
    metrics_lib.announce(f'EGR CIFAR-10: run {index + 1} of {len(points)}: {point.name}')
    run_dir = runs_lib.run_dir(workdir, point)
    histories[point.name] = train_run(point.config, arrays, run_dir)
    results[point.name] = run_result(point.config, histories[point.name], run_dir)
  summary = igr.summarize_egr(list(results.values()))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(dict(runs=results, summary=summary), f, indent=2)
    plot(results, histories, summary, os.path.join(workdir, 'test_accuracy_vs_mu.png'))
  return dict(summary=summary)


def plot(results, histories, summary, path) -> None:
  """Test accuracy against μ (each seed and the mean), and the training curves."""
  table = summary['by_coefficient']
  mus = [float(mu) for mu in table]
  with plotting.figure(path, ncols=2) as (_, axes):
    axes[0].plot([r['egr_coefficient'] for r in results.values()],
                 [r['test_accuracy'] for r in results.values()], 'o', alpha=0.5,
                 label='one seed')
    axes[0].errorbar(mus, [v['mean_test_accuracy'] for v in table.values()],
                     [v['std_test_accuracy'] for v in table.values()], marker='s',
                     color='k', capsize=3, label='mean ± std over seeds')
    axes[0].set(xlabel='EGR coefficient μ (on ‖∇L‖²)',
                ylabel='test accuracy (fraction)', title='CIFAR-10 test accuracy')
    axes[0].legend(fontsize='small')
    plotting.curves(axes[1], {name: metrics_lib.series(h, 'loss')
                              for name, h in histories.items()},
                    'SGD step', 'training loss (cross entropy, nats)',
                    'training loss of every run', logy=True)
    if any(mu > 0 for mu in mus):
      axes[0].set_xscale('symlog', linthresh=min(mu for mu in mus if mu > 0))
    for ax in axes:
      ax.grid(alpha=0.3)
    if len(histories) > 1:
      axes[1].legend(fontsize='xx-small')


if __name__ == '__main__':
  cli.main(run, 'egr_cifar10')
