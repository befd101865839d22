#!/bin/bash
# kNN rarity and mislabel scores of an embedding store as a Slurm MPI job: every task scores the
# query rows of its blocks against the whole store, streamed in blocks; rank 0 writes outliers.csv,
# outliers.html and outliers.json. Results do not depend on the task count.
#   sbatch --ntasks=4 jobs/outliers.sh STORE --out DIR [--label habit] [--k 20] [--images SHARDS]
# Any #SBATCH default below can be overridden on the sbatch command line.
# Requeue-safe: a rerun with the same store and config finds DIR up to date and exits at once.
#SBATCH --job-name=icehpc-outliers
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --output=icehpc-outliers-%j.out
source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
srun --mpi=pmix $ICEHPC outliers "$@"
