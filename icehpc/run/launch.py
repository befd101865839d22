"""submitit submission of one stage (Slurm, local processes, or in-process debug).

The submitted callable is :class:`StageJob`, which runs exactly the CLI command a user would type
(``icehpc STAGE ARGS``) in every task, so a stage behaves the same whether started by hand, by
``sbatch jobs/*.sh`` or here. It is submitit-Checkpointable: on preemption or timeout (USR2) it is
requeued with the same command, and because every stage resumes from what its output folder already
holds, the requeued job continues where it stopped.

Rank wiring: MPI stages (embed, kappa) run under ``srun --mpi=pmix`` so mpi4py sees the whole job;
torch.distributed stages (pretrain) get RANK/WORLD_SIZE/MASTER_* from submitit's JobEnvironment, on
Slurm and on the local executor alike.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import submitit

from .. import dist
from .stages import run_stage, stage as stage_info


class StageJob(submitit.helpers.Checkpointable):
    """Runs ``icehpc STAGE ARGV`` in each task; requeued unchanged on timeout/preemption."""

    def __init__(self, stage: str, argv: Sequence[str], mpi: bool, local_mpi_ranks: int = 0) -> None:
        if not stage_info(stage).submittable:
            raise ValueError(f"stage {stage!r} submits other jobs and cannot be a job itself")
        self.stage = stage
        self.argv = list(argv)
        self.mpi = mpi
        self.local_mpi_ranks = local_mpi_ranks

    def __call__(self) -> int:
        if self.local_mpi_ranks > 1:
            # the local executor does not start MPI ranks: one task starts them with mpiexec
            cmd = [*mpiexec_prefix(), "-n", str(self.local_mpi_ranks), sys.executable, "-u", "-m",
                   "icehpc", self.stage, *self.argv]
            return subprocess.run(cmd, check=True).returncode
        if not self.mpi and "RANK" not in os.environ:
            env = submitit.JobEnvironment()
            if env.num_tasks > 1:
                dist.export_torch_env(dist.DistEnv(
                    rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank,
                    local_world_size=env.num_tasks // max(env.num_nodes, 1),
                    master_addr=env.hostnames[0] if env.hostnames else "127.0.0.1",
                    master_port=dist.default_port(str(env.job_id).split("_")[0]), launcher="submitit"))
        try:
            code = run_stage(self.stage, self.argv)
        except SystemExit as exc:
            if exc.code == -1:  # submitit's USR2 handler requeued us: leave without a result
                raise
            code = exc.code if isinstance(exc.code, int) else 1  # e.g. argparse errors: report them
        if code:
            raise RuntimeError(f"icehpc {self.stage} exited with code {code}")
        return code


def mpiexec_prefix() -> list[str]:
    """``mpiexec`` with the flags a 2-core laptop and a root container need."""
    exe = shutil.which("mpiexec")
    if exe is None:
        raise RuntimeError("mpiexec not found: install Open MPI (apt-get install openmpi-bin) or load your MPI module")
    prefix = [exe, "--oversubscribe"]
    if os.geteuid() == 0:
        prefix.append("--allow-run-as-root")
    return prefix


def make_executor(executor: str = "slurm", folder: str | Path = "runs/submitit", *, nodes: int = 1,
                  tasks_per_node: int = 1, gpus_per_node: int = 0, cpus_per_task: int = 1,
                  time_min: int = 60, partition: str | None = None, mem_gb: float | None = None,
                  mpi: bool = False, dependency: Sequence[Any] | None = None,
                  job_name: str = "icehpc", signal_delay_s: int = 120) -> submitit.AutoExecutor:
    """A submitit executor with icehpc's conventions (requeue on USR2, pmix for MPI stages)."""
    ex = submitit.AutoExecutor(folder=str(folder), cluster=executor)
    params: dict[str, Any] = dict(name=job_name, nodes=nodes, tasks_per_node=tasks_per_node,
                                  cpus_per_task=cpus_per_task, timeout_min=time_min)
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if mem_gb is not None:
        params["mem_gb"] = mem_gb
    if ex.cluster == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s
        if partition:
            params["slurm_partition"] = partition
        if mpi:
            params["slurm_srun_args"] = ["--mpi=pmix"]
        if dependency:
            ids = ":".join(str(j.job_id if hasattr(j, "job_id") else j) for j in dependency)
            params["slurm_additional_parameters"] = {"dependency": f"afterok:{ids}"}
    ex.update_parameters(**params)
    return ex


def submit_stage(stage: str, argv: Sequence[str], executor: str = "slurm", *,
                 folder: str | Path = "runs/submitit", nodes: int = 1, tasks_per_node: int = 1,
                 gpus_per_node: int = 0, cpus_per_task: int = 1, time_min: int = 60,
                 partition: str | None = None, mem_gb: float | None = None,
                 dependency: Sequence[Any] | None = None, mpi: bool | None = None) -> submitit.Job:
    """Submit ``icehpc STAGE ARGV``; ``dependency`` (jobs or ids) chains it with afterok."""
    info = stage_info(stage)
    if not info.submittable:
        raise ValueError(f"cannot submit stage {stage!r}")
    use_mpi = info.launcher == "mpi" if mpi is None else mpi
    local_ranks = 0
    if use_mpi and executor != "slurm" and nodes * tasks_per_node > 1:
        local_ranks, tasks_per_node, nodes = nodes * tasks_per_node, 1, 1
    if executor != "slurm" and dependency:
        for job in dependency:  # the local executors have no scheduler: wait in order instead
            job.results()
    ex = make_executor(executor, folder, nodes=nodes, tasks_per_node=tasks_per_node,
                       gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time_min=time_min,
                       partition=partition, mem_gb=mem_gb, mpi=use_mpi, dependency=dependency,
                       job_name=f"icehpc-{stage}")
    return ex.submit(StageJob(stage, argv, use_mpi, local_ranks))
