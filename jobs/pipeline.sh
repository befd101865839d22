#!/bin/bash
# The whole pipeline on Slurm: one job per step, chained with --dependency=afterok.
#   bash jobs/pipeline.sh [--config configs/demo.yaml] --out runs/demo [key.sub=value ...]
#   bash jobs/pipeline.sh --data IMAGES_DIR --out runs/mine [key.sub=value ...]   (the user's images)
# Submits the steps of `icehpc pipeline --plan` (steps whose output exists with the same fingerprint
# are left out; --plan removes the outputs of steps whose inputs or config changed),
# MPI stages with `srun --mpi=pmix`, then a last job `icehpc pipeline --finish-only` that checks
# every output and writes science.json. Prints "STEP JOBID" per job (ids from sbatch --parsable);
# job logs go to OUT/slurm/. Extra sbatch options for every job: ICEHPC_SBATCH_ARGS="-p debug -t 30".
# The same file is the job script of each step (called by sbatch with --step STAGE ARGS).
#SBATCH --job-name=icehpc-step
#SBATCH --cpus-per-task=1
#SBATCH --requeue
set -euo pipefail
if [ "${1:-}" = "--step" ]; then
  shift
  source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
  launcher=$1; shift
  case "$launcher" in  # the stage table's launcher kind, passed on by the submitting loop below
    mpi) exec srun --mpi=pmix $ICEHPC "$@" ;;
    *) exec srun $ICEHPC "$@" ;;
  esac
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SLURM_JOB_ID=submit source "$ROOT/jobs/_env.sh" 2>/dev/null
plan=$($ICEHPC pipeline --plan "$@")
out=$(sed -n 's/^# out=//p' <<< "$plan")
mkdir -p "$out/slurm"
read -r -a extra <<< "${ICEHPC_SBATCH_ARGS:-}"
declare -A ids=()
all=""
while IFS=$'\t' read -r name ntasks launcher after command; do
  case "$name" in ''|'#'*) continue ;; esac
  dep=""
  for a in ${after//,/ }; do
    if [ -n "${ids[$a]:-}" ]; then dep="$dep:${ids[$a]}"; fi
  done
  eval "stage_args=($command)"
  id=$(sbatch --parsable --job-name="icehpc-$name" --ntasks="$ntasks" --output="$out/slurm/$name-%j.out" \
       ${dep:+--dependency=afterok$dep} "${extra[@]}" "$ROOT/jobs/pipeline.sh" --step "$launcher" "${stage_args[@]}")
  id=${id%%;*}  # "id;cluster" on federated setups
  ids[$name]=$id
  all="$all:$id"
  echo "$name $id"
done <<< "$plan"
id=$(sbatch --parsable --job-name=icehpc-finish --ntasks=1 --output="$out/slurm/finish-%j.out" \
     ${all:+--dependency=afterok$all} "${extra[@]}" "$ROOT/jobs/pipeline.sh" --step plain pipeline "$@" --finish-only)
echo "finish ${id%%;*}"
