"""Loaders over the WebDataset shards written by :mod:`icehpc.data.shards`.

CPU workers only *decode* (PNG → uint8 grayscale on a fixed square canvas); augmentation runs
batched on the accelerator later, because per-sample CPU augmentation is ~200× slower. For the
same reason, when the batches go to an accelerator (``device=``) the bbox framing's enlargement of
each particle window to the canvas runs there too, batched and bit-identical
(:func:`enlarge_windows`): the workers then pay only the box search on top of framing ``none``.
Two uses:

- :func:`train_loader`: resampled shards (with replacement, seeded per rank/worker/epoch), a fixed
  number of batches per epoch that is the SAME on every rank, so no rank waits in a collective.
- :func:`ordered_loader`: every sample of the given shards exactly once (for the embedding job;
  give each rank :func:`assign_shards` of the index).

Batches are ``(images, metas)``: ``images`` a ``torch.uint8`` tensor ``[B, 1, canvas, canvas]``
(particle dark on a light background, padding 255), ``metas`` a list of the sample JSON dicts plus
``__key__`` and ``__shard__``. Large crops are shrunk to the canvas, so read physical size from
``particle_width_um`` / ``pixel_um`` / ``orig_width`` in the metadata, not from pixels.
"""
from __future__ import annotations

import functools
import io
import json
import os
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from .format import read_index, shard_paths

BACKGROUND = 255  # uint8 padding value: CPI/OAP images are dark particles on a light field

Batch = tuple[torch.Tensor, list[dict[str, Any]]]


def assign_shards(paths: list[str], rank: int, world: int) -> list[str]:
    """Shards of one rank: round-robin over the given order, so every shard goes to exactly one rank."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    return list(paths[rank::world])


FRAMINGS = ("none", "bbox")


def _border_level(pixels: np.ndarray) -> int:
    """int(median) of the border pixels (rows 0 and -1, columns 0 and -1, corners counted twice) of a
    uint8 image, by counting: the value ``int(np.median(border))`` gives, without sorting."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    cum = np.bincount(border, minlength=256).cumsum()
    m = border.size
    lo, hi = cum.searchsorted([(m - 1) // 2 + 1, m // 2 + 1])
    return (int(lo) + int(hi)) // 2


def _bbox_at(pixels: np.ndarray, level: int, min_contrast: float) -> tuple[int, int, int, int] | None:
    """:func:`particle_bbox` of a uint8 image whose border level is known, in integer arithmetic on
    row and column extremes (no contrast image): |p - level| > t  ⇔  p < level - t or p > level + t.
    Column extremes first (a reduction over rows: contiguous and vectorised), then row extremes of
    the particle's columns only, transposed so that they reduce the same way."""
    low, high = pixels.min(axis=0), pixels.max(axis=0)
    peak = max(level - int(low.min()), int(high.max()) - level)
    if peak < min_contrast:
        return None
    t = peak // 2
    cols = np.flatnonzero((low < level - t) | (high > level + t))
    left, right = int(cols[0]), int(cols[-1]) + 1
    band = np.ascontiguousarray(pixels[:, left:right].T)
    rows = np.flatnonzero((band.min(axis=0) < level - t) | (band.max(axis=0) > level + t))
    return int(rows[0]), left, int(rows[-1]) + 1, right


def particle_bbox(pixels: np.ndarray, min_contrast: float = 16.0) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) exclusive bounds of the particle in ``pixels`` uint8 [H, W], or None.

    The background level is the median of the border pixels; a pixel belongs to the particle when
    it differs from it by more than half the largest difference (the half-maximum contour, robust to
    blur and either polarity). None when the image has no contrast (nothing to frame).
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.uint8)
    return _bbox_at(pixels, _border_level(pixels), min_contrast)


def frame_particle(pixels: np.ndarray, margin: float) -> np.ndarray:
    """uint8 [S, S]: a square window centred on the particle's bounding box, side = longest box side
    × (1 + 2·margin), filled with the border median where it leaves the image. The particle then
    spans the canvas whatever its size (physical size stays in ``particle_width_um``/``pixel_um``)."""
    level = _border_level(pixels)
    box = _bbox_at(pixels, level, 16.0)
    if box is None:
        return pixels
    top, left, bottom, right = box
    side = max(1, round(max(bottom - top, right - left) * (1 + 2 * margin)))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    out = np.full((side, side), level, dtype=np.uint8)
    h, w = pixels.shape
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + side), min(w, x0 + side)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = pixels[sy0:sy1, sx0:sx1]
    return out


#: Fixed-point precision of Pillow's 8-bit resampling (its ``PRECISION_BITS``): weights are
#: integers summing to 2**22, and each pass rounds half up and stores 8 bits.
_PRECISION = 22


@functools.lru_cache(maxsize=1024)
def _bilinear_plan(n: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Pillow's bilinear weights for enlarging ``n`` samples to ``size`` (``n <= size``), as
    (input repeats, weight of the next sample): output ``i`` reads samples ``j`` and ``j + 1``,
    ``j`` non-decreasing, with integer weights ``2**22 - w`` and ``w``. The same double arithmetic as
    Pillow's coefficient set-up (centre ``(i + 0.5) · n / size``, a triangle filter of support 1,
    normalised, rounded to 22 bits). None when some output does not have that form (Pillow resizes)."""
    if not 0 < n <= size:
        return None
    centre = (np.arange(size) + 0.5) * (n / size)
    first = np.maximum(((centre - 1.0) + 0.5).astype(np.int64), 0)
    taps = np.minimum(((centre + 1.0) + 0.5).astype(np.int64), n) - first
    dist = np.abs(((first[:, None] + np.arange(3)) - centre[:, None]) + 0.5)
    w = np.where((dist < 1.0) & (np.arange(3) < taps[:, None]), 1.0 - dist, 0.0)
    total = (0.0 + w[:, 0]) + w[:, 1] + w[:, 2]  # Pillow's summation order
    fixed = (0.5 + w / np.where(total == 0.0, 1.0, total)[:, None] * (1 << _PRECISION)).astype(np.int64)
    if (fixed[:, 2] != 0).any() or (fixed[:, 0] + fixed[:, 1] != 1 << _PRECISION).any() \
            or (total == 0.0).any() or (np.diff(first) < 0).any():
        return None
    return np.bincount(first, minlength=n), fixed[:, 1:2].astype(np.int32)


def _enlarge_rows(x: np.ndarray, plan: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """uint8 [n, m] → uint8 [size, m]: one bilinear pass of Pillow along axis 0, exactly:
    ``(a·(2**22 - w) + b·w + 2**21) >> 22 = a + ((b - a)·w + 2**21) >> 22`` (the shifted term in
    -255..255, |(b - a)·w| < 2**30), vectorised over whole rows instead of per output pixel. The sum
    is formed in uint8 modulo 256, exact because the result lies in 0..255."""
    repeats, weight = plan
    step = np.zeros(x.shape, np.int32)
    np.subtract(x[1:], x[:-1], out=step[:-1], dtype=np.int32)  # the last row only ever has weight 0 for its successor
    term = np.repeat(step, repeats, axis=0)
    term *= weight
    term += 1 << (_PRECISION - 1)
    term >>= _PRECISION
    out = np.repeat(x, repeats, axis=0)
    out += term.astype(np.uint8)
    return out


def _square_plan(pixels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The :func:`_bilinear_plan` of a window: None unless it is square and has one."""
    return _bilinear_plan(pixels.shape[0], size) if pixels.shape[0] == pixels.shape[1] else None


def _enlarge_square(pixels: np.ndarray, size: int) -> np.ndarray | None:
    """``Image.fromarray(pixels).resize((size, size), BILINEAR)`` of a square uint8 [n, n] with
    ``n <= size``, bit for bit and about twice as fast (Pillow's horizontal pass, then its vertical
    pass on the 8-bit intermediate); None when there is no :func:`_bilinear_plan` (a larger or
    non-square window: the caller resizes with Pillow)."""
    plan = _square_plan(pixels, size)
    if plan is None:
        return None
    across = _enlarge_rows(np.ascontiguousarray(pixels.T), plan)  # horizontal pass, transposed
    return _enlarge_rows(np.ascontiguousarray(across.T), plan)


def decode_image(png_bytes: bytes, canvas: int, max_upscale: float = 1.0, framing: str = "none",
                 margin: float = 0.1) -> torch.Tensor:
    """PNG bytes → ``uint8 [1, canvas, canvas]``, aspect kept, centred, padded with 255.

    ``framing="none"``: crops larger than the canvas are shrunk (Pillow's antialiased bilinear) so
    their longest side fits; smaller crops are enlarged by at most ``max_upscale`` (default 1:
    never), so the pixel scale of small crops is kept. ``framing="bbox"``: the particle's bounding
    box plus ``margin`` (fraction of its longest side, each side) is cut out as a square and
    resized to the canvas, up or down (training and embedding see the particle, not the empty
    field around it; absolute size is then only in the metadata). Enlarging uses the same bilinear
    weights as Pillow, bit for bit, without Pillow (:func:`_enlarge_square`).
    """
    pixels, _ = _decode(png_bytes, canvas, framing, margin, max_upscale)
    return torch.from_numpy(pixels)


def _decode(png_bytes: bytes, canvas: int, framing: str, margin: float, max_upscale: float = 1.0,
            defer: bool = False) -> tuple[np.ndarray, int]:
    """(uint8 [1, canvas, canvas], side): :func:`decode_image`'s canvas and side 0, or with ``defer``
    a bbox window of side n that still has to be enlarged, in the canvas's top-left n × n corner
    (the rest background) and side n, for :func:`enlarge_windows` to finish where the batch lands."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    with Image.open(io.BytesIO(png_bytes), formats=("PNG",)) as im:
        im = im.convert("L") if im.mode != "L" else im
        if framing == "bbox":
            framed = frame_particle(np.frombuffer(im.tobytes(), np.uint8).reshape(im.height, im.width), margin)
            if defer and _square_plan(framed, canvas) is not None:
                n = framed.shape[0]
                out = np.full((1, canvas, canvas), BACKGROUND, dtype=np.uint8)
                out[0, :n, :n] = framed
                return out, n
            enlarged = _enlarge_square(framed, canvas)
            if enlarged is not None:
                return enlarged[None], 0
            im = Image.fromarray(framed)
            max_upscale = float("inf")
        w, h = im.size
        scale = min(canvas / max(w, h), max_upscale)
        if scale != 1.0:
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        pixels = np.frombuffer(im.tobytes(), np.uint8).reshape(h, w)
    out = np.full((1, canvas, canvas), BACKGROUND, dtype=np.uint8)
    top, left = (canvas - h) // 2, (canvas - w) // 2
    out[0, top:top + h, left:left + w] = pixels
    return out, 0


@functools.lru_cache(maxsize=1024)
def _taps(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_bilinear_plan` per output sample: (first input sample int64 [size], weight of the
    next one int32 [size])."""
    repeats, weight = _bilinear_plan(n, size)
    return np.repeat(np.arange(n), repeats), weight[:, 0]


def _enlarge_lead(x: torch.Tensor, first: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`_enlarge_rows` along axis 1 of uint8 [R, N, M], one plan per leading index (``first``,
    ``weight``: [R, S]) → uint8 [R, S, M], in int32 on any device, gathering whole rows. A next row
    past the window has weight 0, so what lies there never counts; past the canvas it is clamped."""
    r, n, m = x.shape
    base = torch.arange(r, device=x.device)[:, None] * n
    a = x.reshape(r * n, m).to(torch.int32)
    lo = a.index_select(0, (first + base).flatten()).view(r, -1, m)
    hi = a.index_select(0, ((first + 1).clamp(max=n - 1) + base).flatten()).view(r, -1, m)
    hi -= lo
    hi *= weight[:, :, None]
    hi += 1 << (_PRECISION - 1)
    hi.bitwise_right_shift_(_PRECISION)
    hi += lo
    return hi.to(torch.uint8)


def enlarge_windows(images: torch.Tensor, sides: list[int]) -> torch.Tensor:
    """Finish a batch decoded with deferred enlargement, on the batch's device: ``images`` uint8
    [B, 1, C, C] where ``sides[i] = n > 0`` marks an n × n bbox window in image i's top-left corner.
    Each such window is enlarged to C × C in place, batched, with integer arithmetic bit-identical to
    the decode workers' :func:`_enlarge_square` (and Pillow); images of side 0 are left as they are.
    Only host data steers it: no device value is read back (no host sync on a GPU)."""
    rows = [i for i, n in enumerate(sides) if n]
    if not rows:
        return images
    size = images.shape[-1]
    taps = [_taps(sides[i], size) for i in rows]
    first = torch.from_numpy(np.stack([t[0] for t in taps])).to(images.device, non_blocking=True)
    weight = torch.from_numpy(np.stack([t[1] for t in taps])).to(images.device, non_blocking=True)
    sel = torch.tensor(rows).to(images.device, non_blocking=True)
    m = max(sides[i] for i in rows)  # nothing past the largest window is read
    columns = images[sel, 0, :m, :m].transpose(1, 2).contiguous()  # [R, column, row]
    across = _enlarge_lead(columns, first, weight)  # the horizontal pass, as Pillow does first
    images[sel, 0] = _enlarge_lead(across.transpose(1, 2).contiguous(), first, weight)
    return images


def _sample_to_item(sample: dict, canvas: int, framing: str = "none", margin: float = 0.1,
                    defer: bool = False) -> tuple[torch.Tensor, int, dict]:
    meta = json.loads(sample["json"])
    meta["__key__"] = sample["__key__"]
    meta["__shard__"] = os.path.basename(sample["__url__"])
    pixels, side = _decode(sample["png"], canvas, framing, margin, defer=defer)
    return torch.from_numpy(pixels), side, meta


def _collate(items: list[tuple[torch.Tensor, int, dict]]) -> tuple[torch.Tensor, list[int], list[dict]]:
    return torch.stack([img for img, _, _ in items]), [side for _, side, _ in items], [m for _, _, m in items]


class _Landed:
    """The loader's batches as ``(images, metas)``: images pinned here when ``pin`` (no DataLoader
    worker pinned them), moved to ``device`` (None: left on the host), every deferred window enlarged."""

    def __init__(self, batches: Iterable, device: torch.device | None, pin: bool) -> None:
        self.batches, self.device, self.pin = batches, device, pin

    def __iter__(self) -> Iterator[Batch]:
        for images, sides, metas in self.batches:
            if self.pin:
                images = images.pin_memory()
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
            yield enlarge_windows(images, sides), metas


def _on_accelerator(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type != "cpu"


def _defers(framing: str, device: torch.device | str | None, defer_enlarge: bool | None) -> bool:
    """Whether the decode workers leave bbox windows for :func:`enlarge_windows` on the batch's
    device: by default when that device is an accelerator (the workers' cost then is that of framing
    none plus the box search), never on the CPU, where the workers are the cheaper place."""
    if defer_enlarge and device is None:
        raise ValueError("defer_enlarge needs the device the batches go to")
    if defer_enlarge is None:
        defer_enlarge = _on_accelerator(device)
    return framing == "bbox" and defer_enlarge


def _worker_seed(rank: int) -> int:
    """Per (rank, DataLoader worker) seed; explicit rank so the loader never guesses it from env."""
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


class _SeededShuffle:
    """Sample shuffle buffer whose RNG depends on (seed, epoch, rank, worker): reproducible runs."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{self.epoch}/{_worker_seed(self.rank)}")
        return wds.shuffle(self.bufsize, min(self.bufsize, 100), rng=rng)(src)


def train_loader(shard_dir: str | os.PathLike, *, batch_size: int, canvas: int, num_workers: int,
                 seed: int, rank: int, world_size: int, epoch: int = 0,
                 batches_per_epoch: int | None = None, shuffle_buffer: int = 2000, framing: str = "none",
                 margin: float = 0.1, pin_memory: bool | None = None, device: torch.device | str | None = None,
                 defer_enlarge: bool | None = None) -> Iterable[Batch]:
    """Training batches from an infinite resampled stream, exactly ``batches_per_epoch`` of them.

    Build one loader per epoch and iterate it once: ``epoch`` (with ``seed``) decides the draw.

    Each rank resamples (with replacement) from its own share of the shards (all shards when there
    are fewer shards than ranks); each DataLoader worker draws with its own seed derived from
    (seed, epoch, rank, worker). Default ``batches_per_epoch`` = total samples // (batch_size ×
    world_size), identical on all ranks. Deterministic for a given (seed, epoch, rank, world_size,
    num_workers). ``pin_memory``, ``device``, ``defer_enlarge``: as in :func:`ordered_loader`.
    """
    index = read_index(shard_dir)
    urls = shard_paths(shard_dir)
    if not urls:
        raise ValueError(f"{shard_dir}: index lists no non-empty shard")
    if batches_per_epoch is None:
        batches_per_epoch = index["totals"]["written"] // (batch_size * world_size)
    if batches_per_epoch < 1:
        raise ValueError(f"{shard_dir}: {index['totals']['written']} samples are fewer than one batch of "
                         f"{batch_size} per rank × {world_size} ranks; lower batch_size or pass batches_per_epoch")
    mine = assign_shards(urls, rank, world_size) if len(urls) >= world_size else urls
    dataset = wds.DataPipeline(
        wds.ResampledShards(mine, seed=wds.utils.make_seed(seed, epoch), deterministic=True,
                            worker_seed=functools.partial(_worker_seed, rank)),
        wds.tarfile_to_samples(),
        _SeededShuffle(shuffle_buffer, seed, epoch, rank),
        wds.map(functools.partial(_sample_to_item, canvas=canvas, framing=framing, margin=margin,
                                  defer=_defers(framing, device, defer_enlarge))),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    pin = _on_accelerator(device) if pin_memory is None else pin_memory
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers,
                           prefetch_factor=4 if num_workers else None, pin_memory=pin)
    return _Landed(loader.with_epoch(batches_per_epoch), device, pin=False)


def ordered_loader(paths: list[str], *, batch_size: int, canvas: int, num_workers: int = 0,
                   framing: str = "none", margin: float = 0.1, pin_memory: bool | None = None,
                   device: torch.device | str | None = None, defer_enlarge: bool | None = None) -> Iterable[Batch]:
    """Every sample of ``paths`` exactly once, batches never mixing shards of different workers.

    ``pin_memory`` (default: when ``device`` is not the CPU): image batches are pinned in host
    memory, so that the copy to the device is a real asynchronous one (the loader's pinning thread
    with workers, in place here without). ``device``: where the images of each batch arrive (None:
    stay on the host).
    ``defer_enlarge`` (default: when ``device`` is not the CPU): with bbox framing the decode workers
    send each particle's window un-enlarged and :func:`enlarge_windows` enlarges the batch on
    ``device``, bit-identical, so a GPU job's workers pay only the box search on top of framing none.

    With ``num_workers <= 1`` the order is exactly shard order, then sample order. With more
    workers shard ``i`` goes to worker ``i % num_workers`` and batches arrive worker-interleaved
    (still deterministic); use ``__shard__``/``__key__`` in the metas, not position, to join results.
    """
    dataset = wds.DataPipeline(
        wds.SimpleShardList(list(paths)),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(functools.partial(_sample_to_item, canvas=canvas, framing=framing, margin=margin,
                                  defer=_defers(framing, device, defer_enlarge))),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    pin = _on_accelerator(device) if pin_memory is None else pin_memory
    if num_workers == 0:
        return _Landed(dataset, device, pin=pin)
    return _Landed(wds.WebLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                                 pin_memory=pin), device, pin=False)


