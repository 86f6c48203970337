"""Multi-host start-up: `jax.distributed.initialize` from flags or the cluster.

Multi-host adds exactly one thing to single-host code: this call, made before
any other JAX call. Each process then feeds its own slice of every global batch
(`jreg.data` iterators read `jax.process_index()` / `jax.process_count()`), and
the `sharded` and `pmap` modes of `jreg.train` run across every device of every
process.

Three ways to join a run:

- explicit: `--dist_coordinator_address=HOST:PORT --dist_num_processes=N
  --dist_process_id=I` (or the `JREG_*` environment variables below), as
  `launch/multihost_local.py` does on one machine;
- `--dist_slurm`: from SLURM's environment (`slurm_settings`), for one process
  per GPU (`srun` with `--ntasks-per-node` = GPUs per node, launch/slurm.sh)
  or one process per node;
- `--dist_auto`: `jax.distributed.initialize()` with no arguments, JAX's own
  cluster detection: the form for Cloud TPU pods (and Open MPI, Kubernetes).
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

from absl import flags
from absl import logging
import jax

_COORDINATOR = flags.DEFINE_string(
    'dist_coordinator_address', None,
    'host:port of process 0 for jax.distributed; unset on a single host or '
    'where the cluster environment (SLURM, TPU pods, ...) provides it.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'dist_num_processes', None, 'Number of processes of a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer(
    'dist_process_id', None, 'This process\'s index in a multi-host run.')
_AUTO = flags.DEFINE_bool(
    'dist_auto', False,
    'Call jax.distributed.initialize() with no arguments, letting JAX read the '
    'cluster environment (Cloud TPU pods, Open MPI, Kubernetes).')
_SLURM = flags.DEFINE_bool(
    'dist_slurm', False,
    'Join a multi-process run from SLURM\'s environment: one process per srun '
    'task (SLURM_NTASKS, SLURM_PROCID), coordinator on the first node of the '
    'step, one GPU per process when several tasks share a node.')

# Environment variables a launcher may set instead of flags.
_ENV = ('JREG_COORDINATOR_ADDRESS', 'JREG_NUM_PROCESSES', 'JREG_PROCESS_ID')
# Overrides the coordinator port that `slurm_settings` derives from the job id.
COORDINATOR_PORT_ENV = 'JREG_COORDINATOR_PORT'


def first_host(node_list: str) -> str:
  """The first host of a SLURM host list.

  'node07' -> 'node07'; 'gpu[003-008,011],cpu1' -> 'gpu003';
  'rack[2-3]-n[01-04]' -> 'rack2-n01' (`scontrol show hostnames` order).
  """
  depth, end = 0, len(node_list)
  for index, char in enumerate(node_list):   # the first top-level item
    depth += {'[': 1, ']': -1}.get(char, 0)
    if char == ',' and depth == 0:
      end = index
      break
  item = node_list[:end].strip()
  if not item or depth < 0:
    raise ValueError(f'SLURM host list {node_list!r} is empty or malformed.')
  # Each [a-b,c] group contributes its first value, keeping zero padding.
  host = re.sub(r'\[([^\]]*)\]',
                lambda match: re.split(r'[-,]', match.group(1))[0], item)
  if '[' in host or ']' in host:
    raise ValueError(f'SLURM host list {node_list!r} is malformed.')
  return host


def _tasks_on_this_node(environ: Mapping[str, str]) -> int:
  """Tasks of the job step on this node (SLURM_STEP_TASKS_PER_NODE, ...).

  SLURM writes these lists as '8(x4)' or '8(x2),4': the entry for node
  SLURM_NODEID (0 when unset) is taken.
  """
  for name in ('SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
    text = environ.get(name)
    if not text:
      continue
    counts = []
    for part in text.split(','):
      match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
      if not match:
        raise ValueError(f'{name}={text!r} is not a SLURM tasks-per-node list.')
      counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(environ.get('SLURM_NODEID', 0))
    return counts[min(node, len(counts) - 1)]
  if environ.get('SLURM_NTASKS_PER_NODE'):
    return int(environ['SLURM_NTASKS_PER_NODE'])
  return int(environ['SLURM_NTASKS']) // int(environ.get('SLURM_NNODES', 1))


def slurm_settings(environ: Optional[Mapping[str, str]] = None
                   ) -> dict[str, Any]:
  """`jax.distributed.initialize` arguments for this SLURM task.

  - `num_processes` = SLURM_NTASKS, `process_id` = SLURM_PROCID;
  - `coordinator_address` = the first host of SLURM_STEP_NODELIST (else
    SLURM_JOB_NODELIST), port `$JREG_COORDINATOR_PORT` or, as JAX's own
    SLURM detection, 61440 + SLURM_JOB_ID mod 4096;
  - `local_device_ids`: `[SLURM_LOCALID]` when several tasks share a node and
    each sees all its GPUs (one process per GPU: `--ntasks-per-node=G
    --gpus-per-node=G`); None (every local device) when the task is alone on
    its node, or when SLURM bound one GPU to it (`--gpus-per-task=1`:
    CUDA_VISIBLE_DEVICES lists one device). JAX's own detection always
    takes `[SLURM_LOCALID]`, so one task per node would drive one GPU.

  Raises:
    ValueError: a SLURM variable is missing or malformed (not in a SLURM step).
  """
  environ = os.environ if environ is None else environ
  required = ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  missing = [name for name in required if name not in environ]
  node_list = environ.get('SLURM_STEP_NODELIST') or environ.get(
      'SLURM_JOB_NODELIST')
  if missing or not node_list:
    missing += [] if node_list else ['SLURM_STEP_NODELIST/SLURM_JOB_NODELIST']
    raise ValueError(
        f'--dist_slurm needs SLURM\'s task environment, but {", ".join(missing)} '
        'is not set: start each process with srun inside an sbatch job '
        '(launch/slurm.sh).')
  num_processes = int(environ['SLURM_NTASKS'])
  process_id = int(environ['SLURM_PROCID'])
  local_id = int(environ['SLURM_LOCALID'])
  port = int(environ.get(COORDINATOR_PORT_ENV) or
             65535 - 2**12 + 1 + int(environ['SLURM_JOB_ID']) % 2**12)
  visible = [d for d in environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d]
  if _tasks_on_this_node(environ) <= 1 or len(visible) == 1:
    local_device_ids = None
  else:
    local_device_ids = [local_id]
  return {'coordinator_address': f'{first_host(node_list)}:{port}',
          'num_processes': num_processes, 'process_id': process_id,
          'local_device_ids': local_device_ids}


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               auto: bool = False, slurm: bool = False) -> None:
  """Joins a multi-process JAX run when one is asked for; otherwise does nothing.

  Arguments win over the `JREG_*` environment variables. With `slurm`, the
  settings come from `slurm_settings()`; with `auto`, JAX's own cluster
  detection supplies everything (the TPU-pod form). CPU processes use gloo
  collectives.

  Raises:
    ValueError: if only some of the three explicit settings are given, or
      more than one way is asked for.
  """
  env = [os.environ.get(name) for name in _ENV]
  coordinator_address = coordinator_address or env[0]
  num_processes = num_processes if num_processes is not None else (
      int(env[1]) if env[1] else None)
  process_id = process_id if process_id is not None else (
      int(env[2]) if env[2] else None)
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if auto and slurm:
    raise ValueError('--dist_auto and --dist_slurm are two ways to join a run: '
                     'give one.')
  explicit = not (auto or slurm)
  if explicit and not any(given):
    return
  if explicit and not all(given):
    raise ValueError(
        'a multi-host run needs all of --dist_coordinator_address, '
        '--dist_num_processes and --dist_process_id (or --dist_slurm, or '
        '--dist_auto).')
  if explicit and not 0 <= process_id < num_processes:
    raise ValueError(f'--dist_process_id={process_id} must lie in '
                     f'[0, --dist_num_processes={num_processes}).')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if auto:
    jax.distributed.initialize()
  else:
    settings = slurm_settings() if slurm else {
        'coordinator_address': coordinator_address,
        'num_processes': num_processes, 'process_id': process_id,
        'local_device_ids': None}
    # 'deactivate': JAX would otherwise fill local_device_ids=None in from
    # the cluster it detects (SLURM: [SLURM_LOCALID]).
    jax.distributed.initialize(**settings,
                               cluster_detection_method='deactivate')
  logging.info('process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  """`initialize` with the `--dist_*` flags (for absl entrypoints)."""
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
             auto=_AUTO.value, slurm=_SLURM.value)
