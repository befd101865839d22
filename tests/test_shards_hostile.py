"""Hostile inputs against the shard builder (icehpc/data/shards.py), moved from test_hostile.py:
concurrent builds into one folder, links and loops, devices and FIFOs, lying zip members, manifest
paths outside their folder, unsafe column names, truncated zips, altered shards, and the real
archives under attack. Each test fails on the code before its fix."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from icehpc import fileio
from icehpc.config import ConfigError
from icehpc.data import shards
from icehpc.data import inputs
from backbone_helpers import png, png_tree
from cli_helpers import one_clear_line

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
BUILD = dict(progress=False)


def _rejected(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icehpc", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


def test_1_second_build_into_a_locked_folder_stops_naming_the_holder(tmp_path):
    tree = png_tree(tmp_path / "tree", {"plate": 3, "column": 2})
    out = tmp_path / "out"
    with fileio.lock_dir(out):  # stands in for a first build (e.g. the old job of a Slurm requeue)
        proc = _cli("shards", "build", str(tree), "--out", str(out), "--no-progress", "--workers", "1")
        one_clear_line(proc, str(out), f"PID {os.getpid()}", "host")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    proc = _cli("shards", "build", str(tree), "--out", str(out), "--no-progress", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert shards.verify(out) == []


@pytest.mark.slow
def test_1_concurrent_build_pairs_never_corrupt(tmp_path):
    tree = png_tree(tmp_path / "tree", {"plate": 40, "column": 40})
    for trial in range(2):
        out = tmp_path / f"out{trial}"
        cmd = [sys.executable, "-m", "icehpc", "shards", "build", str(tree), "--out", str(out), "--no-progress",
               "--workers", "1", "--shard-samples", "7"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        assert any(rc == 0 for rc, _ in results)
        for rc, err in results:
            assert rc == 0 or "is in use by host" in err, err
        assert shards.verify(out) == []


def test_4_symlinked_class_folders_are_followed_once_or_rejected_visibly(tmp_path):
    store = png_tree(tmp_path / "elsewhere", {"plate": 3, "column": 2}, seed=1)
    tree = tmp_path / "tree"
    png_tree(tree, {"needle": 2}, seed=2)
    (tree / "plate").symlink_to(store / "plate")            # outside the input folder
    (tree / "column").symlink_to(store / "column")
    (tree / "inner").symlink_to(tree / "needle")            # inside: followed (its files are duplicates)
    (tree / "needle" / "loop").symlink_to(tree / "needle")  # a loop: rejected, not walked forever
    out = tmp_path / "out"
    index = shards.build([str(tree)], out, shards.BuildConfig(), **BUILD)
    rej = _rejected(out)
    reasons = sorted(r["reason"] for r in rej.values())
    assert reasons == ["duplicate"] * 2 + ["outside_root"] * 5 + ["symlink_loop"] * 2, rej
    assert index["totals"]["inputs"] == index["totals"]["written"] + index["totals"]["rejected"] == 2 + 2 + 5 + 2
    out2 = tmp_path / "out2"
    index = shards.build([str(tree)], out2, shards.BuildConfig(), allow_outside=True, **BUILD)
    # "inner" sorts before "needle": the link's copies come first, the folder's are the duplicates
    assert index["labels"]["counts"] == {"column": 2, "inner": 2, "plate": 3}
    assert sorted(r["reason"] for r in _rejected(out2).values()) == ["duplicate"] * 2 + ["symlink_loop"] * 2


def test_5_devices_fifos_and_sockets_are_not_regular_and_never_hang(tmp_path):
    tree = png_tree(tmp_path / "tree", {"plate": 2})
    (tree / "plate" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tree / "plate" / "fifo.png")
    (tree / "plate" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "out"
    # /dev/zero is outside the tree: allow it, so the regular-file check itself is what stops it
    proc = subprocess.run([sys.executable, "-m", "icehpc", "shards", "build", str(tree), "--out", str(out),
                           "--no-progress", "--workers", "1", "--allow-outside"],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rej = {Path(k).name: v["reason"] for k, v in _rejected(out).items()}
    assert rej == {"zero.png": "not_regular", "fifo.png": "not_regular", "broken.png": "unreadable"}


def test_5_reads_are_capped_even_when_a_zip_member_lies_about_its_size(tmp_path, monkeypatch):
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # 3 MiB stream
    zpath = tmp_path / "lie.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("plate/big.png", big)
    raw = bytearray(zpath.read_bytes())
    cd = raw.find(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = (1000).to_bytes(4, "little")  # the central directory declares 1,000 bytes
    zpath.write_bytes(bytes(raw))
    asked: list[int] = []
    real_read = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: (asked.append(n), real_read(self, n))[1])
    cap = 4096
    item = inputs.Item(0, "lie.zip", "lie.zip/plate/big.png", (str(zpath), 0), {})
    with pytest.raises(inputs.Reject) as exc:
        inputs.read_source(item, cap)
    assert exc.value.reason in ("unreadable", "too_large")  # CRC of the first 1,000 bytes fails
    assert asked and all(0 < n <= cap + 1 for n in asked), asked  # never "read everything"
    # and a file that grows past the cap while read (here: a stream longer than claimed) stops at cap + 1
    with pytest.raises(inputs.Reject, match="too_large"):
        inputs._read_capped(io.BytesIO(big), cap)


def test_8_manifest_paths_are_confined_to_the_manifest_folder(tmp_path):
    (tmp_path / "outside.png").write_bytes(png(3))
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "ok.png").write_bytes(png(4))
    (data / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    rows = ["img/ok.png", "../outside.png", "/etc/passwd", "/dev/zero", "img/link.png"]
    (data / "m.csv").write_text("path,habit\n" + "".join(f"{r},plate\n" for r in rows))
    out = tmp_path / "out"
    index = shards.build([str(data / "m.csv")], out, shards.BuildConfig(), **BUILD)
    rej = {k.split("/", 1)[1]: v["reason"] for k, v in _rejected(out).items()}
    assert rej == {r: "outside_root" for r in rows[1:]}
    assert index["totals"]["written"] == 1
    out2 = tmp_path / "out2"
    shards.build([str(data / "m.csv")], out2, shards.BuildConfig(), allow_outside=True, **BUILD)
    rej = {k.split("/", 1)[1]: v["reason"] for k, v in _rejected(out2).items()}
    assert rej["/dev/zero"] == "not_regular" and rej["/etc/passwd"] == "not_image"
    assert "../outside.png" not in rej  # read when allowed (then img/link.png is its duplicate)


@pytest.mark.parametrize("column", ["a/b", ".", "key", "shard", "source_path", "__key__", "<svg onload=alert(1)>",
                                    "", "x.y"])
def test_7_unsafe_or_reserved_manifest_columns_are_a_config_error(tmp_path, column):
    (tmp_path / "0.png").write_bytes(png(0))
    (tmp_path / "m.csv").write_text(f'path,habit,"{column}"\n0.png,plate,v\n')
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="column name"):
        shards.build([str(tmp_path / "m.csv")], out, shards.BuildConfig(), **BUILD)
    assert not (out / "index.json").exists()


def test_7_plain_column_names_pass(tmp_path):
    (tmp_path / "0.png").write_bytes(png(0))
    (tmp_path / "m.csv").write_text("path,habit,Temperature (C),flight-id\n0.png,plate,-3,F1\n")
    index = shards.build([str(tmp_path / "m.csv")], tmp_path / "out", shards.BuildConfig(), **BUILD)
    assert index["totals"]["written"] == 1


def test_truncated_zip_names_the_archive_and_what_to_do(tmp_path):
    zpath = tmp_path / "cut.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for i in range(4):
            z.writestr(f"plate/{i}.png", png(i))
    zpath.write_bytes(zpath.read_bytes()[:-40])
    proc = _cli("shards", "build", str(zpath), "--out", str(tmp_path / "out"), "--no-progress")
    one_clear_line(proc, "cut.zip", "truncated or corrupt", "re-download")


def test_finished_build_rerun_rebuilds_a_deleted_or_altered_shard(tmp_path):
    tree = png_tree(tmp_path / "tree", {"plate": 6, "column": 5})
    out = tmp_path / "out"
    c = shards.BuildConfig(shard_samples=4)
    first = shards.build([str(tree)], out, c, **BUILD)
    blobs = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    (out / "shard-000001.tar").unlink()
    (out / "shard-000002.tar").write_bytes(blobs["shard-000002.tar"][:-10240])
    again = shards.build([str(tree)], out, c, **BUILD)
    assert {k: v for k, v in again.items() if k != "outputs"} == {k: v for k, v in first.items() if k != "outputs"}
    # resealed: the rebuilt shards' bytes as before, their new mtimes recorded
    assert {k: v["sha256"] for k, v in again["outputs"].items()} == {k: v["sha256"] for k, v in first["outputs"].items()}
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == blobs
    assert shards.verify(out) == []


@pytest.mark.slow
def test_real_archives_hostile(shared_data, tmp_path):
    """2D-S + PIP archives in one build beside a hostile tree (links in and out, a loop, a FIFO, a
    device, a truncated image) and a hostile manifest; every input is accounted for, the real
    images lose nothing but byte-identical duplicates, and a second writer is refused."""
    tree = png_tree(tmp_path / "tree", {"plate": 3})
    (tree / "plate" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tree / "plate" / "fifo.png")
    (tree / "plate" / "cut.png").write_bytes(png(99)[:40])
    (tree / "plate" / "loop").symlink_to(tree / "plate")
    (tree / "outside").symlink_to(shared_data)
    (tmp_path / "m.csv").write_text("path,habit\n../../etc/passwd,x\n/dev/zero,x\ntree/plate/0.png,plate\n")
    zips = [str(shared_data / "2ds_training.zip"), str(shared_data / "pip_training.zip")]
    out = tmp_path / "out"
    index = shards.build([*zips, str(tree), str(tmp_path / "m.csv")], out, shards.BuildConfig(), workers=2,
                         **BUILD)
    t = index["totals"]
    real = [r for p, r in _rejected(out).items() if p.split("/")[0].endswith(".zip")]
    assert {r["reason"] for r in real} <= {"duplicate"}
    assert t["inputs"] == t["written"] + t["rejected"] and t["inputs"] >= 5025 + 3281
    mine = {Path(p).name: r["reason"] for p, r in _rejected(out).items() if not p.split("/")[0].endswith(".zip")}
    assert mine["zero.png"] == "outside_root" and mine["fifo.png"] == "not_regular" and mine["cut.png"] == "corrupt"
    assert mine["loop"] == "symlink_loop" and mine["passwd"] == "outside_root"
    assert {mine[Path(z).name] for z in zips} == {"outside_root"}  # the archives again, through tree/outside
    assert shards.verify(out) == []
    with fileio.lock_dir(out):
        with pytest.raises(fileio.LockedError):
            shards.build(zips, out, shards.BuildConfig(), **BUILD)
    print(json.dumps({"inputs": t["inputs"], "written": t["written"], "rejected": t["rejected_by_reason"]}))
