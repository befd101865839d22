#!/bin/bash
# The whole pipeline on Slurm: one job per step, chained with --dependency=afterok.
#   bash jobs/pipeline.sh [--config configs/demo.yaml] --out runs/demo [key.sub=value ...]
#   bash jobs/pipeline.sh --data IMAGES_DIR --out runs/mine [key.sub=value ...]   (the user's images)
# Submits the steps of `icehpc pipeline --plan` (steps whose output is complete for the same
# fingerprint are left out; --plan changes nothing on disk), MPI stages with `srun --mpi=pmix`,
# then a last job `icehpc pipeline --finish-only` that checks every output and writes science.json.
# Each step job first runs `icehpc pipeline ... --prepare-step STEP` (one process): it removes that
# stage's own stale files (a run with other inputs) and records the step's inputs, then the stage
# starts. Prints "STEP JOBID" per job (ids from sbatch --parsable); job logs go to OUT/slurm/.
# Extra sbatch options for every job: ICEHPC_SBATCH_ARGS="-p debug -t 30" (split on blanks).
# The plan arrives as NUL-separated fields (--plan-format nul): no path or argument is ever parsed
# or evaluated as shell code, whatever characters it holds.
# The same file is the job script of each step (called by sbatch with --step ...).
#SBATCH --job-name=icehpc-step
#SBATCH --cpus-per-task=1
#SBATCH --requeue
set -euo pipefail
if [ "${1:-}" = "--step" ]; then
  # --step LAUNCHER STEP N PIPELINE_ARG_1..N STAGE ARGV...
  launcher=$2 step=$3 n=$4
  shift 4
  pipeline_args=("${@:1:n}")
  shift "$n"
  source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
  # $ICEHPC is a command with arguments by design (jobs/_env.sh): split, never evaluated
  if [ "$n" -gt 0 ]; then $ICEHPC pipeline "${pipeline_args[@]}" --prepare-step "$step"; fi
  case "$launcher" in  # the stage table's launcher kind, passed on by the submitting loop below
    mpi) exec srun --mpi=pmix $ICEHPC "$@" ;;
    *) exec srun $ICEHPC "$@" ;;
  esac
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SLURM_JOB_ID=submit source "$ROOT/jobs/_env.sh" 2>/dev/null
planfile=$(mktemp)
trap 'rm -f "$planfile"' EXIT
$ICEHPC pipeline --plan --plan-format nul "$@" > "$planfile"
read -r -a extra <<< "${ICEHPC_SBATCH_ARGS:-}"
declare -A ids=()
all=""
out=""
field() { IFS= read -r -d '' "$1"; }
{
  while field kind; do
    case "$kind" in
      out)
        field out
        mkdir -p -- "$out/slurm"
        ;;
      step)
        field name; field ntasks; field launcher; field after; field nargs
        stage_args=()
        for ((i = 0; i < nargs; i++)); do field arg; stage_args+=("$arg"); done
        dep=""
        IFS=, read -r -a waits <<< "$after"
        for a in "${waits[@]}"; do
          if [ -n "${ids[$a]:-}" ]; then dep="$dep:${ids[$a]}"; fi
        done
        id=$(sbatch --parsable --job-name="icehpc-$name" --ntasks="$ntasks" --output="$out/slurm/$name-%j.out" \
             ${dep:+"--dependency=afterok$dep"} "${extra[@]}" "$ROOT/jobs/pipeline.sh" \
             --step "$launcher" "$name" "$#" "$@" "${stage_args[@]}")
        id=${id%%;*}  # "id;cluster" on federated setups
        ids[$name]=$id
        all="$all:$id"
        printf '%s %s\n' "$name" "$id"
        ;;
      *) echo "jobs/pipeline.sh: unexpected plan field '$kind'" >&2; exit 1 ;;
    esac
  done
} < "$planfile"
id=$(sbatch --parsable --job-name=icehpc-finish --ntasks=1 --output="$out/slurm/finish-%j.out" \
     ${all:+"--dependency=afterok$all"} "${extra[@]}" "$ROOT/jobs/pipeline.sh" --step plain finish 0 \
     pipeline "$@" --finish-only)
echo "finish ${id%%;*}"
