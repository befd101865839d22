"""Offline κ report: self-contained HTML with every figure, and a real headless-Chromium render."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icehpc import config as cfgmod
from icehpc.analysis.kappa import KappaConfig, run_kappa
from icehpc.analysis.report import build_report
from kappa_helpers import cheap_groups, paper_meta, write_store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kappa_dir(tmp_path_factory) -> Path:
    n = 6000
    emb, gid = cheap_groups(n, 16, 5, seed=11)
    meta = paper_meta(n, gid, seed=11)
    meta["habit"] = meta["habit"].astype(object)
    meta["habit"][:8] = "rare_habit"  # a flagged small group must appear in the report's table
    tmp = tmp_path_factory.mktemp("rep")
    cfg = cfgmod.load(KappaConfig, None, ["bootstrap=40"])
    run_kappa(write_store(tmp / "store", emb, meta), tmp / "kappa", cfg)
    return tmp / "kappa"


@pytest.fixture(scope="module")
def report_dir(kappa_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    build_report(kappa_dir, out)
    return out


def test_report_is_self_contained_with_all_figures(report_dir, kappa_dir):
    html = (report_dir / "index.html").read_text()
    pngs = {"kappa_campaign_by_temperature_c.png", "kappa_campaign_by_particle_width_um.png",
            "kappa_campaign.png", "kappa_habit.png", "similarity.png"}
    assert pngs <= {p.name for p in report_dir.glob("*.png")}
    for name in ("kappa.csv", "similarity.csv", "kappa.json"):
        assert (report_dir / name).read_bytes() == (kappa_dir / name).read_bytes()
    imgs = re.findall(r"<img [^>]*src='([^']*)'", html)
    assert len(imgs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", html)  # nothing fetched from the network
    for text in ("κ versus temperature (°C) per campaign", "κ versus particle width (µm) per campaign",
                 "κ per campaign", "κ per habit", "Inter-class similarity (habit)", "Flagged groups",
                 "rare_habit", "n&lt;20", "Provenance", json.loads((kappa_dir / "kappa.json").read_text())
                 ["run"]["fingerprint"]):
        assert text in html, text
    with Image.open(report_dir / "kappa_campaign_by_temperature_c.png") as im:
        assert im.size[0] >= 600 and im.size[1] >= 400


def test_missing_kappa_folder_is_a_clear_error(tmp_path, icehpc_cmd):
    proc = subprocess.run([*icehpc_cmd, "report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "kappa.json not found" in proc.stderr and "Traceback" not in proc.stderr


def test_report_cli(kappa_dir, tmp_path, icehpc_cmd):
    proc = subprocess.run([*icehpc_cmd, "report", str(kappa_dir), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "index.html").stat().st_size > 50_000


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium/Chrome on PATH")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,3000",
         f"--screenshot={shot}", (report_dir / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"), dtype=float)
    assert px.shape == (3000, 1280)
    # The figures are embedded images: a page where they failed to decode is text on white only.
    # Count "ink" rows and coloured-image content in the first two figures' band.
    ink_rows = np.mean(px.min(axis=1) < 128)
    assert ink_rows > 0.3, f"page looks empty ({ink_rows:.0%} rows with dark pixels)"
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=float)
    saturated = np.mean(rgb.max(axis=2) - rgb.min(axis=2) > 60)
    assert saturated > 0.002, "no coloured plot content rendered"


# ------------------------------------------------------------------------ the scientist's report
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, icehpc_cmd_module) -> dict[str, Path]:
    """Synthetic images → shards; stand-in embeddings keyed to the shard samples (habit-clustered for
    'trained', noise for 'random'); κ of both; a probe.json with spread over splits; metrics.jsonl."""
    from icehpc.data.format import iter_samples, shard_paths

    tmp = tmp_path_factory.mktemp("full")
    for cmd in (["synth", "--out", str(tmp / "synth"), "--n", "240", "--no-progress"],
                ["shards", "build", str(tmp / "synth"), "--out", str(tmp / "shards"), "--shard-samples", "80",
                 "--no-progress", "--workers", "1"]):
        proc = subprocess.run([*icehpc_cmd_module, *cmd], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    metas = []
    for shard in shard_paths(tmp / "shards"):
        for key, sample in iter_samples(shard, ("json",)):
            metas.append({**json.loads(sample["json"]), "key": key, "shard": Path(shard).name})
    habits = sorted({m["habit"] for m in metas})
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(habits), 16))
    trained = np.stack([centres[habits.index(m["habit"])] + 0.6 * rng.normal(size=16) for m in metas])
    meta = {c: np.array([m[c] for m in metas]) for c in ("key", "shard", "habit", "campaign")}
    for c in ("temperature_c", "particle_width_um"):
        meta[c] = np.array([m[c] for m in metas], dtype=float)
    meta["probe"] = np.array(["CPI"] * len(metas))
    cfg = cfgmod.load(KappaConfig, None, ["bootstrap=5", "min_count=5"])
    out = {"tmp": tmp, "shards": tmp / "shards", "planted": tmp / "synth" / "planted.json"}
    for name, emb in (("trained", trained), ("random", rng.normal(size=trained.shape))):
        out[f"store_{name}"] = write_store(tmp / f"store_{name}", emb.astype(np.float32), meta)
        run_kappa(out[f"store_{name}"], tmp / f"kappa_{name}", cfg)
        out[f"kappa_{name}"] = tmp / f"kappa_{name}"
    k = len(habits)
    probe = tmp / "probe"
    probe.mkdir()
    split = lambda acc: {"accuracy": acc, "accuracy_sd": 0.05, "accuracy_per_split": [acc] * 5,
                         "balanced_accuracy": acc - 0.1, "balanced_accuracy_sd": 0.04,
                         "balanced_accuracy_per_split": [acc - 0.1] * 5,
                         "per_class_recall": {h: 0.5 for h in habits},
                         "confusion_matrix": (np.eye(k, dtype=int) * 5 + 1).tolist()}  # as `icehpc probe` writes it
    (probe / "probe.json").write_text(json.dumps({"label": "habit", "classes": habits, "split": {"seeds": [0, 1, 2, 3, 4]},
                                                  "results": {"pretrained": {"dim": 16, "knn": split(0.8)},
                                                              "random_init": {"dim": 16, "knn": split(0.4)}}}))
    pre = tmp / "pretrain"
    pre.mkdir()
    (pre / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 - 0.1 * s, "loss_cls": 3 - 0.05 * s,
                                                           "teacher_proto_perplexity": 2.0, "lr": 1e-3}) + "\n"
                                               for s in range(20)))
    (pre / "config.yaml").write_text("model:\n  arch: vit_tiny\n")
    (tmp / "backbone.safetensors").write_bytes(b"stand-in backbone bytes")
    return out


@pytest.fixture(scope="module")
def icehpc_cmd_module() -> list[str]:
    import sys

    return [sys.executable, "-m", "icehpc"]


@pytest.fixture(scope="module")
def full_report(full_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full_report")
    r = full_run
    build_report(r["kappa_trained"], out, random=r["kappa_random"], planted=r["planted"], store=r["store_trained"],
                 shards=r["shards"], probe=r["tmp"] / "probe", pretrain=r["tmp"] / "pretrain",
                 backbone=r["tmp"] / "backbone.safetensors", map_sample=200)
    return out


def test_full_report_has_every_section(full_report, full_run):
    import hashlib

    page = (full_report / "index.html").read_text()
    for text in ("Warnings", "random-init control", "planted habit entropy", "Embedding map", "Example images",
                 "Probe results", "0.800 ± 0.050", "Pretraining curves", "teacher_proto_perplexity = 2.00",
                 "per-class recall", "Provenance", "Downloads",
                 hashlib.sha256(b"stand-in backbone bytes").hexdigest()):
        assert text in page, text
    thumbs = re.search(r"<table class='thumbs'>.*?</table>", page, re.S).group(0)
    assert thumbs.count("data:image/png;base64,") >= 2 * 8  # nearest and farthest per habit at least
    for stem in ("embedding_map", "similarity", "pretrain_curves", "kappa_campaign_by_temperature_c"):
        for fmt in ("png", "svg", "pdf"):
            assert (full_report / f"{stem}.{fmt}").stat().st_size > 1000, (stem, fmt)
    for name in ("kappa.csv", "kappa_random_init.csv", "embedding_map.csv", "examples.csv", "kappa.nc"):
        assert f"href='{name}'" in page, name


def test_similarity_heatmap_is_clustered_and_scaled_to_the_data():
    from icehpc.analysis.report import cluster_order

    # classes 0 and 2 are alike, 1 and 3 are alike: the clustering puts each pair side by side
    m = np.array([[1.0, .2, .9, .1], [.2, 1.0, .1, .9], [.9, .1, 1.0, .2], [.1, .9, .2, 1.0]])
    order = list(cluster_order(m))
    pos = {c: order.index(c) for c in range(4)}
    assert abs(pos[0] - pos[2]) == 1 and abs(pos[1] - pos[3]) == 1


def test_kappa_tables_as_cf_netcdf_read_by_xarray(full_report):
    xr = pytest.importorskip("xarray")
    ds = xr.open_dataset(full_report / "kappa.nc", engine="h5netcdf")
    assert ds.attrs["Conventions"].startswith("CF-")
    t = ds["temperature_c_bin"]
    assert t.attrs["units"] == "degC" and t.attrs["standard_name"] == "air_temperature"
    assert ds["temperature_c_bin_bounds"].shape == (t.size, 2)
    k = ds["kappa_debiased_trained_campaign_x_temperature_c"]
    assert k.dims == ("campaign", "temperature_c_bin") and "long_name" in k.attrs
    assert "kappa_debiased_random_init_habit" in ds and np.isfinite(ds["kappa_debiased_trained_habit"]).any()
    ds.close()


def test_data_without_temperature_or_campaign_has_no_empty_panels(tmp_path):
    """A 2D-S/PIP-like store (habit only): κ leaves those groupings out, the report names no empty group."""
    emb, gid = cheap_groups(600, 16, 3, seed=2)
    store = write_store(tmp_path / "s", emb, {"habit": np.array([f"Class {g}" for g in gid]),
                                              "key": np.array([f"{i:09d}" for i in range(600)]),
                                              "campaign": np.array([""] * 600)})
    cfg = cfgmod.load(KappaConfig, None, ["bootstrap=5", "drop_empty_columns=true"])
    run_kappa(store, tmp_path / "k", cfg)
    res = json.loads((tmp_path / "k" / "kappa.json").read_text())
    assert {r["grouping"] for r in res["rows"]} == {"habit"}
    assert set(res["run"]["groupings_dropped"]) == {"campaign", "temperature_c", "particle_width_um",
                                                    "campaign:temperature_c", "campaign:particle_width_um"}
    build_report(tmp_path / "k", tmp_path / "r", store=store, map_sample=150)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "temperature" not in {p.stem for p in (tmp_path / "r").glob("*.png")}
    assert "κ versus" not in page and "(unknown)" not in page
    warning = re.search(r"groupings left out for lack of data: ([^(]*)\(", page)
    assert warning and {"campaign", "campaign:temperature_c"} <= set(warning.group(1).strip().split(", "))
    assert "by campaign" not in page and "by temperature" not in page  # map coloured by habit only


def test_full_report_in_headless_chromium_every_image_and_link_resolves(full_report, tmp_path):
    """Loads in a real browser: no console errors, every <img> decodes, every link resolves."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium/Chrome on PATH")
    page = (full_report / "index.html").read_text()
    for href in re.findall(r"href='([^']*)'", page):
        if href.startswith("#"):
            assert f"id='{href[1:]}'" in page, href
        else:
            assert not re.match(r"[a-z]+:", href) and (full_report / href).is_file(), href
    # a copy beside the original (same relative links) that reports how many images decoded
    probe_page = full_report / "_browser_check.html"
    probe_page.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => {"
                                       "const im = [...document.images]; document.title = 'IMAGES ' + "
                                       "im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length;"
                                       "});</script></body>"))
    try:
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
             probe_page.as_uri()], capture_output=True, text=True, timeout=180)
    finally:
        probe_page.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    title = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", proc.stdout)
    assert title, proc.stdout[:500]
    ok, total = map(int, title.groups())
    assert total >= 20 and ok == total, (ok, total)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


def test_data_strings_are_escaped_everywhere(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    emb, gid = cheap_groups(300, 8, 2, seed=3)
    store = write_store(tmp_path / "s", emb, {"habit": np.array([evil if g else "plate" for g in gid]),
                                              "key": np.array([f"{i:09d}" for i in range(300)])})
    run_kappa(store, tmp_path / "k", cfgmod.load(KappaConfig, None, ["bootstrap=0", "groupings=[habit]"]))
    build_report(tmp_path / "k", tmp_path / "r", store=store, map_sample=100)
    page = (tmp_path / "r" / "index.html").read_text()
    assert evil not in page and html_escape(evil) in page


def html_escape(s: str) -> str:
    import html

    return html.escape(s)
