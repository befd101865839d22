"""Shared test fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "oap-jaffeux2022"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU-only test)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Jaffeux et al. 2022 archives, read in place; skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real probe data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


def _required(name: str) -> bool:
    return os.environ.get(f"ICEHPC_REQUIRE_{name}") == "1"


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """A running Slurm (jobs/local-cluster.sh start). `make test` sets ICEHPC_REQUIRE_SLURM=1, and
    then a missing cluster fails the test instead of skipping it."""
    ok = shutil.which("sbatch") is not None and subprocess.run(
        ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20).returncode == 0
    if not ok:
        if _required("SLURM"):
            pytest.fail("ICEHPC_REQUIRE_SLURM=1 but no Slurm cluster answers `sinfo`")
        pytest.skip("no Slurm cluster (start one with jobs/local-cluster.sh start)")
    return {"partition": os.environ.get("ICEHPC_SLURM_PARTITION", "debug")}


@pytest.fixture(scope="session")
def multinode(slurm_cluster) -> dict:
    """A Slurm cluster of >= 2 nodes, each in its own network namespace (jobs/local-cluster.sh start
    --nodes 2). `make test` sets ICEHPC_REQUIRE_MULTINODE=1 when it started one, and then fewer
    than two idle nodes fail the test instead of skipping it."""
    out = subprocess.run(["sinfo", "-h", "-N", "-p", slurm_cluster["partition"], "-o", "%N %t"],
                         capture_output=True, text=True, timeout=20).stdout.split("\n")
    nodes = sorted({line.split()[0] for line in out if line.strip() and line.split()[1].rstrip("*~#")
                    in ("idle", "mix", "alloc")})
    if len(nodes) < 2:
        msg = (f"needs a Slurm partition with >= 2 up nodes, found {nodes or 'none'} (start one with "
               "`jobs/local-cluster.sh start --nodes 2`: needs root and network namespaces)")
        if _required("MULTINODE"):
            pytest.fail("ICEHPC_REQUIRE_MULTINODE=1 but " + msg)
        pytest.skip(msg)
    return {**slurm_cluster, "nodes": nodes}


@pytest.fixture(scope="session")
def mpiexec() -> list[str]:
    """Command prefix to start N real Open MPI ranks: use as [*mpiexec, "-n", "2", ...]."""
    from icehpc.run.launch import mpiexec_prefix

    try:
        return mpiexec_prefix()
    except RuntimeError:
        if _required("MPI"):
            pytest.fail("ICEHPC_REQUIRE_MPI=1 but mpiexec is not on PATH")
        pytest.skip("Open MPI (mpiexec) not installed")


@pytest.fixture
def icehpc_cmd() -> list[str]:
    """Run the CLI in a subprocess exactly as a user would."""
    return [sys.executable, "-m", "icehpc"]
