"""PNG figures without touching matplotlib's global backend.

`figure(path)` is a context manager that yields a `(fig, axes)` pair and writes
the PNG when the block ends; `curves` draws several metric series on one axis;
`budget` draws a labelled dashed line (a solver's `max_iter`, a target) and
`budgets` several (`nfe_budgets(config, keys)`: an NFE panel's solver budgets).
Every figure is decluttered before it is written (`declutter`): tick labels
that would overlap are thinned, rotated or fewer, so that a printed figure
can be read; `tick_label_overlaps` lists any that still do.

Figures are `matplotlib.figure.Figure` objects drawn on their own Agg canvas
(`FigureCanvasAgg`), never through `pyplot`: importing this module does not
call `matplotlib.use`, so a notebook keeps its inline backend, and the figures
are not registered with pyplot (nothing to close, no leaked windows). A
figure made with `path=None` is returned to the caller, and a notebook shows
it inline when it is the value of a cell (or with `IPython.display.display`).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Mapping, Optional, Sequence

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np


def new_figure(ncols: int = 1, nrows: int = 1, size=(5.0, 3.6), **kwargs):
  """A `(fig, axes)` pair on an Agg canvas; `axes` as `Figure.subplots` gives.

  Args:
    ncols, nrows: the grid of axes.
    size: (width, height) in inches of one panel.
    **kwargs: passed to `Figure.subplots` (e.g. `sharex`, `subplot_kw`).
  """
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
  FigureCanvasAgg(fig)  # attaches itself as fig.canvas
  axes = fig.subplots(nrows, ncols, **kwargs)
  return fig, axes


def save(fig: Figure, path: str, dpi: int = 120) -> None:
  """Writes `fig` as a PNG at `path` (creating its directory), decluttered."""
  fig.tight_layout()
  if declutter(fig):
    fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)


@contextlib.contextmanager
def figure(path: Optional[str], ncols: int = 1, nrows: int = 1, size=(5.0, 3.6),
           **kwargs):
  """Yields `(fig, axes)` and saves the figure as PNG at `path` afterwards.

  With `path=None` nothing is written (keep `fig` to display it).
  """
  fig, axes = new_figure(ncols, nrows, size, **kwargs)
  yield fig, axes
  if path is None:
    fig.tight_layout()
    if declutter(fig):
      fig.tight_layout()
  else:
    save(fig, path)


def curves(ax, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
           xlabel: str, ylabel: str, title: Optional[str] = None,
           logx: bool = False, logy: bool = False, marker: Optional[str] = None):
  """Draws `{label: (x, y)}` on `ax` with labelled axes and a legend."""
  for label, (x, y) in series.items():
    ax.plot(np.asarray(x), np.asarray(y), label=label, marker=marker)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  if logx:
    ax.set_xscale('log')
  if logy:
    ax.set_yscale('log')
  if len(series) > 1:
    ax.legend(fontsize='small')
  ax.grid(alpha=0.3)


def budget(ax, value: Optional[float], label: str, color: str = 'black',
           axis: str = 'y') -> None:
  """A dashed line at `value` with `label` written on it (e.g. a solver's
  evaluation budget `max_iter`, or a target); nothing for None.

  Args:
    ax: the axes.
    value: where the line is, in data units of `axis`; None draws nothing.
    label: written beside the line as `label = value`.
    color: of the line and its label.
    axis: 'y' (a horizontal line: NFE on the y axis) or 'x' (a vertical
      line: NFE on the x axis).
  """
  if value is None:
    return
  if axis not in ('x', 'y'):
    raise ValueError(f"axis must be 'x' or 'y', got {axis!r}.")
  horizontal = axis == 'y'
  (ax.axhline if horizontal else ax.axvline)(value, color=color, ls='--', lw=1,
                                             alpha=0.7)
  # Room beyond the line for its label when the line is at the far end.
  get_lim, set_lim = ((ax.get_ylim, ax.set_ylim) if horizontal
                      else (ax.get_xlim, ax.set_xlim))
  scale = (ax.get_yscale() if horizontal else ax.get_xscale()) == 'log' and value > 0
  to, back = (np.log10, lambda v: 10 ** v) if scale else (float, float)
  low, high = get_lim()
  span = to(high) - to(low)
  if span > 0 and to(value) > to(high) - 0.12 * span:
    set_lim(low, back(to(value) + 0.12 * span))
  if horizontal:
    ax.annotate(f'{label} = {value:g}', xy=(1.0, value),
                xycoords=('axes fraction', 'data'), xytext=(-3, 2),
                textcoords='offset points', ha='right', va='bottom',
                fontsize='small', color=color)
  else:
    ax.annotate(f'{label} = {value:g}', xy=(value, 1.0),
                xycoords=('data', 'axes fraction'), xytext=(-2, -3),
                textcoords='offset points', ha='right', va='top', rotation=90,
                fontsize='small', color=color)


def budgets(ax, values: Mapping[str, Optional[float]], color: str = 'black',
            axis: str = 'y') -> None:
  """`budget` for each of `{label: value}`, one line per distinct value (the
  labels of equal values joined: 'forward / backward max_iter = 12'); None
  values draw nothing."""
  by_value: dict[float, list[str]] = {}
  for label, value in values.items():
    if value is not None:
      by_value.setdefault(value, []).append(label)
  for value, labels in sorted(by_value.items()):
    words = [label.rsplit(' ', 1) for label in labels]
    if len(labels) > 1 and len({w[-1] for w in words}) == 1 and all(
        len(w) == 2 for w in words):  # 'forward max_iter', 'backward max_iter'
      text = ' / '.join(w[0] for w in words) + ' ' + words[0][-1]
    else:
      text = ' / '.join(labels)
    budget(ax, value, text, color, axis)


def nfe_budgets(config: Any, keys: Sequence[str]) -> dict[str, Optional[int]]:
  """`{label: budget}` of `solver_budgets(config)` for the NFE metrics `keys`
  ('forward_nfe' -> 'forward max_iter', 'probe_nfe_to_tol' -> 'probe
  max_iter'), ready for `budgets`."""
  found = solver_budgets(config)
  return {f'{key.split("_")[0]} max_iter': found.get(key) for key in keys}


def solver_budgets(config: Any) -> dict[str, Optional[int]]:
  """The NFE budgets of a DEQ run's config (a ConfigDict or its dict):
  `{'forward_nfe': deq.forward.max_iter, 'backward_nfe': deq.backward.max_iter,
  'probe_nfe_to_tol': probe.max_iter}`, None where the config has none."""
  get = lambda *keys: _config_number(config, keys)  # noqa: E731
  return {'forward_nfe': get('deq', 'forward', 'max_iter'),
          'backward_nfe': get('deq', 'backward', 'max_iter'),
          'probe_nfe_to_tol': get('probe', 'max_iter')}


def _config_number(config: Any, keys: Sequence[str]) -> Optional[float]:
  """`config[k0][k1]...` (or a flattened config's `config['k0.k1...']`) when
  it is a number, else None."""
  try:
    node = config['.'.join(keys)]
  except (KeyError, TypeError, AttributeError):
    node = config
    for key in keys:
      try:
        node = node[key]
      except (KeyError, TypeError, AttributeError):
        return None
  if isinstance(node, bool) or not isinstance(node, (int, float)):
    return None
  return node


def metric_budget(metric: str, config: Any) -> Optional[tuple[str, float]]:
  """`(label, budget)` for an NFE result named `metric` (a result or metric
  key such as 'train_forward_nfe', 'test.forward_nfe', 'valid_forward_nfe',
  'last_train.backward_nfe', 'nfe_to_tol', 'test.probe_nfe_to_tol') from a
  run's config (nested or flattened to dotted keys); None when `metric` is
  no NFE or the config has no budget for it.

  NFE to tolerance is bounded by `probe.max_iter`; backward NFE by
  `deq.backward.max_iter`; forward NFE by `deq.forward.max_iter`, or, for an
  evaluation result ('test', 'valid', 'eval' in its name) of a config with
  `deq.eval_max_iter` (the MDEQ's test budget), by that.
  """
  name = metric.lower()
  if 'nfe' not in name:
    return None
  if 'nfe_to_tol' in name:
    label, keys = 'probe max_iter', ('probe', 'max_iter')
  elif 'backward' in name:
    label, keys = 'backward max_iter', ('deq', 'backward', 'max_iter')
  elif 'forward' in name:
    label, keys = 'forward max_iter', ('deq', 'forward', 'max_iter')
    evaluation = any(word in name for word in ('test', 'valid', 'eval'))
    if evaluation and _config_number(config, ('deq', 'eval_max_iter')) is not None:
      label, keys = 'eval_max_iter', ('deq', 'eval_max_iter')
  else:
    return None
  value = _config_number(config, keys)
  return None if value is None else (label, value)


def _axes_axis(ax):
  """(name, axis) of each axis of `ax` (x, y and, on 3-D axes, z)."""
  out = [('x', ax.xaxis), ('y', ax.yaxis)]
  if hasattr(ax, 'zaxis'):
    out.append(('z', ax.zaxis))
  return out


def _drawn_labels(axis, which: str = 'both') -> list:
  """The tick labels an axis draws (of `which` ticks: 'major', 'minor',
  'both'): visible, with text, inside its view."""
  low, high = sorted(axis.get_view_interval())
  slack = 1e-9 * max(abs(low), abs(high), 1e-300)
  labels = []
  kinds = {'major': (axis.get_majorticklocs(), axis.get_major_ticks),
           'minor': (axis.get_minorticklocs(), axis.get_minor_ticks)}
  for kind, (locs, ticks) in kinds.items():
    if which not in ('both', kind):
      continue
    for loc, tick in zip(locs, ticks(len(locs))):
      label = tick.label1
      if (label.get_visible() and label.get_text().strip()
          and low - slack <= loc <= high + slack):
        labels.append(label)
  return labels


def _overlaps(axis, renderer) -> list[tuple[str, str]]:
  boxes = [(label.get_text(), label.get_window_extent(renderer))
           for label in _drawn_labels(axis)]
  return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
          if box_a.x0 < box_b.x1 - 1 and box_b.x0 < box_a.x1 - 1
          and box_a.y0 < box_b.y1 - 1 and box_b.y0 < box_a.y1 - 1]


def tick_label_overlaps(fig: Figure) -> list[tuple[int, str, str, str]]:
  """`(axes index, axis name, label, label)` of tick labels that overlap
  (by more than a pixel) when `fig` is drawn."""
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  return [(index, name, a, b)
          for index, ax in enumerate(fig.axes) if ax.get_visible()
          for name, axis in _axes_axis(ax)
          for a, b in _overlaps(axis, renderer)]


def _plain(value, _=None) -> str:
  return f'{value:g}'


def _plain_log(axis) -> None:
  """Minor labels off; over fewer than 3 decades, major ticks at 1, 2 and 5
  per decade, written plainly (0.002, not 2×10⁻³)."""
  axis.set_minor_formatter(ticker.NullFormatter())
  low, high = sorted(axis.get_view_interval())
  if 0 < low and high / low < 1e3:
    axis.set_major_locator(ticker.LogLocator(10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(_plain))


def declutter(fig: Figure, rounds: int = 4) -> bool:
  """Changes the ticks of `fig` until no two tick labels overlap; returns
  whether it changed any.

  A log axis that spans few decades (its minor ticks are labelled, or it has
  fewer than 3 labels: matplotlib's choice differs between versions) gets
  ticks at 1, 2 and 5 per decade, written plainly (0.002, not 2×10⁻³). Then,
  per axis whose labels overlap, in turn: minor tick labels are removed; the
  labels are rotated (x axes of 2-D plots); the ticks are fewer.
  """
  changed = False
  log_axes = [axis for ax in fig.axes for _, axis in _axes_axis(ax)
              if axis.get_scale() == 'log']
  if log_axes:   # few decades (labelled minor ticks, or under 3 labels): 1, 2, 5
    fig.canvas.draw()
    for axis in log_axes:
      if _drawn_labels(axis, 'minor') or len(_drawn_labels(axis)) < 3:
        _plain_log(axis)
        changed = True
  for attempt in range(rounds):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    crowded = [(ax, name, axis) for ax in fig.axes if ax.get_visible()
               for name, axis in _axes_axis(ax) if _overlaps(axis, renderer)]
    if not crowded:
      return changed or attempt > 0
    for ax, name, axis in crowded:
      minor = _drawn_labels(axis, 'minor')
      is_log = axis.get_scale() == 'log'
      three_d = hasattr(ax, 'zaxis')
      if attempt == 0 and (minor or is_log):
        axis.set_minor_formatter(ticker.NullFormatter())
        if is_log:
          _plain_log(axis)
      elif attempt <= 1 and name == 'x' and not three_d:
        for label in axis.get_ticklabels():
          label.set_rotation(30)
          label.set_horizontalalignment('right')
      elif is_log:
        axis.set_major_locator(ticker.LogLocator(10, subs=(1.0,)))
      else:
        count = max(2, len(_drawn_labels(axis)) // 2)
        axis.set_major_locator(ticker.MaxNLocator(count, steps=[1, 2, 5, 10]))
  return True
