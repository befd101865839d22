"""Cost of writing and opening an embedding store: ``write_part`` per part, ``write_master`` (which
reads every part once for its sha256), ``open_store`` with verification, and the files' sizes.

On N × D float32 rows with ``key``, ``habit`` and ``temperature_c`` columns in P parts, in a private
temp folder; each timing is the best of ``--repeat`` runs. Run it on two commits to compare writers.

    python bench/store_write.py [--n 200000] [--dim 384] [--parts 20] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from icehpc.analysis.store import open_store, write_master, write_part  # noqa: E402


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--parts", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    meta = {"key": np.array([f"k{i:08d}" for i in range(args.n)]),
            "habit": np.array(["plate", "column", "aggregate", "needle"])[rng.integers(0, 4, args.n)],
            "temperature_c": rng.uniform(-60, 0, args.n)}
    cuts = np.linspace(0, args.n, args.parts + 1).astype(int)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = [folder / f"part-{i:05d}.h5" for i in range(args.parts)]

        def parts_write() -> None:
            for i, p in enumerate(parts):
                s = slice(cuts[i], cuts[i + 1])
                write_part(p, x[s], {k: v[s] for k, v in meta.items()})

        master = folder / "store.h5"
        t_parts = best_of(args.repeat, parts_write)
        t_master = best_of(args.repeat, lambda: write_master(master, parts))
        t_open = best_of(args.repeat, lambda: open_store(master).close())
        print(json.dumps({"n": args.n, "dim": args.dim, "parts": args.parts,
                          "write_parts_s": round(t_parts, 3), "write_master_s": round(t_master, 3),
                          "open_store_verify_s": round(t_open, 3),
                          "parts_bytes": sum(p.stat().st_size for p in parts),
                          "master_bytes": master.stat().st_size}))


if __name__ == "__main__":
    main()
