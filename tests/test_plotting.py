"""Figures readable as printed: no overlapping tick labels, the γ panels on
one z range, the solvers' budgets drawn on every NFE panel."""
import json

import jax
import ml_collections
import numpy as np
import pytest

from experiments import compare_adaptive_gamma
from experiments import igr_two_parameter
from experiments import reproduction as repro
from jreg import cli
from jreg import plotting
from jreg.tasks import deq_synthetic
from jreg.tasks import mdeq


@pytest.fixture
def saved(monkeypatch):
  """The figures written through `plotting.save`, by file name."""
  figures = {}
  original = plotting.save

  def save(fig, path, dpi=120):
    original(fig, path, dpi)
    figures[path.rsplit('/', 1)[-1]] = fig

  monkeypatch.setattr(plotting, 'save', save)
  return figures


def test_crowded_tick_labels_are_decluttered(tmp_path):
  # A log axis over 1.2 decades labels its minor ticks in 2×10⁻³ style,
  # and long labels on a narrow linear axis collide.
  fig, (log_ax, linear_ax) = plotting.new_figure(2, size=(3.0, 3.0))
  hs = 0.5 / np.array([20, 40, 80, 160, 320])
  log_ax.loglog(hs, hs ** 2, 'o-')
  linear_ax.plot([1_000_000.0, 1_000_010.0], [0, 1])
  linear_ax.set_xticks(np.linspace(1_000_000.0, 1_000_010.0, 11))
  linear_ax.ticklabel_format(useOffset=False, style='plain')
  fig.tight_layout()
  assert plotting.tick_label_overlaps(fig)          # the premise
  plotting.save(fig, str(tmp_path / 'crowded.png'))
  assert plotting.tick_label_overlaps(fig) == []
  labels = [t.get_text() for t in plotting._drawn_labels(log_ax.xaxis)]
  assert len(labels) >= 3 and '0.01' in labels      # still readable values


def _fake_two_parameter_results(config):
  hs = [config.orders.time / n for n in config.orders.num_steps]
  ends = [{'learning_rate': h, 'param_norm': 2.7 - h, 'distance_to_flattest':
           0.9 - h} for h in config.endpoints.learning_rates]
  line = np.stack([np.linspace(2.8, 1.8, 50), np.linspace(3.5, 1.7, 50)], 1)
  results = {'flattest_minimum': [3 ** 0.5, 3 ** 0.5],
             'order_learning_rates': hs,
             'error_to_exact_flow': [0.8 * h for h in hs],
             'error_to_modified_flow': [2.0 * h ** 2 for h in hs],
             'slope_exact_flow': 1.0, 'slope_modified_flow': 2.0,
             'endpoints': ends}
  paths = {'exact': line, 'modified': line, 'gd': {0.005: line, 0.03: line}}
  return results, paths


def test_two_parameter_figures_have_no_overlapping_tick_labels(tmp_path, saved):
  config = cli.get_config('igr_two_parameter', 'quickstart')
  results, paths = _fake_two_parameter_results(config)
  igr_two_parameter.plot(config, results, paths, str(tmp_path))
  assert set(saved) == {'phase_plane.png', 'error_orders.png', 'endpoints.png'}
  for name, fig in saved.items():
    assert plotting.tick_label_overlaps(fig) == [], name
  # The flattest minimum's norm is a labelled line, not a bare one.
  texts = [t.get_text() for t in saved['endpoints.png'].axes[0].texts]
  assert any(t.startswith('‖θ‖ of the flattest minimum = ') for t in texts)


def test_synthetic_surface_panels_share_their_z_range(tmp_path, saved):
  config = cli.get_config('deq_synthetic', 'quickstart',
                          {'probe.max_iter': 10})
  init = deq_synthetic.init_fn(config)
  params = {}
  for index, scale in enumerate((1.0, 6.0)):   # the second cell reaches far
    p, _ = init(jax.random.PRNGKey(index))
    params[f'gamma = {index}'] = jax.tree.map(lambda w, s=scale: w * s, p)
  history = [{'step': 1, 'split': 'train', 'mse': 1.0,
              'forward_abs_residual': 1e-3, 'jacobian_loss': 0.1}]
  deq_synthetic.figures(str(tmp_path), config, params,
                        {label: history for label in params})
  panels = [ax for ax in saved['surface.png'].axes if hasattr(ax, 'zaxis')]
  assert len(panels) == 2
  assert panels[0].get_zlim() == pytest.approx(panels[1].get_zlim())
  for name, fig in saved.items():
    assert plotting.tick_label_overlaps(fig) == [], name


def _budget_lines(ax):
  return sorted(float(line.get_ydata()[0]) for line in ax.get_lines()
                if line.get_linestyle() == '--')


def test_nfe_panels_draw_the_solver_budgets(tmp_path, saved):
  history = []
  for step in range(10, 110, 10):
    history.append({'step': step, 'split': 'train', 'phase': 'mdeq',
                    'forward_nfe': 5.0 + step % 3, 'backward_nfe': 6.0,
                    'forward_rel_residual': 1e-2})
    history.append({'step': step, 'split': 'eval', 'train_wall_time': step,
                    'accuracy': 0.1, 'probe_nfe_to_tol': 12.0})
  config = cli.get_config('deq_cifar10', 'quickstart')
  budgets = plotting.solver_budgets(config)
  assert budgets == {'forward_nfe': config.deq.forward.max_iter,
                     'backward_nfe': config.deq.backward.max_iter,
                     'probe_nfe_to_tol': config.probe.max_iter}
  mdeq.plot_runs({'run': history}, str(tmp_path), budgets=budgets)
  forward, residual, backward = saved['convergence.png'].axes
  assert _budget_lines(forward) == [config.deq.forward.max_iter]
  assert _budget_lines(backward) == [config.deq.backward.max_iter]
  assert _budget_lines(residual) == []
  assert [t.get_text() for t in forward.texts] == [
      f'forward max_iter = {config.deq.forward.max_iter}']
  assert forward.get_ylim()[1] > config.deq.forward.max_iter   # room for it
  probe = saved['accuracy_vs_time.png'].axes[1]
  assert _budget_lines(probe) == [config.probe.max_iter]


def test_budget_of_none_draws_nothing():
  fig, ax = plotting.new_figure()
  plotting.budget(ax, None, 'forward max_iter')
  assert not ax.get_lines() and not ax.texts


def _drawn_budgets(ax, axis='y'):
  """`[(value, label text)]` of the dashed budget lines on `ax` (horizontal
  for axis 'y', vertical for 'x'), each with the label `budget` writes."""
  lines = [line for line in ax.get_lines() if line.get_linestyle() == '--']
  data = (lambda l: l.get_ydata()) if axis == 'y' else (lambda l: l.get_xdata())
  values = sorted(float(data(line)[0]) for line in lines
                  if len(set(np.asarray(data(line), float))) == 1)
  texts = [t.get_text() for t in ax.texts]
  return [(v, next(t for t in texts if t.endswith(f' = {v:g}'))) for v in values]


def test_budget_lines_vertical_and_joined():
  fig, ax = plotting.new_figure()
  ax.plot([1, 2, 3], [0.5, 0.2, 0.1])
  plotting.budget(ax, 3, 'max_iter', axis='x')
  assert _drawn_budgets(ax, 'x') == [(3.0, 'max_iter = 3')]
  assert ax.get_xlim()[1] > 3                      # room for the label
  with pytest.raises(ValueError):
    plotting.budget(ax, 3, 'max_iter', axis='z')
  fig, ax = plotting.new_figure()
  ax.plot([1, 2], [4, 5])
  plotting.budgets(ax, {'forward max_iter': 12, 'backward max_iter': 12,
                        'probe max_iter': None})
  assert _drawn_budgets(ax) == [(12.0, 'forward / backward max_iter = 12')]
  plotting.budgets(ax, plotting.nfe_budgets(
      {'deq': {'forward': {'max_iter': 8}, 'backward': {'max_iter': 6}}},
      ('forward_nfe', 'backward_nfe', 'probe_nfe_to_tol')))
  assert _drawn_budgets(ax) == [(6.0, 'backward max_iter = 6'),
                                (8.0, 'forward max_iter = 8'),
                                (12.0, 'forward / backward max_iter = 12')]


def _deq_config(forward, backward, probe):
  return ml_collections.ConfigDict(dict(
      deq=dict(forward=dict(max_iter=forward), backward=dict(max_iter=backward),
               pretrain_steps=0),
      probe=dict(max_iter=probe)))


def test_reproduction_nfe_figures_draw_the_runs_budgets(tmp_path, saved):
  """The report's NFE panels (MDEQ, DEQ-Transformer, synthetic) carry the
  budgets of the runs' configs."""
  config = _deq_config(forward=10, backward=9, probe=40)
  evals = [{'step': s, 'split': 'eval', 'probe_nfe_to_tol': 12.0 - s / 50,
            'probe_spectral_radius': 0.9, 'train_wall_time': 6.0 * s,
            'accuracy': 0.3, 'ppl': 300.0} for s in (50, 100)]
  mdeq_runs = {f'{label}, seed 0': dict(
      label=label, seed=0, evals=evals,
      accuracy_at_nfe={'accuracy': {'1': 0.2, '4': 0.3, '8': 0.35}})
      for label in ('JR', 'no JR')}
  repro.plot_mdeq(mdeq_runs, config, str(tmp_path / 'repro_mdeq.png'))
  axes = saved['repro_mdeq.png'].axes
  assert _drawn_budgets(axes[0], 'x') == [(10.0, 'forward max_iter = 10')]
  assert _drawn_budgets(axes[1]) == [(40.0, 'probe max_iter = 40')]
  train = [{'step': s, 'forward_nfe': 7.0, 'forward_rel_residual': 1e-2}
           for s in (10, 20)]
  wt2_runs = {label: dict(evals=evals, train=train,
                          ppl_at_nfe={'ppl': {'2': 900.0, '10': 300.0}})
              for label in ('JR', 'no JR')}
  repro.plot_wt2(wt2_runs, config, str(tmp_path / 'repro_wt2.png'))
  axes = saved['repro_wt2.png'].axes
  assert _drawn_budgets(axes[1]) == [(10.0, 'forward max_iter = 10')]
  assert _drawn_budgets(axes[3], 'x') == [(10.0, 'forward max_iter = 10')]
  cell = dict(validation_mse=[0.06, 0.07], nfe_to_tolerance=[9.0, 11.0],
              spectral_radius=[0.5, 0.6])
  readings = {'synth_literal': dict(by_gamma={'0': cell, '1': cell})}
  repro.plot_synthetic(readings, str(tmp_path / 'repro_synthetic.png'), {100})
  nfe_panel = saved['repro_synthetic.png'].axes[1]
  assert _drawn_budgets(nfe_panel) == [(100.0, 'probe max_iter = 100')]
  for name, fig in saved.items():
    assert plotting.tick_label_overlaps(fig) == [], name


def test_adaptive_gamma_figure_draws_the_forward_budget(tmp_path, saved):
  runs = {}
  for label, weight in (('fixed', 1.0), ('adaptive', 2.0)):
    run_dir = tmp_path / label
    run_dir.mkdir()
    (run_dir / 'config.json').write_text(json.dumps(dict(
        jacobian={'weight': weight}, deq={'forward': {'max_iter': 6}})))
    (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(dict(
        step=s, split='train', forward_nfe=4.0 + s % 3, mse=1.0 / s)) + '\n'
        for s in range(1, 6)))
    runs[label] = str(run_dir)
  compare_adaptive_gamma.plot(runs, str(tmp_path / 'adaptive.png'), '', 'mse')
  nfe_panel = saved['adaptive.png'].axes[1]
  assert _drawn_budgets(nfe_panel) == [(6.0, 'forward max_iter = 6')]


def test_metric_budget_names_the_budget_of_each_nfe_result():
  config = {'deq': {'forward': {'max_iter': 7}, 'backward': {'max_iter': 8},
                    'eval_max_iter': 10},
            'probe': {'max_iter': 30}}
  flat = {'deq.forward.max_iter': 7, 'deq.backward.max_iter': 8,
          'probe.max_iter': 30}
  for c in (config, ml_collections.ConfigDict(config)):
    assert plotting.metric_budget('last_train.forward_nfe', c) == (
        'forward max_iter', 7)
    assert plotting.metric_budget('test.forward_nfe', c) == ('eval_max_iter', 10)
    assert plotting.metric_budget('train_backward_nfe', c) == ('backward max_iter', 8)
    assert plotting.metric_budget('test.probe_nfe_to_tol', c) == ('probe max_iter', 30)
    assert plotting.metric_budget('accuracy', c) is None
  # A flattened config (launch.gather's), without an evaluation budget.
  assert plotting.metric_budget('valid_forward_nfe', flat) == ('forward max_iter', 7)
  assert plotting.metric_budget('nfe_to_tol', flat) == ('probe max_iter', 30)
  assert plotting.metric_budget('nfe_to_tol', {}) is None
