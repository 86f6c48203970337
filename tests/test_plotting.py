"""Figures readable as printed: no overlapping tick labels, the γ panels on
one z range, the solvers' budgets drawn."""
import jax
import numpy as np
import pytest

from experiments import igr_two_parameter
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
