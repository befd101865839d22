"""Loader API (icehpc.data) on real shards built from synthetic images."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icehpc.data import format as fmt, loader as data, shards, synth


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synth.synthesize(root / "synth", synth.SynthConfig(n=230, seed=3), workers=1, progress=False)
    out = root / "shards"
    shards.build([str(root / "synth" / "manifest.csv")], out, shards.BuildConfig(shard_samples=40),
                 workers=1, progress=False)
    return out


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_keeps_aspect_and_pads_with_background():
    wide = np.zeros((20, 40), np.uint8)  # a black 40x20 particle, larger than the canvas
    img = data.decode_image(_png(wide), 32)
    assert img.shape == (1, 32, 32) and img.dtype == torch.uint8
    dark_rows = (img[0] < 128).any(dim=1).nonzero().flatten()
    dark_cols = (img[0] < 128).any(dim=0).nonzero().flatten()
    assert len(dark_cols) == 32 and len(dark_rows) == 16  # 40x20 → 32x16: aspect kept
    assert dark_rows.min() == 8 and dark_rows.max() == 23  # centred vertically
    assert (img[0, :8] == data.BACKGROUND).all() and (img[0, 24:] == data.BACKGROUND).all()


def test_decode_image_does_not_upscale_small_crops_by_default():
    small = np.full((10, 6), 50, np.uint8)
    img = data.decode_image(_png(small), 64)
    assert int((img[0] == 50).sum()) == 60
    assert int((data.decode_image(_png(small), 64, max_upscale=2.0)[0] < 128).sum()) == 20 * 12


def test_assign_shards_is_a_partition():
    paths = [f"s{i}.tar" for i in range(11)]
    for world in (1, 2, 3, 4, 16):
        parts = [data.assign_shards(paths, r, world) for r in range(world)]
        assert sorted(p for part in parts for p in part) == sorted(paths)
        assert parts == [data.assign_shards(paths, r, world) for r in range(world)]
    with pytest.raises(ValueError):
        data.assign_shards(paths, 3, 3)


def test_index_helpers(shard_dir):
    index = fmt.read_index(shard_dir)
    paths = fmt.shard_paths(shard_dir)
    assert [Path(p).name for p in paths] == [s["name"] for s in index["shards"]]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths)
    with pytest.raises(FileNotFoundError, match="build shards first"):
        fmt.read_index(shard_dir.parent)


def _keys_in_tar_order(paths: list[str]) -> list[str]:
    keys = []
    for p in paths:
        with tarfile.open(p) as tf:
            keys += [m.name[:-5] for m in tf if m.name.endswith(".json")]
    return keys


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ordered_loader_exactly_once(shard_dir, num_workers):
    paths = fmt.shard_paths(shard_dir)
    keys, shard_of = [], {}
    for images, metas in data.ordered_loader(paths, batch_size=16, canvas=48, num_workers=num_workers):
        assert images.shape[1:] == (1, 48, 48) and images.dtype == torch.uint8
        assert images.shape[0] == len(metas)
        for m in metas:
            assert {"__key__", "__shard__", "habit", "source_sha256", "particle_width_um"} <= set(m)
            shard_of[m["__key__"]] = m["__shard__"]
        keys += [m["__key__"] for m in metas]
    expected = _keys_in_tar_order(paths)
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == 230
    if num_workers == 0:
        assert keys == expected
    for shard in set(shard_of.values()):
        in_tar = set(_keys_in_tar_order([str(shard_dir / shard)]))
        assert {k for k, s in shard_of.items() if s == shard} == in_tar


def test_ordered_loader_split_over_ranks_covers_everything_once(shard_dir):
    paths = fmt.shard_paths(shard_dir)
    seen = Counter()
    for rank in range(3):
        for _, metas in data.ordered_loader(data.assign_shards(paths, rank, 3), batch_size=32, canvas=32):
            seen.update(m["__key__"] for m in metas)
    assert len(seen) == 230 and set(seen.values()) == {1}


def _epoch_keys(shard_dir, rank, world, epoch=0, seed=7, num_workers=2) -> list[list[str]]:
    loader = data.train_loader(shard_dir, batch_size=8, canvas=32, num_workers=num_workers, seed=seed,
                               rank=rank, world_size=world, epoch=epoch)
    batches = []
    for images, metas in loader:
        assert images.shape == (8, 1, 32, 32) and len(metas) == 8
        batches.append([m["__key__"] for m in metas])
    return batches


def test_train_loader_same_batch_count_on_every_rank_and_deterministic(shard_dir):
    world = 3
    runs = [_epoch_keys(shard_dir, r, world) for r in range(world)]
    assert [len(b) for b in runs] == [230 // (8 * world)] * world
    assert _epoch_keys(shard_dir, 1, world) == runs[1]  # same seed, epoch, rank → same batches
    assert _epoch_keys(shard_dir, 1, world, epoch=1) != runs[1]
    assert runs[0] != runs[1]


def test_train_loader_ranks_draw_from_their_own_shards(shard_dir):
    paths = fmt.shard_paths(shard_dir)  # 6 shards ≥ 2 ranks: each rank resamples its share only
    for rank in range(2):
        allowed = set(_keys_in_tar_order(data.assign_shards(paths, rank, 2)))
        keys = {k for b in _epoch_keys(shard_dir, rank, 2, num_workers=0) for k in b}
        assert keys <= allowed and len(keys) > 8


def test_train_loader_explicit_batches_and_too_small_dataset(shard_dir):
    loader = data.train_loader(shard_dir, batch_size=4, canvas=32, num_workers=0, seed=0, rank=0,
                               world_size=1, batches_per_epoch=5)
    assert sum(1 for _ in loader) == 5
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.train_loader(shard_dir, batch_size=300, canvas=32, num_workers=0, seed=0, rank=0, world_size=1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ordered_loader_pin_memory_reaches_the_batches(shard_dir, monkeypatch, num_workers):
    """GPU embedding reads pinned batches. Pinning needs CUDA, so on the CPU the
    request is checked where it is made: the images are pinned in place (no workers) or the
    DataLoader is built with pin_memory=True (workers)."""
    import webdataset as wds

    paths = fmt.shard_paths(shard_dir)[:1]
    if num_workers == 0:
        pinned = []
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(1) or self)
        n = sum(1 for _ in data.ordered_loader(paths, batch_size=16, canvas=32, pin_memory=True))
        assert pinned and len(pinned) == n
    else:
        seen = {}
        real = wds.WebLoader.__init__

        def init(self, *a, **kw):
            seen.update(kw)
            real(self, *a, **{**kw, "pin_memory": False})

        monkeypatch.setattr(wds.WebLoader, "__init__", init)
        data.ordered_loader(paths, batch_size=16, canvas=32, num_workers=num_workers, pin_memory=True)
        assert seen.get("pin_memory") is True


def test_bbox_framing_fills_the_canvas_with_the_particle_and_keeps_its_aspect():
    """A 20×10 particle on a 200×200 light field: unframed it covers ~0.5 % of a 64-px canvas;
    framed (bbox + 10 % margin) it spans the canvas along its long side, aspect 2:1 kept."""
    field = np.full((200, 200), 240, np.uint8)
    field[60:70, 120:140] = 30  # 10 rows × 20 columns, off-centre
    plain = data.decode_image(_png(field), 64)
    framed = data.decode_image(_png(field), 64, framing="bbox", margin=0.1)
    assert int((plain[0] < 128).sum()) < 0.01 * 64 * 64
    dark = framed[0] < 128
    rows, cols = dark.any(dim=1).nonzero().flatten(), dark.any(dim=0).nonzero().flatten()
    width, height = int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)
    assert 50 <= width <= 55 and abs(width / height - 2.0) < 0.15  # 64/1.2 ≈ 53 px long side
    assert abs((cols.min() + cols.max()) / 2 - 31.5) <= 1 and abs((rows.min() + rows.max()) / 2 - 31.5) <= 1
    assert framed[0, 0, 0] == 240 and framed[0, -1, -1] == 240  # margin filled with the field level
    blank = np.full((30, 30), 200, np.uint8)  # nothing to frame: decoded as without framing
    assert torch.equal(data.decode_image(_png(blank), 16, framing="bbox"), data.decode_image(_png(blank), 16))
    with pytest.raises(ValueError):
        data.decode_image(_png(blank), 16, framing="tight")


def test_loaders_pass_the_framing_on(shard_dir):
    paths = fmt.shard_paths(shard_dir)[:1]
    plain, _ = next(iter(data.ordered_loader(paths, batch_size=16, canvas=64)))
    framed, _ = next(iter(data.ordered_loader(paths, batch_size=16, canvas=64, framing="bbox")))
    def long_side(img: torch.Tensor) -> int:
        top, left, bottom, right = data.particle_bbox(img[0].numpy())
        return max(bottom - top, right - left)

    # framed, every particle spans the canvas (64 / 1.2 ≈ 53 px), larger than unframed
    assert all(long_side(f) >= 50 for f in framed)
    assert sum(long_side(f) for f in framed) > sum(long_side(p) for p in plain)
    batch, _ = next(iter(data.train_loader(shard_dir, batch_size=8, canvas=64, num_workers=0, seed=0, rank=0,
                                           world_size=1, framing="bbox")))
    assert batch.shape == (8, 1, 64, 64)


def _windows_batch(canvas: int, sides: list[int], seed: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """A batch as deferring decode workers send it (window of side n top-left, background elsewhere;
    side 0: a finished canvas) and the windows themselves."""
    rng = np.random.default_rng(seed)
    images = torch.full((len(sides), 1, canvas, canvas), data.BACKGROUND, dtype=torch.uint8)
    windows = []
    for i, n in enumerate(sides):
        a = rng.integers(0, 256, (n or canvas, n or canvas)).astype(np.uint8)
        if i % 3 == 1:
            a = (rng.integers(0, 2, a.shape) * 255).astype(np.uint8)  # binary, 2D-S-like
        images[i, 0, :a.shape[0], :a.shape[1]] = torch.from_numpy(a)
        windows.append(a)
    return images, windows


@pytest.mark.parametrize("canvas", [1, 7, 64, 224])
def test_enlarge_windows_is_the_workers_enlargement_bit_for_bit(canvas):
    """Issue 23: the batched enlargement that finishes deferred bbox windows where the batch lands
    equals the decode workers' (Pillow's) enlargement for every side up to the canvas, mixed in one
    batch with finished canvases (side 0), which it leaves untouched."""
    sides = [0, *range(1, canvas + 1), 0]
    images, windows = _windows_batch(canvas, sides, canvas)
    out = data.enlarge_windows(images.clone(), sides)
    for i, (n, a) in enumerate(zip(sides, windows)):
        want = a if n == 0 else data._enlarge_square(a, canvas)
        assert np.array_equal(out[i, 0].numpy(), want), (canvas, n)
    finished = images[:1]
    assert data.enlarge_windows(finished, [0]) is finished


@pytest.mark.parametrize("num_workers", [0, 2])
def test_deferred_enlargement_leaves_the_batches_bit_identical(shard_dir, monkeypatch, num_workers):
    """Issue 23: with the enlargement deferred to the batch's device (GPU jobs; forced here on the
    CPU) both loaders give exactly the batches of the workers enlarging, and the decode workers
    enlarge no window that has a plan (those that do not, larger than the canvas, still shrink)."""
    paths = fmt.shard_paths(shard_dir)
    common = dict(batch_size=16, canvas=64, framing="bbox")
    want = [(b, m) for b, m in data.ordered_loader(paths, num_workers=num_workers, **common)]
    got = [(b, m) for b, m in data.ordered_loader(paths, num_workers=num_workers, device="cpu",
                                                  defer_enlarge=True, **common)]
    assert len(got) == len(want) and all(torch.equal(g, w) and gm == wm for (g, gm), (w, wm) in zip(got, want))
    train = dict(batch_size=8, canvas=64, num_workers=num_workers, seed=1, rank=0, world_size=1,
                 batches_per_epoch=3, framing="bbox")
    assert all(torch.equal(g[0], w[0]) for g, w in zip(data.train_loader(shard_dir, device="cpu",
                                                                         defer_enlarge=True, **train),
                                                        data.train_loader(shard_dir, **train)))
    calls, enlarge = [], data._enlarge_square
    monkeypatch.setattr(data, "_enlarge_square", lambda a, size: calls.append(a.shape) or enlarge(a, size))
    sides = []
    for p in paths:
        for _, s in fmt.iter_samples(p, ("png", "json")):
            img, side, _ = data._sample_to_item({**s, "__key__": "k", "__url__": p}, 64, "bbox", 0.1, defer=True)
            sides.append(side)
    assert sum(n > 0 for n in sides) > len(sides) // 2 and len(calls) == sides.count(0)


def test_enlargement_is_deferred_by_default_only_off_the_cpu():
    assert data._defers("bbox", torch.device("cuda", 0), None) and data._defers("bbox", "cuda", None)
    assert not data._defers("bbox", "cpu", None) and not data._defers("bbox", None, None)
    assert not data._defers("none", "cuda", None) and not data._defers("bbox", "cuda", False)
    assert data._defers("bbox", "cpu", True)
    with pytest.raises(ValueError, match="needs the device"):
        data._defers("bbox", None, True)


@pytest.mark.gpu
def test_enlarge_windows_on_cuda_is_bit_identical_and_reads_nothing_back():
    """On the GPU the deferred enlargement gives the CPU's bytes and never syncs with the host."""
    sides = [0, *range(1, 225, 7), 224]
    images, _ = _windows_batch(224, sides, 5)
    want = data.enlarge_windows(images.clone(), sides)
    on_gpu = images.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = data.enlarge_windows(on_gpu, sides)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("override, says", [("data.framing=bbx", "data.framing must be none or bbox"),
                                            ("data.framing_margin=3", "framing_margin must be in"),
                                            ("data.canvas=0", "canvas must be >= 1")])
def test_data_config_rejects_bad_framing_and_canvas(override, says):
    """Both halves of DataConfig.validate run (a second definition once hid the framing checks)."""
    from icehpc import config as cfglib
    from icehpc.ssl.config import PretrainConfig

    with pytest.raises(ValueError, match=says):
        cfglib.load(PretrainConfig, cfglib.find_config("pretrain-tiny-cpu.yaml"), [override])


def _reference_frame(pixels: np.ndarray, margin: float) -> np.ndarray:
    """The framing as it was before issue 23 (float median over int16, full contrast image): the
    faster integer version must give the very same canvases, so trained backbones embed unchanged."""
    img = pixels.astype(np.int16)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    contrast = np.abs(img - int(np.median(border)))
    peak = int(contrast.max())
    if peak < 16:
        return pixels
    mask = contrast > peak // 2
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, left, bottom, right = int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
    side = max(1, round(max(bottom - top, right - left) * (1 + 2 * margin)))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    out = np.full((side, side), int(np.median(border)), dtype=np.uint8)
    h, w = pixels.shape
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + side), min(w, x0 + side)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = pixels[sy0:sy1, sx0:sx1]
    return out


def _framing_cases(shared: Path | None):
    rng = np.random.default_rng(7)
    for k in range(400):  # noise, flat fields with specks, either polarity, odd and even border sizes
        h, w = (int(x) for x in rng.integers(3, 60, 2))
        a = rng.integers(0, 256, (h, w)).astype(np.uint8)
        if k % 2:
            a[:] = rng.integers(0, 256)
            y, x = rng.integers(0, h), rng.integers(0, w)
            a[y:y + rng.integers(1, h + 1), x:x + rng.integers(1, w + 1)] = rng.integers(0, 256)
        yield a
    if shared is not None:
        import zipfile
        for name in ("2ds_training.zip", "pip_training.zip", "random_inspections.zip"):
            with zipfile.ZipFile(shared / name) as z:
                members = [i for i in z.infolist() if not i.is_dir()]
                for info in members[::max(1, len(members) // 150)]:
                    yield np.asarray(Image.open(io.BytesIO(z.read(info))).convert("L"))


def test_bbox_framing_is_bit_identical_to_the_reference(shard_dir, request):
    """Issue 23: the integer box search and the enlargement without Pillow change no canvas (random
    images, the synthetic shards and, when present, ~450 real OAP images of the three archives)."""
    from tests.conftest import SHARED_DATA
    shared = SHARED_DATA if SHARED_DATA.is_dir() else None
    images = list(_framing_cases(shared))
    for p in fmt.shard_paths(shard_dir):
        images += [np.asarray(Image.open(io.BytesIO(s["png"]))) for _, s in fmt.iter_samples(p, ("png",))]
    assert len(images) > 600
    for a in images:
        for margin in (0.0, 0.1):
            assert np.array_equal(data.frame_particle(a, margin), _reference_frame(a, margin))
    for a in images:
        ref = Image.fromarray(_reference_frame(a, 0.1))
        s = 224 / max(ref.size)
        ref = np.asarray(ref.resize((max(1, round(ref.width * s)), max(1, round(ref.height * s))),
                                    Image.Resampling.BILINEAR))
        got = data.decode_image(_png(a), 224, framing="bbox")[0].numpy()
        h, w = ref.shape
        top, left = (224 - h) // 2, (224 - w) // 2
        assert np.array_equal(got[top:top + h, left:left + w], ref)


@pytest.mark.parametrize("canvas", [1, 7, 64, 97, 224])
def test_enlarge_square_is_pillows_bilinear_resize_bit_for_bit(canvas):
    """Issue 23: the loader's own enlargement equals Pillow's bilinear resize for every window side
    up to the canvas, on noise, binary (2D-S-like) and extreme-valued windows."""
    rng = np.random.default_rng(canvas)
    for n in range(1, canvas + 1):
        for a in (rng.integers(0, 256, (n, n)), rng.integers(0, 2, (n, n)) * 255,
                  np.where(np.indices((n, n)).sum(0) % 2, 255, 0)):
            a = a.astype(np.uint8)
            ref = np.asarray(Image.fromarray(a).resize((canvas, canvas), Image.Resampling.BILINEAR))
            assert np.array_equal(data._enlarge_square(a, canvas), ref), (canvas, n)
    assert data._enlarge_square(np.zeros((canvas + 1, canvas + 1), np.uint8), canvas) is None  # shrinking: Pillow
    assert data._enlarge_square(np.zeros((3, 2), np.uint8), canvas) is None


def test_bbox_framing_enlarges_without_pillows_resize(shard_dir, monkeypatch):
    """Issue 23 guard: bbox framing of windows up to the canvas never falls back to Pillow's resize
    (per-pixel loops, ~2× slower); a window larger than the canvas still shrinks through it."""
    calls = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: calls.append(self.size) or resize(self, *a, **k))
    pngs = [s["png"] for p in fmt.shard_paths(shard_dir) for _, s in fmt.iter_samples(p, ("png",))]
    sides = [data.frame_particle(np.asarray(Image.open(io.BytesIO(b))), 0.1).shape for b in pngs]
    for b in pngs:
        assert data.decode_image(b, 224, framing="bbox").shape == (1, 224, 224)
    larger = [(w, h) for h, w in sides if max(h, w) > 224]
    assert len(larger) < len(pngs) // 2 and calls == larger  # only the larger windows reach Pillow
    calls.clear()
    big = np.full((300, 300), 240, np.uint8)
    big[20:280, 30:290] = 10  # a 260-px particle: its window exceeds a 224 canvas
    assert data.decode_image(_png(big), 224, framing="bbox").shape == (1, 224, 224)
    assert len(calls) == 1 and calls[0][0] > 224
