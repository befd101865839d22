"""What the crops and masks of pretraining see: particle share per crop and background share of
masked patches, for each framing and masking recipe.

The particle of every decoded canvas is found as in :func:`icehpc.data.loader.particle_bbox`'s
half-maximum contour; the same crop geometry and masks as training (``MultiCrop`` with photometric
ops off) are applied to that binary mask, so a crop's mean is its particle pixel fraction.

    python bench/framing.py SHARDS [--config configs/pretrain-oap-cpu.yaml] [--n 512]
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch


def particle_masks(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1, C, C] canvases → uint8 {0, 255} particle masks (half-maximum contrast to the border)."""
    out = torch.zeros_like(images)
    for i, img in enumerate(images[:, 0].numpy().astype(np.int16)):
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        contrast = np.abs(img - int(np.median(border)))
        if contrast.max() >= 16:
            out[i, 0] = torch.from_numpy(((contrast > contrast.max() // 2) * 255).astype(np.uint8))
    return out


def measure(shards: str, cfg, framing: str, mask_prob: float, min_block: int, n: int) -> dict:
    from icehpc.data.loader import ordered_loader, shard_paths
    from icehpc.ssl.augment import MultiCrop

    images = []
    for batch, _ in ordered_loader(shard_paths(shards), batch_size=256, canvas=cfg.data.canvas, framing=framing,
                                   margin=cfg.data.framing_margin):
        images.append(batch)
        if sum(len(b) for b in images) >= n:
            break
    masks = particle_masks(torch.cat(images)[:n])
    aug = dataclasses.replace(cfg.augment, jitter_p=0.0, blur_p=[0.0, 0.0, 0.0], solarize_p=[0.0, 0.0, 0.0],
                              mean=0.0, std=1.0, mask_prob=mask_prob, mask_min_patches=min_block)
    patch = int(cfg.model.arch_kwargs.get("patch_size", 16))
    crops = MultiCrop(aug, patch)(masks, torch.Generator().manual_seed(0))
    g_frac = crops.globals_.mean(dim=(1, 2, 3))
    l_frac = crops.locals_.mean(dim=(1, 2, 3))
    grid = aug.global_size // patch
    per_patch = torch.nn.functional.avg_pool2d(crops.globals_, patch).flatten(1)  # [2B, grid²]
    masked = crops.masks
    return {"framing": framing, "mask_prob": mask_prob, "mask_min_patches_14x14": min_block, "grid": grid,
            "canvas_particle_fraction_median": float((masks.float() / 255).mean(dim=(1, 2, 3)).median()),
            "global_crops_under_0.5pct": float((g_frac < 0.005).float().mean()),
            "local_crops_under_0.5pct": float((l_frac < 0.005).float().mean()),
            "views_masked": float(masked.any(1).float().mean()),
            "masked_patches_pure_background": float((per_patch[masked] == 0).float().mean()),
            "masked_patch_fraction": float(masked.float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards")
    ap.add_argument("--config", default="configs/pretrain-oap-cpu.yaml")
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    from icehpc import config as cfglib
    from icehpc.ssl.config import PretrainConfig

    cfg = cfglib.load(PretrainConfig, args.config, [])
    old_scaled = 4 * 196 // ((cfg.augment.global_size // int(cfg.model.arch_kwargs.get("patch_size", 16))) ** 2)
    rows = [measure(args.shards, cfg, "none", 1.0, old_scaled, args.n),   # before: no framing, every view masked, 4-patch blocks
            measure(args.shards, cfg, "bbox", 1.0, old_scaled, args.n),
            measure(args.shards, cfg, "bbox", cfg.augment.mask_prob, cfg.augment.mask_min_patches, args.n)]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
