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
    meta = {c: np.array([m[c] for m in metas]) for c in ("key", "shard", "habit", "campaign", "source_sha256")}
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
    (pre / "config.yaml").write_text(
        f"data:\n  shards: {tmp / 'shards'}\n  batch_size: 16\n  batches_per_epoch: 10\n"
        "model:\n  arch: vit_small_patch16_224\n  n_prototypes: 256\nloss:\n  lambda_koleo: 0.1\n  vmf: true\n"
        "optim:\n  lr: 0.004\ntrain:\n  epochs: 3\n  seed: 7\n")
    write_backbone(tmp / "backbone.safetensors", step=30)
    return out


def write_backbone(path: Path, step: int) -> Path:
    """A stand-in export: one tensor and the header `icehpc export` writes."""
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path), metadata={
        "format": "timm", "arch": "vit_small_patch16_224", "step": str(step), "input_size": "32",
        "input_canvas": "64", "input_framing": "bbox",
        "timm_kwargs": json.dumps({"in_chans": 1, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2})})
    return path


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
                 hashlib.sha256((full_run["tmp"] / "backbone.safetensors").read_bytes()).hexdigest()):
        assert text in page, text
    thumbs = re.search(r"<table class='thumbs'>.*?</table>", page, re.S).group(0)
    assert thumbs.count("data:image/png;base64,") >= 2 * 8  # nearest and farthest per habit at least
    for stem in ("embedding_map", "similarity", "pretrain_curves", "kappa_campaign_by_temperature_c"):
        for fmt in ("png", "svg", "pdf"):
            assert (full_report / f"{stem}.{fmt}").stat().st_size > 1000, (stem, fmt)
    for name in ("kappa.csv", "kappa_random_init.csv", "embedding_map.csv", "examples.csv", "kappa.nc"):
        assert f"href='{name}'" in page, name


def test_similarity_heatmap_is_clustered_and_scaled_to_the_data():
    from icehpc.analysis.report.kappa_figures import cluster_order

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


# ------------------------------------------------------------------ joins by content, outputs as a set
def _report(capsys, *argv: str) -> tuple[int, str]:
    from icehpc.run.cli import main

    rc = main(["report", *map(str, argv)])
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str) -> None:
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err


def test_report_refuses_shards_of_another_build_in_one_line(full_run, tmp_path, capsys, icehpc_cmd_module):
    """Same key names, other images (another synth seed): the thumbnails would show other classes."""
    for cmd in (["synth", "--out", str(tmp_path / "synth"), "--n", "240", "--seed", "99", "--no-progress"],
                ["shards", "build", str(tmp_path / "synth"), "--out", str(tmp_path / "shards"), "--shard-samples", "80",
                 "--no-progress", "--workers", "1"]):
        proc = subprocess.run([*icehpc_cmd_module, *cmd], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    r = full_run
    base = [r["kappa_trained"], "--store", r["store_trained"]]
    rc, err = _report(capsys, *base, "--out", tmp_path / "bad", "--shards", tmp_path / "shards")
    _one_line(rc, err)
    assert "--shards" in err and ("source_sha256 differs" in err or "is missing" in err)
    assert not (tmp_path / "bad" / "index.html").exists()
    rc, err = _report(capsys, *base, "--out", tmp_path / "ok", "--shards", r["shards"])
    assert rc == 0, err


def test_report_refuses_a_store_probe_or_control_of_other_runs(full_run, tmp_path, capsys):
    r = full_run
    # --store: the random-init store is not the one the trained κ run read
    rc, err = _report(capsys, r["kappa_trained"], "--out", tmp_path / "a", "--store", r["store_random"])
    _one_line(rc, err)
    assert "not the store the κ run read" in err
    # --random: a control over other samples
    small = tmp_path / "small"
    emb, gid = cheap_groups(300, 16, 2, seed=1)
    run_kappa(write_store(small / "store", emb, {"habit": np.where(gid > 0, "a", "b"),
                                                 "key": np.array([f"k{i}" for i in range(300)])}),
              small / "kappa", cfgmod.load(KappaConfig, None, ["bootstrap=0", "groupings=[habit]"]))
    rc, err = _report(capsys, r["kappa_trained"], "--out", tmp_path / "b", "--random", small / "kappa")
    _one_line(rc, err)
    assert "--random" in err and "same samples" in err
    # --probe: probe.json records the sha256 of the store it scored
    probe = tmp_path / "probe"
    probe.mkdir()
    pj = json.loads((r["tmp"] / "probe" / "probe.json").read_text())
    (probe / "probe.json").write_text(json.dumps({**pj, "inputs_sha256": {"store": "0" * 64}}))
    rc, err = _report(capsys, r["kappa_trained"], "--out", tmp_path / "c", "--store", r["store_trained"],
                      "--probe", probe)
    _one_line(rc, err)
    assert "--probe" in err and "another store" in err
    from icehpc.analysis.store import open_store

    with open_store(r["store_trained"]) as s:
        (probe / "probe.json").write_text(json.dumps({**pj, "inputs_sha256": {"store": s.sha256}}))
    rc, err = _report(capsys, r["kappa_trained"], "--out", tmp_path / "c", "--store", r["store_trained"],
                      "--probe", probe)
    assert rc == 0, err


def test_report_planted_that_is_not_json_is_one_line(kappa_dir, tmp_path, capsys):
    for text in (b"not json {", b"\xff\xfe binary", b"[1, 2]"):
        bad = tmp_path / "planted.json"
        bad.write_bytes(text)
        rc, err = _report(capsys, kappa_dir, "--out", tmp_path / "r", "--planted", bad)
        _one_line(rc, err)
        assert "--planted" in err


def test_failed_report_leaves_the_old_set_and_user_files(kappa_dir, tmp_path, capsys, monkeypatch):
    from icehpc.analysis import report
    from icehpc.analysis.report import sections
    from icehpc.run.stages import stage_parser

    out = tmp_path / "r"
    out.mkdir()
    (out / "final_figures.pdf").write_bytes(b"%PDF user")
    store = kappa_dir.parent / "store" / "store.h5"
    argv = [str(kappa_dir), "--out", str(out), "--store", str(store)]
    args = stage_parser("report").parse_args(argv)
    assert not report.status(args).done
    rc, err = _report(capsys, *argv)
    assert rc == 0, err
    assert report.status(args).done, report.status(args).why
    record = report.CONTRACT.verify(out)
    assert {"index.html", "embedding_map.png", "embedding_map.csv", "kappa.csv"} <= set(record["outputs"])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(sections, "similarity", boom)
    with pytest.raises(RuntimeError):
        report.build_report(kappa_dir, out, store=store)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # the old complete set, untouched
    assert report.CONTRACT.verify(out) is not None and not list(out.glob(".report.tmp-*"))
    monkeypatch.undo()
    # a report without --store: the old embedding map is the old report's, and goes; the user's file stays
    rc, err = _report(capsys, kappa_dir, "--out", out)
    assert rc == 0, err
    assert not (out / "embedding_map.png").exists() and (out / "final_figures.pdf").read_bytes() == b"%PDF user"
    assert not report.status(args).done  # --store given now, not when the report was written
    assert report.status(stage_parser("report").parse_args([str(kappa_dir), "--out", str(out)])).done
    (out / "kappa.csv").write_text("edited")
    assert not report.status(stage_parser("report").parse_args([str(kappa_dir), "--out", str(out)])).done


def test_math_text_and_formula_labels_cannot_crash_or_inject(tmp_path, capsys):
    emb, gid = cheap_groups(300, 8, 2, seed=4)
    habit = np.where(gid > 0, "$\\frac{x$ col", "=1+1")
    store = write_store(tmp_path / "s", emb, {"habit": habit, "key": np.array([f"k{i:04d}" for i in range(300)])})
    run_kappa(store, tmp_path / "k", cfgmod.load(KappaConfig, None, ["bootstrap=0", "groupings=[habit]"]))
    probe = tmp_path / "p"
    from icehpc.run.cli import main

    assert main(["probe", str(store), "--out", str(probe), "--splits", "1"]) == 0
    rc, err = _report(capsys, tmp_path / "k", "--out", tmp_path / "r", "--store", store, "--probe", probe)
    assert rc == 0, err
    rows = (tmp_path / "r" / "embedding_map.csv").read_text().splitlines()
    assert rows[0].startswith("key,habit,") and any(",'=1+1," in row for row in rows[1:])
    assert not any(",=1+1," in row for row in rows)
    assert (tmp_path / "r" / "confusion_pretrained_knn.svg").stat().st_size > 1000


# ------------------------------------------------------------------ hostile: strings from the data
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


# ------------------------------------------------------------ what was trained, and how well (issue 21.7)
def _cells(page: str, heading: str) -> list[list[str]]:
    """The rows (cell texts) of the first table after ``heading`` in the page."""
    table = re.search(re.escape(heading) + r".*?<table>(.*?)</table>", page, re.S).group(1)
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]


@pytest.fixture(scope="module")
def probed(full_run, tmp_path_factory) -> dict[str, Path]:
    """`icehpc probe` itself (3 splits) on the full run's stores: the probe of this store, and the
    same output standing in for a real archive's probe."""
    from icehpc.analysis.probe import ProbeSettings, run_probes

    tmp = tmp_path_factory.mktemp("probed")
    for name in ("probe", "real"):
        run_probes(full_run["store_trained"], tmp / name, random_store=full_run["store_random"],
                   images=full_run["shards"], settings=ProbeSettings(splits=3, min_class_count=2))
    return {"probe": tmp / "probe", "real": tmp / "real"}


@pytest.fixture(scope="module")
def probed_report(full_run, probed, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("probed_report")
    r = full_run
    build_report(r["kappa_trained"], out, random=r["kappa_random"], store=r["store_trained"], probe=probed["probe"],
                 pretrain=r["tmp"] / "pretrain", backbone=r["tmp"] / "backbone.safetensors",
                 real_probes={"2D-S": probed["real"]}, map_sample=100)
    return (out / "index.html").read_text()


def test_probe_table_splits_column_says_what_probe_summary_says(probed, probed_report):
    import csv

    summary = list(csv.DictReader(open(probed["probe"] / "summary.csv")))
    rows = _cells(probed_report, "<h2 id='probe'>")
    assert rows[0] == ["representation", "method", "accuracy", "balanced accuracy", "splits"]
    assert [(r[0], r[1], r[4]) for r in rows[1:]] == [(s["representation"], s["method"], s["splits"]) for s in summary]
    assert {s["splits"] for s in summary} == {"3"}
    # the heading names the splits in words, not as raw JSON
    heading = re.search(r"<h2 id='probe'>.*?<p>(.*?)</p>", probed_report, re.S).group(1)
    assert "3 stratified train/test splits (seeds 0–2), 80% / 20%" in heading and "{" not in heading


def test_real_archive_probe_results_are_a_table_in_the_report(probed, probed_report):
    pj = json.loads((probed["real"] / "probe.json").read_text())
    rows = _cells(probed_report, "<h3>2D-S</h3>")
    assert rows[0] == ["representation", "kNN accuracy", "kNN balanced accuracy", "LR accuracy",
                       "LR balanced accuracy", "n", "classes"]
    by_rep = {r[0]: r for r in rows[1:]}
    assert set(by_rep) == set(pj["results"]) == {"pretrained", "random_init", "geometric", "geometric_shape"}
    knn = pj["results"]["pretrained"]["knn"]
    assert by_rep["pretrained"][2] == f"{knn['balanced_accuracy']:.3f} ± {knn['balanced_accuracy_sd']:.3f}"
    geo = pj["results"]["geometric"]["logreg"]
    assert by_rep["geometric"][1:5] == ["–", "–", f"{geo['accuracy']:.3f} ± {geo['accuracy_sd']:.3f}",
                                        f"{geo['balanced_accuracy']:.3f} ± {geo['balanced_accuracy_sd']:.3f}"]
    assert by_rep["pretrained"][5] == f"{pj['split']['n_train'] + pj['split']['n_test']:,}"
    assert by_rep["pretrained"][6] == str(len(pj["classes"]))
    assert "href='probe_summary_2D-S.csv'" in probed_report and "href='#real'" in probed_report


def test_backbone_summary_at_the_top(probed_report):
    top = probed_report[:probed_report.index("<div class='warn'>") if "<div class='warn'>" in probed_report
                        else probed_report.index("<div class='ok'>")]
    rows = dict((r[0], r[1]) for r in _cells(top, "<b>Backbone</b>")[1:])
    assert rows["backbone"].startswith("vit_small_patch16_224 (patch 4 px, embed dim 64, depth 2, 2 heads)")
    assert "32-px inputs from a 64-px canvas (bbox framing)" in rows["backbone"]
    assert rows["trained"] == "30 steps of 30 planned (3 epochs × 10 steps each)"
    assert rows["pretrained on"].startswith("240 images from")
    assert rows["recipe"] == ("iBOT-vMF, K = 256 prototypes, KoLeo weight 0.1, batch 16 per rank, seed 7, "
                              "lr 0.004 per 256 images")
    headline = _cells(top, "How well")
    assert [r[0] for r in headline[1:]] == ["this store (habit)", "2D-S"]


def test_backbone_summary_of_a_random_init_store_and_a_backbone_that_did_not_embed_it(full_run, tmp_path, capsys):
    from icehpc.analysis.embed import contract

    r = full_run
    store = tmp_path / "store"
    shutil.copytree(r["store_random"].parent, store)
    marker = contract(store / "store.h5").marker_path(store)
    marker.write_text(json.dumps({"backbone": {"arch": "vit_small_patch16_224", "timm_kwargs": {"embed_dim": 16},
                                               "weights": "random-init(seed=0)", "weights_sha256": ""}}))
    kappa = tmp_path / "k"
    run_kappa(store / "store.h5", kappa, cfgmod.load(KappaConfig, None, ["bootstrap=0", "groupings=[habit]"]))
    build_report(kappa, tmp_path / "r", store=store / "store.h5", map_sample=50)
    rows = dict((c[0], c[1]) for c in _cells((tmp_path / "r" / "index.html").read_text(), "<b>Backbone</b>")[1:])
    assert rows["backbone"].startswith("vit_small_patch16_224 (embed dim 16)")
    assert rows["weights"].startswith("random-init(seed=0): random initialisation, no pretraining")
    # --backbone that did not embed --store: one line
    rc, err = _report(capsys, kappa, "--out", tmp_path / "r2", "--store", store / "store.h5",
                      "--backbone", r["tmp"] / "backbone.safetensors")
    _one_line(rc, err)
    assert "embedded by another backbone (random-init(seed=0))" in err


def test_real_probe_inputs_are_checked(full_run, probed, tmp_path, capsys):
    r = full_run
    base = [r["kappa_trained"], "--out", tmp_path / "r"]
    for bad, why in (("2D-S", "give NAME=DIR"), (f"2D-S={tmp_path / 'none'}", "no probe.json there")):
        rc, err = _report(capsys, *base, "--real-probe", bad)
        _one_line(rc, err)
        assert why in err, err
    rc, err = _report(capsys, *base, "--real-probe", f"A={probed['real']}", "--real-probe", f"A={probed['real']}")
    _one_line(rc, err)
    assert "given twice" in err
    edited = tmp_path / "edited"
    shutil.copytree(probed["real"], edited)
    (edited / "summary.csv").write_text("edited")
    rc, err = _report(capsys, *base, "--real-probe", f"2D-S={edited}")
    _one_line(rc, err)
    assert "does not verify" in err
    # the archive's store embedded by another backbone than --backbone
    other = write_backbone_sha_record(r["store_trained"], tmp_path)
    try:
        rc, err = _report(capsys, *base, "--backbone", r["tmp"] / "backbone.safetensors",
                          "--real-probe", f"2D-S={probed['real']}")
    finally:
        other.unlink()
    _one_line(rc, err)
    assert "--real-probe 2D-S=" in err and "another backbone" in err
    rc, err = _report(capsys, *base, "--backbone", r["tmp"] / "backbone.safetensors",
                      "--real-probe", f"2D-S={probed['real']}")
    assert rc == 0, err


def write_backbone_sha_record(store: Path, tmp: Path) -> Path:
    """The embedding run's record beside ``store``, naming weights other than the test backbone."""
    from icehpc.analysis.embed import contract

    marker = contract(store).marker_path(store.parent)
    assert not marker.exists()
    marker.write_text(json.dumps({"backbone": {"arch": "vit_small_patch16_224", "weights": str(tmp / "other"),
                                               "weights_sha256": "0" * 64}}))
    return marker


@pytest.mark.parametrize("trained, random_, expected", [
    ((0.50, 0.02), (0.49, 0.02), "not distinguishable from random init"),   # within one sd
    ((0.49, 0.00), (0.49, 0.00), "not distinguishable from random init"),   # equal, one split
    ((0.40, 0.02), (0.49, 0.02), "below random init"),
    ((0.60, 0.02), (0.49, 0.02), None)])
def test_trained_within_one_sd_of_random_init_is_a_warning(trained, random_, expected):
    from icehpc.analysis.report.sections import versus_random

    m = lambda mean, sd: {"balanced_accuracy": mean, "balanced_accuracy_sd": sd}  # noqa: E731
    warnings = versus_random({"results": {"pretrained": {"dim": 8, "knn": m(*trained)},
                                          "random_init": {"dim": 8, "knn": m(*random_)}}}, "2D-S probe")
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith(f"2D-S probe: the trained backbone is {expected}")
        assert f"kNN {trained[0]:.3f} ± {trained[1]:.3f} vs {random_[0]:.3f} ± {random_[1]:.3f}" in warnings[0]


def _captured(monkeypatch, module) -> list:
    figs = []
    monkeypatch.setattr(module, "_save", lambda plt, fig, path: figs.append(fig))
    return figs


def test_empty_bins_are_not_drawn_and_the_legend_is_off_the_data(monkeypatch, tmp_path):
    from icehpc.analysis.report import kappa_figures
    from icehpc.plotting import pyplot

    plt = pyplot()
    figs = _captured(monkeypatch, kappa_figures)
    rows = [{"grouping": "temperature_c", "group": f"[{lo}, {lo + 10})", "n": n, "kappa": k, "kappa_debiased": k,
             "ci_low": k - 1, "ci_high": k + 1,
             "levels": {"temperature_c": {"label": f"[{lo}, {lo + 10})", "low": lo, "high": lo + 10}}}
            for lo, n, k in ((-40, 50, 10.0), (-30, 0, float("nan")), (-20, 80, 12.0))]
    kappa_figures.fig_binned(plt, None, "temperature_c", rows, [], tmp_path / "k.png", min_count=20)
    fig = figs[0]
    ax, axn = fig.axes[:2]
    counts = [line for line in axn.get_lines() if len(line.get_xdata()) == 3]
    assert len(counts) == 1
    y = np.asarray(counts[0].get_ydata(), dtype=float)
    assert np.isnan(y[1]) and list(y[[0, 2]]) == [50, 80]  # the empty bin is masked, not drawn at n ≈ 0.8
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
    plt.close(fig)


def test_pretraining_panels_have_y_labels_and_lr_apart_from_momentum(monkeypatch, tmp_path):
    from icehpc.analysis.report import pretraining
    from icehpc.plotting import pyplot

    figs = _captured(monkeypatch, pretraining)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(
        {"step": s, "loss": 5 - 0.1 * s, "loss_cls": 2.0, "cls_teacher_entropy": 1.0, "cls_proto_used": 40,
         "lr": 0.004, "momentum": 0.996, "wd": 0.04}) + "\n" for s in range(5)))
    pretraining.fig_pretrain(pyplot(), pretraining.read_metrics(tmp_path / "m.jsonl"), tmp_path / "p.png")
    axes = [a for a in figs[0].axes if a.get_visible()]
    plotted = {line.get_label(): a for a in axes for line in a.get_lines()}
    assert plotted["lr"] is not plotted["momentum"] and plotted["lr"] is not plotted["wd"]
    assert all(a.get_ylabel() for a in axes)
    assert {plotted[k].get_ylabel() for k in ("loss", "lr", "momentum")} == {"loss", "learning rate", "momentum"}


def test_small_group_warning_names_the_column_and_unit():
    from icehpc.analysis.report.sections import kappa_warnings

    row = {"grouping": "campaign:temperature_c", "group": "arctic | [-40, -30)", "n": 3,
           "levels": {"campaign": {"label": "arctic"},
                      "temperature_c": {"label": "[-40, -30)", "low": -40.0, "high": -30.0}}}
    res = {"rows": [row], "run": {"config": {"min_count": 20}}}
    (warning,) = kappa_warnings(res).warnings
    assert "campaign = arctic, temperature_c [-40, -30) °C: 3 samples" in warning


def test_pipeline_passes_every_real_archive_probe_to_the_report(tmp_path):
    from icehpc import config as cfglib
    from icehpc.run import plan as planlib

    (tmp_path / "a.zip").write_bytes(b"")
    (tmp_path / "b.zip").write_bytes(b"")
    cfg = cfglib.load(planlib.PipelineConfig, None, [
        f"real.data_dir={tmp_path}", "real.archives=[{name: x, file: a.zip, probe: 2D-S}, "
                                     "{name: y, file: b.zip, probe: PIP}]"])
    steps = planlib.plan(cfg, tmp_path / "o")
    names = [s.name for s in steps]
    report = steps[names.index("report")]
    assert names.index("report") > max(names.index("real-x-probe"), names.index("real-y-probe"))
    assert {"real-x-probe", "real-y-probe", "probe"} <= set(report.after)
    given = [report.argv[i + 1] for i, a in enumerate(report.argv) if a == "--real-probe"]
    by_name = {s.name: s for s in steps}
    assert given == [f"2D-S={by_name['real-x-probe'].done.parent}", f"PIP={by_name['real-y-probe'].done.parent}"]


def test_report_shows_label_efficiency_when_the_probe_has_it(tmp_path, capsys):
    from icehpc.analysis.report import CONTRACT
    from icehpc.run.cli import main

    emb, gid = cheap_groups(400, 8, 3, seed=5)
    store = write_store(tmp_path / "s", emb, {"habit": np.array(["column", "plate", "<b>bullet</b>"])[gid],
                                              "key": np.array([f"k{i:04d}" for i in range(400)])})
    run_kappa(store, tmp_path / "k", cfgmod.load(KappaConfig, None, ["bootstrap=0", "groupings=[habit]"]))
    assert main(["probe", str(store), "--out", str(tmp_path / "p"), "--splits", "2",
                 "--label-fractions", "0.05,0.25,1"]) == 0
    rc, err = _report(capsys, tmp_path / "k", "--out", tmp_path / "r", "--store", store, "--probe", tmp_path / "p")
    assert rc == 0, err
    page = (tmp_path / "r" / "index.html").read_text()
    section = page[page.index("<h2 id='label-efficiency'>"):]
    section = section[:section.index("<h2 ", 1)]
    assert "Label efficiency" in section and "data:image/png;base64," in section
    pj = json.loads((tmp_path / "p" / "probe.json").read_text())
    n_labels = {r["fraction"]: r["n_train_labels"] for r in pj["label_efficiency"]["rows"]}
    for fraction, n in n_labels.items():
        assert f"{fraction:g} ({n:,} labels)" in section
    first = next(r for r in pj["label_efficiency"]["rows"] if r["fraction"] == 0.05 and r["method"] == "logreg")
    assert f"{first['accuracy']:.3f} ± {first['accuracy_sd']:.3f}" in section
    assert (tmp_path / "r" / "label_efficiency.csv").read_bytes() == \
        (tmp_path / "p" / "label_efficiency.csv").read_bytes()
    sealed = CONTRACT.verify(tmp_path / "r")["outputs"]
    for name in ("label_efficiency.csv", "label_efficiency.png", "label_efficiency.svg", "label_efficiency.pdf"):
        assert name in sealed and f"href='{name}'" in page, name
    # a probe without the curves: no section, and the report's old curve files go with the rebuild
    assert main(["probe", str(store), "--out", str(tmp_path / "p"), "--splits", "2"]) == 0
    rc, err = _report(capsys, tmp_path / "k", "--out", tmp_path / "r", "--store", store, "--probe", tmp_path / "p")
    assert rc == 0, err
    assert "label-efficiency" not in (tmp_path / "r" / "index.html").read_text()
    assert not list((tmp_path / "r").glob("label_efficiency.*"))
