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
    (["embed", "s", "--random-init", "--out", "e.h5", "batch_size=0"], "batch_size must be >= 1"),
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
