"""Habit probes: geometric features, weighted kNN, the probe CLI on hand-written stores and real data."""
from __future__ import annotations

import io
import json
import subprocess
import zipfile
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from icehpc.analysis.probe import (GEOMETRIC_FEATURES, contour_features, knn_predict, logreg_predict, score,
                          stratified_split)


def _disc(radius: float, size: int = 96, dark_on_light: bool = True) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2
    return np.where(inside, 0, 255).astype(np.uint8) if dark_on_light else np.where(inside, 255, 0).astype(np.uint8)


def test_contour_features_of_known_shapes():
    f = dict(zip(GEOMETRIC_FEATURES, contour_features(_disc(30), pixel_um=2.0)))
    assert f["aspect_ratio"] == pytest.approx(1.0, abs=0.02)
    assert f["circularity"] == pytest.approx(1.0, abs=0.08)
    assert f["solidity"] == pytest.approx(1.0, abs=0.05)  # pixel staircase vs its corner hull
    assert f["area_ratio"] == pytest.approx(1.0, abs=0.08)
    assert 10 ** f["log10_equivalent_diameter_um"] == pytest.approx(2 * 30 * 2.0, rel=0.03)

    needle = np.full((96, 96), 255, np.uint8)
    needle[10:86, 47:49] = 0
    g = dict(zip(GEOMETRIC_FEATURES, contour_features(needle)))
    assert g["aspect_ratio"] < 0.05 and g["area_ratio"] < 0.05 and g["circularity"] < 0.1

    # A cross (dendrite-like) is far less solid and more complex than its convex hull.
    cross = np.full((96, 96), 255, np.uint8)
    cross[44:52, 8:88] = 0
    cross[8:88, 44:52] = 0
    h = dict(zip(GEOMETRIC_FEATURES, contour_features(cross)))
    assert h["solidity"] < 0.4 and h["complexity"] > 1.2 > 1.05 > f["complexity"]


def test_contour_features_polarity_noise_and_empty():
    rng = np.random.default_rng(0)
    light = _disc(20, dark_on_light=True).astype(np.float64)
    noisy = np.clip(light + rng.normal(0, 8, light.shape), 0, 255).astype(np.uint8)
    a = contour_features(light.astype(np.uint8))
    b = contour_features(_disc(20, dark_on_light=False))
    c = contour_features(noisy)
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c, rtol=0.1)
    assert np.isnan(contour_features(np.full((40, 40), 250, np.uint8))).all()


def _knn_reference(train_x, train_y, test_x, n_classes, k, temperature):
    """Straightforward per-row version of the DINO weighted kNN, to check the vectorised one."""
    tn = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    out = []
    for row in test_x:
        sim = tn @ (row / np.linalg.norm(row))
        order = np.argsort(-sim)[:k]
        votes = np.zeros(n_classes)
        for j in order:
            votes[train_y[j]] += np.exp(sim[j] / temperature)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def test_knn_matches_reference_and_uses_weights():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16))
    y = rng.integers(0, 4, 600)
    x = centres[y] + rng.normal(scale=1.2, size=(600, 16))
    pred = knn_predict(x[:500], y[:500], x[500:], 4, k=20, temperature=0.07, chunk=37)
    np.testing.assert_array_equal(pred, _knn_reference(x[:500], y[:500], x[500:], 4, 20, 0.07))
    assert (pred == y[500:]).mean() > 0.6

    # Weights matter: one very close neighbour of class 1 beats 3 farther ones of class 0 at low T.
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [0.55, 0.83]])
    labels = np.array([1, 0, 0, 0])
    test = np.array([[0.99, 0.05]])
    assert knn_predict(train, labels, test, 2, k=4, temperature=0.07)[0] == 1
    assert knn_predict(train, labels, test, 2, k=4, temperature=100.0)[0] == 0


def write_store(path: Path, embeddings: np.ndarray, meta: dict[str, np.ndarray]) -> None:
    """A store written by hand with h5py, following the schema in the README."""
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=embeddings.astype(np.float32))
        for name, values in meta.items():
            values = np.asarray(values)
            if values.dtype.kind in "UO":
                f.create_dataset(f"meta/{name}", data=values.astype(object), dtype=h5py.string_dtype())
            else:
                f.create_dataset(f"meta/{name}", data=values)


def test_probe_cli_on_hand_written_stores(tmp_path, icehpc_cmd):
    rng = np.random.default_rng(2)
    classes = np.array(["column", "plate", "dendrite", "sphere", "rare"])
    labels = np.concatenate([np.repeat(classes[:4], 120), ["rare"] * 3])
    keys = np.array([f"s{i:05d}" for i in range(len(labels))])
    centres = rng.normal(size=(5, 32)) * 2
    informative = centres[np.searchsorted(np.sort(classes), labels)] + rng.normal(size=(len(labels), 32))
    write_store(tmp_path / "trained.h5", informative, {"key": keys, "habit": labels,
                                                        "temperature_c": rng.uniform(-40, 0, len(keys))})
    perm = rng.permutation(len(keys))  # another row order: rows must be matched by key
    write_store(tmp_path / "random.h5", rng.normal(size=(len(keys), 32))[perm],
                {"key": keys[perm], "habit": labels[perm]})

    out = tmp_path / "probe"
    res = subprocess.run([*icehpc_cmd, "probe", str(tmp_path / "trained.h5"), "--label", "habit",
                          "--out", str(out), "--random-store", str(tmp_path / "random.h5")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "probe.json").read_text())
    assert report["classes"] == ["column", "dendrite", "plate", "sphere"]
    assert report["split"]["left_out_classes"] == {"rare": 3}
    assert report["split"]["n_test"] == 96
    trained, random = report["results"]["pretrained"], report["results"]["random_init"]
    for method in ("knn", "logreg"):
        assert trained[method]["accuracy"] > 0.9
        assert random[method]["accuracy"] < 0.5
        cm = np.array(trained[method]["confusion_matrix"])
        assert cm.sum() == 96 and (cm.sum(axis=1) == 24).all()  # stratified: 24 test rows per class
        assert (out / f"confusion_pretrained_{method}.png").stat().st_size > 5000
    assert len((out / "summary.csv").read_text().splitlines()) == 5
    # 5 stratified splits by default (seeds 0-4), the same for every representation: mean ± sd
    assert report["split"]["seeds"] == [0, 1, 2, 3, 4]
    for rep in (trained, random):
        for method in ("knn", "logreg"):
            m = rep[method]
            assert len(m["accuracy_per_split"]) == 5 == len(m["balanced_accuracy_per_split"])
            assert m["accuracy"] == pytest.approx(np.mean(m["accuracy_per_split"]))
            assert m["accuracy_sd"] == pytest.approx(np.std(m["accuracy_per_split"], ddof=1))
    assert len(set(random["knn"]["accuracy_per_split"])) > 1  # the splits differ
    one = tmp_path / "probe1"
    res = subprocess.run([*icehpc_cmd, "probe", str(tmp_path / "trained.h5"), "--out", str(one), "--splits", "1",
                          "--seed", "2", "--random-store", str(tmp_path / "random.h5")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    single = json.loads((one / "probe.json").read_text())["results"]
    for rep in ("pretrained", "random_init"):
        assert single[rep]["knn"]["accuracy"] == report["results"][rep]["knn"]["accuracy_per_split"][2]
        assert single[rep]["knn"]["accuracy_sd"] == 0.0

    # A random store that lacks samples of the probed store is an error, not a silent subset.
    write_store(tmp_path / "short.h5", rng.normal(size=(10, 32)), {"key": keys[:10], "habit": labels[:10]})
    res = subprocess.run([*icehpc_cmd, "probe", str(tmp_path / "trained.h5"), "--out", str(tmp_path / "p2"),
                          "--random-store", str(tmp_path / "short.h5")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "missing" in res.stderr


def _zip_sample(archive: Path, per_class: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Up to ``per_class`` images per class folder of a real probe archive, read in place."""
    by_class: dict[str, list[str]] = defaultdict(list)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.lower().endswith(".png"):
                by_class[name.split("/")[1]].append(name)
        images, labels = [], []
        for cls, names in sorted(by_class.items()):
            for name in sorted(names)[:per_class]:
                images.append(np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("L")))
                labels.append(cls)
    return images, np.asarray(labels)


@pytest.mark.parametrize("archive,chance_margin", [("2ds_training.zip", 0.3), ("pip_training.zip", 0.35)])
def test_geometric_baseline_on_real_probe_images(shared_data, archive, chance_margin):
    images, labels = _zip_sample(shared_data / archive, per_class=120)
    features = np.array([contour_features(im) for im in images])
    assert np.isfinite(features).all(), "every real particle must give a finite contour"
    classes = sorted(set(labels))
    y = np.searchsorted(classes, labels)
    train, test = stratified_split(y, 0.25, seed=0)
    metrics = score(y[test], logreg_predict(features[train], y[train], features[test], seed=0), classes)
    chance = 1 / len(classes)
    assert metrics["balanced_accuracy"] > chance + chance_margin, metrics


# --------------------------------------------------------------------------- joins, hostile input, contract
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from icehpc.run.cli import main

    rc = main(["probe", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(rc: int, err: str) -> None:
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """40 synthetic samples → shards through the real CLI (every sample JSON carries source_sha256)."""
    import sys

    base = tmp_path_factory.mktemp("probe-shards")
    for cmd in (["synth", "--out", str(base / "synth"), "--n", "40", "--seed", "5", "--no-progress"],
                ["shards", "build", str(base / "synth" / "manifest.csv"), "--out", str(base / "shards"),
                 "--no-progress"]):
        res = subprocess.run([sys.executable, "-m", "icehpc", *cmd], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
    return base / "shards"


def _shard_meta(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    from icehpc.data.format import iter_samples, shard_paths

    keys, sources = [], []
    for p in shard_paths(str(shards)):
        for key, sample in iter_samples(p, ("json",)):
            keys.append(key)
            sources.append(json.loads(sample["json"])["source_sha256"])
    return np.array(keys), np.array(sources)


def _two_class_store(path: Path, keys: np.ndarray, sources: np.ndarray | None = None, seed: int = 0,
                     labels: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.array(["plate", "column"] * (len(keys) // 2 + 1))[: len(keys)] if labels is None else labels
    emb = rng.normal(size=(len(keys), 8)) + (labels == "plate")[:, None] * 3.0
    meta = {"key": keys, "habit": labels}
    if sources is not None:
        meta["source_sha256"] = sources
    write_store(path, emb, meta)
    return emb


def test_probe_images_of_another_build_are_refused_in_one_line(small_shards, tmp_path, capsys):
    keys, sources = _shard_meta(small_shards)
    _two_class_store(tmp_path / "s.h5", keys, sources)
    rc, out, err = _cli(capsys, str(tmp_path / "s.h5"), "--out", str(tmp_path / "ok"), "--images", str(small_shards),
                        "--workers", "1", "--splits", "1")
    assert rc == 0, err
    assert "geometric" in json.loads((tmp_path / "ok" / "probe.json").read_text())["results"]
    other = sources.copy()
    other[3] = "0" * 64  # another image under the same key: another build of the data
    _two_class_store(tmp_path / "other.h5", keys, other)
    rc, out, err = _cli(capsys, str(tmp_path / "other.h5"), "--out", str(tmp_path / "bad"), "--images",
                        str(small_shards), "--workers", "1")
    _one_line(rc, err)
    assert "source_sha256 differs" in err and keys[3] in err
    assert not (tmp_path / "bad" / "probe.json").exists()


def test_probe_random_store_of_other_samples_is_refused_in_one_line(tmp_path, capsys):
    keys = np.array([f"k{i:03d}" for i in range(60)])
    sources = np.array([f"{i:064x}" for i in range(60)])
    _two_class_store(tmp_path / "s.h5", keys, sources)
    _two_class_store(tmp_path / "same.h5", keys[::-1], sources[::-1], seed=1)
    rc, out, err = _cli(capsys, str(tmp_path / "s.h5"), "--out", str(tmp_path / "ok"), "--random-store",
                        str(tmp_path / "same.h5"), "--splits", "1")
    assert rc == 0, err
    swapped = sources.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same keys, sources of other images
    _two_class_store(tmp_path / "swapped.h5", keys, swapped, seed=1)
    rc, out, err = _cli(capsys, str(tmp_path / "s.h5"), "--out", str(tmp_path / "p"), "--random-store",
                        str(tmp_path / "swapped.h5"))
    _one_line(rc, err)
    assert "source_sha256 differs" in err
    more = np.concatenate([keys, ["extra"]])
    _two_class_store(tmp_path / "more.h5", more, np.concatenate([sources, ["f" * 64]]), seed=1)
    rc, out, err = _cli(capsys, str(tmp_path / "s.h5"), "--out", str(tmp_path / "p"), "--random-store",
                        str(tmp_path / "more.h5"))
    _one_line(rc, err)
    assert "does not" in err and "extra" in err


def test_probe_skips_and_counts_nonfinite_rows_and_refuses_too_few_classes(tmp_path, capsys):
    keys = np.array([f"k{i:03d}" for i in range(80)])
    emb = _two_class_store(tmp_path / "s.h5", keys)
    rc, out, err = _cli(capsys, str(tmp_path / "s.h5"), "--out", str(tmp_path / "clean"), "--splits", "2")
    assert rc == 0, err
    clean = json.loads((tmp_path / "clean" / "probe.json").read_text())
    emb[[2, 5]] = np.nan
    emb[7, 3] = np.inf
    labels = np.array(["plate", "column"] * 40)
    write_store(tmp_path / "nan.h5", emb, {"key": keys, "habit": labels})
    rc, out, err = _cli(capsys, str(tmp_path / "nan.h5"), "--out", str(tmp_path / "nan"), "--splits", "2")
    assert rc == 0, err
    assert "skipped rows with a NaN/inf embedding: 3 in pretrained" in out
    rec = json.loads((tmp_path / "nan" / "probe.json").read_text())
    assert rec["rows_nonfinite"] == {"pretrained": 3}
    assert rec["split"]["n_train"] + rec["split"]["n_test"] == 77
    assert clean["rows_nonfinite"] == {"pretrained": 0}
    # one class only (the other has too few samples): one line, no traceback
    write_store(tmp_path / "one.h5", emb[:40], {"key": keys[:40], "habit": np.array(["plate"] * 37 + ["column"] * 3)})
    rc, out, err = _cli(capsys, str(tmp_path / "one.h5"), "--out", str(tmp_path / "one"))
    _one_line(rc, err)
    assert "need at least 2 classes" in err


def test_probe_names_cannot_crash_figures_or_inject_formulas(tmp_path, capsys, monkeypatch):
    keys = np.array([f"k{i:03d}" for i in range(60)])
    labels = np.array(["$\\frac{x$ col", "=1+1"] * 30)
    _two_class_store(tmp_path / "s.h5", keys, labels=labels)
    monkeypatch.chdir(tmp_path)  # a relative --out (the seal lists names relative to it)
    rc, out, err = _cli(capsys, "s.h5", "--out", "p", "--name", "=1+1", "--splits", "1")
    assert rc == 0, err
    from icehpc.analysis.probe import CONTRACT

    assert CONTRACT.verify(tmp_path / "p") is not None
    assert (tmp_path / "p" / "confusion_=1+1_knn.png").stat().st_size > 3000
    rows = (tmp_path / "p" / "summary.csv").read_text().splitlines()
    assert rows[1].startswith("'=1+1,knn,")


def test_probe_json_seals_the_set_and_status_compares_inputs(tmp_path, capsys):
    from icehpc.analysis import probe
    from icehpc.run.stages import stage_parser

    keys = np.array([f"k{i:03d}" for i in range(60)])
    _two_class_store(tmp_path / "s.h5", keys)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "my_notes.txt").write_text("mine")
    argv = [str(tmp_path / "s.h5"), "--out", str(tmp_path / "p"), "--splits", "1"]
    args = stage_parser("probe").parse_args(argv)
    assert not probe.status(args).done
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, err
    rec = probe.CONTRACT.verify(tmp_path / "p")
    assert rec is not None and set(rec["outputs"]) == {"summary.csv", "confusion_pretrained_knn.png",
                                                       "confusion_pretrained_logreg.png"}
    assert probe.status(args).done, probe.status(args).why
    assert not probe.status(stage_parser("probe").parse_args([*argv, "--k", "3"])).done  # other settings
    (tmp_path / "p" / "summary.csv").write_text("representation\n")  # a file of the set changed
    assert not probe.status(args).done
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0 and probe.status(args).done
    _two_class_store(tmp_path / "s.h5", keys, seed=9)  # the store rebuilt in place
    assert "changed" in probe.status(args).why
    assert (tmp_path / "p" / "my_notes.txt").read_text() == "mine"  # a user's file is never removed


# --------------------------------------------------------------------------- label efficiency
def test_label_subsets_are_stratified_nested_and_seeded():
    from icehpc.analysis.probe import label_subset

    y = np.repeat([0, 1, 2, 3], [400, 150, 40, 10])
    train, test = stratified_split(y, 0.2, seed=3)
    per_class = np.bincount(y[train])
    previous = np.array([], dtype=int)
    for fraction in (0.01, 0.05, 0.1, 0.25, 0.5):
        sub = label_subset(y, train, fraction, seed=3)
        assert np.array_equal(sub, np.sort(sub)) and set(sub) <= set(train)  # training rows only
        want = np.maximum(1, np.floor(fraction * per_class + 0.5)).astype(int)
        np.testing.assert_array_equal(np.bincount(y[sub], minlength=4), want)  # stratified, ≥ 1 per class
        assert set(previous) <= set(sub)  # nested: the smaller subset lies inside the larger
        np.testing.assert_array_equal(sub, label_subset(y, train, fraction, seed=3))  # deterministic
        previous = sub
    assert not np.array_equal(label_subset(y, train, 0.25, seed=3), label_subset(y, train, 0.25, seed=4))
    np.testing.assert_array_equal(label_subset(y, train, 1.0, seed=3), train)


def _four_class_store(path: Path, seed: int, informative: bool = True) -> None:
    rng = np.random.default_rng(seed)
    labels = np.repeat(["column", "plate", "dendrite", "sphere"], [160, 100, 60, 30])
    keys = np.array([f"k{i:04d}" for i in range(len(labels))])
    centres = rng.normal(size=(4, 24)) * (0.7 if informative else 0.0)
    write_store(path, centres[np.searchsorted(["column", "dendrite", "plate", "sphere"], labels)]
                + rng.normal(size=(len(labels), 24)), {"key": keys, "habit": labels})


def test_probe_label_fractions_curves_deterministic_and_fraction_one_is_the_probe(tmp_path, capsys):
    from icehpc.analysis import probe
    from icehpc.run.stages import stage_parser

    _four_class_store(tmp_path / "t.h5", 0)
    _four_class_store(tmp_path / "r.h5", 1, informative=False)
    common = [str(tmp_path / "t.h5"), "--random-store", str(tmp_path / "r.h5"), "--splits", "3"]
    fractions = ["--label-fractions", "0.02,0.1,0.5,1"]
    runs = {}
    for name, extra in (("a", fractions), ("b", fractions), ("plain", [])):
        rc, out, err = _cli(capsys, *common, "--out", str(tmp_path / name), *extra)
        assert rc == 0, err
        runs[name] = json.loads((tmp_path / name / "probe.json").read_text())
    assert runs["a"]["label_efficiency"] == runs["b"]["label_efficiency"]  # the same seed: the same curves
    csv = {name: (tmp_path / name / "label_efficiency.csv").read_bytes() for name in ("a", "b")}
    assert csv["a"] == csv["b"]
    assert "label_efficiency" not in runs["plain"] and not (tmp_path / "plain" / "label_efficiency.csv").exists()
    rows = runs["a"]["label_efficiency"]["rows"]
    assert {(r["representation"], r["method"]) for r in rows} == {
        (rep, m) for rep in ("pretrained", "random_init") for m in ("knn", "logreg")}
    for rep in ("pretrained", "random_init"):
        for method in ("knn", "logreg"):
            curve = sorted((r for r in rows if (r["representation"], r["method"]) == (rep, method)),
                           key=lambda r: r["fraction"])
            assert [r["fraction"] for r in curve] == [0.02, 0.1, 0.5, 1.0]
            labels = [r["n_train_labels"] for r in curve]
            assert labels == sorted(labels) and labels[0] >= 4 and labels[-1] == runs["a"]["split"]["n_train"]
            full, plain = curve[-1], runs["plain"]["results"][rep][method]
            for key in ("accuracy", "accuracy_sd", "balanced_accuracy", "balanced_accuracy_sd",
                        "accuracy_per_split"):
                assert full[key] == plain[key] == runs["a"]["results"][rep][method][key], (rep, method, key)
            assert curve[0]["accuracy_per_split"] != full["accuracy_per_split"]  # fewer labels: other numbers
    at = {(r["representation"], r["method"], r["fraction"]): r for r in rows}
    assert at["pretrained", "knn", 0.1]["balanced_accuracy"] > at["random_init", "knn", 0.1]["balanced_accuracy"] + 0.2
    csv_rows = (tmp_path / "a" / "label_efficiency.csv").read_text().splitlines()
    assert csv_rows[0] == ",".join(probe.LABEL_EFFICIENCY_COLUMNS) and len(csv_rows) == 1 + 16
    sealed = probe.CONTRACT.verify(tmp_path / "a")["outputs"]
    assert {"label_efficiency.csv", "label_efficiency.png"} <= set(sealed)
    assert (tmp_path / "a" / "label_efficiency.png").stat().st_size > 10000
    # the fractions are part of the probe's fingerprint: other fractions recompute
    def args(*extra: str):
        return stage_parser("probe").parse_args([*common, "--out", str(tmp_path / "a"), *extra])

    assert probe.status(args(*fractions)).done
    assert not probe.status(args("--label-fractions", "0.1,1")).done
    assert not probe.status(args()).done


@pytest.mark.parametrize("bad", ["0.5,0.1", "0,1", "0.1,1.5", "0.1,0.1", "-0.1", "0.1,x", "nan", ""])
def test_probe_bad_label_fractions_are_one_line(tmp_path, capsys, bad):
    _two_class_store(tmp_path / "s.h5", np.array([f"k{i:03d}" for i in range(40)]))
    rc, out, err = _cli(capsys, str(tmp_path / "s.h5"), "--out", str(tmp_path / "p"), "--label-fractions", bad)
    _one_line(rc, err)
    assert "--label-fractions" in err or "label_fractions" in err, err
    assert not (tmp_path / "p" / "probe.json").exists()
