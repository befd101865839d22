"""The `icehpc` entry point: every stage is reachable and documents itself."""
from __future__ import annotations

import subprocess
import sys

import pytest

from icehpc.run.stages import STAGES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icehpc", *args], capture_output=True, text=True, timeout=300)


def test_top_level_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in STAGES:
        assert f"  {name}" in out.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_has_help(stage):
    out = run_cli(stage, "--help")
    assert out.returncode == 0, out.stderr
    assert f"icehpc {stage}" in out.stdout


def test_unknown_stage_is_a_clear_error():
    out = run_cli("pretrian")
    assert out.returncode == 2
    assert "invalid choice: 'pretrian'" in out.stderr


def test_no_arguments_prints_help_and_exits_2():
    out = run_cli()
    assert out.returncode == 2
    assert "usage: icehpc" in out.stderr


def test_help_of_light_stages_does_not_import_torch():
    code = ("import sys; from icehpc.run.stages import stage_parser\n"
            "for s in ('pretrain', 'pipeline', 'kappa', 'shards', 'embed', 'probe', 'submit'):\n"
            "    stage_parser(s)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_overrides_anywhere_flags_and_provenance(tmp_path):
    """key=value after options, flags winning over overrides, and the config file recorded."""
    import json

    import numpy as np
    from kappa_helpers import write_store

    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "s", rng.normal(size=(120, 8)).astype(np.float32),
                        {"habit": np.array(["a", "b"] * 60)})
    cfg = tmp_path / "k.yaml"
    cfg.write_text("bootstrap: 7\nmin_count: 3\n")
    out = run_cli("kappa", str(store), "--out", str(tmp_path / "k"), "--config", str(cfg), "seed=5",
                  "groupings=[habit]", "--min-count", "4", "min_count=9")
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "k" / "kappa.json").read_text())
    c = res["run"]["config"]
    assert (c["bootstrap"], c["seed"], c["min_count"], c["groupings"]) == (7, 5, 4, ["habit"])
    assert res["run"]["config_source"] == {"file": str(cfg.resolve()),
                                           "overrides": ["seed=5", "groupings=[habit]", "min_count=9"]}


@pytest.mark.parametrize("argv, message", [
    (["kappa", "x.h5", "--out", "k", "--config", "mycfgs/kappa.yaml"], "config file mycfgs/kappa.yaml does not exist"),
    (["kappa", "x.h5", "--out", "k", "bootstrapp=3"], "unknown config key 'bootstrapp'"),
    (["kappa", "x.h5", "--out", "k", "bootstrap=many"], "bootstrap: expected an integer"),
    (["report", "k", "--out", "r", "a=1"], "takes no key=value"),
    (["embed", "s", "--random-init", "--out", "e.h5", "batch_size=0"], "batch_size: must be ≥ 1, got 0"),
    (["embed", "s", "--random-init", "--out", "e.h5", "--batch-size", "-3"], "batch_size: must be ≥ 1, got -3"),
    (["pipeline", "--out", "p", "--plan", "embed.ranks=-1"], "embed.ranks: must be ≥ 1, got -1"),
    (["synth", "--out", "s", "--workers", "-2"], "argument --workers: must be ≥ 1, got -2"),
    (["submit", "synth", "--nodes", "0", "--", "--out", "s"], "argument --nodes: must be ≥ 1, got 0"),
    (["pipeline", "--out", "p", "--plan", "embed.batch_size=-3"], "embed.batch_size: must be ≥ 1, got -3"),
    (["probe", "s.h5", "--out", "p", "k=0"], "need k >= 1"),
    (["shards", "build", "in", "--out", "o", "shard_samples=0"], "shard_samples and shard_bytes must be >= 1"),
    (["pretrain", "--out", "o", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
])
def test_config_mistakes_are_one_clear_line(argv, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "icehpc", *argv], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------ --help a newcomer reads (issue #21)
def _parsers() -> list:
    """Every stage's parser and its sub-commands' (``shards build`` …)."""
    import argparse

    from icehpc.run.stages import stage_parser

    out = []
    for name in STAGES:
        parser = stage_parser(name)
        out.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.extend(action.choices.values())
    return out


def test_every_help_shows_values_as_a_user_writes_them_and_describes_every_argument():
    """No Python reprs, type hints or reST markup; every positional and option described."""
    import re

    for parser in _parsers():
        text = parser.format_help()
        for raw in ("Literal", "``", ":func:", ":data:", "<class", "typing."):
            assert raw not in text, (parser.prog, raw)
        assert not re.search(r"\b[A-Z]\w*\(\w+=", text), (parser.prog, "a Python object repr in the help")
        for action in parser._actions:
            if action.dest != "action":  # the sub-command chooser lists its choices' own help
                assert action.help, (parser.prog, action.dest, "an argument without a description")


def test_choices_and_structured_defaults_are_listed_readably():
    import typing

    from icehpc import config

    for parser in _parsers():
        cls = parser.get_default("_config_schema")
        if cls is None:
            continue
        text = parser.format_help()
        for key, tp in config._flat_hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                assert f"{key} (one of: " + ", ".join(typing.get_args(tp)) in text, (parser.prog, key)
    from icehpc.run.stages import stage_parser

    kappa, pipeline = stage_parser("kappa").format_help(), stage_parser("pipeline").format_help()
    assert "temperature_c: {edges: [-70.0, -60.0," in kappa, kappa
    assert "{name: 2ds, file: 2ds_training.zip, probe: 2D-S, pixel_um: 10.0}" in pipeline, pipeline


def test_a_negative_count_anywhere_is_refused_naming_its_key():
    """Every integer key of every stage (and of the pipeline) refuses -3 before any work, by name:
    e.g. ``embed.ranks=-1`` ran on 1 rank, ``augment.mask_candidates=-3`` crashed later."""
    import typing

    from icehpc import config

    for parser in _parsers():
        cls = parser.get_default("_config_schema")
        if cls is None:
            continue
        for key, tp in config._flat_hints(cls).items():
            if tp is int or int in typing.get_args(tp):
                with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
                    config.load(cls, None, [f"{key}=-3"])
