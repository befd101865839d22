"""Shard building: hostile inputs, manifests, zips, real probe data, resume after SIGKILL, stock readers."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from icehpc import config
from icehpc.data import build, inputs, inspection, shards, synth, tarwriter
from icehpc.data import format as data_format

RNG = np.random.default_rng(0)


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 48, h: int = 32) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w), dtype=np.uint8), "L")


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _png_declaring(w: int, h: int) -> bytes:
    """A few hundred bytes that declare a w×h 8-bit image (a decompression bomb's header)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _chunk(b"IEND", b""))


def _png(w: int, h: int, rows: bytes, idat: bytes | None = None) -> bytes:
    """An 8-bit grayscale PNG from raw filtered rows, every CRC valid (only the content lies)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows) if idat is None else idat) + _chunk(b"IEND", b""))


def _hostile_files() -> dict[str, tuple[bytes, str | None]]:
    """relative path → (bytes, expected rejection reason or None for accepted)."""
    good = _enc(_noise(), "PNG")
    png = _enc(_noise(64, 64), "PNG")
    flipped = bytearray(png)
    flipped[png.find(b"IDAT") + 100] ^= 0xFF
    jpeg = _enc(_noise(64, 64).convert("RGB"), "JPEG", quality=90)
    tiff = _enc(_noise(64, 64), "TIFF")
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))          # transparent → background white
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    rotated = Image.new("L", (40, 20), 30)
    exif = rotated.getexif()
    exif[0x0112] = 6                              # "rotate 90° clockwise to display"
    palette = _noise(16, 16).convert("RGB").convert("P")
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    rows = b"".join(b"\x00" + bytes(range(i, i + 6)) for i in range(4))  # 6x4, filter 0
    return {
        "plate/good.png": (good, None),
        "plate/handmade.png": (_png(6, 4, rows), None),
        "column/rows-missing.png": (_png(6, 4, rows[:14]), "corrupt"),  # valid CRCs, Pillow zero-fills
        "column/zlib-cut.png": (_png(6, 4, b"", zlib.compress(rows)[:-4]), "corrupt"),
        "column/bad-filter.png": (_png(6, 4, b"\x09" + rows[1:]), "corrupt"),
        "plate/with space.png": (_enc(_noise(), "PNG"), None),
        "plate/dots.in.the.name.png": (_enc(_noise(), "PNG"), None),
        "plate/colon:name (1).png": (_enc(_noise(), "PNG"), None),
        "sphere/copy of good.png": (good, "duplicate"),
        "column/truncated.png": (png[: len(png) // 2], "corrupt"),
        "column/flipped-byte.png": (bytes(flipped), "corrupt"),
        "column/truncated.jpg": (jpeg[: int(len(jpeg) * 0.6)], "corrupt"),
        "column/truncated.tif": (tiff[: len(tiff) // 2], "corrupt"),
        "column/zero.png": (b"", "empty"),
        "column/notes.txt": (b"not an image\n", "not_image"),
        "column/fake.png": (b"<html>404</html>", "not_image"),
        "column/bomb.png": (_png_declaring(60000, 60000), "decompression_bomb"),
        "column/bomb-under-pillow-limit.png": (_png_declaring(7000, 7000), "decompression_bomb"),
        "column/float.tif": (_enc(Image.fromarray(RNG.random((8, 8), dtype=np.float32)), "TIFF"), "unsupported_mode"),
        "sphere/sixteen-bit.png": (_enc(Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)), "PNG"), None),
        "sphere/rgba.png": (_enc(rgba, "PNG"), None),
        "sphere/palette.png": (_enc(palette, "PNG"), None),
        "sphere/palette-transparent.png": (_enc(palette, "PNG", transparency=0), None),
        "sphere/cmyk.jpg": (_enc(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "JPEG"), None),
        "sphere/exif-rotated.jpg": (_enc(rotated.convert("RGB"), "JPEG", exif=exif.tobytes()), None),
        "sphere/two-frames.gif": (gif.getvalue(), None),
        "stray-at-top.png": (_enc(_noise(), "PNG"), "no_label"),
    }


NON_UTF8 = b"plate/bad-\xff\xfe-name.png"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("hostile")
    tree = root / "tree"
    files = _hostile_files()
    for rel, (data, _) in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    with open(os.fsencode(tree) + b"/" + NON_UTF8, "wb") as f:
        f.write(_enc(_noise(), "PNG"))
    out = root / "out"
    shards.build([str(tree)], out, shards.BuildConfig(probe="CPI", pixel_um=2.3, shard_samples=4),
                 workers=2, progress=False)
    return tree, out, files


def _samples(out: Path) -> dict[str, tuple[dict, bytes]]:
    """source_path → (json, png) read with stock webdataset."""
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / s["name"]) for s in index["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
    result = {}
    for sample in ds:
        meta = json.loads(sample["json"])
        result[meta["source_path"]] = (meta, sample["png"])
    return result


def test_hostile_inputs_are_rejected_with_reasons_or_normalised(hostile):
    tree, out, files = hostile
    index = json.loads((out / "index.json").read_text())
    rejected = {r["path"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    samples = _samples(out)
    name = tree.name
    for rel, (_, reason) in files.items():
        if reason is None:
            assert f"{name}/{rel}" in samples, rel
        else:
            assert rejected[f"{name}/{rel}"]["reason"] == reason, (rel, rejected.get(f"{name}/{rel}"))
            assert rejected[f"{name}/{rel}"]["detail"]
    assert rejected[f"{name}/sphere/copy of good.png"]["detail"] == f"same sha256 as {name}/plate/good.png"
    n_inputs = len(files) + 1
    t = index["totals"]
    assert t["inputs"] == n_inputs == t["written"] + t["rejected"] == len(samples) + len(rejected)
    assert t["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected.values()))
    assert index["labels"]["vocabulary"] == ["plate", "sphere"]
    assert shards.verify(out) == []


def test_every_stored_image_is_8bit_gray_and_conversions_are_faithful(hostile):
    tree, out, _ = hostile
    samples = _samples(out)
    for meta, png in samples.values():
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (meta["orig_width"], meta["orig_height"])
        assert set(data_format.METADATA_KEYS) <= set(meta) and meta["probe"] == "CPI" and meta["pixel_um"] == 2.3
    def pixels(rel):
        meta, png = samples[f"{tree.name}/{rel}"]
        return np.asarray(Image.open(io.BytesIO(png))), meta

    a, meta = pixels("sphere/sixteen-bit.png")
    assert a.tolist() == [[0, 100, 255]] and "16bit_to_8bit" in meta["conversion"]
    a, meta = pixels("sphere/rgba.png")
    assert a[0, 0] == 255 and a[0, 1] == 0 and 150 < a[0, 2] < 200  # over white
    a, meta = pixels("sphere/exif-rotated.jpg")
    assert a.shape == (40, 20) and "exif_orientation_6" in meta["conversion"]
    a, meta = pixels("sphere/cmyk.jpg")
    assert a.max() < 10 and "CMYK_to_gray" in meta["conversion"]
    a, meta = pixels("sphere/two-frames.gif")
    assert (a == 10).all() and "first_of_2_frames" in meta["conversion"]
    meta, png = samples[f"{tree.name}/plate/good.png"]
    assert png == (tree / "plate/good.png").read_bytes() and meta["conversion"] == []  # stored as is
    assert meta["source_sha256"] == hashlib.sha256(png).hexdigest()


def test_odd_file_names_survive(hostile):
    tree, out, _ = hostile
    samples = _samples(out)
    assert f"{tree.name}/plate/bad-\\xff\\xfe-name.png" in samples  # non-UTF-8 bytes shown escaped
    assert f"{tree.name}/plate/colon:name (1).png" in samples
    for meta, _ in samples.values():
        assert meta["habit"] in ("plate", "sphere")
    for s in json.loads((out / "index.json").read_text())["shards"]:
        with tarfile.open(out / s["name"]) as tf:
            for m in tf:
                key, ext = m.name.split(".")  # exactly one dot: keys have none
                assert key.isdigit() and ext in ("png", "json")
                assert (m.mtime, m.uid, m.gid, m.mode) == (tarwriter.TAR_MTIME, 0, 0, 0o444)


def test_tampering_is_found_by_verify(hostile, tmp_path):
    _, out, _ = hostile
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    first = copy / "shard-000000.tar"
    data = bytearray(first.read_bytes())
    data[600] ^= 0x01
    first.write_bytes(bytes(data))
    (copy / "shard-000001.tar").unlink()
    problems = shards.verify(copy)
    assert any("shard-000000.tar: bytes/sha256" in p for p in problems)
    assert any("shard-000001.tar: missing" in p for p in problems)


def test_stock_tar_lists_and_extracts(hostile, tmp_path):
    _, out, _ = hostile
    index = json.loads((out / "index.json").read_text())
    shard = out / next(s["name"] for s in index["shards"] if s["samples"] > 0)  # rejections can empty a shard
    listed = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True)
    names = listed.stdout.split()
    assert names and len(names) % 2 == 0
    subprocess.run(["tar", "xf", str(shard), "-C", str(tmp_path)], check=True, capture_output=True)
    with tarfile.open(shard) as tf:
        for m in tf:
            assert (tmp_path / m.name).read_bytes() == tf.extractfile(m).read()


def _write_tree(root: Path, n_per_class: dict[str, int]) -> None:
    for label, n in n_per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(_enc(_noise(20 + i % 7, 16), "PNG"))


def test_zip_with_single_top_folder_is_descended_and_matches_the_folder(tmp_path):
    tree = tmp_path / "DS_data"
    _write_tree(tree / "Classes", {"Class (01) Pri": 3, "Class (02) Co": 4})
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(tree.rglob("*")):
            z.write(p, str(p.relative_to(tree.parent)))
    a, b = tmp_path / "a", tmp_path / "b"
    ia = shards.build([str(zpath)], a, shards.BuildConfig(), progress=False)
    ib = shards.build([str(tree)], b, shards.BuildConfig(), progress=False)
    assert ia["labels"]["counts"] == ib["labels"]["counts"] == {"Class (01) Pri": 3, "Class (02) Co": 4}
    sa, sb = _samples(a), _samples(b)
    assert "data.zip/DS_data/Classes/Class (02) Co/3.png" in sa
    assert sorted(p for _, p in sa.values()) == sorted(p for _, p in sb.values())


def test_files_over_the_size_limit_are_rejected_before_reading(tmp_path):
    tree = tmp_path / "t"
    _write_tree(tree, {"plate": 2})
    big = _enc(_noise(200, 200), "PNG")
    (tree / "plate" / "big.png").write_bytes(big)
    zpath = tmp_path / "t.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("plate/big.png", big)
        z.writestr("plate/small.png", (tree / "plate" / "0.png").read_bytes())
    c = shards.BuildConfig(max_file_bytes=len(big) - 1)
    for source in (tree, zpath):
        out = tmp_path / f"out-{source.name}"
        index = shards.build([str(source)], out, c, progress=False)
        rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
        assert [(r["path"].split("/")[-1], r["reason"]) for r in rejected] == [("big.png", "too_large")]
        assert index["totals"]["written"] == index["totals"]["inputs"] - 1


def test_manifest_column_policy(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for i in range(8):
        (img / f"{i}.png").write_bytes(_enc(_noise(10 + i, 12), "PNG"))
    rows = [
        ("img/0.png", "plate", "-12.5", "2020-01-01T00:00:00+00:00", "", None),
        ("img/1.png", "plate", "", "", "NaN", None),                      # unknown values → null
        ("img/2.png", "plate", "warm", "", "", "bad_metadata"),
        ("img/3.png", "plate", "inf", "", "", "bad_metadata"),
        ("img/4.png", "", "-3", "", "", "missing_label"),
        ("img/5.png", "column", "-3", "yesterday", "", "bad_metadata"),
        ("img/missing.png", "column", "-3", "", "", "unreadable"),
        ("img/6.png", "column", "-40", "", "120.5", None),
    ]
    lines = ["path,habit,temperature_c,time,particle_width_um,comment"]
    lines += [",".join(r[:5]) + ",hello" for r in rows]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    index = shards.build([str(tmp_path / "m.csv")], out, shards.BuildConfig(), progress=False)
    rejected = {r["path"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    samples = _samples(out)
    for path, *_, reason in rows:
        if reason is None:
            assert f"m.csv/{path}" in samples
        else:
            assert rejected[f"m.csv/{path}"] == reason
    meta = samples["m.csv/img/1.png"][0]
    assert meta["temperature_c"] is None and meta["particle_width_um"] is None and meta["time"] is None
    meta = samples["m.csv/img/6.png"][0]
    assert meta["temperature_c"] == -40.0 and meta["particle_width_um"] == 120.5 and meta["comment"] == "hello"
    assert index["totals"] == {"inputs": 8, "written": 3, "rejected": 5,
                               "rejected_by_reason": {"bad_metadata": 3, "missing_label": 1, "unreadable": 1}}
    (tmp_path / "nopath.csv").write_text("file,habit\na.png,plate\n")
    with pytest.raises(config.ConfigError, match="'path'"):
        shards.build([str(tmp_path / "nopath.csv")], tmp_path / "o2", shards.BuildConfig(), progress=False)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthdata")
    synth.synthesize(root, synth.SynthConfig(n=600, seed=4), workers=2, progress=False)
    return root


def _all_bytes(root: Path) -> dict[str, bytes]:
    """Every output file's bytes (not the folder lock, which names the last writer's PID); the
    index without the mtimes its seal records (the contract's stat shortcut), which no rerun keeps."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
           if p.is_file() and p.name != ".lock"}
    if "index.json" in out:
        index = json.loads(out["index.json"])
        for fact in index.get("outputs", {}).values():
            fact.pop("mtime_ns")
        out["index.json"] = json.dumps(index, sort_keys=True).encode()
    return out


def test_shard_limits_shuffle_and_worker_independence(synth_data, tmp_path):
    manifest = str(synth_data / "manifest.csv")
    c = shards.BuildConfig(shard_samples=70, shard_bytes=300_000, shuffle=True, seed=5)
    one = shards.build([manifest], tmp_path / "x", c, workers=1, progress=False)
    two = shards.build([manifest], tmp_path / "y", c, workers=2, progress=False)
    assert {k: v for k, v in one.items() if k not in ("command", "outputs")} == \
        {k: v for k, v in two.items() if k not in ("command", "outputs")}
    assert {k: (v["bytes"], v["sha256"]) for k, v in one["outputs"].items()} == \
        {k: (v["bytes"], v["sha256"]) for k, v in two["outputs"].items()}
    assert {k: v for k, v in _all_bytes(tmp_path / "x").items() if k != "index.json"} == \
        {k: v for k, v in _all_bytes(tmp_path / "y").items() if k != "index.json"}
    for s in one["shards"]:
        assert 0 < s["samples"] <= 70 and (s["bytes"] <= 300_000 + 20_000 or s["samples"] == 1)
    keys = [m.name for m in tarfile.open(tmp_path / "x" / "shard-000000.tar")]
    assert keys != sorted(keys)  # shuffled
    other = shards.build([manifest], tmp_path / "z", shards.BuildConfig(shard_samples=70, shuffle=True, seed=6),
                         workers=1, progress=False)
    assert other["shards"][0]["sha256"] != one["shards"][0]["sha256"]
    again = shards.build([manifest], tmp_path / "x", c, workers=1, progress=False)  # already built: no-op
    assert again == one
    with pytest.raises(config.ConfigError, match="other inputs or options"):
        shards.build([manifest], tmp_path / "x", shards.BuildConfig(shard_samples=71), progress=False)


@pytest.mark.parametrize("kill_when", ["starting", "checking", "writing shards"])
def test_sigkill_then_rerun_is_byte_identical(synth_data, tmp_path, icehpc_cmd, kill_when):
    out = tmp_path / "out"
    cmd = [*icehpc_cmd, "shards", "build", str(synth_data / "manifest.csv"), "--out", str(out),
           "--shard-samples", "15", "--workers", "2", "--shuffle", "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    reference = _all_bytes(out)
    out.rename(tmp_path / "reference")

    def ready() -> bool:
        if kill_when == "starting":
            return (out / data_format.WORK).is_dir()
        if kill_when == "checking":  # a chunk of the check pass committed: the rerun reuses it
            return any((out / data_format.WORK).glob("check-*.json"))
        return len(list(out.glob("shard-*.tar"))) >= 8

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes
    proc.wait()
    partial = sorted(p.name for p in out.glob("shard-*.tar"))
    assert len(partial) < 40 and not (out / "index.json").exists(), partial  # really killed mid-build
    if kill_when == "writing shards":
        assert len(partial) >= 8
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert _all_bytes(out) == reference
    assert not (out / data_format.WORK).exists() and not list(out.glob(".*.tmp"))


def test_tar_members_match_the_stdlib_tarfile_bytes():
    members = [("000000001.json", b'{"a": 1}'), ("000000001.png", bytes(range(256)) * 3), ("k" * 100, b"")]
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), tarwriter.TAR_MTIME, 0o444, \
                "icehpc", "icehpc"
            tf.addfile(info, io.BytesIO(payload))
    body = b"".join(tarwriter.tar_member(n, d) for n, d in members)
    assert body + tarwriter.tar_end(len(body)) == ref.getvalue()
    with pytest.raises(ValueError):
        tarwriter.tar_member("k" * 101, b"")


def test_cli_verify_and_stats(synth_data, tmp_path, icehpc_cmd):
    out = tmp_path / "s"
    r = subprocess.run([*icehpc_cmd, "shards", "build", str(synth_data / "manifest.csv"), "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "600 inputs = 600 written + 0 rejected" in r.stdout
    r = subprocess.run([*icehpc_cmd, "shards", "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "verify: OK" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*icehpc_cmd, "shards", "stats", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    counts = Counter(row.split(",")[7] for row in (synth_data / "manifest.csv").read_text().splitlines()[1:])
    for habit, n in counts.items():
        assert any(line.split()[:2] == [habit, str(n)] for line in r.stdout.splitlines()), (habit, n, r.stdout)
    with Image.open(out / "stats.png") as im:
        assert im.format == "PNG" and im.width > 300
    (out / "shard-000000.tar").write_bytes(b"")
    r = subprocess.run([*icehpc_cmd, "shards", "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "shard-000000.tar" in r.stdout


def _zip_class_counts(zpath: Path) -> tuple[Counter, Counter]:
    """Files per class folder (the folder under the single top folder) and duplicates per class,
    computed from the zip directly: a duplicate is a file whose sha256 was seen earlier in name order."""
    with zipfile.ZipFile(zpath) as z:
        members = sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.filename.split("/", 1)[1])
        per_class, dups, seen = Counter(), Counter(), set()
        for info in members:
            label = info.filename.split("/")[1]
            per_class[label] += 1
            digest = hashlib.sha256(z.read(info)).hexdigest()
            dups[label] += digest in seen
            seen.add(digest)
    return per_class, dups


@pytest.mark.parametrize("archive,probe,pixel,total", [("2ds_training.zip", "2D-S", 10.0, 5025),
                                                       ("pip_training.zip", "PIP", 100.0, 3281)])
def test_real_probe_archives_ingest_with_exact_counts(shared_data, tmp_path, archive, probe, pixel, total):
    zpath = shared_data / archive
    per_class, dups = _zip_class_counts(zpath)
    assert sum(per_class.values()) == total
    out = tmp_path / "out"
    index = shards.build([str(zpath)], out, shards.BuildConfig(probe=probe, pixel_um=pixel), workers=2, progress=False)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejected} <= {"duplicate"}
    rejected_per_class = Counter(r["path"].split("/")[2] for r in rejected)
    assert index["totals"]["inputs"] == total
    for label, n in per_class.items():
        assert index["labels"]["counts"].get(label, 0) + rejected_per_class[label] == n, label
        assert rejected_per_class[label] == dups[label], label
    assert shards.verify(out) == []
    keep = shards.build([str(zpath)], tmp_path / "keep", shards.BuildConfig(duplicates="keep"), workers=2,
                        progress=False)
    assert keep["labels"]["counts"] == dict(sorted(per_class.items())) and keep["totals"]["rejected"] == 0


@pytest.mark.slurm
def test_sbatch_build_matches_local_build(slurm_cluster, synth_data, tmp_path):
    root = Path(__file__).resolve().parent.parent
    args = [str(synth_data / "manifest.csv"), "--shard-samples", "100", "--shuffle", "--seed", "3"]
    local = tmp_path / "local"
    shards.build([args[0]], local, shards.BuildConfig(shard_samples=100, shuffle=True, seed=3), workers=1,
                 progress=False)
    remote = tmp_path / "slurm"
    r = subprocess.run(["sbatch", "--wait", "-p", slurm_cluster["partition"], "-c", "2", "-t", "5",
                        "--output", str(tmp_path / "job.out"), "jobs/build_shards.sh", *args, "--out", str(remote)],
                       cwd=root, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + log
    assert "600 inputs = 600 written + 0 rejected" in log
    a, b = _all_bytes(local), _all_bytes(remote)
    assert {k: v for k, v in a.items() if k != "index.json"} == {k: v for k, v in b.items() if k != "index.json"}
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (local, remote))
    # only how it was invoked differs: the command (--out) and where the config came from (library call vs CLI)
    assert ia.pop("command") != ib.pop("command")
    assert ia.pop("config_source") is None and ib.pop("config_source") == {"file": None, "overrides": []}
    oa, ob = ia.pop("outputs"), ib.pop("outputs")  # the seal: same files and bytes, other mtimes
    assert {k: (v["bytes"], v["sha256"]) for k, v in oa.items()} == {k: (v["bytes"], v["sha256"]) for k, v in ob.items()}
    assert ia == ib


@pytest.mark.parametrize("polarity", ["auto", "keep", "invert"])
def test_polarity_gives_every_shard_dark_particles_on_a_light_field(tmp_path, polarity):
    """OAP archives are white particles on black; synthetic CPI images dark on light. ``auto``
    inverts exactly the dark-field images (noted in ``conversion``), so both end up dark on light."""
    tree = tmp_path / "tree"
    (tree / "col").mkdir(parents=True)
    oap = np.zeros((40, 40), np.uint8)
    oap[12:28, 15:25] = 255  # white particle, black field
    cpi = np.full((40, 40), 230, np.uint8)
    cpi[10:30, 18:22] = 40  # dark particle, light field
    Image.fromarray(oap).save(tree / "col" / "oap.png")
    Image.fromarray(cpi).save(tree / "col" / "cpi.png")
    out = tmp_path / "out"
    shards.build([str(tree)], out, shards.BuildConfig(polarity=polarity), workers=1, progress=False)
    samples = _samples(out)
    stored = {k.split("/")[-1]: (m, np.asarray(Image.open(io.BytesIO(png)))) for k, (m, png) in samples.items()}
    (m_oap, a_oap), (m_cpi, a_cpi) = stored["oap.png"], stored["cpi.png"]
    if polarity == "keep":
        assert np.array_equal(a_oap, oap) and np.array_equal(a_cpi, cpi)
        assert m_oap["conversion"] == [] and m_cpi["conversion"] == []
    elif polarity == "auto":
        assert np.array_equal(a_oap, 255 - oap) and "inverted_auto_dark_border" in m_oap["conversion"]
        assert np.array_equal(a_cpi, cpi) and m_cpi["conversion"] == []
        assert a_oap[0, 0] > 128 and a_cpi[0, 0] > 128  # one convention: light field everywhere
    else:
        assert np.array_equal(a_oap, 255 - oap) and np.array_equal(a_cpi, 255 - cpi)
        assert "inverted" in m_cpi["conversion"]
    assert json.loads((out / "index.json").read_text())["totals"]["written"] == 2


def test_each_input_is_opened_read_and_inflated_once_with_no_stat_per_file(tmp_path, monkeypatch):
    """Issue 23's regression guard: per input one open, one read(), one inflate of the PNG image
    data and no stat/lstat of the file itself (the folders are resolved once each), with the
    default polarity, which must still decide every image from its decoded pixels."""
    tree = tmp_path / "tree"
    names = []
    for k in range(6):
        (tree / f"class{k % 2}").mkdir(parents=True, exist_ok=True)
        a = np.full((30 + k, 40), 230 if k % 3 else 20, np.uint8)  # every third: dark field (inverted)
        a[8:20, 10:25] = 20 if k % 3 else 230
        path = tree / f"class{k % 2}" / f"p{k}.png"
        Image.fromarray(a).save(path)
        names.append(str(path))
    opens, reads, stats, inflates, pil_opens = Counter(), Counter(), Counter(), [0], [0]
    real_os_open, real_open, real_lstat, real_stat = os.open, open, os.lstat, os.stat
    from icehpc.data.images import zlib_ng  # the inflate check_png uses
    real_inflater, real_pil_open = zlib_ng.decompressobj, Image.open

    class CountingFile:
        def __init__(self, f, name):
            self.f, self.name = f, name

        def read(self, *a):
            reads[self.name] += 1
            return self.f.read(*a)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    fd_names: dict[int, str] = {}

    def os_open(path, *a, **kw):
        fd = real_os_open(path, *a, **kw)
        opens[os.fsdecode(path)] += 1
        fd_names[fd] = os.fsdecode(path)
        return fd

    def py_open(file, *a, **kw):
        if isinstance(file, int) and file in fd_names:
            return CountingFile(real_open(file, *a, **kw), fd_names[file])
        opens[os.fsdecode(file) if not isinstance(file, int) else file] += 1
        return real_open(file, *a, **kw)

    def lstat(path, *a, **kw):
        stats[os.fsdecode(path)] += 1
        return real_lstat(path, *a, **kw)

    def os_stat(path, *a, **kw):
        if not isinstance(path, int):
            stats[os.fsdecode(path)] += 1
        return real_stat(path, *a, **kw)

    def inflater(*a, **kw):
        inflates[0] += 1
        return real_inflater(*a, **kw)

    def pil_open(*a, **kw):
        pil_opens[0] += 1
        return real_pil_open(*a, **kw)

    monkeypatch.setattr(shards.os, "open", os_open)
    monkeypatch.setattr(inputs, "open", py_open, raising=False)  # where read_source opens the file
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "stat", os_stat)
    monkeypatch.setattr(zlib, "decompressobj", inflater)
    monkeypatch.setattr(zlib_ng, "decompressobj", inflater)
    monkeypatch.setattr(Image, "open", pil_open)
    index = shards.build([str(tree)], tmp_path / "out", shards.BuildConfig(), workers=1, progress=False)
    monkeypatch.undo()
    assert index["totals"] == {"inputs": 6, "written": 6, "rejected": 0, "rejected_by_reason": {}}
    assert {n: opens[n] for n in names} == {n: 1 for n in names}
    assert {n: reads[n] for n in names} == {n: 1 for n in names}
    assert {n: stats[n] for n in names} == {n: 0 for n in names}
    assert inflates[0] == len(names) and pil_opens[0] == 0
    inverted = [m for m, _ in _samples(tmp_path / "out").values() if m["conversion"]]
    assert len(inverted) == 2 and all(m["conversion"] == ["inverted_auto_dark_border"] for m in inverted)


@pytest.mark.parametrize("shuffle", [False, True])
def test_shard_pass_reads_each_spooled_run_once_and_seals_without_rereading(tmp_path, monkeypatch, shuffle):
    """Issue 23 guard of the shard pass: samples that lie back to back in a spool are read with one
    pread (per shard, unshuffled), the shards it writes are not read again to seal them, and the
    result is the same bytes either way (tar-readable, sha256 as sealed)."""
    synth.synthesize(tmp_path / "s", synth.SynthConfig(n=90, seed=2), workers=1, progress=False)
    preads, hashed = [0], []
    real_pread, real_hash = os.pread, build.CONTRACT.seal.__globals__["file_sha256"]

    def pread(*a):
        preads[0] += 1
        return real_pread(*a)

    def file_sha256(path):
        hashed.append(Path(path).name)
        return real_hash(path)

    monkeypatch.setattr(build.os, "pread", pread)
    monkeypatch.setattr("icehpc.contract.file_sha256", file_sha256)
    cfg = shards.BuildConfig(shard_samples=40, shuffle=shuffle)
    index = shards.build([str(tmp_path / "s" / "manifest.csv")], tmp_path / "out", cfg, workers=1, progress=False)
    monkeypatch.undo()
    names = [s["name"] for s in index["shards"]]
    assert len(names) == 3 and not set(names) & set(hashed)  # rejected.jsonl / sources.jsonl are hashed
    assert preads[0] == len(names) if not shuffle else len(names) < preads[0] <= 90
    for s in index["shards"]:
        data = (tmp_path / "out" / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] == index["outputs"][s["name"]]["sha256"]
        assert len(tarfile.open(fileobj=io.BytesIO(data)).getnames()) == 2 * s["samples"]


def _ztxt_bomb() -> bytes:
    """A valid 8x8 grayscale PNG carrying a zTXt chunk that inflates to 64 MiB (Pillow refuses it)."""
    rows = b"".join(b"\0" + bytes([200] * 8) for _ in range(8))
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
            + _chunk(b"zTXt", b"Comment\0\0" + bomb) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


@pytest.mark.parametrize("polarity", ["auto", "keep", "invert"])
def test_ztxt_bomb_is_rejected_whatever_the_polarity(tmp_path, polarity):
    """Issue 20: ``--polarity keep`` stored PNGs undecoded, so a zTXt bomb was written and the
    embedding died on it later. Every stored sample is decoded under the same caps."""
    tree = tmp_path / "tree" / "col"
    tree.mkdir(parents=True)
    (tree / "bomb.png").write_bytes(_ztxt_bomb())
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tree / "ok.png")
    out = tmp_path / "out"
    index = shards.build([str(tmp_path / "tree")], out, shards.BuildConfig(polarity=polarity), workers=1,
                         progress=False)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["path"].split("/")[-1], r["reason"]) for r in rejected] == [("bomb.png", "decompression_bomb")]
    assert index["totals"]["written"] == 1


def test_manifest_cells_later_stages_cannot_store_reject_the_row(tmp_path):
    """Issue 20: a NUL in a metadata cell or in the path, a cell over 128 KiB, extra cells, numbers
    written as ``1_000`` or ``٣``: each rejects its row with a reason (no crash, no abort); labels
    ``NA`` and ``none`` are labels, not missing values."""
    (tmp_path / "img").mkdir()
    for k in range(9):
        Image.fromarray(np.full((6, 6), 200 - k, np.uint8)).save(tmp_path / "img" / f"{k}.png")
    long = "x" * (128 * 1024 + 1)
    lines = ["path,habit,temperature_c,campaign",
             "img/0.png,plate,-3,ok",
             "img/1.png,plate,-3,bad\0cell",
             "img/2.png\0,plate,-3,ok",
             f"img/3.png,plate,-3,{long}",
             "img/4.png,plate,-3,ok,surplus",
             "img/5.png,plate,1_000,ok",
             "img/6.png,plate,\u0663,ok",
             "img/7.png,NA,-3,ok",
             "img/8.png,none,-3,ok"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    index = shards.build([str(tmp_path / "m.csv")], out, shards.BuildConfig(), workers=1, progress=False)
    rejected = {r["path"].split("/")[-1][:9]: r for r in
                map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert {k: r["reason"] for k, r in rejected.items()} == {
        "1.png": "bad_metadata", "2.png\x00": "bad_metadata", "3.png": "bad_metadata", "4.png": "bad_metadata",
        "5.png": "bad_metadata", "6.png": "bad_metadata"}
    assert "NUL" in rejected["1.png"]["detail"] and "131072" in rejected["3.png"]["detail"]
    assert "more cell" in rejected["4.png"]["detail"]
    assert index["totals"]["written"] == 3 and index["totals"]["inputs"] == 9
    assert sorted(index["labels"]["vocabulary"]) == ["NA", "none", "plate"]


@pytest.mark.parametrize("override,says", [("seed=-1", "seed"), ("pixel_um=.nan", "pixel_um"),
                                           ("pixel_um=-2.3", "pixel_um"), ("max_pixels=-1", "max_pixels"),
                                           ("max_file_bytes=0", "max_file_bytes")])
def test_bad_build_values_are_config_errors(override, says):
    """Issue 20: ``--seed -1`` was a traceback, ``--pixel-um nan`` wrote NaN into JSON, negative
    pixel sizes and ``max_pixels=-1`` were accepted."""
    with pytest.raises(config.ConfigError, match=says):
        config.load(shards.BuildConfig, None, [override])


def test_seed_minus_one_on_the_command_line_is_one_line(tmp_path, icehpc_cmd):
    proc = subprocess.run([*icehpc_cmd, "shards", "build", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--seed", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "seed" in proc.stderr


def _tiny_tree(root: Path, classes: tuple[str, ...] = ("plate", "column")) -> Path:
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        a = np.full((12, 12), 220, np.uint8)
        a[3:8, 4:9] = 20 + k
        Image.fromarray(a).save(root / name / f"p{k}.png")
    return root


def test_overwrite_removes_only_the_builds_own_files(tmp_path):
    """Issue 19: ``--overwrite`` removes the shards, index, log, histogram and scratch; a user's
    notes and a stray ``shard-abc.tar`` (not a name the build writes) stay, and do not crash it."""
    tree, out = _tiny_tree(tmp_path / "tree"), tmp_path / "out"
    shards.build([str(tree)], out, shards.BuildConfig(), workers=1, progress=False)
    (out / "README.txt").write_text("my notes")
    (out / "shard-abc.tar").write_bytes(b"mine")
    (out / "figures").mkdir()
    (out / "figures" / "final.pdf").write_bytes(b"%PDF")
    index = shards.build([str(tree)], out, shards.BuildConfig(shard_samples=1), workers=1, progress=False,
                         overwrite=True)
    assert index["totals"]["written"] == 2 and len(index["shards"]) == 2
    assert (out / "README.txt").read_text() == "my notes" and (out / "shard-abc.tar").read_bytes() == b"mine"
    assert (out / "figures" / "final.pdf").exists()
    assert data_format.CONTRACT.foreign(out) == ["README.txt", "figures/final.pdf", "shard-abc.tar"]
    assert sorted(index["outputs"]) == ["rejected.jsonl", "shard-000000.tar", "shard-000001.tar", "sources.jsonl"]


def test_out_inside_the_input_folder_is_not_ingested(tmp_path):
    """Issue 20: ``--out`` inside the input tree ingested the build's own ``.lock`` (and would its
    shards on a rerun): the output folder is excluded from the scan."""
    tree = _tiny_tree(tmp_path / "tree")
    out = tree / "shards"
    first = shards.build([str(tree)], out, shards.BuildConfig(), workers=1, progress=False)
    assert first["totals"] == {"inputs": 2, "written": 2, "rejected": 0, "rejected_by_reason": {}}
    again = shards.build([str(tree)], out, shards.BuildConfig(), workers=1, progress=False)
    assert again["totals"] == first["totals"]


def test_nfc_and_nfd_spellings_of_a_folder_are_one_class(tmp_path):
    """Issue 20: ``é`` composed (NFC) and decomposed (NFD, as macOS writes it) are one class, NFC."""
    import unicodedata
    nfc, nfd = unicodedata.normalize("NFC", "rosetté"), unicodedata.normalize("NFD", "rosetté")
    assert nfc != nfd
    tree = _tiny_tree(tmp_path / "tree", (nfc, nfd))
    index = shards.build([str(tree)], tmp_path / "out", shards.BuildConfig(), workers=1, progress=False)
    assert index["labels"]["vocabulary"] == [nfc] and index["labels"]["counts"] == {nfc: 2}


def test_stats_draws_a_class_named_like_math_text(tmp_path):
    """Issue 20: a class named ``$\\frac{x$ col`` crashed ``shards stats`` (matplotlib math text)."""
    tree = _tiny_tree(tmp_path / "tree", ("$\\frac{x$ col", "plate"))
    out = tmp_path / "out"
    shards.build([str(tree)], out, shards.BuildConfig(), workers=1, progress=False)
    result = shards.stats(out)
    assert result["labels"] == {"$\\frac{x$ col": 1, "plate": 1} and (out / "stats.png").stat().st_size > 1000


def _build_args(argv: list[str]):
    import argparse
    parser = argparse.ArgumentParser()
    shards.add_arguments(parser)
    return parser.parse_args(argv)


def test_status_is_read_only_stats_first_and_sees_changed_bytes_under_a_manifest(tmp_path):
    """Issue 19: ``status`` says whether the build in --out is complete and from these inputs and
    bytes, writing nothing; a touched copy passes (rehash on a stat change), an image whose bytes
    changed under the manifest (same name) makes it not done."""
    (tmp_path / "img").mkdir()
    for k in range(3):
        Image.fromarray(np.full((8, 8), 100 + k, np.uint8)).save(tmp_path / "img" / f"{k}.png")
    (tmp_path / "m.csv").write_text("path,habit\n" + "".join(f"img/{k}.png,plate\n" for k in range(3)))
    out = tmp_path / "out"
    args = _build_args(["build", str(tmp_path / "m.csv"), "--out", str(out), "--no-progress", "--workers", "1"])
    assert not shards.status(args).done
    shards.run(args)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    st = shards.status(args)
    assert st.done and "3 inputs unchanged (0 rehashed" in st.why
    os.utime(tmp_path / "img" / "1.png", ns=(1, 1))  # touched, same bytes
    st = shards.status(args)
    assert st.done and "(1 rehashed" in st.why
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "img" / "2.png")  # other bytes, same name
    st = shards.status(args)
    assert not st.done and "img/2.png changed" in st.why
    other = _build_args(["build", str(tmp_path / "m.csv"), "--out", str(out), "--shard-samples", "2"])
    assert not shards.status(other).done


def test_keys_from_another_data_set_are_refused_and_unselected_inputs_counted(tmp_path, icehpc_cmd):
    """Issue 19: ``--keys`` from a build of other inputs wrote samples with disagreeing labels and
    left inputs in neither the shards nor the rejection log. With the keys' ``source_sha256`` the
    mismatch is one line (exit 2); unselected inputs are counted: inputs = written + rejected +
    not_selected."""
    def tree(root: Path, shade: int) -> Path:
        for k in range(6):
            (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), shade + k, np.uint8)).save(root / f"c{k % 2}" / f"{k}.png")
        return root
    a, b = tree(tmp_path / "a", 100), tree(tmp_path / "b", 30)
    full = shards.build([str(a)], tmp_path / "full", shards.BuildConfig(), workers=1, progress=False)
    assert full["totals"]["written"] == 6
    metas = sorted(inspection.iter_metadata(tmp_path / "full"), key=lambda m: m["source_path"])
    keys = {data_format.sample_key(int(k)): None for k in ("1", "4")}
    by_path = {m["source_path"]: m["source_sha256"] for m in metas}
    items = inputs.scan([str(a)], "habit")
    rows = [(data_format.sample_key(i.ordinal), by_path[i.source_path]) for i in items if data_format.sample_key(i.ordinal) in keys]
    (tmp_path / "curated.csv").write_text("key,source_sha256\n" + "".join(f"{k},{s}\n" for k, s in rows))
    proc = subprocess.run([*icehpc_cmd, "shards", "build", str(b), "--keys", str(tmp_path / "curated.csv"),
                           "--out", str(tmp_path / "wrong"), "--no-progress"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "other inputs" in proc.stderr
    sub = shards.build([str(a)], tmp_path / "sub", shards.BuildConfig(), workers=1, progress=False,
                       keys=build.read_keys(tmp_path / "curated.csv"))
    t = sub["totals"]
    assert (t["inputs"], t["written"], t["rejected"], t["not_selected"]) == (6, 2, 0, 4)
    assert shards.verify(tmp_path / "sub") == []


def test_integer_tiffs_are_scaled_by_the_bit_depth_their_values_use(tmp_path):
    """Issue 20: an int32 TIFF holding 8-bit values was stored nearly black (0–1) and 12-bit data in
    16-bit containers as 1–14: scaled by the depth actually used, the conversion recorded."""
    tree = tmp_path / "tree" / "col"
    tree.mkdir(parents=True)
    eight = np.array([[0, 100, 255]] * 3, np.int32)
    twelve = np.array([[0, 2048, 4095]] * 3, np.uint16)
    Image.fromarray(eight, "I").save(tree / "int32-8bit.tif")
    Image.fromarray(twelve).save(tree / "u16-12bit.png")
    out = tmp_path / "out"
    shards.build([str(tmp_path / "tree")], out, shards.BuildConfig(polarity="keep"), workers=1, progress=False)
    got = {k.split("/")[-1]: (m, np.asarray(Image.open(io.BytesIO(png)))) for k, (m, png) in _samples(out).items()}
    m8, a8 = got["int32-8bit.tif"]
    m12, a12 = got["u16-12bit.png"]
    assert a8[0].tolist() == [0, 100, 255] and "I_8bit_values_kept" in m8["conversion"]
    assert a12[0].tolist() == [0, 128, 255] and any("12bit" in n for n in m12["conversion"])


def test_stats_writes_its_histogram_to_out_like_every_other_command(tmp_path, icehpc_cmd):
    tree, out = _tiny_tree(tmp_path / "tree"), tmp_path / "out"
    shards.build([str(tree)], out, shards.BuildConfig(), workers=1, progress=False)
    for flag, png in (("--out", tmp_path / "hist.png"), ("--png", tmp_path / "old-name.png")):  # --png: old name
        r = subprocess.run([*icehpc_cmd, "shards", "stats", str(out), flag, str(png)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with Image.open(png) as im:
            assert im.format == "PNG"
    assert not (out / data_format.STATS).exists()


def test_a_manifest_without_the_label_column_says_how_to_name_it(tmp_path, icehpc_cmd):
    from cli_helpers import one_clear_line

    tree = _tiny_tree(tmp_path / "tree")
    (tmp_path / "m.csv").write_text("path,class\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n"
                                                             for p in sorted(tree.rglob("*.png"))))
    cmd = [*icehpc_cmd, "shards", "build", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    one_clear_line(r, "'habit' column", "--label-column", code=2)
    r = subprocess.run([*cmd, "--label-column", "class"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "2 written" in r.stdout, r.stdout + r.stderr
