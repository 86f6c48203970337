"""Metric logging: a JSON line per logged step, TensorBoard events, console progress.

Every record is a flat dict with `step` and `split` ('train' or 'eval') and
scalar values. `metrics.jsonl` in the work directory is the file to read back
(`read_jsonl`); the TensorBoard event files (tensorboardX, no TensorFlow) are for
watching a run.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable, Mapping

from absl import logging
import numpy as np

from jreg.errors import UserError


def _to_python(value):
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f'metric values must be scalars, got shape {value.shape}')
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)  # 'nan', 'inf': JSON has no literal for them.
  return value


METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes records to `workdir/metrics.jsonl` and TensorBoard, and logs them.

  Only process 0 writes files; every process keeps the records it was given in
  `history`. The records hold no timings, so a resumed run writes exactly the
  rows of an uninterrupted one; the speed is shown on the console (log line,
  progress bar) only. The log line's speed is measured from the steps and
  times of the train records over at least `SPEED_WINDOW_S` seconds, so that
  records written together (a checkpoint's record right after a log step's,
  on a backend that runs each step as it is dispatched) do not show the
  time between two writes as the time of a step.

  Args:
    workdir: the run's directory.
    total_steps: shown as `step n/total` in the log lines.
    write_files: write `metrics.jsonl` (and TensorBoard events).
    tensorboard: also write TensorBoard event files under `workdir/tensorboard`.
    first_step: the first step this writer may record; TensorBoard is told to
      discard events of this and later steps left by an interrupted earlier
      segment (`purge_step`).
  """

  def __init__(self, workdir: str, total_steps: int | None = None,
               write_files: bool = True, tensorboard: bool = True,
               first_step: int = 1, clock=time.perf_counter):
    self.total_steps = total_steps
    self.history: list[dict] = []
    self._jsonl = None
    self._tb = None
    self._clock = clock
    self._train_times: list[tuple[int, float]] = []  # (step, time) of records
    if write_files:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        events = os.path.join(workdir, 'tensorboard')
        self._tb = SummaryWriter(
            events, purge_step=first_step if os.path.isdir(events) else None)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> dict:
    """Records scalar `metrics` of `split` at `step`; returns the record."""
    record = {'step': int(step), 'split': split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
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
    speed = ''
    if record['split'] == 'train':
      now, step = self._clock(), record['step']
      rate = steps_per_second(self._train_times, step, now)
      if rate is not None:
        speed = f' ({format_speed(rate)})'
      # Keeps the newest record old enough to measure from, and those after it.
      times = [(s, t) for s, t in self._train_times if s < step]
      old = [i for i, (_, t) in enumerate(times) if now - t >= SPEED_WINDOW_S]
      self._train_times = times[old[-1] if old else 0:] + [(step, now)]
    total = f'/{self.total_steps}' if self.total_steps else ''
    logging.info('[%s] step %d%s %s%s', record['split'], record['step'], total,
                 format_record(record), speed)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


SPEED_WINDOW_S = 1.0  # the shortest span the log line's steps/s is measured over


def steps_per_second(earlier: list[tuple[int, float]], step: int, now: float,
                     window: float = SPEED_WINDOW_S) -> float | None:
  """Training speed at `step` (reached at time `now`) from earlier records.

  `earlier` holds the `(step, time)` of earlier train records, oldest first.
  The speed is measured back to the newest of them that is at least `window`
  seconds old (records written together measure no time between them).

  Returns:
    Steps per second, or None when no earlier record is old enough or none
    is of an earlier step.
  """
  for old_step, old_time in reversed(earlier):
    if now - old_time >= window and old_step < step:
      return (step - old_step) / (now - old_time)
  return None


def format_speed(rate: float) -> str:
  """`'12.3 steps/s'`, or `'36.8 s/step'` below one step per second (as tqdm)."""
  return f'{rate:.3g} steps/s' if rate >= 1 else f'{1 / rate:.3g} s/step'


def format_record(record: Mapping) -> str:
  """`'loss=0.1234 mse=0.05'`: a record's values, without step and split."""
  return ' '.join(
      f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
      for k, v in record.items() if k not in ('step', 'split'))


def read_jsonl(path: str) -> list[dict]:
  """Reads back the records of a `metrics.jsonl` file.

  An unfinished last line (a run killed while writing it) is skipped.

  Raises:
    UserError: another line is not JSON.
  """
  records = []
  with open(path) as f:
    lines = f.read().split('\n')
  for number, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if number == len(lines) - 1:
        break  # The tail of a killed write; the run rewrites it on resume.
      raise UserError(f'{path} line {number + 1} is not JSON; the file was '
                      'edited or damaged: repair or move it away.') from None
  return records


def read_history(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` ([] if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  return read_jsonl(path) if os.path.exists(path) else []


def truncate_history(workdir: str, last_step: int) -> int:
  """Drops the records of steps after `last_step` from `workdir/metrics.jsonl`.

  Used when a run resumes from the checkpoint of `last_step`: the steps after
  it are trained (and logged) again. The file is rewritten atomically
  (temporary file and rename), so a crash leaves the old or the new version.

  Returns:
    The number of records dropped.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  records = read_jsonl(path)
  kept = [r for r in records if r.get('step', 0) <= last_step]
  with open(path) as f:
    text = f.read()
  ends_cleanly = not text or text.endswith('\n')  # no unfinished last line
  if len(kept) == len(records) and ends_cleanly:
    return 0
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  os.replace(tmp, path)
  return len(records) - len(kept)


def announce(message: str) -> None:
  """Shows a one-line message to whoever watches the run.

  Under `absl.app.run` (INFO visible) it is an absl INFO line; elsewhere, in a
  notebook or a plain script where absl hides INFO, it is printed (through
  tqdm, so that it does not break a progress bar).
  """
  if logging.level_info():
    logging.info('%s', message)
  else:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.write(message)


class Progress:
  """A progress bar of training steps (tqdm.auto: console or notebook widget).

  Shows steps/s and the time left, and the last logged loss and eval metrics.
  """

  def __init__(self, start: int, total: int, enabled: bool = True,
               description: str = 'train'):
    self._bar = None
    self._postfix = {}
    if enabled:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=start, desc=description,
                       unit='step', dynamic_ncols=True, leave=True)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def show(self, record: Mapping) -> None:
    """Puts a record's loss (train) or all its values (eval) beside the bar."""
    if self._bar is None:
      return
    if record.get('split') == 'train':
      shown = {k: record[k] for k in ('loss',) if k in record}
    else:
      shown = {f'{record.get("split")}_{k}': v for k, v in record.items()
               if k not in ('step', 'split') and isinstance(v, (int, float))}
      shown = dict(list(shown.items())[:4])  # keep the bar on one line
    self._postfix.update({k: f'{v:.4g}' if isinstance(v, float) else v
                          for k, v in shown.items()})
    self._bar.set_postfix(self._postfix, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def series(records: Iterable[dict], key: str, split: str = 'train'):
  """`(steps, values)` of one metric over a run, for plotting."""
  pairs = [(r['step'], r[key]) for r in records
           if r.get('split') == split and isinstance(r.get(key), (int, float))]
  steps = np.array([p[0] for p in pairs])
  values = np.array([p[1] for p in pairs], dtype=np.float64)
  return steps, values
