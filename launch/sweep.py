r"""Runs one experiment over a grid of config values: a SLURM job array, or here.

Each point of the grid (`--grid='a=1,2;b=x,y'`: every combination, here four
points; `--set=KEY=VALUE`: the same value in every point) is one ordinary run,

    python -m experiments.NAME --workdir=SWEEP_DIR/points/<point> \
        --config=CONFIG --config.KEY=VALUE ...

in a work directory of its own, so a point that is stopped resumes from its
own checkpoint when it runs again, and a point that finished (it holds
`results.json`) is skipped.

    # Here (a laptop, a workstation): --max_parallel points at a time; at
    # the quickstart preset and 160 steps a point takes seconds (drop both
    # for the paper's runs).
    python -m launch.sweep --experiment=synthetic_mlp --sweep_dir=runs/s1 \
        --config=experiments/configs/synthetic_mlp.py:quickstart \
        --grid='learning_rate=0.003,0.01' --set=num_steps=160 \
        --executor=local --max_parallel=2

    # SLURM: one job array, one array task per point, each with its own
    # resources, time limit, log file and requeue.
    python -m launch.sweep ... --executor=slurm --slurm_partition=gpu \
        --slurm_time=02:00:00 --slurm_gpus=1 --slurm_cpus=8 --slurm_mem=32G \
        --slurm_parallelism=8

    python -m launch.gather --sweep_dir=runs/s1    # table + figures

On SLURM the launcher writes `SWEEP_DIR/sweep.sbatch`, a plain sbatch script
with `#SBATCH --array=0-(N-1)%P`, and submits it with `sbatch` (with
`--dry_run` it only writes it). Every array task writes
`SWEEP_DIR/logs/<array job>_<task>.out`; `--requeue` puts a task back in the
queue when its node fails or it is pre-empted, and `--signal=B:USR1@S` makes
the task save a checkpoint S seconds before its time limit (the script
forwards USR1 to the run, which exits with status 75) and requeue itself
(`scontrol requeue` of the task's own job id), so a long point continues from
its checkpoint in a fresh allocation. The script holds the
commands themselves (no pickled job files).

Nothing is written or queued before every point passes the experiment's own
checks: the launcher loads each point's config (`--config` with its preset,
the `--set` values, the point's values) and validates it as the experiment's
command does (`jreg.cli.command_config`). An unknown experiment, preset or
key, a value of the wrong type or out of range is one sentence naming the
point, and exit status 1. (A module outside `experiments/` is only checked to
exist.)

`SWEEP_DIR/sweep.json` records the experiment, the grid and each point's
command; `launch.gather` reads it with the points' `config.json` and
`results.json`.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags

FLAGS = flags.FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]


class SweepError(ValueError):
  """A sweep setting is wrong; the message is one sentence."""


def parse_assignments(text: str) -> list[list[tuple[str, str]]]:
  """'a=1,2;b=x' -> [[('a', '1'), ('a', '2')], [('b', 'x')]] (one list an axis)."""
  axes = []
  for part in filter(None, (p.strip() for p in text.split(';'))):
    key, sep, values = part.partition('=')
    key = key.strip()
    if key.startswith('config.'):
      key = key[len('config.'):]
    if not sep or not key or not values.strip():
      raise SweepError(f"grid entry {part!r} is not of the form 'key=v1,v2'.")
    axes.append([(key, value.strip()) for value in values.split(',')])
  return axes


def grid_points(grid: str) -> list[dict[str, str]]:
  """Every combination of the grid's values, the last key varying fastest."""
  return [dict(point) for point in itertools.product(*parse_assignments(grid))]


def point_name(point: dict[str, str]) -> str:
  """A folder name for a point: 'key=value,key2=value2' ('default' if empty)."""
  name = ','.join(f'{key}={value}' for key, value in point.items())
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name) or 'default'


def experiment_module(experiment: str) -> str:
  return experiment if '.' in experiment else f'experiments.{experiment}'


def point_command(python: str, experiment: str, workdir: str,
                  config: Optional[str], fixed: dict[str, str],
                  point: dict[str, str]) -> list[str]:
  """The command line of one point."""
  command = [python, '-m', experiment_module(experiment),
             f'--workdir={workdir}']
  if config:
    command.append(f'--config={config}')
  command += [f'--config.{key}={value}'
              for key, value in {**fixed, **point}.items()]
  return command


def plan(sweep_dir: str, experiment: str, config: Optional[str], grid: str,
         fixed: Sequence[str] = (), python: Optional[str] = None) -> dict:
  """The sweep's points, with their names, work directories and commands.

  Raises:
    SweepError: a malformed grid or fixed setting, or two points with one
      folder name.
  """
  fixed_values = {}
  for item in fixed:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise SweepError(f"--set={item!r} is not of the form 'key=value'.")
    fixed_values[key.removeprefix('config.')] = value
  points = []
  for point in grid_points(grid):
    name = point_name(point)
    workdir = os.path.join(os.path.abspath(sweep_dir), 'points', name)
    points.append({'name': name, 'overrides': point, 'workdir': workdir,
                   'command': point_command(python or sys.executable,
                                            experiment, workdir, config,
                                            fixed_values, point)})
  names = [p['name'] for p in points]
  if len(set(names)) != len(names):
    raise SweepError('two grid points share a folder name; give distinct '
                     'values.')
  return {'experiment': experiment_module(experiment), 'config': config,
          'grid': grid, 'fixed': fixed_values, 'points': points}


def configurable_experiments() -> list[str]:
  """The experiments of `experiments/` that have a config file."""
  configs = (REPO / 'experiments' / 'configs').glob('*.py')
  return sorted(path.stem for path in configs if path.stem != '__init__'
                and (REPO / 'experiments' / path.name).is_file())


def _from_repo(arg: str) -> str:
  """`--config=FILE[:PRESET]` with FILE as the points see it (they run in REPO)."""
  if not arg.startswith('--config='):
    return arg
  path = arg[len('--config='):]
  return '--config=' + (path if os.path.isabs(path) else str(REPO / path))


def check(sweep: dict) -> None:
  """Refuses a sweep that the experiment would refuse at some point.

  Loads every point's config from the point's own `--config` flags and
  validates it as the experiment's command does (`jreg.cli.command_config`):
  nothing is written or queued before this passes. A module outside
  `experiments/` is only checked to exist.

  Raises:
    SweepError: an unknown experiment, or one sentence naming the first point
      that the experiment refuses and why.
  """
  module = sweep['experiment']
  package, _, name = module.rpartition('.')
  known = configurable_experiments()
  try:
    found = importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    found = False
  if not found:
    given = name if package == 'experiments' else module
    raise SweepError(f'unknown experiment {given!r} (no module {module}); the '
                     f'experiments are {", ".join(known)}.')
  if package != 'experiments':
    return
  if name not in known:
    raise SweepError(f'experiment {name!r} has no config file '
                     f'experiments/configs/{name}.py, so its points take no '
                     f'--config settings; the experiments are {", ".join(known)}.')
  from jreg import cli  # pylint: disable=g-import-not-at-top
  refused = []
  for index, point in enumerate(sweep['points'], 1):
    argv = [_from_repo(arg) for arg in point['command']
            if arg.startswith('--config')]
    try:
      cli.command_config(name, argv)
    except cli.ConfigError as error:
      refused.append((index, point['name'], str(error).rstrip('.')))
  if not refused:
    return
  count = len(sweep['points'])
  if len(refused) == count > 1 and len({r[2] for r in refused}) == 1:
    raise SweepError(f'every point of {module} is refused: {refused[0][2]}.')
  index, first, message = refused[0]
  more = f' (and {len(refused) - 1} more)' if len(refused) > 1 else ''
  raise SweepError(f'point {index} of {count} ({first}){more} is refused by '
                   f'{module}: {message}.')


def _run_point(point: dict, log_dir: str) -> int:
  """Runs one point here, its output in `log_dir/<name>.log`; its exit code."""
  if os.path.exists(os.path.join(point['workdir'], 'results.json')):
    return 0
  os.makedirs(point['workdir'], exist_ok=True)
  with open(os.path.join(log_dir, point['name'] + '.log'), 'a') as log:
    return subprocess.run(point['command'], cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, check=False).returncode


def run_local(sweep: dict, sweep_dir: str, max_parallel: int) -> list[str]:
  """Runs every point here, `max_parallel` at a time; the names that failed."""
  log_dir = os.path.join(sweep_dir, 'logs')
  os.makedirs(log_dir, exist_ok=True)
  points = sweep['points']
  failed = []
  with concurrent.futures.ThreadPoolExecutor(max_parallel) as pool:
    futures = {pool.submit(_run_point, point, log_dir): point
               for point in points}
    for count, future in enumerate(
        concurrent.futures.as_completed(futures), 1):
      point, code = futures[future], future.result()
      status = 'done' if code == 0 else f'FAILED (exit {code})'
      print(f'[{count}/{len(points)}] {status}: {point["name"]}', flush=True)
      if code:
        failed.append(point['name'])
  return failed


def sbatch_script(sweep: dict, sweep_dir: str, *, job_name: str,
                  time_limit: str, gpus: int, cpus: int, mem: str,
                  parallelism: int, partition: Optional[str] = None,
                  account: Optional[str] = None, requeue_before_s: int = 300,
                  setup: Sequence[str] = (),
                  options: Sequence[str] = ()) -> str:
  """An sbatch job-array script that runs point $SLURM_ARRAY_TASK_ID."""
  sweep_dir = os.path.abspath(sweep_dir)
  count = len(sweep['points'])
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={job_name}',
           f'#SBATCH --array=0-{count - 1}%{max(1, min(parallelism, count))}',
           f'#SBATCH --time={time_limit}',
           '#SBATCH --nodes=1',
           '#SBATCH --ntasks=1',
           f'#SBATCH --cpus-per-task={cpus}',
           f'#SBATCH --mem={mem}']
  if gpus:
    lines.append(f'#SBATCH --gpus-per-task={gpus}')
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  if account:
    lines.append(f'#SBATCH --account={account}')
  lines += [f'#SBATCH --output={sweep_dir}/logs/%A_%a.out',
            '#SBATCH --open-mode=append',
            '#SBATCH --requeue']
  if requeue_before_s:
    lines.append(f'#SBATCH --signal=B:USR1@{requeue_before_s}')
  lines += [f'#SBATCH {option}' for option in options]
  lines += ['', 'set -uo pipefail', f'cd {shlex.quote(str(REPO))}', *setup, '',
            '# One entry per point: its name and its command.', 'NAMES=(']
  lines += [f'  {shlex.quote(p["name"])}' for p in sweep['points']]
  lines += [')', 'COMMANDS=(']
  lines += [f'  {shlex.quote(shlex.join(p["command"]))}'
            for p in sweep['points']]
  lines += [
      ')', '',
      'name="${NAMES[$SLURM_ARRAY_TASK_ID]}"',
      f'workdir={shlex.quote(sweep_dir)}/points/"$name"',
      'if [[ -f "$workdir/results.json" ]]; then',
      '  echo "point $name finished already"; exit 0',
      'fi',
      'mkdir -p "$workdir"',
      '# Near the time limit (--signal=B:USR1@S signals this shell only) the',
      '# run gets USR1, saves a checkpoint and exits with 75 (EX_TEMPFAIL): the',
      '# array task goes back into the queue and resumes from its checkpoint.',
      '# SIGTERM (pre-emption, scontrol requeue, scancel) reaches the run',
      '# directly; SLURM requeues a pre-empted task by itself (--requeue).',
      'child=',
      'pending=',
      'terminated=0',
      'forward() {',
      '  echo "SIG$1 received: point $name saves a checkpoint and stops"',
      '  if [[ -n "$child" ]]; then kill -"$1" "$child" 2>/dev/null; else pending=$1; fi',
      '}',
      "trap 'forward USR1' USR1",
      "trap 'terminated=1; forward TERM' TERM",
      'echo "point $name on $(hostname): ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
      'eval "exec ${COMMANDS[$SLURM_ARRAY_TASK_ID]}" &',
      'child=$!',
      '# A signal that came before $child was known goes to the run now.',
      'if [[ -n "$pending" ]]; then kill -"$pending" "$child" 2>/dev/null; fi',
      'while true; do',
      '  wait "$child"',
      '  status=$?',
      '  if (( status > 128 )) && kill -0 "$child" 2>/dev/null; then continue; fi',
      '  break',
      'done',
      'if (( status == 75 && ! terminated )); then',
      '  echo "point $name stopped with a checkpoint: requeueing job $SLURM_JOB_ID"',
      '  scontrol requeue "$SLURM_JOB_ID"',
      'fi',
      'exit "$status"', '']
  return '\n'.join(lines)


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string(
      'experiment', None, 'Experiment to run: a module of experiments/ '
      '(igr_mnist_sweep) or a dotted module path.')
  flags.DEFINE_string(
      'sweep_dir', None, 'Root of the sweep; point P runs in SWEEP_DIR/points/P.')
  flags.DEFINE_string(
      'config', None, 'Passed to every point as --config= (e.g. '
      'experiments/configs/NAME.py:PRESET).')
  flags.DEFINE_string(
      'grid', '', "The grid: 'key=v1,v2;key2=w1,w2' (config keys, without the "
      "'config.' prefix); every combination is one point.")
  flags.DEFINE_multi_string(
      'set', [], "A fixed 'key=value' for every point (repeatable), e.g. "
      "--set=data.source=download.")
  flags.DEFINE_enum(
      'executor', 'local', ['local', 'slurm'],
      "'local': points run as processes here; 'slurm': one job array.")
  flags.DEFINE_integer(
      'max_parallel', 1, 'local: points run at the same time.')
  flags.DEFINE_bool(
      'dry_run', False, 'slurm: write sweep.sbatch and print the sbatch command '
      'without submitting.')
  flags.DEFINE_string(
      'python', None, 'Interpreter of the points (default: this one).')
  flags.DEFINE_string('slurm_partition', None,
                                         'SLURM partition.')
  flags.DEFINE_string('slurm_account', None, 'SLURM account.')
  flags.DEFINE_string(
      'slurm_time', '01:00:00', 'Time limit of each point ([D-]HH:MM:SS).')
  flags.DEFINE_integer('slurm_gpus', 1, 'GPUs of each point.')
  flags.DEFINE_integer('slurm_cpus', 8, 'CPU cores of each point.')
  flags.DEFINE_string('slurm_mem', '32G', 'Memory of each point.')
  flags.DEFINE_integer(
      'slurm_parallelism', 16, 'Array tasks running at the same time (%P).')
  flags.DEFINE_integer(
      'slurm_requeue_before_s', 300, 'Seconds before the time limit at which a '
      'point requeues itself (0: never).')
  flags.DEFINE_multi_string(
      'slurm_setup', [], "Shell lines run before each point (e.g. 'module load "
      "cuda', 'source .venv/bin/activate').")
  flags.DEFINE_multi_string(
      'slurm_option', [], "Extra '#SBATCH' options, e.g. --slurm_option=--qos=high.")


def checked_plan(argv: Sequence[str]) -> dict:
  """The sweep of the command's flags, every point checked (`check`).

  Raises:
    SweepError: a wrong flag, grid or setting, or a point the experiment
      refuses.
  """
  if len(argv) > 1:
    raise SweepError(f'unexpected arguments {argv[1:]}.')
  if not FLAGS.experiment or not FLAGS.sweep_dir:
    raise SweepError('--experiment and --sweep_dir are required.')
  if FLAGS.max_parallel < 1 or FLAGS.slurm_parallelism < 1:
    raise SweepError('--max_parallel and --slurm_parallelism must be >= 1.')
  if not re.fullmatch(r'(\d+-)?\d+(:\d\d){0,2}', FLAGS.slurm_time):
    raise SweepError(f'--slurm_time={FLAGS.slurm_time!r} is not a SLURM '
                     'time limit ([D-]HH:MM:SS or minutes).')
  sweep = plan(FLAGS.sweep_dir, FLAGS.experiment, FLAGS.config,
               FLAGS.grid, FLAGS.set, FLAGS.python)
  check(sweep)
  return sweep


def main(argv):
  try:
    sweep = checked_plan(argv)
  except SweepError as error:
    raise SystemExit(f'error: {error}') from None
  sweep_dir = os.path.abspath(FLAGS.sweep_dir)
  os.makedirs(os.path.join(sweep_dir, 'logs'), exist_ok=True)
  sweep['executor'] = FLAGS.executor
  sweep['created'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
  with open(os.path.join(sweep_dir, 'sweep.json'), 'w') as f:
    json.dump(sweep, f, indent=2)
  if FLAGS.executor == 'local':
    failed = run_local(sweep, sweep_dir, FLAGS.max_parallel)
    if failed:
      raise SystemExit(f'{len(failed)} of {len(sweep["points"])} points '
                       f'failed ({", ".join(failed)}); see {sweep_dir}/logs/.')
    print(f'all {len(sweep["points"])} points done: python -m launch.gather '
          f'--sweep_dir={sweep_dir}')
    return
  script = sbatch_script(
      sweep, sweep_dir, job_name=f'jreg-{sweep["experiment"].split(".")[-1]}',
      time_limit=FLAGS.slurm_time, gpus=FLAGS.slurm_gpus,
      cpus=FLAGS.slurm_cpus, mem=FLAGS.slurm_mem,
      parallelism=FLAGS.slurm_parallelism, partition=FLAGS.slurm_partition,
      account=FLAGS.slurm_account,
      requeue_before_s=FLAGS.slurm_requeue_before_s,
      setup=FLAGS.slurm_setup, options=FLAGS.slurm_option)
  path = os.path.join(sweep_dir, 'sweep.sbatch')
  with open(path, 'w') as f:
    f.write(script)
  if FLAGS.dry_run:
    print(f'wrote {path}; submit it with: sbatch {path}')
    return
  if shutil.which('sbatch') is None:
    raise SystemExit(f'sbatch is not on PATH (not a SLURM login node?): '
                     f'{path} is written, submit it with `sbatch {path}` '
                     'where SLURM runs.')
  result = subprocess.run(['sbatch', path], capture_output=True, text=True,
                          check=False)
  if result.returncode:
    raise SystemExit(f'sbatch refused {path}: {result.stderr.strip()}')
  print(result.stdout.strip())


if __name__ == '__main__':
  define_flags()
  app.run(main)
