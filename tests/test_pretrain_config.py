"""Bad pretraining values are config errors naming the key, from Python and the CLI, before any work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icehpc.config import ConfigError
from cli_helpers import one_clear_line

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icehpc", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("override,key", [("data.batch_size=0", "batch_size"), ("data.canvas=0", "canvas"),
                                          ("data.num_workers=-1", "num_workers"), ("optim.lr=.nan", "lr"),
                                          ("optim.weight_decay=-5", "weight_decay"),
                                          ("data.batches_per_epoch=0", "batches_per_epoch"),
                                          ("optim.clip_grad=-1", "clip_grad"), ("train.epochs=.inf", "epochs"),
                                          ("loss.student_temp=.nan", "student_temp")])
def test_bad_pretraining_values_are_config_errors_naming_the_key(override, key):
    from icehpc import config as cfglib
    from icehpc.ssl.config import PretrainConfig

    with pytest.raises(ConfigError, match=rf"{override.split('.')[0]}(: |\.){key}(=\S+)?:? .*(must|expected a finite)"):
        cfglib.load(PretrainConfig, "pretrain-tiny-cpu.yaml", [override])


def test_bad_pretraining_value_via_cli_is_one_line_before_any_work(tmp_path):
    proc = _cli("pretrain", "--config", "pretrain-tiny-cpu.yaml", f"out={tmp_path / 'run'}", "data.batch_size=0")
    one_clear_line(proc, "batch_size")
    assert not (tmp_path / "run").exists()
