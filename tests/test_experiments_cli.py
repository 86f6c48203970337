"""The quickstart end to end on tiny configs, and the command-line contract."""
import json
import subprocess
import sys

import pytest

from experiments import quickstart
from experiments import synthetic_mlp
from jreg import metrics as metrics_lib


def test_synthetic_mlp_fits_the_cubic(tmp_path):
  results = synthetic_mlp.run(dict(epochs=3, learning_rate=1e-2, log_every=32),
                              str(tmp_path))
  # The target's variance is about 4; three epochs get well below it.
  assert results['validation_mse'] < 1.0
  assert (tmp_path / 'fit.png').stat().st_size > 10_000
  records = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert records[-1]['split'] == 'eval'


def test_quickstart_runs_and_summarises(tmp_path):
  summary = quickstart.run(str(tmp_path), only=('synthetic_mlp',),
                           config_overrides={'synthetic_mlp': {'epochs': 1}})
  assert set(summary) == {'synthetic_mlp'}
  assert json.loads((tmp_path / 'summary.json').read_text())['synthetic_mlp']
  # Without the offline files, data experiments are skipped with the reason.
  skipped = quickstart.run(str(tmp_path / 'nodata'), only=('igr_mnist_sweep',),
                           data_dir=str(tmp_path))
  assert 'train-images-idx3-ubyte.gz' in skipped['igr_mnist_sweep']['skipped']
  with pytest.raises(ValueError, match='unknown experiments'):
    quickstart.run(str(tmp_path), only=('nonsense',))


def _cli(*args):
  return subprocess.run([sys.executable, '-m', *args], capture_output=True,
                        text=True, timeout=120)


def test_bad_flags_give_one_sentence_and_nonzero_exit(tmp_path):
  result = _cli('experiments.synthetic_mlp', f'--workdir={tmp_path}', '--epochs=0')
  assert result.returncode != 0
  assert 'must be positive' in result.stderr
  assert 'Traceback' not in result.stderr
  result = _cli('experiments.synthetic_mlp')
  assert result.returncode != 0 and '--workdir is required' in result.stderr


def test_missing_data_gives_one_sentence_and_nonzero_exit(tmp_path):
  result = _cli('experiments.igr_mnist_sweep', f'--workdir={tmp_path / "run"}',
                f'--data_dir={tmp_path}', '--num_steps=1')
  assert result.returncode != 0, result.stderr[-2000:]
  message = [line for line in result.stderr.splitlines()
             if 'train-images-idx3-ubyte.gz is missing' in line]
  assert len(message) == 1 and "source='auto'" in message[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_nan_loss_stops_the_command_with_one_sentence(tmp_path):
  result = _cli('experiments.synthetic_mlp', f'--workdir={tmp_path}', '--epochs=1',
                '--learning_rate=1e30', '--checkpoint_every=8', '--log_every=1')
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'non-finite loss' in result.stderr and 'Traceback' not in result.stderr
  assert 'last good checkpoint' in result.stderr
  # What was written before the failure is still there.
  assert (tmp_path / 'metrics.jsonl').stat().st_size > 0
