r"""Jacobian-regularised MDEQ-small on ImageNet.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021, Sec. 5.3, Tables 1 and 4, Appendix A: MDEQ-small
(4 scales of [32, 64, 128, 256] channels, two stride-2 stem convolutions;
`jreg.models.mdeq.mdeq_config('imagenet_small')`) on 224x224 ImageNet, 120
epochs with batch 112, SGD (Nesterov momentum 0.9) at 0.05 with cosine decay and
weight decay 5e-5, Broyden solvers with forward / backward budgets of 14 / 14
evaluations, an unrolled pre-training phase, and the Jacobian term on a random
fraction p = 0.1 of the steps with gamma raised from 2 to 3 over training. The
`paper` preset of `experiments/configs/deq_imagenet.py` is that run; it reads
the ILSVRC2012 folders `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` under
`data.dir` (or tfds's `imagenet2012` with `--config.data.source=tfds`):

    python -m experiments.deq_imagenet --workdir=runs/mdeq_in \
        --config.data.dir=/path/with/imagenet --config.parallel=sharded

The training loop, the two phases, the probe and the figures are
`jreg.tasks.mdeq`'s, as for CIFAR-10; only the data and the config differ. The
number of classes is read from the data. On a laptop the pipeline runs end to
end on the 10-class imagenet-mini stand-in (`:small`, 64x64 images).
"""
from __future__ import annotations

from typing import Any

import ml_collections

from jreg import cli
from jreg import data
from jreg import tasks
from jreg.tasks import mdeq as task


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or re-reports) one ImageNet MDEQ run."""
  cli.validate('deq_imagenet', config)
  source, data_dir = tasks.data_source(config.data.source, config.data.dir)
  loader = dict(source=source, data_dir=data_dir, image_size=config.data.image_size,
                worker_count=config.data.workers)
  records = {split: data.imagenet_source(split, source=source, data_dir=data_dir)
             for split in ('train', 'validation')}
  classes = getattr(records['train'], 'classes', None)
  num_classes = len(classes) if classes is not None else 1000
  try:
    task.check_model(config, num_classes, config.data.image_size)
  except ValueError as error:
    raise cli.ConfigError(str(error)) from None

  def eval_batches(batch_size, max_examples=0):
    limit = max_examples or config.data.eval_examples
    with data.imagenet_iterator('validation', batch_size, mode='eval',
                                records=records['validation'], **loader) as batches:
      seen = 0
      for batch in batches:
        yield batch
        seen += batch_size
        if limit and seen >= limit:
          return

  size = config.data.image_size
  with data.imagenet_iterator('train', config.batch_size, mode='train',
                              seed=config.seed, records=records['train'],
                              **loader) as train_iter:
    state, history = task.train_and_evaluate(
        config, workdir, train_iter, eval_batches, (size, size, 3), num_classes)
  return task.write_results(config, workdir, state, history,
                            num_classes=num_classes)


if __name__ == '__main__':
  cli.main(run, 'deq_imagenet')
