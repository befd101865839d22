"""Long jobs talk: plain periodic lines when stderr is not a terminal, a tqdm bar when it is; embed
and kappa report progress and end with a summary line; pretrain says where its outputs are."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from icehpc.progress import Progress

sys.path.insert(0, str(Path(__file__).parent))
from kappa_helpers import write_store  # noqa: E402


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal_and_a_bar_on_one(monkeypatch):
    monkeypatch.delenv("ICEHPC_PROGRESS", raising=False)
    log = io.StringIO()
    with Progress(1000, "embed", "images", every_s=0, stream=log) as p:
        for _ in range(4):
            p.update(250)
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("[embed] 1,000/1,000 images (100.0%)") and "images/s" in lines[-1]
    assert "\r" not in log.getvalue() and len(lines) == 4
    tty = _Tty()
    with Progress(1000, "embed", "images", every_s=0, stream=tty) as p:
        p.update(500)
    assert "\r" in tty.getvalue() and "[embed]" not in tty.getvalue()  # tqdm, not log lines
    quiet = io.StringIO()
    with Progress(10, "x", enabled=False, every_s=0, stream=quiet) as p:
        p.update(10)
    assert quiet.getvalue() == ""


def test_kappa_logs_progress_and_a_summary_in_a_slurm_log(tmp_path):
    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "s", rng.normal(size=(300, 8)).astype(np.float32),
                        {"habit": np.array(["a", "b", "c"] * 100)})
    env = {**os.environ, "ICEHPC_LOG_EVERY": "0"}
    env.pop("ICEHPC_PROGRESS", None)
    out = subprocess.run([sys.executable, "-m", "icehpc", "kappa", str(store), "--out", str(tmp_path / "k"),
                          "groupings=[habit]", "bootstrap=5", "min_count=5"],
                         capture_output=True, text=True, timeout=300, env=env)  # stderr is a pipe: no TTY
    assert out.returncode == 0, out.stderr
    assert "[kappa] 300/300 rows (100.0%)" in out.stderr and "\r" not in out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("icehpc kappa: 300 rows")


def test_pretrain_last_line_says_where_checkpoint_and_backbone_are(tmp_path):
    from icehpc.ssl.trainer import where_line

    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000004\n")
    line = where_line(tmp_path, 4, 10)
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'step-00000004'}" in line
    assert f"`icehpc export {tmp_path}`" in line
    (tmp_path / "backbone.safetensors").write_bytes(b"x")
    assert f"backbone: {tmp_path / 'backbone.safetensors'};" in where_line(tmp_path, 10, 10)
