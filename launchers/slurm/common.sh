# Shared by launchers/slurm/*.sbatch (sourced in the batch script, on the job's first node).
#
# Settings (environment; `sbatch --export=ALL,VAR=...` or exported before sbatch):
#   SCRIPT          launcher script: launchers/pretrain.py (default), sft.py, lora.py, dpo.py
#   NPROC_PER_NODE  ranks per node (default: the GPUs Slurm gave the node, else 1)
#   NET_IFACE       network interface for NCCL/gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
#   PYTHON          interpreter with scaletrain installed (default: .venv/bin/python, else python3)
#   LOG_DIR         per-node logs (default: logs/slurm-JOBID)
#   DS_HOSTFILE     (DeepSpeed) your hostfile, checked against the job's nodes; default: written
#
# Pre-emption and time limits: `#SBATCH --signal=B:USR1@SECONDS` sends USR1 to this script
# before the limit; the trap asks every rank to stop (SIGTERM to the job's steps: the trainer
# saves a checkpoint at the end of its current step and exits), then requeues the job, which
# starts again with the same command and resumes from that checkpoint. A job requeued or
# cancelled from outside (`scontrol requeue`, `scancel`) gets SIGTERM from Slurm itself; the
# trainer saves the same way and the requeued job resumes.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export SCRIPT="${SCRIPT:-launchers/pretrain.py}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOG_DIR="${LOG_DIR:-logs/slurm-${SLURM_JOB_ID:-local}}"
mkdir -p "$LOG_DIR"
if [ -n "${NET_IFACE:-}" ]; then
  export NCCL_SOCKET_IFNAME="$NET_IFACE" GLOO_SOCKET_IFNAME="$NET_IFACE"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# Rendezvous from SLURM_JOB_NODELIST (one-line error and exit 2 on a malformed one).
scaletrain_plan() {
  local exports
  exports="$("$PYTHON" -m scaletrain.slurm plan ${NPROC_PER_NODE:+--nproc-per-node "$NPROC_PER_NODE"} "$@")" || exit 2
  eval "$exports"
  echo "scaletrain slurm: job ${SLURM_JOB_ID} (restart ${RESTART_COUNT}) on ${NNODES} node(s) [${SCALETRAIN_HOSTS}]," \
       "${NPROC_PER_NODE} rank(s) each, rendezvous ${MASTER_ADDR}:${MASTER_PORT}, ${SCRIPT}"
}

# Run "$@" as one task per node (per-node logs), forwarding pre-emption as described above.
scaletrain_run_preemptible() {
  local preempted=0 step_pid rc=0
  on_usr1() {
    preempted=1
    echo "scaletrain slurm: USR1 (time limit or pre-emption ahead): checkpointing, then requeue"
    scancel --signal=TERM "$SLURM_JOB_ID" || true   # every step's processes, not this shell
  }
  trap on_usr1 USR1
  srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
       --output="$LOG_DIR/node-%n-%N.out" --error="$LOG_DIR/node-%n-%N.out" "$@" &
  step_pid=$!
  while true; do  # `wait` returns early when a trapped signal arrives: wait again
    if wait "$step_pid"; then rc=0; else rc=$?; fi
    kill -0 "$step_pid" 2>/dev/null || break
  done
  trap - USR1
  if [ "$preempted" = 1 ]; then
    echo "scaletrain slurm: requeueing job ${SLURM_JOB_ID} (steps exited with ${rc})"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "scaletrain slurm: finished with exit code ${rc}; per-node logs in ${LOG_DIR}"
  exit "$rc"
}
