"""Batched multi-crop: geometry against exact references, per-sample randomness, blur, masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy import ndimage

from icehpc.ssl.config import AugmentConfig
from icehpc.ssl.augment import MultiCrop, block_masks, gaussian_blur

OFF = dict(jitter_p=0.0, blur_p=[0.0, 0.0, 0.0], solarize_p=[0.0, 0.0, 0.0], hflip_p=0.0, vflip_p=0.0)


def _images(b: int = 4, canvas: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 1, canvas, canvas), generator=g, dtype=torch.uint8)


def _identity_cfg(**kw) -> AugmentConfig:
    base = dict(global_size=32, global_scale=[1.0, 1.0], local_size=16, local_scale=[0.05, 0.25], n_local=2,
                aspect_ratio=[1.0, 1.0], mean=0.0, std=1.0, **OFF)
    base.update(kw)
    return AugmentConfig(**base)


def test_full_crop_without_photometric_ops_is_the_image():
    x = _images()
    crops = MultiCrop(_identity_cfg(), patch_size=4)(x, torch.Generator().manual_seed(1))
    ref = x.float() / 255
    torch.testing.assert_close(crops.globals_[:4], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(crops.globals_[4:], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flip, dims", [("hflip_p", [-1]), ("vflip_p", [-2])])
def test_flips_are_exact_mirror_images(flip, dims):
    x = _images()
    crops = MultiCrop(_identity_cfg(**{flip: 1.0}), patch_size=4)(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(crops.globals_[:4], torch.flip(x.float() / 255, dims), atol=1e-6, rtol=0)


def test_shapes_normalisation_and_determinism():
    cfg = AugmentConfig(global_size=32, local_size=16, n_local=3)
    mc = MultiCrop(cfg, patch_size=8)
    x = _images(b=5, canvas=48)
    a = mc(x, torch.Generator().manual_seed(7))
    b = mc(x, torch.Generator().manual_seed(7))
    c = mc(x, torch.Generator().manual_seed(8))
    assert a.globals_.shape == (10, 1, 32, 32) and a.locals_.shape == (15, 1, 16, 16)
    assert a.masks.shape == (10, 16) and a.masks.dtype == torch.bool
    assert torch.equal(a.globals_, b.globals_) and torch.equal(a.locals_, b.locals_) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.globals_, c.globals_)
    lo, hi = (0 - cfg.mean) / cfg.std, (1 - cfg.mean) / cfg.std
    assert a.globals_.min() >= lo - 1e-5 and a.globals_.max() <= hi + 1e-5


def test_parameters_are_drawn_per_sample():
    x = _images(b=1).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    crops = MultiCrop(AugmentConfig(global_size=32, local_size=16, n_local=2), patch_size=4)(
        x, torch.Generator().manual_seed(0))
    views = crops.globals_[:8].flatten(1)
    distinct = {tuple(v.round(decimals=4).tolist()) for v in views}
    assert len(distinct) == 8


def test_local_crops_zoom_in():
    """A local crop covers ≤ 25 % of the area, so on a smooth ramp its value range is narrower."""
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 1, 64).expand(16, 1, 64, 64).contiguous()
    cfg = _identity_cfg(global_size=32, local_size=16, local_scale=[0.05, 0.25], n_local=1)
    crops = MultiCrop(cfg, patch_size=4)(ramp, torch.Generator().manual_seed(3))
    span_global = crops.globals_[:16].amax((1, 2, 3)) - crops.globals_[:16].amin((1, 2, 3))
    span_local = crops.locals_.amax((1, 2, 3)) - crops.locals_.amin((1, 2, 3))
    assert torch.all(span_local <= 0.5 + 1e-3) and torch.all(span_global > 0.95)


def test_blur_matches_torchvision_and_skips_unselected_rows():
    x = torch.rand(3, 1, 40, 40)
    sigma = torch.tensor([0.7, 1.6, 1.0])
    apply = torch.tensor([True, True, False])
    out = gaussian_blur(x, sigma, apply)
    radius = int(np.ceil(3 * 1.6))
    for i in range(2):
        ref = TF.gaussian_blur(x[i:i + 1], kernel_size=2 * radius + 1, sigma=float(sigma[i]))
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)
    assert torch.equal(out[2], x[2])


def test_solarisation_inverts_bright_pixels():
    x = _images()
    cfg = _identity_cfg(solarize_p=[1.0, 1.0, 1.0])
    crops = MultiCrop(cfg, patch_size=4)(x, torch.Generator().manual_seed(0))
    v = x.float() / 255
    torch.testing.assert_close(crops.globals_[:4], torch.where(v >= 0.5, 1 - v, v), atol=1e-6, rtol=0)


def test_block_masks_hit_the_ratio_range_in_blocks():
    masks = block_masks(torch.Generator().manual_seed(0), 600, (14, 14), [0.1, 0.5], 4, [0.3, 3.3333], 32)
    ratio = masks.flatten(1).float().mean(1)
    assert masks.shape == (600, 14, 14)
    assert ratio.min() > 0.05 and ratio.max() < 0.62
    assert 0.25 < float(ratio.mean()) < 0.35
    # blocky, not salt-and-pepper: few 4-connected components for the masked patch count
    sizes = [int(m.sum()) / max(1, ndimage.label(m.numpy())[1]) for m in masks[:100]]
    assert np.mean(sizes) >= 8


def test_rejects_wrong_input():
    mc = MultiCrop(AugmentConfig(global_size=32, local_size=16), patch_size=4)
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.rand(2, 1, 32, 32), torch.Generator())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        MultiCrop(AugmentConfig(global_size=30), patch_size=4)


def test_pack_to_device_round_trip_of_mixed_tensors():
    """the step's parameters travel in one buffer; every dtype, shape (empty too) and
    value comes back exactly, each slot 8-byte aligned."""
    from icehpc.ssl.augment import pack_to_device

    g = torch.Generator().manual_seed(3)
    ts = [torch.rand(5, 2, 3, generator=g), torch.rand(7, generator=g) < 0.5, torch.arange(11),
          torch.zeros(0, dtype=torch.int64), torch.rand(3, generator=g).double(), torch.ones(2, 9, dtype=torch.bool)]
    out = pack_to_device(ts, "cpu", pack=True)
    assert len({t.untyped_storage().data_ptr() for t in out if t.numel()}) == 1  # one buffer
    for a, b in zip(ts, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_multicrop_moves_all_parameters_in_one_copy(monkeypatch):
    """One pack_to_device per step (one pinned host→device copy on CUDA, was one copy per
    parameter tensor: ~6 per view + 2), and the crops are exactly those of unpacked copies."""
    import icehpc.ssl.augment as aug

    cfg = AugmentConfig(global_size=32, local_size=16, n_local=2, blur_p=[1.0, 0.5, 0.5],
                        solarize_p=[0.0, 0.5, 0.5])
    x = _images(3)
    plain = MultiCrop(cfg, 4)(x, torch.Generator().manual_seed(5))
    calls, buffers = [], set()
    real, real_to = aug.pack_to_device, aug.to_device

    def pack(ts, dev, pack=None):
        out = real(ts, dev, pack=True)
        calls.append(len(ts))
        buffers.add(out[0].untyped_storage().data_ptr())
        return out

    def to_device(t, *a, **k):  # after the packed copy, only its views (no copy) pass through
        assert not buffers or t.untyped_storage().data_ptr() in buffers, "a per-tensor copy"
        return real_to(t, *a, **k)

    monkeypatch.setattr(aug, "pack_to_device", pack)
    monkeypatch.setattr(aug, "to_device", to_device)
    packed = MultiCrop(cfg, 4)(x, torch.Generator().manual_seed(5))
    assert calls == [6 * (2 + 2) + 2]
    for n in ("globals_", "locals_", "masks", "mask_index"):
        assert torch.equal(getattr(plain, n), getattr(packed, n)), n


def test_ibot_masking_recipe_half_the_views_and_blocks_scaled_to_the_grid():
    from icehpc.ssl.augment import scaled_min_block

    assert scaled_min_block(16, (14, 14)) == 16 and scaled_min_block(16, (8, 8)) == 5
    assert scaled_min_block(16, (2, 2)) == 1
    cfg = AugmentConfig(global_size=32, local_size=16, n_local=0)
    assert cfg.mask_prob == 0.5 and cfg.mask_min_patches == 16 and cfg.mask_ratio == [0.1, 0.5]
    crops = MultiCrop(cfg, patch_size=4)(_images(b=200), torch.Generator().manual_seed(3))
    masked = crops.masks.any(dim=1).float()
    assert 0.4 < float(masked.mean()) < 0.6  # each of the 400 global views masked with probability 0.5
    ratio = crops.masks.float().mean(1)[masked.bool()]
    assert float(ratio.min()) >= 0.05 and float(ratio.max()) <= 0.65
    always = MultiCrop(AugmentConfig(global_size=32, local_size=16, n_local=0, mask_prob=1.0), patch_size=4)
    assert bool(always(_images(b=50), torch.Generator().manual_seed(3)).masks.any(dim=1).all())
