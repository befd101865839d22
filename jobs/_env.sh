# Sourced by every icehpc sbatch script:  source "${ICEHPC_ROOT:-$SLURM_SUBMIT_DIR}/jobs/_env.sh"
# (sbatch runs a copy of the script from its spool folder, so scripts cannot find this file
# relative to themselves.) Sets up the same environment whoever submits, and defines $ICEHPC.
set -euo pipefail
export ICEHPC_ROOT=${ICEHPC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ICEHPC_ROOT"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ICEHPC_ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$ICEHPC_ROOT/.venv/bin/activate"
fi
# The deepspeed and Slurm launchers leave OMP_NUM_THREADS unset: one thread per allocated CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
# Open MPI refuses root unless told; harmless for ordinary users.
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
# The checkout's .venv when there is one (activated above), else the installed `icehpc` on PATH.
if [ -n "${VIRTUAL_ENV:-}" ] || ! command -v icehpc >/dev/null 2>&1; then
  ICEHPC="python -u -m icehpc"
else
  ICEHPC="icehpc"
fi
echo "[icehpc] job ${SLURM_JOB_ID:-local} on $(hostname -s): ${SLURM_NTASKS:-1} task(s), root $ICEHPC_ROOT" >&2
