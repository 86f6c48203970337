r"""The main job: every experiment at its `quickstart` preset, at small scale.

Runs each experiment's `run(config, WORKDIR/<name>)` with the config
`experiments/configs/<name>.py:quickstart` (minutes on 2 CPU cores) and writes
`WORKDIR/summary.json` with each one's results; each experiment writes its own
config.json, metrics, PNG figures and `report.html` (its numbers with units,
its figures, its config and the command) under its folder, and
`WORKDIR/report.html` links them all. `data.source`, `data.dir` and `parallel`
are forwarded to every experiment. An experiment whose data files are missing
is reported as skipped, with the one sentence saying how to get them, and one
that raises an error as failed; the others still run. The last line says how
many ran, were skipped and failed, and the command exits with status 1 unless
every chosen experiment ran. Run again, it resumes the unfinished experiments
and re-reports the finished ones.

    python -m experiments.quickstart --workdir=runs/quickstart
    python -m experiments.quickstart --workdir=runs/quickstart \
        --config.only=synthetic_mlp,deq_synthetic --config.data.dir=/data
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections

from experiments.configs import quickstart as quickstart_config
from jreg import cli
from jreg import data
from jreg import errors
from jreg import report

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
    except Exception as error:  # pylint: disable=broad-except
      # One experiment's failure must not hide the others' results.
      if isinstance(error, errors.UserError):
        logging.error('quickstart: %s failed: %s', name, error)
      else:
        logging.exception('quickstart: %s failed', name)
      results = {'failed': f'{type(error).__name__}: {error}'}
    summary[name] = dict(results, wall_time_s=time.perf_counter() - start)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2, default=float)
  for name, results in summary.items():
    if 'skipped' in results:
      print(f'{name}: SKIPPED, {results["skipped"]}', flush=True)
    elif 'failed' in results:
      print(f'{name}: FAILED, {results["failed"]}', flush=True)
    else:
      print(f'{name}: ' + json.dumps(dict(list(cli.headline(results).items())[
          :cli.HEADLINE_SIZE])), flush=True)
  line = summary_line(summary)
  if jax.process_index() == 0:
    page = write_report(summary, workdir, line)
    line += f'; report: {page}'
  print(line, flush=True)
  return summary


def status(results: Mapping[str, Any]) -> str:
  """'ran', 'skipped' or 'failed': what became of one experiment."""
  if 'skipped' in results:
    return 'skipped'
  return 'failed' if 'failed' in results else 'ran'


def summary_line(summary: Mapping[str, Mapping[str, Any]]) -> str:
  """`quickstart: 3 ran, 5 skipped (no data: a, b, ...), 0 failed`."""
  by_status = {'ran': [], 'skipped': [], 'failed': []}
  for name, results in summary.items():
    by_status[status(results)].append(name)
  skipped = (f' (no data: {", ".join(by_status["skipped"])})'
             if by_status['skipped'] else '')
  failed = f' ({", ".join(by_status["failed"])})' if by_status['failed'] else ''
  return (f'quickstart: {len(by_status["ran"])} ran, '
          f'{len(by_status["skipped"])} skipped{skipped}, '
          f'{len(by_status["failed"])} failed{failed}')


def write_report(summary: Mapping[str, Mapping[str, Any]], workdir: str,
                 line: str) -> str:
  """`workdir/report.html`: every experiment's status, linking their pages."""
  what_of = {name: what for name, _, what in EXPERIMENTS}
  entries = []
  for name, results in summary.items():
    state = status(results)
    page = os.path.join(name, report.REPORT_FILE)
    entries.append({
        'name': name, 'what': what_of.get(name, ''), 'status': state,
        'reason': results.get('skipped') or results.get('failed'),
        'wall_time_s': results.get('wall_time_s'),
        'numbers': (dict(list(cli.headline(
            {k: v for k, v in results.items() if k != 'wall_time_s'}
        ).items())[:cli.HEADLINE_SIZE]) if state == 'ran' else {}),
        'page': page if os.path.isfile(os.path.join(workdir, page)) else None})
  return report.write_index(workdir, entries, line)


def finish(summary: Mapping[str, Mapping[str, Any]], workdir: str) -> None:
  """The command's end: exit status 1 unless every chosen experiment ran."""
  del workdir  # the last line, printed by `run`, names the report
  if any(status(results) != 'ran' for results in summary.values()):
    sys.exit(1)


if __name__ == '__main__':
  cli.main(run, 'quickstart', finish=finish, report=False)
