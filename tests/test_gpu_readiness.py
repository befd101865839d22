"""Issue 22: what the first GPU run would have mis-measured or stalled on, checked on the CPU."""
from __future__ import annotations

import math

import pytest
import torch

from icehpc.ssl.augment import block_masks


def _block_masks_cummax(gen, n, grid, ratio, min_patches, aspect, candidates):
    """The previous implementation (running union as a cummax over [n, T, gh, gw]): the reference."""
    gh, gw = grid
    total = gh * gw
    target = torch.round((ratio[0] + (ratio[1] - ratio[0]) * torch.rand(n, generator=gen)) * total).clamp(min=1)
    max_area = torch.maximum(target / 2, torch.full_like(target, float(min_patches)))
    area = min_patches + (max_area[:, None] - min_patches) * torch.rand(n, candidates, generator=gen)
    log_ar = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * torch.rand(
        n, candidates, generator=gen)
    bh = torch.round(torch.sqrt(area * torch.exp(log_ar))).clamp(1, gh)
    bw = torch.round(torch.sqrt(area / torch.exp(log_ar))).clamp(1, gw)
    top = torch.floor(torch.rand(n, candidates, generator=gen) * (gh - bh + 1))
    left = torch.floor(torch.rand(n, candidates, generator=gen) * (gw - bw + 1))
    rows = torch.arange(gh, dtype=torch.float32)[None, None, :, None]
    cols = torch.arange(gw, dtype=torch.float32)[None, None, None, :]
    inside = ((rows >= top[..., None, None]) & (rows < (top + bh)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + bw)[..., None, None]))
    union = torch.cummax(inside.to(torch.uint8), dim=1).values
    counts = union.flatten(2).sum(-1).float()
    best = torch.argmin((counts - target[:, None]).abs(), dim=1)
    return union[torch.arange(n), best].bool()


@pytest.mark.parametrize("grid, min_patches, candidates", [
    ((14, 14), 16, 32), ((8, 8), 5, 32), ((6, 9), 2, 70), ((14, 14), 16, 1), ((3, 3), 1, 33)])
def test_block_masks_equal_the_cummax_reference(grid, min_patches, candidates):
    """Same generator draws, same masks as the cummax algorithm, bit for bit, over many seeds
    (candidates > 32 exercises the multi-word bit sets; 1 the degenerate prefix)."""
    for seed in range(40):
        args = (48, grid, [0.1, 0.5], min_patches, [0.3, 3.3333], candidates)
        new = block_masks(torch.Generator().manual_seed(seed), *args)
        ref = _block_masks_cummax(torch.Generator().manual_seed(seed), *args)
        assert new.dtype == torch.bool and new.shape == ref.shape
        assert torch.equal(new, ref), seed
