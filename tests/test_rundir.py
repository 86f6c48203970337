"""One writer per workdir, the configuration record, errors as one sentence."""
import json
import logging as pylogging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import test_train
from jreg import errors
from jreg import rundir


def _write_lock(workdir, pid, host=None, age=0.0, **fields):
  """A lock file as another process writes it, last renewed `age` s ago."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, rundir.LOCK_FILE)
  with open(path, 'w') as f:
    json.dump({'host': host or socket.gethostname(), 'pid': pid,
               'started': '2026-01-01T00:00:00+00:00', **fields}, f)
  if age:
    os.utime(path, (time.time() - age,) * 2)


def _dead_pid():
  child = subprocess.Popen(['true'])
  child.wait()
  return child.pid


def test_second_process_is_refused_naming_host_and_pid(tmp_path):
  # The lock of a live process: the test's parent (pytest's launcher).
  _write_lock(tmp_path, os.getppid())
  with pytest.raises(rundir.WorkdirBusyError) as error:
    test_train._fit(tmp_path, num_steps=2)
  message = str(error.value)
  assert f'process {os.getppid()} on host {socket.gethostname()}' in message
  assert isinstance(error.value, errors.UserError)
  assert not (tmp_path / 'metrics.jsonl').exists()  # nothing trained or written
  with open(tmp_path / rundir.LOCK_FILE) as f:
    assert json.load(f)['pid'] == os.getppid()  # the other run's lock stays


def test_lock_held_by_another_live_process_of_another_host(tmp_path):
  _write_lock(tmp_path, os.getpid(), host='elsewhere')
  with pytest.raises(rundir.WorkdirBusyError, match='on host elsewhere'):
    with rundir.lock(tmp_path):
      pass


def test_lock_held_by_a_subprocess(tmp_path):
  """A real second process holds the lock while this one asks for it."""
  script = ('import sys, time\n'
            'from jreg import rundir\n'
            'with rundir.lock(sys.argv[1]):\n'
            '  print("locked", flush=True)\n'
            '  sys.stdin.readline()\n')
  env = dict(os.environ, PYTHONPATH=str(test_train.__file__).rsplit('/tests/', 1)[0],
             JAX_PLATFORMS='cpu')
  holder = subprocess.Popen([sys.executable, '-c', script, str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(rundir.WorkdirBusyError,
                       match=f'in use by process {holder.pid} on host'):
      with rundir.lock(tmp_path):
        pass
  finally:
    holder.communicate('\n', timeout=60)
  assert holder.returncode == 0
  assert not (tmp_path / rundir.LOCK_FILE).exists()  # released at its exit
  with rundir.lock(tmp_path):
    assert (tmp_path / rundir.LOCK_FILE).exists()


def test_stale_lock_of_this_host_is_taken_over(tmp_path, caplog):
  _write_lock(tmp_path, _dead_pid())
  with caplog.at_level(pylogging.WARNING):
    with rundir.lock(tmp_path):
      with open(tmp_path / rundir.LOCK_FILE) as f:
        assert json.load(f)['pid'] == os.getpid()
  assert any('took over the lock' in r.getMessage() for r in caplog.records)
  assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_lock_is_reentrant_and_released_on_exceptions(tmp_path):
  with pytest.raises(KeyError):
    with rundir.lock(tmp_path):
      # An experiment holding its workdir trains sub-runs, one in the same
      # directory.
      test_train._fit(tmp_path / 'sub', num_steps=1, checkpoint_every=0)
      with rundir.lock(tmp_path):
        assert rundir.is_locked_by_me(tmp_path)
      assert (tmp_path / rundir.LOCK_FILE).exists()
      raise KeyError('boom')
  assert not (tmp_path / rundir.LOCK_FILE).exists()
  assert not rundir.is_locked_by_me(tmp_path)


def test_workdir_that_is_a_file_is_a_sentence(tmp_path):
  path = tmp_path / 'file'
  path.write_text('not a directory')
  with pytest.raises(rundir.WorkdirError, match='is a file, not a directory'):
    test_train._fit(path, num_steps=1)
  with pytest.raises(rundir.WorkdirError, match='cannot be created'):
    with rundir.lock(path / 'below'):
      pass
  assert path.read_text() == 'not a directory'


def test_config_diff_lists_dotted_keys():
  old = {'model': {'width': 8, 'depth': 2}, 'lr': 0.1, 'steps': (1, 2)}
  new = {'model': {'width': 16, 'depth': 2}, 'lr': 0.1, 'steps': [1, 2],
         'seed': 3}
  assert rundir.flatten(old) == {'model.width': 8, 'model.depth': 2, 'lr': 0.1,
                                 'steps': (1, 2)}
  diff = rundir.config_diff(old, new)
  assert diff == {'model.width': (8, 16), 'seed': ('(absent)', 3)}
  assert rundir.describe_diff(diff) == 'model.width: 8 → 16, seed: (absent) → 3'


def test_check_config_records_refuses_and_logs(tmp_path, caplog):
  config = {'optimizer': {'name': 'sgd', 'learning_rate': 0.1}}
  assert rundir.check_config(tmp_path, config) == {}
  assert rundir.read_config(tmp_path) == config
  assert rundir.check_config(tmp_path, config) == {}  # same: accepted
  changed = {'optimizer': {'name': 'adam', 'learning_rate': 0.1}}
  with pytest.raises(rundir.ConfigMismatchError,
                     match=r'1 key differs: optimizer\.name: "sgd" → "adam"') as error:
    rundir.check_config(tmp_path, changed)
  # What to do, for the command line and for Python.
  for words in ('`--workdir` on the command line', '`restart=True` in Python',
                '`--allow_config_change` on the command line'):
    assert words in str(error.value)
  assert rundir.read_config(tmp_path) == config  # a refusal changes nothing
  with caplog.at_level(pylogging.WARNING):
    rundir.check_config(tmp_path, changed, allow_change=True)
  assert any('optimizer.name' in r.getMessage() for r in caplog.records)
  assert rundir.read_config(tmp_path) == changed
  with open(tmp_path / rundir.CONFIG_CHANGES_FILE) as f:
    (line,) = f.readlines()
  assert json.loads(line)['changes'] == {'optimizer.name': ['sgd', 'adam']}


def test_checkpoint_minutes_may_change_on_a_resume(tmp_path):
  # A workdir recorded before `checkpoint_minutes` existed, resumed by a
  # command whose preset sets it: how often a run saves is not what it
  # computes, so the resume is accepted and the change recorded.
  old = {'learning_rate': 0.1}
  rundir.check_config(tmp_path, old)
  new = {'learning_rate': 0.1, 'checkpoint_minutes': 10.0}
  assert rundir.check_config(tmp_path, new) == {
      'checkpoint_minutes': ('(absent)', 10.0)}
  assert rundir.read_config(tmp_path) == new
  assert rundir.check_config(tmp_path, dict(new, checkpoint_minutes=0.0))
  # Beside a change of what the run computes, only that change is named.
  with pytest.raises(rundir.ConfigMismatchError,
                     match=r'1 key differs: learning_rate: 0.1 → 0.2\)'):
    rundir.check_config(tmp_path, {'learning_rate': 0.2,
                                   'checkpoint_minutes': 5.0})


def test_move_aside_keeps_everything(tmp_path):
  (tmp_path / 'a.txt').write_text('a')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'b.txt').write_text('b')
  with rundir.lock(tmp_path):
    moved = rundir.move_aside(tmp_path)
    assert (tmp_path / rundir.LOCK_FILE).exists()
  assert sorted(os.listdir(tmp_path)) == [rundir.PREVIOUS_DIR]
  assert open(os.path.join(moved, 'sub', 'b.txt')).read() == 'b'
  assert rundir.move_aside(tmp_path) is None  # nothing left to move


def test_cli_reports_a_user_error_as_one_sentence(tmp_path):
  script = ('from jreg import cli, rundir\n'
            'def main(argv):\n'
            '  raise rundir.WorkdirBusyError("the workdir W is in use by '
            'process 1 on host h.")\n'
            'cli.run(main)\n')
  env = dict(os.environ, PYTHONPATH=str(test_train.__file__).rsplit('/tests/', 1)[0],
             JAX_PLATFORMS='cpu')
  done = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, env=env, timeout=120, cwd=tmp_path)
  assert done.returncode == 1
  assert done.stderr.strip() == ('FATAL: the workdir W is in use by process 1 on '
                                 'host h.')


# ---------------------------------------------------------------------------
# Locks on a cluster: SLURM jobs, leases, reused PIDs, unreadable files.


@pytest.fixture
def outside_slurm(monkeypatch):
  for name in ('SLURM_JOB_ID', 'SLURM_ARRAY_JOB_ID', 'SLURM_ARRAY_TASK_ID',
               'SLURM_RESTART_COUNT', rundir.LEASE_ENV):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def _takes_over(workdir, caplog, why):
  with caplog.at_level(pylogging.WARNING):
    with rundir.lock(workdir):
      with open(os.path.join(workdir, rundir.LOCK_FILE)) as f:
        assert json.load(f)['pid'] == os.getpid()
  said = [r.getMessage() for r in caplog.records if 'took over' in r.getMessage()]
  assert len(said) == 1 and why in said[0], said
  caplog.clear()


def test_lock_records_the_slurm_job_and_the_process_start(tmp_path, outside_slurm):
  outside_slurm.setenv('SLURM_JOB_ID', '4243')
  outside_slurm.setenv('SLURM_ARRAY_JOB_ID', '4200')
  outside_slurm.setenv('SLURM_ARRAY_TASK_ID', '3')
  with rundir.lock(tmp_path):
    with open(tmp_path / rundir.LOCK_FILE) as f:
      owner = json.load(f)
  assert owner['slurm_job'] == '4200_3' and owner['slurm_job_id'] == '4243'
  assert owner['lease_s'] == rundir.LEASE_S
  assert isinstance(owner['pid_start'], int) and owner['pid_start'] > 0


def test_lock_of_the_same_slurm_job_on_another_host_is_taken_over(
    tmp_path, outside_slurm, caplog):
  # A requeued job on node B finds the lock its first run left on node A.
  outside_slurm.setenv('SLURM_JOB_ID', '4242')
  _write_lock(tmp_path, os.getppid(), host='node-a', slurm_job='4242',
              lease_s=120.0)
  _takes_over(tmp_path, caplog, 'earlier run of this SLURM job 4242')
  # An array task: the array job and task index, not the task's job id.
  outside_slurm.setenv('SLURM_ARRAY_JOB_ID', '4200')
  outside_slurm.setenv('SLURM_ARRAY_TASK_ID', '3')
  _write_lock(tmp_path, os.getppid(), host='node-a', slurm_job='4200_3',
              lease_s=120.0)
  _takes_over(tmp_path, caplog, 'SLURM job 4200_3')
  # Another array task of the same array, alive on another host: refused.
  _write_lock(tmp_path, os.getppid(), host='node-a', slurm_job='4200_4',
              lease_s=120.0)
  with pytest.raises(rundir.WorkdirBusyError,
                     match=r'on host node-a .*SLURM job 4200_4'):
    with rundir.lock(tmp_path):
      pass


def test_lock_of_another_host_is_stale_once_its_lease_ran_out(
    tmp_path, outside_slurm, caplog):
  _write_lock(tmp_path, os.getppid(), host='node-a', lease_s=30.0, age=5)
  with pytest.raises(rundir.WorkdirBusyError, match='on host node-a'):
    with rundir.lock(tmp_path):  # renewed 5 s ago: alive
      pass
  _write_lock(tmp_path, os.getppid(), host='node-a', lease_s=30.0, age=45)
  _takes_over(tmp_path, caplog, 'lease was last renewed 45 s ago (lease 30 s)')


def test_lock_of_a_reused_pid_is_stale(tmp_path, outside_slurm, caplog):
  # The parent process runs, but it is not the process that wrote the lock.
  start = rundir._process_start(os.getppid())
  _write_lock(tmp_path, os.getppid(), pid_start=start + 1, lease_s=120.0)
  _takes_over(tmp_path, caplog, 'its PID now belongs to another process')
  _write_lock(tmp_path, os.getppid(), pid_start=start, lease_s=120.0)
  with pytest.raises(rundir.WorkdirBusyError, match=f'process {os.getppid()}'):
    with rundir.lock(tmp_path):
      pass


def test_empty_or_unreadable_lock_file_is_stale_after_a_few_seconds(
    tmp_path, outside_slurm, caplog):
  path = tmp_path / rundir.LOCK_FILE
  path.write_text('')
  with pytest.raises(rundir.WorkdirBusyError, match='cannot be read'):
    with rundir.lock(tmp_path):  # perhaps being written right now
      pass
  os.utime(path, (time.time() - 10,) * 2)
  _takes_over(tmp_path, caplog, 'empty or unreadable lock file, 10 s old')
  path.write_text('{"host": "node-a", "pi')
  os.utime(path, (time.time() - 10,) * 2)
  _takes_over(tmp_path, caplog, 'empty or unreadable lock file')


@pytest.mark.skipif(shutil.which('unshare') is None or os.geteuid() != 0,
                    reason='needs unshare and root for a second hostname')
def test_live_writer_on_another_host_keeps_its_lock_by_renewing_it(
    tmp_path, outside_slurm):
  """A real process with another hostname (a UTS namespace) holds the lock
  with a 1 s lease: its heartbeat keeps it, past the lease, until it ends."""
  script = ('import sys\n'
            'from jreg import rundir\n'
            'with rundir.lock(sys.argv[1]):\n'
            '  print("locked", flush=True)\n'
            '  sys.stdin.readline()\n')
  env = dict(os.environ, PYTHONPATH=str(test_train.__file__).rsplit('/tests/', 1)[0],
             JAX_PLATFORMS='cpu', **{rundir.LEASE_ENV: '1'})
  holder = subprocess.Popen(
      ['unshare', '--uts', 'sh', '-c',
       'hostname nodeb && exec "$0" -c "$1" "$2"', sys.executable, script,
       str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    for _ in range(3):  # 3 s: three leases
      time.sleep(1)
      with pytest.raises(rundir.WorkdirBusyError,
                         match=f'process {holder.pid} on host nodeb'):
        with rundir.lock(tmp_path):
          pass
  finally:
    holder.communicate('\n', timeout=60)
  assert holder.returncode == 0
  assert not (tmp_path / rundir.LOCK_FILE).exists()
