"""Synthetic CPI-like data: determinism, image/metadata sanity, and the planted physics."""
from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare

from icehpc import config
from icehpc.data import synth
from icehpc.data import format as data_format


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    synth.synthesize(out, synth.SynthConfig(n=300, seed=11), workers=2, progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bins_are_the_papers_defaults():
    assert synth.TEMPERATURE_EDGES_C == (-70.0, -60.0, -50.0, -40.0, -30.0, -20.0, -10.0, 0.0)
    w = np.array(synth.WIDTH_EDGES_UM)
    assert len(w) == 10 and w[0] == 10 and w[-1] == 1000
    assert np.allclose(np.diff(w)[:-1], 99.0) and math.isclose(w[-1] - w[-2], 198.0)  # last two merged
    assert synth.bin_index(-70.0, synth.TEMPERATURE_EDGES_C) == 0
    assert synth.bin_index(-10.0, synth.TEMPERATURE_EDGES_C) == 6
    assert synth.bin_index(0.0, synth.TEMPERATURE_EDGES_C) == 6
    assert synth.bin_index(1000.0, synth.WIDTH_EDGES_UM) == 8 and synth.bin_index(5.0, synth.WIDTH_EDGES_UM) == -1


def test_same_bytes_for_any_worker_count(run, tmp_path):
    other = tmp_path / "b"
    synth.synthesize(other, synth.SynthConfig(n=300, seed=11), workers=1, progress=False)
    assert _files(other) == _files(run)
    assert [synth.sample_metadata(12, i)[0] for i in range(20)] != [synth.sample_metadata(11, i)[0] for i in range(20)]


def test_rerun_resumes_and_refuses_other_parameters(run, tmp_path):
    copy = tmp_path / "copy"
    for rel, data in _files(run).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    (copy / "planted.json").unlink()  # as if killed before the end
    (copy / synth.image_path(7)).unlink()
    synth.synthesize(copy, synth.SynthConfig(n=300, seed=11), workers=1, progress=False)
    assert _files(copy) == _files(run)
    with pytest.raises(config.ConfigError, match="other parameters"):
        synth.synthesize(copy, synth.SynthConfig(n=300, seed=99), workers=1, progress=False)


def test_manifest_and_images_are_sane(run):
    rows = list(csv.DictReader(open(run / "manifest.csv")))
    assert len(rows) == 300
    assert list(rows[0]) == ["path", *data_format.METADATA_KEYS]
    assert {r["habit"] for r in rows} <= set(synth.HABITS) and len({r["habit"] for r in rows}) >= 7
    assert {r["campaign"] for r in rows} == {c.name for c in synth.CAMPAIGNS}
    coarse = 0
    for r in rows:
        t, w, h, px = (float(r[k]) for k in ("temperature_c", "particle_width_um", "particle_height_um", "pixel_um"))
        assert -70 <= t <= 0 and 10 <= w <= 1000 and 0 < h <= w + 1e-6 and px >= synth.PIXEL_UM
        assert 100 < float(r["pressure_hpa"]) < 1100 and r["probe"] == "CPI"
        coarse += px > synth.PIXEL_UM
        with Image.open(run / r["path"]) as im:
            assert im.mode == "L" and 16 <= min(im.size) and max(im.size) <= 256
            a = np.asarray(im, dtype=float)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert np.median(border) > 170  # light background
        assert a.min() < np.median(border) - 60  # a dark particle
        if px == synth.PIXEL_UM and max(im.size) < 256:  # crop side follows the particle
            assert max(im.size) >= w / px
    assert 0 < coarse < 60  # only the largest particles needed coarser pixels


def test_planted_table_is_consistent(run):
    planted = json.loads((run / "planted.json").read_text())
    assert planted["temperature_edges_c"] == list(synth.TEMPERATURE_EDGES_C)
    assert planted["width_edges_um"] == list(synth.WIDTH_EDGES_UM)
    assert sum(b["count"] for b in planted["bins"]) == 300
    for c in synth.CAMPAIGNS:
        rows = [b for b in planted["bins"] if b["campaign"] == c.name]
        assert len(rows) == 7 * 9
        assert math.isclose(sum(b["mass"] for b in rows), 1.0, rel_tol=1e-3)
    for b in planted["bins"]:
        p = np.array([b["probabilities"][h] for h in synth.HABITS])
        assert math.isclose(p.sum(), 1.0, rel_tol=1e-9)
        assert math.isclose(b["entropy_nats"], float(-(p[p > 0] * np.log(p[p > 0])).sum()), rel_tol=1e-9)


def test_habit_diagram_is_planted():
    H = {h: i for i, h in enumerate(synth.HABITS)}
    t = np.array([-60.0, -45.0, -30.0, -15.0, -6.0, -2.0])
    small = synth.habit_probabilities(t, np.full_like(t, 60.0), riming=0.0)
    assert small[H["dendrite"]].argmax() == 3  # dendrites peak near −15 °C
    assert small[H["needle"]].argmax() == 4 and small[H["column"], 4] > small[H["column"], 3]
    assert small[H["plate"], 3] > small[H["plate"], 1] and small[H["plate"], 5] > small[H["plate"], 2]
    assert small[H["sphere"], :2].max() < 0.01 < small[H["sphere"], 4]  # no drops below −38 °C
    cold = small[[H["column"], H["bullet_rosette"]], :2].sum(axis=0)
    assert (cold > 0.5).all()  # columns and rosettes rule cirrus
    big = synth.habit_probabilities(np.array([-12.0]), np.array([900.0]), riming=0.0)
    assert big[[H["aggregate"], H["rimed"]]].sum() > 0.6  # large sizes: aggregates and rimed
    rimy = synth.habit_probabilities(np.array([-12.0]), np.array([300.0]), riming=1.0)
    dry = synth.habit_probabilities(np.array([-12.0]), np.array([300.0]), riming=-2.0)
    assert rimy[H["rimed"]] > 3 * dry[H["rimed"]]


def test_campaigns_differ_in_temperature_and_planted_diversity():
    table = synth.planted_table(quad=16)
    mean_t = {c.name: sum(b["mass"] * np.mean(b["temperature_bin_c"]) for b in table if b["campaign"] == c.name)
              for c in synth.CAMPAIGNS}
    assert len({round(v) for v in mean_t.values()}) == len(synth.CAMPAIGNS)
    ent = {(b["campaign"], b["t_index"], b["w_index"]): b["entropy_nats"] for b in table if b["mass"] > 0.01}
    assert max(ent.values()) - min(ent.values()) > 0.5  # a diversity ordering worth recovering


def test_sampled_habits_follow_the_planted_probabilities():
    n = 2400
    metas = [synth.sample_metadata(5, i)[0] for i in range(n)]
    table = synth.planted_table(quad=24)
    for c in synth.CAMPAIGNS:
        got = np.array([sum(m["habit"] == h and m["campaign"] == c.name for m in metas) for h in synth.HABITS])
        mix = sum(b["mass"] * np.array([b["probabilities"][h] for h in synth.HABITS])
                  for b in table if b["campaign"] == c.name)
        assert chisquare(got, got.sum() * mix / mix.sum()).pvalue > 1e-4, (c.name, got, mix)
        temps = [m["temperature_c"] for m in metas if m["campaign"] == c.name]
        assert abs(np.mean(temps) - c.t_mean_c) < 3.0


def test_cli(icehpc_cmd, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([*icehpc_cmd, "synth", "--out", str(out), "--n", "40", "--seed", "2", "--workers", "2",
                        "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list(csv.DictReader(open(out / "manifest.csv")))) == 40
    bad = subprocess.run([*icehpc_cmd, "synth", "--out", str(tmp_path / "x"), "n=0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "n must be >= 1" in bad.stderr


def test_plant_only_habit_is_drawn_but_never_sampled(run):
    """A capped column renders (two caps wider than the column: the dark area spans the short axis),
    but the planted mix never draws it, so planting it makes a habit the set does not hold."""
    assert set(synth.PLANT_ONLY_HABITS).isdisjoint(synth.HABITS)
    with open(run / "manifest.csv", newline="") as f:
        assert not {r["habit"] for r in csv.DictReader(f)} & set(synth.PLANT_ONLY_HABITS)
    for i in range(5):
        meta, rng = synth.sample_metadata(3, i)
        meta["habit"] = "capped_column"
        img = synth.render(meta, rng, cutoff_fraction=0.0)
        dark = img < img.max() - 60
        assert dark.sum() > 20 and 0 < meta["particle_height_um"] < meta["particle_width_um"]


@pytest.mark.parametrize("override,says", [("seed=-1", "seed"), ("pixel_um=.nan", "pixel_um"),
                                           ("pixel_um=-1", "pixel_um")])
def test_bad_synth_values_are_config_errors(override, says):
    """Issue 20: ``synth --seed -1`` was a traceback (numpy refuses negative seeds)."""
    from icehpc import config
    with pytest.raises(config.ConfigError, match=says):
        config.load(synth.SynthConfig, None, [override])


def test_status_is_read_only_and_follows_planted_json(tmp_path):
    """Issue 19: synth answers status(args) from its marker (planted.json, written last)."""
    import argparse
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "s"), "--n", "12", "--seed", "4", "--no-progress",
                              "--workers", "1"])
    assert not synth.status(args).done
    synth.run(args)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")}
    assert synth.status(args).done
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")} == before
    other = parser.parse_args(["--out", str(tmp_path / "s"), "--n", "12", "--seed", "5"])
    assert not synth.status(other).done
    next((tmp_path / "s" / "images").rglob("*.png")).unlink()
    assert not synth.status(args).done
