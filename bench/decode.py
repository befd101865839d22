"""Benchmark: the loader's decode to the canvas with bbox framing against framing ``none``, one run.

    python bench/decode.py [--n 4000] [--work DIR (default: a fresh mktemp -d folder)] [--canvas 224] [--repeats 5]

Makes N synthetic CPI-like PNGs with ~100×100 px crops (crop sides clipped to 96..112 px) and their
shards once (cached in --work), then times, alternating within each repeat, one pass of
``ordered_loader(..., num_workers=0)`` (tar reading, JSON, decode, framing, collation: what an
embedding worker does per sample) with ``framing="none"``, with ``framing="bbox"`` as a CPU job
runs it (the workers enlarge each window to the canvas) and with ``framing="bbox"`` as a GPU job
runs it (``defer_enlarge``: the workers send the window and ``enlarge_windows`` enlarges the batch on
the device; here the CPU stands in for the device and that step is timed on its own). It reports
images per second and the ratios bbox / none (goal >= 0.8). A direct ``decode_image`` loop over
the same PNG bytes gives the decode-only ratio and how the bbox time splits (decode, box, frame,
enlarge, and Pillow's resize of the same windows for comparison). Times are CPU seconds of this
process (medians over the repeats): other jobs on a shared machine inflate them less than wall times.
"""
from __future__ import annotations

import argparse
import datetime
import io
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from icehpc.data import loader, shards, synth
from icehpc.data.format import iter_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--work", default=None, help="scratch folder (default: a new private tempfile.mkdtemp folder)")
    p.add_argument("--canvas", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="icehpc-bench-decode-"))
    src, out = work / f"synth-{args.n}", work / f"shards-{args.n}"
    synth.synthesize(src, synth.SynthConfig(n=args.n, seed=0, min_side=96, max_side=112), workers=1,
                     progress=False)
    shards.build([str(src / "manifest.csv")], out, shards.BuildConfig(), workers=1, progress=False)
    paths = loader.shard_paths(out)
    print(f"# date {datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, canvas {args.canvas}",
          flush=True)

    def one_pass(framing: str) -> None:
        for _ in loader.ordered_loader(paths, batch_size=256, canvas=args.canvas, num_workers=0, framing=framing):
            pass

    def deferred_pass() -> None:
        """What a GPU job's decode workers do: the loader's batches before they land on the device."""
        for _ in loader.ordered_loader(paths, batch_size=256, canvas=args.canvas, framing="bbox", device="cpu",
                                       defer_enlarge=True).batches:
            pass

    pngs = [s["png"] for p_ in paths for _, s in iter_samples(p_, ("png",))]

    def direct(framing: str) -> None:
        for b in pngs:
            loader.decode_image(b, args.canvas, framing=framing)

    keys = ("loader none", "loader bbox", "loader bbox deferred", "decode none", "decode bbox")
    times: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(args.repeats):
        for key, fn in zip(keys, (lambda: one_pass("none"), lambda: one_pass("bbox"), deferred_pass,
                                  lambda: direct("none"), lambda: direct("bbox"))):
            t = time.process_time()
            fn()
            times[key].append(time.process_time() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for what, label in (("loader bbox", "loader, CPU job (workers enlarge)"),
                        ("loader bbox deferred", "loader, GPU job's workers (enlargement deferred)"),
                        ("decode bbox", "decode only (workers enlarge)")):
        none = med["decode none" if what.startswith("decode") else "loader none"]
        print(f"{label}: framing none {args.n / none:,.0f} img/s, bbox {args.n / med[what]:,.0f} img/s per "
              f"CPU-second; bbox/none throughput {none / med[what]:.2f} (goal >= 0.8)", flush=True)
    batches = list(itertools.islice(loader.ordered_loader(paths, batch_size=256, canvas=args.canvas, framing="bbox",
                                                          device="cpu", defer_enlarge=True).batches, 4))
    landing = []
    for _ in range(args.repeats):
        t = time.process_time()
        for images, sides, _ in batches:
            loader.enlarge_windows(images.clone(), sides)
        landing.append(time.process_time() - t)
    print(f"deferred enlargement, batched (enlarge_windows, 256 per batch) on this CPU: "
          f"{1e6 * statistics.median(landing) / sum(len(s) for _, s, _ in batches):.0f} µs per image "
          "(a GPU job runs it on the device)", flush=True)
    # where the bbox time goes (per image, CPU µs)
    split = {"decode": 0.0, "box": 0.0, "frame": 0.0, "enlarge": 0.0, "Pillow resize": 0.0}
    for b in pngs:
        t0 = time.process_time()
        with Image.open(io.BytesIO(b), formats=("PNG",)) as im:
            a = np.asarray(im)
        t1 = time.process_time()
        loader.particle_bbox(a)
        t2 = time.process_time()
        framed = loader.frame_particle(a, 0.1)
        t3 = time.process_time()
        loader._enlarge_square(framed, args.canvas)  # None (nothing done) for a window larger than the canvas
        t4 = time.process_time()
        im = Image.fromarray(framed)
        s = args.canvas / max(im.size)
        im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BILINEAR)
        t5 = time.process_time()
        for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            split[k] += v
    print("bbox per image (CPU µs): " + ", ".join(f"{k} {1e6 * v / len(pngs):.0f}" for k, v in split.items())
          + " (frame includes finding the box again; the loader enlarges, Pillow's resize is for comparison)")
    print(f"# command: {' '.join([os.path.basename(sys.executable), *sys.argv])}; load average after: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
