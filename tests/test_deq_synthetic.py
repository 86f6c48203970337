"""End-to-end runs of the DEQ experiments on tiny configurations."""
import json
import os

import numpy as np
import pytest

from experiments import bench_deq
from experiments import deq_synthetic


def test_deq_synthetic_end_to_end(tmp_path):
  config = dict(deq_synthetic.quickstart_config(), epochs=1, gammas=(0.0, 2.0),
                learning_rate=1e-2, log_every=16, eval_max_iter=30)
  summary = deq_synthetic.run(config, str(tmp_path))
  assert set(summary['per_gamma']) == {'0', '2'}
  for gamma, result in summary['per_gamma'].items():
    assert np.isfinite(result['validation_mse'])
    assert 1 <= result['nfe_to_tol'] <= 30
    assert 0.0 <= result['converged_fraction_high_limit'] <= 1.0
    assert result['residual_after_6_nfe'] >= 0.0
    assert result['spectral_radius'] > 0.0
    assert 1 <= result['train_forward_nfe'] <= 6
    assert 1 <= result['train_backward_nfe'] <= 6
  assert summary['per_gamma']['2']['final_jacobian_loss'] is not None
  for name in ('surface.png', 'slice_x-1.png', 'training.png', 'results.json'):
    assert os.path.getsize(tmp_path / name) > 0
  with open(tmp_path / 'gamma_2' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r['split'] == 'train']
  for key in ('forward_nfe', 'backward_nfe', 'forward_abs_residual',
              'backward_abs_residual', 'forward_unconverged', 'jacobian_loss',
              'jacobian_applied'):
    assert key in train[-1], key
  # p = 0.4 of the steps carry the Jacobian term.
  applied = np.mean([r['jacobian_applied'] for r in train])
  assert 0.1 < applied < 0.7


def test_deq_synthetic_rejects_bad_config(tmp_path):
  with pytest.raises(ValueError, match='jacobian_prob'):
    deq_synthetic.run(dict(jacobian_prob=1.5), str(tmp_path))


def test_bench_deq_toy_runs(tmp_path):
  config = dict(bench_deq.quickstart_config(), steps=2, warmup=0, batch=8)
  result = bench_deq.run(config, str(tmp_path))
  for key in ('median_step_s', 't_f_s', 't_vjp_s', 't_rest_s',
              'solver_overhead'):
    assert result[key] > 0, key
  assert np.isfinite(result['loss'])
  assert (tmp_path / 'bench.json').exists()
