"""Starts an experiment as N processes on this machine (a multi-host rehearsal).

Each process gets `--dist_coordinator_address=localhost:PORT
--dist_num_processes=N --dist_process_id=i` and `--xla_force_host_platform_
device_count` CPU devices; CPU collectives run over gloo. On a real cluster,
start one process per host with the same flags, or use `--dist_slurm` under
SLURM (launch/slurm.sh) and `--dist_auto` on a Cloud TPU pod.

    python -m launch.multihost_local --num_processes=2 --devices_per_process=2 \
        -- experiments.synthetic_mlp --workdir=runs/mh --config.parallel=sharded
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from absl import app
from absl import flags

_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 2, 'Processes to start.')
_DEVICES = flags.DEFINE_integer('devices_per_process', 2, 'CPU devices each.')


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give the experiment module and its flags after --.')
  if _NUM_PROCESSES.value < 1 or _DEVICES.value < 1:
    raise app.UsageError('--num_processes and --devices_per_process must be >= 1.')
  module, *args = argv[1:]
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={_DEVICES.value}')
  procs = [subprocess.Popen(
      [sys.executable, '-m', module, *args,
       f'--dist_coordinator_address=localhost:{port}',
       f'--dist_num_processes={_NUM_PROCESSES.value}', f'--dist_process_id={i}'],
      env=env) for i in range(_NUM_PROCESSES.value)]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f'process exit codes: {codes}')


if __name__ == '__main__':
  app.run(main)
