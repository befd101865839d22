"""Who am I in a parallel job: rank/world/master from torchrun, Slurm or Open MPI variables.

Three launchers start our ranks (torchrun / the deepspeed launcher, ``srun``, ``mpiexec``), and
each names the same facts differently. Everything in icehpc asks :func:`from_env` and never reads
launcher variables itself. MPI stages use :func:`mpi_comm`, which returns mpi4py's COMM_WORLD when
the process was started by an MPI launcher and a one-rank stand-in otherwise, so every stage also
runs as a plain single process.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | slurm | mpi | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist (``node[01-04],gpu7`` → ``node01``), via scontrol if present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^(.*?)\[([^\],\-]+)", first)
    return m.group(1) + m.group(2) if m else first


def default_port(job_id: str | None) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    if job_id and job_id.isdigit():
        return 20000 + int(job_id) % 20000
    return 29500


def from_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read rank and rendezvous facts from the launcher's environment (torchrun > Slurm > MPI)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = env.get("SLURM_JOB_ID")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int((env.get("SLURM_TASKS_PER_NODE") or "1").split("(")[0]),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or default_port(job)), launcher="slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistEnv(
            rank=int(env["OMPI_COMM_WORLD_RANK"]), world_size=int(env["OMPI_COMM_WORLD_SIZE"]),
            local_rank=int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            local_world_size=int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", socket.gethostname() if env.get("OMPI_COMM_WORLD_SIZE", "1") != "1" else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)), launcher="mpi")
    return DistEnv()


def export_torch_env(d: DistEnv) -> None:
    """Set the five variables torch.distributed/DeepSpeed read, so DeepSpeed never calls MPI_Init.

    With more than one rank, each rank says on stderr where it runs and which rendezvous it uses:
    on several nodes a wrong master address (``localhost``, a name that does not resolve there) is
    otherwise only a hang in the first collective.
    """
    new = dict(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
               LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))
    changed = any(os.environ.get(k) != v for k, v in new.items())
    os.environ.update(new)
    if d.world_size > 1 and changed:  # said once, by whoever sets them first (submitit, then DeepSpeed)
        import sys

        print(f"[icehpc] rank {d.rank}/{d.world_size} on {socket.gethostname()}: rendezvous "
              f"{d.master_addr}:{d.master_port} ({d.launcher})", file=sys.stderr, flush=True)


def launched_by_mpi(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE")) or (
        "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)


class SerialComm:
    """One-rank stand-in for an mpi4py communicator (the methods icehpc uses)."""

    rank = 0
    size = 1

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = None) -> None:
        recvbuf[...] = sendbuf

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list:
        return [obj]

    def allgather(self, obj: Any) -> list:
        return [obj]

    def Barrier(self) -> None:
        return None

    barrier = Barrier

    def Abort(self, errorcode: int = 1) -> None:
        raise SystemExit(errorcode)


def mpi_comm(force_mpi: bool = False) -> Any:
    """COMM_WORLD under an MPI launcher (checked against SLURM_NTASKS), else a SerialComm.

    The check matters: an srun without the right ``--mpi`` plugin silently starts N singletons that
    each believe they are rank 0 of 1 and would all write the same output.
    """
    if not (force_mpi or launched_by_mpi()):
        return SerialComm()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    ntasks = os.environ.get("SLURM_NTASKS") if "SLURM_STEP_ID" in os.environ else None
    if ntasks is not None and comm.Get_size() != int(ntasks):
        raise RuntimeError(
            f"MPI world size {comm.Get_size()} != SLURM_NTASKS={ntasks}: srun started singletons; "
            "launch with `srun --mpi=pmix` (see `srun --mpi=list`) or mpiexec")
    return comm


def sum_op(comm: Any) -> Any:
    """MPI.SUM for a real communicator, None for SerialComm (importing mpi4py.MPI would MPI_Init)."""
    if isinstance(comm, SerialComm):
        return None
    from mpi4py import MPI

    return MPI.SUM


def run_on_root(comm: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result (or its error) to every rank."""
    result: tuple[bool, Any] = (True, None)
    if comm.Get_rank() == 0:
        try:
            result = (True, fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            result = (False, exc)
    ok, value = comm.bcast(result, root=0)
    if not ok:
        raise value
    return value


def lock_on_root(comm: Any, held: Any, folder: Any, what: str) -> None:
    """Rank 0 takes :func:`icehpc.fileio.lock_dir` of ``folder`` into the ExitStack ``held`` (kept
    until the stack closes); when another job holds it, every rank raises the same LockedError."""
    from .fileio import lock_dir

    def take() -> None:
        held.enter_context(lock_dir(folder, what))

    run_on_root(comm, take)


# ------------------------------------------------------------------- collectives of the MPI store stages
def block_range(n_rows: int, rank: int, size: int, block: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``rank``: a contiguous run of whole ``block``-row blocks (the last may be
    short), so a result that depends on blocks (seeded per block) is the same on any rank count."""
    nblocks = -(-n_rows // block)
    b0, b1 = nblocks * rank // size, nblocks * (rank + 1) // size
    return min(b0 * block, n_rows), min(b1 * block, n_rows)


def allreduce_sum(comm: Any, arrays: list[Any], dtype: Any = None) -> None:
    """Sum numpy arrays over ranks in place, in one collective (``dtype``: of the message; default
    the arrays' common type). Nothing to do on one rank."""
    import numpy as np

    if comm.Get_size() == 1:
        return
    flat = np.concatenate([a.ravel() if dtype is None else a.ravel().astype(dtype) for a in arrays])
    out = np.empty_like(flat)
    comm.Allreduce(flat, out, op=sum_op(comm))
    off = 0
    for a in arrays:
        a[...] = out[off:off + a.size].reshape(a.shape)
        off += a.size


def agree_on_errors(comm: Any, err: BaseException | None, error: type[Exception] = RuntimeError) -> None:
    """Collective: if any rank failed, raise on every rank (no rank left waiting in the next
    collective): on one rank the error itself, else ``error`` naming the first failing ranks."""
    msgs = comm.allgather(None if err is None else f"{type(err).__name__}: {err}")
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        if err is not None and comm.Get_size() == 1:
            raise err
        raise error("; ".join(f"rank {r}: {m}" for r, m in bad[:3]))
