#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (localhost), for the tests and for trying umtune's
# srun/sbatch path without a cluster: Debian's slurm-wlm and munge, run as root.
#   cluster/local-slurm.sh start   install if missing, write the config, start munged,
#                                  slurmctld and slurmd, wait until the node is idle
#   cluster/local-slurm.sh stop    stop the daemons this script started (pids in $STATE/pids)
# Needs root (apt-get, daemons). The node is named after `hostname` with its real CPU count;
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none need no cgroups.
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/lib/umtune-slurm}
CONF=/etc/slurm/slurm.conf

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "local-slurm: installing slurm-wlm needs root" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
}

configure() {
  local host cpus mem
  host=$(hostname)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p /etc/slurm "$STATE"/{ctld,d} /var/log/slurm /run/munge /var/lib/munge /var/log/munge /etc/munge
  cat > "$CONF" <<CONF
ClusterName=umtune-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
KillWait=10
# A requeued job waits cred_expire seconds before it starts again, so that the revoked credential
# of its previous run has expired (default 120; forcing an earlier start makes slurmd refuse the
# launch: "Job credential revoked"). 10 keeps the requeue tests short.
AuthInfo=cred_expire=10
InactiveLimit=0
MinJobAge=60
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R root:root /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 700 /etc/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
}

start() {
  install
  configure
  # Daemons already running (someone else's) are left alone; the ones started here are recorded.
  : >> "$STATE/pids"
  if ! pgrep -x munged >/dev/null; then munged --force; pgrep -xn munged >> "$STATE/pids"; fi
  if ! pgrep -x slurmctld >/dev/null; then slurmctld; sleep 0.2; cat /run/slurmctld.pid >> "$STATE/pids"; fi
  if ! pgrep -x slurmd >/dev/null; then slurmd; sleep 0.2; cat /run/slurmd.pid >> "$STATE/pids"; fi
  for _ in $(seq 1 60); do
    if timeout 5 sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "local-slurm: node $(hostname) up ($(nproc) CPUs)"
      return 0
    fi
    scontrol update nodename="$(hostname)" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  echo "local-slurm: the node did not come up; see /var/log/slurm/" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  [ -f "$STATE/pids" ] || return 0
  # Newest first: slurmd, slurmctld, then munged.
  tac "$STATE/pids" | while read -r pid; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  # Gone before returning, so that a `start` right after starts fresh daemons.
  for pid in $(cat "$STATE/pids"); do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  rm -f "$STATE/pids"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
