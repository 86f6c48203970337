"""One writer per workdir, the configuration record, errors as one sentence."""
import json
import logging as pylogging
import os
import socket
import subprocess
import sys

import pytest

import test_train
from jreg import errors
from jreg import rundir


def _write_lock(workdir, pid, host=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, rundir.LOCK_FILE), 'w') as f:
    json.dump({'host': host or socket.gethostname(), 'pid': pid,
               'started': '2026-01-01T00:00:00+00:00'}, f)


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
