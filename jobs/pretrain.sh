#!/bin/bash
# iBOT-vMF pretraining on Slurm, 1..N nodes: one task per GPU (or per CPU rank), srun starts the
# ranks, icehpc reads rank/world/master from SLURM_* (no MPI). Resources are ordinary sbatch
# options and override the defaults below, e.g. 2 nodes × 4 GPUs:
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=16 --time=24:00:00 \
#       jobs/pretrain.sh --config configs/pretrain-vits16.yaml data.shards=shards/cpi --out runs/vits16
# CPU smoke run with 2 ranks on one node:
#   sbatch --ntasks-per-node=2 jobs/pretrain.sh --config configs/pretrain-tiny-cpu.yaml data.shards=...
#
# Preemption / time limit: Slurm sends USR2 to this script 300 s before the end (B:USR2@300); the
# trap forwards it to the ranks, which finish the current step, checkpoint and exit; the script
# then requeues the job, and the requeued job runs the same command, which resumes from the
# latest checkpoint in `out`. A job that was never signalled is not requeued.
#SBATCH --job-name=icehpc-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=icehpc-pretrain-%j.out
source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
set +e  # the exit status of srun is handled below

preempted=0
srun_pid=""
forward_usr2() {
  preempted=1
  echo "[icehpc] USR2: asking the ranks to checkpoint" >&2
  kill -USR2 "$srun_pid" 2>/dev/null  # srun forwards USR2 to every task
}
trap forward_usr2 USR2

# --kill-on-bad-exit: a crashed rank must not leave the others waiting in a collective.
srun --kill-on-bad-exit=1 $ICEHPC pretrain "$@" &
srun_pid=$!
rc=0
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid"  # returns early (status > 128) when the trap runs; loop until srun is done
  rc=$?
done

if [ "$preempted" = 1 ]; then
  echo "[icehpc] requeueing job $SLURM_JOB_ID (srun exit $rc); it resumes from the latest checkpoint" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
