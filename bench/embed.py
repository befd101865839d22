"""Benchmark of the embedding job: is ``icehpc embed`` as fast as a plain timm loop, and does it scale?

In one run, on the same synthetic shards and the same random-init backbone:
  1. plain: decode every image up front, then time a bare ``model.forward_features`` loop (the
     ceiling any embedding job can reach on this machine), one thread;
  2. ``icehpc embed`` on 1 MPI rank, one thread (decode + forward + HDF5 parts + master);
  3. ``icehpc embed`` on 2 MPI ranks (mpiexec), one thread each.
Prints images/s of each, the ratio embed/plain (goal >= 0.9) and the 2-rank speed-up (goal >= 1.6
on 2 cores). Job throughput is images / the slowest rank's compute loop (model load and process
start excluded, reported separately as wall time). With CUDA, also ViT-S/16 bf16 images/s on the GPU.

    python bench/embed.py [--n 384] [--model vit_small_patch16_224] [--img-size 224] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from icehpc.run.launch import mpiexec_prefix

ROOT = Path(__file__).resolve().parent.parent


def _icehpc(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> float:
    cmd = [*(prefix or []), sys.executable, "-m", "icehpc", *args]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def plain_loop(shard_dir: Path, model_name: str, img_size: int, batch_size: int, device: str) -> float:
    """images/s of a bare timm forward over pre-decoded images (same normalisation as the job).

    Model build and decoding are outside the timer; the first batch is the warm-up (allocator,
    kernels, autotuning) and the clock starts at batch 2. On a GPU the batches sit in pinned memory
    and both copies overlap the compute (host→device non_blocking, the [CLS] rows back into pinned
    buffers non_blocking, one synchronize at the end): the ceiling a job can reach."""
    import torch

    from icehpc.data.format import shard_paths
    from icehpc.data.loader import ordered_loader
    from icehpc.analysis.embed import eval_transform
    from icehpc.ssl.export import backbone_spec, build_backbone

    spec = backbone_spec(None, model_name, img_size, seed=0)
    model = build_backbone(spec, seed=0).to(device)
    on_gpu = device.startswith("cuda")
    batches = [images.pin_memory() if on_gpu else images for images, _ in
               ordered_loader(shard_paths(shard_dir), batch_size=batch_size, canvas=img_size)]
    if len(batches) < 2:
        raise SystemExit(f"bench/embed.py: plain loop needs >= 2 batches of {batch_size}, got {len(batches)}")
    outs = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
        def one(images: torch.Tensor) -> None:
            x = eval_transform(images.to(device, non_blocking=True), img_size, spec.mean, spec.std, torch.float32)
            cls = model.forward_features(x)[:, 0].float()
            host = torch.empty(cls.shape, dtype=cls.dtype, pin_memory=on_gpu)
            outs.append(host.copy_(cls, non_blocking=on_gpu))

        one(batches[0])  # warm-up, untimed
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for images in batches[1:]:
            one(images)
        if on_gpu:
            torch.cuda.synchronize()
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=384, help="synthetic images")
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-samples", type=int, default=None,
                   help="samples per shard; default 1000 with --gpu-only (realistic shards: few part files "
                        "in the timed loop), 48 otherwise (the CPU 1- vs 2-rank split needs several shards)")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    p.add_argument("--gpu-only", action="store_true",
                   help="only the GPU job: icehpc embed of --n (>= 20,000) images, --workers decoders")
    p.add_argument("--workers", type=int, default=12, help="decode workers of the --gpu-only job")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-only: the same job on the CPU, tiny")
    args = p.parse_args()

    import torch

    if args.gpu_only and not torch.cuda.is_available() and not args.dry_run:
        print("bench/embed.py --gpu-only: no CUDA device, nothing measured")
        return
    if args.gpu_only and args.dry_run:
        args.n = min(args.n, 24)  # 3 batches of 8: the plain loop times from batch 2
    if args.shard_samples is None:
        args.shard_samples = 1000 if args.gpu_only else 48
    work = Path(args.keep or tempfile.mkdtemp(prefix="icehpc-bench-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    env1 = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not (work / "shards" / "index.json").exists():
        _icehpc("synth", "--out", str(work / "synth"), "--n", str(args.n), "--seed", "0", "--no-progress")
        _icehpc("shards", "build", "--manifest", str(work / "synth" / "manifest.csv"), "--out",
                str(work / "shards"), "--shard-samples", str(args.shard_samples), "--no-progress")
    if args.gpu_only:
        store = work / "embed-gpu" / "embeddings.h5"
        shutil.rmtree(store.parent, ignore_errors=True)
        bs = "8" if args.dry_run else "256"
        wall = _icehpc("embed", str(work / "shards"), "--random-init", "--out", str(store), "--batch-size", bs,
                       "--workers", str(0 if args.dry_run else args.workers), "--framing", "bbox")  # as trained backbones
        summary = json.loads(Path(f"{store}.json").read_text())
        rate = summary["images_per_s"]
        name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
        print(f"{name}: icehpc embed ViT-S/16, {summary['rows']} images in {args.shard_samples}-sample shards, "
              f"{0 if args.dry_run else args.workers} decode workers, bbox framing: "
              f"{rate:.0f} img/s in the job ({summary['rows'] / wall:.0f} img/s end to end)", flush=True)
        if not args.dry_run:
            print(f"SUMMARY|embedding img/s|{rate:.0f}|>= 15000|{'ok' if rate >= 15000 else 'NOT met'}", flush=True)
        # the ceiling, same run, same card, same shards: a plain timm loop (from batch 2)
        plain = plain_loop(work / "shards", "vit_small_patch16_224", 224, int(bs), "cpu" if args.dry_run else "cuda")
        print(f"{name}: plain timm ViT-S/16 loop (pre-decoded, from batch 2): {plain:.0f} img/s; "
              f"embed / plain = {rate / plain:.2f}", flush=True)
        if not args.dry_run:
            print(f"SUMMARY|plain timm embed loop img/s|{plain:.0f}|context|-", flush=True)
        if not args.keep:
            shutil.rmtree(work)
        return
    torch.set_num_threads(1)
    plain = plain_loop(work / "shards", args.model, args.img_size, args.batch_size, "cpu")

    results = {}
    for ranks in (1, 2):
        store = work / f"embed-{ranks}" / "embeddings.h5"
        shutil.rmtree(store.parent, ignore_errors=True)
        job = ["embed", str(work / "shards"), "--random-init", "--out", str(store), "--model", args.model,
               "--img-size", str(args.img_size), "--batch-size", str(args.batch_size)]
        wall = _icehpc(*job, env=env1, prefix=[*mpiexec_prefix(), "-n", str(ranks)] if ranks > 1 else None)
        summary = json.loads(Path(f"{store}.json").read_text())
        results[ranks] = (summary["images_per_s"], summary["rows"] / wall)

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; {args.n} images, {args.model} @ "
          f"{args.img_size}px, batch {args.batch_size}, 1 thread per rank")
    print(f"plain timm forward loop (pre-decoded): {plain:8.1f} img/s")
    for ranks, (job_rate, wall_rate) in results.items():
        print(f"icehpc embed, {ranks} rank(s):          {job_rate:8.1f} img/s in the job "
              f"({wall_rate:.1f} img/s end to end incl. process start and model load)")
    print(f"embed / plain (1 rank): {results[1][0] / plain:.2f}x  (goal >= 0.9)")
    print(f"2-rank speed-up:        {results[2][0] / results[1][0]:.2f}x  (goal >= 1.6 on 2 cores)")

    if torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
        gpu_plain = plain_loop(work / "shards", "vit_small_patch16_224", 224, 256, "cuda")
        store = work / "embed-gpu" / "embeddings.h5"
        shutil.rmtree(store.parent, ignore_errors=True)
        _icehpc("embed", str(work / "shards"), "--random-init", "--out", str(store), "--batch-size", "256")
        gpu_job = json.loads(Path(f"{store}.json").read_text())["images_per_s"]
        print(f"GPU {torch.cuda.get_device_name()}: ViT-S/16 bf16 plain {gpu_plain:.0f} img/s, "
              f"icehpc embed {gpu_job:.0f} img/s ({gpu_job / gpu_plain:.2f}x)")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
