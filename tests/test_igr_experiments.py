"""The IGR/EGR experiments end to end at their quickstart presets, their
restart guarantees (re-run, killed and restarted at two moments), the library
tasks they are built from, and the CIFAR ResNets."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_gradient_penalty
from experiments import egr_cifar10
from experiments import igr_mnist_sweep
from experiments import igr_two_parameter
from experiments import synthetic_mlp
from jreg import checkpoint as checkpoint_lib
from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import metrics as metrics_lib
from jreg import train
from jreg.models import count_params
from jreg.models import resnet
from jreg.tasks import igr
from killing import Killed
from killing import KilledAfter


def _config(name, shared_data=None, **overrides):
  if shared_data is not None:
    overrides['data.dir'] = str(shared_data)
  return cli.get_config(name, 'quickstart', overrides)


def _runs(workdir):
  """`{run name: metrics.jsonl records}` of a multi-run experiment."""
  root = os.path.join(workdir, 'runs')
  return {name: metrics_lib.read_jsonl(os.path.join(root, name, 'metrics.jsonl'))
          for name in sorted(os.listdir(root))}


# --- the two-parameter model (quickstart preset, shorter horizon) -------------


@pytest.fixture(scope='module')
def two_parameter(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('igr_two_parameter'))
  config = _config('igr_two_parameter', horizon=10.0,
                   **{'endpoints.learning_rates': (0.005, 0.02, 0.04, 0.06)})
  igr_two_parameter.run(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f), config, workdir


def test_two_parameter_error_orders(two_parameter):
  """Backward error analysis: ‖GD − exact flow‖ = O(h), ‖GD − modified‖ = O(h²)."""
  results, _, workdir = two_parameter
  assert abs(results['slope_exact_flow'] - 1.0) < 0.25
  assert abs(results['slope_modified_flow'] - 2.0) < 0.25
  # At every h, GD is nearer the modified flow than the exact one.
  assert all(m < e for m, e in zip(results['error_to_modified_flow'],
                                   results['error_to_exact_flow']))
  for name in ('phase_plane.png', 'error_orders.png', 'endpoints.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 10_000


def test_two_parameter_larger_h_ends_nearer_flattest_minimum(two_parameter):
  results, config, _ = two_parameter
  ends = results['endpoints']
  for end in ends:  # every run converged onto the curve of minima a·b = y/x
    assert end['a'] * end['b'] == pytest.approx(config.data.y / config.data.x,
                                                rel=1e-6)
  distances = [e['distance_to_flattest'] for e in ends]
  norms = [e['param_norm'] for e in ends]
  assert all(np.diff(distances) < 0), distances
  assert all(np.diff(norms) < 0), norms
  # Gradient flow (h → 0) conserves a² − b²; GD with small h ends near it.
  assert norms[0] < results['exact_flow_param_norm']
  assert norms[0] == pytest.approx(results['exact_flow_param_norm'], rel=1e-2)
  assert (results['moderate_gd_to_modified_flow']
          < results['moderate_gd_to_exact_flow'])


def test_two_parameter_refuses_bad_settings(tmp_path):
  with pytest.raises(cli.ConfigError, match='phase_plane.moderate_learning_rate'):
    _config('igr_two_parameter', **{'phase_plane.moderate_learning_rate': -0.1})
  with pytest.raises(cli.ConfigError, match='orders.num_steps'):
    _config('igr_two_parameter', **{'orders.num_steps': (20, 40.5, 80)})
  with pytest.raises(igr.DivergenceError, match='diverged'):
    igr_two_parameter.run(_config('igr_two_parameter', rk4_substeps=100, **{
        'endpoints.learning_rates': (0.5,)}), str(tmp_path))


# --- R_IG of a training set and the summaries --------------------------------


def test_full_batch_gradient_accumulates_masked_batches(shared_data):
  task = igr.mnist_mlp_task(8, 3)
  assert task.num_params == 784 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
  arrays = data.first_examples(data.load_mnist('train', data_dir=str(shared_data)),
                               300)
  params, _ = task.init(jax.random.PRNGKey(0))
  assert count_params(params) == task.num_params
  # Batches of 128: the last one is padded (mask) in eval mode.
  got = igr.full_batch_gradient(task.summed_gradient, params, {},
                                data.mnist_iterator('train', 128, mode='eval',
                                                    arrays=arrays))
  whole = next(data.mnist_iterator('train', 300, mode='eval', arrays=arrays))
  del whole['mask']
  expected = jax.jit(jax.grad(lambda p: task.loss_fn(p, {}, None, whole)[0]))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_summaries():
  runs = [dict(width=50, learning_rate=0.1, egr_coefficient=0.0, igr_rate=1.0,
               train_accuracy=1.0, test_accuracy=0.97),
          dict(width=50, learning_rate=0.2, egr_coefficient=0.0, igr_rate=2.0,
               train_accuracy=0.99, test_accuracy=0.98),
          dict(width=100, learning_rate=0.2, egr_coefficient=0.01, igr_rate=4.0,
               train_accuracy=1.0, test_accuracy=0.985)]
  summary = igr.summarize_sweep(runs)
  assert summary['best_at_full_train_accuracy'] is runs[2]
  assert summary['num_at_full_train_accuracy'] == 2
  assert summary['best_test_accuracy_overall'] == 0.985
  egr = igr.summarize_egr(runs)
  assert egr['by_coefficient']['0'] == dict(
      mean_test_accuracy=pytest.approx(0.975), std_test_accuracy=pytest.approx(0.005),
      num_seeds=2)
  assert egr['best_coefficient'] == 0.01
  assert egr['plain_mean_test_accuracy'] == pytest.approx(0.975)


# --- the MNIST sweep: end to end, re-run, killed and restarted ----------------


def _sweep_config(shared_data):
  """Two runs (plain and EGR) of a narrow MLP, a checkpoint every 3 steps."""
  return _config('igr_mnist_sweep', shared_data, num_steps=6, batch_size=128,
                 eval_batch_size=256, log_every=1, checkpoint_every=3,
                 **{'sweep.model_width': (16,), 'sweep.learning_rate': (0.1,),
                    'sweep.regularizer_coefficient': (0.0, 0.01),
                    'data.train_examples': 512, 'data.eval_examples': 256})


@pytest.fixture(scope='module')
def sweep(tmp_path_factory, shared_data):
  """An uninterrupted run of the sweep: (config, workdir, results.json text)."""
  config = _sweep_config(shared_data)
  workdir = str(tmp_path_factory.mktemp('sweep'))
  igr_mnist_sweep.run(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    return config, workdir, f.read()


def _same_as_uninterrupted(sweep, workdir):
  _, reference, results = sweep
  with open(os.path.join(workdir, 'results.json')) as f:
    assert f.read() == results
  assert _runs(workdir) == _runs(reference)  # every row, no duplicates
  for figure in ('r_ig_and_test_accuracy_vs_rate.png', 'training_curves.png'):
    with open(os.path.join(workdir, figure), 'rb') as f, \
        open(os.path.join(reference, figure), 'rb') as g:
      assert f.read() == g.read(), figure


def test_mnist_sweep_end_to_end(sweep):
  _, workdir, text = sweep
  runs = json.loads(text)['runs']
  assert list(runs) == ['learning_rate=0.1,model_width=16,regularizer_coefficient=0',
                        'learning_rate=0.1,model_width=16,regularizer_coefficient=0.01']
  m = 784 * 16 + 16 + 3 * (16 * 16 + 16) + 16 * 10 + 10
  for r in runs.values():
    assert r['num_params'] == m
    assert r['igr_rate'] == pytest.approx(0.1 * m / 4)
    assert r['egr_rate'] == pytest.approx(r['egr_coefficient'] * m)
    assert 0 < r['r_ig'] < np.inf and 0 <= r['test_accuracy'] <= 1
    assert r['final_train_loss'] < np.log(10)  # chance level: ln 10
  for records in _runs(workdir).values():
    assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6, 6]
    train_record, final = records[0], records[-1]
    # The logged R_IG is of the step's minibatch gradient: ‖∇L‖²/m.
    assert train_record['r_ig'] * m == pytest.approx(train_record['grad_norm_sq'],
                                                     rel=1e-5)
    assert train_record['igr_rate'] == pytest.approx(0.1 * m / 4, rel=1e-6)
    assert final['split'] == 'eval' and final['r_ig'] * m == pytest.approx(
        final['grad_norm_sq'], rel=1e-6)
  assert json.loads(text)['summary']['num_runs'] == 2
  for name in ('r_ig_and_test_accuracy_vs_rate.png', 'training_curves.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 10_000


def test_mnist_sweep_run_twice_reports_the_same(sweep, tmp_path):
  config, workdir, _ = sweep
  igr_mnist_sweep.run(config, workdir)  # returns normally, trains nothing
  _same_as_uninterrupted(sweep, workdir)
  # A finished run whose metrics.jsonl is gone cannot be reported: one sentence.
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  (copy / 'runs' / next(iter(_runs(workdir))) / 'metrics.jsonl').unlink()
  with pytest.raises(igr.RunRecordError, match='has no training records'):
    igr_mnist_sweep.run(config, str(copy))


def test_mnist_sweep_killed_after_a_run_finished(sweep, tmp_path, monkeypatch):
  fit, calls = train.fit, []

  def fit_killed_at_second_run(**kwargs):
    calls.append(kwargs['workdir'])
    if len(calls) == 2:
      raise Killed()
    return fit(**kwargs)

  monkeypatch.setattr(train, 'fit', fit_killed_at_second_run)
  with pytest.raises(Killed):
    igr_mnist_sweep.run(sweep[0], str(tmp_path))
  monkeypatch.setattr(train, 'fit', fit)
  igr_mnist_sweep.run(sweep[0], str(tmp_path))
  _same_as_uninterrupted(sweep, str(tmp_path))


def test_mnist_sweep_killed_mid_run(sweep, tmp_path, monkeypatch):
  make_iterator, made = data.mnist_iterator, []

  def first_run_killed_at_step_6(*args, **kwargs):
    iterator = make_iterator(*args, **kwargs)
    if kwargs.get('mode', 'train') == 'train' and not made:
      made.append(iterator)
      return KilledAfter(iterator, 5)
    return iterator

  monkeypatch.setattr(data, 'mnist_iterator', first_run_killed_at_step_6)
  with pytest.raises(Killed):
    igr_mnist_sweep.run(sweep[0], str(tmp_path))
  killed = _runs(str(tmp_path))
  # Rows up to step 4 were written; the checkpoint is of step 3.
  assert [r['step'] for r in next(iter(killed.values()))] == [1, 2, 3, 4]
  monkeypatch.setattr(data, 'mnist_iterator', make_iterator)
  igr_mnist_sweep.run(sweep[0], str(tmp_path))
  _same_as_uninterrupted(sweep, str(tmp_path))


def test_mnist_sweep_stopping_rule_stops_at_the_first_evaluation_reaching_it(
    shared_data, tmp_path, monkeypatch):
  """With `stop_train_accuracy`, a run ends at the first evaluation whose
  training accuracy reaches it (the rule of [BD21] Fig. 2); a run killed
  mid-segment and restarted reports what the uninterrupted one did.

  The threshold comes from a run without the rule on the same data (the
  real MNIST files or the tests' tiny ones): the training accuracy of the
  first evaluation after step 2 that beats every earlier one, so the rule
  must stop there and not at step 2 or 12."""
  config = _config('igr_mnist_sweep', shared_data, num_steps=12, batch_size=128,
                   eval_batch_size=256, log_every=1, eval_every=2,
                   checkpoint_every=0, stop_train_accuracy=0.0,
                   **{'sweep.model_width': (16,), 'sweep.learning_rate': (0.1,),
                      'sweep.regularizer_coefficient': (0.0,),
                      'data.train_examples': 512, 'data.eval_examples': 256})
  igr_mnist_sweep.run(config, str(tmp_path / 'no_rule'))
  (no_rule,) = _runs(str(tmp_path / 'no_rule')).values()
  accuracy = {r['step']: r['train_accuracy'] for r in no_rule if r['split'] == 'eval'}
  assert sorted(accuracy) == list(range(2, 13, 2))
  stop_step = next((step for step in range(4, 12, 2)
                    if accuracy[step] > max(accuracy[s] for s in accuracy if s < step)),
                   None)
  assert stop_step, f'training accuracy never rose between steps 4 and 10: {accuracy}'
  config.stop_train_accuracy = accuracy[stop_step]
  reference = str(tmp_path / 'reference')
  igr_mnist_sweep.run(config, reference)
  (records,) = _runs(reference).values()
  evals = [r for r in records if r['split'] == 'eval']
  (result,) = json.load(open(os.path.join(reference, 'results.json')))['runs'].values()
  reached = [r['step'] for r in evals if r['train_accuracy'] >= config.stop_train_accuracy]
  assert reached == [evals[-1]['step']] == [result['steps']] == [stop_step]
  assert result['reached_stop_rule']
  # Until the stop, the run with the rule is the run without it.
  key = lambda r: (r['step'], r['split'])
  assert sorted(records, key=key) == sorted(
      (r for r in no_rule if r['step'] <= stop_step), key=key)
  assert [r['step'] for r in evals] == list(range(2, result['steps'] + 1, 2))
  assert result['train_accuracy'] == evals[-1]['train_accuracy']
  # Killed in the segment before the stop, then restarted: the same results.
  make_iterator, made = data.mnist_iterator, []

  def killed_after(*args, **kwargs):
    """Each segment's training iterator; the kill comes at step `steps`."""
    iterator = make_iterator(*args, **kwargs)
    if kwargs.get('mode', 'train') != 'train':
      return iterator
    made.append(KilledAfter(iterator, made[-1].left if made else result['steps'] - 1))
    return made[-1]

  monkeypatch.setattr(data, 'mnist_iterator', killed_after)
  killed = str(tmp_path / 'killed')
  with pytest.raises(Killed):
    igr_mnist_sweep.run(config, killed)
  monkeypatch.setattr(data, 'mnist_iterator', make_iterator)
  igr_mnist_sweep.run(config, killed)
  assert _runs(killed) == _runs(reference)
  igr_mnist_sweep.run(config, killed)  # finished: trains nothing more
  assert _runs(killed) == _runs(reference)
  # Killed while saving a segment's checkpoint (an unfinished temporary
  # directory left behind): in the segment before the stop, and at the stop
  # itself, whose evaluation is already logged. The restart trains the
  # unsaved segment again: the same rows, results and final checkpoint.
  save = checkpoint_lib.Checkpointer.save
  reference_results = json.load(open(os.path.join(reference, 'results.json')))
  for kill_step in (stop_step - 2, stop_step):
    def killed_saving(self, step, *args, kill_step=kill_step, **kwargs):
      if step == kill_step:
        os.makedirs(os.path.join(self.directory, f'{step}.orbax-checkpoint-tmp'))
        raise Killed()
      save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', killed_saving)
    killed = str(tmp_path / f'killed_saving_{kill_step}')
    with pytest.raises(Killed):
      igr_mnist_sweep.run(config, killed)
    monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', save)
    igr_mnist_sweep.run(config, killed)
    assert _runs(killed) == _runs(reference)
    assert json.load(open(os.path.join(killed, 'results.json'))) == reference_results
    (run_dir,) = (os.path.join(killed, 'runs', name)
                  for name in os.listdir(os.path.join(killed, 'runs')))
    assert checkpoint_lib.saved_steps(run_dir)[-1] == stop_step
  # A cap reached before the rule: the run ends at num_steps, not marked reached.
  capped = config.copy_and_resolve_references()
  capped.stop_train_accuracy, capped.num_steps = 1.0, 4
  igr_mnist_sweep.run(capped, str(tmp_path / 'capped'))
  (result,) = json.load(open(tmp_path / 'capped' / 'results.json'))['runs'].values()
  assert result['steps'] == 4 and not result['reached_stop_rule']


def test_mnist_sweep_refuses_bad_settings(tmp_path):
  for key, value, words in (
      ('sweep.learning_rate', (0.1, 0.0), 'sweep.learning_rate'),
      ('sweep.regularizer_coefficient', (-1.0,), 'regularizer.coefficient'),
      ('sweep.model_width', (16.5,), 'sweep.model_width'),
      ('regularizer.method', 'exact', 'regularizer.method'),
      ('data.train_examples', 100, 'smaller than one batch'),
      ('stop_train_accuracy', 1.5, 'stop_train_accuracy')):
    with pytest.raises(cli.ConfigError, match=words):
      _config('igr_mnist_sweep', **{key: value})
  with pytest.raises(cli.ConfigError, match='no_such_key'):
    _config('igr_mnist_sweep', no_such_key=1)
  config = _config('igr_mnist_sweep')
  config.model.num_layers = 0  # a config changed after loading is checked by run
  with pytest.raises(cli.ConfigError, match='model.num_layers'):
    igr_mnist_sweep.run(config, str(tmp_path))


# --- ResNets and the CIFAR-10 EGR experiment ---------------------------------


def test_resnet_parameter_counts():
  # ResNet-20 (He et al. 2016, Table 6: 0.27M) and the CIFAR ResNet-18 (11.17M).
  assert igr.cifar_resnet_task('resnet20').num_params == 269_722
  assert igr.cifar_resnet_task('resnet18').num_params == 11_173_962
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


def test_resnet_conv_implementations_agree_on_the_egr_gradient():
  # 'custom' convolutions (chosen for double backprop) and 'xla' ones: the same
  # parameters, and the same exact EGR gradient (reverse-over-reverse through
  # the custom VJP against plain autodiff, and forward-over-reverse as
  # experiments/egr_cifar10.py trains by default), on a stride-2 ResNet-8.
  assert igr.conv_implementation(0.01, 'double_backprop') == 'custom'
  assert igr.conv_implementation(0.0, 'double_backprop') == 'xla'
  assert igr.conv_implementation(0.01, 'hvp') == 'xla'
  assert igr.conv_implementation(0.01, 'finite_difference') == 'xla'
  with pytest.raises(ValueError, match='conv_impl'):
    resnet.make('resnet8', conv_impl='cudnn')
  images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  assert cli.get_config('egr_cifar10').regularizer.method == 'hvp'
  results = {}
  for impl, method in (('xla', 'double_backprop'), ('custom', 'double_backprop'),
                       ('xla', 'hvp')):
    task = igr.cifar_resnet_task('resnet8', impl)
    params, state = task.init(jax.random.PRNGKey(0))
    grad_fn = gr.gradient_penalty_grad_fn(task.loss_fn, coefficient=0.05,
                                          method=method)
    (_, (new_state, metrics)), grads = jax.jit(grad_fn)(
        params, state, jax.random.PRNGKey(2), batch)
    results[impl, method] = params, metrics, grads, new_state
    jaxpr = str(jax.make_jaxpr(task.loss_fn)(params, state, None, batch))
    assert ('custom_vjp' in jaxpr) == (impl == 'custom')
  (p_xla, m_xla, g_xla, s_xla), (p_custom, m_custom, g_custom, _), (
      _, m_hvp, g_hvp, s_hvp) = results.values()
  # Forward-over-reverse: the same penalty, gradient and batch statistics.
  np.testing.assert_allclose(m_hvp['penalty'], m_xla['penalty'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((g_xla, s_xla)), jax.tree.leaves((g_hvp, s_hvp))):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * float(jnp.abs(a).max()))
  assert jax.tree.structure(p_xla) == jax.tree.structure(p_custom)
  for a, b in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_custom)):
    np.testing.assert_array_equal(a, b)
  assert float(m_xla['penalty']) > 1e-3  # the penalty is not negligible
  np.testing.assert_allclose(m_custom['penalty'], m_xla['penalty'], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_custom)):
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-5 * float(jnp.abs(a).max()))


def test_egr_cifar10_quickstart(tmp_path, shared_data):
  egr_cifar10.run(_config('egr_cifar10', shared_data), str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  runs = list(results['runs'].values())
  assert [r['egr_coefficient'] for r in runs] == [0.0, 0.01]
  for r in runs:
    assert r['model'] == 'resnet8' and r['num_params'] == 75_290
    assert np.isfinite(r['final_train_loss']) and r['final_r_ig'] > 0
    assert 0 <= r['test_accuracy'] <= 1
  # Same seed and data: the penalty is the only difference between the runs.
  assert runs[0]['param_norm'] != runs[1]['param_norm']
  assert results['summary']['plain_mean_test_accuracy'] == runs[0]['test_accuracy']
  assert os.path.getsize(tmp_path / 'test_accuracy_vs_mu.png') > 10_000
  with pytest.raises(cli.ConfigError, match='model.name'):
    _config('egr_cifar10', **{'model.name': 'vgg'})


# --- the synthetic MLP and the benchmark --------------------------------------


def test_synthetic_mlp_quickstart_fits_the_cubic(tmp_path):
  results = synthetic_mlp.run(_config('synthetic_mlp'), str(tmp_path))
  # The target's variance is about 4; a few epochs get well below it.
  assert results['validation_mse'] < 1.0
  assert (tmp_path / 'fit.png').stat().st_size > 10_000
  records = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert records[-1]['split'] == 'eval'
  assert records[-1]['mse'] == results['validation_mse']
  with pytest.raises(cli.ConfigError, match='model.hidden_sizes'):
    _config('synthetic_mlp', **{'model.hidden_sizes': (50, 0)})


def test_benchmark_runs_every_method(tmp_path, shared_data):
  config = _config('bench_gradient_penalty', shared_data, batch_size=32, **{
      'model.widths': (16,), 'timing.repeats': 2, 'timing.steps_per_repeat': 1,
      'finite_difference.width': 16, 'finite_difference.epsilons': (1e-2,),
      'finite_difference.batches': 1, 'finite_difference.warmup_steps': 1})
  bench_gradient_penalty.run(config, str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  (entry,) = results['widths']
  assert set(entry['ratio_to_plain']) == {'plain', *config.regularizer.methods}
  assert entry['ratio_to_plain']['plain'] == 1.0
  assert all(v > 0 for v in entry['median_seconds_per_step'].values())
  assert all(entry['flops_ratio_to_plain'][m] > 1 for m in config.regularizer.methods)
  accuracy = results['finite_difference_accuracy']
  assert set(accuracy['relative_error_mean']) == {'0.01'}
  assert all(np.isfinite(v) and v > 0
             for v in accuracy['relative_error_mean'].values())
