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
