#!/usr/bin/env bash
# A one-node Slurm on this machine (loopback only), for tests and CI.
#
#   scripts/slurm-local.sh start    install slurm-wlm + munge where missing, write the config,
#                                   start munged, slurmctld and slurmd in the background
#   scripts/slurm-local.sh stop     cancel this cluster's jobs, stop the daemons by PID
#   scripts/slurm-local.sh status   daemons, PIDs and `sinfo`; exit 1 when not running
#   scripts/slurm-local.sh env      print `export SLURM_CONF=...` (eval it before sbatch/snakemake)
#
# Everything lives under $ROPELENS_SLURM_DIR (default /tmp/ropelens-slurm): slurm.conf,
# cgroup.conf, munge key + socket, state, spool, logs and pid files. Nothing in /etc is changed.
# Clients find the config through SLURM_CONF (see `env`) or, where SLURM_CONF is dropped (the
# jobstep executor strips SLURM_* before its nested srun), through a link at
# /run/slurm/conf/slurm.conf, a place Slurm clients search; `stop` removes the link.
# No systemd and no cgroups: proctrack/linuxproc + task/none; memory limits are enforced by
# jobacct_gather (OverMemoryKill), so a job that exceeds its --mem is killed as on a real cluster.
#
# Environment: ROPELENS_SLURM_DIR, ROPELENS_SLURM_PORT (slurmctld port, default 6817; slurmd
# uses the next one), ROPELENS_SLURM_MIN_JOB_AGE (seconds finished jobs stay visible to squeue,
# default 300; keep >= 120 or snakemake-executor-plugin-slurm switches back to sacct).
set -euo pipefail

DIR=${ROPELENS_SLURM_DIR:-/tmp/ropelens-slurm}
PORT=${ROPELENS_SLURM_PORT:-6817}
MIN_JOB_AGE=${ROPELENS_SLURM_MIN_JOB_AGE:-300}
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
RUN_LINK=/run/slurm/conf/slurm.conf
PIDS=(munged slurmctld slurmd)

die() { echo "slurm-local: $*" >&2; exit 1; }
say() { echo "slurm-local: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
  else die "need root (or passwordless sudo) to run: $*"
  fi
}

install_missing() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get; install Slurm + munge"
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >/dev/null
  # the packages must not start their own services (no config yet; we start ours): a temporary
  # policy-rc.d tells invoke-rc.d so, unless the machine has one already (containers often do)
  local policy=/usr/sbin/policy-rc.d ours=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    ours=1
  fi
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
    [ -z "$ours" ] || as_root rm -f "$policy"
    die "apt-get install ${missing[*]} failed"
  }
  [ -z "$ours" ] || as_root rm -f "$policy"
}

pid_of() {  # prints the PID of a running daemon, or nothing
  local f=$DIR/run/$1.pid pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds; 1 on timeout
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

write_config() {
  local me host cpus mem sockets cores threads
  me=$(id -un)
  host=$(hostname -s)
  # the node's real CPUs and memory (slurmd -C), less 512 MB for the daemons and the OS
  read -r cpus sockets cores threads mem < <(slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
    $1=="CPUs"{c=$2} $1=="SocketsPerBoard"{s=$2} $1=="CoresPerSocket"{k=$2}
    $1=="ThreadsPerCore"{t=$2} $1=="RealMemory"{m=$2} END{print c, s, k, t, m}')
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read the node's CPUs/memory from 'slurmd -C'"
  mem=$((mem > 1024 ? mem - 512 : mem))
  cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: one node on loopback, no accounting, no cgroups.
ClusterName=ropelens
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$me
SlurmdUser=$me
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PluginDir=/usr/lib/x86_64-linux-gnu/slurm-wlm
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
# no systemd, no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# memory: a job without --mem gets DefMemPerCPU (not the whole node); OverMemoryKill kills a
# step whose RSS exceeds its request (polled every second), as a cgroup would
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
# no slurmdbd: sacct fails; squeue needs finished jobs to stay visible (MinJobAge)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=$MIN_JOB_AGE
# schedule at once (default batch_sched_delay makes every job wait 2-3 s)
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MessageTimeout=30
InactiveLimit=0
KillWait=5
SlurmdTimeout=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  [ -d /usr/lib/x86_64-linux-gnu/slurm-wlm ] || sed -i '/^PluginDir=/d' "$CONF"
  cat >"$DIR/etc/cgroup.conf" <<EOF
# Written by scripts/slurm-local.sh. Jobs use no cgroups (proctrack/linuxproc, task/none), but
# slurmd still initialises a cgroup plugin; without systemd it must not ask systemd for a scope.
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
}

start() {
  install_missing
  if [ -n "$(pid_of slurmctld)" ] && [ -n "$(pid_of slurmd)" ] && [ -n "$(pid_of munged)" ]; then
    say "already running (SLURM_CONF=$CONF)"
    return 0
  fi
  stop_daemons quiet
  [ ! -e /etc/slurm/slurm.conf ] ||
    die "/etc/slurm/slurm.conf exists: this machine has a Slurm configured; use it instead"
  if [ -e "$RUN_LINK" ] && [ "$(readlink "$RUN_LINK")" != "$CONF" ]; then
    die "$RUN_LINK exists and is not ours: a configless Slurm runs here; use it instead"
  fi
  mkdir -p "$DIR"/{etc,munge,state,spool,run,log}
  chmod 755 "$DIR/munge"  # clients need to reach the socket; the key stays 0600
  write_config
  export SLURM_CONF=$CONF
  as_root mkdir -p "$(dirname "$RUN_LINK")"
  as_root ln -sfn "$CONF" "$RUN_LINK"

  # munged with its own key and socket
  if [ ! -s "$DIR/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
  fi
  munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" ||
    die "munged did not start; see $DIR/log/munged.log"
  wait_for 10 test -S "$MUNGE_SOCKET" || die "munged socket $MUNGE_SOCKET did not appear"

  slurmctld -c -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  wait_for 20 scontrol ping ||
    die "slurmctld does not answer; see $DIR/log/slurmctld.log"
  slurmd -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
  local host
  host=$(hostname -s)
  if ! wait_for 30 node_idle "$host"; then
    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    wait_for 15 node_idle "$host" ||
      die "node $host is not idle ($(sinfo -h -o %T 2>&1)); see $DIR/log/slurmd.log"
  fi
  say "running: munged $(pid_of munged), slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd)"
  say "export SLURM_CONF=$CONF"
}

node_idle() { [ "$(sinfo -h -n "$1" -o %T 2>/dev/null)" = idle ]; }

stop_daemons() {
  local name pid deadline
  for name in slurmd slurmctld munged; do
    pid=$(pid_of "$name")
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/run/$name.pid"
    [ "${1:-}" = quiet ] || say "stopped $name ($pid)"
  done
}

stop() {
  if [ -n "$(pid_of slurmctld)" ]; then
    # jobs first, so no slurmstepd outlives the cluster
    local jobs
    jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086  # one argument per job id
      SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
      sleep 1
    fi
  fi
  stop_daemons
  if [ -L "$RUN_LINK" ] && [ "$(readlink "$RUN_LINK")" = "$CONF" ]; then
    as_root rm -f "$RUN_LINK"
  fi
}

status() {
  local ok=0 name pid
  for name in "${PIDS[@]}"; do
    pid=$(pid_of "$name")
    if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; ok=1; fi
  done
  echo "SLURM_CONF=$CONF"
  if [ $ok = 0 ]; then SLURM_CONF=$CONF sinfo || ok=1; fi
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 start|stop|status|env" ;;
esac
