"""The whole pipeline at tiny scale: locally (resumable), and on the real local Slurm cluster through
jobs/pipeline.sh (sbatch, afterok) and `icehpc submit pipeline` (submitit), which must leave the same
outputs as the local run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from icehpc.analysis.store import open_store
from slurm_helpers import TERMINAL

ROOT = Path(__file__).resolve().parent.parent
MINI_PER_CLASS = 25
MINI_CLASSES = ("Class (02) Co", "Class (05) CG", "Class (09) WD")


def tiny_overrides(real_dir: Path | None) -> list[str]:
    """A few hundred particles, a handful of pretraining steps, a small real-archive subset."""
    real = (["real.archives=[]"] if real_dir is None else
            [f"real.data_dir={real_dir}",
             "real.archives=[{name: mini, file: mini-2ds.zip, probe: 2D-S, pixel_um: 10.0}]"])
    return ["synth.n=160", "synth.seed=1", "shards.shard_samples=40",
            "pretrain.overrides=[data.batch_size=8, data.batches_per_epoch=2, train.epochs=2, train.checkpoint_every=2]",
            "embed.batch_size=32", "kappa.overrides=[bootstrap=10]", *real]


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path | None:
    """A small zip of real 2D-S images (3 classes) in the archive's own layout, or None without data."""
    from tests.conftest import SHARED_DATA

    source = SHARED_DATA / "2ds_training.zip"
    if not source.exists():
        return None
    out = tmp_path_factory.mktemp("real")
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out / "mini-2ds.zip", "w") as dst:
        for cls in MINI_CLASSES:
            names = sorted(n for n in src.namelist() if n.startswith(f"DS_training_data/{cls}/") and n.endswith(".png"))
            for name in names[:MINI_PER_CLASS]:
                dst.writestr(name, src.read(name))
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, real_dir) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "local"
    cmd = [sys.executable, "-m", "icehpc", "pipeline", "--config", "configs/demo.yaml", "--out", str(out),
           *tiny_overrides(real_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"Report: {out / 'report' / 'index.html'}" in res.stdout
    return out


def _markers(out: Path) -> list[Path]:
    """The completion marker of every step, read from the plan itself."""
    res = subprocess.run([sys.executable, "-c", "import sys; from icehpc.run import plan as planlib; from icehpc import config as c; "
                          "cfg = c.load(planlib.PipelineConfig, 'configs/demo.yaml', sys.argv[2:]); "
                          "print('\\n'.join(str(s.done) for s in planlib.plan(cfg, sys.argv[1])))",
                          str(out), *tiny_overrides(None)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return [Path(p) for p in res.stdout.split()]


@pytest.mark.slow
@pytest.mark.mpi
def test_pipeline_local_outputs_and_resume(local_run, real_dir, icehpc_cmd):
    out = local_run
    for marker in _markers(out):
        assert marker.exists(), marker
    with open_store(out / "embed" / "trained.h5") as s:
        assert s.n_rows == 160 and "habit" in s.columns
    probe = json.loads((out / "probe" / "probe.json").read_text())
    assert set(probe["results"]) == {"pretrained", "random_init", "geometric", "geometric_shape"}
    assert probe["split"]["seeds"] == [0, 1, 2, 3, 4]
    science = json.loads((out / "science.json").read_text())
    bins = science["kappa_vs_planted_diversity"]["temperature_bins"]
    assert set(bins) == {"trained", "random_init"} and bins["trained"]["n_bins"] >= 3
    assert "<img" in (out / "report" / "index.html").read_text()
    if real_dir is not None:
        real = json.loads((out / "real" / "mini" / "probe" / "probe.json").read_text())
        assert real["classes"] == sorted(MINI_CLASSES)
        assert real["split"]["n_train"] + real["split"]["n_test"] == len(MINI_CLASSES) * MINI_PER_CLASS
        assert "real-mini-probe" in science["probes"]

    # A rerun skips every step; a lost output is recomputed, with the steps that read it (the report).
    overrides = tiny_overrides(real_dir)
    stamps = {m: m.stat().st_mtime_ns for m in _markers(out)}
    (out / "probe" / "probe.json").unlink()
    res = subprocess.run([*icehpc_cmd, "pipeline", "--config", "configs/demo.yaml", "--out", str(out), *overrides],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = [line for line in res.stdout.splitlines() if re.match(r"\[pipeline\] [\w-]+: /", line)]
    assert [r.split(":")[0] for r in ran] == ["[pipeline] probe", "[pipeline] report"], ran
    assert all(m.stat().st_mtime_ns == t for m, t in stamps.items()
               if m.parent not in (out / "probe", out / "report"))  # the two steps that ran
    again = json.loads((out / "probe" / "probe.json").read_text())
    assert again["results"] == probe["results"]


def test_ctrl_c_stops_the_pipeline_in_one_line_and_the_rerun_resumes(tmp_path):
    """Ctrl-C while the pretraining step (torch.distributed.run, 2 ranks) starts: the pipeline passes
    it on, drops what the launcher and its ranks print about it, and says one line naming the step
    (exit 130); the finished steps stay done and the plan resumes at that step."""
    from cli_helpers import one_clear_line, sigint_as_in_a_terminal

    out = tmp_path / "run"
    args = ["--config", "configs/demo.yaml", "--out", str(out),
            *[o for o in tiny_overrides(None) if not o.startswith("synth.n=")], "synth.n=40"]
    proc = subprocess.Popen([sys.executable, "-m", "icehpc", "pipeline", *args], cwd=ROOT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith("[pipeline] pretrain: /"):
            break
    time.sleep(4)  # the launcher has started its ranks
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the foreground process group
    rest, err = proc.communicate(timeout=120)
    ended = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(said) + rest, err)
    one_clear_line(ended, "icehpc pipeline: interrupted during step pretrain; finished outputs are kept, rerun the "
                          "same command to resume", code=130)
    plan = subprocess.run([sys.executable, "-m", "icehpc", "pipeline", *args, "--plan"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert plan.returncode == 0, plan.stderr
    pending = [line.split("\t")[0] for line in plan.stdout.splitlines()[1:]]
    assert pending[0] == "pretrain" and "synth" not in pending and "shards" not in pending, plan.stdout


def _compare_runs(a: Path, b: Path) -> None:
    """Same shards, same trained backbone, same embeddings, κ and probe results."""
    def shard_hashes(run: Path) -> list[str]:
        return [s["sha256"] for s in json.loads((run / "shards" / "index.json").read_text())["shards"]]

    assert shard_hashes(a) == shard_hashes(b)
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a / "backbone.safetensors")), load_file(str(b / "backbone.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for name in ("trained", "random"):
        with open_store(a / "embed" / f"{name}.h5") as sa, open_store(b / "embed" / f"{name}.h5") as sb:
            (ea, ma), (eb, mb) = sa.read(0, sa.n_rows), sb.read(0, sb.n_rows)
        assert (ma["key"] == mb["key"]).all()
        np.testing.assert_allclose(ea, eb, rtol=1e-4, atol=1e-5)
        ka = json.loads((a / "kappa" / name / "kappa.json").read_text())["rows"]
        kb = json.loads((b / "kappa" / name / "kappa.json").read_text())["rows"]
        assert [(r["grouping"], r["group"], r["n"]) for r in ka] == [(r["grouping"], r["group"], r["n"]) for r in kb]
        def kappas(rows: list[dict]) -> np.ndarray:  # null: a group under min_count, no estimate
            return np.array([np.nan if r["kappa"] is None else r["kappa"] for r in rows])

        np.testing.assert_allclose(kappas(ka), kappas(kb), rtol=1e-3)
    pa = json.loads((a / "probe" / "probe.json").read_text())
    pb = json.loads((b / "probe" / "probe.json").read_text())
    assert pa["classes"] == pb["classes"] and pa["split"] == pb["split"]
    for rep, res in pa["results"].items():
        for method, metrics in res.items():
            if isinstance(metrics, dict):
                assert metrics["accuracy"] == pytest.approx(pb["results"][rep][method]["accuracy"], abs=0.02)
    assert (b / "science.json").exists() and (b / "report" / "index.html").exists()


def _wait_for_jobs(job_ids: list[str], timeout: float) -> dict[str, str]:
    """Poll sacct until every job has ended; returns job id → state."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30)
        states = dict(line.split("|")[:2] for line in res.stdout.split() if "|" in line)
        if all(states.get(j, "").split()[0:1] and states[j].split()[0] in TERMINAL for j in job_ids):
            return states
        if any(states.get(j, "").startswith(("FAILED", "CANCELLED", "TIMEOUT")) for j in job_ids):
            time.sleep(2)  # let dependants be cancelled, then report
            return states
        time.sleep(2)
    raise TimeoutError(f"Slurm jobs still running after {timeout} s: {states}")


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.mpi
def test_pipeline_on_slurm_sbatch_and_submitit_match_local(local_run, tmp_path, slurm_cluster, icehpc_cmd):
    """Both Slurm doors at once (the cluster runs the two chains side by side)."""
    partition = slurm_cluster["partition"]
    args = ["--config", "configs/demo.yaml", *tiny_overrides(None)]
    submitit_out = tmp_path / "submitit"
    submitit = subprocess.Popen([*icehpc_cmd, "submit", "pipeline", "--partition", partition, "--folder",
                                 str(tmp_path / "logs"), "--time-min", "20", "--wait", "--", "--out", str(submitit_out),
                                 *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sbatch_out = tmp_path / "sbatch"
        env = {**os.environ, "ICEHPC_SBATCH_ARGS": f"--partition={partition} --time=20"}
        res = subprocess.run(["bash", "jobs/pipeline.sh", "--out", str(sbatch_out), *args], capture_output=True,
                             text=True, timeout=120, cwd=ROOT, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        jobs = dict(line.split() for line in res.stdout.splitlines())
        assert list(jobs)[0] == "synth" and list(jobs)[-1] == "finish" and all(j.isdigit() for j in jobs.values())
        deps = subprocess.run(["squeue", "-h", "-o", "%E", "-j", jobs["finish"]], capture_output=True, text=True)
        assert "afterok" in deps.stdout, deps.stdout  # the finish job waits on the chain
        states = _wait_for_jobs(list(jobs.values()), timeout=900)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((sbatch_out / "slurm").glob("*.out")))
        assert all(s == "COMPLETED" for s in states.values()), f"{states}\n{logs}"
        assert "Report:" in next((sbatch_out / "slurm").glob("finish-*.out")).read_text()
        _compare_runs(local_run, sbatch_out)
        output, _ = submitit.communicate(timeout=900)
    finally:
        if submitit.poll() is None:
            submitit.kill()
    assert submitit.returncode == 0, output[-4000:]
    submitted = [line for line in output.splitlines() if line.startswith("submitted")]
    assert len(submitted) == len(jobs)  # the same steps plus the finish job
    _compare_runs(local_run, submitit_out)


@pytest.mark.slow
@pytest.mark.mpi
def test_config_change_reruns_every_step_with_reasons(local_run, tmp_path, icehpc_cmd):
    """`--out demo synth.n=160` then `synth.n=200 kappa.overrides=[bootstrap=0]`: nothing stale is reused."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(local_run, out, symlinks=True)
    for record in (out / ".pipeline").glob("*.json"):  # the copy lives elsewhere: re-point the records
        record.write_text(record.read_text().replace(str(local_run), str(out)))
    overrides = [o for o in tiny_overrides(None) if not o.startswith(("synth.n=", "kappa.overrides="))]
    res = subprocess.run([*icehpc_cmd, "pipeline", "--config", "configs/demo.yaml", "--out", str(out), *overrides,
                          "synth.n=200", "kappa.overrides=[bootstrap=0]"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not re.search(r"^\[pipeline\] [\w-]+: done .*skipped$", res.stdout, re.M), res.stdout
    ran = re.findall(r"^\[pipeline\] ([\w-]+): runs, inputs changed", res.stdout, re.M)
    assert ran == ["synth", "shards", "pretrain", "export", "embed", "embed-random", "kappa-trained", "kappa-random",
                   "probe", "report"], ran
    assert "[pipeline] synth: runs, inputs changed: --n 160 → 200" in res.stdout
    assert "bootstrap=10 → bootstrap=0" in res.stdout
    for which in ("trained", "random"):
        assert json.loads((out / "kappa" / which / "kappa.json").read_text())["run"]["config"]["bootstrap"] == 0
    with open_store(out / "embed" / "trained.h5") as s:
        assert s.n_rows == 200


@pytest.mark.slow
@pytest.mark.mpi
def test_pipeline_on_the_users_folder_of_images(tmp_path, icehpc_cmd):
    """A folder tree without metadata (like 2D-S/PIP): shards → … → κ of both → probe → report."""
    import csv
    import shutil

    synth = tmp_path / "synth"
    subprocess.run([*icehpc_cmd, "synth", "--out", str(synth), "--n", "160", "--no-progress"], check=True,
                   capture_output=True, cwd=ROOT, timeout=300)
    images = tmp_path / "my images"
    for row in csv.DictReader(open(synth / "manifest.csv")):
        (images / row["habit"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth / row["path"], images / row["habit"] / Path(row["path"]).name)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(None) if not o.startswith("synth.")]
    res = subprocess.run([*icehpc_cmd, "pipeline", "--data", str(images), "--out", str(out), *overrides],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (out / "synth").exists()
    kappa = json.loads((out / "kappa" / "random" / "kappa.json").read_text())
    assert {r["grouping"] for r in kappa["rows"]} == {"habit"} and kappa["run"]["groupings_dropped"]
    assert json.loads((out / "probe" / "probe.json").read_text())["label"] == "habit"
    page = (out / "report" / "index.html").read_text()
    assert "random-init control" in page and "Probe results" in page and "Pretraining curves" in page
    assert "Report: " in res.stdout


def test_plan_pretrains_on_the_real_archives_when_asked(tmp_path):
    """pretrain.data=both: one shuffled shard set of the real archives found + the synthetic manifest
    feeds pretraining; embed steps take canvas and framing from the export header (no --canvas)."""
    from icehpc import config as cfglib
    from icehpc.run import plan as planlib

    (tmp_path / "a.zip").write_bytes(b"")
    (tmp_path / "b.zip").write_bytes(b"")
    overrides = [f"real.data_dir={tmp_path}", "pretrain.data=both",
                 "real.archives=[{name: a, file: a.zip, probe: 2D-S, pixel_um: 10.0}, "
                 "{name: b, file: b.zip, probe: PIP, pixel_um: 100.0}, {name: c, file: missing.zip}]"]
    cfg = cfglib.load(planlib.PipelineConfig, cfglib.find_config("demo.yaml"), overrides)
    steps = {s.name: s for s in planlib.plan(cfg, tmp_path / "out")}
    build = steps["pretrain-shards"]
    assert build.argv[1:3] == [str(tmp_path / "a.zip"), str(tmp_path / "b.zip")]
    assert "--manifest" in build.argv and "--shuffle" in build.argv and "--probe" not in build.argv
    assert f"data.shards={tmp_path / 'out' / 'pretrain-shards'}" in steps["pretrain"].argv
    assert "pretrain-shards" in steps["pretrain"].after
    assert all("--canvas" not in s.argv for s in steps.values() if s.stage == "embed")
    assert all("--splits" in s.argv for s in steps.values() if s.stage == "probe")
    synth_only = planlib.plan(cfglib.load(planlib.PipelineConfig, cfglib.find_config("demo.yaml"), []), tmp_path / "o2")
    assert "pretrain-shards" not in {s.name for s in synth_only}
    cfg_real = cfglib.load(planlib.PipelineConfig, cfglib.find_config("demo.yaml"),
                           [f"real.data_dir={tmp_path / 'nothing'}", "pretrain.data=real"])
    with pytest.raises(ValueError, match="no real archive"):
        planlib.plan(cfg_real, tmp_path / "o3")


@pytest.mark.parametrize("data", ["synth", "both"])
def test_plan_pretrains_on_a_curated_subset(tmp_path, data):
    """pretrain.keys: the pretraining shard set is rebuilt from the same inputs with --keys (the keys
    file is fingerprinted, so a new curation reruns pretraining); a missing file is one clear error."""
    from icehpc import config as cfglib
    from icehpc.run import plan as planlib

    (tmp_path / "a.zip").write_bytes(b"")
    keys = tmp_path / "curated.csv"
    keys.write_text("key\n000000000001\n")
    base = [f"real.data_dir={tmp_path}", f"pretrain.data={data}",
            "real.archives=[{name: a, file: a.zip, probe: 2D-S, pixel_um: 10.0}]"]
    cfg = cfglib.load(planlib.PipelineConfig, cfglib.find_config("demo.yaml"), [*base, f"pretrain.keys={keys}"])
    steps = {s.name: s for s in planlib.plan(cfg, tmp_path / "out")}
    build = steps["pretrain-shards"]
    assert build.argv[build.argv.index("--keys") + 1] == str(keys)
    assert ("--manifest" in build.argv) and ((str(tmp_path / "a.zip") in build.argv) == (data == "both"))
    assert f"data.shards={tmp_path / 'out' / 'pretrain-shards'}" in steps["pretrain"].argv
    assert str(keys) in build.parts["files"]
    before = steps["pretrain"].fingerprint
    keys.write_text("key\n000000000002\n")
    again = {s.name: s for s in planlib.plan(cfg, tmp_path / "out")}
    assert again["pretrain"].fingerprint != before
    user = cfglib.load(planlib.PipelineConfig, cfglib.find_config("demo.yaml"),
                       [*base, f"pretrain.keys={keys}", f"data.inputs=[{tmp_path / 'a.zip'}]"])
    user_steps = {s.name: s for s in planlib.plan(user, tmp_path / "o4")}  # --data: a subset of the same build
    assert user_steps["pretrain-shards"].argv[1] == str(tmp_path / "a.zip") and "--keys" in user_steps["pretrain-shards"].argv
    assert "--keys" not in user_steps["shards"].argv and "pretrain-shards" in user_steps["pretrain"].after
    plain = {s.name: s for s in planlib.plan(cfglib.load(planlib.PipelineConfig, cfglib.find_config("demo.yaml"),
                                                          base), tmp_path / "o2")}
    assert all("--keys" not in s.argv for s in plain.values())
    missing = cfglib.load(planlib.PipelineConfig, cfglib.find_config("demo.yaml"),
                          [*base, f"pretrain.keys={tmp_path / 'nope.csv'}"])
    with pytest.raises(planlib.UserError, match="pretrain.keys=.*does not exist"):
        planlib.plan(missing, tmp_path / "o3")
