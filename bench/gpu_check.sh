#!/usr/bin/env bash
# One prepared GPU check (< 5 min) for a session that holds a CUDA machine: the `gpu`-marked tests of
# the whole repo, then the benchmarks, each with its output in $OUT/*.txt (default ./gpu_check_out).
#
#   bash bench/gpu_check.sh            # from the repository root, on the GPU machine
#
# Python packages the machine lacks travel as wheels in .whl/ (see the device notes); they are
# installed into a fresh `mktemp -d` folder. Every step has its own time cap inside one overall deadline, and one
# step failing does not stop the others; the exit status is the pytest one.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
DEADLINE=${GPU_CHECK_SECONDS:-285}

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
else PY=python3
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/icehpc-site.XXXXXX")  # private, never a fixed shared path
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >"$OUT/pip.txt" 2>&1 || echo "wheel install failed (see pip.txt)"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

left() { local l=$((DEADLINE - SECONDS)); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 5 ? l : 5)); }

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# collection errors (a package missing on the machine) must not stop the gpu tests of other modules
timeout "$(left 150)" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    -o addopts="-ra --strict-markers" tests >"$OUT/pytest_gpu.txt" 2>&1
rc=$?
echo "pytest -m gpu: exit $rc"; tail -n 3 "$OUT/pytest_gpu.txt"

timeout "$(left 100)" "$PY" bench/vmf_kernel.py >"$OUT/vmf_kernel.txt" 2>&1
echo "vmf_kernel: exit $?"
for b in pretrain embed; do
    if [ -f "bench/$b.py" ]; then
        timeout "$(left 60)" "$PY" "bench/$b.py" >"$OUT/$b.txt" 2>&1
        echo "$b: exit $?"
    fi
done
echo "total ${SECONDS}s; outputs in $OUT"
exit $rc
