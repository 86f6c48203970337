"""Gathers a sweep's points into one table and draws the sweep's figures.

    python -m launch.gather --sweep_dir=runs/s1 [--metrics=test_accuracy]

Reads `SWEEP_DIR/points/*/config.json` and `results.json` (nested JSON
objects, flattened to dotted keys such as `optimizer.learning_rate`) and
writes into SWEEP_DIR:

- `table.csv`: one row per point: its name, whether it finished, the config
  keys whose values differ between points, then every scalar result;
- `table.json`: the same rows with the whole flattened config and results;
- figures, for each numeric result that varies over the finished points (or
  those of `--metrics`): `heatmap_<metric>.png` over the first two swept keys
  (a colour bar gives the metric; further swept keys are averaged over), or
  `<metric>_vs_<key>.png` when one key is swept (with, for an NFE result,
  the solver budget that bounds it when the points share it:
  `jreg.plotting.metric_budget`; a heatmap has none). The swept keys are the
  grid's keys when `sweep.json` gives the grid, else the config keys whose
  values differ between points; a result that is the same at every point or
  is not a number is listed, not drawn.

It prints the table (the swept keys and the results that vary) as aligned
text, and the results that are the same at every point below it.

A point without `results.json` (unfinished or failed) is listed with
`finished` false; a damaged JSON file is one sentence and exit code 1.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import re
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS


class GatherError(ValueError):
  """A point's files cannot be read; the message is one sentence."""


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}, 'c': [1, 2]} -> {'a.b': 1, 'c': [1, 2]} (lists kept)."""
  if not isinstance(tree, dict):
    return {prefix: tree} if prefix else {}
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}.{key}' if prefix else str(key)
    if isinstance(value, dict):
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def _read_json(path: pathlib.Path) -> Optional[dict]:
  if not path.is_file():
    return None
  try:
    content = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise GatherError(f'{path} is not readable JSON ({error}); rerun that '
                      'point or delete its folder.') from None
  if not isinstance(content, dict):
    raise GatherError(f'{path} holds a JSON {type(content).__name__}, not an '
                      'object.')
  return content


def _is_scalar(value: Any) -> bool:
  return isinstance(value, (int, float, str, bool)) or value is None


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def gather(sweep_dir: str) -> dict[str, Any]:
  """Reads every point of a sweep.

  Returns:
    {'rows': [{'point', 'finished', 'config': {...}, 'results': {...}}],
     'swept': config keys whose values differ between points, in the grid's
     order when `sweep.json` gives it, 'metrics': scalar result keys}.

  Raises:
    GatherError: no points, or a damaged JSON file.
  """
  root = pathlib.Path(sweep_dir)
  folders = sorted(p for p in (root / 'points').glob('*') if p.is_dir())
  if not folders:
    raise GatherError(f'{root / "points"} holds no point folders: run the '
                      'sweep first (python -m launch.sweep).')
  rows = []
  for folder in folders:
    config = _read_json(folder / 'config.json') or {}
    results = _read_json(folder / 'results.json')
    rows.append({
        'point': folder.name, 'finished': results is not None,
        'config': flatten(config),
        'results': {k: v for k, v in flatten(results or {}).items()
                    if _is_scalar(v)}})
  keys = sorted({key for row in rows for key in row['config']})
  swept = [key for key in keys if len({json.dumps(row['config'].get(key))
                                       for row in rows}) > 1]
  sweep_file = _read_json(root / 'sweep.json')
  if sweep_file and sweep_file.get('grid'):  # the grid's keys, in its order
    order = [key.strip() for key in re.findall(
        r'(?:^|;)\s*(?:config\.)?([^=;]+)=', sweep_file['grid'])]
    swept = [key for key in order if key in swept]
  metrics = []
  for row in rows:
    metrics += [key for key in row['results'] if key not in metrics]
  return {'rows': rows, 'swept': swept, 'metrics': metrics}


def write_tables(table: dict[str, Any], sweep_dir: str) -> tuple[str, str]:
  """Writes table.csv and table.json; returns their paths."""
  csv_path = os.path.join(sweep_dir, 'table.csv')
  json_path = os.path.join(sweep_dir, 'table.json')
  header = ['point', 'finished'] + table['swept'] + table['metrics']
  with open(csv_path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for row in table['rows']:
      writer.writerow([row['point'], row['finished']] +
                      [row['config'].get(key, '') for key in table['swept']] +
                      [row['results'].get(key, '') for key in table['metrics']])
  with open(json_path, 'w') as f:
    json.dump(table, f, indent=2)
  return csv_path, json_path


def varying(table: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
  """The numeric results that differ between the finished points, and
  `{result: value}` of the scalar results that are the same at all of them."""
  rows = [row for row in table['rows'] if row['finished']]
  varied, constant = [], {}
  for key in table['metrics']:
    values = [row['results'].get(key) for row in rows]
    distinct = {json.dumps(value) for value in values}
    if len(distinct) == 1:
      constant[key] = values[0]
    elif any(_is_number(value) for value in values):
      numbers = [value for value in values if _is_number(value)]
      if len(numbers) < len(values) or not np.allclose(
          numbers, numbers[0], rtol=1e-12, atol=0):
        varied.append(key)
      else:
        constant[key] = numbers[0]
  return varied, constant


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return '' if value is None else str(value)


def format_table(table: dict[str, Any]) -> str:
  """The table as aligned text: a row per point with its swept keys and the
  results that vary, then a line with the results that are the same."""
  varied, constant = varying(table)
  header = ['point', 'finished'] + table['swept'] + varied

  def order(row):   # by the swept values, numbers as numbers
    return [(0, value, '') if _is_number(value) else (1, 0, json.dumps(value))
            for value in (row['config'].get(key) for key in table['swept'])]

  lines = [header] + [
      [row['point'], 'yes' if row['finished'] else 'no'] +
      [_cell(row['config'].get(key)) for key in table['swept']] +
      [_cell(row['results'].get(key)) for key in varied]
      for row in sorted(table['rows'], key=order)]
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  numeric = [i >= 2 and all(_is_number(_as_number(line[i])) or not line[i]
                            for line in lines[1:]) for i in range(len(header))]
  text = []
  for index, line in enumerate(lines):
    cells = [cell.rjust(width) if numeric[i] else cell.ljust(width)
             for i, (cell, width) in enumerate(zip(line, widths))]
    text.append('  '.join(cells).rstrip())
    if index == 0:
      text.append('  '.join('-' * width for width in widths))
  if constant:
    text.append('the same at every finished point: ' + ', '.join(
        f'{key}={_cell(value)}' for key, value in constant.items()))
  return '\n'.join(text)


def _as_number(text: str) -> Any:
  try:
    return float(text)
  except ValueError:
    return None


def _axis_values(rows: Sequence[dict], key: str) -> list[Any]:
  values = {json.dumps(row['config'].get(key)): row['config'].get(key)
            for row in rows}
  ordered = list(values.values())
  if all(_is_number(v) for v in ordered):
    return sorted(ordered)
  return sorted(ordered, key=json.dumps)


def _safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]', '_', name)


def draw(table: dict[str, Any], sweep_dir: str,
         metrics: Sequence[str] = ()) -> list[str]:
  """Draws each metric over the swept keys; returns the PNG paths."""
  from jreg import plotting  # pylint: disable=g-import-not-at-top
  rows = [row for row in table['rows'] if row['finished']]
  swept = table['swept']
  if not rows or not swept:
    return []
  chosen = list(metrics) or varying(table)[0]
  unknown = [key for key in chosen if key not in table['metrics']]
  if unknown:
    raise GatherError(f'--metrics names {unknown}, which no point reports '
                      f'(results: {table["metrics"]}).')
  words = [key for key in chosen
           if not any(_is_number(row['results'].get(key)) for row in rows)]
  if words:
    raise GatherError(f'--metrics names {words}, which are not numbers.')
  paths = []
  for metric in chosen:
    if len(swept) == 1:
      key = swept[0]
      xs = _axis_values(rows, key)
      means = [_mean(rows, metric, {key: x}) for x in xs]
      path = os.path.join(sweep_dir, f'{_safe(metric)}_vs_{_safe(key)}.png')
      numeric = all(_is_number(x) for x in xs)
      with plotting.figure(path) as (_, ax):
        positions = xs if numeric else list(range(len(xs)))
        plotting.curves(ax, {metric: (positions, means)}, xlabel=key,
                        ylabel=metric, title=f'{metric} over {key}',
                        marker='o')
        budget = _budget(rows, metric)
        if budget:
          plotting.budget(ax, budget[1], budget[0])
        if not numeric:
          ax.set_xticks(positions, [str(x) for x in xs])
      paths.append(path)
      continue
    x_key, y_key = swept[0], swept[1]
    xs, ys = _axis_values(rows, x_key), _axis_values(rows, y_key)
    grid = np.array([[_mean(rows, metric, {x_key: x, y_key: y}) for x in xs]
                     for y in ys], dtype=float)           # [len(ys), len(xs)]
    path = os.path.join(sweep_dir, f'heatmap_{_safe(metric)}.png')
    with plotting.figure(path, size=(1.2 + 0.9 * len(xs),
                                     1.2 + 0.6 * len(ys))) as (fig, ax):
      image = ax.imshow(np.ma.masked_invalid(grid), origin='lower',
                        aspect='auto', cmap='viridis')
      colour_bar = fig.colorbar(image, ax=ax)
      colour_bar.set_label(metric)
      ax.set_xticks(range(len(xs)), [str(x) for x in xs])
      ax.set_yticks(range(len(ys)), [str(y) for y in ys])
      ax.set_xlabel(x_key)
      ax.set_ylabel(y_key)
      others = swept[2:]
      ax.set_title(f'{metric}' + (f' (mean over {", ".join(others)})'
                                  if others else ''))
      for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):   # dark text on the light end of the colours
          ax.text(j, i, f'{value:.3g}', ha='center', va='center',
                  color='black' if image.norm(value) > 0.6 else 'white',
                  fontsize='small')
    paths.append(path)
  return paths


def _budget(rows: Sequence[dict], metric: str) -> Optional[tuple[str, float]]:
  """`(label, value)` of the solver budget bounding an NFE `metric`
  (`jreg.plotting.metric_budget`) when every finished point has the same
  one; None otherwise (a sweep over the budget itself draws none)."""
  from jreg import plotting  # pylint: disable=g-import-not-at-top
  found = {plotting.metric_budget(metric, row['config']) for row in rows}
  return found.pop() if len(found) == 1 else None


def _mean(rows: Sequence[dict], metric: str, where: dict[str, Any]) -> float:
  """Mean of `metric` over the finished rows matching `where` (NaN if none)."""
  values = [row['results'][metric] for row in rows
            if all(json.dumps(row['config'].get(k)) == json.dumps(v)
                   for k, v in where.items())
            and _is_number(row['results'].get(metric))]
  return float(np.mean(values)) if values else float('nan')


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('sweep_dir', None, 'Root of the sweep.')
  flags.DEFINE_list(
      'metrics', [], 'Results to draw (default: every numeric scalar result).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}.')
  if not FLAGS.sweep_dir:
    raise app.UsageError('--sweep_dir is required.')
  try:
    table = gather(FLAGS.sweep_dir)
    csv_path, json_path = write_tables(table, FLAGS.sweep_dir)
    figures = draw(table, FLAGS.sweep_dir, FLAGS.metrics)
  except GatherError as error:
    raise SystemExit(f'error: {error}') from None
  finished = sum(row['finished'] for row in table['rows'])
  print(format_table(table))
  print(f'{finished} of {len(table["rows"])} points finished; swept '
        f'{table["swept"]}; wrote {csv_path}, {json_path}' +
        ''.join(f', {path}' for path in figures))


if __name__ == '__main__':
  define_flags()
  app.run(main)
