"""Benchmark of ``icehpc curate``'s k-means: quality and speed against scikit-learn, 1 vs 2 ranks.

On one clustered float32 store (N × D, 50 true clusters, 2 parts) in a private temp folder:
  1. ``icehpc curate`` in this process (1 rank): seconds per Lloyd iteration and inertia of the
     bottom level (K clusters, a fixed number of iterations, no resampling step);
  2. scikit-learn ``KMeans(algorithm="lloyd", n_init=1)`` on the same L2-normalised rows (float64,
     one thread), same K and iterations: seconds per iteration and inertia;
  3. ``mpiexec -n 1`` and ``-n 2`` of the CLI (process start included; the keys must agree).

    python bench/curate.py [--n 20000] [--dim 64] [--k 100] [--iters 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread per process, before numpy loads BLAS

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from icehpc.analysis import curate as cur  # noqa: E402
from icehpc.analysis.store import write_master, write_part  # noqa: E402
from icehpc.run.launch import mpiexec_prefix  # noqa: E402


def make_store(folder: Path, n: int, dim: int) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, dim)) * 2
    x = (centres[rng.integers(0, 50, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    keys = np.array([f"k{i:07d}" for i in range(n)])
    parts = []
    for i, s in enumerate(np.array_split(np.arange(n), 2)):
        parts.append(folder / f"part-{i}.h5")
        write_part(parts[-1], x[s], {"key": keys[s]})
    write_master(folder / "store.h5", parts)
    return folder / "store.h5"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    from sklearn.cluster import KMeans

    with tempfile.TemporaryDirectory(prefix="icehpc-bench-curate-") as tmp:
        work = Path(tmp)
        store = make_store(work, args.n, args.dim)
        cfg = cur.CurateConfig(levels=[args.k], target=args.n // 10, resample_steps=0, iters=args.iters, label="")
        res = cur.run_curate(store, work / "in-process", cfg, force=True)
        ours = res["levels"][0]
        import h5py

        with h5py.File(store) as f:
            x = f["embeddings"][:]
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        t = time.perf_counter()
        sk = KMeans(args.k, n_init=1, max_iter=args.iters, tol=0, random_state=0, algorithm="lloyd").fit(
            xn.astype(np.float64))
        sk_s = (time.perf_counter() - t) / sk.n_iter_
        walls = {}
        for ranks in (1, 2):
            cmd = [*mpiexec_prefix(), "-n", str(ranks), sys.executable, "-m", "icehpc", "curate", str(store),
                   "--out", str(work / f"mpi{ranks}"), f"levels=[{args.k}]", f"target={args.n // 10}",
                   "resample_steps=0", f"iters={args.iters}", "label=''"]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            walls[ranks] = time.perf_counter() - t
        same = (work / "mpi1" / "curated.csv").read_bytes() == (work / "mpi2" / "curated.csv").read_bytes()
        out = {"n": args.n, "dim": args.dim, "k": args.k, "iters": args.iters,
               "icehpc_s_per_iter": ours["seconds_per_iteration"], "icehpc_inertia": ours["inertia_euclidean"],
               "sklearn_s_per_iter": sk_s, "sklearn_inertia": float(sk.inertia_),
               "speed_ratio_icehpc_over_sklearn": ours["seconds_per_iteration"] / sk_s,
               "cli_wall_s": walls, "same_keys_1_vs_2_ranks": same}
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
