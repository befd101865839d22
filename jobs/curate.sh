#!/bin/bash
# Hierarchical k-means curation of an embedding store as a Slurm MPI job: every task is one rank
# owning whole row blocks; each k-means iteration is one Allreduce; rank 0 writes curated.csv,
# clusters.h5 and curate.json. Results (the curated keys) do not depend on the task count.
#   sbatch --ntasks=4 jobs/curate.sh STORE --out DIR --levels 1000,100,10 --target N [curate options]
# Any #SBATCH default below can be overridden on the sbatch command line.
# Requeue-safe: a rerun with the same store and config finds DIR up to date and exits at once.
#SBATCH --job-name=icehpc-curate
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --output=icehpc-curate-%j.out
source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
srun --mpi=pmix $ICEHPC curate "$@"
