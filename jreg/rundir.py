"""A run's work directory: one writer at a time, and the configuration it ran under.

* `lock(workdir)`: a context manager holding an exclusive lock file
  `workdir/.lock` (created with `O_CREAT | O_EXCL`, holding JSON `{"host",
  "pid", "started", "pid_start", "boot_id", "lease_s", "slurm_job",
  "slurm_job_id", "slurm_restart_count"}`). A second process asking for the
  same workdir gets `WorkdirBusyError` naming the host and PID of the first.
  A lock is stale, and taken over with a warning naming why, when
    - its process, on this host, no longer runs, or its PID now belongs to
      another process (`pid_start`: the start time of `/proc/PID/stat`,
      field 22, differs);
    - it was written by an earlier run of the same SLURM job, on any host
      (`slurm_job`: `SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID` for an array
      task, else `SLURM_JOB_ID`; both survive a requeue onto another node);
    - it comes from another host and its lease ran out: the holder renews the
      file's modification time from a daemon thread every `lease_s / 4`
      seconds, so a lock not renewed for `lease_s` (`$JREG_LOCK_LEASE_S`,
      default 120 s) belongs to a process that is gone (killed with SIGKILL, a
      crashed node);
    - it is empty or unreadable and older than 5 s (its writer died between
      creating and writing it).
  A live holder on another host (renewed within its lease, another SLURM
  job) is refused like one of this host. The lock is re-entrant within one
  process, so an experiment that holds its top-level workdir can call
  `jreg.train.fit` (which locks its own workdir) for its sub-runs, even in the
  same directory. In a multi-process run only process 0 locks.
* `check_config(workdir, config)`: the first start writes `workdir/config.json`;
  a later start under a configuration that differs is refused with
  `ConfigMismatchError` listing the differing keys as dotted paths
  (`optimizer.learning_rate: 0.1 → 0.2`), unless the change is allowed
  explicitly, in which case it is logged, appended to
  `workdir/config_changes.jsonl` and `config.json` is updated.
* `move_aside(workdir)`: moves a finished or abandoned run's files to
  `workdir/previous/<UTC timestamp>/` (nothing is deleted).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time
from typing import Any, Iterator, Mapping, Optional

from absl import logging

from jreg.errors import UserError

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'
CONFIG_CHANGES_FILE = 'config_changes.jsonl'
PREVIOUS_DIR = 'previous'
# A lock of another host that was not renewed for this long is stale.
LEASE_S = 120.0
LEASE_ENV = 'JREG_LOCK_LEASE_S'
# An empty or unreadable lock file older than this is stale (its writer died
# between creating and writing it).
UNREADABLE_GRACE_S = 5.0

_ABSENT = '(absent)'

# Keys that say how often a run saves, not what it computes: a resume may
# change them (or meet a record written before they existed) without
# `allow_change`; the change is logged and recorded in `config_changes.jsonl`.
OPERATIONAL_KEYS = ('checkpoint_minutes',)


class WorkdirError(UserError):
  """The workdir cannot be used: it is a file, or it cannot be written."""


class WorkdirBusyError(UserError):
  """Another process holds the workdir's lock."""


class ConfigMismatchError(UserError):
  """A run is resumed under a configuration that differs from its saved one."""


# Workdirs this process holds: real path -> nesting depth.
_held: dict[str, int] = {}
_held_guard = threading.Lock()
_heartbeats: dict[str, '_Heartbeat'] = {}


def utc_timestamp() -> str:
  """The current UTC time as `YYYYmmddTHHMMSS.ffffffZ` (sortable, path-safe)."""
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')


def ensure_workdir(workdir: str) -> str:
  """Creates `workdir` if needed and checks that it is a writable directory.

  Returns:
    Its absolute path.

  Raises:
    WorkdirError: it is a file, lies under a file, or cannot be written.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'the workdir {path} is a file, not a directory; choose '
                       'another --workdir.')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    raise WorkdirError(f'the workdir {path} cannot be created '
                       f'({error.strerror}); choose another --workdir.') from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f'the workdir {path} is not writable; choose another '
                       '--workdir or fix its permissions.')
  return path


def _is_primary() -> bool:
  # Imported here: the workdir helpers work without initialising JAX's
  # backends until a lock is actually taken.
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # It exists, under another user.
  return True


def _process_start(pid: int) -> Optional[int]:
  """When process `pid` started, in clock ticks since boot (/proc/PID/stat,
  field 22), or None where /proc cannot tell (not Linux, no such process)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      text = f.read()
    # The command name (field 2) may hold spaces and parentheses.
    return int(text[text.rindex(')') + 2:].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _boot_id() -> Optional[str]:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip() or None
  except OSError:
    return None


def lease_seconds() -> float:
  """The lock's lease: `$JREG_LOCK_LEASE_S`, else `LEASE_S`."""
  text = os.environ.get(LEASE_ENV)
  try:
    lease = float(text) if text else LEASE_S
  except ValueError:
    lease = -1.0
  if not lease > 0:
    raise WorkdirError(f'{LEASE_ENV}={text!r} must be a number of seconds > 0.')
  return lease


def slurm_job() -> Optional[str]:
  """This process's SLURM job, the same across requeues: `ARRAYJOB_TASK` for
  an array task, else `SLURM_JOB_ID`; None outside SLURM."""
  array_job = os.environ.get('SLURM_ARRAY_JOB_ID')
  task = os.environ.get('SLURM_ARRAY_TASK_ID')
  if array_job and task:
    return f'{array_job}_{task}'
  return os.environ.get('SLURM_JOB_ID') or None


def _owner_record() -> dict:
  """What this process writes into a lock it takes."""
  pid = os.getpid()
  return {'host': socket.gethostname(), 'pid': pid,
          'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'),
          'pid_start': _process_start(pid), 'boot_id': _boot_id(),
          'lease_s': lease_seconds(), 'slurm_job': slurm_job(),
          'slurm_job_id': os.environ.get('SLURM_JOB_ID'),
          'slurm_restart_count': os.environ.get('SLURM_RESTART_COUNT')}


def _read_lock(path: str) -> tuple[Optional[bytes], Optional[dict], float]:
  """`(raw bytes, owner dict or None, seconds since last renewed)`; raw is
  None when the file is gone."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    age = time.time() - os.stat(path).st_mtime
  except FileNotFoundError:
    return None, None, 0.0
  try:
    owner = json.loads(raw)
  except ValueError:
    owner = None
  return raw, owner if isinstance(owner, dict) else None, age


def _read_owner(path: str) -> Optional[dict]:
  return _read_lock(path)[1]


def _stale_reason(me: dict, owner: Optional[dict], age: float) -> Optional[str]:
  """Why the lock of `owner` (renewed `age` seconds ago) is stale, or None if
  its holder may still run."""
  if owner is None:
    return (f'an empty or unreadable lock file, {age:.0f} s old'
            if age > UNREADABLE_GRACE_S else None)
  pid = owner.get('pid')
  if not isinstance(pid, int):
    return (f'a lock file without a process, {age:.0f} s old'
            if age > UNREADABLE_GRACE_S else None)
  same_host = owner.get('host') == me['host'] and (
      owner.get('boot_id') in (None, me['boot_id']))
  if same_host:
    if pid == me['pid'] and owner.get('pid_start') in (None, me['pid_start']):
      return None  # This process (another thread's lock): never taken over.
    if not _pid_alive(pid):
      return f'process {pid} on host {owner.get("host")}, which no longer runs'
    start = _process_start(pid)
    if owner.get('pid_start') is not None and start is not None and (
        start != owner['pid_start']):
      return (f'process {pid} on host {owner.get("host")}, which no longer '
              'runs (its PID now belongs to another process)')
    return None  # A live process of this host.
  if me['slurm_job'] and owner.get('slurm_job') == me['slurm_job']:
    return (f'process {pid} on host {owner.get("host")}, an earlier run of this '
            f'SLURM job {me["slurm_job"]} (requeued)')
  lease = owner.get('lease_s')
  if isinstance(lease, (int, float)) and age > lease:
    return (f'process {pid} on host {owner.get("host")}, whose lease was last '
            f'renewed {age:.0f} s ago (lease {lease:g} s)')
  return None


def _busy_error(path: str, owner: Optional[dict]) -> WorkdirBusyError:
  workdir = os.path.dirname(path)
  if owner is None:
    return WorkdirBusyError(
        f'the workdir {workdir} is locked by another run (its lock file {path} '
        'cannot be read); wait for that run to end, or delete the lock file if '
        'no run uses this workdir.')
  job = f', SLURM job {owner["slurm_job"]}' if owner.get('slurm_job') else ''
  return WorkdirBusyError(
      f'the workdir {workdir} is in use by process {owner.get("pid")} on host '
      f'{owner.get("host")} (running since {owner.get("started")}{job}); wait '
      f'for it to end or choose another workdir (delete {path} only if that '
      'process is gone).')


def _acquire(path: str) -> None:
  """Creates the lock file at `path`, taking over a stale one."""
  me = _owner_record()
  for _ in range(5):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      raw, owner, age = _read_lock(path)
      if raw is None:
        continue  # Released meanwhile: try again.
      if owner is None and age <= UNREADABLE_GRACE_S:
        # Possibly being written by its creator right now: look again.
        threading.Event().wait(0.05)
        raw, owner, age = _read_lock(path)
        if raw is None:
          continue
      reason = _stale_reason(me, owner, age)
      if reason is None:
        raise _busy_error(path, owner) from None
      _take_over(path, raw, reason)
      continue
    except OSError as error:
      raise WorkdirError(f'the lock file {path} cannot be created '
                         f'({error.strerror}); choose another --workdir.') from None
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return
  raise _busy_error(path, _read_owner(path))


def _take_over(path: str, raw: bytes, reason: str) -> None:
  """Removes a stale lock, unless another process replaced it meanwhile."""
  aside = f'{path}.stale.{os.getpid()}'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # Someone else removed it: try to create ours.
  try:
    with open(aside, 'rb') as f:
      unchanged = f.read() == raw
  except OSError:
    unchanged = False
  if unchanged:
    os.remove(aside)
    logging.warning('took over the lock %s of %s.', path, reason)
    return
  # A live lock was created between our read and the rename: put it back.
  try:
    os.link(aside, path)
  except FileExistsError:
    pass
  os.remove(aside)


def _mine(owner: Optional[dict]) -> bool:
  return (owner is not None and owner.get('pid') == os.getpid() and
          owner.get('host') == socket.gethostname())


def _release(path: str) -> None:
  if _mine(_read_owner(path)):
    os.remove(path)
  else:
    logging.warning('the lock %s no longer belongs to this process; left it.',
                    path)


class _Heartbeat:
  """Renews a held lock's lease (its modification time) from a daemon thread,
  every quarter of the lease, while the lock is held."""

  def __init__(self, path: str, lease: float):
    self._path = path
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(lease / 4,),
                                    name='jreg-lock-heartbeat', daemon=True)
    self._thread.start()

  def _run(self, interval: float) -> None:
    while not self._stop.wait(interval):
      try:
        if _mine(_read_owner(self._path)):
          os.utime(self._path)
      except OSError:
        pass  # A transient file-system error: the next beat tries again.

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[str]:
  """Holds the exclusive lock of `workdir` (created if needed) for this process.

  Re-entrant within a process; a no-op on processes other than process 0 of a
  multi-process run. Call it after `jax.distributed.initialize` (it asks JAX
  for the process index). While it is held, a daemon thread renews its lease.

  Yields:
    The workdir's absolute path.

  Raises:
    WorkdirBusyError: another live process holds it; the sentence names it.
    WorkdirError: the workdir is a file or cannot be written.
  """
  path = ensure_workdir(workdir)
  if not _is_primary():
    yield path
    return
  key = os.path.realpath(path)
  lock_path = os.path.join(path, LOCK_FILE)
  with _held_guard:
    if key in _held:
      _held[key] += 1
    else:
      _acquire(lock_path)
      _held[key] = 1
      _heartbeats[key] = _Heartbeat(lock_path, lease_seconds())
  try:
    yield path
  finally:
    with _held_guard:
      _held[key] -= 1
      if not _held[key]:
        del _held[key]
        _heartbeats.pop(key).stop()
        _release(lock_path)


def is_locked_by_me(workdir: str) -> bool:
  """Whether this process holds `workdir`'s lock."""
  return os.path.realpath(os.path.abspath(workdir)) in _held


# --------------------------------------------------------------------------
# Configuration record.


def _jsonable(config: Mapping[str, Any]) -> dict:
  """`config` as plain JSON values (tuples become lists, keys strings)."""
  try:
    return json.loads(json.dumps(config, sort_keys=True))
  except (TypeError, ValueError) as error:
    raise TypeError(f'the run configuration must hold JSON values only: {error}'
                    ) from None


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested mappings -> `{'dotted.path': value}` (lists are values)."""
  flat = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def config_diff(old: Mapping[str, Any],
                new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{dotted key: (old value, new value)}` of the keys whose values differ.

  A key present on one side only has the value `'(absent)'` on the other.
  Values are compared as JSON (a tuple equals the list of its items).
  """
  old_flat, new_flat = flatten(_jsonable(old)), flatten(_jsonable(new))
  diff = {}
  for key in sorted(set(old_flat) | set(new_flat)):
    before, after = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
    if before != after:
      diff[key] = (before, after)
  return diff


def describe_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
  """`'a.b: 1 → 2, c: x → (absent)'`."""
  def show(value):
    return value if value == _ABSENT else json.dumps(value)
  return ', '.join(f'{key}: {show(a)} → {show(b)}' for key, (a, b) in diff.items())


def _write_json_atomic(path: str, value: Any) -> None:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def read_config(workdir: str) -> Optional[dict]:
  """The configuration saved in `workdir/config.json`, or None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as error:
    raise WorkdirError(f'{path} is not valid JSON ({error}); move it away to '
                       'start the run afresh.') from None


# Records checked with `defer=True` and not yet written: absolute workdir ->
# (config, accepted differences).
_pending_configs: dict[str, tuple[dict, dict]] = {}


def check_config(workdir: str, config: Mapping[str, Any],
                 allow_change: bool = False, write: Optional[bool] = None,
                 defer: bool = False) -> dict:
  """Records `config` in `workdir/config.json`, or checks it against the record.

  Args:
    workdir: the run's directory (created if needed).
    config: a JSON-able mapping (e.g. `ConfigDict.to_dict()`).
    allow_change: accept a configuration that differs from the saved one: the
      differences are logged, appended to `config_changes.jsonl` (one JSON line
      `{"time", "changes": {key: [old, new]}}`), and `config.json` is updated.
    write: whether this process writes files (default: process 0 only).
    defer: check now but write `config.json` (and the `config_changes.jsonl`
      line) only when the run really starts: at its first checkpoint in
      `workdir` or below (`jreg.checkpoint.Checkpointer.save`), or at
      `record_config`. A run refused before that (its data not found, a
      checkpoint of another model) leaves the record as it was, so the same
      command, corrected, is not refused as a change of configuration.

  Returns:
    `{dotted key: (old, new)}` of the accepted differences (empty if none).

  Raises:
    ConfigMismatchError: the saved configuration differs and `allow_change`
      is False; the sentence lists every differing key, old → new.
  """
  if write is None:
    write = _is_primary()
  path = ensure_workdir(workdir) if write else os.path.abspath(workdir)
  new = _jsonable(config)
  pending = _pending_configs.get(path)
  if pending is not None and pending[0] == new:
    return dict(pending[1])  # checked already; recorded when the run starts
  # Inside a workdir whose record waits for the run to start, so does this one.
  defer = defer or any((path + os.sep).startswith(p.rstrip(os.sep) + os.sep)
                       for p in _pending_configs)
  saved = read_config(path)
  if saved is None:
    if write:
      _record(path, new, {}, defer)
    return {}
  diff = config_diff(saved, new)
  if not diff:
    _pending_configs.pop(path, None)
    return {}
  described = describe_diff(diff)
  if not allow_change and set(diff) <= set(OPERATIONAL_KEYS):
    # How often the run saves, not what it computes: accepted, and recorded.
    logging.info('resuming %s with %s', path, described)
    if write:
      _record(path, new, diff, defer)
    return diff
  if not allow_change:
    diff = {k: v for k, v in diff.items() if k not in OPERATIONAL_KEYS}
    described = describe_diff(diff)
    raise ConfigMismatchError(
        f'the run in {path} was started with another configuration '
        f'({len(diff)} key{"s differ" if len(diff) > 1 else " differs"}: '
        f'{described}); '
        'resume it with the saved configuration (config.json), start afresh '
        'in another workdir (`--workdir` on the command line) or after moving '
        'this one aside (`restart=True` in Python), or accept the change '
        'explicitly (`--allow_config_change` on the command line, '
        '`allow_config_change=True` in Python).')
  logging.warning('resuming %s under a changed configuration: %s', path, described)
  if write:
    _record(path, new, diff, defer)
  return diff


def _record(path: str, config: dict, diff: dict, defer: bool) -> None:
  if defer:
    _pending_configs[path] = (config, diff)
    return
  _pending_configs.pop(path, None)
  if diff:
    with open(os.path.join(path, CONFIG_CHANGES_FILE), 'a') as f:
      f.write(json.dumps({'time': utc_timestamp(),
                          'changes': {k: list(v) for k, v in diff.items()}}) + '\n')
  _write_json_atomic(os.path.join(path, CONFIG_FILE), config)


def _related(path: str, other: str) -> bool:
  """Whether one of the two folders holds the other (or they are the same)."""
  path, other = path.rstrip(os.sep) + os.sep, other.rstrip(os.sep) + os.sep
  return path.startswith(other) or other.startswith(path)


def record_config(directory: str) -> None:
  """Writes the deferred `config.json` of `directory`, of every workdir that
  holds it and of every workdir inside it (`check_config(..., defer=True)`);
  nothing if none waits."""
  here = os.path.abspath(directory)
  for path in sorted(p for p in _pending_configs if _related(p, here)):
    config, diff = _pending_configs.pop(path)
    _record(path, config, diff, defer=False)


def forget_config(workdir: str) -> None:
  """Drops the deferred records of `workdir` and of the workdirs inside it
  (its run was refused before it started)."""
  here = os.path.abspath(workdir)
  for path in [p for p in _pending_configs if _related(p, here)]:
    del _pending_configs[path]


# --------------------------------------------------------------------------
# Starting afresh.


def move_aside(workdir: str, keep: tuple[str, ...] = ()) -> Optional[str]:
  """Moves every file of `workdir` into `workdir/previous/<UTC timestamp>/`.

  The lock file, the `previous/` folder and the names in `keep` stay.

  Returns:
    The folder the files went to, or None if there was nothing to move.
  """
  path = os.path.abspath(workdir)
  if not os.path.isdir(path):
    return None
  names = [n for n in sorted(os.listdir(path))
           if n not in (LOCK_FILE, PREVIOUS_DIR) + tuple(keep)]
  if not names:
    return None
  target = os.path.join(path, PREVIOUS_DIR, utc_timestamp())
  os.makedirs(target)
  for name in names:
    try:
      os.rename(os.path.join(path, name), os.path.join(target, name))
    except OSError as error:
      if error.errno != errno.ENOENT:
        raise
  return target
