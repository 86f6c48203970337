r"""The main job: every experiment at its `quickstart` preset, at small scale.

Runs each experiment's `run(config, WORKDIR/<name>)` with the config
`experiments/configs/<name>.py:quickstart` (minutes on 2 CPU cores) and writes
`WORKDIR/summary.json` with each one's results; each experiment writes its own
config.json, metrics and PNG figures under its folder. `data.source`,
`data.dir` and `parallel` are forwarded to every experiment. An experiment
whose data files are missing is reported as skipped, with the one sentence
saying how to get them; the experiments that need no files always run. Run
again, it resumes the unfinished experiments and re-reports the finished ones.

    python -m experiments.quickstart --workdir=runs/quickstart
    python -m experiments.quickstart --workdir=runs/quickstart \
        --config.only=synthetic_mlp,deq_synthetic --config.data.dir=/data
"""
from __future__ import annotations

import importlib
import json
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections

from experiments.configs import quickstart as quickstart_config
from jreg import cli
from jreg import data

EXPERIMENTS = quickstart_config.EXPERIMENTS  # (name, module, what it shows)


def forwarded(config: ml_collections.ConfigDict,
              experiment: ml_collections.ConfigDict) -> dict[str, Any]:
  """The quickstart's shared settings that apply to one experiment's config."""
  overrides = {}
  if 'parallel' in experiment:   # igr_two_parameter has no training loop
    overrides['parallel'] = config.parallel
  if 'data' in experiment and 'source' in experiment.data:
    overrides['data.source'] = config.data.source
    if config.data.dir is not None:
      overrides['data.dir'] = config.data.dir
  return overrides


def run(config: ml_collections.ConfigDict, workdir: str,
        overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
  """Runs the chosen experiments; writes and returns `{name: results}`.

  Args:
    config: the quickstart's config (`experiments/configs/quickstart.py`).
    workdir: every experiment runs in `workdir/<name>`.
    overrides: `{name: {dotted key: value}}` over each quickstart preset (tests
      shrink the runs further with it).
  """
  cli.validate('quickstart', config)
  names = quickstart_config.selected(config)
  summary = {}
  for name, module_name, what in EXPERIMENTS:
    if name not in names:
      continue
    module = importlib.import_module(module_name)
    experiment = cli.get_config(name, 'quickstart')
    cli.override(experiment, forwarded(config, experiment))
    cli.override(experiment, (overrides or {}).get(name, {}))
    logging.info('quickstart: %s (%s)', name, what)
    start = time.perf_counter()
    try:
      results = dict(cli.execute(name, module.run, experiment,
                                 os.path.join(workdir, name),
                                 cli.config_change_allowed()))
    except data.DataError as error:
      # The data files are not there: the experiments that need none still run.
      logging.warning('quickstart: %s skipped: %s', name, error)
      results = {'skipped': str(error)}
    summary[name] = dict(results, wall_time_s=time.perf_counter() - start)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2, default=float)
  for name, results in summary.items():
    if 'skipped' in results:
      print(f'{name}: SKIPPED, {results["skipped"]}', flush=True)
    else:
      print(f'{name}: ' + json.dumps(dict(list(cli.headline(results).items())[
          :cli.HEADLINE_SIZE])), flush=True)
  return summary


if __name__ == '__main__':
  cli.main(run, 'quickstart')
