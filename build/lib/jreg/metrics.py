"""Metric logging: a JSON line per logged step, TensorBoard events, console progress.

Every record is a flat dict with `step` and `split` ('train' or 'eval') and
scalar values. `metrics.jsonl` in the work directory is the file to read back
(`read_jsonl`); the TensorBoard event files (tensorboardX, no TensorFlow) are for
watching a run.
"""
from __future__ import annotations

import json
import logging as pylogging
import math
import os
import time
from typing import Iterable, Mapping

from absl import logging
import numpy as np


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO chatter (one line per file written) from the console."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or 'orbax' not in record.pathname


pylogging.getLogger('absl').addFilter(_QuietOrbax())


def _to_python(value):
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f'metric values must be scalars, got shape {value.shape}')
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)  # 'nan', 'inf': JSON has no literal for them.
  return value


class MetricWriter:
  """Writes records to `workdir/metrics.jsonl` and TensorBoard, and shows progress.

  Only process 0 writes files; every process keeps the records it was given.
  """

  def __init__(self, workdir: str, total_steps: int | None = None,
               write_files: bool = True, tensorboard: bool = True):
    self.total_steps = total_steps
    self.history: list[dict] = []
    self._write = write_files
    self._jsonl = None
    self._tb = None
    self._last_time = None
    self._last_step = None
    if write_files:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> dict:
    """Records scalar `metrics` of `split` at `step`; returns the record."""
    record = {'step': int(step), 'split': split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    now = time.perf_counter()
    if split == 'train':
      if self._last_time is not None and step > self._last_step:
        record['steps_per_sec'] = (step - self._last_step) / (now - self._last_time)
      self._last_time, self._last_step = now, step
    self.history.append(record)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key not in ('step', 'split') and isinstance(value, (int, float)):
          self._tb.add_scalar(f'{split}/{key}', value, step)
      self._tb.flush()
    self._show(record)
    return record

  def _show(self, record: dict) -> None:
    total = f'/{self.total_steps}' if self.total_steps else ''
    shown = ' '.join(
        f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
        for k, v in record.items() if k not in ('step', 'split'))
    logging.info('[%s] step %d%s %s', record['split'], record['step'], total, shown)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """Reads back the records of a `metrics.jsonl` file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(records: Iterable[dict], key: str, split: str = 'train'):
  """`(steps, values)` of one metric over a run, for plotting."""
  pairs = [(r['step'], r[key]) for r in records
           if r.get('split') == split and isinstance(r.get(key), (int, float))]
  steps = np.array([p[0] for p in pairs])
  values = np.array([p[1] for p in pairs], dtype=np.float64)
  return steps, values
