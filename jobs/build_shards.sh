#!/bin/bash
# Build WebDataset shards as a Slurm job (one task; --workers = the task's CPUs).
#   sbatch jobs/build_shards.sh INPUT... --out DIR [icehpc shards build options]
# Every #SBATCH default below can be overridden on the sbatch command line (e.g. -c 16 -t 4:00:00).
# One task on one node on purpose: the build reads every input once for the duplicate check and
# writes shards from a plan fixed up front, so its workers already use all CPUs of the node and the
# output is the same bytes as a local run with any --workers. The job is requeue-safe: a rerun of
# the same command skips finished shards (see icehpc/shards.py).
#SBATCH --job-name=icehpc-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --output=icehpc-shards-%j.out
source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
srun --ntasks=1 $ICEHPC shards build --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress "$@"
