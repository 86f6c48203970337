#!/usr/bin/env bash
# Multi-host launch on a SLURM cluster: one task per host, JAX reads the
# coordinator, process count and index from SLURM's environment (--dist_auto).
#
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm.sh \
#       experiments.deq_cifar10 --workdir=/shared/runs/mdeq --parallel=sharded \
#       --data_dir=/shared/data
set -euo pipefail
module_name="$1"; shift
srun python -m "$module_name" --dist_auto "$@"
