"""Rank discovery from each launcher's variables, and the SLURM_NTASKS guard."""
from __future__ import annotations

import subprocess
import sys

import pytest

from icehpc import dist


def test_torchrun_env_wins():
    d = dist.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                       "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"})
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.launcher) == (
        3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_step_env():
    d = dist.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                       "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "1234",
                       "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 8, 1, 4)
    assert d.master_addr == "gpu07"
    assert d.master_port == dist.default_port("1234") != dist.default_port("1235")


def test_openmpi_env_and_default():
    d = dist.from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (d.rank, d.world_size, d.launcher) == (1, 2, "mpi")
    assert dist.from_env({}) == dist.DistEnv()


def test_serial_comm_behaves_like_one_rank():
    import numpy as np

    comm = dist.mpi_comm()
    assert isinstance(comm, dist.SerialComm) and comm.Get_size() == 1
    out = np.zeros(3)
    comm.Allreduce(np.arange(3.0), out, op=dist.sum_op(comm))
    assert out.tolist() == [0.0, 1.0, 2.0]
    assert dist.run_on_root(comm, lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        dist.run_on_root(comm, lambda: 1 / 0)


@pytest.mark.mpi
def test_real_mpi_ranks_and_ntasks_guard(mpiexec):
    # rank 0 prints what every rank saw (two ranks printing at once can interleave their lines)
    code = ("from icehpc import dist; c = dist.mpi_comm(); seen = c.allgather((c.Get_rank(), c.Get_size()))\n"
            "if c.Get_rank() == 0: print(seen)")
    out = subprocess.run([*mpiexec, "-n", "2", sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    assert out == "[(0, 2), (1, 2)]"
    # A world that disagrees with SLURM_NTASKS (srun without --mpi=pmix starts singletons) must fail.
    bad = subprocess.run([*mpiexec, "-n", "1", "-x", "SLURM_NTASKS=4", "-x", "SLURM_STEP_ID=0",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "SLURM_NTASKS=4" in bad.stderr
