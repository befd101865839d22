"""Images/s of the batched GPU multi-crop augmentation (2 global + N local crops, block masks) on
a 256×1×256×256 uint8 batch already on the device (goal: >= 20,000 img/s on an H200).

    python bench/augment.py [--config configs/pretrain-vits16.yaml] [--batch 256] [--steps 20]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "pretrain-vits16.yaml"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="CPU, batch 4, 2 steps: code path only")
    args = ap.parse_args()
    from icehpc import config as cfglib
    from icehpc.ssl.augment import MultiCrop
    from icehpc.ssl.config import PretrainConfig

    if args.dry_run:
        args.batch, args.steps, device = 4, 2, torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench/augment.py: no CUDA device, nothing measured (--dry-run runs the code path)")
        return 0
    cfg = cfglib.load(PretrainConfig, args.config, [])
    mc = MultiCrop(cfg.augment, 16)
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
