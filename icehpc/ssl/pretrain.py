"""``icehpc pretrain``: the command's door (arguments and config, no torch import: ``--help`` is fast).

The work is :func:`icehpc.ssl.trainer.pretrain`; see :mod:`icehpc.ssl.trainer` for the run itself.
"""
from __future__ import annotations

import argparse

from .. import config as cfglib
from ..contract import Contract
from ..fileio import check_output_path
from .config import METRICS, RUN_CONFIG, PretrainConfig

#: The run folder: the exported teacher backbone is its marker (written last by the trainer); the
#: checkpoints carry their own sha256 manifest (:mod:`icehpc.ssl.checkpoint`, the layout's owner).
CONTRACT = Contract("backbone.safetensors", ("checkpoints/*", RUN_CONFIG, METRICS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cfglib.add_config_arguments(parser, PretrainConfig, {"--out": "out"})


def run(args: argparse.Namespace) -> int:
    cfg = cfglib.from_args(PretrainConfig, args)
    check_output_path(cfg.out, "--out" if getattr(args, "_flag_out", None) else "out")  # the flag or config key
    from .trainer import pretrain

    return pretrain(cfg, cfglib.provenance(args))
