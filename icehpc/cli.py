"""The ``icehpc`` command: one thin subcommand per pipeline stage.

Each stage module exposes ``add_arguments(parser)`` and ``run(args) -> int | None``; this file only
dispatches. Stage modules are imported lazily so that ``icehpc --help`` and light stages do not pay
for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .config import ConfigError

# name → (module, one-line help). Order is the pipeline's order.
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("icehpc.synth", "make synthetic CPI-like particle images with planted habit physics"),
    "shards": ("icehpc.shards", "build / verify / stats of WebDataset tar shards"),
    "pretrain": ("icehpc.pretrain", "iBOT-vMF pretraining on DeepSpeed (CPU or GPU, 1..N nodes)"),
    "export": ("icehpc.pretrain_export", "export the teacher backbone of a checkpoint as .safetensors"),
    "embed": ("icehpc.embed", "MPI-parallel [CLS] embedding of shards into an HDF5 store"),
    "kappa": ("icehpc.kappa", "MPI-parallel vMF concentration (kappa) per group, with CIs"),
    "report": ("icehpc.report", "offline HTML/PNG/CSV report of a kappa run"),
    "probe": ("icehpc.probe", "kNN / logistic-regression habit probes and baselines"),
    "pipeline": ("icehpc.pipeline", "run every stage in order on one machine"),
    "submit": ("icehpc.launch", "submit a stage (or the pipeline) to Slurm/local via submitit"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icehpc",
        description="icehpc: ice-crystal self-supervised representations and vMF diversity reports.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {n:<9} {h}" for n, (_, h) in STAGES.items())
        + "\n\nRun `icehpc STAGE --help` for a stage's options.",
    )
    p.add_argument("stage", choices=list(STAGES), metavar="STAGE", help="one of: " + ", ".join(STAGES))
    return p


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """The argument parser of one stage (imports that stage's module)."""
    module_name, help_text = STAGES[stage]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"icehpc {stage}", description=help_text)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"icehpc {__version__}")
        return 0
    top.parse_args(argv[:1])  # validates the stage name with a clear error
    parser = stage_parser(argv[0])
    args = parser.parse_args(argv[1:])
    try:
        code = args._run(args)
    except ConfigError as exc:
        print(f"icehpc {argv[0]}: config error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
