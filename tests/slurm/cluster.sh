#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm`.
#
#   tests/slurm/cluster.sh start    # install (apt-get) if missing, configure, start
#   tests/slurm/cluster.sh status   # exit 0 when the cluster takes jobs
#   tests/slurm/cluster.sh env      # prints `export SLURM_CONF=...` for a shell
#   tests/slurm/cluster.sh stop     # stops the daemons (the state folder stays)
#
# Needs root and Debian's `slurm-wlm` and `munge` (installed with apt-get when
# missing). Everything lives in one state folder, $JREG_SLURM_DIR (default
# ${TMPDIR:-/tmp}/jreg-slurm): a munge key and socket, `slurm.conf`, the
# spool folders, the daemons' logs and PID files. Nothing under /etc is
# changed: SLURM's commands find this cluster through SLURM_CONF
# (`eval "$(tests/slurm/cluster.sh env)"`; tests/conftest.py sets it).
#
# The node is `localhost` (NodeAddr=127.0.0.1) with this machine's CPUs and
# most of its memory; no cgroups are needed (proctrack/linuxproc, task/none),
# so it runs in a container. The daemons run as root and listen on ports
# $JREG_SLURMCTLD_PORT (6817) and $JREG_SLURMD_PORT (6818). `start` on a
# running cluster changes nothing; `stop` cancels the jobs, stops the daemons
# and does nothing on a stopped cluster.
set -euo pipefail

STATE=${JREG_SLURM_DIR:-${TMPDIR:-/tmp}/jreg-slurm}
CONF=$STATE/slurm.conf
CTLD_PORT=${JREG_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${JREG_SLURMD_PORT:-6818}
export SLURM_CONF=$CONF

die() { echo "cluster.sh: $*" >&2; exit 1; }

# PID in file $1 when that process is alive.
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  (( ${#missing[@]} == 0 )) && return
  (( EUID == 0 )) || die "${missing[*]} missing; install them as root."
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc)
  # Leaves 1 GiB (at least a quarter) to the machine.
  mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024); r = m - 1024;
                 if (r < m * 3 / 4) r = int(m * 3 / 4); print r}' /proc/meminfo)
  mkdir -p "$STATE"/{munge,ctld,spool,log}
  chmod 700 "$STATE" "$STATE/munge"
  cat > "$CONF" <<CONF
# Written by tests/slurm/cluster.sh: one node on 127.0.0.1.
ClusterName=jreg-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start_munge() {
  local key=$STATE/munge/munge.key
  if [[ ! -f $key ]]; then
    (umask 077; dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
  fi
  alive "$STATE/munge/munged.pid" && return
  munged --force --key-file="$key" --socket="$STATE/munge/munge.socket" \
      --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
      --seed-file="$STATE/munge/munged.seed"
}

# Waits up to $1 seconds for the node to take jobs.
wait_ready() {
  local deadline=$((SECONDS + $1))
  while (( SECONDS < deadline )); do
    if ready; then return 0; fi
    sleep 1
  done
  return 1
}

ready() {
  alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" || return 1
  local state
  state=$(sinfo -h -n localhost -o %t 2>/dev/null) || return 1
  [[ $state == idle || $state == mix || $state == alloc ]]
}

start() {
  install_packages
  if ready; then echo "SLURM is up (SLURM_CONF=$CONF)"; return; fi
  (( EUID == 0 )) || die "the daemons run as root; run start as root."
  write_config
  start_munge
  if ! alive "$STATE/slurmctld.pid"; then
    slurmctld -f "$CONF"      # forks; -c would forget the queue
  fi
  if ! alive "$STATE/slurmd.pid"; then
    slurmd -f "$CONF" -N localhost
  fi
  if ! wait_ready 60; then
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "the node did not become idle in 60 s; the logs are in $STATE/log."
  fi
  echo "SLURM is up (SLURM_CONF=$CONF)"
}

stop_daemon() {  # $1: PID file, $2: name
  alive "$1" || { rm -f "$1"; return; }
  local pid deadline=$((SECONDS + 15))
  pid=$(cat "$1")
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  rm -f "$1"
  echo "stopped $2"
}

stop() {
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
    # Ends the jobs first, so that slurmd takes their processes with it.
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 40))
    while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && (( SECONDS < deadline )); do
      sleep 1
    done
  fi
  stop_daemon "$STATE/slurmd.pid" slurmd
  stop_daemon "$STATE/slurmctld.pid" slurmctld
  stop_daemon "$STATE/munge/munged.pid" munged
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status)
    if ready; then echo "SLURM is up (SLURM_CONF=$CONF)"; else
      echo "SLURM is not running, state folder $STATE"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
