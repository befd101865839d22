"""``icehpc pretrain``: the command's door (arguments and config, no torch import: ``--help`` is fast).

The work is :func:`icehpc.ssl.trainer.pretrain`; see :mod:`icehpc.ssl.trainer` for the run itself.
"""
from __future__ import annotations

import argparse

from .. import config as cfglib
from .config import PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cfglib.add_config_arguments(parser, PretrainConfig, {"--out": "out"})


def run(args: argparse.Namespace) -> int:
    cfg = cfglib.from_args(PretrainConfig, args)
    from .trainer import pretrain

    return pretrain(cfg, cfglib.provenance(args))
