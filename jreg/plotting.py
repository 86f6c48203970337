"""PNG figures without touching matplotlib's global backend.

`figure(path)` is a context manager that yields a `(fig, axes)` pair and writes
the PNG when the block ends; `curves` draws several metric series on one axis.

Figures are `matplotlib.figure.Figure` objects drawn on their own Agg canvas
(`FigureCanvasAgg`), never through `pyplot`: importing this module does not
call `matplotlib.use`, so a notebook keeps its inline backend, and the figures
are not registered with pyplot (nothing to close, no leaked windows). A
figure made with `path=None` is returned to the caller, and a notebook shows
it inline when it is the value of a cell (or with `IPython.display.display`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Mapping, Optional, Sequence

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
  """Writes `fig` as a PNG at `path` (creating its directory)."""
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
