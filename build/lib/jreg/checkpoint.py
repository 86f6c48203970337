"""Checkpoints of a training run through orbax.

A checkpoint holds the whole `TrainState` (parameters, model state, optimiser
state, RNG key, step) as arrays, and the data iterator's position as JSON, so a
run killed mid-way and restarted continues exactly where the last checkpoint
stood. Nothing read back executes code: arrays go through orbax's
tensorstore/numpy handlers and the data position through JSON (no pickle).

Saving is atomic: orbax writes into a temporary directory and renames it into
place when the write has finished, so a crash during a save never leaves a
half-written checkpoint in the place of the last good one (an unfinished
temporary directory is ignored and cleaned up on the next start).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(state, data_position)` pairs under `workdir/checkpoints`.

  Args:
    workdir: the run's work directory.
    max_to_keep: how many of the newest checkpoints are kept.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # Synchronous saves: the state on disk is the state of the step
            # that was asked for, and a crash right after `save` returns loses
            # nothing.
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        ),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict) -> None:
    """Writes `state` (a pytree of host arrays) and the data position at `step`."""
    state = jax.tree.map(np.asarray, state)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_position),
        ),
        force=True,
    )
    self._manager.wait_until_finished()

  def restore(self, target: Any, step: Optional[int] = None):
    """Restores the state (shaped like `target`) and the data position.

    Returns:
      `(state, data_position)` of the latest checkpoint, or of `step`.
    """
    step = self._manager.latest_step() if step is None else step
    abstract = jax.tree.map(np.asarray, target)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
        ),
    )
    return restored['state'], restored['data']

  def close(self) -> None:
    self._manager.close()
