"""Benchmark: shard building vs `tar cf` of the same files, and loader decode throughput.

    python bench/shards.py [--n 20000] [--work DIR (default: a fresh mktemp -d folder)] [--workers 1 2] [--repeats 3]

Makes N synthetic CPI-like PNGs with ~100×100 px crops (crop sides clipped to 96..112 px), once
(cached in --work), then reports the median wall time of `tar cf` of the image folder and of
`icehpc shards build` of the same images (from the manifest, so with metadata), their ratio
(goal <= 2), and the loader's decoded images per second per worker (goal >= 2000).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from icehpc.data import loader as data, shards, synth


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: unlike wall time it is
    only mildly inflated by other jobs sharing the machine."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds) of ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), _cpu_seconds()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--work", default=None, help="scratch folder (default: a new private tempfile.mkdtemp folder)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--canvas", type=int, nargs="+", default=[96, 128])
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="icehpc-bench-shards-"))
    src = work / f"synth-{args.n}"
    t0 = time.perf_counter()
    synth.synthesize(src, synth.SynthConfig(n=args.n, seed=0, min_side=96, max_side=112),
                     workers=max(args.workers), progress=False)
    print(f"# {args.n} synthetic PNGs ready in {time.perf_counter() - t0:.1f} s ({src})", flush=True)
    mib = sum(f.stat().st_size for f in (src / "images").rglob("*.png")) / 2**20
    print(f"# date {datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, {mib:.1f} MiB of PNG")

    tar_out = work / "images.tar"
    subprocess.run(["tar", "cf", str(tar_out), "-C", str(src), "images"], check=True)  # warm the page cache
    t_tar, cpu_tar = _median_time(
        lambda: subprocess.run(["tar", "cf", str(tar_out), "-C", str(src), "images"], check=True), args.repeats)
    print(f"tar cf: {t_tar:.2f} s wall, {cpu_tar:.2f} s CPU ({args.n / t_tar:,.0f} files/s)")
    out = work / "shards"
    for w in args.workers:
        def one_build() -> None:
            shutil.rmtree(out, ignore_errors=True)
            shards.build([str(src / "manifest.csv")], out, shards.BuildConfig(), workers=w, progress=False)

        t, cpu = _median_time(one_build, args.repeats)
        print(f"icehpc shards build --workers {w}: {t:.2f} s wall = {t / t_tar:.2f}x tar cf "
              f"({args.n / t:,.0f} img/s); {cpu:.2f} s CPU = {cpu / cpu_tar:.1f}x tar's CPU", flush=True)
    paths = data.shard_paths(out)
    for canvas in args.canvas:
        for nw in (0, 2):
            def one_pass() -> None:
                for _ in data.ordered_loader(paths, batch_size=256, canvas=canvas, num_workers=nw):
                    pass

            t, cpu = _median_time(one_pass, args.repeats)
            print(f"loader canvas {canvas}, num_workers {nw}: {args.n / t:,.0f} img/s wall "
                  f"= {args.n / t / max(1, nw):,.0f} img/s per worker; {args.n / cpu:,.0f} img/s per CPU-second",
                  flush=True)
    print(f"# command: {' '.join([os.path.basename(sys.executable), *sys.argv])}; load average after: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs on the machine inflate wall times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
