#!/usr/bin/env bash
# Run ONCE on the CPU machine (it has PyPI): put every wheel the H200 image lacks into .whl/
# (git-ignored) for bench/gpu_check.sh, which installs them there with --no-index (no network).
# The image has torch, timm, triton, h5py and mpi4py; it lacks DeepSpeed and the packages below.
#
#   bash bench/prepare_wheels.sh          # then: run(..., carry=[".whl"]) with bench/gpu_check.sh
#
# DeepSpeed is an sdist on PyPI: it is built here into a wheel (pip wheel --no-deps
# --no-build-isolation, ops left to JIT). Binary wheels are fetched for CPython 3.12 manylinux
# x86_64 (the image's interpreter; GPU_PY=311 etc. to change). Versions = the CPU venv's.
# typing-extensions is carried too: pydantic 2.x needs a recent one (>= 4.16 here) and the image's
# version is unknown; installed with --target first on PYTHONPATH, it shadows the image's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
GPU_PY=${GPU_PY:-312}
DEST=.whl
mkdir -p "$DEST"
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# compiled: the image's CPython ABI
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    --implementation cp --python-version "$GPU_PY" --abi "cp$GPU_PY" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "pydantic-core==$(ver pydantic-core)" "msgpack==$(ver msgpack)" "zlib-ng==$(ver zlib-ng)"
# pure Python (DeepSpeed's own imports first, then the data/launch packages)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" --python-version "$GPU_PY" \
    "hjson==$(ver hjson)" "pydantic==$(ver pydantic)" "annotated-types==$(ver annotated-types)" \
    "typing-inspection==$(ver typing-inspection)" "typing-extensions==$(ver typing-extensions)" \
    "py-cpuinfo==$(ver py-cpuinfo)" \
    "einops==$(ver einops)" "webdataset==$(ver webdataset)" "braceexpand==$(ver braceexpand)" \
    "submitit==$(ver submitit)" "pytest-timeout==$(ver pytest-timeout)"
# DeepSpeed: sdist → wheel, built against the venv's torch, no CUDA ops compiled (JIT on use)
if ! compgen -G "$DEST/deepspeed-*.whl" >/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$(ver deepspeed)"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-*.tar.gz
fi
ls -l "$DEST"
total=$(du -sk "$DEST" | cut -f1)
echo "total $((total / 1024)) MiB in $DEST (a run's carry holds 64 MiB with the working tree)"
[ "$total" -lt $((48 * 1024)) ] || { echo "ERROR: $DEST is over 48 MiB" >&2; exit 1; }
