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

from kappa_helpers import write_store


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
    assert lines[-2].startswith("[embed] 1,000/1,000 images (100.0%)") and "images/s" in lines[-2]
    assert "\r" not in log.getvalue() and len(lines) == 5 and ", done in " in lines[-1]
    tty = _Tty()
    with Progress(1000, "embed", "images", every_s=0, stream=tty) as p:
        p.update(500)
    assert "\r" in tty.getvalue() and "[embed]" not in tty.getvalue()  # tqdm, not log lines
    quiet = io.StringIO()
    with Progress(10, "x", enabled=False, every_s=0, stream=quiet) as p:
        p.update(10)
    assert quiet.getvalue() == ""


class _Clock:
    """A fake ``time`` module for progress.py: ``now`` moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def _timed_lines(monkeypatch, total: int, steps: list[tuple[float, int]], **kw) -> list[str]:
    """The log lines of a loop whose updates come at the given (seconds since start, items) steps."""
    from icehpc import progress

    clock = _Clock()
    monkeypatch.setattr(progress, "time", clock)
    monkeypatch.delenv("ICEHPC_LOG_EVERY", raising=False)
    monkeypatch.delenv("ICEHPC_PROGRESS", raising=False)
    log = io.StringIO()
    start = clock.now
    with Progress(total, "embed", "images", stream=log, **kw) as p:
        for t, n in steps:
            clock.now = start + t
            p.update(n)
    return log.getvalue().splitlines()


def test_a_log_gets_a_first_line_within_seconds_then_every_interval_or_tenth_and_a_last_line(monkeypatch):
    # a 14 s run, one batch of 64 every 0.5 s out of 1,792: a line after 2 s, at each 10 % (>= 2 s apart), a last
    lines = _timed_lines(monkeypatch, 1792, [(0.5 * (i + 1), 64) for i in range(28)])
    assert lines[0].startswith("[embed] 256/1,792 images (14.3%), 128.0 images/s, ETA 0m12s"), lines
    assert lines[-1] == "[embed] 1,792/1,792 images (100.0%), 128.0 images/s, done in 0m14s", lines
    assert 5 <= len(lines) <= 10, lines  # not silent, not a line per batch
    # a long loop of tiny steps: a line every 30 s (the default) before any 10 % is reached
    lines = _timed_lines(monkeypatch, 10**6, [(float(t), 10) for t in range(1, 95)])
    assert [ln.split(" images")[0] for ln in lines] == ["[embed] 20/1,000,000", "[embed] 320/1,000,000",
                                                       "[embed] 620/1,000,000", "[embed] 920/1,000,000",
                                                       "[embed] 940/1,000,000"], lines
    # a slow first batch: its line comes with it; a loop that stops on an error gets no "done" line
    from icehpc import progress

    lines = _timed_lines(monkeypatch, 100, [(9.0, 10)])
    assert len(lines) == 2 and lines[0].startswith("[embed] 10/100 images (10.0%), 1.1 images/s, ETA 1m21s")
    log = io.StringIO()
    try:
        with Progress(100, "embed", "images", stream=log) as p:
            progress.time.now += 5
            p.update(10)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert len(log.getvalue().splitlines()) == 1 and "done" not in log.getvalue()
    # a loop done in under 2 s stays silent (no lone "done" line in front of a stage's own message)
    assert _timed_lines(monkeypatch, 60, [(0.1, 30), (0.2, 30)]) == []


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


def test_resumed_loops_count_from_initial_and_show_their_postfix_in_log_lines():
    log = io.StringIO()
    with Progress(100, "pretrain", "steps", every_s=0, stream=log, initial=60) as p:
        p.set_postfix(loss="1.2345")
        p.update(10)
    line = log.getvalue().splitlines()[-1]
    assert line.startswith("[pretrain] 70/100 steps (70.0%)") and line.endswith("loss 1.2345"), line


def test_every_long_loop_goes_through_progress_not_its_own_bar():
    """One owner of progress output: a tqdm bar elsewhere writes carriage returns into Slurm logs."""
    root = Path(__file__).resolve().parent.parent / "icehpc"
    users = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if "tqdm" in p.read_text().replace("tqdm progress", "") and p.name != "progress.py"]
    assert users == []


def test_a_shard_build_logged_to_a_file_has_no_carriage_returns(tmp_path):
    from PIL import Image

    tree = tmp_path / "in" / "plate"
    tree.mkdir(parents=True)
    for i in range(6):
        Image.new("L", (20, 20), 200 + i).save(tree / f"{i}.png")
    env = {**os.environ, "ICEHPC_LOG_EVERY": "0"}
    env.pop("ICEHPC_PROGRESS", None)
    with open(tmp_path / "log", "w") as log:
        res = subprocess.run([sys.executable, "-m", "icehpc", "shards", "build", str(tmp_path / "in"), "--out",
                              str(tmp_path / "out"), "--workers", "1"], stdout=log, stderr=log, env=env, timeout=120)
    text = (tmp_path / "log").read_text()
    assert res.returncode == 0, text
    assert "\r" not in text and "[shards]" in text, text
