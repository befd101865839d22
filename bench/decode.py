"""Benchmark: the loader's decode to the canvas with bbox framing against framing ``none``, one run.

    python bench/decode.py [--n 4000] [--work DIR (default: a fresh mktemp -d folder)] [--canvas 224] [--repeats 5]

Makes N synthetic CPI-like PNGs with ~100×100 px crops (crop sides clipped to 96..112 px) and their
shards once (cached in --work), then times, alternating within each repeat, one pass of
``ordered_loader(..., num_workers=0)`` (tar reading, JSON, decode, framing, collation: what an
embedding worker does per sample) with ``framing="none"`` and ``framing="bbox"``, and reports
images per second and the ratio bbox / none (goal >= 0.8). A direct ``decode_image`` loop over the
same PNG bytes gives the decode-only ratio and how the bbox time splits (decode, box, frame, enlarge,
and Pillow's resize of the same windows for comparison). Times are CPU seconds of this process
(medians over the repeats): other jobs on a shared machine inflate them less than wall times.
"""
from __future__ import annotations

import argparse
import datetime
import io
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

    pngs = [s["png"] for p_ in paths for _, s in iter_samples(p_, ("png",))]

    def direct(framing: str) -> None:
        for b in pngs:
            loader.decode_image(b, args.canvas, framing=framing)

    times: dict[str, list[float]] = {k: [] for k in ("loader none", "loader bbox", "decode none", "decode bbox")}
    for _ in range(args.repeats):
        for key, fn in (("loader none", lambda: one_pass("none")), ("loader bbox", lambda: one_pass("bbox")),
                        ("decode none", lambda: direct("none")), ("decode bbox", lambda: direct("bbox"))):
            t = time.process_time()
            fn()
            times[key].append(time.process_time() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for what in ("loader", "decode"):
        none, bbox = med[f"{what} none"], med[f"{what} bbox"]
        print(f"{what}: framing none {args.n / none:,.0f} img/s, bbox {args.n / bbox:,.0f} img/s per CPU-second; "
              f"bbox/none throughput {none / bbox:.2f} (goal >= 0.8)", flush=True)
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
