#!/usr/bin/env bash
# The one prepared GPU check: runs first time, inside 5 minutes, on an H200.
#
#   bash bench/prepare_wheels.sh               # once, on the CPU machine: .whl/ (git-ignored)
#   bash bench/gpu_check.sh                    # on the GPU machine, from the repo root (carry .whl)
#   bash bench/gpu_check.sh --dry-run          # on a CPU: every step's entry point on tiny shapes
#   GPU_CHECK_STEPS="augment embed" bash bench/gpu_check.sh --dry-run   # only those steps
#
# Order for a cold machine: (1) kernel benchmark (3 shapes; torch.compile baseline for the 25k and
# [CLS] shapes; gradient check vs eager after the autotuning call; chosen configs), (2) the full
# pretraining step (ViT-S/16, 2x224 + 10x96, batch 256, DeepSpeed bf16, every step printed,
# step 0 apart, per-phase CUDA-event breakdown), (3) GPU augmentation img/s, (4) embedding img/s
# (GPU job only, 20,480 images, 12 decode workers), (5) the GPU pytest subset (per-test timeout).
# Each step writes $OUT/<step>.txt as it goes (a timeout keeps the figures printed so far) and has
# its own cap inside one deadline; a failing step does not stop the others. Imports are checked
# PER STEP: a step whose modules do not import is skipped with the reason, every other step runs
# (the kernel and augmentation steps need only torch and Triton; DeepSpeed only the pretrain step).
# At most 8 files come back from $OUT, so exactly 7 are written there: setup.txt (machine, wheel
# install, imports), vmf_kernel.txt, pretrain.txt, augment.txt, embed.txt, pytest_gpu.txt and
# summary.txt (every figure against its goal, every step's status), printed last.
# Nothing is fetched from a network: wheels install from .whl/ --no-index.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
DEADLINE=${GPU_CHECK_SECONDS:-290}
PRIV=$(mktemp -d "${TMPDIR:-/tmp}/icehpc-gpucheck.XXXXXX")  # private scratch: never under $OUT
trap 'rm -rf "$PRIV"' EXIT
SETUP=$OUT/setup.txt
: >"$SETUP"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} >>"$SETUP" 2>&1
MACHINE=$(tail -n 1 "$SETUP")

# ---- wheels (the image lacks DeepSpeed and friends): a failed install is reported, not fatal;
# the steps that need a missing package are skipped below
if [ "$DRY" = 0 ]; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "WARNING: no .whl/*.whl (bench/prepare_wheels.sh on the CPU machine, carry .whl): steps needing them are skipped" | tee -a "$SETUP" >&2
    else
        SITE=$PRIV/site  # private, never a fixed shared path
        mkdir -p "$SITE"
        pipi() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
        if ! pipi .whl/*.whl >>"$SETUP" 2>&1; then  # one bad wheel must not lose the others
            echo "WARNING: wheel install failed as a whole; installing one by one" | tee -a "$SETUP" >&2
            for w in .whl/*.whl; do pipi "$w" >>"$SETUP" 2>&1 || echo "WARNING: $w did not install" | tee -a "$SETUP" >&2; done
        fi
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# ---- imports, one by one (in one interpreter); each step names the modules it needs
MODULES="torch triton timm yaml h5py deepspeed hjson pydantic webdataset braceexpand zlib_ng submitit pytest
icehpc.ssl.kernels icehpc.ssl.augment icehpc.ssl.trainer icehpc.analysis.embed"
"$PY" - $MODULES >"$PRIV/imports.txt" 2>&1 <<'PYEOF'
import importlib, sys
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        print(f"{name} ok {getattr(mod, '__version__', '')}".rstrip())
    except BaseException as exc:  # ImportError, or anything an import can raise
        print(f"{name} FAILED {type(exc).__name__}: {exc}".replace("\n", " ")[:300])
PYEOF
cat "$PRIV/imports.txt" >>"$SETUP"
grep FAILED "$PRIV/imports.txt" >&2
missing() {  # missing MOD...: the modules of a step that did not import (empty: all did)
    local m out=""
    for m in "$@"; do grep -q "^$m ok" "$PRIV/imports.txt" || out="$out $m"; done
    echo "${out# }"
}

left() { local l=$((DEADLINE - SECONDS)); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 5 ? l : 5)); }
: >"$PRIV/exits.txt"
step() {  # step NAME CAP "MODULES" CMD...: run if MODULES import, capped, output to $OUT/NAME.txt
    local name=$1 cap mods=$3 miss; cap=$(left "$2"); shift 3
    case " ${GPU_CHECK_STEPS:-$name} " in *" $name "*) ;; *) return ;; esac  # a subset (tests)
    miss=$(missing $mods)
    if [ -n "$miss" ]; then
        echo "SKIPPED: cannot import $miss (see setup.txt)" | tee "$OUT/$name.txt"
        echo "== $name: skipped (cannot import $miss)"
        echo "$name|skipped, cannot import $miss" >>"$PRIV/exits.txt"
        return
    fi
    echo "== $name (cap ${cap}s, t=${SECONDS}s)"
    timeout "$cap" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 4 "$OUT/$name.txt"
    echo "== $name: exit $rc$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    echo "$name|exit $rc$([ $rc = 124 ] && echo ' (timed out)')" >>"$PRIV/exits.txt"
}

if [ "$DRY" = 1 ]; then
    step vmf_kernel 90 "torch triton icehpc.ssl.kernels" "$PY" bench/vmf_kernel.py --small
    step pretrain 120 "torch timm triton yaml deepspeed hjson pydantic icehpc.ssl.trainer" \
        "$PY" bench/pretrain.py --cpu-smoke
    step augment 60 "torch yaml icehpc.ssl.augment" "$PY" bench/augment.py --dry-run
    step embed 90 "torch timm h5py yaml webdataset zlib_ng icehpc.analysis.embed" "$PY" bench/embed.py --gpu-only --dry-run
    step pytest_gpu 60 "torch triton pytest" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
        -o addopts="-ra --strict-markers" tests/test_kernels.py tests/test_vmf.py
else
    step vmf_kernel 95 "torch triton icehpc.ssl.kernels" "$PY" bench/vmf_kernel.py
    step pretrain 80 "torch timm triton yaml deepspeed hjson pydantic icehpc.ssl.trainer" \
        "$PY" bench/pretrain.py --batch 256 --steps 8 --warmup 2
    step augment 20 "torch yaml icehpc.ssl.augment" "$PY" bench/augment.py --batch 256 --canvas 256
    step embed 55 "torch timm h5py yaml webdataset zlib_ng icehpc.analysis.embed" "$PY" bench/embed.py --gpu-only --n 20480 --workers 12
    TO=""; "$PY" -c "import pytest_timeout" 2>/dev/null && TO="--timeout=45"
    TESTS="tests/test_kernels.py tests/test_vmf.py tests/test_gpu_readiness.py tests/test_data.py"
    grep -q "^deepspeed ok" "$PRIV/imports.txt" && TESTS="$TESTS tests/test_pretrain.py::test_gpu_train_step_has_no_sync"
    step pytest_gpu 60 "torch triton pytest" "$PY" -m pytest -q -p no:cacheprovider -m gpu $TO \
        -o addopts="-ra --strict-markers" $TESTS
fi

# ---- summary last: every figure against its goal, and every step's status
{
    echo "# gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $MACHINE, ${SECONDS}s)"
    printf '%-48s %12s %-26s %s\n' figure value goal status
    cat "$OUT"/*.txt 2>/dev/null | grep -h '^SUMMARY|' | while IFS='|' read -r _ what value goal status; do
        printf '%-48s %12s %-26s %s\n' "$what" "$value" "$goal" "$status"
    done
    grep -h -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/pytest_gpu.txt" 2>/dev/null | tail -n 1 | sed 's/^/pytest: /'
    grep FAILED "$PRIV/imports.txt" | sed 's/^/import: /'
    while IFS='|' read -r name rc; do echo "step $name: $rc"; done <"$PRIV/exits.txt"
} >"$PRIV/summary.txt"
cp "$PRIV/summary.txt" "$OUT/summary.txt"
cat "$OUT/summary.txt"
! grep -qv '|exit 0$' "$PRIV/exits.txt"  # 0 only when every step ran and passed
