"""PNG figures with matplotlib's Agg backend (no display needed).

`figure(path)` is a context manager that yields a `(fig, ax)` pair and writes
the PNG when the block ends; `curves` draws several metric series on one axis.
"""
from __future__ import annotations

import contextlib
import os
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402


@contextlib.contextmanager
def figure(path: str, ncols: int = 1, nrows: int = 1, size=(5.0, 3.6), **kwargs):
  """Yields `(fig, axes)` and saves the figure as PNG at `path` afterwards."""
  fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                           **kwargs)
  try:
    yield fig, axes
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)


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
