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
    """

    globals_: torch.Tensor
    locals_: torch.Tensor
    masks: torch.Tensor


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


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` [B, 1, H, W] with its own sigma [B] (pixels) where ``apply`` [B].

    One grouped separable convolution for the whole batch; rows that are not blurred get a delta
    kernel. The kernel radius is fixed by the largest sigma (3 sigma), reflect padding.
    """
    b, c, hgt, wid = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, hgt - 1, wid - 1)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(x.device, x.dtype).clamp(min=1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / sig) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(x.dtype)[None, :].expand_as(kernel)
    kernel = torch.where(apply.to(x.device)[:, None], kernel, delta)  # [B, k]
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    y = x.reshape(1, b * c, hgt, wid)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    return y.reshape(b, c, hgt, wid)


def block_masks(gen: torch.Generator, n: int, grid: tuple[int, int], ratio: list[float],
                min_patches: int, aspect: list[float], candidates: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """BEiT-style block masks [n, gh, gw] bool, vectorised over images and blocks.

    BEiT adds random rectangles one at a time until the target patch count is reached (a Python
    loop per image). Here every image draws ``candidates`` rectangles at once; the running union
    over rectangles is a ``cummax`` and each image keeps the prefix whose masked count is closest to
    its target ratio drawn from ``ratio``. Rectangles have areas up to half the target, so the
    result lands within ~1/4 of the target count and masks stay blocky. The [n, T] parameters are
    drawn from ``gen`` on the CPU; the [n, T, gh, gw] geometry is built on ``device``.
    """
    gh, gw = grid
    total = gh * gw
    target = torch.round(_uniform(gen, n, ratio[0], ratio[1]) * total).clamp(min=1)
    max_area = torch.maximum(target / 2, torch.full_like(target, float(min_patches)))
    area = min_patches + (max_area[:, None] - min_patches) * torch.rand(n, candidates, generator=gen)
    log_ar = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * torch.rand(
        n, candidates, generator=gen)
    bh = torch.round(torch.sqrt(area * torch.exp(log_ar))).clamp(1, gh)
    bw = torch.round(torch.sqrt(area / torch.exp(log_ar))).clamp(1, gw)
    top = torch.floor(torch.rand(n, candidates, generator=gen) * (gh - bh + 1))
    left = torch.floor(torch.rand(n, candidates, generator=gen) * (gw - bw + 1))
    target, top, left, bh, bw = (t.to(device) for t in (target, top, left, bh, bw))
    rows = torch.arange(gh, dtype=torch.float32, device=device)[None, None, :, None]
    cols = torch.arange(gw, dtype=torch.float32, device=device)[None, None, None, :]
    inside = ((rows >= top[..., None, None]) & (rows < (top + bh)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + bw)[..., None, None]))
    union = torch.cummax(inside.to(torch.uint8), dim=1).values  # [n, T, gh, gw]
    counts = union.flatten(2).sum(-1).float()  # [n, T]
    best = torch.argmin((counts - target[:, None]).abs(), dim=1)
    return union[torch.arange(n, device=device), best].bool()


class MultiCrop:
    """Turns a uint8 batch [B, 1, C, C] (light background, dark particles) into :class:`Crops`."""

    def __init__(self, cfg: AugmentConfig, patch_size: int) -> None:
        self.cfg = cfg
        self.patch_size = patch_size
        if cfg.global_size % patch_size:
            raise ValueError(f"augment.global_size={cfg.global_size} is not a multiple of the patch size {patch_size}")

    def _view(self, x: torch.Tensor, gen: torch.Generator, size: int, scale: list[float],
              blur_p: float, solarize_p: float) -> torch.Tensor:
        cfg = self.cfg
        b = x.shape[0]
        theta = crop_theta(gen, b, scale, cfg.aspect_ratio, cfg.hflip_p, cfg.vflip_p).to(x.device, x.dtype)
        grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        jitter = _bernoulli(gen, b, cfg.jitter_p)
        bright = torch.where(jitter, _uniform(gen, b, 1 - cfg.brightness, 1 + cfg.brightness), 1.0)
        contr = torch.where(jitter, _uniform(gen, b, 1 - cfg.contrast, 1 + cfg.contrast), 1.0)
        v = (v * bright.to(v)[:, None, None, None]).clamp(0, 1)
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        v = ((v - mean) * contr.to(v)[:, None, None, None] + mean).clamp(0, 1)

        sigma = _uniform(gen, b, cfg.blur_sigma[0], cfg.blur_sigma[1])
        blur = _bernoulli(gen, b, blur_p)
        if bool(blur.any()):
            v = gaussian_blur(v, sigma, blur)

        solar = _bernoulli(gen, b, solarize_p).to(v.device)[:, None, None, None]
        v = torch.where(solar & (v >= 0.5), 1 - v, v)
        return (v - cfg.mean) / cfg.std

    def __call__(self, images: torch.Tensor, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Crops:
        """Augment ``images`` (uint8 [B, 1, C, C], any device) with randomness from ``gen`` (CPU)."""
        cfg = self.cfg
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected uint8 [B, 1, C, C] images, got {images.dtype} {list(images.shape)}")
        x = images.to(dtype) / 255.0
        b = x.shape[0]
        globals_ = torch.cat([
            self._view(x, gen, cfg.global_size, cfg.global_scale, cfg.blur_p[i], cfg.solarize_p[i])
            for i in range(2)])
        if cfg.n_local:
            locals_ = torch.cat([
                self._view(x, gen, cfg.local_size, cfg.local_scale, cfg.blur_p[2], cfg.solarize_p[2])
                for _ in range(cfg.n_local)])
        else:
            locals_ = x.new_zeros(0, 1, cfg.local_size, cfg.local_size)
        grid = (cfg.global_size // self.patch_size,) * 2
        masks = block_masks(gen, 2 * b, grid, cfg.mask_ratio, scaled_min_block(cfg.mask_min_patches, grid),
                            cfg.mask_aspect, cfg.mask_candidates, device=images.device)
        masked_view = _bernoulli(gen, 2 * b, cfg.mask_prob).to(images.device)  # iBOT: half the views unmasked
        masks = masks & masked_view[:, None, None]
        return Crops(globals_=globals_, locals_=locals_, masks=masks.flatten(1))


def scaled_min_block(min_patches_14: int, grid: tuple[int, int]) -> int:
    """iBOT's smallest block (given for a 14×14 patch grid) scaled to ``grid``'s area, at least 1:
    16 patches on 14×14 (ViT-S/16 at 224 px) cover the same image fraction as 5 on 8×8."""
    return max(1, round(min_patches_14 * grid[0] * grid[1] / 196))
