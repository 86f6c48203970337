"""Tests of the IGR/EGR experiments, the CIFAR ResNets and the benchmark, each
run end to end on a tiny configuration."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_gradient_penalty
from experiments import egr_cifar10
from experiments import igr_mnist_sweep
from experiments import igr_two_parameter
from jreg import data
from jreg import gradient_regularization as gr
from jreg.models import resnet


# --- the two-parameter model --------------------------------------------------


@pytest.fixture(scope='module')
def two_parameter_results(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('igr_two_parameter'))
  config = dict(igr_two_parameter.quickstart_config(), horizon=10.0,
                endpoint_learning_rates=[0.005, 0.02, 0.04, 0.06])
  return igr_two_parameter.run(config, workdir), workdir


def test_two_parameter_error_orders(two_parameter_results):
  """Backward error analysis: ‖GD − exact flow‖ = O(h), ‖GD − modified‖ = O(h²)."""
  results, workdir = two_parameter_results
  assert abs(results['slope_exact_flow'] - 1.0) < 0.25
  assert abs(results['slope_modified_flow'] - 2.0) < 0.25
  # At every h, GD is nearer the modified flow than the exact one.
  assert all(m < e for m, e in zip(results['error_to_modified_flow'],
                                   results['error_to_exact_flow']))
  for name in ('results.json', 'phase_plane.png', 'error_orders.png',
               'endpoints.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['slope_modified_flow'] == results['slope_modified_flow']


def test_two_parameter_larger_h_ends_nearer_flattest_minimum(two_parameter_results):
  results, _ = two_parameter_results
  ends = results['endpoints']
  x, y = results['config']['x'], results['config']['y']
  for end in ends:  # every run converged onto the curve of minima a·b = y/x
    assert end['a'] * end['b'] == pytest.approx(y / x, rel=1e-6)
  distances = [e['distance_to_flattest'] for e in ends]
  norms = [e['param_norm'] for e in ends]
  assert all(np.diff(distances) < 0), distances
  assert all(np.diff(norms) < 0), norms
  # Gradient flow (h → 0) conserves a² − b²; GD with small h ends near it.
  assert norms[0] < results['exact_flow_param_norm']
  assert norms[0] == pytest.approx(results['exact_flow_param_norm'], rel=1e-2)
  assert (results['moderate_gd_to_modified_flow']
          < results['moderate_gd_to_exact_flow'])


def test_two_parameter_rejects_bad_config(tmp_path):
  with pytest.raises(ValueError, match='moderate_learning_rate'):
    igr_two_parameter.run(dict(moderate_learning_rate=-0.1), str(tmp_path))
  with pytest.raises(ValueError, match='diverged'):
    igr_two_parameter.run(dict(igr_two_parameter.quickstart_config(),
                               endpoint_learning_rates=[0.5]), str(tmp_path))


# --- MNIST sweep --------------------------------------------------------------


def test_full_batch_gradient_accumulates_masked_batches(shared_data):
  model = igr_mnist_sweep.mlp(8, 3)
  arrays = {k: v[:300] for k, v in data.load_mnist(
      'train', data_dir=str(shared_data)).items()}
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  # Batches of 128: the last one is padded (mask) in eval mode.
  got = igr_mnist_sweep.full_batch_gradient(
      model, params, data.mnist_iterator('train', 128, mode='eval',
                                         arrays=arrays))
  whole = next(data.mnist_iterator('train', 300, mode='eval', arrays=arrays))
  loss_fn = igr_mnist_sweep.classification_loss(model)
  expected = jax.jit(jax.grad(lambda p: loss_fn(p, {}, None, whole)[0]))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mnist_sweep_tiny(tmp_path, shared_data):
  config = dict(igr_mnist_sweep.quickstart_config(), widths=[16],
                learning_rates=[0.1], egr_coefficients=[0.01], egr_widths=[16],
                egr_learning_rates=[0.1], num_steps=6, batch_size=128,
                train_examples=512, test_examples=256, eval_batch_size=256,
                log_every=3, data_dir=str(shared_data))
  results = igr_mnist_sweep.run(config, str(tmp_path))
  runs = results['runs']
  assert [(r['width'], r['egr_coefficient']) for r in runs] == [(16, 0.0),
                                                               (16, 0.01)]
  m = 784 * 16 + 16 + 3 * (16 * 16 + 16) + 16 * 10 + 10
  for r in runs:
    assert r['num_params'] == m
    assert r['igr_rate'] == pytest.approx(0.1 * m / 4)
    assert r['egr_rate'] == pytest.approx(r['egr_coefficient'] * m)
    assert 0 < r['r_ig'] < np.inf
    assert 0 <= r['test_accuracy'] <= 1 and 0 <= r['train_accuracy'] <= 1
  # Six SGD steps already learn something (chance level: loss ln 10).
  assert runs[0]['final_train_loss'] < np.log(10)
  # The per-step metrics written by fit carry the IGR quantities.
  with open(tmp_path / 'runs' / 'width16_lr0.1_mu0' / 'metrics.jsonl') as f:
    record = json.loads(f.readline())
  for key in ('r_ig', 'grad_norm_sq', 'igr_rate', 'penalty'):
    assert key in record
  assert record['igr_rate'] == pytest.approx(0.1 * m / 4, rel=1e-6)
  assert record['r_ig'] * m == pytest.approx(record['grad_norm_sq'], rel=1e-5)
  summary = results['summary']
  assert summary['num_runs'] == 2
  if summary['best_at_full_train_accuracy'] is None:
    assert summary['message'].startswith('no run reached 100%')
  assert os.path.getsize(tmp_path / 'r_ig_and_test_accuracy_vs_rate.png') > 0


def test_mnist_summary_picks_best_among_perfect_runs():
  runs = [dict(width=50, learning_rate=0.1, egr_coefficient=0.0, igr_rate=1.0,
               train_accuracy=1.0, test_accuracy=0.97),
          dict(width=50, learning_rate=0.2, egr_coefficient=0.0, igr_rate=2.0,
               train_accuracy=0.99, test_accuracy=0.98),
          dict(width=100, learning_rate=0.2, egr_coefficient=0.0, igr_rate=4.0,
               train_accuracy=1.0, test_accuracy=0.975)]
  summary = igr_mnist_sweep.summarize(runs)
  assert summary['best_at_full_train_accuracy'] is runs[2]
  assert summary['num_at_full_train_accuracy'] == 2
  assert summary['best_test_accuracy_overall'] == 0.98


def test_mnist_rejects_bad_config(tmp_path):
  with pytest.raises(ValueError, match='learning_rates'):
    igr_mnist_sweep.run(dict(learning_rates=[0.0]), str(tmp_path))
  with pytest.raises(ValueError, match='egr_coefficients'):
    igr_mnist_sweep.run(dict(egr_coefficients=[-1.0]), str(tmp_path))


# --- ResNets and the CIFAR-10 EGR experiment ---------------------------------


def _count(name):
  model = resnet.make(name)
  params, state = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), True))
  return gr.num_parameters(params), state


def test_resnet_parameter_counts():
  # ResNet-20 (He et al. 2016, Table 6: 0.27M) and the CIFAR ResNet-18 (11.17M).
  assert _count('resnet20')[0] == 269_722
  assert _count('resnet18')[0] == 11_173_962
  with pytest.raises(ValueError, match='6n'):
    resnet.cifar_resnet(10)


def test_resnet_batch_norm_state():
  model = resnet.make('resnet8')
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) + 3.0
  params, state = jax.jit(model.init, static_argnums=2)(
      jax.random.PRNGKey(0), images, True)
  apply = jax.jit(model.apply, static_argnums=4)
  logits, new_state = apply(params, state, None, images, True)
  assert logits.shape == (4, 10)
  # Every BatchNorm (stem, 2 per block, no projection) took one EMA step.
  counters = [v['counter'] for k, v in new_state.items() if k.endswith('mean_ema')]
  assert len(counters) == 1 + 2 * 3
  assert all(int(c) == 1 for c in counters)
  stem = new_state['resnet8/stem_bn/~/mean_ema']['average']  # [1, 1, 1, 16]
  assert float(jnp.max(jnp.abs(stem))) > 0
  # Haiku debiases the EMA: after one step the running statistics are the
  # batch's. A second batch moves them away from the first batch's.
  _, new_state = apply(params, new_state, None, 2.0 * images - 1.0, True)
  eval_logits, eval_state = apply(params, new_state, None, images, False)
  for a, b in zip(jax.tree.leaves(eval_state), jax.tree.leaves(new_state)):
    np.testing.assert_array_equal(a, b)  # evaluation leaves the state alone
  assert not np.allclose(eval_logits, logits, atol=1e-3)


def test_egr_cifar10_tiny(tmp_path, shared_data):
  config = dict(egr_cifar10.quickstart_config(), num_steps=2, batch_size=8,
                train_examples=64, test_examples=32, eval_batch_size=32,
                data_dir=str(shared_data))
  results = egr_cifar10.run(config, str(tmp_path))
  runs = results['runs']
  assert [r['egr_coefficient'] for r in runs] == [0.0, 0.01]
  for r in runs:
    assert r['model'] == 'resnet8'
    assert np.isfinite(r['final_train_loss']) and r['final_r_ig'] > 0
    assert 0 <= r['test_accuracy'] <= 1
  # Same seed and data: the penalty is the only difference between the runs.
  assert runs[0]['param_norm'] != runs[1]['param_norm']
  assert results['summary']['resnet8']['plain_test_accuracy'] == runs[0]['test_accuracy']
  assert os.path.getsize(tmp_path / 'test_accuracy_vs_mu.png') > 0


def test_egr_cifar10_rejects_bad_config(tmp_path):
  with pytest.raises(ValueError, match='models'):
    egr_cifar10.run(dict(models=['vgg']), str(tmp_path))


# --- the benchmark --------------------------------------------------------------


def test_benchmark_runs_every_method(tmp_path, shared_data):
  config = dict(bench_gradient_penalty.quickstart_config(), widths=[16],
                batch_size=32, repeats=2, steps_per_repeat=1, fd_width=16,
                fd_epsilons=[1e-2], fd_batches=1, fd_warmup_steps=1,
                data_dir=str(shared_data))
  results = bench_gradient_penalty.run(config, str(tmp_path))
  (entry,) = results['widths']
  assert set(entry['ratio_to_plain']) == {'plain', *gr.METHODS}
  assert entry['ratio_to_plain']['plain'] == 1.0
  assert all(v > 0 for v in entry['median_seconds_per_step'].values())
  accuracy = results['finite_difference_accuracy']
  assert set(accuracy['relative_error_mean']) == {'0.01'}
  assert all(entry['flops_ratio_to_plain'][m] > 1 for m in gr.METHODS)
  assert all(np.isfinite(v) and v > 0
             for v in accuracy['relative_error_mean'].values())
  assert (tmp_path / 'results.json').exists()
