"""Images/s of the batched GPU multi-crop augmentation (2 global + N local crops, block masks) on
a 256×1×256×256 uint8 batch already on the device (goal: >= 20,000 img/s on an H200), and the
host-side work of one step on ONE CPU core (parameter draws + block masks + packing into the one
host→device buffer; target < 10 ms at batch 256), with the previous ``cummax`` mask builder timed
in the same run as the baseline.

    python bench/augment.py [--config configs/pretrain-vits16.yaml] [--batch 256] [--steps 20]
    python bench/augment.py --host-only   # the host-side figure only (no GPU needed)
    python bench/augment.py --dry-run     # CPU, tiny batch: checks the code path only
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def block_masks_cummax(gen, n, grid, ratio, min_patches, aspect, candidates, device="cpu"):
    """The previous mask builder (running union as a ``cummax`` over [n, T, gh, gw]), same draws
    (:func:`augment.draw_blocks`) and same masks as ``augment.block_masks``: the baseline of the
    host-side figure, and the reference of the test that the masks did not change."""
    from icehpc.ssl.augment import draw_blocks

    gh, gw = grid
    target, top, left, bh, bw = draw_blocks(gen, n, grid, ratio, min_patches, aspect, candidates)
    rows = torch.arange(gh, dtype=torch.float32)[None, None, :, None]
    cols = torch.arange(gw, dtype=torch.float32)[None, None, None, :]
    inside = ((rows >= top[..., None, None]) & (rows < (top + bh)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + bw)[..., None, None]))
    union = torch.cummax(inside.to(torch.uint8), dim=1).values
    counts = union.flatten(2).sum(-1).float()
    best = torch.argmin((counts - target[:, None]).abs(), dim=1)
    return union[torch.arange(n), best].bool()


def host_step_ms(mc, batch: int, steps: int, builder=None) -> tuple[float, float]:
    """Median ms of one step's host-side work on one thread: draws + masks + packing (pack=True,
    as on CUDA, into unpinned memory here). ``builder`` swaps the mask builder (baseline)."""
    from icehpc.ssl import augment

    saved, threads = augment.block_masks, torch.get_num_threads()
    torch.set_num_threads(1)
    if builder is not None:
        augment.block_masks = builder
    try:
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            _, host, masks, index = mc.host_params(batch, torch.Generator().manual_seed(i))
            augment.pack_to_device([t for view in host for t in view] + [masks, index], "cpu", pack=True)
            times.append(time.perf_counter() - t0)
    finally:
        augment.block_masks = saved
        torch.set_num_threads(threads)
    times = sorted(times[2:])
    return 1e3 * times[len(times) // 2], 1e3 * times[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "pretrain-vits16.yaml"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="CPU, batch 4, 2 steps: code path only")
    ap.add_argument("--host-only", action="store_true", help="only the host-side ms/step (one core)")
    args = ap.parse_args()
    from icehpc import config as cfglib
    from icehpc.ssl.augment import MultiCrop
    from icehpc.ssl.config import PretrainConfig

    cfg = cfglib.load(PretrainConfig, args.config, [])
    mc = MultiCrop(cfg.augment, 16)
    host_batch = 4 if args.dry_run else args.batch
    host_steps = 2 if args.dry_run else max(5, args.steps)
    new_ms, new_best = host_step_ms(mc, host_batch, host_steps)
    old_ms, old_best = host_step_ms(mc, host_batch, host_steps, builder=block_masks_cummax)
    print(f"host side of one batch-{host_batch} step, 1 thread (draws + masks + packing): median "
          f"{new_ms:.1f} ms (best {new_best:.1f}); previous cummax masks: median {old_ms:.1f} ms "
          f"(best {old_best:.1f}); target < 10 ms", flush=True)
    if not args.dry_run:
        print(f"SUMMARY|augment host ms/step (b={host_batch}, 1 core)|{new_ms:.1f}|< 10|"
              f"{'ok' if new_ms < 10 else 'NOT met'} (cummax: {old_ms:.1f})", flush=True)
    if args.host_only:
        return 0
    if args.dry_run:
        args.batch, args.steps, device = 4, 2, torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench/augment.py: no CUDA device, GPU img/s not measured (--dry-run runs the code path)")
        return 0
    images = torch.randint(0, 256, (args.batch, 1, args.canvas, args.canvas), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.steps + 2):
        if i == 2:
            sync()
            t0 = time.perf_counter()
        crops = mc(images, torch.Generator().manual_seed(i))
    sync()
    rate = args.batch * args.steps / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"device: {name}; batch {args.batch}x1x{args.canvas}x{args.canvas} uint8; "
          f"{2}x{cfg.augment.global_size} + {cfg.augment.n_local}x{cfg.augment.local_size} crops; "
          f"globals {tuple(crops.globals_.shape)}")
    print(f"augmentation: {rate:,.0f} img/s")
    if device.type == "cuda":
        print(f"SUMMARY|augmentation img/s|{rate:.0f}|>= 20000|{'ok' if rate >= 20000 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
