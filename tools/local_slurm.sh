#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests and CI (root only; Debian's slurm-wlm 22.05):
#   munge -> MariaDB -> slurmdbd (accounting, so dead jobs are reported) -> slurmctld -> slurmd.
#
#   tools/local_slurm.sh install   apt-get the packages (slurm-wlm munge slurmdbd mariadb-server)
#   tools/local_slurm.sh start     write the configs from `hostname -s`, start the daemons, wait for an idle node;
#                                  a no-op when the daemons it recorded still run; records of processes that are
#                                  gone (a rebooted or restored machine) and their stale pid files are cleared first
#   tools/local_slurm.sh status    show what runs (by the pids this script recorded) and `sinfo`
#   tools/local_slurm.sh stop      stop exactly the processes this script started, by pid
#
# State, logs and pid files live in $DISCO_SLURM_DIR (default /tmp/disco-slurm). /etc/slurm/slurm.conf and
# slurmdbd.conf are written only if absent or written by this script before (marker line); anything else is refused.
set -euo pipefail

STATE=${DISCO_SLURM_DIR:-/tmp/disco-slurm}
MARK="# written by disco tools/local_slurm.sh"
HOST=$(hostname -s)
CLUSTER=disco

die() { echo "local_slurm: $*" >&2; exit 1; }

write_conf() {  # write_conf PATH MODE (content on stdin); never overwrite a file this script did not write
  local path=$1 mode=$2
  if [[ -e $path ]] && ! grep -qF "$MARK" "$path"; then
    die "$path exists and was not written by this script; move it away or run SLURM yourself"
  fi
  mkdir -p "$(dirname "$path")"
  cat >"$path"
  chmod "$mode" "$path"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out after ${secs}s waiting for $what (logs in $STATE)"
}

record() { echo "$2" >"$STATE/pids/$1"; }

DAEMONS="slurmd slurmctld slurmdbd mysqld mysqld_safe munged"  # stop order

is_running() {  # is_running NAME PID: the pid is alive AND is that program (a pid reused by another is not)
  local comm state
  comm=$(cat "/proc/$2/comm" 2>/dev/null) || return 1
  state=$(awk '{print $3}' "/proc/$2/stat" 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]] || return 1  # dead, not yet reaped (a container's init may never reap)
  case $1 in
    mysqld) [[ $comm == mysqld || $comm == mariadbd ]] ;;
    *) [[ $comm == "$1" ]] ;;
  esac
}

pidfile_running() {  # pidfile_running NAME FILE: FILE names a live NAME
  [[ -s $2 ]] && is_running "$1" "$(cat "$2")"
}

clear_stale_records() {  # drop records whose process is gone; echo the names that still run
  local f name live=()
  for f in "$STATE"/pids/*; do
    [[ -f $f ]] || continue
    name=$(basename "$f")
    if is_running "$name" "$(cat "$f")"; then live+=("$name")
    else echo "local_slurm: $name (pid $(cat "$f")) is no longer running; record cleared" >&2; rm -f "$f"; fi
  done
  echo "${live[*]}"
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install' (Debian packages)"
  mkdir -p "$STATE"/{pids,run,ctld,spool,log} /run/munge /run/mysqld
  local live; live=$(clear_stale_records)
  if [[ -n $live ]]; then
    if [[ $(wc -w <<<"$live") == $(wc -w <<<"$DAEMONS") ]] && sinfo -h -o %t 2>/dev/null | grep -qx idle; then
      echo "local SLURM already up (see '$0 status')"; return 0
    fi
    echo "local_slurm: only part of it runs ($live); stopping that and starting afresh" >&2
    stop
  fi
  # pid files left by daemons that no longer run would satisfy the waits below before the new daemon writes its own
  pidfile_running munged /run/munge/munged.pid || rm -f /run/munge/munged.pid
  pidfile_running mysqld /run/mysqld/mysqld.pid || rm -f /run/mysqld/mysqld.pid
  rm -f "$STATE"/run/*.pid
  local mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  local cpus=$(nproc)

  # munge: a key owned by munge, mode 400; munged as the munge user
  [[ -s /etc/munge/munge.key ]] || mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  wait_for 10 munged test -s /run/munge/munged.pid
  record munged "$(cat /run/munge/munged.pid)"

  # MariaDB for slurmdbd, root over the local socket
  chown mysql:mysql /run/mysqld
  mysqld_safe --user=mysql --pid-file=/run/mysqld/mysqld.pid >"$STATE/log/mysqld_safe.log" 2>&1 &
  record mysqld_safe $!
  wait_for 60 "MariaDB" mysqladmin ping
  record mysqld "$(cat /run/mysqld/mysqld.pid)"

  write_conf /etc/slurm/slurmdbd.conf 600 <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageUser=root
StorageLoc=disco_slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
  write_conf /etc/slurm/slurm.conf 644 <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# short credential lifetime: a requeued job may start 10 s after it was requeued instead of 120 s
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobRequeue=1
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  slurmdbd
  wait_for 30 slurmdbd test -s "$STATE/run/slurmdbd.pid"
  record slurmdbd "$(cat "$STATE/run/slurmdbd.pid")"
  wait_for 30 "slurmdbd to answer" sacctmgr -n show cluster
  sacctmgr -n show cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  slurmctld -c
  wait_for 30 slurmctld test -s "$STATE/run/slurmctld.pid"
  record slurmctld "$(cat "$STATE/run/slurmctld.pid")"
  slurmd
  wait_for 30 slurmd test -s "$STATE/run/slurmd.pid"
  record slurmd "$(cat "$STATE/run/slurmd.pid")"
  wait_for 60 "an idle node" bash -c "sinfo -h -o %t | grep -qx idle"
  echo "local SLURM up: cluster $CLUSTER, node $HOST ($cpus CPUs, ${mem} MB), partition debug; state in $STATE"
}

stop() {
  [[ -d $STATE/pids ]] || { echo "local SLURM: nothing recorded in $STATE/pids"; return 0; }
  for name in $DAEMONS; do
    local f=$STATE/pids/$name
    [[ -f $f ]] || continue
    local pid; pid=$(cat "$f")
    if is_running "$name" "$pid"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do is_running "$name" "$pid" || break; sleep 0.1; done
      is_running "$name" "$pid" && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  echo "local SLURM stopped"
}

status() {
  [[ -d $STATE/pids ]] || { echo "local SLURM: not started by this script"; return 1; }
  local up=0
  for f in "$STATE"/pids/*; do
    [[ -f $f ]] || continue
    if is_running "$(basename "$f")" "$(cat "$f")"; then echo "$(basename "$f"): running (pid $(cat "$f"))"; up=1
    else echo "$(basename "$f"): not running"; fi
  done
  ((up)) && sinfo
}

case ${1:-} in
  install) DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge slurmdbd mariadb-server ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
