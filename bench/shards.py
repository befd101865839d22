"""Benchmark: ``icehpc shards build`` against its peer, webdataset.ShardWriter + sha256 + a full PIL decode.

    python bench/shards.py [--n 20000] [--work DIR (default: a fresh mktemp -d folder)] [--workers 1 2] [--repeats 3]

Makes N synthetic CPI-like PNGs with ~100×100 px crops (crop sides clipped to 96..112 px), once
(cached in --work), then times, alternating within each repeat so both see the same machine load:

- the peer, what a careful user writes instead (one process): for each manifest row read the file,
  sha256 it, decode it fully with PIL, and ``webdataset.ShardWriter`` it (png + json, 1000 per shard);
- ``icehpc shards build`` of the same manifest, ``--workers W`` for each W given.

Reports median wall and CPU times, the ratio build / peer (goal <= 0.6 with 1 worker) and the
speed-up of each worker count over 1 (goal: near-linear). The loader's decode throughput, with and
without bbox framing, is measured by bench/decode.py.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from icehpc.data import shards, synth


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: unlike wall time it is
    only mildly inflated by other jobs sharing the machine."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _timed(fn, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()`` writing into ``out``, which is removed first, untimed (both
    sides would otherwise pay for deleting the previous run's ~120 MB)."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - start, _cpu_seconds() - cpu


def peer_build(manifest: Path, out: Path) -> int:
    """The peer: read, sha256, full PIL decode, webdataset.ShardWriter; returns the samples written."""
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(manifest, newline="") as f, wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000,
                                                          verbose=0) as sink:
        for row in csv.DictReader(f):
            data = (manifest.parent / row["path"]).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                meta = {**row, "source_sha256": sha, "orig_width": im.width, "orig_height": im.height}
            sink.write({"__key__": f"{n:09d}", "png": data, "json": json.dumps(meta, sort_keys=True).encode()})
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--work", default=None, help="scratch folder (default: a new private tempfile.mkdtemp folder)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="icehpc-bench-shards-"))
    src = work / f"synth-{args.n}"
    t0 = time.perf_counter()
    synth.synthesize(src, synth.SynthConfig(n=args.n, seed=0, min_side=96, max_side=112),
                     workers=max(args.workers), progress=False)
    print(f"# {args.n} synthetic PNGs ready in {time.perf_counter() - t0:.1f} s ({src})", flush=True)
    mib = sum(f.stat().st_size for f in (src / "images").rglob("*.png")) / 2**20
    print(f"# date {datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"{mib:.1f} MiB of PNG", flush=True)
    manifest = src / "manifest.csv"
    peer_build(manifest, work / "peer")  # warm the page cache
    out = work / "shards"

    def ours(w: int) -> None:
        shards.build([str(manifest)], out, shards.BuildConfig(), workers=w, progress=False)

    times: dict[str, list[tuple[float, float]]] = {"peer": [], **{f"w{w}": [] for w in args.workers}}
    for _ in range(args.repeats):
        times["peer"].append(_timed(lambda: peer_build(manifest, work / "peer"), work / "peer"))
        for w in args.workers:
            times[f"w{w}"].append(_timed(lambda: ours(w), out))
    med = {k: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    t_peer, c_peer = med["peer"]
    print(f"peer (webdataset.ShardWriter + sha256 + PIL full decode): {t_peer:.2f} s wall, {c_peer:.2f} s CPU "
          f"({args.n / t_peer:,.0f} img/s)")
    base = med.get("w1", med[f"w{args.workers[0]}"])[0]
    for w in args.workers:
        t, c = med[f"w{w}"]
        print(f"icehpc shards build --workers {w}: {t:.2f} s wall = {t / t_peer:.2f}x the peer (goal <= 0.6 at 1 "
              f"worker); {c:.2f} s CPU = {c / c_peer:.2f}x; speed-up over 1 worker {base / t:.2f}", flush=True)
    print(f"# command: {' '.join([os.path.basename(sys.executable), *sys.argv])}; load average after: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs on the machine inflate wall times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
