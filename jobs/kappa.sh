#!/bin/bash
# vMF concentration κ per group of an embedding store, as a Slurm MPI job: every task is one rank
# reading a disjoint block-aligned row range; one Allreduce; rank 0 writes kappa.csv/json and
# similarity.csv. Results do not depend on the task count.
#   sbatch --ntasks=4 jobs/kappa.sh STORE --out DIR [--by campaign,campaign:temperature_c] [kappa options]
# Any #SBATCH default below can be overridden on the sbatch command line.
# Requeue-safe: a rerun with the same store and config finds DIR up to date and exits at once.
#SBATCH --job-name=icehpc-kappa
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --output=icehpc-kappa-%j.out
source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
srun --mpi=pmix $ICEHPC kappa "$@"
