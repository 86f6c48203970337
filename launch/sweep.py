"""Runs one experiment over a grid of flag values, one process per point.

Every point gets its own work directory `WORKDIR/<flag>=<value>,...`, so a
sweep that is interrupted and started again resumes each point from its own
checkpoint and skips the points that finished (they hold `results.json`).

    python -m launch.sweep --experiment=experiments.synthetic_mlp \
        --workdir=runs/sweep --grid='learning_rate=1e-3,1e-2;batch_size=32,64' \
        -- --epochs=5

Flags after `--` go to every run. `--max_parallel` runs points side by side.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_EXPERIMENT = flags.DEFINE_string('experiment', None, 'Module to run, e.g. '
                                  'experiments.igr_mnist_sweep.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the sweep.')
_GRID = flags.DEFINE_string('grid', '', "'flag=v1,v2;flag2=w1,w2': the grid.")
_MAX_PARALLEL = flags.DEFINE_integer('max_parallel', 1, 'Points run at once.')


def parse_grid(text: str) -> list[dict[str, str]]:
  """'a=1,2;b=x' -> [{'a': '1', 'b': 'x'}, {'a': '2', 'b': 'x'}]."""
  axes = []
  for part in filter(None, (p.strip() for p in text.split(';'))):
    name, sep, values = part.partition('=')
    if not sep or not name or not values:
      raise ValueError(f"grid entry {part!r} is not of the form 'flag=v1,v2'.")
    axes.append([(name.strip(), v.strip()) for v in values.split(',')])
  return [dict(point) for point in itertools.product(*axes)]


def point_name(point: dict[str, str]) -> str:
  return ','.join(f'{k}={v}' for k, v in point.items()) or 'default'


def main(argv):
  extra = argv[1:]
  if not _EXPERIMENT.value or not _WORKDIR.value:
    raise app.UsageError('--experiment and --workdir are required.')
  if _MAX_PARALLEL.value < 1:
    raise app.UsageError('--max_parallel must be >= 1.')
  try:
    points = parse_grid(_GRID.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  todo = []
  for point in points:
    workdir = os.path.join(_WORKDIR.value, point_name(point))
    if os.path.exists(os.path.join(workdir, 'results.json')):
      print(f'done already: {workdir}')
      continue
    cmd = [sys.executable, '-m', _EXPERIMENT.value, f'--workdir={workdir}',
           *[f'--{k}={v}' for k, v in point.items()], *extra]
    todo.append((workdir, cmd))
  running, failed = [], []
  while todo or running:
    while todo and len(running) < _MAX_PARALLEL.value:
      workdir, cmd = todo.pop(0)
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, 'log.txt'), 'a')
      print(f'[{len(points) - len(todo) - len(running)}/{len(points)}] '
            + ' '.join(cmd), flush=True)
      running.append((workdir, subprocess.Popen(cmd, stdout=log,
                                                stderr=subprocess.STDOUT), log))
    for item in list(running):
      workdir, proc, log = item
      if proc.poll() is not None:
        log.close()
        running.remove(item)
        if proc.returncode:
          failed.append(workdir)
          print(f'FAILED ({proc.returncode}): {workdir}; see its log.txt',
                flush=True)
    time.sleep(0.5)
  with open(os.path.join(_WORKDIR.value, 'sweep.json'), 'w') as f:
    json.dump({'experiment': _EXPERIMENT.value, 'points': points,
               'failed': failed}, f, indent=2)
  if failed:
    raise SystemExit(f'{len(failed)} of {len(points)} runs failed.')


if __name__ == '__main__':
  app.run(main)
