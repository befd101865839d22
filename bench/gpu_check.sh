#!/usr/bin/env bash
# The one prepared GPU check: runs first time, inside 5 minutes, on an H200.
#
#   bash bench/prepare_wheels.sh               # once, on the CPU machine: .whl/ (git-ignored)
#   bash bench/gpu_check.sh                    # on the GPU machine, from the repo root (carry .whl)
#   bash bench/gpu_check.sh --dry-run          # on a CPU: every step's entry point on tiny shapes
#
# Order for a cold machine: (1) kernel benchmark (3 shapes; torch.compile baseline for the 25k and
# [CLS] shapes; gradient check vs eager after the autotuning call; chosen configs), (2) the full
# pretraining step (ViT-S/16, 2x224 + 10x96, batch 256, DeepSpeed bf16, every step printed,
# step 0 apart, per-phase CUDA-event breakdown), (3) GPU augmentation img/s, (4) embedding img/s
# (GPU job only, 20,480 images, 12 decode workers), (5) the GPU pytest subset (per-test timeout).
# Each step writes $OUT/<step>.txt and has its own cap inside one deadline; a failing step does
# not stop the others. The summary of every figure against its goal is printed last and written
# to $OUT/summary.txt. Nothing is fetched from a network: wheels install from .whl/ --no-index.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
DEADLINE=${GPU_CHECK_SECONDS:-290}

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1

# ---- wheels (the image lacks DeepSpeed and friends); an import error stops the check loudly
if [ "$DRY" = 0 ]; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "ERROR: no .whl/*.whl (run bench/prepare_wheels.sh on the CPU machine, carry .whl)" >&2
        exit 2
    fi
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/icehpc-site.XXXXXX")  # private, never a fixed shared path
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; echo "ERROR: wheel install failed" >&2; exit 2; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import torch, timm, triton, deepspeed, hjson, pydantic, webdataset, braceexpand, submitit, icehpc" \
        >"$OUT/imports.txt" 2>&1; then
    cat "$OUT/imports.txt"; echo "ERROR: import failed (see above): fix .whl/ before measuring" >&2; exit 2
fi

left() { local l=$((DEADLINE - SECONDS)); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 5 ? l : 5)); }
step() {  # step NAME CAP CMD...: run with a time cap, output to $OUT/NAME.txt, report exit status
    local name=$1 cap; cap=$(left "$2"); shift 2
    echo "== $name (cap ${cap}s, t=${SECONDS}s)"
    timeout "$cap" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 4 "$OUT/$name.txt"
    echo "== $name: exit $rc$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    echo "$name|$rc" >>"$OUT/exits.txt"
}
: >"$OUT/exits.txt"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$DRY" = 1 ]; then
    step vmf_kernel 120 "$PY" bench/vmf_kernel.py --small
    step pretrain 200 "$PY" bench/pretrain.py --cpu-smoke
    step augment 60 "$PY" bench/augment.py --dry-run
    step pytest_gpu 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra --strict-markers" \
        tests/test_kernels.py tests/test_vmf.py
else
    step vmf_kernel 95 "$PY" bench/vmf_kernel.py
    step pretrain 80 "$PY" bench/pretrain.py --batch 256 --steps 8 --warmup 2
    step augment 20 "$PY" bench/augment.py --batch 256 --canvas 256
    step embed 55 "$PY" bench/embed.py --gpu-only --n 20480 --workers 12
    TO=""; "$PY" -c "import pytest_timeout" 2>/dev/null && TO="--timeout=45"
    step pytest_gpu 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu $TO -o addopts="-ra --strict-markers" \
        tests/test_kernels.py tests/test_vmf.py tests/test_pretrain.py::test_gpu_train_step_has_no_sync
fi

# ---- summary last: every figure against its goal, and every step's exit status
{
    echo "# gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(tail -n 1 "$OUT/machine.txt"), ${SECONDS}s)"
    printf '%-48s %12s %-26s %s\n' figure value goal status
    cat "$OUT"/*.txt 2>/dev/null | grep -h '^SUMMARY|' | while IFS='|' read -r _ what value goal status; do
        printf '%-48s %12s %-26s %s\n' "$what" "$value" "$goal" "$status"
    done
    grep -h -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/pytest_gpu.txt" 2>/dev/null | tail -n 1 | sed 's/^/pytest: /'
    while IFS='|' read -r name rc; do echo "step $name: exit $rc"; done <"$OUT/exits.txt"
} >"$OUT/summary.tmp"
mv "$OUT/summary.tmp" "$OUT/summary.txt"
cat "$OUT/summary.txt"
grep -q '|0$' "$OUT/exits.txt" && ! grep -qv '|0$' "$OUT/exits.txt"
