"""Benchmark of the κ reduction: is ``icehpc kappa`` as fast as a plain numpy pass, and does it scale?

In one run, on one HDF5 store of N × D float32 embeddings (4 parts + virtual master, ~50 groups):
  1. plain: a straight one-pass numpy loop over the master file (read 16384 rows, normalise in
     float64, one-hot matmul for the per-group Σx̂), one thread — and the same loop with B Poisson(1)
     bootstrap replicates (numpy ``Generator.poisson`` and a per-group Wᵀx matmul);
  2. ``icehpc kappa --bootstrap 0`` and ``--bootstrap B`` on 1 MPI rank, one thread;
  3. the same on 2 MPI ranks (mpiexec), one thread each.
Reported: wall time of each (process start included for icehpc), the ratios icehpc/plain (goal ≤ 1.3)
and the 2-rank speed-ups (goal ≥ 1.6 on 2 cores) — by wall clock, and by the busiest rank's CPU time
(what the wall time would be on otherwise idle cores; a shared machine inflates the former). The file is read once first so every timing sees
the same warm page cache; each timing is the best of ``--repeat``.

    python bench/kappa.py [--n 1000000] [--dim 384] [--groups 50] [--bootstrap 200] [--dir DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread per process, set before numpy loads BLAS (also for children)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from icehpc.analysis.store import write_master, write_part  # noqa: E402

CHUNK = 16384


def make_store(folder: Path, n: int, d: int, groups: int, seed: int = 0) -> Path:
    """Clustered float32 embeddings with a ``group`` column, written part by part (bounded memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, d)).astype(np.float32)
    parts = []
    for i, (a, b) in enumerate(zip(np.linspace(0, n, 5).astype(int)[:-1], np.linspace(0, n, 5).astype(int)[1:])):
        gid = rng.integers(0, groups, b - a)
        x = rng.standard_normal((b - a, d), dtype=np.float32)
        x *= (0.5 + gid % 7).astype(np.float32)[:, None]
        x += centres[gid]
        parts.append(folder / f"part-{i:05d}.h5")
        write_part(parts[-1], x, {"group": np.array([f"g{g:02d}" for g in gid], dtype=object)})
    write_master(folder / "store.h5", parts)
    return folder / "store.h5"


def plain(path: Path, n_boot: int) -> float:
    """Seconds of a plain one-pass numpy reduction (count, Σx̂ and, if n_boot, bootstrap sums)."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with h5py.File(path, "r") as f:
        emb, grp = f["embeddings"], f["meta/group"]
        n, d = emb.shape
        labels = np.unique(grp.asstr()[:])
        g = len(labels)
        count, s = np.zeros(g), np.zeros((g, d))
        sw = np.zeros((g, n_boot, d))
        for a in range(0, n, CHUNK):
            x = emb[a:a + CHUNK].astype(np.float64)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            gid = np.searchsorted(labels, grp.asstr()[a:a + CHUNK])
            onehot = np.zeros((len(x), g))
            onehot[np.arange(len(x)), gid] = 1.0
            count += onehot.sum(axis=0)
            s += onehot.T @ x
            if n_boot:
                w = rng.poisson(1.0, (len(x), n_boot)).astype(np.float64)
                for k in np.unique(gid):
                    m = gid == k
                    sw[k] += w[m].T @ x[m]
    return time.perf_counter() - start


def icehpc(store: Path, out: Path, n_boot: int, ranks: int, env: dict) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "icehpc", "kappa", str(store), "--out", str(out), "--by", "group",
           "--similarity-by", "group", "--bootstrap", str(n_boot), "--force"]
    if ranks > 1:
        exe = shutil.which("mpiexec")
        if exe is None:
            raise SystemExit("mpiexec not found: install Open MPI")
        cmd = [exe, "--oversubscribe", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
               "-n", str(ranks), *cmd]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "kappa.json").read_text())["run"]["timings"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", help="where to build the store (default: a temporary folder, removed)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    env = dict(os.environ)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="icehpc-bench-kappa-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        store = make_store(tmp / "store", args.n, args.dim, args.groups)
        print(f"store: {args.n:,} × {args.dim} float32 ({args.n * args.dim * 4 / 2**30:.2f} GiB), "
              f"{args.groups} groups, 4 parts; built in {time.perf_counter() - t:.0f} s", flush=True)
        plain(store, 0)  # warm the page cache
        res: dict[str, float] = {}
        for b in (0, args.bootstrap):
            res[f"plain_B{b}"] = min(plain(store, b) for _ in range(args.repeat))
            print(f"plain numpy, B={b}: {res[f'plain_B{b}']:.2f} s", flush=True)
            for ranks in (1, 2):
                runs = [icehpc(store, tmp / f"out{ranks}", b, ranks, env) for _ in range(args.repeat)]
                wall, timings = min(runs, key=lambda r: r[0])
                res[f"icehpc_B{b}_r{ranks}"] = wall
                res[f"icehpc_B{b}_r{ranks}_inner"] = timings["total_s"]
                res[f"icehpc_B{b}_r{ranks}_cpu_max"] = max(timings["rank_cpu_s"])
                res[f"icehpc_B{b}_r{ranks}_cpu_sum"] = sum(timings["rank_cpu_s"])
                print(f"icehpc kappa, B={b}, {ranks} rank(s): {wall:.2f} s wall "
                      f"({timings['total_s']:.2f} s inside the stage; CPU s per rank "
                      f"{[round(c, 2) for c in timings['rank_cpu_s']]})", flush=True)
        summary = {
            "n": args.n, "dim": args.dim, "groups": args.groups, "bootstrap": args.bootstrap,
            "machine": f"{platform.node()} {os.cpu_count()} CPUs", **{k: round(v, 3) for k, v in res.items()},
        }
        for b in (0, args.bootstrap):
            summary[f"ratio_B{b}"] = round(res[f"icehpc_B{b}_r1"] / res[f"plain_B{b}"], 3)
            summary[f"speedup_B{b}"] = round(res[f"icehpc_B{b}_r1"] / res[f"icehpc_B{b}_r2"], 3)
            # with 2 idle cores the 2-rank wall time is the busiest rank's CPU time
            summary[f"cpu_speedup_B{b}"] = round(res[f"icehpc_B{b}_r1_cpu_max"] / res[f"icehpc_B{b}_r2_cpu_max"], 3)
            print(f"B={b}: icehpc/plain = {summary[f'ratio_B{b}']:.2f} (goal ≤ 1.3); "
                  f"2-rank speed-up = {summary[f'speedup_B{b}']:.2f} wall, "
                  f"{summary[f'cpu_speedup_B{b}']:.2f} by busiest-rank CPU time (goal ≥ 1.6)")
        load = os.getloadavg()
        summary["loadavg"] = [round(x, 2) for x in load]
        print(f"load average during the run: {load[0]:.1f} on {os.cpu_count()} CPUs "
              "(wall-clock speed-ups need the cores to be otherwise idle)")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
