"""What a person reads after a run: the report pages, the quickstart's last
line and exit status, and the training speed in the log lines."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from experiments import igr_two_parameter
from experiments import quickstart
from jreg import cli
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import report

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- steps/s in the log lines ----------------------------------------------------


class FakeClock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _logged_speeds(monkeypatch, tmp_path, arrivals):
  """The speed shown with each train record written at `(step, time)`."""
  shown = []
  monkeypatch.setattr(metrics_lib.logging, 'info',
                      lambda fmt, *args: shown.append(fmt % args))
  clock = FakeClock()
  writer = metrics_lib.MetricWriter(str(tmp_path), 100, write_files=False,
                                    clock=clock)
  for step, when in arrivals:
    clock.now = when
    writer.write(step, 'train', {'loss': 1.0})
  found = [re.search(r'\(([^()]*(?:steps/s|s/step))\)$', line) for line in shown]
  return [match.group(1) if match else None for match in found]


def test_speed_of_records_written_together(monkeypatch, tmp_path):
  # 36 s a step; the records of steps 2 and 3 arrive 1.5 ms apart (a
  # checkpoint's record right after a log step's), which once showed as
  # 667 steps/s.
  speeds = _logged_speeds(monkeypatch, tmp_path,
                          [(1, 0.0), (2, 36.0), (3, 36.0015), (4, 72.0)])
  assert speeds[0] is None                      # nothing to measure from yet
  assert speeds[1] == '36 s/step'
  assert speeds[2] == '18 s/step'               # 2 steps since step 1
  assert speeds[3] == '36 s/step'               # 1 step since step 3


def test_speed_of_fast_steps_is_measured_over_a_second(monkeypatch, tmp_path):
  arrivals = [(100 * k, 0.1 * k) for k in range(1, 31)]   # 1000 steps/s
  speeds = _logged_speeds(monkeypatch, tmp_path, arrivals)
  assert speeds[:10] == [None] * 10                       # under one second
  assert set(speeds[10:]) == {'1e+03 steps/s'}


def test_steps_per_second():
  assert metrics_lib.steps_per_second([], 5, 10.0) is None
  assert metrics_lib.steps_per_second([(1, 0.0), (2, 9.5)], 3, 10.0) == 0.2
  assert metrics_lib.format_speed(0.5) == '2 s/step'


# -- the report page of one run --------------------------------------------------


def _png(path):
  with plotting.figure(str(path)) as (_, ax):
    ax.plot([0, 1], [0, 1])


def test_run_report_holds_numbers_units_figures_config_and_command(tmp_path):
  (tmp_path / 'results.json').write_text(json.dumps({
      'validation_mse': 0.25, 'runs': {'a<b>': {'forward_nfe': 6.5,
                                                'test_accuracy': 0.9}},
      'curve': [1, 2, 3], 'wall_time_s': 12.0}))
  _png(tmp_path / 'error_orders.png')
  _png(tmp_path / 'my figure.png')
  config = cli.get_config('igr_two_parameter', 'quickstart')
  config = dict(config.to_dict(), note='<script>alert(1)</script>')
  path = report.write_run_report(
      str(tmp_path), 'igr_two_parameter', config, {'slope_exact_flow': 1.04},
      command='python -m experiments.igr_two_parameter --workdir="a b"')
  page = pathlib.Path(path).read_text()
  assert path == str(tmp_path / 'report.html')
  assert page.startswith('<!DOCTYPE html>') and page.rstrip().endswith('</html>')
  for row in ('<td>slope_exact_flow</td><td class="number">1.04</td>'
              '<td>dimensionless (log-log slope)</td>',
              '<td>validation_mse</td><td class="number">0.25</td>'
              '<td>(target units)²</td>',
              '<td>runs.a&lt;b&gt;.forward_nfe</td><td class="number">6.5</td>'
              '<td>function evaluations</td>',
              '<td>runs.a&lt;b&gt;.test_accuracy</td><td class="number">0.9</td>'
              '<td>fraction (0 to 1)</td>',
              '<td>wall_time_s</td><td class="number">12</td><td>s</td>'):
    assert row in page, row
  assert 'curve' not in page.split('<h2>Config')[0]     # lists are not numbers
  assert '<img src="error_orders.png" alt="Backward error analysis">' in page
  assert '<b>Figure 1: Backward error analysis.</b>' in page
  assert '<img src="my%20figure.png" alt="my figure">' in page
  assert ('python -m experiments.igr_two_parameter --workdir=&quot;a b&quot;'
          in page)
  assert '&quot;rk4_substeps&quot;: 4000' in page        # the resolved config
  assert '<script>' not in page and '&lt;script&gt;' in page


def test_command_line_is_rebuilt_from_argv(monkeypatch):
  monkeypatch.setattr(sys.modules['__main__'], '__spec__', None, raising=False)
  assert report.command_line(['run.py', '--workdir=a b']) == (
      "python run.py '--workdir=a b'")


# -- the quickstart --------------------------------------------------------------


def test_quickstart_offline_exits_1_and_links_the_pages(tmp_path):
  workdir = tmp_path / 'qs'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.quickstart', f'--workdir={workdir}',
       '--config.only=igr_two_parameter,igr_mnist_sweep',
       f'--config.data.dir={tmp_path / "no_data"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last == ('quickstart: 1 ran, 1 skipped (no data: igr_mnist_sweep), '
                  f'0 failed; report: {workdir}/report.html')
  index = (workdir / 'report.html').read_text()
  assert '<a href="igr_two_parameter/report.html">igr_two_parameter</a>' in index
  assert 'igr_mnist_sweep/report.html' not in index     # skipped: no page
  assert 'no_data' in index and 'quickstart: 1 ran, 1 skipped' in index
  page = (workdir / 'igr_two_parameter' / 'report.html').read_text()
  for figure in ('phase_plane.png', 'error_orders.png', 'endpoints.png'):
    assert f'<img src="{figure}"' in page
  assert '<td>slope_modified_flow</td>' in page
  assert ('python -m experiments.quickstart --workdir=' in page and
          '--config.only=igr_two_parameter,igr_mnist_sweep' in page)


def test_quickstart_counts_a_failed_experiment(tmp_path, monkeypatch):
  def broken(config, workdir):
    raise RuntimeError('the solver diverged')

  monkeypatch.setattr(igr_two_parameter, 'run', broken)
  config = cli.get_config('quickstart', 'quickstart',
                          {'only': 'igr_two_parameter'})
  summary = quickstart.run(config, str(tmp_path))
  assert summary['igr_two_parameter']['failed'] == (
      'RuntimeError: the solver diverged')
  assert quickstart.summary_line(summary) == (
      'quickstart: 0 ran, 0 skipped, 1 failed (igr_two_parameter)')
  index = (tmp_path / 'report.html').read_text()
  assert '<span class="failed">failed</span>' in index
  assert 'RuntimeError: the solver diverged' in index
  with pytest.raises(SystemExit) as exit_:
    quickstart.finish(summary, str(tmp_path))
  assert exit_.value.code == 1
  quickstart.finish({'a': {'x': 1.0}}, str(tmp_path))   # all ran: no exit
  assert os.path.isfile(tmp_path / 'summary.json')
