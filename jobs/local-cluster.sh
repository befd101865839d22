#!/usr/bin/env bash
# A real single-node Slurm cluster (munge + MariaDB + slurmdbd + slurmctld + slurmd) for trying
# the icehpc jobs on a laptop or workstation, and for the tests marked `slurm`.
#
#   jobs/local-cluster.sh start    # write configs, start the daemons (idempotent), wait until idle
#   jobs/local-cluster.sh start --nodes 2   # two slurmd "nodes", each in its own network namespace
#   jobs/local-cluster.sh status   # exit 0 when sinfo and sacct answer
#   jobs/local-cluster.sh stop     # stop, by PID, every daemon this script started (and remove the
#                                  # namespaces, links and files that start --nodes N created)
#   jobs/local-cluster.sh node-kill I    # multi-node: SIGKILL everything on node I (a power loss)
#   jobs/local-cluster.sh node-start I   # multi-node: start node I's slurmd again
#
# --nodes N (N >= 2): node I is icehpc-nI, a network namespace with one veth on a bridge
# icehpc-br0 that this script creates on the private subnet $ICEHPC_SLURM_NET.0/24 (default
# 10.213.0): the host side (slurmctld, slurmdbd) is .1, node I is .(10+I). The namespaces have no
# default route, so jobs can reach only the bridge's addresses. Each slurmd runs in its network
# namespace and in private mount and UTS namespaces: /etc/netns/icehpc-nI/hosts is bind-mounted over
# /etc/hosts (the node names resolve inside the nodes) and the hostname is icehpc-nI. The filesystem is
# shared, as on a cluster with a shared home. Everything created is listed in $STATE/created and
# removed by stop, in reverse order.
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
NODES=1                        # set by `start --nodes N`; stop/status read $STATE/nodes
NET=${ICEHPC_SLURM_NET:-10.213.0}   # multi-node: private /24 on a bridge this script creates
BRIDGE=icehpc-br0
NODE_TMP=${STATE}.tmp          # multi-node: per-node scratch (TmpFS), /var/lib is root-only
CTL_ADDR=127.0.0.1             # where slurmctld/slurmdbd are reached (the bridge address when N >= 2)

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
  local node_lines part_nodes i globals=""
  if [ "$NODES" -gt 1 ]; then
    node_lines=""
    for i in $(seq "$NODES"); do
      node_lines+="NodeName=icehpc-n$i NodeHostname=icehpc-n$i NodeAddr=$NET.$((10 + i)) CPUs=$CPUS RealMemory=16000 State=UNKNOWN"$'\n'
    done
    part_nodes="icehpc-n[1-$NODES]"
    # node-local scratch (%n = node name): PMIx puts its per-step client folders there, named by job
    # and step only, so two nodes sharing /tmp would collide ("spmix_appdir_...: File exists")
    globals="TmpFS=$NODE_TMP/%n"$'\n'
  else
    node_lines="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=16000 State=UNKNOWN"$'\n'
    part_nodes=$NODE
  fi
  cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=icehpc
SlurmctldHost=$NODE($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool$SUFFIX
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd$SUFFIX.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd$SUFFIX.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_ADDR
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
${globals}ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
${node_lines}PartitionName=debug Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=$CTL_ADDR
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

# ------------------------------------------------------------------ multi-node: namespaces and links
created() { echo "$*" >>"$STATE/created"; }   # what start made, one line each; stop undoes it in reverse

ns_of() { echo "icehpc-n$1"; }

setup_net() {  # bridge $NET.1/24 + one namespace and veth per node; refuse anything already there
  local i ns
  if [ -s "$STATE/created" ]; then return; fi   # made by an earlier start that is still up
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "link $BRIDGE exists but $STATE/created does not list it: not ours, refusing"; exit 1
  fi
  if ip -o addr show | grep -qF " $NET."; then
    log "addresses in $NET.0/24 are already in use on this machine: set ICEHPC_SLURM_NET to a free private /24"; exit 1
  fi
  for i in $(seq "$NODES"); do
    ns=$(ns_of "$i")
    if ip netns list | grep -qw "$ns" || [ -e "/etc/netns/$ns" ]; then
      log "network namespace $ns (or /etc/netns/$ns) exists but is not ours: refusing"; exit 1
    fi
  done
  : >"$STATE/created"
  ip link add "$BRIDGE" type bridge || { log "cannot create a bridge (no CAP_NET_ADMIN?)"; exit 1; }
  created link "$BRIDGE"
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  if [ -e "$NODE_TMP" ]; then log "$NODE_TMP exists but is not ours: refusing"; exit 1; fi
  mkdir -m 0755 "$NODE_TMP"
  created dir "$NODE_TMP"
  if [ ! -d /etc/netns ]; then mkdir /etc/netns; created dir /etc/netns; fi
  for i in $(seq "$NODES"); do
    ns=$(ns_of "$i")
    ip netns add "$ns" || { log "cannot create network namespace $ns"; exit 1; }
    created netns "$ns"
    ip link add "icehpc-v$i" type veth peer name "icehpc-p$i"   # removed with the namespace
    created link "icehpc-v$i"
    ip link set "icehpc-p$i" netns "$ns"
    ip link set "icehpc-v$i" master "$BRIDGE"
    ip link set "icehpc-v$i" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip addr add "$NET.$((10 + i))/24" dev "icehpc-p$i"
    ip netns exec "$ns" ip link set "icehpc-p$i" up
    # bind-mounted over /etc/hosts for the node's processes only (see start_node)
    mkdir -m 1777 "$NODE_TMP/$ns"
    created tree "$NODE_TMP/$ns"
    mkdir "/etc/netns/$ns"
    created dir "/etc/netns/$ns"
    { grep -v "^$NET\." /etc/hosts
      echo "$NET.1 icehpc-ctl"
      for j in $(seq "$NODES"); do echo "$NET.$((10 + j)) $(ns_of "$j")"; done
    } >"/etc/netns/$ns/hosts"
    created file "/etc/netns/$ns/hosts"
  done
}

teardown_net() {  # undo $STATE/created, last line first
  local kind what
  [ -f "$STATE/created" ] || return 0
  while read -r kind what; do
    case "$kind" in
      netns) ip netns del "$what" 2>/dev/null && log "removed netns $what" ;;
      link) ip link del "$what" 2>/dev/null && log "removed link $what" ;;
      file) rm -f "$what" ;;
      tree) rm -rf --one-file-system "$what" ;;   # a node's scratch: job leftovers go with it
      dir) rmdir "$what" 2>/dev/null || log "left $what (not empty)" ;;
    esac
  done < <(tac "$STATE/created")
  rm -f "$STATE/created"
}

kill_node() {  # kill_node I SIGNAL: every process in node I's namespace (slurmd, slurmstepd, tasks)
  local ns pids
  ns=$(ns_of "$1")
  ip netns list | grep -qw "$ns" || return 0
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    # shellcheck disable=SC2086
    kill "-$2" $pids 2>/dev/null || true
  fi
}

node_pids_left() { [ -n "$(ip netns pids "$(ns_of "$1")" 2>/dev/null)" ]; }

start_node() {  # slurmd of node I in its namespace, with its own hostname
  local i=$1 ns name
  ns=$(ns_of "$i"); name=$ns
  if alive "$STATE/slurmd-$name.pid"; then return; fi
  mkdir -p "$STATE/spool-$name"
  # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, and slurmd refuses to
  # start without it. Private mount + UTS namespaces give the node its /etc/hosts and hostname.
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c \
    'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$1" && exec slurmd -N "$1"' sh "$name" \
    >>"$STATE/log/slurmd-$name.start.log" 2>&1
  wait_for 30 "slurmd pid file of $name" alive "$STATE/slurmd-$name.pid"
  wait_for 30 "slurmd on $name" bash -c "sinfo -h -n $name -o %t | grep -qE '^(idle|mix|alloc)'" || {
    scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
    wait_for 30 "$name idle" bash -c "sinfo -h -n $name -o %t | grep -qE '^(idle|mix|alloc)'"; }
}

read_nodes() { if [ -f "$STATE/nodes" ]; then NODES=$(cat "$STATE/nodes"); fi; }

configure_mode() {
  if [ "$NODES" -gt 1 ]; then CTL_ADDR=$NET.1; SUFFIX=-%n; else CTL_ADDR=127.0.0.1; SUFFIX=""; fi
}

start() {
  need_root
  own_state
  if [ -f "$STATE/nodes" ] && [ "$(cat "$STATE/nodes")" != "$NODES" ] && alive "$STATE/slurmctld.pid"; then
    log "a $(cat "$STATE/nodes")-node cluster is running: '$0 stop' first"; exit 1
  fi
  configure_mode
  if [ "$NODES" -gt 1 ]; then
    for b in ip nsenter unshare tac; do command -v "$b" >/dev/null || { log "--nodes needs $b (iproute2, util-linux)"; exit 1; }; done
    setup_net
  fi
  echo "$NODES" >"$STATE/nodes"
  write_configs
  start_munge
  start_mariadb
  start_daemon slurmdbd "$STATE/slurmdbd.pid" bash -c "exec 3<>/dev/tcp/$CTL_ADDR/6819"
  start_daemon slurmctld "$STATE/slurmctld.pid" scontrol ping
  sacctmgr -i add cluster icehpc >/dev/null 2>&1 || true
  if [ "$NODES" -gt 1 ]; then
    local i
    for i in $(seq "$NODES"); do start_node "$i"; done
    scontrol update nodename="icehpc-n[1-$NODES]" state=resume >/dev/null 2>&1 || true
    wait_for 60 "nodes idle" bash -c "[ \$(sinfo -h -N -o %t | grep -cE '^(idle|mix|alloc)') -ge $NODES ]"
  else
    # slurmd refuses to start without its spool folder; -b resets the node's boot time
    mkdir -p "$STATE/spool"
    start_daemon slurmd "$STATE/slurmd.pid" bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_for 60 "node idle" bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
  fi
  wait_for 60 sacct sacct -n -X -S now-1minute
  if [ "$NODES" -gt 1 ]; then
    log "up: partition debug on icehpc-n[1-$NODES] ($NET.11..; $CPUS CPUs each), controller $NET.1; state and logs in $STATE"
  else
    log "up: partition debug on $NODE ($CPUS CPUs); state and logs in $STATE"
  fi
}

stop_pid() {  # stop_pid NAME PIDFILE
  local pid
  if alive "$2"; then
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped $1 (pid $pid)"
  fi
  rm -f "$2"
}

stop() {
  local d i
  [ -d "$STATE" ] || return 0
  read_nodes
  if [ "$NODES" -gt 1 ]; then
    for i in $(seq "$NODES"); do
      stop_pid "slurmd on $(ns_of "$i")" "$STATE/slurmd-$(ns_of "$i").pid"
      # what is left in the node's namespace was started by its slurmd (slurmstepd, job tasks)
      kill_node "$i" TERM
      for _ in $(seq 20); do node_pids_left "$i" || break; sleep 0.25; done
      kill_node "$i" KILL
    done
  fi
  for d in slurmd slurmctld slurmdbd mariadbd munged; do
    stop_pid "$d" "$STATE/$d.pid"
  done
  teardown_net
  rm -f "$STATE/nodes"
}

status() {
  sinfo -h -o '%P %a %D %t' && sacct -n -X -S now-1minute >/dev/null && echo "sacct ok"
}

node_cmd() {  # node-kill I | node-start I
  need_root
  read_nodes; configure_mode
  local i=${2:-}
  if [ "$NODES" -lt 2 ] || ! [[ "$i" =~ ^[0-9]+$ ]] || [ "$i" -lt 1 ] || [ "$i" -gt "$NODES" ]; then
    log "usage: $0 $1 I   (1 <= I <= nodes of a cluster started with --nodes N >= 2)"; exit 2
  fi
  case "$1" in
    node-kill)
      kill_node "$i" KILL
      for _ in $(seq 40); do node_pids_left "$i" || break; sleep 0.25; done
      rm -f "$STATE/slurmd-$(ns_of "$i").pid"
      log "killed every process on $(ns_of "$i")" ;;
    node-start)
      if ! alive "$STATE/slurmd-$(ns_of "$i").pid" && ! node_pids_left "$i"; then
        # a node back from a crash: what a reboot clears. The node-local scratch, and the UNIX
        # sockets its dead slurmstepds left in the spool: a requeued job has the same job and step
        # ids, and its PMIx server would fail on "stepd.slurm.pmix.J.S: Address already in use".
        find "$NODE_TMP/$(ns_of "$i")" -mindepth 1 -delete 2>/dev/null || true
        find "$STATE/spool-$(ns_of "$i")" -maxdepth 1 -type s -delete 2>/dev/null || true
        find "$STATE/spool-$(ns_of "$i")" -maxdepth 1 -type d -name 'pmix.*' -exec rm -rf {} + 2>/dev/null || true
      fi
      start_node "$i"; log "$(ns_of "$i") up" ;;
  esac
}

cmd=${1:-}
[ $# -gt 0 ] && shift
if [ "$cmd" = start ] || [ "$cmd" = restart ]; then
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) NODES=${2:?--nodes N}; shift 2 ;;
      --nodes=*) NODES=${1#--nodes=}; shift ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
  [[ "$NODES" =~ ^[1-9]$ ]] || { echo "--nodes: 1..9" >&2; exit 2; }
fi
case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) want=$NODES; stop; NODES=$want; start ;;
  node-kill|node-start) node_cmd "$cmd" "$@" ;;
  *) echo "usage: $0 start [--nodes N]|stop|status|restart [--nodes N]|node-kill I|node-start I" >&2; exit 2 ;;
esac
