"""The one table of stages: which module runs a stage, how it is launched, whether it wants a GPU.

Everything that starts a stage reads this table: the ``icehpc`` CLI, ``icehpc submit`` (submitit),
``icehpc pipeline`` (local commands and submission) and ``jobs/pipeline.sh`` (through
``icehpc pipeline --plan``, which prints each step's launcher kind). Stage modules are imported only
when a stage runs, so ``icehpc --help`` and ``--plan`` never import torch.

Launcher kinds:

- ``plain``: one process (``srun`` with one task, or just the command);
- ``mpi``: N MPI ranks (``mpiexec -n N`` locally, ``srun --mpi=pmix`` on Slurm);
- ``torch``: N torch.distributed processes (``torch.distributed.run`` locally; ``srun`` with the
  rank variables derived from ``SLURM_*`` on Slurm, see :mod:`icehpc.dist`).
"""
from __future__ import annotations

import argparse
import importlib
import signal
from dataclasses import dataclass
from typing import Literal, Sequence

from ..contract import Contract

Launcher = Literal["plain", "mpi", "torch"]


@dataclass(frozen=True)
class Stage:
    module: str
    help: str
    launcher: Launcher = "plain"
    gpu: bool = False
    submittable: bool = True  # a job of its own (pipeline and submit submit others instead)
    #: where the stage's output contract is declared ("module:NAME"), beside its writer
    contract: str = ""
    #: its ``--out`` names a file (else a folder)
    out_file: bool = False


#: name → stage, in the pipeline's order.
STAGES: dict[str, Stage] = {
    "synth": Stage("icehpc.data.synth", "make synthetic CPI-like particle images with planted habit physics",
                   contract="icehpc.data.synth:CONTRACT"),
    "shards": Stage("icehpc.data.shards", "build / verify / stats of WebDataset tar shards",
                    contract="icehpc.data.format:CONTRACT"),
    "pretrain": Stage("icehpc.ssl.pretrain", "iBOT-vMF pretraining on DeepSpeed (CPU or GPU, 1..N nodes)",
                      "torch", gpu=True, contract="icehpc.ssl.pretrain:CONTRACT"),
    "export": Stage("icehpc.ssl.export", "export the teacher backbone of a checkpoint as .safetensors",
                    out_file=True),
    "embed": Stage("icehpc.analysis.embed", "MPI-parallel [CLS] embedding of shards into an HDF5 store",
                   "mpi", gpu=True, out_file=True),  # one contract per store: icehpc.analysis.embed.contract(STORE)
    "kappa": Stage("icehpc.analysis.kappa", "MPI-parallel vMF concentration (kappa) per group, with CIs", "mpi",
                   contract="icehpc.analysis.kappa:CONTRACT"),
    "curate": Stage("icehpc.analysis.curate", "MPI hierarchical k-means and balanced sampling of a store "
                    "(a curated pretraining set)", "mpi", contract="icehpc.analysis.curate:CONTRACT"),
    "outliers": Stage("icehpc.analysis.outliers", "MPI kNN rarity and mislabel scores of a store, with an HTML "
                      "page of the top samples", "mpi", contract="icehpc.analysis.outliers:CONTRACT"),
    "classify": Stage("icehpc.analysis.classify", "MPI label prediction for every row of a store from a few labeled "
                      "ones (cross-validated logistic regression)", "mpi",
                      contract="icehpc.analysis.classify:CONTRACT"),
    "report": Stage("icehpc.analysis.report", "offline HTML/PNG/CSV report of a kappa run",
                    contract="icehpc.analysis.report:CONTRACT"),
    "probe": Stage("icehpc.analysis.probe", "kNN / logistic-regression habit probes and baselines",
                   contract="icehpc.analysis.probe:CONTRACT"),
    "pipeline": Stage("icehpc.run.pipeline", "run every stage in order on one machine (or chained on Slurm)",
                      submittable=False),
    "submit": Stage("icehpc.run.submit", "submit a stage (or the pipeline) to Slurm/local via submitit",
                    submittable=False),
}


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})") from None


def contract(name: str) -> Contract:
    """The output contract of a stage that writes one folder: the one its module declares (at
    ``Stage.contract``)."""
    st = stage(name)
    declared = None
    if st.contract:
        module, _, attr = st.contract.partition(":")
        declared = getattr(importlib.import_module(module), attr, None)
    if not isinstance(declared, Contract):
        raise ValueError(f"stage {name} declares no output contract")
    return declared


def stage_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one stage (imports that stage's module); ``_run`` holds its entry."""
    st = stage(name)
    module = importlib.import_module(st.module)
    parser = argparse.ArgumentParser(prog=f"icehpc {name}", description=st.help)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def parse_stage_args(name: str, argv: Sequence[str]) -> argparse.Namespace:
    """``icehpc NAME ARGV``'s parsed arguments, dotted ``key=value`` overrides included (what the
    stage's ``run(args)`` and ``status(args)`` take). A bad argument exits 2 with argparse's line."""
    from ..config import split_overrides

    parser = stage_parser(name)
    rest, overrides = split_overrides(parser, argv)
    args = parser.parse_args(rest)
    if overrides:
        if getattr(args, "_config_schema", None) is None:
            parser.error(f"takes no key=value config overrides (got {' '.join(overrides)})")
        args.overrides = overrides
    return args


class Stopped(KeyboardInterrupt):
    """A signal that stops a stage, raised like Ctrl-C's KeyboardInterrupt so that the same
    cleanups run (temporaries removed, locks released): SIGTERM from a launcher stopping its ranks,
    ``kill`` or Slurm's ``scancel``; or a step of the pipeline stopped by a signal (``where``)."""

    def __init__(self, signum: int = signal.SIGINT, where: str = "") -> None:
        super().__init__(signum, where)
        self.signum, self.where = signum, where


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def stop_signal(exc: KeyboardInterrupt) -> int:
    """The signal behind ``exc``: its own, else SIGINT (Ctrl-C's KeyboardInterrupt)."""
    return exc.signum if isinstance(exc, Stopped) else signal.SIGINT


def run_stage(name: str, argv: Sequence[str]) -> int:
    """``icehpc NAME ARGV`` in this process; returns the exit code. A user's mistake is one line on
    stderr (config errors, a missing input, ``--out`` naming a file: checked before the stage runs;
    exit 2); Ctrl-C or SIGTERM is one line saying that finished outputs are kept and that the same
    command resumes (exit 130, 143). Of a parallel job's ranks only rank 0 prints these lines: the
    ranks agree on them (rank 0 decides and broadcasts), the others exit silently."""
    import sys
    import threading

    from ..config import ConfigError, UserError
    from ..dist import from_env
    from ..fileio import LockedError, check_output_path

    def say(line: str) -> None:
        if from_env().rank == 0:
            print(f"icehpc {name}: {line}", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop)  # for the rest of the process; not where submitit handles it
    out = None
    try:
        args = parse_stage_args(name, argv)  # imports the stage (torch: seconds a Ctrl-C may fall in)
        out = getattr(args, "out", None)
        if out is not None:
            check_output_path(out, folder=not stage(name).out_file)
        return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:
        signum = stop_signal(exc)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        where = f" {exc.where}" if isinstance(exc, Stopped) and exc.where else ""
        say(f"{what}{where}; finished outputs are kept, rerun the same command to resume")
        return 128 + signum
    except ConfigError as exc:
        say(f"config error: {exc}")
        return 2
    except LockedError as exc:  # another job writes the same output folder
        say(f"error: {exc}")
        return 1
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        # a path the user gave that is not there or not a file: one line, not a traceback
        say(f"error: {exc}")
        return 2
    except OSError as exc:
        line = storage_error(exc, out)
        if line is None:
            raise
        say(f"error: {line}")  # disk full, quota, read-only: one line
        return 1


def storage_error(exc: OSError, out: object = None) -> str | None:
    """One line for an OSError the user fixes on the storage side (disk full, quota, read-only
    file system, no permission): what, where (the file, else the output folder) and what to do;
    None for any other OSError."""
    import errno

    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}.get(exc.errno or 0)
    if what is None:
        return None
    where = exc.filename or (f"a file under {out}" if out else "an output file")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        where = f"while writing {where}"
    else:
        where = f"on {where}"
    fix = ("free space (or raise the quota) there or choose another output folder, then rerun: finished "
           "outputs are kept and a rerun redoes only what is missing"
           if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
           "check its permissions or choose an output folder you can write to, then rerun")
    return f"{what} {where}; {fix}"
