#!/bin/bash
# One multi-node data-parallel run on SLURM: one process per GPU.
#
#   sbatch launch/slurm.sh experiments.deq_cifar10 --workdir=runs/mdeq \
#       --config=experiments/configs/deq_cifar10.py:paper
#   sbatch --nodes=2 --partition=gpu launch/slurm.sh experiments.NAME ...
#
# Submit from the repository root (with the environment that has jreg). Each
# of the nodes x 8 tasks is one JAX process driving one GPU: --dist_slurm
# makes jreg.distributed call jax.distributed.initialize with
# num_processes=SLURM_NTASKS, process_id=SLURM_PROCID, the first node of the
# step as coordinator and local_device_ids=[SLURM_LOCALID]. Options given to
# sbatch on the command line override the defaults below; for nodes with 4
# GPUs use --ntasks-per-node=4 --gpus-per-node=4. A run that is requeued
# (pre-emption, node failure, or the USR1 signal 5 minutes before the time
# limit) resumes from the checkpoints in its --workdir.
#
# Pre-emption and the time limit: --signal=B:USR1@300 signals this batch
# shell only, so it forwards USR1 to the srun step; every process of the run
# then saves a checkpoint at the next step boundary, releases the workdir and
# exits with status 75 (EX_TEMPFAIL), on which this script runs
# `scontrol requeue $SLURM_JOB_ID` and the job comes back. SIGTERM (a
# pre-emption, `scontrol requeue`, `scancel`) reaches the processes directly
# and is handled the same way; SLURM then requeues a pre-empted or requeued
# job by itself and this script does not (a `scancel` stays cancelled).
#
# On a Cloud TPU pod there is no SLURM: run the same command on every host
# with --dist_auto instead (jax.distributed.initialize() with no arguments).
#SBATCH --job-name=jreg
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
# SLURM opens the log before the script runs (a missing folder fails the job
# at once): logs/ is part of the repository, so submit from its root.
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -uo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: sbatch launch/slurm.sh MODULE [FLAGS...]" >&2
  exit 2
fi
module_name="$1"; shift
child=
pending=
terminated=0
forward() {  # forward() SIGNAL: pass a signal of this shell on to the step
  echo "jreg: SIG$1 received: the run saves a checkpoint and stops"
  if [[ -n "$child" ]]; then kill -"$1" "$child" 2>/dev/null; else pending=$1; fi
}
trap 'forward USR1' USR1
trap 'terminated=1; forward TERM' TERM
# Every task sees all the GPUs of its node (no per-task GPU binding), and
# picks its own with local_device_ids=[SLURM_LOCALID].
srun --kill-on-bad-exit=1 --cpu-bind=cores \
    python -m "$module_name" --dist_slurm "$@" &
child=$!
# A signal that came before $child was known goes to the run now.
if [[ -n "$pending" ]]; then kill -"$pending" "$child" 2>/dev/null; fi
while true; do
  wait "$child"
  status=$?
  # A trapped signal interrupts `wait` (status > 128): wait again.
  if (( status > 128 )) && kill -0 "$child" 2>/dev/null; then continue; fi
  break
done
if (( status == 75 && ! terminated )); then
  echo "jreg: the run stopped with a checkpoint: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
