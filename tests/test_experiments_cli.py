"""The command line of the experiments: refusals, one writer per workdir, quickstart.

Every refusal is checked through a real `python -m experiments.NAME` process:
one sentence on stderr (one `FATAL` line), a non-zero exit status, no
traceback, and nothing trained.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import quickstart
from jreg import cli
from jreg import rundir

QUICK = '--config=experiments/configs/{}.py:quickstart'


def _command(name, *args, timeout=300):
  return subprocess.run([sys.executable, '-m', f'experiments.{name}', *args],
                        capture_output=True, text=True, timeout=timeout)


def _one_sentence(result, fragment):
  """The process failed with exactly one FATAL line containing `fragment`."""
  stderr = result.stderr
  assert result.returncode != 0, stderr[-2000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  fatal = [line for line in stderr.splitlines() if 'FATAL' in line]
  assert len(fatal) == 1, stderr[-2000:]
  assert fragment in fatal[0], fatal[0]
  return fatal[0]


def test_bad_flags_are_refused_with_one_sentence(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory')
  busy = tmp_path / 'changed'
  # A workdir whose saved config differs from the command's.
  saved = cli.get_config('deq_synthetic', 'quickstart', {'learning_rate': 0.5})
  rundir.check_config(str(busy), saved.to_dict())
  work = f'--workdir={tmp_path / "w"}'
  synthetic = ('deq_synthetic', QUICK.format('deq_synthetic'))
  cases = [  # (experiment, args, fragment of the sentence)
      (*synthetic, '--config.seed=abc', work, 'config.seed=abc'),
      (*synthetic, '--config.seed=-1', work, 'seed must be >= 0'),
      (*synthetic, '--config.learning_rate=-1', work, 'learning_rate must be > 0'),
      (*synthetic, '--config.num_steps=0', work, 'num_steps must be >= 1'),
      (*synthetic, '--config.jacobian.probability=1.5', work, 'in [0, 1]'),
      (*synthetic, '--config.sweep.jacobian_weight=(-1.0,)', work, 'gamma'),
      (*synthetic, '--config.parallel=sharded', '--config.batch_size=66', work,
       'divisible by the 4 devices'),
      (*synthetic, f'--workdir={a_file}', 'is a file'),
      (*synthetic, f'--workdir={a_file / "sub"}', str(a_file)),
      (*synthetic, '--workdir is required'),
      (*synthetic, work, 'unexpected', 'unexpected arguments'),
      (*synthetic, f'--workdir={busy}', 'learning_rate'),
      ('deq_synthetic', '--config=experiments/configs/deq_synthetic.py:huge', work,
       "unknown preset 'huge'"),
      ('deq_synthetic', '--epochs=3', work, "Unknown command line flag 'epochs'"),
      ('deq_wikitext', QUICK.format('deq_wikitext'), '--config.jacobian.weight=-1',
       work, 'jacobian.weight (gamma) must be >= 0'),
      ('deq_cifar10', QUICK.format('deq_cifar10'), '--config.model.num_classes=3',
       work, 'has 3 classes but the data has 10 labels'),
      ('quickstart', work, '--config.learning_rate=-1', "no key 'learning_rate'"),
      ('quickstart', work, '--config.only=nonsense', 'unknown experiments'),
  ]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda case: _command(*case[:-1]), cases))
  for case, result in zip(cases, results):
    _one_sentence(result, case[-1])
  assert not (tmp_path / 'w').exists()  # nothing was started
  assert json.loads((busy / 'config.json').read_text())['learning_rate'] == 0.5


def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  args = (QUICK.format('deq_synthetic'), f'--workdir={workdir}',
          '--config.num_steps=100000')
  first = subprocess.Popen([sys.executable, '-m', 'experiments.deq_synthetic',
                            *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 240
    while not (workdir / '.lock').exists():
      assert first.poll() is None, 'the first run ended early'
      assert time.monotonic() < deadline, 'the first run never locked its workdir'
      time.sleep(0.2)
    second = _command('deq_synthetic', *args)
    sentence = _one_sentence(second, f'in use by process {first.pid}')
    assert 'host' in sentence
    assert first.poll() is None  # the first run goes on
  finally:
    first.kill()
    first.wait()


def test_quickstart_runs_forwards_data_settings_and_reports(tmp_path):
  config = cli.get_config('quickstart', 'quickstart',
                          {'only': 'synthetic_mlp,igr_mnist_sweep',
                           'data.dir': str(tmp_path / 'no_data')})
  summary = quickstart.run(config, str(tmp_path),
                           overrides={'synthetic_mlp': {'num_steps': 8,
                                                        'log_every': 4}})
  assert set(summary) == {'synthetic_mlp', 'igr_mnist_sweep'}
  assert summary['synthetic_mlp']['validation_mse'] > 0
  # data.dir reached the experiment: its files are missing there, so it is
  # skipped with the sentence saying how to get them.
  assert 'no_data' in summary['igr_mnist_sweep']['skipped']
  saved = json.loads((tmp_path / 'summary.json').read_text())
  assert set(saved) == set(summary)
  assert os.path.isfile(tmp_path / 'synthetic_mlp' / 'config.json')


def test_config_json_is_written_only_once_the_run_really_starts(
    shared_data, tmp_path):
  """A run refused before it starts (its data not found, a checkpoint of
  another model under `--allow_config_change`) leaves config.json as it
  was, so the corrected or the original command is not refused as a change."""
  from experiments import igr_mnist_sweep  # pylint: disable=g-import-not-at-top
  from jreg import checkpoint  # pylint: disable=g-import-not-at-top
  from jreg import data  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  overrides = {'num_steps': 2, 'eval_every': 2, 'checkpoint_every': 0,
               'sweep.model_width': (8,), 'sweep.learning_rate': (0.1,),
               'sweep.regularizer_coefficient': (0.0,),
               'data.train_examples': 256, 'data.eval_examples': 256}
  wrong = cli.get_config('igr_mnist_sweep', 'quickstart',
                         dict(overrides, **{'data.dir': str(tmp_path / 'nowhere')}))
  with pytest.raises(data.DataError):
    cli.execute('igr_mnist_sweep', igr_mnist_sweep.run, wrong, str(workdir))
  assert rundir.read_config(workdir) is None
  right = cli.get_config('igr_mnist_sweep', 'quickstart',
                         dict(overrides, **{'data.dir': str(shared_data)}))
  cli.execute('igr_mnist_sweep', igr_mnist_sweep.run, right, str(workdir))
  assert rundir.read_config(workdir) == json.loads(json.dumps(right.to_dict()))

  # An accepted change whose run is then refused changes nothing on disk.
  changed = right.copy_and_resolve_references()
  changed.seed = 7

  def refused(config, path):
    del config
    raise checkpoint.CheckpointError(f'the checkpoint in {path} holds another model.')

  with pytest.raises(checkpoint.CheckpointError):
    cli.execute('igr_mnist_sweep', refused, changed, str(workdir),
                allow_config_change=True)
  assert rundir.read_config(workdir)['seed'] == right.seed
  assert not (workdir / rundir.CONFIG_CHANGES_FILE).exists()
  cli.execute('igr_mnist_sweep', igr_mnist_sweep.run, right, str(workdir))

  # A change whose run starts (its first checkpoint) is recorded, even if the
  # run stops later.
  def started(config, path):
    del config
    saver = checkpoint.Checkpointer(path)
    saver.save(1, {'w': np.zeros(2, np.float32)}, {'position': 0})
    saver.close()
    raise checkpoint.CheckpointError('stopped after its first checkpoint.')

  with pytest.raises(checkpoint.CheckpointError):
    cli.execute('igr_mnist_sweep', started, changed, str(tmp_path / 'other'))
  assert rundir.read_config(tmp_path / 'other')['seed'] == 7
