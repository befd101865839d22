"""icehpc curate (MPI hierarchical k-means + balanced sampling), icehpc outliers (kNN rarity and
mislabel scores) and shards build --keys. Small data: the whole file runs in well under a minute."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from kappa_helpers import write_store
from slurm_helpers import final_state  # noqa: E402

from icehpc.analysis import curate as cur  # noqa: E402
from icehpc.analysis import outliers as outl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = (1500, 800, 400, 200, 70, 30)  # skewed habit mix, like the synthetic set's


def skewed(seed: int = 0, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(SIZES), d)) * 3
    gid = np.repeat(np.arange(len(SIZES)), SIZES)
    x = centres[gid] + rng.normal(size=(len(gid), d))
    perm = rng.permutation(len(gid))
    return x[perm].astype(np.float32), gid[perm]


def meta_of(gid: np.ndarray, labels: list[str] | None = None) -> dict[str, np.ndarray]:
    names = np.array(labels or [f"habit_{g}" for g in range(len(SIZES))])
    return {"habit": names[gid], "key": np.array([f"k{i:06d}" for i in range(len(gid))])}


@pytest.fixture(scope="module")
def skewed_store(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    x, gid = skewed()
    path = write_store(tmp_path_factory.mktemp("skewed"), x, meta_of(gid))
    return path, x, gid


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def icehpc(*args: str, ranks: int = 0, mpiexec: list[str] | None = None) -> subprocess.CompletedProcess:
    pre = [*mpiexec, "-n", str(ranks)] if ranks else []
    return subprocess.run([*pre, sys.executable, "-m", "icehpc", *args], capture_output=True, text=True,
                          timeout=120, env=env())


# ------------------------------------------------------------------------------ curate

def test_water_fill_and_tree_quotas():
    assert cur.water_fill(10, np.array([1, 100, 100])).tolist() == [1, 5, 4]
    assert cur.water_fill(1000, np.array([3, 4])).tolist() == [3, 4]  # fewer rows than the target: all
    assert cur.water_fill(2, np.array([5, 5, 5])).tolist() == [1, 1, 0]
    sizes = [np.array([50, 50, 2, 100]), np.array([100, 102])]
    parents = [np.array([0, 0, 1, 1]), np.array([0, 0])]
    q = cur.tree_quotas(40, sizes, parents)
    assert q[1].tolist() == [20, 20] and q[0].tolist() == [10, 10, 2, 18]


def test_curation_balances_a_skewed_mix(skewed_store, tmp_path):
    path, _, gid = skewed_store
    cfg = cur.CurateConfig(levels=[24, 6], target=600, seed=1)
    res = cur.run_curate(path, tmp_path / "c", cfg)
    assert res["rows_selected"] == 600
    assert res["label_entropy_bits_after"] > res["label_entropy_bits_before"] + 0.3
    after = res["labels_after"]
    assert after["habit_5"] >= 25 and after["habit_4"] >= 60  # rare groups kept (almost) whole
    assert after["habit_0"] < 250  # the dominant one thinned from 1500
    rows = list(csv.DictReader(open(tmp_path / "c" / "curated.csv")))
    assert len(rows) == 600 and len({r["key"] for r in rows}) == 600
    assert set(rows[0]) == {"key", "row", "cluster_l1", "cluster_l2", "habit"}
    with h5py.File(tmp_path / "c" / "clusters.h5") as f:
        assert f["level_1/centroids"].shape == (24, 16) and f["level_2/centroids"].shape == (6, 16)
        assert f["level_1/sizes"][:].sum() == len(gid) and f["level_1/selected"][:].sum() == 600
        assert f["assignments"].shape == (len(gid),)
        parent = f["level_1/parent"][:]
        for r in rows[:50]:  # the path is consistent with the tree
            assert parent[int(r["cluster_l1"])] == int(r["cluster_l2"])
    summary = json.loads((tmp_path / "c" / "curate.json").read_text())
    assert summary["config"]["levels"] == [24, 6] and summary["fingerprint"]
    top = summary["levels"][-1]  # balanced sampling evens out the top level's clusters
    assert top["sizes_after"]["entropy_bits"] > top["sizes_before"]["entropy_bits"]
    assert top["sizes_after"]["max_over_median"] < top["sizes_before"]["max_over_median"]


def test_inertia_close_to_scikit_learn(skewed_store, tmp_path):
    """Best of three seeds each (both can land in a local optimum on a given seed)."""
    from sklearn.cluster import KMeans

    path, x, _ = skewed_store
    xn, _ = cur.normalise(x)
    ours = min(cur.run_curate(path, tmp_path / f"c{s}", cur.CurateConfig(levels=[6], target=100, resample_steps=0,
                                                                          seed=s))["levels"][0]["inertia_euclidean"]
               for s in range(3))
    theirs = min(KMeans(6, n_init=1, random_state=s).fit(xn.astype(np.float64)).inertia_ for s in range(3))
    assert ours <= 1.01 * theirs


def test_same_keys_on_1_2_3_ranks_and_resumable(skewed_store, tmp_path, mpiexec):
    path, _, _ = skewed_store
    outs = []
    for ranks in (0, 2, 3):
        out = tmp_path / f"r{ranks}"
        p = icehpc("curate", str(path), "--out", str(out), "--levels", "20,5", "--target", "500", "--seed", "3",
                   ranks=ranks, mpiexec=mpiexec)
        assert p.returncode == 0, p.stderr
        outs.append(out)
    ref = (outs[0] / "curated.csv").read_text()
    for out in outs[1:]:
        assert (out / "curated.csv").read_text() == ref
        with h5py.File(out / "clusters.h5") as f, h5py.File(outs[0] / "clusters.h5") as g:
            np.testing.assert_allclose(f["level_1/centroids"][:], g["level_1/centroids"][:], atol=1e-6)
    assert json.loads((outs[2] / "curate.json").read_text())["ranks"] == 3
    again = icehpc("curate", str(path), "--out", str(outs[1]), "--levels", "20,5", "--target", "500", "--seed", "3",
                   ranks=2, mpiexec=mpiexec)
    assert again.returncode == 0 and "up to date" in again.stdout
    other = icehpc("curate", str(path), "--out", str(outs[1]), "--levels", "20,5", "target=400", "--seed", "3")
    assert other.returncode == 0 and "kept 400" in other.stdout


def test_curate_errors_are_one_line(skewed_store, tmp_path):
    path, _, _ = skewed_store
    p = icehpc("curate", str(path), "--out", str(tmp_path / "x"), "--levels", "ten")
    assert p.returncode == 2 and "expected integers" in p.stderr and "Traceback" not in p.stderr
    p = icehpc("curate", str(path), "--out", str(tmp_path / "x"), "--levels", "5,10")
    assert p.returncode == 2 and "must not grow" in p.stderr
    p = icehpc("curate", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_shards_build_keys_keeps_the_curated_samples(tmp_path):
    from PIL import Image

    from icehpc.data.format import iter_samples, shard_paths

    rng = np.random.default_rng(0)
    for i in range(12):
        d = tmp_path / "in" / ("plate" if i % 3 else "column")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(d / f"p{i}.png")
    full, sub = tmp_path / "full", tmp_path / "sub"
    assert icehpc("shards", "build", str(tmp_path / "in"), "--out", str(full), "--no-progress",
                  "--workers", "1").returncode == 0
    members = {k: s for p in shard_paths(full) for k, s in iter_samples(p)}
    pick = sorted(members)[::4]
    (tmp_path / "curated.csv").write_text("key,row,cluster_l1\n" + "".join(f"{k},0,0\n" for k in pick))
    p = icehpc("shards", "build", str(tmp_path / "in"), "--keys", str(tmp_path / "curated.csv"), "--out", str(sub),
               "--no-progress", "--workers", "1")
    assert p.returncode == 0, p.stderr
    got = {k: s for p in shard_paths(sub) for k, s in iter_samples(p)}
    assert sorted(got) == pick
    assert all(got[k]["png"] == members[k]["png"] for k in pick)  # same keys, same images
    (tmp_path / "bad.csv").write_text("name\nx\n")
    p = icehpc("shards", "build", str(tmp_path / "in"), "--keys", str(tmp_path / "bad.csv"), "--out",
               str(tmp_path / "s2"), "--no-progress")
    assert p.returncode == 2 and "no 'key' column" in p.stderr
    # keys of another build (or a typo) name no input here: one clear line, nothing silently dropped
    (tmp_path / "other.csv").write_text("key\n" + pick[0] + "\nnot-a-key-of-these-inputs\n")
    p = icehpc("shards", "build", str(tmp_path / "in"), "--keys", str(tmp_path / "other.csv"), "--out",
               str(tmp_path / "s3"), "--no-progress")
    assert p.returncode == 2 and "1 of 2 keys name no input of this build" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- outliers

@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Six well-separated groups; 12 planted mislabels (rows 0..11 carry a wrong label) and 5 planted
    far-away rows (12..16); one label holds HTML to check escaping."""
    rng = np.random.default_rng(5)
    d = 12
    centres = rng.normal(size=(6, d)) * 4
    gid = rng.integers(0, 6, 900)
    x = centres[gid] + rng.normal(size=(900, d))
    x[12:17] = rng.normal(size=(5, d)) * 12
    lab = gid.copy()
    lab[:12] = (gid[:12] + 1) % 6
    names = ["col", "plate", "<script>alert(1)</script>", "rosette", "sphere", "needle"]
    path = write_store(tmp_path_factory.mktemp("noisy"), x.astype(np.float32), meta_of(lab, names), n_parts=2)
    return path, x, lab


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(open(path)))
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) if k in ("rarity", "local_ratio", "mislabel")
            else np.array([r[k] for r in rows]) for k in rows[0]}


def test_planted_mislabels_and_rare_rows_rank_first(noisy_store, tmp_path):
    path, _, _ = noisy_store
    res = outl.run_outliers(path, tmp_path / "o", outl.OutliersConfig(k=10, label="habit"))
    t = _read_csv(tmp_path / "o" / "outliers.csv")
    assert list(t) == ["key", "rarity", "local_ratio", "habit", "mislabel"] and len(t["key"]) == 900
    top_mis = set(np.argsort(-t["mislabel"], kind="stable")[:12].tolist())
    assert len(top_mis & set(range(12))) >= 11
    top_rare = set(np.argsort(-t["rarity"], kind="stable")[:5].tolist())
    assert top_rare == set(range(12, 17))
    assert res["k"] == 10
    page = (tmp_path / "o" / "outliers.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_outliers_block_size_and_rank_count_do_not_matter(noisy_store, tmp_path, mpiexec):
    path, _, _ = noisy_store
    small = outl.run_outliers(path, tmp_path / "small", outl.OutliersConfig(k=10, label="habit", block_rows=7))
    assert small["max_scratch_floats"] <= 7 * (7 + 10)  # bounded memory: scratch set by the block size
    p = icehpc("outliers", str(path), "--out", str(tmp_path / "mpi"), "--label", "habit", "--k", "10",
               ranks=3, mpiexec=mpiexec)
    assert p.returncode == 0, p.stderr
    a, b = _read_csv(tmp_path / "small" / "outliers.csv"), _read_csv(tmp_path / "mpi" / "outliers.csv")
    assert (a["key"] == b["key"]).all()
    for k in ("rarity", "local_ratio", "mislabel"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12)
    again = icehpc("outliers", str(path), "--out", str(tmp_path / "mpi"), "--label", "habit", "--k", "10")
    assert again.returncode == 0 and "up to date" in again.stdout


def test_outliers_thumbnails_and_errors(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(30):
        d = tmp_path / "in" / ("a&b" if i % 2 else "c")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(d / f"p{i}.png")
    shards = tmp_path / "shards"
    assert icehpc("shards", "build", str(tmp_path / "in"), "--out", str(shards), "--no-progress",
                  "--workers", "1").returncode == 0
    from icehpc.data.format import iter_samples, shard_paths

    keys, labels = [], []
    for p in shard_paths(shards):
        for k, s in iter_samples(p, ("json",)):
            keys.append(k)
            labels.append(json.loads(s["json"])["habit"])
    x = rng.normal(size=(len(keys), 8)).astype(np.float32)
    store = write_store(tmp_path / "st", x, {"key": np.array(keys), "habit": np.array(labels)}, n_parts=1)
    p = icehpc("outliers", str(store), "--out", str(tmp_path / "o"), "--label", "habit", "--k", "5",
               "--images", str(shards), "--top", "3")
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "o" / "outliers.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and "a&amp;b" in page
    p = icehpc("outliers", str(store), "--out", str(tmp_path / "o2"), "--label", "nolabel")
    assert p.returncode == 2 and "no meta column 'nolabel'" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- job scripts

def test_job_scripts_parse_and_run_through_a_stand_in_srun(skewed_store, tmp_path, mpiexec):
    """No Slurm here: `srun` is replaced by mpiexec with 2 ranks, which is what srun --mpi=pmix gives."""
    for name in ("curate", "outliers"):
        script = ROOT / "jobs" / f"{name}.sh"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert "#SBATCH --requeue" in text and f"$ICEHPC {name}" in text
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f"#!/bin/bash\nshift\nexec {' '.join(mpiexec)} -n 2 \"$@\"\n")
    (fake / "srun").chmod(0o755)
    path, _, _ = skewed_store
    e = {**env(), "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", "ICEHPC_ROOT": str(ROOT),
         "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    p = subprocess.run(["bash", str(ROOT / "jobs" / "curate.sh"), str(path), "--out", str(tmp_path / "c"),
                        "--levels", "10,3", "--target", "200"], capture_output=True, text=True, timeout=120, env=e)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "c" / "curate.json").read_text())["ranks"] == 2


@pytest.mark.slurm
def test_curate_and_outliers_job_scripts_on_the_real_slurm(slurm_cluster, skewed_store, noisy_store, tmp_path):
    """`sbatch -n 2 jobs/curate.sh` and `jobs/outliers.sh` on the real cluster: 2 srun ranks, and the
    same keys / scores as one local process."""
    def sbatch(script: str, *args: str) -> None:
        log = tmp_path / f"{script}-%j.out"
        p = subprocess.run(["sbatch", "--wait", "--parsable", "-p", slurm_cluster["partition"], "-n", "2", "-t", "5",
                            "-o", str(log), "--export", f"ALL,ICEHPC_ROOT={ROOT}", str(ROOT / "jobs" / f"{script}.sh"),
                            *args], capture_output=True, text=True, timeout=240, cwd=tmp_path)
        logs = "".join(f.read_text() for f in tmp_path.glob(f"{script}-*.out"))
        assert p.returncode == 0, p.stderr + logs
        assert final_state(p.stdout.strip().split(";")[0]) == ("COMPLETED", "0:0"), logs

    store, _, _ = skewed_store
    sbatch("curate", str(store), "--out", str(tmp_path / "c"), "--levels", "24,6", "--target", "600", "--seed", "1")
    assert json.loads((tmp_path / "c" / "curate.json").read_text())["ranks"] == 2
    cur.run_curate(store, tmp_path / "c1", cur.CurateConfig(levels=[24, 6], target=600, seed=1))
    keys = [sorted(r["key"] for r in csv.DictReader(open(tmp_path / d / "curated.csv"))) for d in ("c", "c1")]
    assert keys[0] == keys[1] and len(keys[0]) == 600
    noisy, _, _ = noisy_store
    sbatch("outliers", str(noisy), "--out", str(tmp_path / "o"), "--label", "habit", "--k", "10")
    assert json.loads((tmp_path / "o" / "outliers.json").read_text())["ranks"] == 2
    outl.run_outliers(noisy, tmp_path / "o1", outl.OutliersConfig(k=10, label="habit"))
    a, b = _read_csv(tmp_path / "o" / "outliers.csv"), _read_csv(tmp_path / "o1" / "outliers.csv")
    assert (a["key"] == b["key"]).all()
    for k in ("rarity", "local_ratio", "mislabel"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12)


def test_a_full_disk_is_one_line_no_temporaries_and_no_seal(skewed_store, tmp_path, monkeypatch, capsys):
    """ENOSPC while curate writes (CSV or HDF5): one line, exit 1; nothing left that a rerun trusts."""
    import errno

    import h5py

    from icehpc.run.stages import run_stage

    out = tmp_path / "c"
    argv = [str(skewed_store[0]), "--out", str(out), "--levels", "12,3", "--target", "100"]
    assert run_stage("curate", argv) == 0
    old = cur.CONTRACT.read(out)
    real_file = h5py.File

    def full(path, mode="r", *a, **k):
        if mode == "w":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(path, mode, *a, **k)

    monkeypatch.setattr(h5py, "File", full)
    capsys.readouterr()
    assert run_stage("curate", [*argv, "--seed", "7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device" in err[0], err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert cur.CONTRACT.read(out) is None and old is not None  # the old seal went first: nothing trusted
    monkeypatch.setattr(h5py, "File", real_file)
    assert run_stage("curate", [*argv, "--seed", "7"]) == 0 and cur.CONTRACT.verify(out) is not None


def test_curate_and_outliers_answer_status_without_writing(skewed_store, tmp_path):
    """status(args): done after a run with the same arguments; another config or a changed output
    file is not done; asking writes nothing."""
    from icehpc.run.stages import parse_stage_args, run_stage

    store = str(skewed_store[0])
    for name, module, argv, other in (
            ("curate", cur, ["--levels", "12,3", "--target", "100"], ["--seed", "5"]),
            ("outliers", outl, ["--k", "5"], ["--k", "6"])):
        out = tmp_path / name
        args = [store, "--out", str(out), *argv]
        st = module.status(parse_stage_args(name, args))
        assert not st.done and "no output yet" in st.why and not out.exists()
        assert run_stage(name, args) == 0
        assert module.status(parse_stage_args(name, args)).done
        assert not module.status(parse_stage_args(name, [*args, *other])).done
        csv_name = next(p for p in module.CONTRACT.patterns if p.endswith(".csv"))
        (out / csv_name).write_text("key\nswapped\n")
        stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        st = module.status(parse_stage_args(name, args))
        assert not st.done and "changed" in st.why
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
