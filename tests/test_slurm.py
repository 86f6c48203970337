"""Runs on a real one-node SLURM cluster (tests/slurm/cluster.sh, marker slurm).

- a sweep of `launch.sweep --executor=slurm` runs as one job array and
  `launch.gather` tables both points;
- `launch/slurm.sh` runs one data-parallel run as a 2-task job, the two
  processes joined by `--dist_slurm` (CPU, gloo), its output in `logs/`;
- a run interrupted by `scontrol requeue`, by `scancel --signal=USR1` (to
  the run) or by `scancel --batch --signal=USR1` (to the batch shell, as
  `--signal=B:USR1@300` near the time limit) finishes in the same job with
  the metrics rows of an uninterrupted run.

Each test submits with sbatch, polls `scontrol show job` until every record
of the job is final, and cancels its job when it fails or runs out of time.
SLURM holds a requeued job for 120 s before it may start again; the tests
release it once its processes are gone (`scontrol update StartTime=now`).
"""
import csv
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = 'experiments/configs/synthetic_mlp.py:quickstart'
FINAL_STATES = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL',
                'OUT_OF_MEMORY', 'BOOT_FAIL', 'DEADLINE'}
# Small resources on the test node, in place of slurm.sh's 4 nodes x 8 GPUs.
SMALL_JOB = ['--nodes=1', '--gpus-per-node=0', '--cpus-per-task=1',
             '--mem=3G', '--time=00:15:00']
# A run of 10-30 s (about 1,000 steps/s on a free CPU core) that logs every
# 500 steps, for the interruptions.
LONG_RUN = ['--config.num_steps=8000', '--config.log_every=500',
            '--config.eval_every=4000', '--config.checkpoint_every=4000']
# Fields that measure time rather than training.
WALL_CLOCK = re.compile(r'time|second|elapsed|duration|per_s|throughput')


def _env() -> dict[str, str]:
  """The jobs' environment (sbatch passes it on): this Python, 1 CPU device."""
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS='--xla_force_host_platform_device_count=1',
              PATH=os.path.dirname(sys.executable) + os.pathsep +
              os.environ.get('PATH', ''))


def _run(command: list[str], timeout: float = 120) -> str:
  result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, (command, result.stdout[-2000:],
                                  result.stderr[-3000:])
  return result.stdout


def _sbatch(*args: str) -> str:
  return _run(['sbatch', '--parsable', *args]).strip().split(';')[0]


def _records(job: str) -> list[dict[str, str]]:
  """The job's records in `scontrol show job` (one per array task)."""
  out = subprocess.run(['scontrol', 'show', 'job', '-o', job],
                       capture_output=True, text=True, timeout=30,
                       check=False).stdout
  return [dict(re.findall(r'(\w+)=(\S*)', line))
          for line in out.splitlines() if line.strip()]


def _pids(job: str) -> list[str]:
  """The job's processes on this node (`scontrol listpids`)."""
  out = subprocess.run(['scontrol', 'listpids', job], capture_output=True,
                       text=True, timeout=30, check=False).stdout
  return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]


def _describe(job: str, log: pathlib.Path | None = None) -> str:
  states = [(r.get('ArrayTaskId'), r.get('JobState'), r.get('Reason'),
             r.get('ExitCode'), r.get('Restarts')) for r in _records(job)]
  tail = log.read_text()[-3000:] if log and log.is_file() else ''
  return f'job {job}: {states}\n{tail}'


def _wait(job: str, timeout: float, log: pathlib.Path | None = None,
          until=None) -> list[dict[str, str]]:
  """Polls until every record is final (or `until()`); cancels on timeout."""
  deadline = time.monotonic() + timeout
  held_since = {}
  while time.monotonic() < deadline:
    records = _records(job)
    if until is not None and until():
      return records
    if records and all(r.get('JobState') in FINAL_STATES for r in records):
      return records
    for record in records:
      if (record.get('JobState') == 'PENDING' and
          record.get('Reason') == 'BeginTime' and record.get('Restarts') != '0'):
        # Once the last run's processes are gone, and not at once: slurmd
        # refuses a launch in the second in which it revoked the job's
        # credential ("Job credential revoked").
        since = held_since.setdefault(
            (record['JobId'], record['Restarts']), time.monotonic())
        if time.monotonic() - since >= 3 and not _pids(record['JobId']):
          subprocess.run(['scontrol', 'update', f'JobId={record["JobId"]}',
                          'StartTime=now'], capture_output=True, check=False)
    time.sleep(0.5)
  description = _describe(job, log)
  subprocess.run(['scancel', job], check=False)
  pytest.fail(f'timed out after {timeout:.0f} s; {description}')


def _rows(path: pathlib.Path) -> list[dict]:
  """The complete lines of metrics.jsonl, without wall-clock fields."""
  if not path.is_file():
    return []
  text = path.read_text()
  lines = text.splitlines()[:text.count('\n')]
  return [{key: value for key, value in json.loads(line).items()
           if not WALL_CLOCK.search(key)} for line in lines if line.strip()]


@pytest.fixture
def cancel_jobs():
  """A list to put job ids in; they are cancelled after the test."""
  jobs = []
  yield jobs
  for job in jobs:
    subprocess.run(['scancel', job], capture_output=True, check=False)


def test_sweep_runs_as_job_array_and_gathers(tmp_path, cancel_jobs):
  sweep_dir = tmp_path / 'sweep'
  out = _run([sys.executable, '-m', 'launch.sweep', '--experiment=synthetic_mlp',
              f'--sweep_dir={sweep_dir}', f'--config={QUICKSTART}',
              '--grid=learning_rate=0.01,0.02', '--executor=slurm',
              '--slurm_gpus=0', '--slurm_cpus=1', '--slurm_mem=3G',
              '--slurm_time=00:10:00', '--slurm_parallelism=2'])
  job = re.search(r'Submitted batch job (\d+)', out).group(1)
  cancel_jobs.append(job)
  records = _wait(job, 300)
  assert sorted(r.get('ArrayTaskId') for r in records) == ['0', '1'], (
      _describe(job))
  assert {r['ArrayJobId'] for r in records} == {job}
  assert all(r['JobState'] == 'COMPLETED' for r in records), _describe(job)
  logs = sorted(p.name for p in (sweep_dir / 'logs').iterdir())
  assert logs == [f'{job}_0.out', f'{job}_1.out']

  _run([sys.executable, '-m', 'launch.gather', f'--sweep_dir={sweep_dir}'])
  with open(sweep_dir / 'table.csv', newline='') as f:
    table = list(csv.DictReader(f))
  assert sorted(row['point'] for row in table) == [
      'learning_rate=0.01', 'learning_rate=0.02']
  assert all(row['finished'] == 'True' for row in table)
  losses = {row['point']: float(row['validation_mse']) for row in table}
  assert len(set(losses.values())) == 2       # two different runs


def test_two_task_job_runs_one_data_parallel_run(tmp_path, cancel_jobs):
  workdir = tmp_path / 'run'
  job = _sbatch(*SMALL_JOB, '--ntasks-per-node=2', '--job-name=jreg-test',
                'launch/slurm.sh', 'experiments.synthetic_mlp',
                f'--workdir={workdir}', f'--config={QUICKSTART}',
                '--config.parallel=sharded')
  cancel_jobs.append(job)
  # The log folder is part of the repository, so SLURM can open the log.
  log = REPO / 'logs' / f'jreg-test-{job}.out'
  try:
    [record] = _wait(job, 300, log)
    assert record['JobState'] == 'COMPLETED', _describe(job, log)
    text = log.read_text()
  finally:
    log.unlink(missing_ok=True)
  assert 'process 0 of 2' in text and 'process 1 of 2' in text, text[-3000:]
  rows = _rows(workdir / 'metrics.jsonl')
  assert rows and rows[-1]['step'] == 320
  assert json.loads((workdir / 'results.json').read_text())['steps'] == 320


@pytest.fixture(scope='module')
def uninterrupted_rows(tmp_path_factory) -> list[dict]:
  """metrics.jsonl of the LONG_RUN run, trained here in one go."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  _run([sys.executable, '-m', 'experiments.synthetic_mlp',
        f'--workdir={workdir}', f'--config={QUICKSTART}', *LONG_RUN],
       timeout=400)
  return _rows(workdir / 'metrics.jsonl')


@pytest.mark.parametrize('interruption', [
    'scontrol requeue',           # SIGTERM to every process; SLURM requeues
    'scancel --signal=USR1',      # USR1 to the run; slurm.sh requeues on 75
    'scancel --batch --signal=USR1',  # as --signal=B:USR1: slurm.sh forwards
])
def test_interrupted_run_ends_with_uninterrupted_rows(
    tmp_path, cancel_jobs, uninterrupted_rows, interruption):
  workdir = tmp_path / 'run'
  log = tmp_path / 'job.out'
  job = _sbatch(*SMALL_JOB, '--ntasks-per-node=1', f'--output={log}',
                'launch/slurm.sh', 'experiments.synthetic_mlp',
                f'--workdir={workdir}', f'--config={QUICKSTART}', *LONG_RUN)
  cancel_jobs.append(job)
  metrics = workdir / 'metrics.jsonl'
  records = _wait(job, 300, log, until=lambda: len(_rows(metrics)) >= 2)
  assert records[0]['JobState'] == 'RUNNING', _describe(job, log)
  assert len(_rows(metrics)) < len(uninterrupted_rows), (
      'the run ended before it was interrupted')
  _run([*interruption.split(), job])
  [record] = _wait(job, 400, log)
  assert record['JobState'] == 'COMPLETED', _describe(job, log)
  assert int(record['Restarts']) >= 1, _describe(job, log)
  # After USR1 the job is requeued by launch/slurm.sh, after SIGTERM by SLURM.
  requeued_by_script = 'requeueing job' in log.read_text()
  assert requeued_by_script == ('USR1' in interruption), _describe(job, log)
  rows = _rows(metrics)
  assert [row['step'] for row in rows] == [
      row['step'] for row in uninterrupted_rows], 'rows lost or duplicated'
  assert rows == uninterrupted_rows
