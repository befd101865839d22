"""``icehpc classify``: the same predictions as a scikit-learn pipeline fitted the same way, C chosen by
stratified cross-validation on the labeled rows only, labels from a CSV / a store / a shard set,
refusals (keys not in the store, another data set), rank-count invariance under mpiexec through the
job script, resumability, and submission through submitit."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from icehpc import config as cfgmod
from icehpc.analysis import classify as cls
from icehpc.run.stages import parse_stage_args
from kappa_helpers import cheap_groups, paper_meta, write_store

ROOT = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def icehpc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icehpc", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env(), cwd=ROOT)


def make_store(folder: Path, n: int, seed: int, parts: int = 3) -> tuple[Path, np.ndarray, dict]:
    x, gid = cheap_groups(n, 8, 3, seed=seed)
    x += np.random.default_rng(seed).normal(scale=2.0, size=x.shape).astype(np.float32)  # classes overlap
    meta = paper_meta(n, gid, seed=seed)
    return write_store(folder, x, meta, n_parts=parts), x, meta


def write_labels(path: Path, keys, labels) -> Path:
    path.write_text("key,label\n" + "".join(f"{k},{v}\n" for k, v in zip(keys, labels)))
    return path


def labeled_subset(meta: dict, fraction: float, seed: int) -> np.ndarray:
    """Row indices of a random subset, in shuffled order (the CSV's order must not matter)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(len(meta["key"]))[: int(fraction * len(meta["key"]))]


def read_predictions(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, newline="")))


def config(*overrides: str) -> cls.ClassifyConfig:
    return cfgmod.load(cls.ClassifyConfig, None, overrides)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    store, x, meta = make_store(root / "s", 900, seed=3)
    rows = labeled_subset(meta, 0.25, seed=0)
    labels = write_labels(root / "labels.csv", meta["key"][rows], meta["habit"][rows])
    res = cls.run_classify(store, labels, root / "o", config())
    return root, store, x, meta, rows, res


def test_predictions_equal_a_scikit_learn_pipeline_fitted_the_same_way(labeled):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root, store, x, meta, rows, res = labeled
    fit_rows = np.sort(rows)  # store order
    xl, yl = x[fit_rows].astype(np.float64), meta["habit"][fit_rows]

    def pipe(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=0))

    # C: the grid value with the best mean balanced accuracy over the same stratified folds (ties: smaller C)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    grid = config().c_grid
    scores = [cross_validate(pipe(c), xl, yl, cv=folds, scoring=("accuracy", "balanced_accuracy")) for c in grid]
    best = int(np.argmax([s["test_balanced_accuracy"].mean() for s in scores]))
    assert res["chosen_c"] == grid[best]
    assert len({round(s["test_balanced_accuracy"].mean(), 6) for s in scores}) > 1  # the grid is a real choice
    cv = res["cv"]
    assert cv["accuracy_per_fold"] == pytest.approx(scores[best]["test_accuracy"].tolist(), abs=1e-12)
    assert cv["balanced_accuracy"] == pytest.approx(scores[best]["test_balanced_accuracy"].mean(), abs=1e-12)
    assert cv["balanced_accuracy_sd"] == pytest.approx(scores[best]["test_balanced_accuracy"].std(ddof=1), abs=1e-12)
    assert cv["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(yl, cross_val_predict(pipe(grid[best]), xl, yl, cv=folds)), abs=0.05)

    model = pipe(grid[best]).fit(xl, yl)
    want = model.predict_proba(x.astype(np.float64))
    got = read_predictions(root / "o" / cls.PREDICTIONS)
    classes = res["classes"]
    assert classes == model.classes_.tolist() == sorted(set(meta["habit"]))
    proba = np.array([[float(r[f"p_{c}"]) for c in classes] for r in got])
    assert [r["key"] for r in got] == meta["key"].tolist()  # store order, every row
    np.testing.assert_allclose(proba, want, rtol=1e-9, atol=1e-12)
    assert [r["predicted_habit"] for r in got] == model.predict(x.astype(np.float64)).tolist()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose([float(r["probability"]) for r in got], proba.max(axis=1), rtol=1e-15)
    bits = -(proba * np.log2(proba)).sum(axis=1)
    np.testing.assert_allclose([float(r[cls.ENTROPY_COLUMN]) for r in got], bits, rtol=1e-9, atol=1e-12)
    # labeled rows say so and carry their given label
    given = dict(zip(meta["key"][rows], meta["habit"][rows]))
    assert [r["labeled"] for r in got] == ["1" if k in given else "0" for k in meta["key"]]
    assert [r["given_habit"] for r in got] == [given.get(k, "") for k in meta["key"]]
    record = json.loads((root / "o" / cls.CONTRACT.marker).read_text())
    assert record["n_rows"] == 900 and record["n_labeled"] == record["n_fit"] == len(rows)
    assert record["label_counts"] == {c: int((yl == c).sum()) for c in classes}
    assert record["inputs_sha256"]["labels"] == sha256_of(root / "labels.csv")
    assert record["entropy"] == "entropy_bits" and set(record["outputs"]) == {cls.PREDICTIONS}


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_label_keys_absent_from_the_store_are_refused_with_counts(labeled, tmp_path):
    root, store, x, meta, rows, res = labeled
    keys = list(meta["key"][:288]) + [f"ghost{i:03d}" for i in range(12)]
    labels = write_labels(tmp_path / "l.csv", keys, ["a", "b", "c"] * 100)
    p = icehpc("classify", store, "--labels", labels, "--out", tmp_path / "o")
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert f"12 of 300 label keys are not in the store {store}, e.g. ghost000, ghost001, ghost002" in p.stderr
    assert not (tmp_path / "o" / cls.CONTRACT.marker).exists()
    # a key given twice and a CSV without a label column: one line each
    write_labels(tmp_path / "d.csv", [meta["key"][0], meta["key"][0]], ["a", "b"])
    p = icehpc("classify", store, "--labels", tmp_path / "d.csv", "--out", tmp_path / "o")
    assert p.returncode == 2 and "given more than once" in p.stderr and p.stderr.count("\n") == 1
    (tmp_path / "n.csv").write_text("key,size\nimg0000000,3\n")
    p = icehpc("classify", store, "--labels", tmp_path / "n.csv", "--out", tmp_path / "o")
    assert p.returncode == 2 and "needs a 'key' column and a 'habit' or 'label' column" in p.stderr


def test_labels_from_a_store_and_from_a_shard_set(labeled, tmp_path):
    """A labeled store (here the store itself: every row labeled) and a shard set's sample JSON; a
    shard set whose images differ under the same keys is refused (another data set)."""
    root, store, x, meta, rows, res = labeled
    verified, real_open = [], cls.open_store
    with pytest.MonkeyPatch.context() as mp:  # LABELS = the store: read from the store already verified
        mp.setattr(cls, "open_store", lambda p, verify=True: verified.append(verify) or real_open(p, verify=verify))
        own = cls.run_classify(store, store, tmp_path / "self", config("folds=3"))
    assert own["n_labeled"] == own["n_fit"] == 900 and own["labels"]["kind"] == "store"
    assert True not in verified

    def shard_set(folder: Path, keys, labels, sources) -> Path:
        folder.mkdir()
        with tarfile.open(folder / "shard-000000.tar", "w") as tar:
            for k, lab, src in zip(keys, labels, sources):
                blob = json.dumps({"habit": lab, "source_sha256": src}).encode()
                info = tarfile.TarInfo(f"{k}.json")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        (folder / "index.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar",
                                                                  "samples": len(keys)}]}))
        return folder

    sub = np.sort(rows)
    empty = [""] * len(sub)
    shards = shard_set(tmp_path / "shards", meta["key"][sub], meta["habit"][sub], empty)
    via = cls.run_classify(store, shards, tmp_path / "via", config())
    assert via["labels"]["kind"] == "shards" and via["chosen_c"] == res["chosen_c"]
    assert (tmp_path / "via" / cls.PREDICTIONS).read_text() == (root / "o" / cls.PREDICTIONS).read_text()

    # provenance: a store with source_sha256 against a shard set naming other images under the same keys
    src = np.array([f"{i:064x}" for i in range(900)])
    store2 = write_store(tmp_path / "s2", x, {**meta, "source_sha256": src})
    other = shard_set(tmp_path / "other", meta["key"][sub], meta["habit"][sub], ["f" * 64] * len(sub))
    with pytest.raises(cls.ClassifyError, match="holds other images under .* of the same keys"):
        cls.run_classify(store2, other, tmp_path / "o2", config())


def test_rerun_skips_when_done_and_reruns_when_the_labels_change(labeled, tmp_path):
    root, store, x, meta, rows, res = labeled
    labels = write_labels(tmp_path / "l.csv", meta["key"][rows], meta["habit"][rows])
    out = tmp_path / "o"
    argv = [store, "--labels", labels, "--out", out, "--folds", "4"]
    first = icehpc("classify", *argv)
    assert first.returncode == 0, first.stderr
    assert "fitted on 225 labeled rows, 3 classes" in first.stdout
    stamp = (out / cls.CONTRACT.marker).stat().st_mtime_ns
    args = parse_stage_args("classify", [str(a) for a in argv])
    assert cls.status(args).done
    again = icehpc("classify", *argv)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (out / cls.CONTRACT.marker).stat().st_mtime_ns == stamp
    changed = meta["habit"][rows].copy()
    changed[0] = "habit_2" if changed[0] != "habit_2" else "habit_0"
    write_labels(labels, meta["key"][rows], changed)
    st = cls.status(args)
    assert not st.done and f"--labels {labels} changed since" in st.why
    third = icehpc("classify", *argv)
    assert third.returncode == 0 and "up to date" not in third.stdout
    assert json.loads((out / cls.CONTRACT.marker).read_text())["inputs_sha256"]["labels"] == sha256_of(labels)


@pytest.mark.mpi
def test_two_ranks_through_the_job_script_give_the_same_predictions(tmp_path, mpiexec):
    """jobs/classify.sh with `srun` standing in as `mpiexec -n 2` (what srun --mpi=pmix gives): rows
    cut across both ranks and the part files, non-finite rows included; byte-identical output."""
    n = 2 * cls.BLOCK + 333
    store, x, meta = make_store(tmp_path / "s", n, seed=5)
    bad = write_store(tmp_path / "b", np.where(np.arange(n)[:, None] == 4100, np.nan, x).astype(np.float32), meta)
    rows = labeled_subset(meta, 0.05, seed=1)
    labels = write_labels(tmp_path / "l.csv", meta["key"][rows], meta["habit"][rows])
    script = ROOT / "jobs" / "classify.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --requeue" in script.read_text() and "$ICEHPC classify" in script.read_text()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f"#!/bin/bash\nshift\nexec {' '.join(mpiexec)} -n 2 \"$@\"\n")
    (fake / "srun").chmod(0o755)
    e = {**env(), "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", "ICEHPC_ROOT": str(ROOT),
         "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    p = subprocess.run(["bash", str(script), str(bad), "--labels", str(labels), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=300, env=e)
    assert p.returncode == 0, p.stdout + p.stderr
    two = json.loads((tmp_path / "o2" / cls.CONTRACT.marker).read_text())
    one = cls.run_classify(bad, labels, tmp_path / "o1", config())
    assert two["ranks"] == 2 and one["ranks"] == 1 and two["rows_nonfinite"] == 1
    assert (tmp_path / "o2" / cls.PREDICTIONS).read_bytes() == (tmp_path / "o1" / cls.PREDICTIONS).read_bytes()
    assert two["cv"] == one["cv"] and two["chosen_c"] == one["chosen_c"]
    got = read_predictions(tmp_path / "o1" / cls.PREDICTIONS)
    assert got[4100]["predicted_habit"] == got[4100]["probability"] == "" and got[4101]["probability"]


def test_submit_runs_classify_through_submitit(labeled, tmp_path):
    root, store, x, meta, rows, res = labeled
    p = icehpc("submit", "--executor", "debug", "--folder", tmp_path / "submitit", "--wait", "classify", "--",
               store, "--labels", root / "labels.csv", "--out", tmp_path / "o")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "o" / cls.PREDICTIONS).read_bytes() == (root / "o" / cls.PREDICTIONS).read_bytes()


def test_inspection_bench_tabulates_agreement_with_the_human_and_the_cnn_label(monkeypatch):
    """bench/classify_inspections.py: shares on a hand-made case, and every image held out once."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("classify_inspections")
    human = ["a", "a", "b", "b", "c", "b", "a"]
    cnn = ["a", "a", "a", "a", "a", "c", "b"]
    predicted = ["a", "b", "b", "a", "b", "", "b"]  # "": no prediction (non-finite embedding)
    fitted = [True, True, True, True, False, True, True]  # class c left out of the fit
    t = bench.tabulate(human, cnn, predicted, fitted)
    assert (t["n"], t["not_fitted"]) == (7, 1)
    assert t["cnn_equals_human"] == pytest.approx(2 / 7)
    assert t["agrees_human"] == pytest.approx(2 / 7) and t["agrees_cnn"] == pytest.approx(3 / 7)
    assert t["undisputed"] == {"n": 2, "not_fitted": 0, "agrees": 0.5}
    d = t["disputed"]
    assert (d["n"], d["not_fitted"]) == (5, 1)
    assert (d["human"], d["cnn"], d["neither"]) == pytest.approx((1 / 5, 2 / 5, 2 / 5))
    none_disputed = bench.tabulate(["a", "b"], ["a", "b"], ["a", "a"], [True, True])
    assert none_disputed["disputed"]["n"] == 0 and np.isnan(none_disputed["disputed"]["human"])
    labels = ["x"] * 12 + ["y"] * 7 + ["z"] * 2  # z: fewer images than folds
    held = bench.folds_of([f"k{i}" for i in range(len(labels))], labels, 5, seed=0)
    assert len(held) == 5 and sorted(np.concatenate(held).tolist()) == list(range(len(labels)))
