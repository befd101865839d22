"""The ``icehpc`` command: one thin subcommand per pipeline stage (the table is :mod:`.stages`)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .stages import STAGES, run_stage


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icehpc",
        description="icehpc: ice-crystal self-supervised representations and vMF diversity reports.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {n:<9} {s.help}" for n, s in STAGES.items())
        + "\n\nRun `icehpc STAGE --help` for a stage's options.",
    )
    p.add_argument("stage", choices=list(STAGES), metavar="STAGE", help="one of: " + ", ".join(STAGES))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if argv and argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if not argv:
        top.print_help(sys.stderr)
        return 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__
        print(f"icehpc {__version__}")
        return 0
    top.parse_args(argv[:1])  # validates the stage name with a clear error
    return run_stage(argv[0], argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
