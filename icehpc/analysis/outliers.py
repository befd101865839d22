"""Rare habits and likely mislabels from an embedding store: ``icehpc outliers``.

``icehpc outliers STORE --out DIR [--label habit] [--k 20] [--images SHARDS]``, any number of MPI
ranks or none. Every rank owns the query rows of whole global blocks (as in ``curate``) and streams
the whole store once in reference blocks of ``block_rows`` rows; per query it keeps the k most
cosine-similar other rows (leave-self-out). Scratch is one [block_rows, block_rows + k] similarity
matrix, so memory per rank is O(rows/ranks · D + block_rows²), whatever the store size; the
reference blocks are global, so results do not depend on the rank count.

Scores (higher = more suspicious):

- ``rarity``: cosine distance to the k-th neighbour over its median over all rows (≈ 1 typical;
  large where the embedding space is sparse: rare shapes);
- ``local_ratio``: the same distance over the mean of the neighbours' own k-th distances (a
  local-outlier factor: large for a row in a sparser spot than its neighbours);
- ``mislabel`` (with ``--label``): 1 − the weighted kNN probability of the row's own label (votes
  exp((cos − 1)/T) of its k neighbours, the probe's DINO protocol), leave-self-out.

Output in DIR: ``outliers.csv`` (``key``, ``rarity``, ``local_ratio``, and the label and
``mislabel`` with ``--label``; rows in store order; empty scores for non-finite or zero rows),
``outliers.html`` (per class the top-ranked samples, with thumbnails when ``--images`` names the
shard folder the store was embedded from; every string escaped) and ``outliers.json`` (written
last: config, provenance, fingerprint, score summaries). A rerun with the same inputs is up to date.
"""
from __future__ import annotations

import argparse
import base64
import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfglib
from ..config import field
from ..contract import Contract, Status
from ..dist import mpi_comm
from ..fileio import csv_text, run_facts, write_atomic
from .curate import block_range, normalise
from . import storestage
from .store import Store


class OutliersError(cfglib.UserError):
    """Bad input or configuration for the outlier scores."""


@dataclass
class OutliersConfig:
    k: int = field(20, help="neighbours per row")
    label: str = field("", help="label column for the mislabel score ('' : rarity only)")
    temperature: float = field(0.07, help="kNN vote temperature of the mislabel score")
    block_rows: int = field(2048, help="query/reference block rows: scratch is block_rows × (block_rows + k) floats")
    top: int = field(12, help="samples per class on the HTML page")

    def validate(self) -> None:
        if self.k < 1 or self.temperature <= 0 or self.block_rows < 1 or self.top < 0:
            raise ValueError("need k ≥ 1, temperature > 0, block_rows ≥ 1, top ≥ 0")


def knn_blocks(store: Store, q: np.ndarray, q_index: np.ndarray, k: int, block_rows: int
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(similarities [m, k] descending, global neighbour rows [m, k], largest scratch in floats)
    of the unit query rows ``q`` (global rows ``q_index``) against every other valid store row."""
    m = len(q)
    best_s = np.full((m, k), -np.inf, dtype=np.float64)
    best_i = np.full((m, k), -1, dtype=np.int64)
    scratch = 0
    q64 = q.astype(np.float64)
    for r0 in range(0, store.n_rows, block_rows):
        r1 = min(store.n_rows, r0 + block_rows)
        emb, _ = store.read(r0, r1, [])
        ref, valid = normalise(emb)
        ridx = np.arange(r0, r1)
        for s0 in range(0, m, block_rows):
            s1 = min(m, s0 + block_rows)
            sim = q64[s0:s1] @ ref.astype(np.float64).T  # float64: block shapes do not move the ranks
            sim[:, ~valid] = -np.inf
            own = (q_index[s0:s1, None] == ridx[None, :])
            sim[own] = -np.inf  # leave self out
            cs = np.concatenate([best_s[s0:s1], sim], axis=1)
            ci = np.concatenate([best_i[s0:s1], np.broadcast_to(ridx, sim.shape)], axis=1)
            scratch = max(scratch, cs.size)
            kk = min(k, cs.shape[1])
            # stable: ties keep the lower row (kept neighbours come from earlier blocks), so the
            # result does not depend on block sizes or on the rank count
            order = np.argsort(-cs, axis=1, kind="stable")[:, :kk]
            best_s[s0:s1, :kk] = np.take_along_axis(cs, order, 1)
            best_i[s0:s1, :kk] = np.take_along_axis(ci, order, 1)
    return best_s, best_i, scratch


def compute(store: Store, cfg: OutliersConfig, comm: Any) -> dict[str, Any] | None:
    rank, size = comm.Get_rank(), comm.Get_size()
    n = store.n_rows
    t0 = time.perf_counter()
    if cfg.label and cfg.label not in store.columns:
        raise OutliersError(f"store {store.path} has no meta column '{cfg.label}' (columns: {store.columns}); "
                            "choose the class column with --label")
    if n < 2:
        raise OutliersError(f"store {store.path} has {n} rows; need at least 2")
    k = min(cfg.k, n - 1)
    lo, hi = block_range(n, rank, size)
    emb, meta = store.read(lo, hi, [c for c in ("key",) if c in store.columns])
    q, qvalid = normalise(emb)
    qidx = np.arange(lo, hi)
    sims, nbrs, scratch = knn_blocks(store, q, qidx, k, cfg.block_rows)
    t_knn = time.perf_counter() - t0
    dk = np.where(qvalid, 1.0 - sims[:, -1], np.nan)
    dk_all = np.concatenate(comm.allgather(dk))
    med = float(np.nanmedian(dk_all)) if np.isfinite(dk_all).any() else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        rarity = dk / med if med > 0 else dk
        nb = np.where(nbrs >= 0, nbrs, 0)
        local = dk / np.nanmean(np.where(nbrs >= 0, dk_all[nb], np.nan), axis=1)
    mis = None
    labels_all = None
    if cfg.label:
        _, m2 = store.read(0, n, [cfg.label], embeddings=False)
        labels_all = np.asarray(m2[cfg.label]).astype(str)
        classes, codes = np.unique(labels_all, return_inverse=True)
        w = np.exp((sims.astype(np.float64) - 1.0) / cfg.temperature)
        w[nbrs < 0] = 0.0
        same = codes[nb] == codes[qidx][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mis = np.where(qvalid, 1.0 - (w * same).sum(1) / w.sum(1), np.nan)
    keys = np.asarray(meta["key"]).astype(str) if "key" in meta else qidx.astype(str)
    got = comm.gather((keys, rarity, local, mis, nbrs, scratch), root=0)
    if rank != 0:
        return None
    res = {"key": np.concatenate([g[0] for g in got]), "rarity": np.concatenate([g[1] for g in got]),
           "local_ratio": np.concatenate([g[2] for g in got]),
           "mislabel": None if mis is None else np.concatenate([g[3] for g in got]),
           "neighbours": np.concatenate([g[4] for g in got]), "label": labels_all}

    def stats(v: np.ndarray) -> dict[str, float]:
        v = v[np.isfinite(v)]
        return {"mean": float(v.mean()), "p50": float(np.median(v)), "p99": float(np.quantile(v, 0.99)),
                "max": float(v.max())} if v.size else {}

    res["summary"] = {
        "rows": n, "dim": store.dim, "ranks": size, "k": k, "label_column": cfg.label or None,
        "median_kth_distance": med, "rarity": stats(res["rarity"]), "local_ratio": stats(res["local_ratio"]),
        "mislabel": None if mis is None else stats(res["mislabel"]),
        "max_scratch_floats": int(max(g[5] for g in got)),
        "rows_unusable": int(np.sum(~np.isfinite(res["rarity"]))),
        "timings": {"knn_s": t_knn, "total_s": time.perf_counter() - t0},
    }
    return res


# --------------------------------------------------------------------------------- output

def _num(v: float) -> str:
    return repr(float(v)) if np.isfinite(v) else ""


def thumbnails(shard_dir: str | os.PathLike, keys: set[str]) -> dict[str, str]:
    """key → data: URI of its PNG, for the ``keys`` found in the shard folder."""
    from ..data.format import iter_samples, shard_paths

    out: dict[str, str] = {}
    for path in shard_paths(shard_dir):
        for key, sample in iter_samples(path, ("png",)):
            if key in keys:
                out[key] = "data:image/png;base64," + base64.b64encode(sample["png"]).decode()
        if len(out) == len(keys):
            break
    return out


def html_page(res: dict[str, Any], cfg: OutliersConfig, thumbs: dict[str, str] | None) -> str:
    esc = html.escape
    label = res["label"]
    score_name = "mislabel" if res["mislabel"] is not None else "rarity"
    groups = sorted(set(label.tolist())) if label is not None else ["all samples"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>icehpc outliers</title><style>"
             "body{font-family:sans-serif}figure{display:inline-block;margin:4px;width:140px;font-size:11px;"
             "vertical-align:top}img{max-width:128px;max-height:128px;border:1px solid #ccc}</style></head><body>",
             f"<h1>icehpc outliers: top {cfg.top} per class by {esc(score_name)}</h1>",
             f"<p>{res['summary']['rows']} rows, k = {res['summary']['k']}; higher = more suspicious. "
             f"Also by rarity (kNN distance / median).</p>"]
    for g in groups:
        for name in dict.fromkeys([score_name, "rarity"]):
            v = res[name]
            rows = np.flatnonzero(np.isfinite(v) & ((label == g) if label is not None else True))
            rows = rows[np.argsort(-v[rows], kind="stable")][: cfg.top]
            parts.append(f"<h2>{esc(str(g))} — top by {esc(name)} ({len(rows)})</h2><div>")
            for r in rows:
                key = str(res["key"][r])
                img = (f"<img src='{esc(thumbs[key])}' alt='{esc(key)}'>" if thumbs and key in thumbs
                       else "<div>(no image)</div>")
                extra = "" if res["mislabel"] is None else f"<br>mislabel {res['mislabel'][r]:.3f}"
                nb_lab = ""
                if label is not None:
                    nl = [str(label[j]) for j in res["neighbours"][r] if j >= 0][:5]
                    nb_lab = "<br>neighbours: " + esc(", ".join(nl))
                parts.append(f"<figure>{img}<figcaption>{esc(key)}<br>rarity {res['rarity'][r]:.3f}{extra}"
                             f"{nb_lab}</figcaption></figure>")
            parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


#: outliers.json, sealed last over the table and the page: the outliers run's output contract.
CONTRACT = Contract("outliers.json", ("outliers.csv", "outliers.html"))
STAGE = storestage.StoreStage("outliers", CONTRACT)


def write_outputs(out: Path, res: dict[str, Any], cfg: OutliersConfig, images: str | None) -> list[Path]:
    """outliers.csv and outliers.html (the marker is sealed after them); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    has_label = res["label"] is not None
    write_atomic(out / "outliers.csv", csv_text(
        ["key", "rarity", "local_ratio", *([cfg.label, "mislabel"] if has_label else [])],
        ([res["key"][i], _num(res["rarity"][i]), _num(res["local_ratio"][i]),
          *([res["label"][i], _num(res["mislabel"][i])] if has_label else [])] for i in range(len(res["key"])))))
    thumbs = None
    if images:
        shown: set[str] = set()
        for name in ("rarity", "mislabel"):
            v = res[name]
            if v is None:
                continue
            groups = np.unique(res["label"]) if has_label else [None]
            for g in groups:
                rows = np.flatnonzero(np.isfinite(v) & ((res["label"] == g) if g is not None else True))
                shown.update(str(res["key"][r]) for r in rows[np.argsort(-v[rows], kind="stable")][: cfg.top])
        thumbs = thumbnails(images, shown)
    write_atomic(out / "outliers.html", html_page(res, cfg, thumbs))
    return [out / "outliers.csv", out / "outliers.html"]


def fingerprint_extra(images: str | None) -> dict[str, Any]:
    """What shapes the result beyond config and store: the shard build shown on the page (its index
    fingerprint)."""
    img = None
    if images:
        from ..data.format import read_index

        img = read_index(images).get("fingerprint")
    return {"images": img}


def fingerprint(store: Store, cfg: OutliersConfig, images: str | None) -> str:
    return storestage.fingerprint(store, cfg, fingerprint_extra(images))


def run_outliers(store_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: OutliersConfig, *,
                 images: str | None = None, force: bool = False, comm: Any = None,
                 provenance: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Library entry: up to date (the marker verifies every file) → None; else compute, rank 0
    writes under the folder lock and returns the summary."""

    def write(out: Path, res: dict[str, Any], fp: str, started: float, store: Store):
        res["summary"].update(store=str(store.path), store_sha256=store.sha256, images=images, fingerprint=fp,
                              config=cfglib.to_dict(cfg), config_source=provenance, **run_facts(started))
        files = write_outputs(out, res, cfg, images)
        return res["summary"], files, res["summary"]

    return storestage.run(STAGE, store_path, out_dir, cfg, extra=lambda store: fingerprint_extra(images),
                          compute=compute, write=write, force=force, comm=comm)


def status(args: argparse.Namespace) -> Status:
    """Would ``icehpc outliers ARGS`` skip? (read-only)."""
    if getattr(args, "force", False):
        return Status(False, "--force")
    try:
        extra = fingerprint_extra(args.images)
    except (OSError, ValueError) as exc:
        return Status(False, f"--images cannot be read yet ({exc})")
    return storestage.status(STAGE, args.store, args.out, cfglib.from_args(OutliersConfig, args), extra)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="embedding store: master .h5, a hand-written .h5, or a folder with store.h5")
    parser.add_argument("--out", required=True, help="output folder (outliers.csv, outliers.html, outliers.json)")
    parser.add_argument("--images", help="shard folder the store was embedded from: thumbnails on the HTML page")
    parser.add_argument("--force", action="store_true", help="recompute even if --out is up to date")
    cfglib.add_config_arguments(parser, OutliersConfig, {"--label": "label", "--k": "k", "--block-rows": "block_rows",
                                                         "--temperature": "temperature", "--top": "top"})


def run(args: argparse.Namespace) -> int:
    cfg = cfglib.from_args(OutliersConfig, args)
    comm = mpi_comm()
    res = run_outliers(args.store, args.out, cfg, images=args.images, force=args.force, comm=comm,
                       provenance=cfglib.provenance(args, cfg))
    if res is not None:
        print(f"icehpc outliers: {res['rows']} rows × D={res['dim']} on {res['ranks']} rank(s), k = {res['k']}, "
              f"{res['timings']['total_s']:.1f} s → {args.out}")
    return 0
