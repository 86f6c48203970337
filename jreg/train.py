"""The training engine shared by every experiment.

* `TrainState`: everything a step changes, as one pytree.
* `value_and_grad(loss_fn)`: the plain gradient function; penalised ones come
  from `jreg.gradient_regularization`.
* `make_update(grad_fn, optimizer)`: the pure step
  `update(state, batch) -> (state, metrics)`.
* `Parallel`: how that step is compiled and where state and batches live, in
  one of three modes:

    - `single`:  `jax.jit` on one device;
    - `sharded`: `jax.jit` over a `Mesh(('data',))` of every device of every
      process, the batch split along its leading axis (`NamedSharding`), the
      state replicated; XLA inserts the gradient all-reduce;
    - `pmap`:    `jax.pmap(axis_name='data')`, gradients averaged with
      `lax.pmean` explicitly.

  `single` and `sharded` compile with `jreg.xla_cpu`'s options (on CPU:
  convolutions by XLA's multi-threaded kernels).
  The three give the same parameters after the same steps on the same global
  batches (tests/test_train.py).
* `fit(...)`: the loop — lock the workdir, record or check its configuration,
  restore from the newest checkpoint that verifies, step, log, evaluate,
  checkpoint, stop on a non-finite loss. A run killed at any moment and
  restarted ends with the parameters and `metrics.jsonl` rows of an
  uninterrupted run; a finished run is not trained again.
* Pre-emption: SIGTERM or SIGUSR1 (what SLURM sends on pre-emption, `scancel`,
  `scontrol requeue`, and `--signal=B:USR1@S` through launch/slurm.sh) makes
  `fit` save a checkpoint at the next step boundary, release the workdir and
  raise `Preempted`; a command then exits with `PREEMPTED_EXIT_STATUS` (75,
  EX_TEMPFAIL), which the SLURM scripts answer with a requeue.
* Time-based checkpoints (`checkpoint_every_seconds`, the command's
  `checkpoint_minutes`) beside the step-based ones.

Loss functions follow `loss_fn(params, model_state, rng, batch) ->
(loss, (model_state, metrics))`; see docs/architecture.md, "Contracts".
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jreg import checkpoint as checkpoint_lib
from jreg import metrics as metrics_lib
from jreg import rundir
from jreg import xla_cpu
from jreg.errors import UserError

__all__ = (
    'AXIS', 'PARALLEL_MODES', 'PREEMPTED_EXIT_STATUS', 'SCHEDULES',
    'NonFiniteLossError', 'Parallel', 'Preempted', 'TrainState',
    'checkpoint_seconds', 'evaluate', 'fit', 'init_state',
    'learning_rate_schedule', 'make_update', 'stop_on_signals',
    'value_and_grad',
)

PARALLEL_MODES = ('single', 'sharded', 'pmap')
AXIS = 'data'  # The name of the data-parallel axis, in every mode.

Batch = Mapping[str, Any]
LossFn = Callable[..., Any]
GradFn = Callable[..., Any]


class TrainState(NamedTuple):
  step: jax.Array          # [] int32, updates applied so far
  params: hk.Params        # trainable parameters
  model_state: hk.State    # Haiku state (batch statistics, ...); {} if none
  opt_state: optax.OptState
  rng: jax.Array           # [2] uint32 raw PRNG key, split once per step


SCHEDULES = ('constant', 'cosine', 'warmup_cosine')


def learning_rate_schedule(kind: str, peak: float, num_steps: int,
                           warmup_steps: int = 0) -> optax.Schedule:
  """The learning-rate schedules experiments choose from by flag.

  * `constant`: `peak` throughout.
  * `cosine`: peak·½(1 + cos(π·t/T)) over T = `num_steps` (Loshchilov & Hutter).
  * `warmup_cosine`: linear warm-up from 0 to `peak` over `warmup_steps`, then
    cosine decay to 0 at `num_steps`.
  """
  if kind not in SCHEDULES:
    raise ValueError(f'schedule {kind!r} is not one of {SCHEDULES}.')
  if warmup_steps < 0 or (kind == 'warmup_cosine' and warmup_steps >= num_steps):
    raise ValueError(f'a warm-up of {warmup_steps} steps does not fit in a run of '
                     f'{num_steps} steps.')
  if kind == 'constant':
    return optax.constant_schedule(peak)
  if kind == 'cosine':
    return optax.cosine_decay_schedule(peak, num_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, num_steps)


class NonFiniteLossError(UserError, RuntimeError):
  """Raised by `fit` when a step produced a NaN or infinite loss."""


class BatchSizeError(UserError, ValueError):
  """A batch cannot be split evenly over the devices of the parallel mode."""


# EX_TEMPFAIL of sysexits.h: "try again later". launch/slurm.sh and the
# sweep's sbatch script requeue the job when a run exits with it.
PREEMPTED_EXIT_STATUS = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
  """`fit` stopped at a signal after saving a checkpoint; the same call (the
  same command) resumes it. The message is one sentence.

  Attributes:
    signal_name: 'SIGTERM' or 'SIGUSR1'.
    step: the step of the checkpoint that was saved.
  """
  exit_status = PREEMPTED_EXIT_STATUS

  def __init__(self, signal_name: str, step: int, directory: str):
    super().__init__(f'stopped by {signal_name} at step {step}: checkpoint '
                     f'saved in {directory}; run the same command to resume.')
    self.signal_name, self.step = signal_name, step


class _StopSignals:
  """The stop request of this process: the first SIGTERM / SIGUSR1 received
  while `stop_on_signals` is active (nested uses share it)."""

  def __init__(self):
    self.received: Optional[int] = None
    self._depth = 0
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is None:
      self.received = signum

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield  # Python runs signal handlers in the main thread only.
      return
    if not self._depth:
      self.received = None
      self._previous = {sig: signal.signal(sig, self._handle)
                        for sig in STOP_SIGNALS}
    self._depth += 1
    try:
      yield
    finally:
      self._depth -= 1
      if not self._depth:
        for sig, previous in self._previous.items():
          signal.signal(sig, previous)
        self._previous = {}
        self.received = None  # a signal no `fit` acted on is not kept


_stop = _StopSignals()


def stop_on_signals():
  """A context in which SIGTERM and SIGUSR1 ask `fit` to stop (in the main
  thread; the previous handlers are restored at its exit).

  `fit` enters it by itself; `jreg.cli` enters it around a whole command, so
  a signal that arrives between two `fit` calls stops the next one at its
  first step (or is ignored if none follows: the command then ends normally).
  """
  return _stop.installed()


_default_checkpoint_seconds = threading.local()


@contextlib.contextmanager
def checkpoint_seconds(seconds: float):
  """Sets the `checkpoint_every_seconds` of the `fit` calls in this context
  that do not give one (`jreg.cli` sets the command's `checkpoint_minutes`)."""
  previous = getattr(_default_checkpoint_seconds, 'value', 0.0)
  _default_checkpoint_seconds.value = seconds
  try:
    yield
  finally:
    _default_checkpoint_seconds.value = previous


def value_and_grad(loss_fn: LossFn) -> GradFn:
  """The plain gradient function of `loss_fn`, in the engine's contract.

  Returns:
    `grad_fn(params, model_state, rng, batch, axis_name=None)` returning
    `((loss, (model_state, metrics)), grads)`. `axis_name` is unused: the
    engine averages gradients over it.
  """
  vg = jax.value_and_grad(loss_fn, has_aux=True)

  def grad_fn(params, model_state, rng, batch, axis_name=None):
    del axis_name
    return vg(params, model_state, rng, batch)

  return grad_fn


def init_state(init_fn: Callable[[jax.Array], tuple[hk.Params, hk.State]],
               optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Builds the initial state from `init_fn(rng) -> (params, model_state)`."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  params, model_state = init_fn(init_rng)
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    model_state=model_state, opt_state=optimizer.init(params),
                    rng=train_rng)


def make_update(grad_fn: GradFn, optimizer: optax.GradientTransformation,
                axis_name: Optional[str] = None):
  """The pure update step.

  `update(state, batch) -> (state, metrics)` computes gradients with
  `grad_fn`, averages gradients, loss, metrics and model state over
  `axis_name` (under `pmap`), applies the optimiser, and adds the loss and the
  global norms of gradients, parameters and updates to the metrics.
  """

  def update(state: TrainState, batch: Batch):
    rng, step_rng = jax.random.split(state.rng)
    if axis_name is not None:
      # Independent randomness (dropout, Hutchinson vectors) on each device.
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    (loss, (model_state, metrics)), grads = grad_fn(
        state.params, state.model_state, step_rng, batch, axis_name)
    if axis_name is not None:
      grads, loss, metrics = jax.lax.pmean((grads, loss, metrics), axis_name)
      # Floating state (batch statistics) is averaged; integer state (step
      # counters of schedules) is the same on every device and keeps its dtype.
      model_state = jax.tree.map(
          lambda x: jax.lax.pmean(x, axis_name)
          if jnp.issubdtype(x.dtype, jnp.floating) else x, model_state)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),
                   update_norm=optax.tree.norm(updates))
    return TrainState(state.step + 1, params, model_state, opt_state, rng), metrics

  return update


class Parallel:
  """Compiles a step and places state and batches for one parallel mode.

  Args:
    mode: 'single', 'sharded' or 'pmap'.
  """

  def __init__(self, mode: str):
    if mode not in PARALLEL_MODES:
      raise ValueError(f'parallel mode {mode!r} is not one of {PARALLEL_MODES}.')
    if mode == 'single' and jax.process_count() > 1:
      raise ValueError("parallel mode 'single' runs one process; use 'sharded' "
                       "or 'pmap' across hosts.")
    self.mode = mode
    if mode == 'sharded':
      # Auto axes: XLA propagates shardings through the model (gathers,
      # reshapes) by itself, so model code stays single-device code.
      self.mesh = jax.make_mesh((jax.device_count(),), (AXIS,),
                                axis_types=(jax.sharding.AxisType.Auto,))
      self._replicated = NamedSharding(self.mesh, P())
      self._split = NamedSharding(self.mesh, P(AXIS))
    self.axis_name = AXIS if mode == 'pmap' else None

  @property
  def num_local_shards(self) -> int:
    """How many ways this process's slice of a batch is split."""
    return {'single': 1, 'sharded': jax.local_device_count(),
            'pmap': jax.local_device_count()}[self.mode]

  def compile(self, update: Callable) -> Callable:
    """Compiles `update(state, batch) -> (state, metrics)`, donating the state."""
    if self.mode == 'single':
      return xla_cpu.jit(update, donate_argnums=0)
    if self.mode == 'sharded':
      return xla_cpu.jit(update, donate_argnums=0,
                     in_shardings=(self._replicated, self._split),
                     out_shardings=(self._replicated, self._replicated))
    return jax.pmap(update, axis_name=AXIS, donate_argnums=0)

  def put_state(self, state: Any) -> Any:
    """Host state -> device state (replicated on every device)."""
    if self.mode == 'single':
      return jax.device_put(state)
    if self.mode == 'sharded':
      return jax.tree.map(self._replicate_global, state)
    # One copy per local device along a new leading axis, as `pmap` expects.
    devices = jax.local_devices()
    stacked = NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), P(AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), stacked),
        state)

  def _replicate_global(self, x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self._replicated, lambda i: x[i])

  def put_batch(self, batch: Batch) -> Any:
    """This process's slice of a global batch -> device batch."""
    self.check_batch(batch)
    if self.mode == 'single':
      return jax.device_put(batch)
    if self.mode == 'sharded':
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self._split, x), batch)
    n = jax.local_device_count()
    return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)

  def check_batch(self, batch: Batch) -> None:
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    for size in sizes:
      if size % self.num_local_shards:
        raise BatchSizeError(
            f'a per-process batch of {size} examples cannot be split over '
            f'{self.num_local_shards} local devices in {self.mode!r} mode; '
            f'choose a global batch size divisible by the number of devices '
            f'({jax.device_count()}), or parallel mode \'single\'.')

  def get(self, tree: Any) -> Any:
    """Device state or metrics -> host NumPy (one copy, unreplicated)."""
    if self.mode == 'pmap':
      tree = jax.tree.map(lambda x: x[0], tree)
    if self.mode == 'sharded':
      tree = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _is_finite(metrics: Mapping[str, np.ndarray]) -> bool:
  return bool(np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm']))


def _sync(name: str) -> None:
  """A barrier across processes (nothing in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def fit(*,
        workdir: str,
        init_fn: Callable[[jax.Array], tuple[hk.Params, hk.State]],
        grad_fn: GradFn | list[tuple[int, GradFn]],
        optimizer: optax.GradientTransformation,
        train_iter: Any,
        num_steps: int,
        seed: int = 0,
        parallel: str = 'single',
        eval_fn: Optional[Callable[[hk.Params, hk.State], Mapping[str, float]]] = None,
        eval_every: int = 0,
        log_every: int = 50,
        checkpoint_every: int = 0,
        checkpoint_every_seconds: Optional[float] = None,
        learning_rate_fn: Optional[optax.Schedule] = None,
        tensorboard: bool = True,
        config: Optional[Mapping[str, Any]] = None,
        allow_config_change: bool = False,
        restart: bool = False,
        progress: bool = True) -> tuple[TrainState, list[dict]]:
  """Trains for `num_steps` updates, resuming from `workdir`'s latest checkpoint.

  The workdir is locked while `fit` runs (`jreg.rundir.lock`: one writer per
  workdir). A resumed run restores the newest checkpoint that verifies (a
  damaged one is moved to `checkpoints/damaged/` and the one before is used),
  drops the records of later steps from `metrics.jsonl`, and continues, so a
  run killed at any moment and restarted ends with the parameters and the
  `metrics.jsonl` rows of an uninterrupted run. A workdir whose run already
  reached `num_steps` is not trained again: `fit` says so and returns its
  final state and history (and first runs the final evaluation if the run
  was stopped during it: the final checkpoint is written before it).

  SIGTERM or SIGUSR1 (see `stop_on_signals`) makes `fit` save a checkpoint at
  the next step boundary and raise `Preempted`. Checkpoints written between
  two scheduled ones (by a signal, or by `checkpoint_every_seconds`) carry the
  open logging window, so a run resumed from them writes the very records of
  an uninterrupted run. In a multi-process run every process stops or
  checkpoints at the same step: the flags are gathered at each step boundary
  (any process's signal stops all; process 0's clock decides the time-based
  checkpoints).

  Args:
    workdir: directory for checkpoints, `metrics.jsonl`, `config.json` and
      TensorBoard events.
    init_fn: `rng -> (params, model_state)`.
    grad_fn: see `value_and_grad`; or phases `[(last_step, grad_fn), ...]`
      with increasing `last_step`, each grad function used for the steps up to
      its `last_step` (the last phase runs to the end). DEQs use this for the
      unrolled weight-tied pre-training before the implicit layer; each phase
      is compiled once, when it is first reached.
    optimizer: any optax transformation.
    train_iter: a `jreg.data` iterator (`next`, `get_state`, `set_state`) giving
      this process's slice of each global batch.
    num_steps: total number of updates of the run (a resumed run does the rest).
    seed: seeds the initial parameters and the per-step RNG.
    parallel: 'single', 'sharded' or 'pmap'.
    eval_fn: `(params, model_state) -> metrics` on the host, every `eval_every`
      steps and at the end.
    eval_every, log_every, checkpoint_every: intervals in steps (0: never;
      a checkpoint is always written at the end).
    checkpoint_every_seconds: also checkpoint when this many seconds passed
      since the last checkpoint (or the start); 0: never; None: the default
      of the command (`checkpoint_seconds`, 0 outside one).
    learning_rate_fn: the optimiser's schedule, logged as `learning_rate`.
    tensorboard: also write TensorBoard event files.
    config: the run's configuration as a JSON-able mapping (e.g.
      `ConfigDict.to_dict()`), recorded in `workdir/config.json` on the first
      start and compared on every later one (`jreg.rundir.check_config`);
      None: not recorded.
    allow_config_change: resume under a configuration that differs from the
      recorded one (the differences are logged and appended to
      `config_changes.jsonl`) instead of refusing.
    restart: start afresh: the workdir's files are moved to
      `workdir/previous/<UTC time>/` (nothing is deleted) and training starts
      at step 0.
    progress: show a progress bar (tqdm; console or notebook) with steps/s,
      the time left and the last logged loss; process 0 only.

  Returns:
    `(state, history)`: the final state on the host, and every record of the
    whole run (all segments of a resumed run), as read from `metrics.jsonl`.

  Raises:
    NonFiniteLossError: a step produced a NaN or infinite loss; the last good
      checkpoint is left in place and no later one is written.
    BatchSizeError: the batch cannot be split over the devices.
    jreg.rundir.WorkdirBusyError: another process runs in `workdir`.
    jreg.rundir.WorkdirError: `workdir` is a file or cannot be written.
    jreg.rundir.ConfigMismatchError: `config` differs from the recorded one.
    jreg.checkpoint.CheckpointError: the checkpoint holds another model, or a
      later step than `num_steps`.
    Preempted: a signal stopped the run after a checkpoint was saved.
  """
  if checkpoint_every_seconds is None:
    checkpoint_every_seconds = getattr(_default_checkpoint_seconds, 'value', 0.0)
  if checkpoint_every_seconds < 0:
    raise ValueError('checkpoint_every_seconds must be >= 0, got '
                     f'{checkpoint_every_seconds}.')
  par = Parallel(parallel)
  phases = grad_fn if isinstance(grad_fn, (list, tuple)) else [(num_steps, grad_fn)]
  if any(a[0] >= b[0] for a, b in zip(phases, phases[1:])):
    raise ValueError('grad_fn phases need increasing last steps, got '
                     f'{[p[0] for p in phases]}.')
  is_primary = jax.process_index() == 0
  with stop_on_signals(), rundir.lock(workdir) as path:
    if restart:
      if is_primary:
        moved = rundir.move_aside(path)
        if moved:
          metrics_lib.announce(f'restart: moved the previous run in {path} to '
                               f'{moved}; training from step 0.')
      _sync('jreg-restart')
    if config is not None:
      rundir.check_config(path, config, allow_change=allow_config_change)
    return _fit_locked(
        path, par, phases, init_fn=init_fn, optimizer=optimizer,
        train_iter=train_iter, num_steps=num_steps, seed=seed, eval_fn=eval_fn,
        eval_every=eval_every, log_every=log_every,
        checkpoint_every=checkpoint_every,
        checkpoint_every_seconds=checkpoint_every_seconds,
        learning_rate_fn=learning_rate_fn,
        tensorboard=tensorboard, progress=progress and is_primary,
        is_primary=is_primary)


def _whole_history(workdir: str, segment: list[dict]) -> list[dict]:
  """The run's records from `metrics.jsonl` (`segment` if it was not written)."""
  _sync('jreg-history-written')
  if os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
    return metrics_lib.read_history(workdir)
  return list(segment)


def _fit_locked(workdir, par, phases, *, init_fn, optimizer, train_iter,
                num_steps, seed, eval_fn, eval_every, log_every,
                checkpoint_every, checkpoint_every_seconds, learning_rate_fn,
                tensorboard, progress, is_primary):
  """`fit` once the workdir is locked and its configuration checked."""
  say = metrics_lib.announce if is_primary else lambda message: None
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  writer = bar = None
  try:
    host_state = init_state(init_fn, optimizer, seed)
    restored_step, restored, position = checkpointer.restore_latest(host_state)
    start = 0
    window = []  # the host metrics of the open logging window
    if restored_step is not None:
      host_state, start = restored, int(restored.step)
      if start > num_steps:
        raise checkpoint_lib.CheckpointError(
            f'the latest checkpoint in {checkpointer.directory} is at step '
            f'{start}, past num_steps={num_steps}; raise num_steps, or start '
            'afresh in another workdir (`--workdir` on the command line) or '
            'after moving this one aside (`restart=True` in Python).')
      if start == num_steps:
        if eval_fn is None or _has_final_eval(workdir, num_steps):
          say(f'the run in {workdir} is already finished (step {start} of '
              f'{num_steps}); returning its final state and recorded history '
              '(to train it again, use another `--workdir` on the command line, '
              'or `restart=True` in Python).')
          return host_state, _whole_history(workdir, [])
        say(f'the run in {workdir} finished training (step {start} of '
            f'{num_steps}) but not its final evaluation; evaluating it now.')
      else:
        train_iter.set_state(position)
        window = _window_from_json(checkpointer.extra(restored_step))
        say(f'resumed from the checkpoint of step {start} in '
            f'{checkpointer.directory}.')
    if is_primary:
      # Steps after the checkpoint are trained and logged again.
      metrics_lib.truncate_history(workdir, start)
    writer = metrics_lib.MetricWriter(workdir, num_steps, write_files=is_primary,
                                      tensorboard=tensorboard,
                                      first_step=start + 1)
    bar = metrics_lib.Progress(start, num_steps, enabled=progress)
    state = par.put_state(host_state)
    final = _train_steps(
        par, phases, state, start, optimizer=optimizer, train_iter=train_iter,
        num_steps=num_steps, eval_fn=eval_fn, eval_every=eval_every,
        log_every=log_every, checkpoint_every=checkpoint_every,
        checkpoint_every_seconds=checkpoint_every_seconds,
        learning_rate_fn=learning_rate_fn, checkpointer=checkpointer,
        writer=writer, bar=bar, last_good=restored_step, window=window)
  finally:
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
    checkpointer.close()
  return final, _whole_history(workdir, writer.history)


def _has_final_eval(workdir: str, num_steps: int) -> bool:
  """Whether `metrics.jsonl` holds the evaluation of step `num_steps`."""
  _sync('jreg-final-eval-check')
  return any(r.get('split') == 'eval' and r.get('step') == num_steps
             for r in metrics_lib.read_history(workdir))


def _window_to_json(window: list[dict]) -> Optional[dict]:
  """The open logging window as JSON: per step, `{name: [dtype, value]}`
  (each value exact: a float32 is exactly a JSON double)."""
  if not window:
    return None
  return {'log_window': [{k: [np.asarray(v).dtype.str, np.asarray(v).tolist()]
                          for k, v in m.items()} for m in window]}


def _window_from_json(extra: Optional[dict]) -> list[dict]:
  if not extra:
    return []
  return [{k: np.asarray(value, dtype) for k, (dtype, value) in m.items()}
          for m in extra.get('log_window', [])]


class _Boundary:
  """What happens at a step boundary beyond the schedule: a stop requested by
  a signal, a checkpoint due by the clock. In a multi-process run the flags
  are gathered, so that every process decides the same (orbax saves are
  collective): any process's signal stops all, process 0's clock decides."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.last_save = time.monotonic()

  def poll(self) -> tuple[Optional[int], bool]:
    """`(signal number or None, checkpoint due by time)`."""
    due = bool(self.seconds) and time.monotonic() - self.last_save >= self.seconds
    received = _stop.received
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(
          np.array([received or 0, due], np.int32))
      signals = [int(x) for x in flags[:, 0] if x]
      received, due = (signals[0] if signals else None), bool(flags[0, 1])
    return received, due

  def saved(self) -> None:
    self.last_save = time.monotonic()


def _train_steps(par, phases, state, start, *, optimizer, train_iter,
                 num_steps, eval_fn, eval_every, log_every, checkpoint_every,
                 checkpoint_every_seconds, learning_rate_fn, checkpointer,
                 writer, bar, last_good, window):
  """Steps `start + 1 .. num_steps`; returns the final state on the host.

  A train record is written every `log_every` steps and at every scheduled
  checkpoint; at a checkpointed step the train record and the evaluation are
  written before the checkpoint, so a checkpoint of step S has all records of
  steps <= S in `metrics.jsonl` (what a resume keeps) and none of a later
  step. A checkpoint between two scheduled ones (a signal, the clock) leaves
  the logging window open and saves it with the state (`window`: what the
  resumed run starts from). The final checkpoint is written before the final
  evaluation.
  """
  compiled = {}

  def update(step, state, batch):
    index = next((i for i, (last, _) in enumerate(phases) if step <= last),
                 len(phases) - 1)
    if index not in compiled:
      compiled[index] = par.compile(make_update(phases[index][1], optimizer,
                                                par.axis_name))
    return compiled[index](state, batch)

  def log(step, split, metrics):
    bar.show(writer.write(step, split, metrics))

  def evaluate(step, device_state):
    host = par.get(device_state)
    log(step, 'eval', eval_fn(host.params, host.model_state))

  def save(step, device_state):
    checkpointer.save(step, par.get(device_state), train_iter.get_state(),
                      extra=_window_to_json(window))
    boundary.saved()

  def stop(signum, step):
    name = signal.Signals(signum).name
    logging.warning('%s received: stopping at step %d with a checkpoint.',
                    name, step)
    raise Preempted(name, step, checkpointer.directory)

  # The loop checks each step's loss one step late, so that checking never
  # stalls the device; a non-finite step is never checkpointed.
  pending = None  # (step, metrics) of the last dispatched step
  check = functools.partial(_check_and_log, par=par, log=log, window=window,
                            log_every=log_every,
                            learning_rate_fn=learning_rate_fn)
  boundary = _Boundary(checkpoint_every_seconds)
  try:
    for step in range(start + 1, num_steps + 1):
      # The data position after this batch is what a checkpoint at `step` saves.
      batch = par.put_batch(next(train_iter))
      state, step_metrics = update(step, state, batch)
      if pending is not None:
        check(pending)
      pending = (step, step_metrics)
      bar.advance()
      if step == num_steps:
        break
      scheduled = checkpoint_every and step % checkpoint_every == 0
      signum, due = boundary.poll()
      if scheduled:
        # A train record closes at every scheduled checkpoint, so that the
        # records of a resumed run average the same steps as an
        # uninterrupted run's.
        check(pending, force=True)
        pending = None
      elif signum or due:
        check(pending)  # the window stays open: the checkpoint carries it
        pending = None
      if eval_fn is not None and eval_every and step % eval_every == 0:
        evaluate(step, state)
      if scheduled or signum or due:
        save(step, state)
        last_good = step
      if signum:
        stop(signum, step)
    if pending is not None:
      check(pending, force=True)
    if num_steps > start:
      save(num_steps, state)
    if eval_fn is not None:
      signum, _ = boundary.poll()
      if signum:
        stop(signum, num_steps)
      evaluate(num_steps, state)
  except NonFiniteLossError as error:
    kept = ('no checkpoint was written yet, so running it again begins at '
            'step 0'
            if last_good is None else
            f'the last good checkpoint (step {last_good}) is kept in '
            f'{checkpointer.directory}')
    raise NonFiniteLossError(f'{error} The run stopped; {kept}.') from None
  return par.get(state)


def _check_and_log(pending, *, par, log, window, log_every, learning_rate_fn,
                   force=False):
  step, device_metrics = pending
  host = par.get(device_metrics)
  if not _is_finite(host):
    raise NonFiniteLossError(
        f'step {step} produced a non-finite loss ({float(host["loss"])}) '
        f'or gradient norm ({float(host["grad_norm"])}).')
  window.append(host)
  if force or (log_every and step % log_every == 0):
    # Each metric is averaged over the steps that report it (a window may
    # span two phases whose grad functions report different metrics).
    names = dict.fromkeys(k for m in window for k in m)
    record = {k: np.mean([m[k] for m in window if k in m]) for k in names}
    if learning_rate_fn is not None:
      record['learning_rate'] = learning_rate_fn(step - 1)
    log(step, 'train', record)
    window.clear()


def evaluate(per_example_fn: Callable[..., Mapping[str, jax.Array]],
             params: hk.Params, model_state: hk.State, batches) -> dict[str, float]:
  """Means of per-example metrics over one pass of an evaluation iterator.

  Args:
    per_example_fn: `(params, model_state, batch) -> {name: [B] array}`,
      ideally jitted once by the caller.
    params, model_state: the model to evaluate.
    batches: an iterable of batches; a `'mask'` entry (bool [B], as in
      `jreg.data` eval mode) marks the real examples of a padded batch.

  Returns:
    `{name: mean over the real examples}`, over all processes' slices.
  """
  totals, count = {}, 0.0
  for batch in batches:
    mask = np.asarray(batch.get('mask', np.ones(len(next(iter(batch.values()))))),
                      np.float64)
    inputs = {k: v for k, v in batch.items() if k != 'mask'}
    values = jax.device_get(per_example_fn(params, model_state, inputs))
    for name, value in values.items():
      totals[name] = totals.get(name, 0.0) + float(np.sum(np.asarray(value) * mask))
    count += float(mask.sum())
  names = sorted(totals)
  if jax.process_count() > 1:
    # Each process evaluated its own slice of every batch: add them up.
    sums = multihost_utils.process_allgather(
        np.array([totals[n] for n in names] + [count], np.float64)).sum(0)
    totals, count = dict(zip(names, sums[:-1])), sums[-1]
  if not count:
    raise ValueError('the evaluation iterator yielded no examples.')
  return {name: float(totals[name] / count) for name in names}
