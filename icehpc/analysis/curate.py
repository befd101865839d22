"""Balanced pretraining sets by hierarchical k-means, MPI-parallel: ``icehpc curate``.

``icehpc curate STORE --out DIR --levels K1,K2,... --target N [--seed S]`` follows Vo et al. 2024
("Automatic data curation for self-supervised learning: a clustering-based approach", the method
behind DINOv2's LVD-142M), implemented from the paper's description:

1. **Level 1**, over the rows of the store, on L2-normalised embeddings with cosine similarity
   (spherical k-means: assign to the most similar centroid, centroid = normalised mean). Rows are
   cut into global blocks of :data:`BLOCK` rows owned whole by ranks; each Lloyd iteration is one
   Allreduce of the per-cluster sums Σx̂ and counts (plus the change count and the objective).
   The init (k-means++ by default, or seeded random rows) runs on every rank on the same seeded
   sample of *global* row indices, so it is identical for any rank count.
2. **Resampling-clustering** (the paper's fix for centroids that follow density): ``resample_steps``
   times, keep the ``resample_points`` rows nearest to each centroid (a global top-r per cluster,
   ties broken by row index) and rerun k-means on that subset only, so every cluster weighs the same
   in the next centroid update; then all rows are assigned to the final centroids.
3. **Level l > 1**: the same k-means (+ resampling) on the K_{l-1} centroids of the level below,
   identically on every rank (it is small).
4. **Balanced sampling down the tree**: the target N is split evenly over the top-level clusters
   (a cluster with fewer rows than its share gives all of them, the rest is shared among the others:
   water filling), each cluster's quota is split the same way over its child clusters, down to the
   level-1 clusters, where the rows with the smallest seeded priority (Philox keyed by the seed and
   the global block) are kept. Dominant shapes are thinned, rare ones kept whole.

Outputs in DIR: ``curated.csv`` (``key``, ``row``, the cluster path ``cluster_l1 … cluster_lL``
and the label column when present), ``clusters.h5`` (per level ``centroids``, ``sizes`` in rows,
``selected`` per cluster, ``parent`` index into the level above; ``assignments`` of every row to its
level-1 cluster) and ``curate.json`` (written last; the config and its provenance, cluster-size
distributions and per-label counts before/after, label entropy, per-iteration timings, inertia).
A rerun with the same store and config finds DIR up to date. Build shards of the curated set with
``icehpc shards build <the original inputs> --keys DIR/curated.csv --out CURATED_SHARDS``.

Memory per rank: its own rows, O(rows/ranks · D) float32, plus O(K · D) sums; the candidates
exchanged for resampling and sampling are at most ranks · K · r and ranks · N rows.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import config as cfglib
from ..config import field
from .. import dist
from ..contract import Contract, Status
from ..dist import SerialComm, mpi_comm
from ..fileio import run_facts, write_atomic
from . import storestage
from .store import Store, StoreError, _atomic_h5

BLOCK = 512  # rows per ownership / priority block: part of the result's definition, not a tuning knob
_CHUNK = 8192  # rows per similarity product (bounds the [rows, K] scratch)


class CurateError(cfglib.UserError):
    """Bad input or configuration for curation; the message says what and how to fix it."""


@dataclass
class CurateConfig:
    levels: list[int] = field([100, 10], help="clusters per level, bottom (rows) to top, e.g. [1000, 100, 10]")
    target: int = field(1000, help="rows to keep in the curated set")
    seed: int = field(0, help="seed of the init sample, k-means++ and the sampling priorities")
    init: Literal["kmeans++", "random"] = field("kmeans++", help="centroid init on the seeded row sample")
    init_sample: int = field(32, help="the init runs on min(rows, init_sample × K) seeded rows")
    iters: int = field(25, help="at most this many Lloyd iterations per k-means run (stops when no row moves)")
    resample_steps: int = field(1, help="resampling-clustering steps per level (paper: r nearest rows per cluster)")
    resample_points: int = field(0, help="r: rows kept per cluster in a resampling step (0: max(1, rows/(4K)))")
    label: str = field("habit", help="label column for per-label counts before/after ('' or absent: none)")

    def validate(self) -> None:
        if not self.levels or any(k < 1 for k in self.levels):
            raise ValueError(f"levels must be ≥ 1 clusters each, got {self.levels}")
        if any(b > a for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError(f"levels must not grow upwards (bottom first), got {self.levels}")
        if self.target < 1 or self.iters < 1 or self.init_sample < 1 or self.resample_steps < 0 \
                or self.resample_points < 0:
            raise ValueError("need target ≥ 1, iters ≥ 1, init_sample ≥ 1, resample_steps ≥ 0, resample_points ≥ 0")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2^63)")


# ------------------------------------------------------------------------------- helpers

def block_range(n_rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``rank``: a contiguous run of whole blocks (the last may be short)."""
    return dist.block_range(n_rows, rank, size, BLOCK)


def normalise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 rows, valid mask); non-finite or zero rows become zeros, invalid."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x.astype(np.float64), axis=1)
    valid = np.isfinite(norm) & (norm > 0)
    out = np.zeros_like(x)
    out[valid] = (x[valid] / norm[valid, None]).astype(np.float32)
    return out, valid


def _allreduce(comm: Any, arrays: list[np.ndarray]) -> None:
    """Sum arrays over ranks in place, in one float64 collective."""
    dist.allreduce_sum(comm, arrays, np.float64)


def _assign(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid by cosine, its cosine) of every row of ``x``, in chunks."""
    a = np.empty(len(x), dtype=np.int64)
    s = np.empty(len(x), dtype=np.float64)
    c32 = c.astype(np.float32)
    for i in range(0, len(x), _CHUNK):
        sim = x[i:i + _CHUNK] @ c32.T
        a[i:i + _CHUNK] = sim.argmax(axis=1)
        s[i:i + _CHUNK] = sim[np.arange(len(sim)), a[i:i + _CHUNK]]
    return a, s


def _cluster_sums(x: np.ndarray, a: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ x̂ [k, D] and counts [k] (float64) of the rows with weight ``w`` (0/1) per cluster."""
    from scipy.sparse import csr_matrix

    keep = np.flatnonzero(w)
    onehot = csr_matrix((np.ones(len(keep)), (a[keep], keep)), shape=(k, len(x)))
    sums = np.asarray(onehot @ x.astype(np.float64))
    return sums, np.bincount(a[keep], minlength=k).astype(np.float64)


def _kmeanspp(pts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (D² sampling of 2 + ⌊ln k⌋ candidates per step, keeping the one that
    lowers the potential most; squared chordal distance 2 − 2cos) on unit rows ``pts``."""
    def d2_to(j: int) -> np.ndarray:
        return np.maximum(2.0 - 2.0 * (pts @ pts[j]).astype(np.float64), 0.0)

    trials = 2 + int(np.log(k))
    idx = [int(rng.integers(len(pts)))]
    d2 = d2_to(idx[0])
    for _ in range(1, k):
        tot = d2.sum()
        if tot <= 0:
            cands = rng.integers(len(pts), size=trials)
        else:
            cands = np.minimum(np.searchsorted(np.cumsum(d2), rng.random(trials) * tot), len(pts) - 1)
        best = None
        for j in cands:
            nd = np.minimum(d2, d2_to(int(j)))
            if best is None or nd.sum() < best[1].sum():
                best = (int(j), nd)
        idx.append(best[0])
        d2 = best[1]
    return pts[idx].astype(np.float64)


def _unit(c: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(c, axis=1, keepdims=True)
    return np.where(n > 0, c / np.where(n > 0, n, 1.0), fallback)


@dataclass
class Points:
    """The rows one rank clusters: unit rows ``x`` [m, D], global row ``index`` [m], ``valid`` [m]."""

    x: np.ndarray
    index: np.ndarray
    valid: np.ndarray


def lloyd(pts: Points, c: np.ndarray, iters: int, comm: Any, weight: np.ndarray | None = None
          ) -> tuple[np.ndarray, list[float], int]:
    """Spherical Lloyd iterations from centroids ``c`` [K, D] over the rows with ``weight`` (0/1).

    Returns (centroids, seconds per iteration, iterations run). One Allreduce per iteration of Σx̂,
    counts and the number of rows that changed cluster; stops when none did. An empty cluster
    keeps its centroid (deterministic, same on every rank)."""
    k = len(c)
    w = pts.valid.astype(np.float64) if weight is None else weight * pts.valid
    prev = np.full(len(pts.x), -1)
    times: list[float] = []
    for it in range(iters):
        t = time.perf_counter()
        a, _ = _assign(pts.x, c)
        sums, counts = _cluster_sums(pts.x, a, w, k)
        moved = np.array([float(np.sum((a != prev) & (w > 0)))])
        _allreduce(comm, [sums, counts, moved])
        c = _unit(sums, c)
        prev = a
        times.append(time.perf_counter() - t)
        if moved[0] == 0:
            break
    return c, times, len(times)


def _gather_rows(pts: Points, rows: np.ndarray, comm: Any) -> np.ndarray:
    """Unit embeddings of the global ``rows`` (sorted), in that order, on every rank."""
    mine = np.isin(pts.index, rows)
    parts = comm.allgather((pts.index[mine], pts.x[mine]))
    idx = np.concatenate([p[0] for p in parts])
    x = np.concatenate([p[1] for p in parts]).reshape(len(idx), pts.x.shape[1])
    return x[np.argsort(idx, kind="stable")]


def _init(pts: Points, n_total: int, k: int, cfg: CurateConfig, level: int, comm: Any) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, level])
    m = min(n_total, cfg.init_sample * k)
    rows = np.sort(rng.choice(n_total, size=m, replace=False))
    x = _gather_rows(pts, rows, comm)
    x = x[np.linalg.norm(x, axis=1) > 0]  # invalid rows are zeros
    if len(x) < k:
        raise CurateError(f"level {level}: {k} clusters but only {len(x)} usable rows in the init sample; "
                          f"use fewer clusters (levels) or a larger init_sample")
    if cfg.init == "random":
        return x[np.sort(rng.choice(len(x), size=k, replace=False))].astype(np.float64)
    return _kmeanspp(x, k, rng)


def _nearest_per_cluster(pts: Points, c: np.ndarray, r: int, comm: Any) -> np.ndarray:
    """0/1 weights of the rows among the r most similar to their centroid, per cluster, globally
    (ties by row index): each rank offers its local top-r per cluster, every rank picks the same."""
    a, s = _assign(pts.x, c)
    ok = pts.valid
    order = np.lexsort((pts.index[ok], -s[ok], a[ok]))
    ai, si, ri = a[ok][order], s[ok][order], pts.index[ok][order]
    starts = np.searchsorted(ai, np.arange(len(c)))
    rank_in = np.arange(len(ai)) - starts[ai]
    keep = rank_in < r
    offers = comm.allgather((ai[keep], si[keep], ri[keep]))
    ca = np.concatenate([o[0] for o in offers])
    cs = np.concatenate([o[1] for o in offers])
    cr = np.concatenate([o[2] for o in offers])
    order = np.lexsort((cr, -cs, ca))
    ca, cr = ca[order], cr[order]
    starts = np.searchsorted(ca, np.arange(len(c)))
    chosen = cr[(np.arange(len(ca)) - starts[ca]) < r]
    return np.isin(pts.index, chosen).astype(np.float64)


def cluster_level(pts: Points, n_total: int, k: int, cfg: CurateConfig, level: int, comm: Any
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """One level: init, Lloyd, resampling-clustering steps. Returns (unit centroids, facts)."""
    c = _init(pts, n_total, k, cfg, level, comm)
    c, times, its = lloyd(pts, c, cfg.iters, comm)
    r = cfg.resample_points or max(1, n_total // (4 * k))
    for _ in range(cfg.resample_steps):
        w = _nearest_per_cluster(pts, c, r, comm)
        c, t2, i2 = lloyd(pts, c, cfg.iters, comm, weight=w)
        times += t2
        its += i2
    return c, {"clusters": k, "iterations": its, "resample_points": r if cfg.resample_steps else 0,
               "seconds_per_iteration": float(np.mean(times)) if times else 0.0, "iteration_s": times}


def water_fill(quota: int, caps: np.ndarray) -> np.ndarray:
    """Split ``quota`` as evenly as possible over bins holding at most ``caps`` (integers): small
    bins are filled, the remainder is shared by the others; leftovers go to the lowest indices."""
    caps = np.asarray(caps, dtype=np.int64)
    out = np.zeros(len(caps), dtype=np.int64)
    left = min(int(quota), int(caps.sum()))
    open_ = caps > 0
    while left > 0 and open_.any():
        idx = np.flatnonzero(open_)
        share = left // len(idx)
        room = caps[idx] - out[idx]
        if share == 0:  # fewer units than open bins: one each to the lowest indices
            out[idx[:left]] += 1
            break
        add = np.minimum(room, share)
        out[idx] += add
        left -= int(add.sum())
        open_ = out < caps
    return out


def tree_quotas(target: int, sizes: list[np.ndarray], parents: list[np.ndarray]) -> list[np.ndarray]:
    """Quota per cluster of every level (bottom first) by balanced sampling from the top down.
    ``sizes[l]`` rows per cluster of level l; ``parents[l]`` its cluster at level l + 1."""
    top = len(sizes) - 1
    q = [np.zeros(len(s), dtype=np.int64) for s in sizes]
    q[top] = water_fill(target, sizes[top])
    for lv in range(top - 1, -1, -1):
        for p in range(len(sizes[lv + 1])):
            kids = np.flatnonzero(parents[lv] == p)
            if len(kids):
                q[lv][kids] = water_fill(int(q[lv + 1][p]), sizes[lv][kids])
    return q


def priorities(seed: int, lo: int, hi: int) -> np.ndarray:
    """Seeded uniform priority of global rows [lo, hi) (lo block-aligned): Philox keyed by (seed, block)."""
    out = []
    for b in range(lo // BLOCK, -(-hi // BLOCK)):
        g = np.random.Generator(np.random.Philox(key=np.array([seed, b], dtype=np.uint64)))
        out.append(g.random(BLOCK))
    full = np.concatenate(out) if out else np.zeros(0)
    return full[: hi - lo]


def entropy(counts: dict[str, int]) -> float:
    """Shannon entropy (bits) of a label distribution."""
    n = np.array([v for v in counts.values() if v > 0], dtype=np.float64)
    if not n.size:
        return 0.0
    p = n / n.sum()
    return float(-(p * np.log2(p)).sum())


def _distribution(sizes: np.ndarray) -> dict[str, Any]:
    s = np.asarray(sizes, dtype=np.float64)
    nz = s[s > 0]
    return {"clusters": int(len(s)), "nonempty": int(len(nz)), "min": float(s.min()), "median": float(np.median(s)),
            "max": float(s.max()), "max_over_median": float(nz.max() / np.median(nz)) if nz.size else None,
            "entropy_bits": entropy({str(i): v for i, v in enumerate(s)}), "sizes": s.astype(int).tolist()}


def read_rows(store: Store, lo: int, hi: int, columns: list[str]) -> tuple[Points, dict[str, np.ndarray]]:
    xs, metas = [], {c: [] for c in columns}
    for s in range(lo, hi, 32 * BLOCK):
        e, m = store.read(s, min(hi, s + 32 * BLOCK), columns)
        xs.append(normalise(e))
        for c in columns:
            metas[c].append(m[c])
    d = store.dim
    x = np.concatenate([a for a, _ in xs]) if xs else np.zeros((0, d), np.float32)
    valid = np.concatenate([v for _, v in xs]) if xs else np.zeros(0, bool)
    meta = {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in metas.items()}
    return Points(x, np.arange(lo, hi), valid), meta


def compute(store: Store, cfg: CurateConfig, comm: Any) -> dict[str, Any] | None:
    """Cluster, sample, and return the result on rank 0 (None elsewhere)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    n = store.n_rows
    t0 = time.perf_counter()
    label = cfg.label if cfg.label and cfg.label in store.columns else ""
    cols = [c for c in ("key", label) if c and c in store.columns]
    lo, hi = block_range(n, rank, size)
    err = None
    try:
        pts, meta = read_rows(store, lo, hi, cols)
    except (StoreError, OSError, ValueError) as exc:
        err, pts, meta = exc, None, {}
    dist.agree_on_errors(comm, err, CurateError)
    n_valid = int(comm.allreduce(int(pts.valid.sum())))
    if n_valid < cfg.levels[0]:
        raise CurateError(f"{store.path}: {n_valid} usable rows, fewer than the {cfg.levels[0]} level-1 clusters")
    t_read = time.perf_counter() - t0

    # level 1: distributed over rows
    c1, facts1 = cluster_level(pts, n, cfg.levels[0], cfg, 1, comm)
    a1, s1 = _assign(pts.x, c1)
    a1[~pts.valid] = -1
    ok = pts.valid
    sizes1 = np.bincount(a1[ok], minlength=len(c1)).astype(np.float64)
    obj = np.array([float(np.sum(1.0 - s1[ok]))])
    _allreduce(comm, [sizes1, obj])
    sums1, _ = _cluster_sums(pts.x, np.where(ok, a1, 0), ok.astype(np.float64), len(c1))
    _allreduce(comm, [sums1])
    with np.errstate(invalid="ignore", divide="ignore"):
        inertia = float(n_valid - np.sum(np.where(sizes1 > 0, (sums1 ** 2).sum(1) / np.maximum(sizes1, 1), 0.0)))
    facts1.update(cosine_objective=float(obj[0]), inertia_euclidean=inertia)
    # upper levels: on the centroids below, the same on every rank (rank 0's, broadcast)
    c1 = comm.bcast(c1 if rank == 0 else None, root=0)
    centroids, facts, parents = [c1], [facts1], []
    sizes = [sizes1.astype(np.int64)]
    serial = SerialComm()
    for lv, k in enumerate(cfg.levels[1:], start=2):
        below = centroids[-1]
        p = Points(below.astype(np.float32), np.arange(len(below)), np.ones(len(below), bool))
        c, f = cluster_level(p, len(below), k, cfg, lv, serial)
        par, _ = _assign(p.x, c)
        parents.append(par)
        centroids.append(c)
        sizes.append(np.bincount(par, weights=sizes[-1], minlength=k).astype(np.int64))
        facts.append(f)
    parents.append(np.zeros(len(centroids[-1]), dtype=np.int64))  # the top level's parent: the root
    quotas = tree_quotas(cfg.target, sizes, parents)

    # sampling in the level-1 clusters: global smallest priorities per cluster
    prio = priorities(cfg.seed, lo, hi)
    q1 = quotas[0]
    order = np.lexsort((pts.index[ok], prio[ok], a1[ok]))
    ai, pi, ri = a1[ok][order], prio[ok][order], pts.index[ok][order]
    starts = np.searchsorted(ai, np.arange(len(q1)))
    keep = (np.arange(len(ai)) - starts[ai]) < q1[ai]
    offers = comm.allgather((ai[keep], pi[keep], ri[keep]))
    ca = np.concatenate([o[0] for o in offers])
    cp = np.concatenate([o[1] for o in offers])
    cr = np.concatenate([o[2] for o in offers])
    order = np.lexsort((cr, cp, ca))
    ca, cr = ca[order], cr[order]
    starts = np.searchsorted(ca, np.arange(len(q1)))
    chosen = np.sort(cr[(np.arange(len(ca)) - starts[ca]) < q1[ca]])
    sel = np.isin(pts.index, chosen)

    key = meta["key"] if "key" in meta else np.array([str(i) for i in pts.index])
    lab = meta[label] if label else None
    local = {"row": pts.index[sel], "key": np.asarray(key)[sel].astype(str), "l1": a1[sel],
             "label": None if lab is None else np.asarray(lab)[sel].astype(str)}
    before: dict[str, int] = {}
    if lab is not None:
        u, cnt = np.unique(np.asarray(lab)[ok].astype(str), return_counts=True)
        before = dict(zip(u.tolist(), cnt.tolist()))
    got = comm.gather((local, before, a1.astype(np.int32)), root=0)
    if rank != 0:
        return None
    rows = {k: np.concatenate([g[0][k] for g in got]) if k != "label" or lab is not None else None for k in local}
    assignments = np.concatenate([g[2] for g in got])
    label_before: dict[str, int] = {}
    for g in got:
        for k, v in g[1].items():
            label_before[k] = label_before.get(k, 0) + v
    paths = [rows["l1"]]
    for par in parents[:-1]:
        paths.append(par[paths[-1]])
    selected = [np.bincount(p, minlength=len(c)) for p, c in zip(paths, centroids)]
    label_after: dict[str, int] = {}
    if rows["label"] is not None:
        u, cnt = np.unique(rows["label"], return_counts=True)
        label_after = dict(zip(u.tolist(), cnt.tolist()))
    levels_out = []
    for lv, (f, s, q) in enumerate(zip(facts, sizes, selected), start=1):
        levels_out.append({**{k: v for k, v in f.items()}, "level": lv,
                           "sizes_before": _distribution(s), "sizes_after": _distribution(q)})
    summary = {
        "rows": n, "rows_usable": n_valid, "rows_selected": int(len(rows["row"])), "target": cfg.target,
        "dim": store.dim, "ranks": size, "label_column": label or None, "levels": levels_out,
        "labels_before": dict(sorted(label_before.items())), "labels_after": dict(sorted(label_after.items())),
        "label_entropy_bits_before": entropy(label_before) if label else None,
        "label_entropy_bits_after": entropy(label_after) if label else None,
        "timings": {"read_s": t_read, "total_s": time.perf_counter() - t0},
    }
    return {"summary": summary, "rows": rows, "paths": paths, "centroids": centroids, "sizes": sizes,
            "selected": selected, "parents": parents, "assignments": assignments}


# --------------------------------------------------------------------------------- output

#: curate.json, sealed last over curated.csv and clusters.h5: the curate run's output contract.
CONTRACT = Contract("curate.json", ("curated.csv", "clusters.h5"))
STAGE = storestage.StoreStage("curate", CONTRACT)
FINGERPRINT_EXTRA = {"block": BLOCK}


def write_outputs(out: Path, res: dict[str, Any], label: str | None) -> list[Path]:
    """curated.csv and clusters.h5 (the marker curate.json is sealed after them); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows, paths = res["rows"], res["paths"]
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["key", "row", *[f"cluster_l{i + 1}" for i in range(len(paths))], *([label] if label else [])])
    for i in range(len(rows["row"])):
        wr.writerow([rows["key"][i], int(rows["row"][i]), *[int(p[i]) for p in paths],
                     *([rows["label"][i]] if label else [])])
    write_atomic(out / "curated.csv", buf.getvalue())

    def fill(f: Any) -> None:
        for lv, (c, s, q, p) in enumerate(zip(res["centroids"], res["sizes"], res["selected"], res["parents"]), 1):
            g = f.create_group(f"level_{lv}")
            g.create_dataset("centroids", data=c.astype(np.float32))
            g.create_dataset("sizes", data=np.asarray(s, dtype=np.int64))
            g.create_dataset("selected", data=np.asarray(q, dtype=np.int64))
            g.create_dataset("parent", data=np.asarray(p, dtype=np.int64))
        f.create_dataset("assignments", data=res["assignments"])
        f.attrs["levels"] = len(res["centroids"])

    _atomic_h5(out / "clusters.h5", fill)
    return [out / "curated.csv", out / "clusters.h5"]


def fingerprint(store: Store, cfg: CurateConfig) -> str:
    return storestage.fingerprint(store, cfg, FINGERPRINT_EXTRA)


def run_curate(store_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: CurateConfig, force: bool = False,
               comm: Any = None, provenance: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Library entry: skip if ``out_dir`` holds this exact run (its marker verifies every file), else
    compute; rank 0 holds the folder lock throughout and writes. Returns the summary on rank 0 (None
    when up to date)."""

    def write(out: Path, res: dict[str, Any], fp: str, started: float, store: Store):
        res["summary"].update(store=str(store.path), store_sha256=store.sha256, fingerprint=fp,
                              config=cfglib.to_dict(cfg), config_source=provenance, **run_facts(started))
        files = write_outputs(out, res, res["summary"]["label_column"])
        return res["summary"], files, res["summary"]

    return storestage.run(STAGE, store_path, out_dir, cfg, extra=FINGERPRINT_EXTRA, compute=compute, write=write,
                          force=force, comm=comm)


def status(args: argparse.Namespace) -> Status:
    """Would ``icehpc curate ARGS`` skip? (read-only)."""
    return storestage.status(STAGE, args.store, args.out, config_from_args(args), FINGERPRINT_EXTRA,
                             force=getattr(args, "force", False))


# ------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="embedding store: master .h5, a hand-written .h5, or a folder with store.h5")
    parser.add_argument("--out", required=True, help="output folder (curated.csv, clusters.h5, curate.json)")
    parser.add_argument("--levels", help="clusters per level, bottom first, e.g. 1000,100,10 (= config key levels)")
    parser.add_argument("--force", action="store_true", help="recompute even if --out is up to date")
    cfglib.add_config_arguments(parser, CurateConfig, {"--target": "target", "--seed": "seed", "--iters": "iters",
                                                       "--label": "label", "--init": "init"})


def config_from_args(args: argparse.Namespace) -> CurateConfig:
    ov = list(args.overrides)
    if args.levels:
        try:
            ov.append("levels=" + json.dumps([int(k) for k in args.levels.split(",") if k.strip()]))
        except ValueError:
            raise cfglib.ConfigError(f"--levels {args.levels!r}: expected integers like 1000,100,10") from None
    return cfglib.from_args(CurateConfig, argparse.Namespace(**{**vars(args), "overrides": ov}))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    comm = mpi_comm()
    res = run_curate(args.store, args.out, cfg, force=args.force, comm=comm, provenance=cfglib.provenance(args, cfg))
    if res is not None:
        l1 = res["levels"][0]
        ent = (f"; label entropy {res['label_entropy_bits_before']:.3f} → {res['label_entropy_bits_after']:.3f} bits"
               if res["label_column"] else "")
        print(f"icehpc curate: {res['rows']} rows × D={res['dim']} on {res['ranks']} rank(s), levels "
              f"{cfg.levels}: kept {res['rows_selected']} (target {cfg.target}); level 1 {l1['iterations']} "
              f"iterations, {1e3 * l1['seconds_per_iteration']:.1f} ms/iteration{ent} → {args.out}")
    return 0
