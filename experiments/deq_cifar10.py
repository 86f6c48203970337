r"""Jacobian-regularised multiscale DEQ (MDEQ) on CIFAR-10.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021, Sec. 5.3, Tables 1 and 4, Appendix A: an MDEQ with
4 scales of [28, 56, 112, 224] channels (`jreg.models.mdeq`), trained for 200
epochs with batch 96, Adam at 1e-3 and cosine decay, Broyden solvers with
forward / backward budgets of 7 / 8 evaluations, an unrolled weight-tied
pre-training phase, and the Jacobian term gamma * ||J_f(z*)||_F^2 / d with
gamma = 0.5 on a random fraction p = 0.05 of the training steps. The claim: at
a small cost in accuracy, the regularised MDEQ reaches the same tolerance in
markedly fewer NFE. The `paper` preset of `experiments/configs/deq_cifar10.py`
is that run (add `--config.parallel=sharded` on several devices or hosts):

    python -m experiments.deq_cifar10 --workdir=runs/mdeq_c10
    python -m experiments.deq_cifar10 --workdir=runs/mdeq_c10_nojr \
        --config.jacobian.weight=0 --config.jacobian.weight_final=0
    python -m experiments.deq_cifar10 --workdir=runs/explicit_c10 \
        --config.model.network=explicit

The objective, evaluation, NFE probe and figures are `jreg.tasks.mdeq`'s;
`jreg.tasks.mdeq.compare` joins finished runs into one figure.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from jreg import cli
from jreg import data
from jreg import tasks
from jreg.tasks import mdeq as task

LABELS = 10
IMAGE_SHAPE = (32, 32, 3)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or re-reports) one CIFAR-10 MDEQ run."""
  cli.validate('deq_cifar10', config)
  source, data_dir = tasks.data_source(config.data.source, config.data.dir)
  arrays = {
      split: data.first_examples(
          data.load_cifar10(split, source=source, data_dir=data_dir), examples)
      for split, examples in (('train', config.data.train_examples),
                              ('test', config.data.eval_examples))}
  train_size = len(arrays['train']['label'])
  if train_size < config.batch_size:
    raise cli.ConfigError(f'the training set ({train_size} examples) is smaller '
                          f'than one batch of {config.batch_size}.')

  def eval_batches(batch_size, max_examples=0):
    return data.cifar10_iterator(
        'test', batch_size, mode='eval',
        arrays=data.first_examples(arrays['test'], max_examples))

  train_iter = data.cifar10_iterator('train', config.batch_size,
                                     seed=config.seed, arrays=arrays['train'])
  state, history = task.train_and_evaluate(config, workdir, train_iter,
                                           eval_batches, IMAGE_SHAPE, LABELS)
  return task.write_results(config, workdir, state, history)


if __name__ == '__main__':
  cli.main(run, 'deq_cifar10')
