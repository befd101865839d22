"""Batched multi-crop augmentation and iBOT block masks, on whatever device the batch lives on.

Per-image augmentation in CPU workers tops out far below a ViT step (torchvision multi-crop on 16
CPU processes: ~130 img/s), so the loader only decodes and everything here runs as a handful of
batched tensor ops: one ``affine_grid``/``grid_sample`` per view (random resized crop + flips), a
grouped separable convolution (per-sample Gaussian blur), elementwise jitter and solarisation.
Every random parameter is drawn per sample from an explicit CPU ``torch.Generator`` and moved to
the device, so a given seed gives the same crops on CPU and GPU and resume stays exact.

CPI-specific choices (no colour, arbitrary particle orientation): no saturation/hue jitter, random
horizontal AND vertical flips, an aspect-ratio range narrower than ImageNet's 3/4–4/3 so particle
shape (a habit cue) is distorted less.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AugmentConfig


@dataclass
class Crops:
    """One augmented batch. Views are stacked view-major: rows [v*B:(v+1)*B] are view v.

    globals_: [2B, 1, G, G] float, normalised; teacher and student both see these.
    locals_:  [nB, 1, L, L] float, normalised (n = n_local; empty when n = 0).
    masks:    [2B, Hp*Wp] bool, True = patch replaced by the mask token in the student.
    mask_index: [#masked] long, flat positions of the True entries of ``masks`` (row-major), built
        on the host so that selecting the masked patches needs no device→host read.
    """

    globals_: torch.Tensor
    locals_: torch.Tensor
    masks: torch.Tensor
    mask_index: torch.Tensor | None = None


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU-drawn parameter tensor to ``device``: through pinned memory and non_blocking on CUDA
    (a pageable host→device copy blocks the host until the stream has drained)."""
    if dtype is not None:
        t = t.to(dtype)
    if torch.device(device).type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pack_to_device(tensors: list[torch.Tensor], device: torch.device | str,
                   pack: bool | None = None) -> list[torch.Tensor]:
    """Many small CPU tensors (any dtypes and shapes) to ``device`` in ONE host→device copy: their
    bytes go into one pinned uint8 buffer (8-byte aligned slots), copied non_blocking, and each is
    a view of the device buffer. ``pack``: default on CUDA only (elsewhere plain .to)."""
    if pack is None:
        pack = torch.device(device).type == "cuda"
    if not pack:
        return [t.to(device) for t in tensors]
    slots, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        slots.append((off, n))
        off += -(-n // 8) * 8
    pin = torch.device(device).type == "cuda"
    host = torch.empty(max(off, 8), dtype=torch.uint8, pin_memory=pin)
    for (o, n), t in zip(slots, tensors):
        if n:
            host[o:o + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    dev = host.to(device, non_blocking=pin)
    return [dev[o:o + n].view(t.dtype).reshape(t.shape) for (o, n), t in zip(slots, tensors)]


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _bernoulli(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def crop_theta(gen: torch.Generator, n: int, scale: list[float], aspect: list[float],
               hflip_p: float, vflip_p: float) -> torch.Tensor:
    """Per-sample affine matrices [n, 2, 3] for a random resized crop with flips.

    In ``affine_grid``'s normalised coordinates the image spans [-1, 1]; a crop of width fraction
    w covers [cx - w, cx + w], so w and h are also the diagonal scales. The crop always lies inside
    the image (w, h <= 1 and |c| <= 1 - size), so no padding value is ever sampled.
    """
    area = _uniform(gen, n, scale[0], scale[1])
    log_ratio = _uniform(gen, n, math.log(aspect[0]), math.log(aspect[1]))
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=gen) - 1) * (1 - w)
    cy = (2 * torch.rand(n, generator=gen) - 1) * (1 - h)
    fx = torch.where(_bernoulli(gen, n, hflip_p), -1.0, 1.0)
    fy = torch.where(_bernoulli(gen, n, vflip_p), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * fx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h * fy
    theta[:, 1, 2] = cy
    return theta


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor,
                  sigma_host: torch.Tensor | None = None) -> torch.Tensor:
    """Blur each image of ``x`` [B, 1, H, W] with its own sigma [B] (pixels) where ``apply`` [B].

    One grouped separable convolution for the whole batch; rows that are not blurred get a delta
    kernel. The kernel radius is fixed by the largest sigma (3 sigma), reflect padding.
    """
    b, c, hgt, wid = x.shape
    # sigma on the CPU (drawn there): its max sets the radius without a device read
    radius = max(1, math.ceil(3 * float((sigma_host if sigma_host is not None else sigma).max())))
    radius = min(radius, hgt - 1, wid - 1)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sig = to_device(sigma, x.device, x.dtype).clamp(min=1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / sig) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(x.dtype)[None, :].expand_as(kernel)
    kernel = torch.where(to_device(apply, x.device)[:, None], kernel, delta)  # [B, k]
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    y = x.reshape(1, b * c, hgt, wid)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    return y.reshape(b, c, hgt, wid)


def draw_blocks(gen: torch.Generator, n: int, grid: tuple[int, int], ratio: list[float], min_patches: int,
                aspect: list[float], candidates: int) -> tuple[torch.Tensor, ...]:
    """The random draws of :func:`block_masks`, on the CPU from ``gen``: per image the target patch
    count [n], and per candidate rectangle its top, left, height and width [n, candidates]."""
    gh, gw = grid
    target = torch.round(_uniform(gen, n, ratio[0], ratio[1]) * gh * gw).clamp(min=1)
    max_area = torch.maximum(target / 2, torch.full_like(target, float(min_patches)))
    area = min_patches + (max_area[:, None] - min_patches) * torch.rand(n, candidates, generator=gen)
    log_ar = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * torch.rand(
        n, candidates, generator=gen)
    bh = torch.round(torch.sqrt(area * torch.exp(log_ar))).clamp(1, gh)
    bw = torch.round(torch.sqrt(area / torch.exp(log_ar))).clamp(1, gw)
    top = torch.floor(torch.rand(n, candidates, generator=gen) * (gh - bh + 1))
    left = torch.floor(torch.rand(n, candidates, generator=gen) * (gw - bw + 1))
    return target, top, left, bh, bw


def block_masks(gen: torch.Generator, n: int, grid: tuple[int, int], ratio: list[float],
                min_patches: int, aspect: list[float], candidates: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """BEiT-style block masks [n, gh, gw] bool, vectorised over images and blocks.

    BEiT adds random rectangles one at a time until the target patch count is reached (a Python
    loop per image). Here every image draws ``candidates`` rectangles at once; the union of the
    first t rectangles covers a patch iff the FIRST rectangle covering it has index <= t, so that
    index per patch (T where none) gives every prefix union at once: its per-image histogram, cumulated, is the masked count of each prefix. Each image keeps
    the prefix whose count is closest to its target ratio drawn from ``ratio`` (ties: the shortest
    prefix). Rectangles have areas up to half the target, so the result lands within ~1/4 of the
    target count and masks stay blocky. The [n, T] parameters are drawn from ``gen`` on the CPU;
    the geometry is built on ``device``, as bit sets (:func:`_first_cover`), never as an
    [n, T, gh, gw] tensor (a ``cummax`` over that gave the same masks at ~20x the host time).
    """
    gh, gw = grid
    total = gh * gw
    target, top, left, bh, bw = draw_blocks(gen, n, grid, ratio, min_patches, aspect, candidates)
    target, top, left, bh, bw = (to_device(t, device) for t in (target, top, left, bh, bw))
    first = _first_cover(top.long(), bh.long(), left.long(), bw.long(), gh, gw)  # [n, gh*gw]
    hist = torch.zeros(n, candidates + 1, device=device).scatter_add_(
        1, first, torch.ones(n, total, device=device))
    counts = hist.cumsum(1)[:, :candidates]  # [n, T]: masked patches of each prefix union
    best = torch.argmin((counts - target[:, None]).abs(), dim=1)
    return (first <= best[:, None]).reshape(n, gh, gw)


_WORD = 62  # candidates per int64 bit set (distinct powers of two below 2^62 sum without overflow)


def _first_cover(top: torch.Tensor, bh: torch.Tensor, left: torch.Tensor, bw: torch.Tensor,
                 gh: int, gw: int) -> torch.Tensor:
    """Index of the first rectangle covering each patch, T where none: [n, gh*gw] long.

    Rectangles [n, T] (long: top row, height, left column, width). Rectangle t covers patch
    (r, c) iff it spans row r and column c, so with candidates as the bits of an integer the set
    covering (r, c) is ``rowbits[r] & colbits[c]``. ``rowbits`` is the running sum of a difference
    array (+2^t at row top, -2^t at row top + height: one scatter_add over [n, 2T], then a cumsum
    over gh rows), so nothing of size [n, T, gh, gw] or even [n, T, gh] is ever built; the first
    covering rectangle is the lowest set bit (``x & -x`` is a power of two; its float64 exponent
    is the bit index, exactly).
    """
    n, t_all = top.shape
    device = top.device
    first = torch.full((n, gh * gw), t_all, dtype=torch.long, device=device)
    for w0 in range(t_all - 1 - (t_all - 1) % _WORD, -1, -_WORD):  # last word first: lower words win
        w1 = min(t_all, w0 + _WORD)
        bit = torch.ones((), dtype=torch.long, device=device) << torch.arange(w1 - w0, device=device)
        bit = bit.expand(n, -1)

        def spans(start: torch.Tensor, size: torch.Tensor, length: int) -> torch.Tensor:
            diff = torch.zeros(n, length + 1, dtype=torch.long, device=device)
            diff.scatter_add_(1, start[:, w0:w1], bit).scatter_add_(1, (start + size)[:, w0:w1], -bit)
            return diff[:, :length].cumsum(1)  # [n, length]: bit t set where rectangle t spans

        x = (spans(top, bh, gh)[:, :, None] & spans(left, bw, gw)[:, None, :]).reshape(n, gh * gw)
        low = ((x & -x).double().view(torch.long) >> 52) - 1023 + w0  # exponent of the lowest bit
        first = torch.where(x != 0, low, first)
    return first


class MultiCrop:
    """Turns a uint8 batch [B, 1, C, C] (light background, dark particles) into :class:`Crops`."""

    def __init__(self, cfg: AugmentConfig, patch_size: int) -> None:
        self.cfg = cfg
        self.patch_size = patch_size
        if cfg.global_size % patch_size:
            raise ValueError(f"augment.global_size={cfg.global_size} is not a multiple of the patch size {patch_size}")

    def _draw(self, gen: torch.Generator, b: int, scale: list[float], blur_p: float,
              solarize_p: float) -> list[torch.Tensor]:
        """One view's random parameters on the CPU: theta, brightness, contrast, sigma, blur, solar."""
        cfg = self.cfg
        theta = crop_theta(gen, b, scale, cfg.aspect_ratio, cfg.hflip_p, cfg.vflip_p)
        jitter = _bernoulli(gen, b, cfg.jitter_p)
        bright = torch.where(jitter, _uniform(gen, b, 1 - cfg.brightness, 1 + cfg.brightness), 1.0)
        contr = torch.where(jitter, _uniform(gen, b, 1 - cfg.contrast, 1 + cfg.contrast), 1.0)
        sigma = _uniform(gen, b, cfg.blur_sigma[0], cfg.blur_sigma[1])
        blur = _bernoulli(gen, b, blur_p)
        solar = _bernoulli(gen, b, solarize_p)
        return [theta, bright, contr, sigma, blur, solar]

    def host_params(self, b: int, gen: torch.Generator) -> tuple[list, list[list[torch.Tensor]],
                                                                  torch.Tensor, torch.Tensor]:
        """The host-side part of a step, on the CPU: (view specs, per-view parameters, masks
        [2b, Hp*Wp] bool, flat masked-patch index). ``bench/augment.py`` times it (+ packing)."""
        cfg = self.cfg
        # every random parameter of the step is drawn on the CPU first (same draw order as one view
        # at a time), then ALL go to the device in one pinned copy (pack_to_device)
        specs = [(cfg.global_size, cfg.global_scale, cfg.blur_p[i], cfg.solarize_p[i]) for i in range(2)]
        specs += [(cfg.local_size, cfg.local_scale, cfg.blur_p[2], cfg.solarize_p[2])] * cfg.n_local
        host = [self._draw(gen, b, scale, bp, sp) for _, scale, bp, sp in specs]
        grid = (cfg.global_size // self.patch_size,) * 2
        # masks are built on the host (their parameters are drawn there anyway): the masked-patch
        # count and positions are then known without reading the device (GPU boolean indexing syncs)
        masks = block_masks(gen, 2 * b, grid, cfg.mask_ratio, scaled_min_block(cfg.mask_min_patches, grid),
                            cfg.mask_aspect, cfg.mask_candidates, device="cpu")
        masked_view = _bernoulli(gen, 2 * b, cfg.mask_prob)  # iBOT: half the views unmasked
        masks = (masks & masked_view[:, None, None]).flatten(1)
        index = masks.flatten().nonzero().squeeze(1)
        return specs, host, masks, index

    def _view(self, x: torch.Tensor, size: int, host: list[torch.Tensor],
              dev: list[torch.Tensor]) -> torch.Tensor:
        """One view from its parameters (``host`` on the CPU, ``dev`` the same on x's device)."""
        cfg = self.cfg
        b = x.shape[0]
        theta, bright, contr, sigma, blur, solar = dev
        grid = F.affine_grid(theta.to(x.dtype), [b, 1, size, size], align_corners=False)
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        v = (v * bright.to(v.dtype)[:, None, None, None]).clamp(0, 1)
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        v = ((v - mean) * contr.to(v.dtype)[:, None, None, None] + mean).clamp(0, 1)
        if bool(host[4].any()):  # CPU tensor: no device read
            v = gaussian_blur(v, sigma, blur, sigma_host=host[3])
        v = torch.where(solar[:, None, None, None] & (v >= 0.5), 1 - v, v)
        return (v - cfg.mean) / cfg.std

    def __call__(self, images: torch.Tensor, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Crops:
        """Augment ``images`` (uint8 [B, 1, C, C], any device) with randomness from ``gen`` (CPU)."""
        cfg = self.cfg
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected uint8 [B, 1, C, C] images, got {images.dtype} {list(images.shape)}")
        x = images.to(dtype) / 255.0
        b = x.shape[0]
        specs, host, masks, index = self.host_params(b, gen)
        flat = pack_to_device([t for view in host for t in view] + [masks, index], images.device)
        dev = [flat[6 * i:6 * i + 6] for i in range(len(specs))]
        views = [self._view(x, size, h, d) for (size, *_), h, d in zip(specs, host, dev)]
        globals_ = torch.cat(views[:2])
        locals_ = (torch.cat(views[2:]) if cfg.n_local
                   else x.new_zeros(0, 1, cfg.local_size, cfg.local_size))
        return Crops(globals_=globals_, locals_=locals_, masks=flat[-2], mask_index=flat[-1])


def scaled_min_block(min_patches_14: int, grid: tuple[int, int]) -> int:
    """iBOT's smallest block (given for a 14×14 patch grid) scaled to ``grid``'s area, at least 1:
    16 patches on 14×14 (ViT-S/16 at 224 px) cover the same image fraction as 5 on 8×8."""
    return max(1, round(min_patches_14 * grid[0] * grid[1] / 196))
