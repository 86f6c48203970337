"""Multi-host start-up: `jax.distributed.initialize` from flags or the cluster.

Multi-host adds exactly one thing to single-host code: this call, made before
any other JAX call. Each process then feeds its own slice of every global batch
(`jreg.data` iterators read `jax.process_index()` / `jax.process_count()`), and
the `sharded` and `pmap` modes of `jreg.train` run across every device of every
process.
"""
from __future__ import annotations

import os
from typing import Optional

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
    'cluster environment (SLURM, Open MPI, TPU pods, Kubernetes).')

# Environment variables a launcher may set instead of flags (launch/multihost.sh).
_ENV = ('JREG_COORDINATOR_ADDRESS', 'JREG_NUM_PROCESSES', 'JREG_PROCESS_ID')


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               auto: bool = False) -> None:
  """Joins a multi-process JAX run when one is asked for; otherwise does nothing.

  Arguments win over the `JREG_*` environment variables. With `auto`, JAX's own
  cluster detection supplies everything. CPU processes use gloo collectives.

  Raises:
    ValueError: if only some of the three settings are given.
  """
  env = [os.environ.get(name) for name in _ENV]
  coordinator_address = coordinator_address or env[0]
  num_processes = num_processes if num_processes is not None else (
      int(env[1]) if env[1] else None)
  process_id = process_id if process_id is not None else (
      int(env[2]) if env[2] else None)
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not auto and not any(given):
    return
  if not auto and not all(given):
    raise ValueError(
        'a multi-host run needs all of --dist_coordinator_address, '
        '--dist_num_processes and --dist_process_id (or --dist_auto).')
  if not auto and not 0 <= process_id < num_processes:
    raise ValueError(f'--dist_process_id={process_id} must lie in '
                     f'[0, --dist_num_processes={num_processes}).')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  logging.info('process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  """`initialize` with the `--dist_*` flags (for absl entrypoints)."""
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
             _AUTO.value)
