"""Checkpoints of a training run through orbax, with a checksum each.

A checkpoint holds the whole `TrainState` (parameters, model state, optimiser
state, RNG key, step) as arrays, the data iterator's position as JSON, and a
record of its contents: the SHA-256 of every array's path, dtype, shape and
bytes and of the data position, with each array's dtype and shape, and the
SHA-256 of the record itself (damage to the record is damage, not another
model). Nothing read back executes code: arrays go through orbax's
tensorstore handlers and the rest through JSON (no pickle).

Saving is atomic: orbax writes into a temporary directory and renames it into
place when the write has finished, so a crash during a save never leaves a
half-written checkpoint in the place of the last good one (an unfinished
temporary directory is ignored and cleaned up on the next start).

A checkpoint may also hold `extra`, a JSON dict of what the run's records
depend on beyond the state (`jreg.train.fit` keeps there the open logging
window of a checkpoint written between two scheduled ones); its SHA-256 is
`extra_sha256` of the checksum record.

Restoring verifies the checksum. A checkpoint that cannot be read or does not
match its checksum (a flipped bit, in the arrays or in the checksum record,
a truncated file) is reported in one sentence, with no traceback beside it,
moved to `checkpoints/damaged/<step>-<UTC time>` (never deleted) and the
previous checkpoint is tried (`Checkpointer.restore_latest`). A checkpoint
that is intact but holds arrays of other shapes than the model being trained
(a different model in the same workdir) is not damage: it raises
`CheckpointError`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging as pylogging
import os
import shutil
import sys
from typing import Any, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from jreg import rundir
from jreg.errors import UserError

DAMAGED_DIR = 'damaged'
# v2 records carry the SHA-256 of the record itself (`record_sha256`), so that
# damage to the record is told apart from a checkpoint of another model; v1
# records (without it) are still read.
_CHECKSUM_FORMAT = 'jreg-sha256-v2'
_READABLE_FORMATS = ('jreg-sha256-v1', _CHECKSUM_FORMAT)


class CheckpointError(UserError):
  """A checkpoint is intact but cannot be used for the run being started."""


class _Damaged(Exception):
  """A checkpoint failed to load or to verify (handled inside this module)."""


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO chatter (one line per file written) from the console."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or 'orbax' not in record.pathname


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Hides orbax's INFO lines from absl's logger while the block runs."""
  absl_logger = pylogging.getLogger('absl')
  quiet = _QuietOrbax()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def _leaves(state: Any) -> list[tuple[str, np.ndarray]]:
  return [(jax.tree_util.keystr(path), np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def contents_record(state: Any, data_position: Any,
                    extra: Optional[dict] = None) -> dict:
  """The checksum record of a checkpoint's contents.

  `sha256` covers, for every leaf of `state` in order, its tree path, dtype,
  shape and C-order bytes, then the data position as sorted-key JSON.
  `arrays` maps each path to `[dtype, shape]`; `extra_sha256` (when `extra` is
  given) is the SHA-256 of `extra` as sorted-key JSON; `record_sha256` covers
  all the other fields of the record.
  """
  digest = hashlib.sha256()
  arrays = {}
  for path, value in _leaves(state):
    dtype, shape = value.dtype.str, list(value.shape)
    arrays[path] = [dtype, shape]
    digest.update(json.dumps([path, dtype, shape]).encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  digest.update(json.dumps(data_position, sort_keys=True).encode())
  record = {'format': _CHECKSUM_FORMAT, 'sha256': digest.hexdigest(),
            'arrays': arrays}
  if extra is not None:
    record['extra_sha256'] = _json_sha256(extra)
  return dict(record, record_sha256=_record_digest(record))


def _record_digest(record: dict) -> str:
  """SHA-256 of a checksum record's own fields (all but `record_sha256`)."""
  fields = {k: v for k, v in record.items() if k != 'record_sha256'}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _ignore_closed_loop_reports() -> None:
  """Silences the leftovers of a failed orbax read.

  When one array of a checkpoint cannot be read, orbax closes its event loop
  while tensorstore still completes the other reads; each completion then
  calls into the closed loop and Python prints an 'Event loop is closed'
  traceback beside the one-sentence warning. Only those reports are dropped
  (`sys.unraisablehook`, installed once; the previous hook gets every other).
  """
  previous = sys.unraisablehook
  if getattr(previous, 'jreg_closed_loop_filter', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    previous(unraisable)

  hook.jreg_closed_loop_filter = True
  sys.unraisablehook = hook


def saved_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints saved in `workdir` (not verified; an
  unfinished save, left in a temporary directory, is not one), ascending."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _json_sha256(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(error).__name__}: {text}'


class Checkpointer:
  """Saves and restores `(state, data_position)` pairs under `workdir/checkpoints`.

  Args:
    workdir: the run's work directory.
    max_to_keep: how many of the newest checkpoints are kept (at least 2, so
      that a damaged latest checkpoint has a predecessor to fall back to).
  """

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        # Synchronous saves: the state on disk is the state of the step that
        # was asked for, and a crash right after `save` returns loses nothing.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    with quiet_orbax():
      self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._extras: dict[int, Optional[dict]] = {}

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step (not verified), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict,
           extra: Optional[dict] = None) -> None:
    """Writes `state` (a pytree of host arrays), the data position, `extra`
    (JSON, optional) and their checksum at `step`."""
    state = jax.tree.map(np.asarray, state)
    record = contents_record(state, data_position, extra)
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(data_position))
    if extra is not None:
      items['extra'] = ocp.args.JsonSave(extra)
    with quiet_orbax():
      self._manager.save(
          step, args=ocp.args.Composite(
              checksum=ocp.args.JsonSave(record), **items), force=True)
      self._manager.wait_until_finished()
    self._extras[step] = extra
    # The run has really started: a configuration checked with
    # `jreg.rundir.check_config(defer=True)` is recorded now.
    rundir.record_config(self.directory)

  def extra(self, step: int) -> Optional[dict]:
    """The `extra` dict of the checkpoint of `step` that was last saved or
    restored (verified), or None if it has none."""
    return self._extras.get(step)

  def restore(self, target: Any, step: Optional[int] = None):
    """Restores and verifies the state (shaped like `target`) and data position.

    Returns:
      `(state, data_position)` of the latest checkpoint, or of `step`; `state`
      has `target`'s tree structure.

    Raises:
      CheckpointError: there is no checkpoint, or it holds arrays of other
        shapes or dtypes than `target`.
      _Damaged: the checkpoint cannot be read or fails its checksum.
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory} holds no checkpoint.')
    abstract = jax.tree.map(np.asarray, target)
    with quiet_orbax():
      try:
        record = self._manager.restore(
            step, args=ocp.args.Composite(checksum=ocp.args.JsonRestore())
        )['checksum']
      except Exception as error:  # pylint: disable=broad-except
        _ignore_closed_loop_reports()
        raise _Damaged(f'its checksum record cannot be read '
                       f'({_first_line(error)})') from error
      if not isinstance(record, dict) or record.get('format') not in _READABLE_FORMATS:
        raise _Damaged('its checksum record is not in the expected format')
      if (record['format'] != 'jreg-sha256-v1' and
          record.get('record_sha256') != _record_digest(record)):
        raise _Damaged('its checksum record does not match its own SHA-256')
      self._check_shapes(step, abstract, record)
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
            ),
        )
      except Exception as error:  # pylint: disable=broad-except
        _ignore_closed_loop_reports()
        raise _Damaged(f'it cannot be read ({_first_line(error)})') from error
    state = jax.tree.unflatten(jax.tree.structure(abstract),
                               jax.tree.leaves(restored['state']))
    position = restored['data']
    if contents_record(state, position)['sha256'] != record.get('sha256'):
      raise _Damaged('its contents do not match their SHA-256 checksum')
    extra = None
    if 'extra_sha256' in record:
      with quiet_orbax():
        try:
          extra = self._manager.restore(
              step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())
          )['extra']
        except Exception as error:  # pylint: disable=broad-except
          raise _Damaged(f'its extra record cannot be read '
                         f'({_first_line(error)})') from error
      if _json_sha256(extra) != record['extra_sha256']:
        raise _Damaged('its extra record does not match its SHA-256 checksum')
    self._extras[step] = extra
    return state, position

  def _check_shapes(self, step: int, abstract: Any, record: dict) -> None:
    expected = {path: [value.dtype.str, list(value.shape)]
                for path, value in _leaves(abstract)}
    saved = record.get('arrays')
    if not isinstance(saved, dict):
      raise _Damaged('its checksum record lists no arrays')
    if saved == expected:
      return
    differing = sorted(set(saved) ^ set(expected)) or sorted(
        p for p in saved if saved[p] != expected[p])
    path = differing[0]
    raise CheckpointError(
        f'the checkpoint of step {step} in {self.directory} holds another model '
        f'than the one being trained ({len(differing)} arrays differ, e.g. '
        f'{path}: saved {saved.get(path, "absent")}, expected '
        f'{expected.get(path, "absent")}); start afresh in another workdir '
        '(`--workdir` on the command line) or move this one aside first '
        '(`restart=True` in Python).')

  def restore_latest(self, target: Any):
    """Restores the newest checkpoint that loads and verifies.

    Each damaged checkpoint met on the way is reported in one warning sentence
    and moved to `checkpoints/damaged/<step>-<UTC time>`. In a multi-process
    run the processes agree on the step (the earliest any of them could
    verify), and process 0 moves the damaged ones.

    Returns:
      `(step, state, data_position)`, or `(None, None, None)` when no
      checkpoint is usable (the run then starts afresh).
    """
    steps = self.all_steps()
    found = (None, None, None)
    damaged = []
    for step in reversed(steps):
      try:
        state, position = self.restore(target, step)
      except _Damaged as error:
        damaged.append((step, str(error)))
        continue
      found = (step, state, position)
      break
    if jax.process_count() > 1:
      found, damaged = self._agree(target, found, damaged)
    for step, reason in damaged:
      aside = self._move_aside(step)
      fallback = (f'falling back to the checkpoint of step {found[0]}'
                  if found[0] is not None and found[0] < step else
                  'no earlier checkpoint is usable, so the run starts afresh')
      logging.warning('the checkpoint of step %d in %s is damaged (%s); moved it '
                      'to %s, %s.', step, self.directory, reason,
                      aside or os.path.join(self.directory, DAMAGED_DIR), fallback)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('jreg-checkpoint-moved')
    if damaged or jax.process_count() > 1:
      self._manager.reload()
    return found

  def _agree(self, target, found, damaged):
    """Multi-process: every process uses the earliest step any verified."""
    mine = -1 if found[0] is None else found[0]
    steps = multihost_utils.process_allgather(np.array(mine, np.int32))
    agreed = int(np.min(steps))
    if agreed == mine:
      result = found
    elif agreed < 0:
      result = (None, None, None)
    else:
      state, position = self.restore(target, agreed)
      result = (agreed, state, position)
    if mine > agreed:
      damaged = damaged + [(mine, 'another process could not verify it')]
    multihost_utils.sync_global_devices('jreg-checkpoint-verified')
    return result, damaged

  def _move_aside(self, step: int) -> Optional[str]:
    if jax.process_index() != 0:
      return None
    source = os.path.join(self.directory, str(step))
    if not os.path.exists(source):
      return None
    target = os.path.join(self.directory, DAMAGED_DIR,
                          f'{step}-{rundir.utc_timestamp()}')
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    return target

  def close(self) -> None:
    with quiet_orbax():
      self._manager.close()
