#!/bin/bash
# [CLS] embeddings of a shard folder as a Slurm MPI job: every task is one rank, every shard goes to
# exactly one rank, and rank 0 writes the master store after all parts exist.
#   sbatch --ntasks=4 jobs/embed.sh SHARDS --checkpoint backbone.safetensors --out STORE [embed options]
# Any #SBATCH default below can be overridden on the sbatch command line (e.g. -n 8 --gpus-per-task=1).
# Requeue-safe: a restarted job computes only the shards whose part file is missing.
#SBATCH --job-name=icehpc-embed
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --output=icehpc-embed-%j.out
source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
srun --mpi=pmix $ICEHPC embed "$@"
