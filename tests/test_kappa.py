"""κ reduction: exact sums, groupings and bins, hostile input, bootstrap coverage at known κ,
rank-count invariance under real mpiexec, and the Slurm job script / submitit path."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from icehpc import config as cfgmod
from icehpc.analysis.kappa import (RNG_BLOCK, KappaConfig, KappaError, block_range, poisson_lut,
                          poisson_weights, run_kappa)
from icehpc.vmf import kappa_closed_form, kappa_mle
from kappa_helpers import cheap_groups, paper_meta, sample_vmf, write_store
from slurm_helpers import final_state

ROOT = Path(__file__).resolve().parent.parent


def cfg(*overrides: str) -> KappaConfig:
    return cfgmod.load(KappaConfig, None, overrides)


def rows_of(res: dict, grouping: str) -> dict[str, dict]:
    return {r["group"]: r for r in res["rows"] if r["grouping"] == grouping}


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory) -> tuple[Path, np.ndarray, dict]:
    """9,000 rows × D=16 (three RNG blocks) with the shard metadata schema, in 3 parts."""
    n, p = 9000, 16
    emb, gid = cheap_groups(n, p, 4, seed=1)
    meta = paper_meta(n, gid, seed=1)
    meta["temperature_c"][:7] = np.nan  # missing temperatures must show up, not vanish
    return write_store(tmp_path_factory.mktemp("paper") / "store", emb, meta), emb, meta


@pytest.fixture(scope="module")
def paper_result(paper_store, tmp_path_factory) -> dict:
    return run_kappa(paper_store[0], tmp_path_factory.mktemp("out"), cfg("bootstrap=40"))


def test_sums_r_bar_kappa_and_similarity_are_exact(paper_store, paper_result):
    _, emb, meta = paper_store
    x = emb.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    habits = sorted(set(meta["habit"]))
    got = rows_of(paper_result, "habit")
    sums = {h: x[meta["habit"] == h].sum(axis=0) for h in habits}
    for h in habits:
        xs = x[meta["habit"] == h]
        n, s = len(xs), sums[h]
        rbar = np.linalg.norm(s) / n
        r = got[h]
        assert r["n"] == n and r["n_skipped"] == 0
        assert r["rbar"] == pytest.approx(rbar, rel=1e-12)
        assert r["mean_cos_centroid"] == pytest.approx(np.mean(xs @ (s / np.linalg.norm(s))), rel=1e-12)
        gram = xs @ xs.T  # mean cosine over all pairs i ≠ j, by brute force
        assert r["mean_pairwise_cos"] == pytest.approx((gram.sum() - np.trace(gram)) / (n * (n - 1)), rel=1e-10)
        assert r["kappa"] == pytest.approx(float(kappa_mle(rbar, 16)), rel=1e-12)
        assert r["kappa_closed_form"] == pytest.approx(float(kappa_closed_form(rbar, 16)), rel=1e-12)
        assert r["ci_low"] < r["kappa_debiased"] < r["ci_high"]
    sim = paper_result["similarity"]
    assert sim["labels"] == habits and sim["column"] == "habit"
    cent = np.array([sums[h] / np.linalg.norm(sums[h]) for h in habits])
    for i, h in enumerate(habits):
        brute = (x[meta["habit"] == h] @ cent.T).mean(axis=0)
        assert np.allclose(sim["matrix"][i], brute, rtol=1e-11, atol=1e-14)
        assert sim["matrix"][i][i] == pytest.approx(got[h]["rbar"], rel=1e-12)


def test_paper_bins_crossed_groupings_and_every_row_accounted(paper_store, paper_result):
    _, _, meta = paper_store
    n_rows = len(meta["key"])
    groupings = {r["grouping"] for r in paper_result["rows"]}
    assert groupings == {"campaign", "habit", "temperature_c", "particle_width_um",
                         "campaign:temperature_c", "campaign:particle_width_um"}
    for g in groupings:
        assert sum(r["n"] + r["n_skipped"] for r in paper_result["rows"] if r["grouping"] == g) == n_rows, g
    temp = rows_of(paper_result, "temperature_c")
    assert list(temp)[:7] == ["[-70, -60)", "[-60, -50)", "[-50, -40)", "[-40, -30)", "[-30, -20)",
                              "[-20, -10)", "[-10, 0]"]
    t = meta["temperature_c"]
    assert temp["missing"]["n"] == 7
    assert temp["[-70, -60)"]["n"] == np.count_nonzero((t >= -70) & (t < -60))
    assert temp["below range (< -70)"]["n"] == np.count_nonzero(t < -70)
    assert temp["above range (> 0)"]["n"] == np.count_nonzero(t > 0)
    width = [r for r in paper_result["rows"] if r["grouping"] == "particle_width_um" and "low" in
             r["levels"]["particle_width_um"]]
    w = meta["particle_width_um"]
    edges = np.linspace(w.min(), w.max(), 11)
    assert len(width) == 9  # 10 equal bins, the last two merged
    assert width[-1]["levels"]["particle_width_um"]["low"] == pytest.approx(edges[8])
    assert width[-1]["levels"]["particle_width_um"]["high"] == pytest.approx(w.max())
    assert width[-1]["n"] == np.count_nonzero(w >= edges[8])
    crossed = rows_of(paper_result, "campaign:temperature_c")
    for camp, r in rows_of(paper_result, "campaign").items():
        parts = [c for g, c in crossed.items() if g.startswith(camp + " | ")]
        assert sum(c["n"] for c in parts) == r["n"]
        assert r["levels"] == {"campaign": {"label": camp}}
    assert "ICE-GÉNÉRAL" in rows_of(paper_result, "campaign")


def test_groupings_summed_from_a_finer_one_equal_direct_accumulation(paper_store, paper_result, tmp_path):
    direct = run_kappa(paper_store[0], tmp_path, cfg("bootstrap=40", "groupings=[campaign]",
                                                     "similarity_by=''"))
    assert len(direct["rows"]) == 3
    via_cross = rows_of(paper_result, "campaign")
    for g, r in rows_of(direct, "campaign").items():
        for k in ("n", "rbar", "kappa", "kappa_debiased", "ci_low", "ci_high"):
            assert r[k] == pytest.approx(via_cross[g][k], rel=1e-12, abs=0), (g, k)


def test_nonfinite_and_zero_rows_are_counted_and_skipped(tmp_path):
    emb, gid = cheap_groups(300, 8, 2, seed=4)
    meta = {"habit": np.array(["a", "b"])[gid], "key": np.arange(300).astype(str)}
    clean = run_kappa(write_store(tmp_path / "clean", emb, meta), tmp_path / "o1",
                      cfg("groupings=[habit]", "bootstrap=0"))
    bad = np.concatenate([emb, np.full((4, 8), 1.0, np.float32)])
    bad[300, 3], bad[301, 0], bad[302] = np.nan, np.inf, 0.0
    bad_meta = {"habit": np.r_[meta["habit"], ["a", "a", "b", "b"]], "key": np.arange(304).astype(str)}
    res = run_kappa(write_store(tmp_path / "bad", bad, bad_meta), tmp_path / "o2",
                    cfg("groupings=[habit]", "bootstrap=0"))
    assert res["run"]["rows_nonfinite"] == 2 and res["run"]["rows_zero_norm"] == 1
    a, b = rows_of(res, "habit")["a"], rows_of(res, "habit")["b"]
    assert a["n_skipped"] == 2 and b["n_skipped"] == 1
    assert b["n"] == rows_of(clean, "habit")["b"]["n"] + 1  # the one finite extra row counts
    assert a["rbar"] == pytest.approx(rows_of(clean, "habit")["a"]["rbar"], rel=1e-12)


def test_small_empty_and_out_of_range_groups_are_reported_and_flagged(tmp_path):
    emb, _ = cheap_groups(70, 8, 1, seed=5)
    emb[60:] = np.nan  # habit "ghost": all its rows are unusable
    meta = {"habit": np.array(["big"] * 50 + ["tiny"] * 10 + ["ghost"] * 10),
            "temperature_c": np.r_[np.full(50, -35.0), np.full(10, -5.0), np.full(10, -35.0)]}
    res = run_kappa(write_store(tmp_path / "s", emb, meta), tmp_path / "o",
                    cfg("groupings=[habit, temperature_c]", "bootstrap=30"))
    habit = rows_of(res, "habit")
    assert habit["big"]["flag"] == "" and np.isfinite(habit["big"]["kappa"])
    assert habit["tiny"]["flag"] == "n<20" and habit["tiny"]["kappa"] is None and habit["tiny"]["n"] == 10
    assert habit["ghost"]["flag"] == "empty" and habit["ghost"]["n_skipped"] == 10
    temp = rows_of(res, "temperature_c")
    assert temp["[-70, -60)"]["n"] == 0 and temp["[-70, -60)"]["flag"] == "empty"  # declared bin, no rows
    assert temp["[-40, -30)"]["n"] == 50
    assert res["similarity"]["labels"] == ["big", "tiny"]  # no centroid for a class without rows
    text = (tmp_path / "o" / "kappa.csv").read_text()
    assert "habit,tiny,10,0," in text and ",,,,,n<20" in text


def test_missing_column_is_a_clear_cli_error(tmp_path, icehpc_cmd):
    emb, gid = cheap_groups(50, 8, 2, seed=6)
    store = write_store(tmp_path / "s", emb, {"habit": np.array(["a", "b"])[gid]})
    proc = subprocess.run([*icehpc_cmd, "kappa", str(store), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "no metadata column(s) ['campaign', 'particle_width_um', 'temperature_c']" in proc.stderr
    assert "have ['habit']" in proc.stderr and "Traceback" not in proc.stderr
    assert "drop_empty_columns=true" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "kappa.json").exists()


def test_cli_flags_then_idempotent_rerun(tmp_path, icehpc_cmd, paper_store):
    out = tmp_path / "o"
    cmd = [*icehpc_cmd, "kappa", str(paper_store[0]), "--out", str(out), "--by",
           "habit,campaign:temperature_c", "--bins", "temperature_c=-60,-30,0", "--bootstrap", "20",
           "--min-count", "5", "--seed", "3", "--similarity-by", "campaign"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    res = json.loads((out / "kappa.json").read_text())
    # campaign is added for the similarity matrix; temperature_c alone was not asked for
    assert {r["grouping"] for r in res["rows"]} == {"habit", "campaign:temperature_c", "campaign"}
    assert res["run"]["bins"]["temperature_c"] == [-60.0, -30.0, 0.0]
    assert res["run"]["config"]["seed"] == 3 and res["similarity"]["column"] == "campaign"
    assert (out / "similarity.csv").read_text().startswith("campaign of samples \\ centroid of,HALO-2020")
    stamp = (out / "kappa.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (out / "kappa.json").stat().st_mtime_ns == stamp
    forced = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert forced.returncode == 0 and (out / "kappa.json").stat().st_mtime_ns != stamp
    assert json.loads((out / "kappa.json").read_text())["rows"] == res["rows"]


def test_bootstrap_is_seeded(paper_store, tmp_path):
    a = run_kappa(paper_store[0], tmp_path / "a", cfg("bootstrap=25", "groupings=[habit]"))
    b = run_kappa(paper_store[0], tmp_path / "b", cfg("bootstrap=25", "groupings=[habit]"))
    c = run_kappa(paper_store[0], tmp_path / "c", cfg("bootstrap=25", "groupings=[habit]", "seed=1"))
    assert [r["ci_low"] for r in a["rows"]] == [r["ci_low"] for r in b["rows"]]
    assert [r["ci_low"] for r in a["rows"]] != [r["ci_low"] for r in c["rows"]]


def test_poisson_weights_are_counter_based_poisson_1():
    w = np.concatenate([poisson_weights(7, b, 64) for b in range(20)]).astype(float)
    assert abs(w.mean() - 1) < 5e-3 and abs(w.var() - 1) < 1e-2
    assert abs(np.mean(w == 0) - np.exp(-1)) < 3e-3
    lut = poisson_lut().astype(float)
    assert abs(lut.mean() - 1) < 1e-4 and abs(lut.var() - 1) < 1e-3
    assert np.array_equal(poisson_weights(7, 3, 64), poisson_weights(7, 3, 64))
    assert not np.array_equal(poisson_weights(7, 3, 64), poisson_weights(7, 4, 64))
    assert not np.array_equal(poisson_weights(7, 3, 64), poisson_weights(8, 3, 64))


def test_block_ranges_cover_rows_once_on_block_boundaries():
    n = 5 * RNG_BLOCK + 123
    for size in range(1, 9):
        ranges = [block_range(n, r, size) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % RNG_BLOCK == 0 for lo, _ in ranges)


def test_stats_memory_guard(paper_store, tmp_path):
    with pytest.raises(KappaError, match="max_stats_gib"):
        run_kappa(paper_store[0], tmp_path, cfg("groupings=[key]", "max_stats_gib=0.01"))


def test_known_kappa_recovered_and_ci_covers_truth_p384(tmp_path):
    """One draw per κ, so a 99% interval (a 95% one misses 1 group in 20 by design; the coverage
    rate itself is the slow test below)."""
    truth = {"k50": 50.0, "k300": 300.0, "k2000": 2000.0}
    xs = [sample_vmf(384, k, 1500, seed=i) for i, k in enumerate(truth.values())]
    meta = {"habit": np.repeat(list(truth), 1500)}
    res = run_kappa(write_store(tmp_path / "s", np.concatenate(xs).astype(np.float32), meta), tmp_path / "o",
                    cfg("groupings=[habit]", "confidence=0.99"))
    for g, r in rows_of(res, "habit").items():
        assert r["ci_low"] <= truth[g] <= r["ci_high"], (g, r)
        assert r["kappa_debiased"] == pytest.approx(truth[g], rel=0.05)
        assert r["kappa"] >= r["kappa_debiased"]  # the MLE's small-sample bias is upward


@pytest.mark.slow
def test_ci_coverage_over_repeated_groups_p384(tmp_path):
    """Independent groups at κ = 200, n from 20 to 100,000: coverage near 95% at every n, and the
    debiased estimator is unbiased where the MLE is not (n = 20: MLE +17%)."""
    sizes = [20] * 40 + [100] * 30 + [1000] * 10 + [10_000] * 2 + [100_000]
    xs, labels = [], []
    for i, n in enumerate(sizes):
        xs.append(sample_vmf(384, 200.0, n, seed=100 + i))
        labels += [f"g{i:03d}_n{n}"] * n
    res = run_kappa(write_store(tmp_path / "s", np.concatenate(xs).astype(np.float32),
                                {"group": np.array(labels)}, n_parts=2),
                    tmp_path / "o", cfg("groupings=[group]", "similarity_by=''"))
    rows = list(rows_of(res, "group").values())
    cover = {n: [r["ci_low"] <= 200.0 <= r["ci_high"] for r in rows if r["n"] == n] for n in set(sizes)}
    assert 0.85 <= np.mean(cover[20]) <= 1.0 and 0.85 <= np.mean(cover[100]) <= 1.0
    assert sum(cover[1000]) >= 8 and all(cover[10_000]) and all(cover[100_000])
    small = [r for r in rows if r["n"] == 20]
    assert np.mean([r["kappa"] for r in small]) > 1.1 * 200
    assert np.mean([r["kappa_debiased"] for r in small]) == pytest.approx(200, rel=0.05)


def _numbers(res: dict) -> list[tuple]:
    keys = ("n", "n_skipped", "rbar", "mean_pairwise_cos", "kappa", "kappa_debiased", "ci_low", "ci_high")
    def num(v):  # an in-memory result holds NaN where kappa.json holds null
        return None if v is None or not np.isfinite(v) else v

    return [(r["grouping"], r["group"], r["flag"], *[num(r[k]) for k in keys]) for r in res["rows"]]


def _assert_same(a: dict, b: dict, rtol: float = 1e-12) -> None:
    for ra, rb in zip(_numbers(a), _numbers(b), strict=True):
        assert ra[:3] == rb[:3]
        for x, y in zip(ra[3:], rb[3:]):
            assert (x is None and y is None) or abs(x - y) <= rtol * abs(x), (ra, rb)
    assert np.allclose(a["similarity"]["matrix"], b["similarity"]["matrix"], rtol=rtol, atol=1e-15)


@pytest.mark.mpi
def test_results_do_not_depend_on_rank_count(tmp_path, mpiexec, icehpc_cmd):
    n = 3 * RNG_BLOCK + 777
    emb, gid = cheap_groups(n, 32, 5, seed=8)
    emb[[5, 5000]] = np.nan
    store = write_store(tmp_path / "s", emb, paper_meta(n, gid, seed=8), n_parts=3)
    serial = run_kappa(store, tmp_path / "o1", cfg("bootstrap=50"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for ranks in (2, 3):
        out = tmp_path / f"o{ranks}"
        proc = subprocess.run([*mpiexec, "-n", str(ranks), *icehpc_cmd, "kappa", str(store), "--out", str(out),
                               "--bootstrap", "50"], capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        res = json.loads((out / "kappa.json").read_text())
        assert res["run"]["ranks"] == ranks and res["run"]["rows_nonfinite"] == 2
        _assert_same(serial, res)


@pytest.mark.slurm
def test_sbatch_job_script_with_two_tasks(slurm_cluster, tmp_path, paper_store):
    out = tmp_path / "o"
    log = tmp_path / "slurm-%j.out"
    proc = subprocess.run(["sbatch", "--wait", "--parsable", "-p", slurm_cluster["partition"], "-n", "2",
                           "-t", "5", "-o", str(log), "--export", f"ALL,ICEHPC_ROOT={ROOT}",
                           str(ROOT / "jobs" / "kappa.sh"), str(paper_store[0]), "--out", str(out),
                           "--bootstrap", "20"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    job_id = proc.stdout.strip().split(";")[0]
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    res = json.loads((out / "kappa.json").read_text())
    assert res["run"]["ranks"] == 2, logs
    serial = run_kappa(paper_store[0], tmp_path / "serial", cfg("bootstrap=20"))
    _assert_same(serial, res)
    assert final_state(job_id) == ("COMPLETED", "0:0"), logs


@pytest.mark.slurm
def test_icehpc_submit_kappa_through_submitit(slurm_cluster, tmp_path, paper_store, icehpc_cmd):
    out = tmp_path / "o"
    # resource options go before STAGE: everything after it belongs to the stage
    proc = subprocess.run([*icehpc_cmd, "submit", "--tasks-per-node", "2", "--time-min", "5",
                           "--partition", slurm_cluster["partition"], "--folder", str(tmp_path / "submitit"),
                           "--wait", "kappa", "--", str(paper_store[0]), "--out", str(out), "--bootstrap", "20"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "kappa.json").read_text())
    assert res["run"]["ranks"] == 2
    _assert_same(run_kappa(paper_store[0], tmp_path / "serial", cfg("bootstrap=20")), res)


def test_a_csv_swapped_after_the_run_is_recomputed_not_trusted(paper_store, tmp_path):
    """kappa.json is sealed last over the CSVs: a crash after a new kappa.csv (or another run's
    CSV copied in) leaves a marker that does not verify, so the rerun recomputes."""
    from icehpc.analysis import kappa
    from icehpc.run.stages import parse_stage_args

    out = tmp_path / "o"
    c = cfg("bootstrap=10", "groupings=[habit]")
    first = run_kappa(paper_store[0], out, c)
    good = (out / "kappa.csv").read_bytes()
    assert set(json.loads((out / "kappa.json").read_text())["outputs"]) == {"kappa.csv", "similarity.csv"}
    args = parse_stage_args("kappa", [str(paper_store[0]), "--out", str(out), "bootstrap=10", "groupings=[habit]"])
    assert kappa.status(args).done
    assert run_kappa(paper_store[0], out, c) is None  # up to date
    (out / "kappa.csv").write_bytes(good.replace(b"habit", b"HABIT"))  # another run's bytes
    st = kappa.status(args)
    assert not st.done and "changed" in st.why
    again = run_kappa(paper_store[0], out, c)
    assert again is not None and again["rows"] == first["rows"]
    assert (out / "kappa.csv").read_bytes() == good


def test_enospc_leaves_no_temporary_file(monkeypatch, tmp_path):
    """A full disk mid-write: the error propagates, the target is untouched, no .NAME.PID.tmp stays."""
    import errno

    from icehpc import fileio

    target = tmp_path / "kappa.csv"
    target.write_text("old\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        fileio.write_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kappa.csv"]


# ------------------------------------------------------------------------- per-key columns (--columns)

def _columns_file(path: Path, keys, **cols) -> Path:
    names = list(cols)
    path.write_text("key," + ",".join(names) + "\n" + "".join(
        f"{k}," + ",".join(str(cols[c][i]) for c in names) + "\n" for i, k in enumerate(keys)))
    return path


@pytest.fixture(scope="module")
def joined_case(tmp_path_factory):
    """A store without an `env` column, and a table giving `env` (text) and `altitude_m` (numbers)
    to 90 % of its keys, in shuffled order."""
    root = tmp_path_factory.mktemp("columns")
    n = 600
    emb, gid = cheap_groups(n, 8, 3, seed=11)
    meta = paper_meta(n, gid, seed=11)
    store = write_store(root / "s", emb, meta)
    rng = np.random.default_rng(0)
    rows = rng.permutation(n)[:540]
    env = np.array(["cloud-top", "mid-cloud", "near-base"])[rng.integers(0, 3, n)]
    alt = rng.uniform(500, 9000, n).round(1)
    table = _columns_file(root / "env.csv", meta["key"][rows], env=env[rows], altitude_m=alt[rows])
    return root, store, emb, meta, rows, env, alt, table


def test_columns_join_by_key_and_group_like_store_columns(joined_case, icehpc_cmd):
    """Grouping by a joined column gives exactly what the same column stored in the store gives
    (unmatched rows: empty text, a missing number), and the run says how many rows matched."""
    root, store, emb, meta, rows, env, alt, table = joined_case
    out = root / "k"
    proc = subprocess.run([*icehpc_cmd, "kappa", str(store), "--out", str(out), "--columns", str(table), "--by",
                           "env,habit:env,altitude_m", "--bootstrap", "30", "--min-count", "5"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"columns {table}: 540 of 600 rows matched" in proc.stdout
    res = json.loads((out / "kappa.json").read_text())
    assert res["run"]["columns"][0]["rows_matched"] == 540
    assert res["run"]["columns"][0]["columns"] == ["env", "altitude_m"]
    matched = np.isin(np.arange(600), rows)
    direct = {**meta, "env": np.where(matched, env, ""), "altitude_m": np.where(matched, alt, np.nan)}
    same = run_kappa(write_store(root / "direct", emb, direct), root / "kd",
                     cfg("groupings=[env,habit:env,altitude_m]", "bootstrap=30", "min_count=5"))
    _assert_same(same, res)
    assert rows_of(res, "env")[""]["n"] == 60 and rows_of(res, "altitude_m")["missing"]["n"] == 60


def test_columns_with_too_few_matching_keys_are_refused(joined_case, icehpc_cmd, tmp_path):
    root, store, emb, meta, rows, env, alt, table = joined_case
    few = _columns_file(tmp_path / "few.csv", list(meta["key"][:240]) + ["elsewhere-1"], env=env[:241])

    def kappa(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*icehpc_cmd, "kappa", str(store), "--out", str(tmp_path / "o"), "--bootstrap", "0",
                               *args], capture_output=True, text=True, timeout=180, cwd=ROOT)

    proc = kappa("--columns", str(few), "--by", "env")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"columns file {few}: only 240 of 600 store rows have their key in it (< columns_min_match=0.5)" in proc.stderr
    assert not (tmp_path / "o" / "kappa.json").exists()
    ok = kappa("--columns", str(few), "--by", "env", "--columns-min-match", "0.4")
    assert ok.returncode == 0 and "240 of 600 rows matched" in ok.stdout
    clash = _columns_file(tmp_path / "clash.csv", meta["key"], habit=meta["habit"])
    proc = kappa("--columns", str(clash), "--by", "habit", "--force")
    assert proc.returncode == 2 and "column 'habit' is also in the store; rename it" in proc.stderr
    (tmp_path / "nokey.csv").write_text("id,env\n1,a\n")
    proc = kappa("--columns", str(tmp_path / "nokey.csv"), "--force")
    assert proc.returncode == 2 and "has no 'key' column" in proc.stderr and proc.stderr.count("\n") == 1


def test_columns_file_change_reruns_kappa_and_the_pipeline_step(joined_case, tmp_path):
    from icehpc.analysis import kappa
    from icehpc.run import plan as planlib
    from icehpc.run.stages import parse_stage_args

    root, store, emb, meta, rows, env, alt, _ = joined_case
    table = _columns_file(tmp_path / "env.csv", meta["key"][rows], env=env[rows])
    out = tmp_path / "o"
    argv = [str(store), "--out", str(out), "--columns", str(table), "--by", "env", "--bootstrap", "0"]
    c = kappa.config_from_args(parse_stage_args("kappa", argv))
    first = run_kappa(store, out, c)
    assert kappa.status(parse_stage_args("kappa", argv)).done and run_kappa(store, out, c) is None
    flipped = env[rows].copy()
    flipped[:50] = "cloud-top"
    _columns_file(table, meta["key"][rows], env=flipped)
    st = kappa.status(parse_stage_args("kappa", argv))
    assert not st.done and f"columns file {table} changed since" in st.why
    again = run_kappa(store, out, c)
    assert again is not None and rows_of(again, "env") != rows_of(first, "env")
    # the pipeline's kappa steps take kappa.columns as --columns and record the file
    pcfg = cfgmod.load(planlib.PipelineConfig, "demo.yaml", ["real.archives=[]", f"kappa.columns=[{table}]"])
    steps = {s.name: s for s in planlib.plan(pcfg, tmp_path / "run")}
    for name in ("kappa-trained", "kappa-random"):
        assert f"--columns={table}" in steps[name].argv and str(table) in steps[name].parts["files"]
    with pytest.raises(cfgmod.UserError, match="kappa.columns=.*does not exist"):
        planlib.plan(cfgmod.load(planlib.PipelineConfig, "demo.yaml", ["real.archives=[]",
                                                                       f"kappa.columns=[{tmp_path}/no.csv]"]), tmp_path)


@pytest.mark.mpi
def test_columns_under_two_ranks_equal_one(tmp_path, mpiexec, icehpc_cmd):
    n = RNG_BLOCK + 904  # rows on both ranks
    emb, gid = cheap_groups(n, 8, 3, seed=12)
    meta = paper_meta(n, gid, seed=12)
    store = write_store(tmp_path / "s", emb, meta, n_parts=2)
    keep = np.random.default_rng(1).permutation(n)[: n - 700]
    table = _columns_file(tmp_path / "c.csv", meta["key"][keep], env=np.array(["a", "b"])[keep % 2],
                          depth=keep * 0.5)
    args = ["--columns", str(table), "--by", "env,habit:env,depth", "--bootstrap", "20"]
    serial = run_kappa(store, tmp_path / "o1", cfg(f"columns=[{table}]", "groupings=[env,habit:env,depth]",
                                                   "bootstrap=20"))
    proc = subprocess.run([*mpiexec, "-n", "2", *icehpc_cmd, "kappa", str(store), "--out", str(tmp_path / "o2"), *args],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"columns {table}: {n - 700:,} of {n:,} rows matched" in proc.stdout
    res = json.loads((tmp_path / "o2" / "kappa.json").read_text())
    assert res["run"]["ranks"] == 2
    _assert_same(serial, res)
