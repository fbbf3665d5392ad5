#!/usr/bin/env bash
# A real Slurm (22.05 on Debian 12) on this one host, for the Slurm tests (tests/e2e/test_slurm.py)
# and for trying launchers/slurm/*.sbatch without a cluster. `--install-only` installs the
# packages and exits (.ci/run does that); without it the daemons are started too.
# Idempotent: safe to run repeatedly; re-uses a running cluster with the same config.
# Must run as root (installs packages, starts munged as the munge user).
# Works without systemd (containers): daemons are started directly.
#
# Env knobs (all optional):
#   SLURM_PROTO_DIR   base dir for conf/state/logs        (default /tmp/scaletrain-slurm)
#   SLURM_NUM_NODES   slurmd instances on this host       (default 1)
#                     1 -> one node named after the host (or SLURM_NODE_NAME);
#                     N>1 -> node1..nodeN, one slurmd each on port SLURMD_PORT+i-1
#                     (Debian's slurm is built with MULTIPLE_SLURMD)
#   SLURM_NODE_CPUS   CPUs declared per node              (default max(nproc,2))
#   SLURM_NODE_MEM_MB RealMemory per node in MB           (default min(4096, 80% RAM))
#   SLURMCTLD_PORT / SLURMD_PORT                          (default 6817 / 6818)
#   SLURM_WAIT_S      seconds to wait for nodes idle      (default 60)
set -euo pipefail

BASE="${SLURM_PROTO_DIR:-/tmp/scaletrain-slurm}"
ETC="$BASE/etc"
VAR="$BASE/var"
CONF="$ETC/slurm.conf"
WAIT_S="${SLURM_WAIT_S:-60}"
export SLURM_CONF="$CONF"

log() { echo "[start_slurm] $*" >&2; }
die() { echo "[start_slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$BASE"

# ---------------------------------------------------------------- 1. packages
PKGS="slurmctld slurmd slurm-client munge"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing $PKGS"
  t0=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  # Without a policy-rc.d, the munge/slurmd/slurmctld postinst scripts run
  # 'invoke-rc.d <svc> start || exit 1' through their sysv init scripts;
  # slurmctld cannot start there (no /etc/slurm/slurm.conf) and dpkg fails.
  tmp_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    tmp_policy=1
  fi
  apt_install() {
    apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $PKGS
  }
  ok=1
  if ! apt_install >"$BASE/apt.log" 2>&1; then
    log "install failed; running apt-get update and retrying"
    apt-get update -q >>"$BASE/apt.log" 2>&1 || true
    apt_install >>"$BASE/apt.log" 2>&1 || ok=0
  fi
  if [ -n "$tmp_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ "$ok" = 1 ] || { tail -20 "$BASE/apt.log" >&2; die "apt-get install failed (see $BASE/apt.log)"; }
  log "packages installed in $(( $(date +%s) - t0 ))s"
fi

[ "${1:-}" = "--install-only" ] && { log "packages present"; exit 0; }

# ---------------------------------------------------------------- 2. munge
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
    fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge /var/log/munge; chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  if [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; sleep 0.5   # hung munged
  fi
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*                 # stale files
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged   # forks into the background
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged not working (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- 3. config
HOST="$(hostname -s)"
NNODES="${SLURM_NUM_NODES:-1}"
CTLD_PORT="${SLURMCTLD_PORT:-6817}"
D_PORT="${SLURMD_PORT:-6818}"
if [ "$NNODES" = 1 ]; then NODES="${SLURM_NODE_NAME:-$HOST}"; else NODES=$(seq -f 'node%g' 1 "$NNODES" | tr '\n' ' '); fi
NODELIST=$(echo $NODES | tr ' ' ',')
NCPU=$(nproc); [ "$NCPU" -lt 2 ] && NCPU=2
NCPU="${SLURM_NODE_CPUS:-$NCPU}"
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
[ "$MEM_MB" -gt 4096 ] && MEM_MB=4096
MEM_MB="${SLURM_NODE_MEM_MB:-$MEM_MB}"

# node names must resolve for payloads (e.g. MASTER_ADDR from SLURM_JOB_NODELIST)
for n in $NODES; do
  getent hosts "$n" >/dev/null 2>&1 || echo "127.0.0.1 $n  # start_slurm.sh" >>/etc/hosts
done
mkdir -p "$ETC" "$VAR/state" "$VAR/log" "$VAR/run"
for n in $NODES; do mkdir -p "$VAR/spool/slurmd.$n"; done
: >"$ETC/plugstack.conf"      # don't pick up /etc/slurm/plugstack.conf.d
NEWCONF="$ETC/slurm.conf.new"
{
cat <<EOF
# generated by start_slurm.sh
ClusterName=scaletrain
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# credential lifetime; ALSO the hold time of a requeued job (default 120 s!)
AuthInfo=cred_expire=5
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${D_PORT}
StateSaveLocation=$VAR/state
SlurmdSpoolDir=$VAR/spool/slurmd.%n
SlurmctldPidFile=$VAR/run/slurmctld.pid
SlurmdPidFile=$VAR/run/slurmd.%n.pid
SlurmctldLogFile=$VAR/log/slurmctld.log
SlurmdLogFile=$VAR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
PlugStackConfig=$ETC/plugstack.conf
# no cgroups / systemd in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# run the scheduler every second so requeued/newly eligible jobs start promptly
SchedulerParameters=sched_interval=1,bf_interval=1
# nodes may declare more CPUs/memory than the host has (CI runners vary)
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# keep finished jobs visible to scontrol for 10 min (no accounting -> no sacct)
MinJobAge=600
# SIGTERM -> SIGKILL grace at time limit / scancel
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
MessageTimeout=10
EOF
i=0
for n in $NODES; do
  echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((D_PORT + i)) CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN"
  i=$((i + 1))
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
} >"$NEWCONF"

# ---------------------------------------------------------------- 4. daemons
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
CTLD_PID="$VAR/run/slurmctld.pid"
all_slurmd_alive() { for n in $NODES; do pid_alive "$VAR/run/slurmd.$n.pid" || return 1; done; }
any_alive() {
  pid_alive "$CTLD_PID" && return 0
  for f in "$VAR"/run/slurmd.*.pid; do pid_alive "$f" && return 0; done
  return 1
}

if pid_alive "$CTLD_PID" && all_slurmd_alive && cmp -s "$NEWCONF" "$CONF"; then
  log "slurm already running with this config"
else
  if any_alive; then
    log "config changed or partial cluster: restarting daemons"
    for p in "$VAR"/run/slurmd.*.pid "$CTLD_PID"; do pid_alive "$p" && kill "$(cat "$p")" || true; done
    for _ in $(seq 50); do any_alive || break; sleep 0.2; done
    any_alive && die "old daemons did not exit"
  fi
  mv -f "$NEWCONF" "$CONF"
  log "starting slurmctld"
  slurmctld -f "$CONF" || die "slurmctld failed; see $VAR/log/slurmctld.log"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
  scontrol ping 2>/dev/null | grep -q 'is UP' || { tail -20 "$VAR/log/slurmctld.log" >&2; die "slurmctld not responding"; }
  for n in $NODES; do
    log "starting slurmd -N $n"
    slurmd -f "$CONF" -N "$n" || die "slurmd failed; see $VAR/log/slurmd.$n.log"
  done
fi
rm -f "$NEWCONF"

# wait until every node is usable
deadline=$(( $(date +%s) + WAIT_S ))
while :; do
  states=$(sinfo -h -N -n "$NODELIST" -o '%N %T' 2>/dev/null || true)
  ready=$(echo "$states" | grep -cE ' (idle|mixed|allocated)' || true)
  [ "$ready" -ge "$NNODES" ] && break
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "--- sinfo:" >&2; sinfo -N -l >&2 || true
    echo "--- slurmctld.log:" >&2; tail -20 "$VAR/log/slurmctld.log" >&2 || true
    for n in $NODES; do echo "--- slurmd.$n.log:" >&2; tail -10 "$VAR/log/slurmd.$n.log" >&2 || true; done
    die "nodes not idle after ${WAIT_S}s: $(echo $states)"
  fi
  # nodes left DOWN/DRAIN by a previous run: resume them
  for n in $(echo "$states" | awk '$2 ~ /^(down|drain)/{print $1}'); do
    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
  done
  sleep 0.5
done

echo "export SLURM_CONF=$CONF" >"$BASE/env.sh"
log "slurm is up: nodes $NODELIST idle, partition debug (default)"
cat <<EOF
Slurm is running. To use it:
  export SLURM_CONF=$CONF      # or: source $BASE/env.sh
  sinfo; sbatch job.sh; squeue; scontrol show job <id>
Logs: $VAR/log   Stop: tools/local_slurm/stop.sh
EOF
