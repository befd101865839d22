#!/bin/bash
# Predict a label for every row of an embedding store from a few labeled keys, as a Slurm MPI job:
# rank 0 fits the cross-validated logistic regression on the labeled rows (gathered from every
# rank), every task predicts its block-aligned row range, rank 0 writes predictions.csv and
# classify.json. Results do not depend on the task count.
#   sbatch --ntasks=4 jobs/classify.sh STORE --labels LABELS --out DIR [--label-column habit] [--folds 5]
# Any #SBATCH default below can be overridden on the sbatch command line.
# Requeue-safe: a rerun with the same store, labels and config finds DIR up to date and exits at once.
#SBATCH --job-name=icehpc-classify
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --output=icehpc-classify-%j.out
source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
srun --mpi=pmix $ICEHPC classify "$@"
