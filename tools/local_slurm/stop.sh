#!/usr/bin/env bash
# Stop the Slurm started by tools/local_slurm/start.sh and wipe its state.
#   KEEP_MUNGE=1  leave munged running (default: stop it too)
set -uo pipefail
BASE="${SLURM_PROTO_DIR:-/tmp/scaletrain-slurm}"
VAR="$BASE/var"
export SLURM_CONF="$BASE/etc/slurm.conf"

log() { echo "[stop_slurm] $*" >&2; }

# cancel jobs so their slurmstepd/payloads die with the daemons
[ -f "$SLURM_CONF" ] && timeout 5 scancel --full -u root >/dev/null 2>&1 || true

pids=""
for f in "$VAR"/run/slurmd.*.pid "$VAR"/run/slurmctld.pid; do
  [ -s "$f" ] || continue
  p=$(cat "$f"); kill -0 "$p" 2>/dev/null && { kill -TERM "$p"; pids="$pids $p"; }
done
for _ in $(seq 50); do
  alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && break; sleep 0.2
done
for p in ${alive:-}; do log "SIGKILL $p"; kill -KILL "$p" 2>/dev/null; done

# leftover slurmstepd processes belonging to our spool dirs
for p in $(pgrep -x slurmstepd 2>/dev/null); do
  grep -qa "$VAR" "/proc/$p/cmdline" "/proc/$p/environ" 2>/dev/null && kill -KILL "$p" 2>/dev/null
done

if [ "${KEEP_MUNGE:-0}" != 1 ] && [ -s /run/munge/munged.pid ]; then
  kill "$(cat /run/munge/munged.pid)" 2>/dev/null && log "stopped munged"
fi

# node-name entries added by start_slurm.sh (rewrite in place: /etc/hosts may be a bind mount)
if grep -q '# start_slurm.sh$' /etc/hosts 2>/dev/null; then
  h=$(grep -v '# start_slurm.sh$' /etc/hosts); printf '%s\n' "$h" >/etc/hosts
fi

rm -rf "$VAR" "$BASE/etc" "$BASE/env.sh"
log "stopped; state cleaned"
