"""Pipeline steps are fingerprinted by their command, the files they read and their upstream steps:
a config or input change reruns the step and everything after it (stale outputs removed, the log
says why); an unchanged step stays done; --data runs the whole chain on the user's images."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icehpc import config as cfglib
from icehpc.contract import Status
from icehpc.run import plan as planlib, steps as steplib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def markers_stand_for_outputs(monkeypatch, request):
    """These tests are about the pipeline's records: a stage's output counts as complete when its
    marker exists (the stages' own checks are tested with their modules)."""
    if "real_status" not in request.keywords:
        monkeypatch.setattr(steplib.Step, "status",
                            lambda self: Status(self.done.exists(), "marker" if self.done.exists() else "no output"))


def _plan(out: Path, *overrides: str) -> list[steplib.Step]:
    cfg = cfglib.load(planlib.PipelineConfig, "demo.yaml", ["real.archives=[]", *overrides])
    return planlib.plan(cfg, out)


def _pretend_ran(steps: list[steplib.Step]) -> None:
    for step in steps:
        step.prepare()
        step.done.parent.mkdir(parents=True, exist_ok=True)
        step.done.write_text("{}")


def test_config_change_reruns_the_step_and_everything_after_it(tmp_path):
    first = _plan(tmp_path, "synth.n=400")
    _pretend_ran(first)
    assert all(s.is_done() for s in _plan(tmp_path, "synth.n=400"))

    changed = _plan(tmp_path, "synth.n=800", "kappa.overrides=[bootstrap=0]")
    assert not any(s.is_done() for s in changed)  # every step waits (transitively) on synth
    why = {s.name: s.why_run() for s in changed}
    assert "--n 400 → 800" in why["synth"], why["synth"]
    assert "bootstrap=0" in why["kappa-trained"] and "upstream step(s) embed changed" in why["kappa-trained"]
    kappa = next(s for s in changed if s.name == "kappa-trained")
    assert "bootstrap=0" in kappa.command()
    changed[0].prepare()  # the stale synthetic images are removed before synth runs again
    assert not (tmp_path / "synth" / "planted.json").exists()


def test_downstream_only_change_keeps_upstream_done(tmp_path):
    _pretend_ran(_plan(tmp_path, "synth.n=400"))
    again = {s.name: s for s in _plan(tmp_path, "synth.n=400", "kappa.overrides=[bootstrap=0]")}
    assert all(again[n].is_done() for n in ("synth", "shards", "pretrain", "export", "embed", "embed-random", "probe"))
    assert not again["kappa-trained"].is_done() and not again["kappa-random"].is_done()
    assert not again["report"].is_done()  # reads the κ folders
    assert "upstream step(s) kappa-random, kappa-trained changed" in again["report"].why_run()


def test_a_marker_without_a_fingerprint_is_not_trusted(tmp_path):
    steps = _plan(tmp_path, "synth.n=400")
    steps[0].done.parent.mkdir(parents=True)
    steps[0].done.write_text("{}")
    assert not steps[0].is_done() and "no fingerprint recorded" in steps[0].why_run()


def test_user_data_is_fingerprinted_by_content(tmp_path):
    data = tmp_path / "images"
    (data / "plate").mkdir(parents=True)
    (data / "plate" / "a.png").write_bytes(b"x")
    out = tmp_path / "run"
    steps = _plan(out, f"data.inputs={json.dumps([str(data)])}")
    assert [s.name for s in steps][:2] == ["shards", "pretrain"] and "synth" not in [s.name for s in steps]
    assert str(data) in steps[0].argv and "--label-column=habit" in steps[0].argv
    kappa = next(s for s in steps if s.name == "kappa-trained")
    assert "drop_empty_columns=true" in kappa.argv  # data without temperature or campaign still runs
    _pretend_ran(steps)
    (data / "plate" / "b.png").write_bytes(b"y")
    again = _plan(out, f"data.inputs={json.dumps([str(data)])}")
    assert not again[0].is_done() and f"file(s) {data}" in again[0].why_run()


def test_plan_with_data_flag_through_the_cli(tmp_path):
    data = tmp_path / "images" / "column"
    data.mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "icehpc", "pipeline", "--out", str(tmp_path / "o"), "--plan",
                          "--data", str(tmp_path / "images"), "real.archives=[]"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    names = [line.split("\t")[0] for line in res.stdout.splitlines() if not line.startswith("#")]
    assert names == ["shards", "pretrain", "export", "embed", "embed-random", "kappa-trained", "kappa-random",
                     "probe", "report"]
    bad = subprocess.run([sys.executable, "-m", "icehpc", "pipeline", "--out", str(tmp_path / "o"), "--plan",
                          "--data", str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--data" in bad.stderr and "Traceback" not in bad.stderr
