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


# ------------------------------------------------------------------ item 2: the kernel bench's gradient check
def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_bench_gradient_check_passes_a_correct_kernel_and_flags_a_wrong_one():
    """bench/vmf_kernel.py compares against the fp64 reference of the same bf16 inputs: a kernel
    computing in fp32 (the torch backend on upcast inputs stands in) prints ok, a gradient 10 % off
    prints WRONG, and plain bf16 PyTorch — the old reference — is itself far off that reference."""
    vk = _bench("vmf_kernel")
    case = vk.make_case(vk.SMALL["patch N=203 K=301"], "cpu", torch.bfloat16)
    ref = vk.reference_grads(case, False, vk.reference_dtype(case))
    assert all(r.dtype == torch.float64 for r in ref)
    ok = vk.grad_error(case, vk.fp32_stand_in, False, ref)
    assert vk.grad_verdict(ok) == "ok" and ok < 1e-2

    def wrong(*args):
        loss, stats = vk.fp32_stand_in(*args)
        return 1.1 * loss, stats

    bad = vk.grad_error(case, wrong, False, ref)
    assert vk.grad_verdict(bad) == "WRONG"
    from icehpc.ssl.kernels import vmf_xent_torch

    assert vk.grad_error(case, vmf_xent_torch, False, ref) > 5 * ok


# ------------------------------------------------------------------ item 8: backend "chunked" selectable
def test_loss_backend_chunked_is_selectable_and_auto_stays_the_default():
    from icehpc.ssl.config import LOSS_BACKENDS, LossConfig
    from icehpc.ssl.kernels import BACKENDS

    assert LOSS_BACKENDS == BACKENDS  # the config accepts exactly what the loss can run
    LossConfig(backend="chunked").validate()
    assert LossConfig().backend == "auto"
    with pytest.raises(ValueError, match="chunked"):
        LossConfig(backend="4gemm").validate()


def test_loss_backend_chunked_trains_like_torch_on_the_cpu():
    """The chunked backend chosen from the config gives the torch backend's loss and gradients."""
    from icehpc.ssl.kernels import crop_pairs, vmf_xent

    g = torch.Generator().manual_seed(0)
    zs = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1).requires_grad_()
    ws = torch.randn(40, 16, generator=g).requires_grad_()
    zt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    wt, center = torch.randn(40, 16, generator=g), 0.1 * torch.randn(40, generator=g)
    out = {}
    for backend in ("torch", "chunked"):
        loss, _ = vmf_xent(zs, ws, zt, wt, center, 0.1, 0.04, crop_pairs(6, 2, 4), None, True, backend=backend)
        out[backend] = (loss, *torch.autograd.grad(loss, (zs, ws)))
    for a, b in zip(out["torch"], out["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
