"""submitit launches run exactly the CLI command, on the real local Slurm and on the local executor;
the local cluster script keeps its state in a private folder."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from icehpc.run import launch

ROOT = Path(__file__).resolve().parent.parent


def synth_args(out: Path) -> list[str]:
    return ["--out", str(out), "--n", "40", "--seed", "11"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    subprocess.run([sys.executable, "-m", "icehpc", "synth", *synth_args(out)], check=True, timeout=300)
    return out


@pytest.mark.slurm
def test_slurm_executor_matches_local_cli(slurm_cluster, local_run, tmp_path):
    out = tmp_path / "synth"
    job = launch.submit_stage("synth", synth_args(out), executor="slurm", folder=tmp_path / "submitit",
                              time_min=5, partition=slurm_cluster["partition"])
    assert job.result() == 0
    assert tree_bytes(out) == tree_bytes(local_run)
    # read back from sacct (what submitit relies on to notice dead jobs); accounting lags a moment
    for _ in range(40):
        if job.get_info(mode="force").get("State") == "COMPLETED":
            break
        time.sleep(0.5)
    assert job.get_info(mode="force").get("State") == "COMPLETED"


@pytest.mark.slurm
def test_slurm_failure_surfaces_instead_of_hanging(slurm_cluster, tmp_path):
    job = launch.submit_stage("synth", ["--no-such-option"], executor="slurm", folder=tmp_path / "submitit",
                              time_min=5, partition=slurm_cluster["partition"])
    with pytest.raises(submitit.core.utils.FailedJobError):
        job.result()


def test_local_executor_matches_local_cli(local_run, tmp_path):
    out = tmp_path / "synth"
    job = launch.submit_stage("synth", synth_args(out), executor="local", folder=tmp_path / "submitit", time_min=5)
    assert job.result() == 0
    assert tree_bytes(out) == tree_bytes(local_run)


def test_submit_refuses_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        launch.submit_stage("nope", [], executor="debug", folder=tmp_path)
    for stage in ("pipeline", "submit"):  # they submit other jobs: never a job themselves
        with pytest.raises(ValueError, match="cannot submit"):
            launch.submit_stage(stage, [], executor="debug", folder=tmp_path)


@pytest.mark.parametrize("extra, want_parallel", [([], {"pretrain": (1, 2), "embed": (1, 2), "kappa": (1, 2)}),
                                                  (["--nodes", "2", "--tasks-per-node", "3"],
                                                   {"pretrain": (2, 3), "embed": (2, 3), "kappa": (2, 3)})])
def test_submit_pipeline_shapes_steps_from_the_stage_table(tmp_path, monkeypatch, extra, want_parallel):
    """--nodes/--tasks-per-node reach every parallel step (never silently dropped); plain steps
    get one task; GPUs go only to the stages the table marks as GPU stages."""
    import argparse

    from icehpc.run import submit

    seen = []

    class FakeJob:
        job_id = "1"

    def fake_submit(stage, argv, executor, **kw):
        seen.append((stage, kw["nodes"], kw["tasks_per_node"], kw["gpus_per_node"]))
        return FakeJob()

    class FakeExecutor:
        def submit(self, fn, *args):
            return FakeJob()

    monkeypatch.setattr(launch, "submit_stage", fake_submit)
    monkeypatch.setattr(launch, "make_executor", lambda *a, **k: FakeExecutor())
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    args = parser.parse_args(["pipeline", *extra, "--gpus-per-node", "1", "--", "--out", str(tmp_path / "run")])
    jobs = submit.submit_pipeline(submit.split_stage_args(args), executor="slurm", **submit.resources(args))
    assert len(jobs) == len(seen) + 1  # + the finishing job
    for stage, nodes, tasks, gpus in seen:
        assert (nodes, tasks) == want_parallel.get(stage, (1, 1)), stage
        assert gpus == (1 if stage in ("pretrain", "embed") else 0), stage


@pytest.mark.parametrize("argv, tasks, wait, executor, stage_args", [
    (["kappa", "--tasks-per-node", "2", "--wait", "--", "s.h5", "--out", "x"], 2, True, "slurm", ["s.h5", "--out", "x"]),
    (["--tasks-per-node", "3", "kappa", "--executor", "local", "--", "s.h5"], 3, False, "local", ["s.h5"]),
    (["kappa", "s.h5", "--out", "x"], 1, False, "slurm", ["s.h5", "--out", "x"]),
])
def test_submit_options_before_or_after_stage(argv, tasks, wait, executor, stage_args):
    import argparse

    from icehpc.run import submit

    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    args = parser.parse_args(argv)
    assert submit.split_stage_args(args) == stage_args
    assert (args.tasks_per_node, args.wait, args.executor) == (tasks, wait, executor)


# ------------------------------------------------------------------ jobs/local-cluster.sh: a private state folder
def _own_state(state: Path) -> subprocess.CompletedProcess:
    script = ("set -euo pipefail; log() { echo \"$*\" >&2; }; "
              "eval \"$(sed -n '/^own_state()/,/^}/p' jobs/local-cluster.sh)\"; own_state; stat -c %a \"$STATE\"")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=30,
                          env={**os.environ, "STATE": str(state)})


@pytest.mark.skipif(os.geteuid() != 0, reason="the cluster script runs as root")
def test_local_cluster_state_folder_is_private_and_never_someone_elses(tmp_path):
    assert "/var/tmp" not in (ROOT / "jobs" / "local-cluster.sh").read_text().split("STATE=")[1].split("\n")[0]
    fresh = _own_state(tmp_path / "state")
    assert fresh.returncode == 0 and fresh.stdout.strip() == "700", fresh.stderr
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    (tmp_path / "link").symlink_to(tmp_path / "state")
    for bad in (theirs, tmp_path / "link"):
        proc = _own_state(bad)
        assert proc.returncode == 1 and "refusing state folder" in proc.stderr
