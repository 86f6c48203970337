"""The page a person reads: `report.html` beside a run's `results.json`.

`write_run_report(workdir, name, config, results)` writes `workdir/report.html`
(written for every experiment by `jreg.cli.execute`): a table of the run's
numbers with their units, the PNG figures of the workdir with a title and a
caption under each, the resolved config and the command that produced it.
`write_index(workdir, entries, line)` writes the quickstart's page, which
links every experiment's page and says which ran, were skipped or failed.

The pages are self-contained HTML (inline style, no scripts) apart from the
PNGs, which they show from the same folder; every text taken from a run is
HTML-escaped.
"""
from __future__ import annotations

import html
import json
import os
import re
import shlex
import sys
from typing import Any, Mapping, Optional, Sequence
from urllib import parse

REPORT_FILE = 'report.html'
MAX_ROWS = 400  # numbers shown in a run's table

# (pattern on the last part of a dotted key, unit), first match wins.
UNITS = (
    (r'(steps|examples|images|tokens|samples)_per_s(ec(ond)?)?$',
     lambda m: f'{m.group(1)}/s'),
    (r'per_s(ec(ond)?)?$', '1/s'),
    (r'(^|_)ms$', 'ms'),
    (r'(^|_)(wall_time|time|seconds|duration|wall_time_s|time_s)$|_s$', 's'),
    (r'(^|_)(mib|mb)$', 'MiB'),
    (r'(^|_)(gib|gb)$', 'GiB'),
    (r'bytes$', 'bytes'),
    (r'accuracy|_fraction$|^fraction', 'fraction (0 to 1)'),
    (r'nfe', 'function evaluations'),
    (r'ppl|perplexity', 'dimensionless (perplexity)'),
    (r'nll|cross_entropy|xent', 'nats per prediction'),
    (r'rel(ative)?_residual', 'dimensionless (relative)'),
    (r'(^|_)mse$|variance', '(target units)²'),
    (r'num_params|parameters', 'parameters'),
    (r'(^|_)steps$|^step$|pretrain_steps|steps_per_run', 'steps'),
    (r'epochs?$', 'epochs'),
    (r'tokens$', 'tokens'),
    (r'slope', 'dimensionless (log-log slope)'),
    (r'learning_rate|(^|_)lr$', 'dimensionless (step size)'),
    (r'r_ig|grad_norm_sq', '(loss units)²'),
    (r'loss|penalty', 'loss units'),
)

# Captions of the figures the experiments write: (experiment, file) first,
# then (None, file); others get their file name as the title and no caption.
CAPTIONS = {
    (None, 'fit.png'): ('The fit', 'Left: the learned function over the '
                        'validation data and the noiseless target. Right: the '
                        'training and validation MSE over the steps.'),
    (None, 'surface.png'): (
        'The learned cell and its fixed points',
        'The cell f(z; x) (coloured surface) and the plane f = z (grey); where '
        'they meet is the fixed point z*(x) (red line). One panel per γ, all on '
        'the same z range.'),
    (None, 'slice_x-1.png'): (
        'The slice x = -1', 'The cell f(z; x = -1), the diagonal f = z and the '
        'forward solver\'s iterates, numbered from the start.'),
    ('deq_synthetic', 'training.png'): (
        'Training', 'Training MSE, the forward solver\'s absolute residual and '
        'the Jacobian loss over the steps, one curve per run.'),
    ('deq_wikitext', 'training.png'): (
        'Training', 'Forward NFE (with the solver\'s max_iter budget), the '
        'forward relative residual, and the validation perplexity against '
        'wall time.'),
    (None, 'phase_plane.png'): (
        'Phase plane', 'Gradient descent at a small and a moderate learning '
        'rate against the exact flow of E and the modified flow of '
        'E + (h/4)‖∇E‖²; the dashed line holds the minima.'),
    (None, 'error_orders.png'): (
        'Backward error analysis', 'Distance of gradient descent from the '
        'exact flow (slope 1: error O(h)) and from the modified flow (slope 2: '
        'O(h²)) at a fixed time, against the learning rate h; log-log axes.'),
    (None, 'endpoints.png'): (
        'Where gradient descent ends', 'The parameter norm and the distance to '
        'the flattest minimum after a fixed time, against the learning rate; '
        'the dotted line is the flattest minimum\'s norm.'),
    (None, 'convergence.png'): (
        'Solver convergence during training', 'Forward NFE, forward relative '
        'residual and backward NFE over the steps; the horizontal lines are '
        'the solvers\' max_iter budgets.'),
    (None, 'accuracy_vs_time.png'): (
        'Accuracy against time', 'Test accuracy against training wall time, '
        'and the NFE that the test probe needs to reach the tolerance.'),
    (None, 'test_accuracy_vs_mu.png'): (
        'Explicit gradient regularisation', 'Test accuracy against the '
        'penalty coefficient, and the training loss of each run.'),
    (None, 'r_ig_and_test_accuracy_vs_rate.png'): (
        'R_IG and test accuracy against the learning rate', 'The implicit '
        'regulariser R_IG and the test accuracy at the end of each run.'),
    (None, 'training_curves.png'): (
        'Training curves', 'Training loss and R_IG over the steps, one curve '
        'per run.'),
    (None, 'gradient_noise_bias.png'): (
        'Gradient-noise bias', 'The minibatch estimate of ‖∇L‖² and the '
        'split-batch estimate against the full-batch value.'),
}

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { margin-top: 0.4em; }
td { overflow-wrap: anywhere; }
pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap;
      overflow-wrap: anywhere; }
.unit { color: #666; }
.ran { color: #176117; } .skipped { color: #8a5a00; } .failed { color: #a11; }
"""


def unit(key: str) -> str:
  """The unit of a result from its (dotted) key; '' when none is known."""
  leaf = key.rsplit('.', 1)[-1].lower()
  for pattern, name in UNITS:
    match = re.search(pattern, leaf)
    if match:
      return name(match) if callable(name) else name
  return ''


def numbers(results: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """The scalar values of a (nested) results dict under dotted keys: numbers,
  booleans and short strings; lists and None are left out."""
  flat = {}
  for key, value in results.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(numbers(value, f'{name}.'))
    elif isinstance(value, (bool, int, float)):
      flat[name] = value
    elif isinstance(value, str) and len(value) <= 120:
      flat[name] = value
  return flat


def command_line(argv: Optional[Sequence[str]] = None) -> str:
  """The command of this process, `python -m MODULE ARGS` when run with -m."""
  argv = list(sys.argv if argv is None else argv)
  if not argv:
    return ''
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None and spec.name and spec.name != '__main__':
    head = ['python', '-m', spec.name]
  else:
    head = ['python', argv[0]]
  return shlex.join(head + argv[1:])


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.6g}'
  return str(value)


def _page(title: str, body: str) -> str:
  return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
          f'<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n'
          f'</head>\n<body>\n{body}</body>\n</html>\n')


def _write(path: str, text: str) -> str:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def _table(rows: Sequence[Sequence[str]], header: Sequence[str],
           numeric: Sequence[bool] = ()) -> str:
  """An HTML table; the cells are HTML already (escape before)."""
  out = ['<table>', '<tr>' + ''.join(f'<th>{h}</th>' for h in header) + '</tr>']
  for row in rows:
    cells = []
    for index, cell in enumerate(row):
      css = ' class="number"' if index < len(numeric) and numeric[index] else ''
      cells.append(f'<td{css}>{cell}</td>')
    out.append('<tr>' + ''.join(cells) + '</tr>')
  out.append('</table>')
  return '\n'.join(out) + '\n'


def caption(name: str, figure: str) -> tuple[str, str]:
  """(title, caption) of figure file `figure` of experiment `name`."""
  found = CAPTIONS.get((name, figure)) or CAPTIONS.get((None, figure))
  if found:
    return found
  return os.path.splitext(figure)[0].replace('_', ' '), ''


def figures(workdir: str) -> list[str]:
  """The PNG files directly in `workdir`, sorted."""
  if not os.path.isdir(workdir):
    return []
  return sorted(f for f in os.listdir(workdir) if f.lower().endswith('.png'))


def write_run_report(workdir: str, name: str, config: Any,
                     results: Mapping[str, Any],
                     command: Optional[str] = None) -> str:
  """Writes `workdir/report.html` for experiment `name`; returns its path.

  Args:
    workdir: the run's folder (its `results.json`, when there, gives the
      numbers; `results` those before it).
    name: the experiment.
    config: the resolved config (a ConfigDict or a dict).
    results: what the experiment's `run` returned.
    command: the command line shown (default: this process's, `sys.argv`).
  """
  saved = {}
  path = os.path.join(workdir, 'results.json')
  if os.path.isfile(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      saved = {}
  shown = numbers(results)
  if isinstance(saved, Mapping):
    shown.update({k: v for k, v in numbers(saved).items() if k not in shown})
  rows = [[html.escape(key), html.escape(_format(value)),
           html.escape(unit(key))]
          for key, value in list(shown.items())[:MAX_ROWS]]
  more = len(shown) - len(rows)
  config_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  body = [f'<h1>{html.escape(name)}</h1>',
          f'<p>Run folder: <code>{html.escape(os.path.abspath(workdir))}</code>'
          '</p>', '<h2>Results</h2>']
  if rows:
    body.append(_table(rows, ['result', 'value', 'unit'], [False, True]))
    if more:
      body.append(f'<p>{more} more in <a href="results.json">results.json</a>.'
                  '</p>')
    body.append('<p>A blank unit: none recorded.</p>')
  else:
    body.append('<p>No numbers.</p>')
  images = figures(workdir)
  if images:
    body.append('<h2>Figures</h2>')
  for index, image in enumerate(images, 1):
    title, text = caption(name, image)
    body.append(
        f'<figure><img src="{html.escape(parse.quote(image))}" '
        f'alt="{html.escape(title)}"><figcaption><b>Figure {index}: '
        f'{html.escape(title)}.</b> {html.escape(text)} '
        f'(<code>{html.escape(image)}</code>)</figcaption></figure>')
  body += ['<h2>Command</h2>',
           f'<pre>{html.escape(command or command_line())}</pre>',
           f'<p>run from <code>{html.escape(os.getcwd())}</code></p>',
           '<h2>Config</h2>',
           '<pre>' + html.escape(json.dumps(config_dict, indent=2,
                                            default=str)) + '</pre>']
  return _write(os.path.join(workdir, REPORT_FILE),
                _page(f'{name}: report', '\n'.join(body) + '\n'))


def write_index(workdir: str, entries: Sequence[Mapping[str, Any]], line: str,
                command: Optional[str] = None) -> str:
  """Writes the quickstart's `workdir/report.html`; returns its path.

  Args:
    workdir: the quickstart's folder.
    entries: one per experiment: `name`, `what`, `status` ('ran', 'skipped'
      or 'failed'), `reason` (why it was skipped or failed), `wall_time_s`,
      `numbers` (a few headline numbers) and `page` (its report, relative to
      `workdir`, or None).
    line: the summary sentence (how many ran, were skipped, failed).
    command: the command line shown (default: this process's).
  """
  rows = []
  for entry in entries:
    name = html.escape(entry['name'])
    if entry.get('page'):
      name = f'<a href="{html.escape(parse.quote(entry["page"]))}">{name}</a>'
    status = entry['status']
    detail = html.escape(entry.get('reason') or '')
    if entry.get('numbers'):
      detail = '<br>'.join(
          f'{html.escape(k)} = {html.escape(_format(v))}'
          + (f' <span class="unit">{html.escape(unit(k))}</span>'
             if unit(k) else '')
          for k, v in entry['numbers'].items())
    seconds = entry.get('wall_time_s')
    rows.append([name, html.escape(entry.get('what', '')),
                 f'<span class="{html.escape(status)}">{html.escape(status)}'
                 '</span>',
                 '' if seconds is None else f'{seconds:.1f}', detail])
  body = ['<h1>quickstart</h1>', f'<p><b>{html.escape(line)}</b></p>',
          _table(rows, ['experiment', 'what it shows', 'status', 'wall time (s)',
                        'headline numbers, or why not'],
                 [False, False, False, True]),
          '<h2>Command</h2>',
          f'<pre>{html.escape(command or command_line())}</pre>',
          f'<p>run from <code>{html.escape(os.getcwd())}</code></p>']
  return _write(os.path.join(workdir, REPORT_FILE),
                _page('quickstart: report', '\n'.join(body) + '\n'))
