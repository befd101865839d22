"""The pipeline's plan as a preview and as data: `--plan` changes nothing on disk, a rerun removes
only the stage's own files (a user's files under --out stay), the images a manifest names are
fingerprinted, nested configs are validated before anything happens, and jobs/pipeline.sh passes
the plan as NUL-separated data (no path is ever run as shell code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icehpc import config as cfglib
from icehpc.contract import Status
from icehpc.run import plan as planlib, steps as steplib

ROOT = Path(__file__).resolve().parent.parent
TINY = ["real.archives=[]", "synth.n=40"]


def _plan(out: Path, *overrides: str) -> list[steplib.Step]:
    return planlib.plan(cfglib.load(planlib.PipelineConfig, "demo.yaml", [*TINY, *overrides]), out)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icehpc", "pipeline", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=_env())


def _markers_are_outputs(monkeypatch) -> None:
    monkeypatch.setattr(steplib.Step, "status",
                        lambda self: Status(self.done.exists(), "marker" if self.done.exists() else "no output"))


#: A finished run's files (by stage) and a user's files beside them.
STAGE_FILES = ["synth/planted.json", "synth/manifest.csv", "synth/images/0000/0000000.png",
               "shards/index.json", "shards/shard-000000.tar", "shards/rejected.jsonl",
               "pretrain/backbone.safetensors", "pretrain/checkpoints/step-2/model.pt", "backbone.safetensors",
               "embed/trained.h5", "embed/trained.h5.json", "embed/trained.h5.parts/shard-000000.h5",
               "kappa/trained/kappa.json", "kappa/trained/kappa.csv", "report/index.html", "report/kappa_habit.png",
               "report/kappa_habit.pdf", "probe/probe.json"]
USER_FILES = ["report/final_figures.pdf", "shards/README.txt", "kappa/trained/notes.txt", "embed/my-notes.md",
              "notes.txt"]


def _finished_run(out: Path) -> None:
    """Every step prepared (records written) and each file of STAGE_FILES and USER_FILES present."""
    for step in _plan(out):
        step.prepare()
    for rel in STAGE_FILES + USER_FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(rel)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_plan_changes_nothing_on_disk_and_says_why(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    before = _snapshot(out)
    res = _cli("--config", "configs/demo.yaml", "--out", str(out), "--plan", *TINY, "synth.n=80")
    assert res.returncode == 0, res.stderr
    assert _snapshot(out) == before  # nothing removed, rewritten or touched: records included
    assert "[pipeline] synth: would run, inputs changed: --n 40 → 80" in res.stderr
    assert [line.split("\t")[0] for line in res.stdout.splitlines()][:3] == ["# out=" + str(out), "synth", "shards"]
    fresh = tmp_path / "fresh"
    assert _cli("--config", "configs/demo.yaml", "--out", str(fresh), "--plan", *TINY).returncode == 0
    assert not fresh.exists()


def test_a_rerun_removes_only_the_stages_own_files(tmp_path, monkeypatch):
    _markers_are_outputs(monkeypatch)
    out = tmp_path / "run"
    _finished_run(out)
    changed = _plan(out, "synth.n=80")
    pending = steplib.evaluate(changed)
    assert [s.name for s in pending][:2] == ["synth", "shards"] and len(pending) == len(changed)
    for step in pending:
        step.prepare()
    for rel in USER_FILES:
        assert (out / rel).read_text() == rel, rel
    left = [rel for rel in STAGE_FILES if (out / rel).exists()]
    assert left == [], left
    assert (out / "shards").is_dir() and (out / "report").is_dir()  # folders holding a user's file stay


def test_an_image_replaced_under_a_manifest_reruns_shards_and_everything_after(tmp_path, monkeypatch):
    _markers_are_outputs(monkeypatch)
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for i in range(3):
        (data / "img" / f"{i}.png").write_bytes(b"png%d" % i)
    (data / "m.csv").write_text("path,habit\nimg/0.png,plate\nimg/1.png,column\nimg/2.png,plate\n")
    out = tmp_path / "run"
    inputs = f"data.inputs={json.dumps([str(data / 'm.csv')])}"
    first = _plan(out, inputs)
    for step in first:
        step.prepare()
        step.done.parent.mkdir(parents=True, exist_ok=True)
        step.done.write_text("{}")
    assert steplib.evaluate(_plan(out, inputs)) == []
    img = data / "img" / "1.png"
    st = img.stat()
    img.write_bytes(b"PNG1")  # same name, same size, other bytes
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = _plan(out, inputs)
    pending = steplib.evaluate(again)
    assert [s.name for s in pending] == [s.name for s in again]  # shards and every step after it
    assert f"file(s) {data / 'm.csv'}" in pending[0].why


@pytest.mark.parametrize("override, says", [("kappa.overrides=[min_cout=5]", "min_cout"),
                                            ("pretrain.overrides=[train.epochs=many]", "epochs"),
                                            ("probe.label_fractions=[0.5,0.1]", "probe.label_fractions")])
def test_nested_overrides_are_checked_before_anything_runs(tmp_path, override, says):
    out = tmp_path / "run"
    _finished_run(out)
    before = _snapshot(out)
    for mode in (["--plan"], []):
        res = _cli("--config", "configs/demo.yaml", "--out", str(out), *mode, *TINY, override)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in res.stderr, res.stderr
        assert _snapshot(out) == before


def test_probe_steps_carry_the_label_fractions(tmp_path):
    from icehpc.analysis.probe import settings_from_args
    from icehpc.run.stages import stage_parser

    def fractions(*overrides: str) -> list[float] | None:
        argv = {s.name: s for s in _plan(tmp_path / "run", *overrides)}["probe"].argv
        return settings_from_args(stage_parser("probe").parse_args(argv)).label_fractions \
            if "--label-fractions" in argv else None

    assert fractions() == planlib.ProbeStep().label_fractions == [0.01, 0.05, 0.1, 0.25, 1.0]
    assert fractions("probe.label_fractions=[0.1,0.3]") == [0.1, 0.3]
    assert fractions("probe.label_fractions=[]") is None


def test_pipeline_sh_passes_a_hostile_out_as_data(tmp_path):
    """An --out holding $(...), a quote and a newline reaches sbatch intact and runs nothing."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    record = ('#!/bin/bash\nn=$(ls "$CALLS" | wc -l)\nprintf \'%s\\0\' "$@" > "$CALLS/$(printf %03d "$n")"\n')
    (fake / "sbatch").write_text(record + 'echo "$((100 + n))"\n')
    (fake / "srun").write_text(record)
    for f in fake.iterdir():
        f.chmod(0o755)
    out = tmp_path / "run $(touch PWNED) 'q\"\nx"
    env = {**_env(), "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", "CALLS": str(calls),
           "ICEHPC_ROOT": str(ROOT), "ICEHPC_SBATCH_ARGS": "", "VIRTUAL_ENV": ""}
    args = ["--config", "configs/demo.yaml", "--out", str(out), *TINY]
    res = subprocess.run(["bash", "jobs/pipeline.sh", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=180, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not list(ROOT.glob("PWNED")) and not list(tmp_path.rglob("PWNED"))
    submitted = [f.read_bytes().split(b"\0")[:-1] for f in sorted(calls.iterdir())]
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert names[0] == "synth" and names[-1] == "finish" and len(submitted) == len(names)
    first = [a.decode() for a in submitted[0]]
    assert f"--output={out}/slurm/synth-%j.out" in first
    step = first[first.index(str(ROOT / "jobs" / "pipeline.sh")) + 1:]
    assert step[:4] == ["--step", "plain", "synth", str(len(args))] and step[4:4 + len(args)] == args
    assert step[4 + len(args):4 + len(args) + 3] == ["synth", "--out", str(out.resolve() / "synth")]
    assert any("--dependency=afterok:100" == a.decode() for a in submitted[1])  # shards waits on synth
    # the step job itself: prepares its step (records it) then starts the stage through srun, intact
    for f in calls.iterdir():
        f.unlink()
    job = subprocess.run(["bash", "jobs/pipeline.sh", *step], capture_output=True, text=True, cwd=ROOT,
                         timeout=180, env=env)
    assert job.returncode == 0, job.stdout + job.stderr
    assert (out.resolve() / ".pipeline" / "synth.json").exists()
    ran = [a.decode() for a in next(calls.iterdir()).read_bytes().split(b"\0")[:-1]]
    assert ran[-len(step[4 + len(args):]):] == step[4 + len(args):]
    assert not list(ROOT.glob("PWNED")) and not list(tmp_path.rglob("PWNED"))
