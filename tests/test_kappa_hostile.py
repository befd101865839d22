"""Hostile configs and labels against `icehpc kappa` (issue #20): sizes a config can set are bounded
before anything is allocated, bad --bins are one line, and the CSVs cannot run as spreadsheet formulas."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icehpc import config as cfglib
from icehpc.analysis.kappa import KappaConfig, KappaError, run_kappa
from icehpc.analysis.kappa_groups import MAX_BINS
from icehpc.config import ConfigError
from kappa_helpers import small_store, write_store
from cli_helpers import one_clear_line

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icehpc", *args], capture_output=True, text=True, env=ENV,
                          timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    n = 90
    meta = {"habit": np.array(["plate", "=1+1", "@SUM(A1)"] * 30),
            "campaign": np.array(["=cmd|' /C calc'!A0", "HALO"] * 45),
            "temperature_c": rng.uniform(-40, 0, n)}
    return write_store(tmp_path_factory.mktemp("k") / "s", rng.normal(size=(n, 8)).astype(np.float32), meta)


def test_n_bins_of_a_hundred_million_is_refused_before_allocating(store, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"bins.temperature_c.n_bins: must be ≤ {MAX_BINS}, got 100000000"):
        cfglib.load(KappaConfig, None, ["bins={temperature_c: {n_bins: 100000000}}"])
    proc = _cli("kappa", str(store), "--out", str(tmp_path / "k"), "--by", "temperature_c",
                "bins={temperature_c: {n_bins: 100000000}}")
    one_clear_line(proc, "n_bins", str(MAX_BINS), code=2)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ConfigError, match="edges: at most"):
        cfglib.load(KappaConfig, None, [f"bins.temperature_c.edges={list(range(MAX_BINS + 2))}"])


@pytest.mark.parametrize("override,key", [("bootstrap=1000000000", "bootstrap: must be ≤"),
                                          ("bootstrap=-1", "bootstrap: must be ≥ 0"),
                                          ("min_count=-5", "min_count: must be ≥ 1"),
                                          ("max_stats_gib=nan", "max_stats_gib: expected a finite number"),
                                          ("max_stats_gib=-1", "max_stats_gib: must be ≥ 0")])
def test_counts_and_limits_are_checked_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        cfglib.load(KappaConfig, None, [override])


def test_max_stats_gib_counts_every_declared_bin_not_only_the_filled_ones(store, tmp_path):
    # 90 rows fill at most 90 of the 10 000 bins, but every declared bin gets a row of B×D sums
    cfg = KappaConfig(groupings=["temperature_c"], bins={"temperature_c": cfglib.load(
        KappaConfig, None, ["bins={temperature_c: {n_bins: 10000}}"]).bins["temperature_c"]},
        bootstrap=50, similarity_by="", max_stats_gib=0.01)
    with pytest.raises(KappaError, match=r"100\d\d groups × \(B\+1=51\) × D=8 need 0.03\d* GiB of sums and bootstrap weights \(> max_stats_gib=0.01\)"):
        run_kappa(store, tmp_path / "k", cfg)
    assert not (tmp_path / "k" / "kappa.json").exists()


def test_max_stats_gib_counts_the_bootstrap_weights_of_a_read(store, tmp_path):
    # 3 groups × 10 001 × D=8 float64 sums are 2 MB; one RNG block of 4096 × B uint8 weights (twice) and
    # the 90 rows' float64 copy are 96 MB more
    cfg = KappaConfig(groupings=["habit"], bootstrap=10_000, similarity_by="", max_stats_gib=0.05)
    with pytest.raises(KappaError, match=r"need 0.09\d* GiB of sums and bootstrap weights"):
        run_kappa(store, tmp_path / "k", cfg)


@pytest.mark.parametrize("bins", ["temperature_c=a,b", "temperature_c=-40,,0", "temperature_c=1e999,2"])
def test_bins_that_are_not_numbers_are_one_line(store, tmp_path, bins):
    proc = _cli("kappa", str(store), "--out", str(tmp_path / "k"), "--by", "temperature_c", "--bins", bins)
    one_clear_line(proc, "temperature_c", code=2)


def test_labels_that_look_like_formulas_are_escaped_in_kappa_and_similarity_csv(store, tmp_path):
    run_kappa(store, tmp_path / "k", KappaConfig(groupings=["habit", "campaign"], bootstrap=0, min_count=1))
    rows = list(csv.DictReader((tmp_path / "k" / "kappa.csv").open()))
    groups = {r["group"] for r in rows}
    assert {"'=1+1", "'@SUM(A1)", "plate", "'=cmd|' /C calc'!A0", "HALO"} <= groups
    assert all(float(r["rbar"]) > 0 for r in rows)  # numbers stay numbers
    sim = list(csv.reader((tmp_path / "k" / "similarity.csv").open()))
    assert sim[0][1:] == ["'=1+1", "'@SUM(A1)", "plate"]
    assert [r[0] for r in sim[1:]] == ["'=1+1", "'@SUM(A1)", "plate"]
    assert not any(cell.startswith(("=", "@", "+")) for r in sim for cell in r)


# ------------------------------------------------------------------ stale fingerprints and κ edge cases
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
    master = small_store(tmp_path / "s")
    run_kappa(master, tmp_path / "k2", cfg)
    edit_in_place(tmp_path / "s" / "part-00001.h5")
    with pytest.raises(StoreError, match="part-00001"):
        run_kappa(master, tmp_path / "k2", cfg)


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
    one_clear_line(proc, "bins.temperature_c", "edges")
