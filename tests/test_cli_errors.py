"""Every user mistake the CLI sees ends in one clear line on stderr and exit code 2, no traceback;
and a folder holding manifest.csv is read through it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kappa_helpers import write_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mistakes")
    rng = np.random.default_rng(0)
    write_store(d / "s", rng.normal(size=(60, 8)).astype(np.float32), {"habit": np.array(["a", "b", "c"] * 20),
                                                                        "key": np.array([f"{i:09d}" for i in range(60)])})
    (d / "run").mkdir()
    (d / "run" / "checkpoints").mkdir()
    (d / "empty").mkdir()
    fake = d / "bin"
    fake.mkdir()
    sbatch = fake / "sbatch"  # a Slurm client without a reachable controller
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error' >&2\n"
                      "echo 'sbatch: fatal: Could not establish a configuration source' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    return d


def _store(d: Path) -> str:
    return str(d / "s" / "store.h5")


CASES = {
    "embed-missing-checkpoint": (["embed", "shards", "--checkpoint", "nope.safetensors", "--out", "e.h5"],
                                 "--checkpoint nope.safetensors does not exist"),
    "embed-folder-checkpoint": (["embed", "shards", "--checkpoint", "{d}/run", "--out", "e.h5"],
                                "is a folder, not a backbone file; export one with `icehpc export"),
    "probe-wrong-label": (["probe", "{store}", "--label", "habbit", "--out", "{d}/p"],
                          "no meta column 'habbit' (columns: ['habit', 'key']); choose the class column with --label"),
    "probe-folder-store": (["probe", "{d}/empty", "--out", "{d}/p"], "is a folder without store.h5"),
    "shards-mistyped-manifest": (["shards", "build", "--manifest", "{d}/manifst.csv", "--out", "{d}/o"],
                                 "manifst.csv does not exist"),
    "report-on-h5": (["report", "{store}", "--out", "{d}/r"], "is a file; give the κ folder"),
    "submit-no-slurm": (["submit", "--folder", "{d}/logs", "kappa", "--", "{store}", "--out", "{d}/k"],
                        "could not submit to Slurm (sbatch: fatal: Could not establish a configuration source)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistakes_end_in_one_clear_line(case, files):
    argv, message = CASES[case]
    store = _store(files)
    argv = [a.format(d=files, store=store) for a in argv]
    env = {**os.environ, "PATH": f"{files / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "icehpc", *argv], capture_output=True, text=True, timeout=300,
                         cwd=files, env=env)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"icehpc {argv[0]}: error: ") and message in last, out.stderr


def test_folder_with_manifest_uses_it_and_keeps_metadata(tmp_path, icehpc_cmd):
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = ["path,habit,temperature_c,campaign"]
    for i, habit in enumerate(["column", "plate", "column", "bullet"]):
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(data / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{habit},{-10 - i},c1")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    res = subprocess.run([*icehpc_cmd, "shards", "build", str(data), "--out", str(tmp_path / "s"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert f"holds manifest.csv: using it as the manifest" in res.stderr
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["totals"]["written"] == 4 and index["totals"]["rejected"] == 0
    from icehpc.data.format import iter_samples, shard_paths

    metas = [json.loads(members["json"]) for shard in shard_paths(tmp_path / "s")
             for _, members in iter_samples(shard)]
    assert sorted(m["habit"] for m in metas) == ["bullet", "column", "column", "plate"]
    assert all(m["temperature_c"] is not None and m["campaign"] == "c1" for m in metas)
