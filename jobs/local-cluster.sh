#!/usr/bin/env bash
# A real single-node Slurm cluster (munge + MariaDB + slurmdbd + slurmctld + slurmd) for trying
# the icehpc jobs on a laptop or workstation, and for the tests marked `slurm`.
#
#   jobs/local-cluster.sh start    # write configs, start the daemons (idempotent), wait until idle
#   jobs/local-cluster.sh status   # exit 0 when sinfo and sacct answer
#   jobs/local-cluster.sh stop     # stop, by PID, every daemon this script started
#
# Needs root and Debian's packages `slurm-wlm slurmdbd munge mariadb-server` (the Makefile installs
# them). Facts this script encodes (found on containers without systemd or working cgroups):
# proctrack/linuxproc + task/none; batch_sched_delay=0 cuts job latency to ~1 s; submitit needs a
# working `sacct` (slurmdbd + MariaDB) or a dead job hangs job.result(); slurmdbd.conf must be 0600;
# the slurmd spool folder must exist before slurmd starts; munge's socket folder must be
# world-executable. Open MPI jobs start with `srun --mpi=pmix`.
set -euo pipefail

# State (pid files, spool, logs) lives in a root-owned 0700 folder under /var/lib, which only root can
# create: a predictable /var/tmp path could be pre-created (or linked) by another user.
STATE=${ICEHPC_SLURM_STATE:-/var/lib/icehpc-slurm}
CONF_DIR=/etc/slurm
NODE=$(hostname -s)
CPUS=${ICEHPC_SLURM_CPUS:-8}   # declared CPUs (> real cores is fine: config_overrides) so 2-task jobs can overlap
MARK="# written by icehpc jobs/local-cluster.sh"

log() { echo "[local-cluster] $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (it starts munged, mariadbd, slurmdbd, slurmctld and slurmd)."
    log "On a real cluster you need none of this: load your site's Slurm and MPI modules instead."
    exit 1
  fi
  for b in munged mariadbd slurmdbd slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { log "missing $b: apt-get install slurm-wlm slurmdbd munge mariadb-server"; exit 1; }
  done
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

own_state() {  # create $STATE 0700 as root, or refuse one that someone else made or linked
  if [ ! -e "$STATE" ] && [ ! -L "$STATE" ]; then
    (umask 077; mkdir -p "$STATE")
  fi
  if [ -L "$STATE" ] || [ ! -d "$STATE" ] || [ "$(stat -c %u "$STATE")" != 0 ]; then
    log "refusing state folder $STATE: not a root-owned folder (a link, or created by another user);"
    log "remove it or set ICEHPC_SLURM_STATE to a folder of your own"
    exit 1
  fi
  chmod 0700 "$STATE"
}

write_configs() {
  own_state
  mkdir -p "$STATE"/{ctld,spool,log} "$CONF_DIR"
  if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
    log "$CONF_DIR/slurm.conf exists and was not written by icehpc: refusing to overwrite it"; exit 1
  fi
  cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=icehpc
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=icehpc_slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq "$((t * 4))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  log "timed out waiting for $what"; return 1
}

start_munge() {
  if alive "$STATE/munged.pid"; then return; fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged already running (not ours)"; return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge   # clients (every user's srun) must reach the socket
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  chown root:root /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
  munged --force --pid-file="$STATE/munged.pid" --num-threads=4
  wait_for 10 munged bash -c 'munge -n | unmunge'
}

start_mariadb() {
  if alive "$STATE/mariadbd.pid"; then return; fi
  # mariadbd drops to user mysql: its socket, pid and log files go to /run/mysqld, which it owns
  # ($STATE is 0700 root, out of its reach)
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    mysql_install_db --user=mysql --datadir=/var/lib/mysql >"$STATE/log/mysql_install_db.log" 2>&1
  fi
  setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mariadbd.pid --bind-address=127.0.0.1 \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --log-error=/run/mysqld/mariadb.err </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb mariadb -uroot -e 'select 1'
  ln -sf /run/mysqld/mariadbd.pid "$STATE/mariadbd.pid"
}

start_daemon() {  # start_daemon NAME PIDFILE CHECK-COMMAND...
  local name=$1 pid=$2; shift 2
  if alive "$pid"; then return; fi
  "$name" >>"$STATE/log/$name.start.log" 2>&1
  wait_for 60 "$name" "$@"
}

start() {
  need_root
  write_configs
  start_munge
  start_mariadb
  start_daemon slurmdbd "$STATE/slurmdbd.pid" bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
  start_daemon slurmctld "$STATE/slurmctld.pid" scontrol ping
  sacctmgr -i add cluster icehpc >/dev/null 2>&1 || true
  # slurmd refuses to start without its spool folder; -b resets the node's boot time
  mkdir -p "$STATE/spool"
  start_daemon slurmd "$STATE/slurmd.pid" bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
  scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  wait_for 60 "node idle" bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
  wait_for 60 sacct sacct -n -X -S now-1minute
  log "up: partition debug on $NODE ($CPUS CPUs); state and logs in $STATE"
}

stop() {
  local pidfile pid
  for d in slurmd slurmctld slurmdbd mariadbd munged; do
    pidfile="$STATE/$d.pid"
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
      log "stopped $d (pid $pid)"
    fi
    rm -f "$pidfile"
  done
}

status() {
  sinfo -h -o '%P %a %D %t' && sacct -n -X -S now-1minute >/dev/null && echo "sacct ok"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
