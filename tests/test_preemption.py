"""Pre-emption: a signal saves a checkpoint and stops with status 75; time-based
checkpoints; the SLURM scripts requeue on 75. A stopped and resumed run ends
with the `metrics.jsonl` rows and parameters of an uninterrupted run."""
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import test_train
from jreg import checkpoint as checkpoint_lib
from jreg import cli
from jreg import metrics as metrics_lib
from jreg import rundir
from jreg import train
from launch import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 8  # log every 2, checkpoints and evaluations every 3 (test_train)


class SignalAt(test_train.CountingIterator):
  """Sends `signum` to this process while the batch of step `step` is read."""

  def __init__(self, step, signum):
    super().__init__()
    self.step, self.signum = step, signum

  def __next__(self):
    if self.position == self.step - 1:
      os.kill(os.getpid(), self.signum)
    return super().__next__()


def _run(workdir, iterator=None, **kwargs):
  return test_train._fit(workdir, num_steps=NUM_STEPS, iterator=iterator,
                         eval_fn=test_train._eval_fn(), eval_every=3, **kwargs)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  state, history = _run(workdir)
  return state, history


def _rows(workdir):
  return metrics_lib.read_jsonl(str(pathlib.Path(workdir) / 'metrics.jsonl'))


def _assert_same_run(workdir, state, history, reference):
  ref_state, ref_history = reference
  jax.tree.map(np.testing.assert_array_equal, state.params, ref_state.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state,
               ref_state.opt_state)
  assert history == _rows(workdir) == ref_history


@pytest.mark.parametrize('signum,step', [
    (signal.SIGTERM, 5),   # inside a logging window, between checkpoints
    (signal.SIGUSR1, 3),   # at a scheduled checkpoint and evaluation
    (signal.SIGTERM, 8),   # the last step: stops before the final evaluation
], ids=['SIGTERM-5', 'SIGUSR1-3', 'SIGTERM-8'])
def test_signal_saves_a_checkpoint_and_the_resumed_run_is_the_same(
    tmp_path, reference, signum, step):
  before = signal.getsignal(signum)
  with pytest.raises(train.Preempted) as stopped:
    _run(tmp_path, iterator=SignalAt(step, signum))
  name = signal.Signals(signum).name
  assert str(stopped.value) == (
      f'stopped by {name} at step {step}: checkpoint saved in '
      f'{tmp_path / "checkpoints"}; run the same command to resume.')
  assert stopped.value.exit_status == 75
  assert signal.getsignal(signum) is before  # the handler is restored
  assert not (tmp_path / rundir.LOCK_FILE).exists()
  assert checkpoint_lib.Checkpointer(str(tmp_path)).latest_step() == step
  assert all(r['step'] <= step for r in _rows(tmp_path))
  state, history = _run(tmp_path)
  _assert_same_run(tmp_path, state, history, reference)


def test_time_based_checkpoints_change_no_record(tmp_path, reference):
  # A checkpoint at every step (the clock is always due), then a crash in
  # step 6: the resume starts from step 5, inside a logging window.
  with pytest.raises(RuntimeError, match='simulated crash'):
    _run(tmp_path, checkpoint_every_seconds=1e-9,
         iterator=test_train.CountingIterator(crash_at=5))
  saved = checkpoint_lib.Checkpointer(str(tmp_path))
  assert saved.all_steps() == [3, 4, 5]  # the newest 3 are kept
  saved.close()
  state, history = _run(tmp_path, checkpoint_every_seconds=1e-9)
  _assert_same_run(tmp_path, state, history, reference)
  with pytest.raises(ValueError, match='checkpoint_every_seconds must be >= 0'):
    _run(tmp_path / 'bad', checkpoint_every_seconds=-1)


def test_run_killed_in_its_final_evaluation_only_evaluates_again(
    tmp_path, reference):
  calls = []

  def eval_fn(kill_at=None):
    def evaluate(params, model_state):
      calls.append(1)
      if kill_at is not None and len(calls) == kill_at:
        raise test_train.Crash('killed in the final evaluation')
      return test_train._eval_fn()(params, model_state)
    return evaluate

  def run(iterator, **kwargs):
    return test_train._fit(tmp_path, num_steps=NUM_STEPS, iterator=iterator,
                           eval_every=3, **kwargs)

  with pytest.raises(test_train.Crash):
    run(test_train.CountingIterator(), eval_fn=eval_fn(kill_at=3))  # 3, 6, 8
  assert checkpoint_lib.Checkpointer(str(tmp_path)).latest_step() == NUM_STEPS
  calls.clear()
  iterator = test_train.CountingIterator()
  state, history = run(iterator, eval_fn=eval_fn())
  assert iterator.position == 0 and len(calls) == 1  # no step; one evaluation
  _assert_same_run(tmp_path, state, history, reference)
  calls.clear()
  state, history = run(iterator, eval_fn=eval_fn())  # finished: only reports
  assert iterator.position == 0 and not calls
  _assert_same_run(tmp_path, state, history, reference)


def test_checkpoint_minutes_of_a_command_reach_its_fit_calls(tmp_path):
  config = cli.get_config('synthetic_mlp', 'small', {'checkpoint_minutes': 1e-9})

  def run_fn(config, workdir):
    del config
    _run(os.path.join(workdir, 'sub'))
    return {}

  cli.execute('synthetic_mlp', run_fn, config, str(tmp_path))
  saved = checkpoint_lib.Checkpointer(str(tmp_path / 'sub'))
  assert saved.all_steps() == [6, 7, 8]  # every step, not only 3, 6 and 8
  saved.close()
  assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_checkpoint_minutes_presets_and_range():
  assert cli.get_config('deq_cifar10', 'paper').checkpoint_minutes == 10
  assert cli.get_config('deq_wikitext', 'small').checkpoint_minutes == 10
  assert cli.get_config('deq_cifar10', 'quickstart').checkpoint_minutes == 0
  with pytest.raises(cli.ConfigError, match='checkpoint_minutes must be >= 0'):
    cli.get_config('synthetic_mlp', 'small', {'checkpoint_minutes': -1.0})


# ---------------------------------------------------------------------------
# A real command: SIGTERM, then SIGUSR1 to `python -m experiments.synthetic_mlp`.

CLI_STEPS = 1000


def _command(workdir):
  return [sys.executable, '-m', 'experiments.synthetic_mlp',
          f'--workdir={workdir}',
          '--config=experiments/configs/synthetic_mlp.py:quickstart',
          f'--config.num_steps={CLI_STEPS}', '--config.log_every=25',
          '--config.eval_every=400', '--config.checkpoint_every=500']


def _start(workdir):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  return subprocess.Popen(_command(workdir), cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _last_train_step(workdir):
  try:
    rows = _rows(workdir)
  except (OSError, ValueError):
    return 0
  return max([r['step'] for r in rows if r['split'] == 'train'], default=0)


def _signal_after(process, workdir, step, signum):
  """Sends `signum` once `metrics.jsonl` has a train row past `step`."""
  deadline = time.monotonic() + 240
  while _last_train_step(workdir) <= step:
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, 'the run logged nothing in 240 s'
    time.sleep(0.02)
  process.send_signal(signum)
  return process.communicate(timeout=240)


def _without_wall_clock(rows):
  return [{k: v for k, v in r.items()
           if not any(w in k for w in ('time', 'per_s', 'second'))} for r in rows]


def _final_checksum(workdir):
  path = pathlib.Path(workdir) / 'checkpoints' / str(CLI_STEPS) / 'checksum'
  with open(path / 'metadata') as f:
    return json.load(f)['sha256']  # of every state array and the data position


def test_command_stopped_by_sigterm_then_sigusr1_ends_as_an_uninterrupted_one(
    tmp_path):
  reference = _start(tmp_path / 'reference')  # runs beside the stopped one
  stopped_steps = []
  for signum, name in ((signal.SIGTERM, 'SIGTERM'), (signal.SIGUSR1, 'SIGUSR1')):
    run = _start(tmp_path / 'run')
    after = _last_train_step(tmp_path / 'run') + 50
    _, err = _signal_after(run, tmp_path / 'run', after, signum)
    assert run.returncode == train.PREEMPTED_EXIT_STATUS, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith('stopped by')]
    assert len(said) == 1 and said[0].startswith(f'stopped by {name} at step '), err
    assert 'Traceback' not in err
    assert not (tmp_path / 'run' / rundir.LOCK_FILE).exists()
    stopped_steps.append(int(said[0].split()[5].rstrip(':')))
  assert 0 < stopped_steps[0] < stopped_steps[1] < CLI_STEPS
  resumed = subprocess.run(_command(tmp_path / 'run'), cwd=REPO, text=True,
                           capture_output=True, timeout=240,
                           env=dict(os.environ, PYTHONPATH=str(REPO),
                                    JAX_PLATFORMS='cpu'))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _, err = reference.communicate(timeout=240)
  assert reference.returncode == 0, err[-3000:]
  rows = _rows(tmp_path / 'run')
  assert _without_wall_clock(rows) == _without_wall_clock(
      _rows(tmp_path / 'reference'))
  assert _final_checksum(tmp_path / 'run') == _final_checksum(
      tmp_path / 'reference')


# ---------------------------------------------------------------------------
# The SLURM scripts, outside SLURM: stubs for srun, scontrol and the run.

_STUB_RUN = '''#!/bin/bash
# Stands for the Python run: USR1 or TERM -> "checkpoint saved", exit 75.
trap 'echo "got USR1" >> "$STUB_LOG"; exit 75' USR1
trap 'echo "got TERM" >> "$STUB_LOG"; exit 75' TERM
echo "run $*" >> "$STUB_LOG"
while true; do sleep 0.05; done
'''


@pytest.fixture
def slurm_stubs(tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  stubs = {
      'srun': '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
      'scontrol': '#!/bin/bash\necho "scontrol $*" >> "$STUB_LOG"\n',
      'python': _STUB_RUN,
  }
  for name, text in stubs.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)
  log = tmp_path / 'stub.log'
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('STUB_LOG', str(log))
  return bin_dir, log


def _batch(script, log, signum, env, cwd):
  """Runs `script` as SLURM's batch shell and sends it `signum` mid-run."""
  shell = subprocess.Popen(['bash', str(script), *script_args(script)],
                           cwd=cwd, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  while not (log.exists() and 'run ' in log.read_text()):
    assert shell.poll() is None and time.monotonic() < deadline, (
        shell.communicate()[0])
    time.sleep(0.02)
  shell.send_signal(signum)
  out = shell.communicate(timeout=60)[0]
  lines = log.read_text().splitlines()
  log.unlink()
  return shell.returncode, lines, out


def script_args(script):
  return (['experiments.synthetic_mlp', '--workdir=w']
          if script.name == 'slurm.sh' else [])


@pytest.mark.parametrize('signum,requeued', [
    (signal.SIGUSR1, True),    # --signal=B:USR1@300: save, exit 75, requeue
    (signal.SIGTERM, False),   # pre-emption / scancel: SLURM decides
], ids=['USR1', 'TERM'])
def test_slurm_sh_forwards_the_signal_and_requeues_on_75(
    tmp_path, slurm_stubs, signum, requeued):
  _, log = slurm_stubs
  env = dict(os.environ, SLURM_JOB_ID='7001')
  status, lines, out = _batch(REPO / 'launch' / 'slurm.sh', log, signum, env,
                              tmp_path)
  name = signal.Signals(signum).name[3:]
  assert status == 75, out
  assert lines[0].startswith('run -m experiments.synthetic_mlp --dist_slurm')
  assert f'got {name}' in lines
  assert ('scontrol requeue 7001' in lines) == requeued, lines


@pytest.mark.parametrize('signum,requeued', [
    (signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=['USR1', 'TERM'])
def test_sweep_array_task_forwards_the_signal_and_requeues_on_75(
    tmp_path, slurm_stubs, signum, requeued):
  bin_dir, log = slurm_stubs
  planned = sweep.plan(str(tmp_path / 's'), 'synthetic_mlp', None,
                       'seed=0,1', python=str(bin_dir / 'python'))
  script = tmp_path / 's' / 'sweep.sbatch'
  script.parent.mkdir(parents=True)
  script.write_text(sweep.sbatch_script(
      planned, str(tmp_path / 's'), job_name='j', time_limit='1:00:00', gpus=0,
      cpus=1, mem='1G', parallelism=2))
  # Array task 1 of array job 7000 has its own job id, 7002.
  env = dict(os.environ, SLURM_JOB_ID='7002', SLURM_ARRAY_JOB_ID='7000',
             SLURM_ARRAY_TASK_ID='1')
  status, lines, out = _batch(script, log, signum, env, tmp_path)
  assert status == 75, out
  assert lines[0].startswith('run -m experiments.synthetic_mlp') and (
      'seed=1' in lines[0])
  assert f'got {signal.Signals(signum).name[3:]}' in lines
  assert ('scontrol requeue 7002' in lines) == requeued, lines


# ---------------------------------------------------------------------------
# Two processes (gloo on localhost): a signal to one stops both at one step.


def _two_processes(workdir, out, *step):
  with __import__('socket').socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  worker = pathlib.Path(__file__).with_name('preemption_worker.py')
  env = dict(os.environ, PYTHONPATH=str(REPO))
  procs = [subprocess.Popen(
      [sys.executable, str(worker), str(port), str(i), str(workdir), str(out),
       *map(str, step)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  return [p.returncode for p in procs], logs


def test_a_signal_to_one_process_stops_every_process_at_one_step(tmp_path):
  codes, logs = _two_processes(tmp_path / 'run', tmp_path / 'p.npz', 5)
  assert codes == [75, 75], logs[1][-3000:]
  for log in logs:
    assert 'PREEMPTED 5' in log.splitlines(), log[-3000:]
  assert checkpoint_lib.Checkpointer(
      str(tmp_path / 'run')).latest_step() == 5
  codes, logs = _two_processes(tmp_path / 'run', tmp_path / 'p.npz')
  assert codes == [0, 0], logs[0][-3000:]
  reference, history = test_train._fit(tmp_path / 'one', 'single', num_steps=8)
  got = np.load(tmp_path / 'p.npz')
  for path, leaf in jax.tree_util.tree_flatten_with_path(reference.params)[0]:
    np.testing.assert_allclose(got['/'.join(map(str, path))], leaf, rtol=1e-5,
                               atol=1e-6)
  rows = _rows(tmp_path / 'run')
  assert [(r['step'], r['split']) for r in rows] == [
      (r['step'], r['split']) for r in history]
  for row, expected in zip(rows, history):
    np.testing.assert_allclose(row['loss'], expected['loss'], rtol=1e-5)
