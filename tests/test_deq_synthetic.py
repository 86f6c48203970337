"""The synthetic 1-D DEQ experiment: its runs, and killed-and-restarted runs.

A command killed at any moment and run again must end with the results.json,
figures and per-step metrics of an uninterrupted run. The kills are injected
in-process (an exception from the training data or from the figures) at three
moments of one chain: in the middle of the first run, in the middle of the
second run after the first had finished, and after both runs but before the
results were written. Compiled work is shared through JAX's persistent
compilation cache (each `run` builds its functions anew).
"""
import json
import os

import jax
import numpy as np
import pytest

from experiments import deq_synthetic
from jreg import cli
from jreg import data
from jreg import metrics as metrics_lib
from jreg.tasks import deq_synthetic as task
from killing import Killed
from killing import KilledAfter

OVERRIDES = {'num_steps': 12, 'log_every': 2, 'checkpoint_every': 4,
             'probe.max_iter': 20, 'eval_batch_size': 500,
             'sweep.jacobian_weight': (0.0, 2.0)}
RUNS = ('jacobian_weight=0,seed=0', 'jacobian_weight=2,seed=0')
FIGURES = ('surface.png', 'slice_x-1.png', 'training.png')
TIMING_KEYS = ('steps_per_sec', 'wall_time')


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """Shares compiled steps between the runs of this module (each run traces
  its functions anew; the persistent cache finds them by their HLO)."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update(names[1], 0)
  jax.config.update(names[2], 0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def _config(**overrides):
  return cli.get_config('deq_synthetic', 'quickstart', dict(OVERRIDES, **overrides))


def _metrics(workdir):
  """Every run's records without the timing values (which differ by nature)."""
  return {name: [{k: v for k, v in record.items() if k not in TIMING_KEYS}
                 for record in metrics_lib.read_jsonl(
                     os.path.join(workdir, 'runs', name, 'metrics.jsonl'))]
          for name in RUNS}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run of the command."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  summary = cli.execute('deq_synthetic', deq_synthetic.run, _config(), workdir)
  return workdir, summary


def test_runs_report_solver_behaviour_and_write_figures(reference):
  workdir, summary = reference
  assert set(summary['runs']) == set(RUNS)
  for result in summary['runs'].values():
    assert np.isfinite(result['validation_mse'])
    assert 1 <= result['nfe_to_tol'] <= 20
    assert 0.0 <= result['converged_fraction_high_limit'] <= 1.0
    assert result['residual_after_budget'] >= 0.0
    assert result['spectral_radius'] > 0.0
    assert 1 <= result['train_forward_nfe'] <= 6
    assert 1 <= result['train_backward_nfe'] <= 6
  assert summary['runs'][RUNS[0]]['final_jacobian_loss'] is None
  assert summary['runs'][RUNS[1]]['final_jacobian_loss'] >= 0
  for name in FIGURES:
    assert os.path.getsize(os.path.join(workdir, name)) > 10_000
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == summary
  # Each run is a complete config of its own (gamma set from the sweep).
  with open(os.path.join(workdir, 'runs', RUNS[1], 'config.json')) as f:
    run_config = json.load(f)
  assert run_config['jacobian']['weight'] == 2.0 and 'sweep' not in run_config
  records = _metrics(workdir)[RUNS[1]]
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(2, 13, 2))
  for key in ('forward_nfe', 'backward_nfe', 'forward_abs_residual',
              'backward_abs_residual', 'forward_unconverged', 'jacobian_loss',
              'jacobian_applied'):
    assert key in train[-1], key
  # p = 0.4 of the steps carry the Jacobian term (12 steps: loose bounds).
  applied = np.mean([r['jacobian_applied'] for r in train])
  assert 0.05 < applied < 0.85
  assert max(r['jacobian_loss'] for r in train) > 0


def test_killed_at_three_moments_ends_as_uninterrupted(reference, tmp_path,
                                                       monkeypatch):
  workdir = str(tmp_path)
  make_iterator = data.synthetic_1d_iterator
  started = []

  def killed_in_run(number, after):
    def iterator(split, *args, **kwargs):
      it = make_iterator(split, *args, **kwargs)
      if split == 'train':
        started.append(it)
        if len(started) == number:
          return KilledAfter(it, after)
      return it
    return iterator

  def run():
    return cli.execute('deq_synthetic', deq_synthetic.run, _config(), workdir)

  # 1. In the middle of the first run (after a checkpoint at step 4).
  monkeypatch.setattr(data, 'synthetic_1d_iterator', killed_in_run(1, 6))
  with pytest.raises(Killed):
    run()
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  # 2. In the middle of the second run, the first having finished on resume.
  started.clear()
  monkeypatch.setattr(data, 'synthetic_1d_iterator', killed_in_run(2, 9))
  with pytest.raises(Killed):
    run()
  # 3. After both runs finished, before the results and figures were written.
  monkeypatch.setattr(data, 'synthetic_1d_iterator', make_iterator)

  def figures_killed(*args, **kwargs):
    raise Killed()

  monkeypatch.setattr(task, 'figures', figures_killed)
  with pytest.raises(Killed):
    run()
  monkeypatch.undo()
  summary = run()

  reference_dir, reference_summary = reference
  assert summary == reference_summary
  with open(os.path.join(workdir, 'results.json')) as f, \
      open(os.path.join(reference_dir, 'results.json')) as g:
    assert json.load(f) == json.load(g)
  assert _metrics(workdir) == _metrics(reference_dir)  # no duplicate rows either
  for name in FIGURES:
    with open(os.path.join(workdir, name), 'rb') as f, \
        open(os.path.join(reference_dir, name), 'rb') as g:
      assert f.read() == g.read(), name
  # Run again once finished: the same report, nothing trained or appended.
  assert run() == reference_summary
  assert _metrics(workdir) == _metrics(reference_dir)


def test_bench_deq_toy_runs(tmp_path):
  from experiments import bench_deq  # pylint: disable=g-import-not-at-top
  config = dict(bench_deq.quickstart_config(), steps=2, warmup=0, batch=8)
  result = bench_deq.run(config, str(tmp_path))
  for key in ('median_step_s', 't_f_s', 't_vjp_s', 't_rest_s',
              'solver_overhead'):
    assert result[key] > 0, key
  assert np.isfinite(result['loss'])
  assert (tmp_path / 'bench.json').exists()
