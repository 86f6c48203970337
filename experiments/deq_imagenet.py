r"""Jacobian-regularised MDEQ-small on ImageNet.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021, Sec. 5.3, Tables 1 and 4, Appendix A: MDEQ-small
(4 scales of [32, 64, 128, 256] channels, two stride-2 stem convolutions;
`jreg.models.mdeq.mdeq_config('imagenet_small')`) on 224x224 ImageNet, 120
epochs with batch 112, SGD (Nesterov momentum 0.9) at 0.05 with cosine decay and
weight decay 5e-5, Broyden solvers with forward / backward budgets of 14 / 14
evaluations, an unrolled pre-training phase, and the Jacobian term on a random
fraction p = 0.1 of the steps with gamma raised from 2 to 3 over training.
`default_config()` is that run; the data path is its only required flag (the
ILSVRC2012 folders `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`, or tfds's
`imagenet2012` with --data_source=tfds):

    python -m experiments.deq_imagenet --workdir=runs/mdeq_in \
        --data_dir=/path/with/imagenet --parallel=sharded

The training loop, the two phases and the figures are those of
experiments/deq_cifar10.py (`train_and_evaluate`); only the data and the
configuration differ. On this machine the pipeline is run end to end on the
10-class imagenet-mini stand-in (64x64 images): see BUILD_NOTES.md (MDEQ).
"""
from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any

from absl import app
from absl import flags

from experiments import deq_cifar10
from jreg import cli
from jreg import data

IMAGENET_TRAIN_SIZE = 1_281_167


def default_config() -> dict[str, Any]:
  """The paper's ImageNet MDEQ-small + JR run (Table 4; reference yaml for
  the rest: `cls_mdeq_SMALL_reg.yaml`)."""
  return dict(
      deq_cifar10.default_config(),
      model='imagenet_small',
      image_size=224,
      batch_size=112,
      num_epochs=120,
      pretrain_steps=510_000,       # reference yaml (about 45 epochs at 112)
      optimizer='sgd', learning_rate=0.05, momentum=0.9, weight_decay=5e-5,
      forward_solver='broyden', forward_nfe=14,
      backward_solver='broyden', backward_nfe=14,
      stop_mode='abs',              # reference yaml
      eval_nfe=14, probe_nfe=40,
      jacobian_weight=2.0, jacobian_weight_final=3.0,
      jacobian_prob=0.1, jacobian_prob_final=0.1,
      pretrain_jacobian_weight=0.03,  # reference yaml
      probe_examples=1_000, probe_batch_size=50, eval_batch_size=200,
      data_workers=8,               # grain decoding processes
      log_every=500, eval_every=20_000, checkpoint_every=5_000,
  )


def quickstart_config() -> dict[str, Any]:
  """A few steps of a tiny MDEQ on imagenet-mini at 32 px (under a minute)."""
  return dict(
      default_config(), model='tiny',
      model_overrides={'downsample_times': 2}, image_size=32, batch_size=8,
      num_steps=2, pretrain_steps=0, forward_nfe=4, backward_nfe=4,
      eval_nfe=4, probe_nfe=6, probe_examples=8, probe_batch_size=8,
      test_examples=16, eval_batch_size=16, data_workers=0,
      jacobian_prob=1.0, jacobian_prob_final=1.0, log_every=1, eval_every=0,
      checkpoint_every=0)


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError with one sentence for an out-of-range setting."""
  deq_cifar10.check_config(config)
  if config['data_workers'] < 0:
    raise ValueError(f'data_workers must be >= 0, got {config["data_workers"]}.')
  model = deq_cifar10.model_config(config)
  finest = config['image_size'] // 2**model.downsample_times
  if finest % 2**(model.num_scales - 1) or finest < 2**(model.num_scales - 1):
    raise ValueError(
        f'image_size={config["image_size"]} gives a finest equilibrium '
        f'resolution of {finest}, which must be divisible by 2^(scales - 1) = '
        f'{2**(model.num_scales - 1)}.')


def run(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Trains one ImageNet MDEQ run; writes results.json and figures."""
  config = dict(default_config(), **dict(config))
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  source = dict(source=config['data_source'], data_dir=config['data_dir'])
  records = {split: data.imagenet_source(split, **source)
             for split in ('train', 'validation')}
  classes = getattr(records['train'], 'classes', None)
  num_classes = len(classes) if classes is not None else 1000
  config['model_overrides'] = dict(config['model_overrides'],
                                   num_classes=num_classes)
  train_size = config['train_examples'] or len(records['train'])
  num_steps = config['num_steps'] or (
      config['num_epochs'] * (train_size // config['batch_size']))
  size = config['image_size']

  def eval_batches(batch_size, max_examples=0):
    limit = max_examples or config['test_examples']
    with data.imagenet_iterator(
        'validation', batch_size, image_size=size, mode='eval',
        worker_count=config['data_workers'],
        records=records['validation'], **source) as batches:
      seen = 0
      for batch in batches:
        yield batch
        seen += batch_size
        if limit and seen >= limit:
          return

  train_iter = data.imagenet_iterator(
      'train', config['batch_size'], image_size=size, mode='train',
      seed=config['seed'], worker_count=config['data_workers'],
      records=records['train'], **source)
  try:
    out = deq_cifar10.train_and_evaluate(config, workdir, train_iter,
                                         eval_batches, (size, size, 3),
                                         num_steps)
  finally:
    train_iter.close()
  results = deq_cifar10.summarize(config, out)
  results['num_classes'] = num_classes
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(dict(results, history=out['history']), f, indent=1)
  deq_cifar10.plot_runs({'run': out['history']}, workdir)
  return results


def define_flags():
  """Flags of this experiment (the CIFAR-10 ones plus the image size)."""
  deq_cifar10.define_flags(with_preset=False)
  flags.DEFINE_integer('image_size', default_config()['image_size'],
                       'Side of the square training/eval images.')
  flags.DEFINE_integer('data_workers', default_config()['data_workers'],
                       'grain decoding processes (0: in process).')


def main(argv):
  del argv
  workdir = cli.start()
  f = flags.FLAGS
  if cli.QUICKSTART.value:
    defaults = quickstart_config()
  else:
    defaults = default_config()
    for key in ('image_size', 'data_workers'):
      if f[key].present:
        defaults[key] = f[key].value
  config = deq_cifar10.config_from_flags(defaults)
  try:
    check_config(config)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  results = run(config, workdir)
  print(json.dumps({k: results[k] for k in ('num_params', 'test',
                                            'train_wall_time')}, indent=2))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
