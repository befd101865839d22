"""Hostile tests: every way found to lose data or get wrong numbers with exit code 0.

Each test reproduces one attack (it fails on the code before the fix) and checks the fix: the
attack is refused with one clear line, or the data is recomputed, or the input is written down as
rejected. ``ATTACKS`` counts what this file tries; ``test_real_archives_hostile`` (slow) runs the
input attacks against the real 2D-S and PIP archives beside the repository.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import backbone_helpers
from icehpc import fileio
from icehpc.config import ConfigError
from icehpc.data import shards

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _png(seed: int, w: int = 12, h: int = 10) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


def _tree(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    for k, (label, n) in enumerate(classes.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(_png(seed * 1000 + k * 100 + i))
    return root


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icehpc", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


def _one_clear_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


BUILD = dict(progress=False)


# ------------------------------------------------------------------ 1. concurrent writers
def test_1_lock_is_released_by_a_killed_holder_and_blocks_other_stages(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from icehpc.fileio import lock_dir\n"
                               f"with lock_dir({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(fileio.LockedError, match=f"PID {holder.pid}"):
            with fileio.lock_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with fileio.lock_dir(out):  # SIGKILL released it: no stale lock to clean up
        pass


def test_1_atomic_temp_names_are_per_process(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
    fileio.write_atomic(tmp_path / "x.json", "{}")
    assert seen == [f".x.json.{os.getpid()}.tmp"]


# ------------------------------------------------------------------ 4, 5, 8. inputs
# ------------------------------------------------------------------ 7. column names (build side)
# ------------------------------------------------------------------ smaller: zips, deleted shards
# ------------------------------------------------------------------ 3. store parts
def _store(folder: Path, n: int = 60, parts: int = 3) -> Path:
    from kappa_helpers import cheap_groups, paper_meta, write_store

    x, gid = cheap_groups(n, 8, 3, seed=1)
    return write_store(folder, x, paper_meta(n, gid, seed=1), n_parts=parts)


def _h5_edit(path: Path, fn) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        fn(f)


def test_3_part_missing_a_meta_dataset_is_an_error_not_fill_values(tmp_path):
    from icehpc.analysis.store import StoreError, open_store

    master = _store(tmp_path / "s")
    _h5_edit(tmp_path / "s" / "part-00001.h5", lambda f: f["meta"].__delitem__("temperature_c"))
    with pytest.raises(StoreError, match="part-00001"):
        with open_store(master) as st:
            st.read(0, st.n_rows)


def test_3_part_rewritten_with_the_same_rows_or_copied_is_an_error(tmp_path):
    from kappa_helpers import cheap_groups, paper_meta

    from icehpc.analysis.store import StoreError, open_store, write_part

    master = _store(tmp_path / "s")
    part = tmp_path / "s" / "part-00002.h5"
    x, gid = cheap_groups(20, 8, 3, seed=9)  # same row count and columns, other numbers
    write_part(part, x, paper_meta(20, gid, seed=9))
    with pytest.raises(StoreError, match="part-00002.*sha256"):
        open_store(master)
    master = _store(tmp_path / "t")
    (tmp_path / "t" / "part-00002.h5").write_bytes((tmp_path / "t" / "part-00000.h5").read_bytes())
    with pytest.raises(StoreError, match="part-00002"):
        open_store(master)


def test_3_duplicate_keys_are_refused_also_in_a_single_file(tmp_path):
    from kappa_helpers import cheap_groups, paper_meta

    from icehpc.analysis.store import StoreError, open_store, write_part

    x, gid = cheap_groups(10, 8, 2, seed=2)
    meta = paper_meta(10, gid, seed=2)
    meta["key"][5:] = meta["key"][:5]
    write_part(tmp_path / "one.h5", x, meta)
    with pytest.raises(StoreError, match="more than once"):
        open_store(tmp_path / "one.h5")


def test_kappa_fingerprint_follows_content_not_size_and_mtime(tmp_path):
    import h5py

    from icehpc.analysis.kappa import KappaConfig, run_kappa
    from icehpc.analysis.store import StoreError, write_part

    from kappa_helpers import cheap_groups, paper_meta

    x, gid = cheap_groups(200, 8, 2, seed=3)
    one = tmp_path / "one.h5"
    write_part(one, x, paper_meta(200, gid, seed=3))
    cfg = KappaConfig(groupings=["habit"], bootstrap=0, min_count=5, similarity_by="")
    first = run_kappa(one, tmp_path / "k", cfg)

    def edit_in_place(path: Path) -> None:
        st = os.stat(path)
        with h5py.File(path, "r+") as f:
            f["embeddings"][0] = -f["embeddings"][0]  # same dtype and shape: same file size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_size == st.st_size

    edit_in_place(one)
    again = run_kappa(one, tmp_path / "k", cfg)
    assert again is not None, "an edited store was reported up to date"
    assert again["run"]["fingerprint"] != first["run"]["fingerprint"]
    master = _store(tmp_path / "s")
    run_kappa(master, tmp_path / "k2", cfg)
    edit_in_place(tmp_path / "s" / "part-00001.h5")
    with pytest.raises(StoreError, match="part-00001"):
        run_kappa(master, tmp_path / "k2", cfg)


def test_store_files_respect_the_umask(tmp_path):
    from icehpc.analysis.store import write_part

    old = os.umask(0o077)
    try:
        write_part(tmp_path / "p.h5", np.zeros((2, 3), np.float32), {"key": ["a", "b"]})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "p.h5").st_mode & 0o777) == 0o600


# ------------------------------------------------------------------ 2. stale embedding parts
@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    return backbone_helpers.tiny_backbone(tmp_path_factory.mktemp("bb") / "b.safetensors", size=16, dim=16, depth=1,
                                          step=1)


def _manifest_shards(folder: Path, out: Path, offset: float) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(12):
        (folder / "img" / f"{i}.png").write_bytes(_png(i, 14, 14))
        rows.append(f"img/{i}.png,{'plate' if i % 2 else 'column'},{-20.0 + offset + i}")
    (folder / "m.csv").write_text("path,habit,temperature_c\n" + "\n".join(rows) + "\n")
    shards.build([str(folder / "m.csv")], out, shards.BuildConfig(shard_samples=5), overwrite=True, **BUILD)


def test_2_parts_of_a_rebuilt_shard_folder_are_recomputed(tmp_path, tiny_backbone):
    from icehpc.analysis.embed import run_embed
    from icehpc.analysis.store import open_store

    kw = dict(checkpoint=str(tiny_backbone), random_init=False, arch=None, img_size=None, canvas=16,
              batch_size=8, num_workers=0)
    src, sh, store = tmp_path / "src", tmp_path / "shards", tmp_path / "emb" / "store.h5"
    _manifest_shards(src, sh, 0.0)
    run_embed(str(sh), str(store), **kw)
    _manifest_shards(src, sh, 100.0)  # same images, keys and counts; temperatures 100 °C warmer
    summary = run_embed(str(sh), str(store), **kw)
    assert summary["shards_reused"] == 0
    with open_store(store) as st:
        _, meta = st.read(0, st.n_rows, columns=["key", "temperature_c"])
    order = np.argsort(meta["key"])
    np.testing.assert_allclose(meta["temperature_c"][order], 80.0 + np.arange(12))
    again = run_embed(str(sh), str(store), **kw)  # nothing changed: everything reused
    assert again["shards_reused"] == again["shards"] == 3


def test_1_embed_and_kappa_lock_their_output_folders(tmp_path, tiny_backbone):
    from icehpc.analysis.embed import parts_dir, run_embed
    from icehpc.analysis.kappa import KappaConfig, run_kappa

    src, sh, store = tmp_path / "src", tmp_path / "shards", tmp_path / "emb" / "store.h5"
    _manifest_shards(src, sh, 0.0)
    with fileio.lock_dir(parts_dir(store)):
        with pytest.raises(fileio.LockedError, match=f"PID {os.getpid()}"):
            run_embed(str(sh), str(store), checkpoint=str(tiny_backbone), random_init=False, arch=None,
                      img_size=None, canvas=16, batch_size=8, num_workers=0)
    assert not list(parts_dir(store).glob("*.h5"))
    master = _store(tmp_path / "s")
    with fileio.lock_dir(tmp_path / "k"):
        with pytest.raises(fileio.LockedError):
            run_kappa(master, tmp_path / "k", KappaConfig(groupings=["habit"], bootstrap=0, similarity_by=""))
    assert not (tmp_path / "k" / "kappa.json").exists()


# ------------------------------------------------------------------ 7. report escaping
def test_7_report_escapes_every_string_from_data(tmp_path):
    from icehpc.analysis.kappa import KappaConfig, run_kappa
    from icehpc.analysis.report import build_report
    from icehpc.analysis.store import write_part

    evil = "<svg onload=alert(1)>"
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    write_part(tmp_path / "s.h5", x, {evil: np.array([evil, "<b>x</b>"] * 20),
                                      "key": np.array([f"k{i}" for i in range(40)])})
    run_kappa(tmp_path / "s.h5", tmp_path / "k", KappaConfig(groupings=[evil], bootstrap=0, min_count=5,
                                                              similarity_by=evil))
    index = build_report(tmp_path / "k", tmp_path / "r")
    text = index.read_text()
    assert "<svg" not in text and "<b>x" not in text
    assert "&lt;svg onload=alert(1)&gt;" in text
    assert all(p.parent == tmp_path / "r" for p in (tmp_path / "r").rglob("*"))  # no file outside the report


def test_7_store_refuses_column_names_hdf5_cannot_hold(tmp_path):
    from icehpc.analysis.store import StoreError, write_part

    for bad in ("a/b", ".", "x.y", ""):
        with pytest.raises(StoreError, match="column name"):
            write_part(tmp_path / "p.h5", np.zeros((1, 2), np.float32), {bad: ["v"]})


# ------------------------------------------------------------------ smaller: κ edge cases
def test_kappa_min_count_1_with_a_single_row_group(tmp_path):
    from icehpc.analysis.kappa import KappaConfig, run_kappa
    from icehpc.analysis.store import write_part

    x = np.random.default_rng(1).normal(size=(31, 5)).astype(np.float32)
    write_part(tmp_path / "s.h5", x, {"habit": np.array(["lone"] + ["many"] * 30)})
    res = run_kappa(tmp_path / "s.h5", tmp_path / "k", KappaConfig(groupings=["habit"], min_count=1,
                                                                    bootstrap=20, similarity_by=""))
    rows = {r["group"]: r for r in res["rows"]}
    assert rows["lone"]["n"] == 1 and "degenerate" in rows["lone"]["flag"]  # one vector: no spread
    assert rows["many"]["kappa"] is not None and np.isfinite(rows["many"]["kappa"])


def test_kappa_identical_vectors_are_degenerate_with_kappa_inf(tmp_path):
    from icehpc.analysis.kappa import KappaConfig, run_kappa
    from icehpc.analysis.store import write_part

    rng = np.random.default_rng(2)
    x = np.concatenate([np.repeat(rng.normal(size=(1, 16)), 500, axis=0), rng.normal(size=(100, 16))])
    write_part(tmp_path / "s.h5", x.astype(np.float32), {"habit": np.array(["same"] * 500 + ["spread"] * 100)})
    res = run_kappa(tmp_path / "s.h5", tmp_path / "k", KappaConfig(groupings=["habit"], bootstrap=50,
                                                                    similarity_by=""))
    rows = {r["group"]: r for r in res["rows"]}
    assert rows["same"]["flag"] == "degenerate" and "mle_outside_ci" not in rows["same"]["flag"]
    assert rows["spread"]["flag"] == ""
    csv_rows = (tmp_path / "k" / "kappa.csv").read_text().splitlines()
    same = next(r for r in csv_rows if ",same," in r).split(",")
    header = csv_rows[0].split(",")
    assert same[header.index("kappa")] == "inf" and same[header.index("ci_low")] == "inf"


@pytest.mark.parametrize("bins", ["temperature_c=-40,nan,0", "temperature_c=-40,inf", "temperature_c=0,-10"])
def test_kappa_bad_bin_edges_are_a_config_error(tmp_path, bins):
    from icehpc.analysis.store import write_part

    write_part(tmp_path / "s.h5", np.ones((3, 2), np.float32), {"temperature_c": np.array([-5.0, -6.0, -7.0])})
    proc = _cli("kappa", str(tmp_path / "s.h5"), "--out", str(tmp_path / "k"), "--by", "temperature_c",
                "--bins", bins)
    _one_clear_line(proc, "bins.temperature_c", "edges")


# ------------------------------------------------------------------ smaller: pretraining values
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
    _one_clear_line(proc, "batch_size")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 6. checkpoints
def _fake_run(tmp_path: Path, steps=(3, 6)) -> Path:
    from icehpc.ssl.checkpoint import checkpoint_root, write_manifest

    out = tmp_path / "run"
    for s in steps:
        tag = checkpoint_root(out) / f"step-{s:08d}"
        (tag / "global_step").mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(np.random.default_rng(s).bytes(4096))
        (tag / "global_step" / "zero.pt").write_bytes(np.random.default_rng(s + 1).bytes(1000))
        write_manifest(tag)
    (checkpoint_root(out) / "latest").write_text(f"step-{steps[-1]:08d}\n")
    return out


def test_6_intact_latest_is_resumed(tmp_path):
    from icehpc.ssl.checkpoint import resume_tag

    assert resume_tag(_fake_run(tmp_path)) == ("step-00000006", [])
    assert resume_tag(tmp_path / "fresh") == (None, [])


@pytest.mark.parametrize("fault", ["flip64", "truncate", "empty", "missing_file", "missing_tag", "no_manifest"])
def test_6_damaged_latest_falls_back_to_the_newest_intact_one_with_a_warning(tmp_path, fault):
    import shutil

    from icehpc.ssl.checkpoint import checkpoint_root, resume_tag

    out = _fake_run(tmp_path)
    tag = checkpoint_root(out) / "step-00000006"
    f = tag / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    if fault == "flip64":
        data[1024:1088] = bytes(b ^ 0xFF for b in data[1024:1088])
        f.write_bytes(bytes(data))
    elif fault == "truncate":
        f.write_bytes(bytes(data[:2000]))
    elif fault == "empty":
        f.write_bytes(b"")
    elif fault == "missing_file":
        f.unlink()
    elif fault == "missing_tag":
        shutil.rmtree(tag)
    else:
        (tag / "icehpc-sha256.json").unlink()
    got, warnings = resume_tag(out)
    assert got == "step-00000003"
    assert any("step-00000006" in w for w in warnings) and any("step-00000003 instead" in w for w in warnings)


@pytest.mark.parametrize("latest", ["../../other-run/checkpoints/step-00000009", "/tmp/step-00000009",
                                    "step-00000009/../../../other-run/checkpoints/step-00000009"])
def test_6_latest_may_only_name_a_tag_of_this_run(tmp_path, latest):
    from icehpc.ssl.checkpoint import checkpoint_root, resume_tag

    other = _fake_run(tmp_path / "x", steps=(9,))
    (tmp_path / "other-run").mkdir()
    (other).rename(tmp_path / "other-run" / "_")
    out = _fake_run(tmp_path)
    (checkpoint_root(out) / "latest").write_text(latest + "\n")
    got, warnings = resume_tag(out)
    assert got == "step-00000006" and "not a checkpoint name" in warnings[0]


def test_6_no_intact_checkpoint_is_one_clear_error(tmp_path):
    from icehpc.ssl.checkpoint import ResumeError, checkpoint_root, resume_tag

    out = _fake_run(tmp_path)
    for tag in checkpoint_root(out).glob("step-*"):
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match="no intact checkpoint"):
        resume_tag(out)


@pytest.mark.slow
def test_6_flipped_block_in_a_real_checkpoint_resumes_from_the_older_one_exactly(tmp_path):
    tree = _tree(tmp_path / "tree", {"plate": 20, "column": 20})
    sh = tmp_path / "shards"
    shards.build([str(tree)], sh, shards.BuildConfig(), **BUILD)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "icehpc", "pretrain", "--config", "pretrain-tiny-cpu.yaml", f"data.shards={sh}",
           f"out={out}", "train.progress=false", "data.batch_size=8", "data.num_workers=0",
           "data.batches_per_epoch=3", "train.epochs=2", "train.checkpoint_every=3", "train.export=false"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-00000006"
    states = next((ckpt / "step-00000006").glob("*model_states.pt"))
    data = bytearray(states.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
    states.write_bytes(bytes(data))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference[:3]))
    cmd = [*cmd[:-3], "train.epochs=2", "train.checkpoint_every=3", "train.export=false"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000003 instead" in again.stderr and "at step 3" in again.stderr
    redone = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in redone] == [r["step"] for r in reference]
    for a, b in zip(redone, reference):
        assert a["loss"] == b["loss"], a["step"]
    (ckpt / "latest").write_text("../../elsewhere/checkpoints/step-00000006\n")
    for tag in ckpt.glob("step-*"):
        next(tag.glob("*model_states.pt")).write_bytes(b"")
    bad = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "no intact checkpoint" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ smaller: predictable temp/state paths
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


def test_gpu_check_and_benchmarks_use_private_temp_folders():
    gpu = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "/tmp/site" not in gpu and "mktemp -d" in gpu
    for py in (ROOT / "bench").glob("*.py"):
        assert 'default="/tmp' not in py.read_text(), py.name


# ------------------------------------------------------------------ the real archives under attack
