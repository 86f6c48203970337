r"""IGR in MNIST MLPs: R_IG and test accuracy against λ = h·m/4 ([BD21] Section 5).

Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, Section 5:
5-layer ReLU MLPs (`jreg.models.mlp.mnist_mlp`) of several widths are trained
on MNIST with plain SGD at several learning rates h. Backward error analysis
gives each run an implicit regularisation rate λ = h·m/4 (m parameters) on
R_IG = ‖∇L‖²/m; the paper finds that runs with larger λ end with smaller
R_IG and, among those reaching 100% training accuracy, higher test accuracy.
Runs with μ = `regularizer.coefficient` > 0 train on L + μ‖∇L‖² ([BD21]
Section 6; an explicit rate μ·m in R_IG units).

Each point of the sweep (`experiments/configs/igr_mnist_sweep.py`) trains in
`W/runs/<name>/` and resumes there on its own. At its last step a run
measures R_IG of the full training-set loss, train and test accuracy and ‖θ‖
(`jreg.tasks.igr.classifier_evaluation`, logged to its `metrics.jsonl`);
`results.json` and the figures are built from those files only, so a killed
and restarted command reports what an uninterrupted one would.

With `stop_train_accuracy` (e.g. 1.0, the paper's comparison at 100%
training accuracy) each run stops at the first evaluation, every
`eval_every` steps, that reaches it, and `num_steps` becomes a cap;
`results.json` says per run where it stopped (`steps`) and whether it reached
the rule (`reached_stop_rule`).

    python -m experiments.igr_mnist_sweep --workdir=runs/mnist
    python -m experiments.igr_mnist_sweep --workdir=runs/mnist_small \
        --config=experiments/configs/igr_mnist_sweep.py:small
    python -m experiments.igr_mnist_sweep --workdir=runs/mnist_to_rule \
        --config.stop_train_accuracy=1.0 --config.eval_every=250
    python -m experiments.igr_mnist_sweep --workdir=runs/mnist_egr \
        --config.sweep.model_width='(400,)' --config.sweep.learning_rate='(0.05,)' \
        --config.sweep.regularizer_coefficient='(0,0.01,0.05)'
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import optax

from jreg import checkpoint as checkpoint_lib
from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import train
from jreg.tasks import igr
from jreg.tasks import runs as runs_lib


def train_run(config: ml_collections.ConfigDict, arrays, workdir: str) -> list[dict]:
  """Trains (or resumes, or reads back) one MLP; returns its whole history."""
  task = igr.mnist_mlp_task(config.model.width, config.model.num_layers)
  grad_fn = gr.gradient_penalty_grad_fn(
      task.loss_fn, coefficient=config.regularizer.coefficient,
      learning_rate=config.learning_rate, method=config.regularizer.method,
      fd_epsilon=config.regularizer.fd_epsilon)
  eval_batches = {split: (lambda split=split: data.mnist_iterator(
      split, config.eval_batch_size, mode='eval', arrays=arrays[split]))
                  for split in ('train', 'test')}
  eval_fn = igr.classifier_evaluation(task, eval_batches, r_ig_split='train')

  def fit(num_steps):
    _, history = train.fit(
        workdir=workdir, init_fn=task.init, grad_fn=grad_fn,
        optimizer=optax.sgd(config.learning_rate),
        train_iter=data.mnist_iterator('train', config.batch_size,
                                       seed=config.seed, arrays=arrays['train']),
        num_steps=num_steps, seed=config.seed, parallel=config.parallel,
        eval_fn=eval_fn, eval_every=config.eval_every, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, config=config.to_dict(),
        allow_config_change=True)
    return history

  if not config.stop_train_accuracy:
    return fit(config.num_steps)
  # The stopping rule: train in segments of eval_every steps (each ends with
  # an evaluation and a checkpoint) until an evaluation reaches the training
  # accuracy, or num_steps. What was trained is read back from the records of
  # metrics.jsonl up to the newest saved checkpoint (the later ones are
  # trained again), so a command killed at any moment, even between an
  # evaluation and its checkpoint, continues where the saved state stopped.
  saved = checkpoint_lib.saved_steps(workdir)
  history = ([r for r in metrics_lib.read_history(workdir) if r['step'] <= saved[-1]]
             if saved else [])
  end = stop_step(config, history)
  if end is not None and end == saved[-1]:
    # Finished by an earlier command: `fit` checks the last checkpoint (a
    # damaged one is trained again) and returns the whole history.
    return fit(end)
  while end is None:
    done = max([r['step'] for r in history if r.get('split') == 'eval'], default=0)
    history = fit(min(done + config.eval_every, config.num_steps))
    end = stop_step(config, history)
  return history


def stop_step(config: ml_collections.ConfigDict,
              history: list[dict]) -> int | None:
  """The step at which a run ends: num_steps, or with `stop_train_accuracy`
  the first evaluation reaching it (None while neither is logged)."""
  evals = [r for r in history if r.get('split') == 'eval']
  if config.stop_train_accuracy:
    for r in evals:
      if r['train_accuracy'] >= config.stop_train_accuracy:
        return r['step']
  return config.num_steps if any(r['step'] == config.num_steps for r in evals) else None


def run_result(config: ml_collections.ConfigDict, history: list[dict],
               run_dir: str) -> dict[str, Any]:
  """One run's line of results.json, from its config and its metrics.jsonl."""
  m = igr.mnist_mlp_task(config.model.width, config.model.num_layers).num_params
  end = stop_step(config, history)
  final = igr.final_record(history, config.num_steps if end is None else end,
                           run_dir)
  mu = config.regularizer.coefficient
  return dict(
      steps=final['step'],
      reached_stop_rule=bool(config.stop_train_accuracy and
                             final['train_accuracy'] >= config.stop_train_accuracy),
      width=config.model.width, learning_rate=config.learning_rate,
      egr_coefficient=mu, num_params=m,
      igr_rate=gr.implicit_regularization_rate(config.learning_rate, m),
      egr_rate=mu * m, r_ig=final['r_ig'], param_norm=final['param_norm'],
      train_accuracy=final['train_accuracy'], test_accuracy=final['test_accuracy'],
      final_train_loss=final['train_cross_entropy'],
      test_loss=final['test_cross_entropy'],
      mean_logged_r_ig=igr.training_mean(history, 'r_ig'))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every run of the sweep; writes results.json and two PNG figures."""
  cli.validate('igr_mnist_sweep', config)
  arrays = igr.load_splits(config, data.load_mnist)
  results, histories = {}, {}
  points = runs_lib.expand(config)
  for index, point in enumerate(points):
    metrics_lib.announce(f'MNIST sweep: run {index + 1} of {len(points)}: {point.name}')
    run_dir = runs_lib.run_dir(workdir, point)
    histories[point.name] = train_run(point.config, arrays, run_dir)
    results[point.name] = run_result(point.config, histories[point.name], run_dir)
  summary = igr.summarize_sweep(list(results.values()))
  print(summary['message'], flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(dict(runs=results, summary=summary), f, indent=2)
    plot_rates(results, os.path.join(workdir, 'r_ig_and_test_accuracy_vs_rate.png'))
    plot_training(histories, os.path.join(workdir, 'training_curves.png'))
  return dict(summary=summary)


def plot_rates(results: dict[str, dict], path: str) -> None:
  """[BD21] Fig. 2: final R_IG and test accuracy against λ (+ μ·m)."""
  widths = sorted({r['width'] for r in results.values()})
  colours = {w: f'C{i}' for i, w in enumerate(widths)}
  with plotting.figure(path, ncols=2) as (_, axes):
    for r in results.values():
      style = dict(color=colours[r['width']], ms=7, ls='',
                   marker='s' if r['egr_coefficient'] > 0 else 'o',
                   mfc='none' if r['egr_coefficient'] > 0 else None)
      axes[0].plot(r['igr_rate'] + r['egr_rate'], r['r_ig'], **style)
      axes[1].plot(r['igr_rate'] + r['egr_rate'], r['test_accuracy'], **style)
    for w in widths:
      axes[0].plot([], [], 'o', color=colours[w], label=f'width {w}')
    if any(r['egr_coefficient'] > 0 for r in results.values()):
      axes[0].plot([], [], 's', mfc='none', color='k', label='with EGR (μ > 0)')
    axes[0].set(xscale='log', yscale='log', xlabel='λ = h·m/4 (+ μ·m with EGR)',
                ylabel='final R_IG = ‖∇L‖²/m', title='implicit regulariser')
    axes[1].set(xscale='log', xlabel='λ = h·m/4 (+ μ·m with EGR)',
                ylabel='test accuracy (fraction)', title='MNIST test accuracy')
    axes[0].legend(fontsize='x-small')
    for ax in axes:
      ax.grid(alpha=0.3)


def plot_training(histories: dict[str, list[dict]], path: str) -> None:
  """Training loss and minibatch R_IG of every run over its whole history."""
  with plotting.figure(path, ncols=2) as (_, axes):
    plotting.curves(axes[0], {name: metrics_lib.series(h, 'loss')
                              for name, h in histories.items()},
                    'SGD step', 'training loss (cross entropy, nats)',
                    'training loss', logy=True)
    plotting.curves(axes[1], {name: metrics_lib.series(h, 'r_ig')
                              for name, h in histories.items()},
                    'SGD step', 'minibatch R_IG = ‖∇L‖²/m', 'implicit regulariser',
                    logy=True)
    axes[0].legend(fontsize='xx-small')
    if axes[1].get_legend() is not None:
      axes[1].get_legend().remove()  # the same runs as on the left


if __name__ == '__main__':
  cli.main(run, 'igr_mnist_sweep')
