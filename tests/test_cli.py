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
