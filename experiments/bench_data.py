r"""Throughput of the data pipelines (examples per second) on this machine.

Each pipeline is built once (its load time is reported), warmed up by
`warmup` batches, then timed over `repeats` runs of `steps` batches; the
figure is the median examples/second over the repeats. Pipelines, all read
from `--data_dir` (default `../shared/data`) with the training iterator of
`jreg.data` on one process:

  mnist                 normalisation only
  cifar10               pad-4 crop + flip + normalisation (`cifar10_noaug`:
                        normalisation only, for the cost of augmentation)
  imagenet_mini         JPEG decode + random resized crop + flip, decoded by
                        `imagenet_workers` grain processes (`imagenet_mini_w0`:
                        decoded in this process, the baseline of the ratio)
  wikitext2             [B, T] LM batches (examples = rows of T tokens; tokens/s
                        also given)
  synthetic_1d          the 1-D regression pairs

    python -m experiments.bench_data [--data_dir=../shared/data] [--workdir=DIR]
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import json
import os
import time
from typing import Any, Optional

from absl import app
from absl import flags
import numpy as np

from jreg import cli
from jreg import data

PIPELINES = ('mnist', 'cifar10', 'cifar10_noaug', 'imagenet_mini',
             'imagenet_mini_w0', 'wikitext2', 'synthetic_1d')


def default_config() -> dict[str, Any]:
  return dict(pipelines=list(PIPELINES), data_dir=None, batch_size=128,
              imagenet_batch_size=64, imagenet_image_size=56,
              imagenet_workers=2, lm_batch_size=16, lm_seq_len=70,
              warmup=2, steps=20, repeats=3, seed=0)


def quickstart_config() -> dict[str, Any]:
  return dict(default_config(), pipelines=['mnist', 'cifar10', 'wikitext2',
                                           'synthetic_1d', 'imagenet_mini_w0'],
              imagenet_batch_size=16, imagenet_image_size=32, steps=3,
              repeats=1, warmup=1)


def check_config(config: Mapping[str, Any]) -> None:
  unknown = sorted(set(config['pipelines']) - set(PIPELINES))
  if unknown or not config['pipelines']:
    raise ValueError(f'pipelines {unknown or "[]"} are not a non-empty subset '
                     f'of {PIPELINES}.')
  for key in ('batch_size', 'imagenet_batch_size', 'imagenet_image_size',
              'lm_batch_size', 'lm_seq_len', 'steps', 'repeats'):
    if config[key] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')
  for key in ('warmup', 'imagenet_workers'):
    if config[key] < 0:
      raise ValueError(f'{key} must be >= 0, got {config[key]}.')


def _builders(config) -> dict[str, Callable[[], Any]]:
  """Pipeline name -> function building its training iterator."""
  data_dir = config['data_dir']
  common = dict(seed=config['seed'], process_index=0, process_count=1)
  batch = config['batch_size']

  def imagenet(workers):
    return lambda: data.imagenet_iterator(
        'train', config['imagenet_batch_size'],
        image_size=config['imagenet_image_size'], worker_count=workers,
        data_dir=data_dir, **common)

  def wikitext2():
    corpus = data.load_wikitext('wikitext-2', data_dir=data_dir)
    return data.wikitext_iterator(corpus, 'train', config['lm_batch_size'],
                                  config['lm_seq_len'], process_index=0,
                                  process_count=1)

  return {
      'mnist': lambda: data.mnist_iterator('train', batch, data_dir=data_dir,
                                           **common),
      'cifar10': lambda: data.cifar10_iterator('train', batch,
                                               data_dir=data_dir, **common),
      'cifar10_noaug': lambda: data.cifar10_iterator(
          'train', batch, augmentation=False, data_dir=data_dir, **common),
      'imagenet_mini': imagenet(config['imagenet_workers']),
      'imagenet_mini_w0': imagenet(0),
      'wikitext2': wikitext2,
      'synthetic_1d': lambda: data.synthetic_1d_iterator('train', batch,
                                                          **common),
  }


def _rows(batch: Mapping[str, np.ndarray]) -> int:
  return len(next(iter(batch.values())))


def bench_pipeline(name: str, build: Callable[[], Any],
                   config: Mapping[str, Any]) -> dict[str, Any]:
  """Load time and median examples/second of one pipeline."""
  start = time.perf_counter()
  iterator = build()
  load_seconds = time.perf_counter() - start
  try:
    for _ in range(config['warmup']):
      next(iterator)
    rates, tokens_per_example = [], None
    for _ in range(config['repeats']):
      examples = 0
      start = time.perf_counter()
      for _ in range(config['steps']):
        batch = next(iterator)
        examples += _rows(batch)
      rates.append(examples / (time.perf_counter() - start))
      if 'inputs' in batch:
        tokens_per_example = batch['inputs'].shape[1]
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()
  result = dict(examples_per_second=float(np.median(rates)),
                spread=[float(min(rates)), float(max(rates))],
                load_seconds=load_seconds)
  if tokens_per_example:
    result['tokens_per_second'] = result['examples_per_second'] * tokens_per_example
  print(f'{name}: {result["examples_per_second"]:.0f} examples/s '
        f'(load {load_seconds:.1f} s)', flush=True)
  return result


def run(config: Mapping[str, Any], workdir: Optional[str] = None
        ) -> dict[str, Any]:
  """Benchmarks the chosen pipelines; writes workdir/results.json if given."""
  config = dict(default_config(), **dict(config))
  check_config(config)
  builders = _builders(config)
  pipelines = {name: bench_pipeline(name, builders[name], config)
               for name in config['pipelines']}
  ratios = {}
  if {'imagenet_mini', 'imagenet_mini_w0'} <= pipelines.keys():
    ratios['imagenet_workers_vs_in_process'] = (
        pipelines['imagenet_mini']['examples_per_second'] /
        pipelines['imagenet_mini_w0']['examples_per_second'])
  if {'cifar10', 'cifar10_noaug'} <= pipelines.keys():
    ratios['cifar10_augmented_vs_plain'] = (
        pipelines['cifar10']['examples_per_second'] /
        pipelines['cifar10_noaug']['examples_per_second'])
  results = dict(config=config, cpu_count=os.cpu_count(), pipelines=pipelines,
                 ratios=ratios)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'results.json'), 'w') as stream:
      json.dump(results, stream, indent=2)
  return results


def define_flags():
  flags.DEFINE_list('pipelines', list(PIPELINES), 'Pipelines to time.')
  flags.DEFINE_integer('steps', 20, 'Batches per timed repeat.')
  flags.DEFINE_integer('repeats', 3, 'Timed repeats per pipeline (median).')
  flags.DEFINE_integer('imagenet_workers', 2, 'grain decoding processes.')
  flags.DEFINE_integer('imagenet_image_size', 56, 'ImageNet output side.')
  flags.DEFINE_bool('quickstart', False, 'Use quickstart_config().')
  flags.DEFINE_string('data_dir', None, 'Folder of the datasets (None: the '
                      'loaders\' default).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}.')
  f = flags.FLAGS
  if f.quickstart:
    config = quickstart_config()
  else:
    config = dict(default_config(), pipelines=f.pipelines, steps=f.steps,
                  repeats=f.repeats, imagenet_workers=f.imagenet_workers,
                  imagenet_image_size=f.imagenet_image_size)
  config['data_dir'] = f.data_dir
  try:
    check_config(config)
    results = run(config, cli.WORKDIR.value)
  except (ValueError, data.DataError) as error:
    raise app.UsageError(str(error)) from None
  print(json.dumps({'examples_per_second': {
      name: round(entry['examples_per_second'], 1)
      for name, entry in results['pipelines'].items()},
                    'ratios': results['ratios'], 'cpu_count': os.cpu_count()},
                   indent=2))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
