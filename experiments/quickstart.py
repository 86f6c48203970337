"""The main job: every experiment that needs no download, at small scale.

Runs each experiment's `run(quickstart_config(), WORKDIR/<name>)` in turn
(minutes on 2 CPU cores) and writes `WORKDIR/summary.json` with each one's
results; each experiment writes its own metrics and PNG figures under its
folder. The offline data is read from `--data_dir` (default: `../shared/data`
beside the repository); an experiment whose files are missing is reported as
skipped, with the one sentence saying how to get them, and the experiments that
need no files always run.

    python -m experiments.quickstart --workdir=runs/quickstart
    python -m experiments.quickstart --workdir=runs/quickstart --only=synthetic_mlp
"""
from __future__ import annotations

import importlib
import json
import os
import time

from absl import app
from absl import flags
from absl import logging

from jreg import cli
from jreg import data

# (name, module, what it shows). Order: cheapest first.
EXPERIMENTS = (
    ('synthetic_mlp', 'experiments.synthetic_mlp',
     'explicit-depth MLP baseline on the synthetic 1-D task'),
    ('igr_two_parameter', 'experiments.igr_two_parameter',
     'IGR: gradient descent against the exact and the modified flow'),
    ('igr_mnist_sweep', 'experiments.igr_mnist_sweep',
     'IGR: MNIST MLP sweep over width and learning rate, with EGR runs'),
    ('egr_cifar10', 'experiments.egr_cifar10',
     'EGR: CIFAR-10 ResNet with and without the gradient penalty'),
    ('deq_synthetic', 'experiments.deq_synthetic',
     'DEQ + Jacobian regularisation on the synthetic 1-D task'),
    ('deq_cifar10', 'experiments.deq_cifar10',
     'MDEQ with Jacobian regularisation on CIFAR-10'),
    ('deq_imagenet', 'experiments.deq_imagenet',
     'MDEQ-small pipeline end to end on the ImageNet-layout subset'),
    ('deq_wikitext', 'experiments.deq_wikitext',
     'DEQ-Transformer with Jacobian regularisation on WikiText-2'),
)


def run(workdir: str, only: tuple[str, ...] = (), data_dir: str | None = None,
        config_overrides: dict | None = None) -> dict:
  """Runs the quickstart experiments; returns `{name: results}`.

  Args:
    workdir: every experiment writes under `workdir/<name>`.
    only: names to run (default: all).
    data_dir: the offline datasets (None: the default location).
    config_overrides: `{name: {key: value}}` applied over each quickstart config
      (tests shrink the runs further with it).
  """
  known = [name for name, _, _ in EXPERIMENTS]
  unknown = sorted(set(only) - set(known))
  if unknown:
    raise ValueError(f'unknown experiments {unknown}; known: {known}.')
  summary = {}
  for name, module_name, what in EXPERIMENTS:
    if only and name not in only:
      continue
    module = importlib.import_module(module_name)
    config = module.quickstart_config()
    for key in ('data_dir', 'dataset_dir'):  # the name each experiment uses
      if data_dir is not None and key in config:
        config[key] = data_dir
    config.update((config_overrides or {}).get(name, {}))
    logging.info('quickstart: %s (%s)', name, what)
    start = time.perf_counter()
    try:
      results = module.run(config, os.path.join(workdir, name))
    except data.DataError as error:
      # The offline files are not there: the experiments that need none still run.
      logging.warning('quickstart: %s skipped: %s', name, error)
      results = {'skipped': str(error)}
    results = dict(results, wall_time_s=time.perf_counter() - start)
    summary[name] = results
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=float)
  return summary


def define_flags():
  flags.DEFINE_list('only', [], 'Run only these experiments (comma-separated).')


def main(argv):
  del argv
  workdir = cli.start()
  try:
    summary = run(workdir, tuple(flags.FLAGS.only), cli.DATA_DIR.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  for name, results in summary.items():
    if 'skipped' in results:
      print(f'{name}: SKIPPED, {results["skipped"]}')
      continue
    headline = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    print(f'{name}: ' + json.dumps(headline, default=float))
  print(f'quickstart finished: {len(summary)} experiments, results in '
        f'{os.path.join(workdir, "summary.json")}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
