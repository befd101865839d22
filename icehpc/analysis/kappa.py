"""MPI-parallel vMF concentration κ per group of L2-normalised embeddings, with bootstrap CIs.

``icehpc kappa STORE --out DIR [--by COLUMNS]`` — one pass over the embeddings, any number of
ranks (mpiexec/srun) or none:

1. every rank reads the metadata of its row range; categorical levels and the range of auto-binned
   numeric columns are agreed with one allgather, so group ids mean the same on every rank;
2. every rank reads its embeddings, L2-normalises them in float64 and accumulates per group the
   count, Σx̂ and, for B Poisson(1) bootstrap replicates, Σw, Σw² and Σw·x̂;
3. one Allreduce; rank 0 turns the sums into R̄, κ̂ and CIs and writes ``kappa.csv``,
   ``kappa.json`` and ``similarity.csv`` atomically.

Rank-count invariance: rows are cut into global blocks of :data:`RNG_BLOCK` rows; ranks own
whole blocks, and the Poisson weights of block b come from Philox keyed by (seed, b). The same row
gets the same weights for 1 or 64 ranks, so results agree to float64 summation order (~1e-15).

Statistics. In p ≈ 384 dimensions R̄ of n unit vectors is biased upward by ≈ (1 − A²)/(2nA), which
moves the MLE by more than its standard error even at n = 1000. So besides the exact MLE (and the
paper's closed form) each group reports ``kappa_debiased`` = A_p⁻¹(√Û) with Û = (|Σx̂|² − n)/(n(n−1)),
the mean pairwise cosine, an unbiased estimate of A_p(κ)²; the CI is the percentile interval of
the same estimator over the Poisson bootstrap (Û_b = (|Σwx̂|² − Σw²)/((Σw)² − Σw²)).

Columns from outside the store: ``--columns FILE`` (a CSV with a ``key`` column: a classify run's
predictions.csv, a table of flight-level environment) joins the file's other columns onto the
rows by key (:class:`~icehpc.analysis.keycolumns.JoinedStore`), to group by like the store's own. Every
file must hold the keys of at least ``columns_min_match`` (default half) of the store's rows, else
one line and exit 2; how many matched is printed and recorded (``run.columns``); rows without a
match get empty text or a missing number. Each file's sha256 is part of the fingerprint.

Crossed groupings (``campaign:temperature_c``) are accumulated once; any grouping whose columns are
a subset of another's is summed from it on rank 0 instead of accumulated again.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfgmod
from .. import dist
from ..contract import Contract, Status
from ..dist import mpi_comm
from . import storestage
from .keycolumns import JoinedStore, KeyTable
from .store import Store, StoreError
from ..vmf import kappa_closed_form, kappa_mle
from ..fileio import csv_text, file_sha256, run_facts, write_atomic

RNG_BLOCK = 4096  # rows per bootstrap RNG block; part of the result's definition, not a tuning knob
READ_BLOCKS = 4  # RNG blocks per read (16384 rows ≈ 25 MB of float32 at D = 384)
_ONEHOT_MAX = 256  # up to this many groups in a read, Σx̂ is one one-hot matrix product
#: 1 − R̄ below this: the group's directions agree to float32 rounding (angular spread ≲ 4e-5 rad);
#: κ is reported as inf and the group flagged ``degenerate`` (duplicated or constant embeddings).
DEGENERATE_GAP = 1e-9

from .kappa_groups import BinSpec, Column, KappaConfig, KappaError, parse_groupings, _auto_edges, _bin_labels

# ----------------------------------------------------------------------------- accumulation

def block_range(n_rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``rank``: a contiguous run of whole RNG blocks (the last may be short)."""
    return dist.block_range(n_rows, rank, size, RNG_BLOCK)


_POISSON_LUT: np.ndarray | None = None


def poisson_lut() -> np.ndarray:
    """uint16 → Poisson(1) by inverse CDF at the cell mid-points (2¹⁶ cells; P(k ≥ 8) ≈ 1e-5 is
    folded into 7): mean and variance are 1 to ~1e-5, far inside bootstrap noise."""
    global _POISSON_LUT
    if _POISSON_LUT is None:
        pmf = np.exp(-1.0) / np.cumprod(np.r_[1.0, np.arange(1.0, 20.0)])
        cdf = np.cumsum(pmf)
        u = (np.arange(65536) + 0.5) / 65536
        _POISSON_LUT = np.searchsorted(cdf, u).astype(np.uint8)
    return _POISSON_LUT


def poisson_weights(seed: int, block: int, n_boot: int) -> np.ndarray:
    """[RNG_BLOCK, n_boot] uint8 Poisson(1) weights of global block ``block`` (counter-based)."""
    bits = np.random.Philox(key=np.array([seed, block], dtype=np.uint64))
    raw = bits.random_raw(-(-RNG_BLOCK * n_boot // 4)).view(np.uint16)[: RNG_BLOCK * n_boot]
    return poisson_lut()[raw].reshape(RNG_BLOCK, n_boot)


@dataclass
class Sums:
    """Sufficient statistics of one partition into G groups (float64)."""

    raw: np.ndarray  # [G] rows assigned (incl. skipped ones)
    n: np.ndarray  # [G] valid rows
    s: np.ndarray  # [G, D] Σ x̂
    w: np.ndarray  # [G, B] Σ w
    w2: np.ndarray  # [G, B] Σ w²
    sw: np.ndarray  # [G, B, D] Σ w x̂

    @classmethod
    def zeros(cls, g: int, d: int, b: int) -> "Sums":
        return cls(np.zeros(g), np.zeros(g), np.zeros((g, d)), np.zeros((g, b)), np.zeros((g, b)),
                   np.zeros((g, b, d)))

    def arrays(self) -> list[np.ndarray]:
        return [self.raw, self.n, self.s, self.w, self.w2, self.sw]

    def add(self, codes: np.ndarray, valid: np.ndarray, x: np.ndarray, w: np.ndarray | None) -> None:
        """Accumulate rows with group ``codes`` [m]; ``x`` [m, D] normalised, with rows where
        ``valid`` is False zeroed (they count only in ``raw``), ``w`` [m, B] bootstrap weights."""
        self.raw += np.bincount(codes, minlength=len(self.raw))
        c = np.where(valid, codes, -1)
        groups, local = np.unique(c, return_inverse=True)
        if groups[0] == -1:
            groups, local = groups[1:], local - 1
        if not groups.size:
            return
        self.n[groups] += np.bincount(local[local >= 0], minlength=groups.size)
        if w is None and groups.size <= _ONEHOT_MAX:
            # few groups: one BLAS product Σx̂ = onehotᵀ x, no gather of x (memory-bound otherwise)
            onehot = np.zeros((len(c), groups.size))
            ok = local >= 0
            onehot[np.flatnonzero(ok), local[ok]] = 1.0
            self.s[groups] += onehot.T @ x
            return
        order = np.argsort(local, kind="stable")
        order = order[local[order] >= 0]
        ls = local[order]
        starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])
        ends = np.r_[starts[1:], ls.size]
        xs = x[order]
        ws = None if w is None else w[order].astype(np.float64)
        for k, a, e in zip(groups, starts, ends):
            self.s[k] += xs[a:e].sum(axis=0)
            if ws is not None:
                self.w[k] += ws[a:e].sum(axis=0)
                self.w2[k] += np.einsum("ib,ib->b", ws[a:e], ws[a:e])
                self.sw[k] += ws[a:e].T @ xs[a:e]

    def aggregate(self, mapping: np.ndarray, g_out: int) -> "Sums":
        """Sum groups into coarser ones: group i → ``mapping[i]``."""
        out = Sums.zeros(g_out, self.s.shape[1], self.w.shape[1])
        for a, b in zip(self.arrays(), out.arrays()):
            np.add.at(b, mapping, a)
        return out


# ------------------------------------------------------------------------------------ result

def _estimates(sums: Sums, p: int, cfg: KappaConfig) -> dict[str, np.ndarray]:
    """Per-group R̄, κ̂ (MLE, debiased, closed form) and the percentile CI from ``sums``."""
    n = sums.n
    norm = np.linalg.norm(sums.s, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rbar = np.where(n > 0, norm / np.maximum(n, 1), np.nan)
        u = np.where(n > 1, (norm**2 - n) / (n * (n - 1)), np.nan)
    ok = n >= cfg.min_count
    # identical (or float32-identical) vectors: R̄ = 1 up to rounding, the MLE is a rounding artefact
    # (2.9e17 for 500 copies) — report κ = inf and flag the group instead
    degenerate = ok & (1.0 - np.nan_to_num(rbar, nan=0.0) < DEGENERATE_GAP)
    kappa = np.full(n.shape, np.nan)
    kdeb = np.full(n.shape, np.nan)
    kcf = np.full(n.shape, np.nan)
    lo = np.full(n.shape, np.nan)
    hi = np.full(n.shape, np.nan)
    unstable = np.zeros(n.shape, dtype=bool)
    if ok.any():
        kappa[ok] = kappa_mle(rbar[ok], p)
        kcf[ok] = kappa_closed_form(rbar[ok], p)
        two = ok & np.isfinite(u)  # the debiased estimate needs n ≥ 2 (min_count may be 1)
        kdeb[two] = kappa_mle(np.sqrt(np.clip(u[two], 0.0, 1.0)), p)
    if cfg.bootstrap and ok.any():
        sw2 = np.einsum("gbd,gbd->gb", sums.sw[ok], sums.sw[ok])
        den = sums.w[ok] ** 2 - sums.w2[ok]
        good = den > 0
        ub = np.where(good, (sw2 - sums.w2[ok]) / np.where(good, den, 1.0), np.nan)
        kb = np.full(ub.shape, np.nan)
        kb[good] = kappa_mle(np.sqrt(np.clip(ub[good], 0.0, 1.0)), p)
        alpha = (1.0 - cfg.confidence) / 2
        with np.errstate(all="ignore"):
            q = np.nanquantile(kb, [alpha, 1 - alpha], axis=1)
        lo[ok], hi[ok] = q[0], q[1]
        unstable[ok] = good.mean(axis=1) < 0.95
    for a in (kappa, kdeb, kcf, lo, hi):
        a[degenerate] = np.inf
    unstable[degenerate] = False
    return dict(degenerate=degenerate, n=n, rbar=rbar, mean_cos_centroid=rbar, mean_pairwise_cos=u, kappa=kappa,
                kappa_debiased=kdeb, kappa_closed_form=kcf, ci_low=lo, ci_high=hi,
                unstable=unstable)


def _flags(n_valid: float, est: dict, i: int, cfg: KappaConfig) -> str:
    f = []
    if n_valid == 0:
        f.append("empty")
    elif n_valid < cfg.min_count:
        f.append(f"n<{cfg.min_count}")
    if est["degenerate"][i]:
        f.append("degenerate")
    if est["unstable"][i]:
        f.append("ci_unstable")
    k, lo, hi = est["kappa"][i], est["ci_low"][i], est["ci_high"][i]
    if np.isfinite(k) and np.isfinite(lo) and not lo <= k <= hi:
        f.append("mle_outside_ci")
    return ",".join(f)


CSV_COLUMNS = ["grouping", "group", "n", "n_skipped", "rbar", "mean_cos_centroid", "mean_pairwise_cos",
               "kappa", "kappa_debiased", "kappa_closed_form", "ci_low", "ci_high", "flag"]


@dataclass
class _Partition:
    """One grouping: its columns and the present combinations of level codes (sorted)."""

    cols: tuple[str, ...]
    combos: np.ndarray  # [G, len(cols)] level codes


def compute(store: Store, cfg: KappaConfig, comm: Any = None) -> dict[str, Any] | None:
    """Run the distributed reduction; rank 0 gets the result dict (rows, similarity, run info),
    other ranks None. Raises KappaError/StoreError identically on every rank."""
    comm = comm if comm is not None else mpi_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    t0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    # per-key columns files: every rank reads them (the same bytes everywhere), joined by the store's key
    tables = [KeyTable(p) for p in cfg.columns]
    if tables:
        store = JoinedStore(store, tables)  # type: ignore[assignment]
    groupings = parse_groupings(cfg.groupings)
    if cfg.similarity_by and (cfg.similarity_by,) not in groupings:
        groupings.append((cfg.similarity_by,))
    needed = sorted({c for g in groupings for c in g})
    missing = [c for c in needed if c not in store.column_kinds]
    dropped: dict[str, str] = {}
    if missing and cfg.drop_empty_columns:
        dropped = {":".join(g): f"no column {[c for c in g if c in missing]}" for g in groupings
                   if any(c in missing for c in g)}
        groupings = [g for g in groupings if not any(c in missing for c in g)]
        needed = sorted({c for g in groupings for c in g})
        missing = []
        if not groupings:
            raise KappaError(f"{store.path}: none of the groupings' columns are in the store (have {store.columns})")
    if missing:
        raise KappaError(f"{store.path}: no metadata column(s) {missing} (have {store.columns}); "
                         "choose groupings with --by, or --similarity-by '', or leave out the groupings over "
                         "absent or empty columns with drop_empty_columns=true")
    d, b = store.dim, cfg.bootstrap
    lo, hi = block_range(store.n_rows, rank, size)

    # pass 1: metadata of my rows → global levels → per-column codes
    err: BaseException | None = None
    local: dict[str, Any] = {}
    meta: dict[str, np.ndarray] = {}
    matched = np.zeros(len(tables))
    try:
        _, meta = store.read(lo, hi, columns=needed + (["key"] if tables and "key" not in needed else []),
                             embeddings=False)
        matched[:] = [(t.positions(meta["key"].tolist()) >= 0).sum() for t in tables]
        for c in needed:
            v = meta[c]
            if store.column_kinds[c] == "str":
                local[c] = np.unique(v).tolist()
            else:
                fv = np.asarray(v, dtype=np.float64)
                fv = fv[np.isfinite(fv)]
                local[c] = (float(fv.min()), float(fv.max())) if fv.size else (np.inf, -np.inf)
    except (StoreError, OSError, ValueError) as exc:
        err = exc
    dist.agree_on_errors(comm, err, KappaError)
    dist.allreduce_sum(comm, [matched])
    coverage = [{"file": t.path, "sha256": t.sha256, "columns": list(t.columns), "rows_matched": int(m)}
                for t, m in zip(tables, matched)]
    for c in coverage:  # the same totals on every rank: every rank refuses alike
        if c["rows_matched"] < cfg.columns_min_match * store.n_rows:
            raise KappaError(f"columns file {c['file']}: only {c['rows_matched']:,} of {store.n_rows:,} store rows have "
                             f"their key in it (< columns_min_match={cfg.columns_min_match:g}); give the table of this "
                             "store's samples")
    gathered = comm.allgather(local)
    if cfg.drop_empty_columns:  # every rank sees the same gathered levels: the same groupings survive
        empty = [c for c in needed if (set().union(*(set(g[c]) for g in gathered)) <= {""}
                                       if store.column_kinds[c] == "str" else
                                       not np.isfinite(min(g[c][0] for g in gathered)))]
        if empty:
            dropped.update({":".join(g): f"no known value in {[c for c in g if c in empty]}" for g in groupings
                            if any(c in empty for c in g)})
            groupings = [g for g in groupings if not any(c in empty for c in g)]
            if not groupings:
                raise KappaError(f"{store.path}: every grouping column is empty ({empty})")
            needed = [c for c in needed if c not in empty]
    columns: dict[str, Column] = {}
    for c in needed:
        if store.column_kinds[c] == "str":
            levels = sorted(set().union(*(set(g[c]) for g in gathered)))
            columns[c] = Column(c, "cat", levels)
        else:
            spec = cfg.bins.get(c, BinSpec())
            if spec.edges:
                edges = np.asarray(spec.edges, dtype=np.float64)
            else:
                edges = _auto_edges(spec, min(g[c][0] for g in gathered), max(g[c][1] for g in gathered))
            columns[c] = Column(c, "bin", _bin_labels(edges), edges)
    col_codes = {c: columns[c].codes(meta[c]) for c in needed}
    del meta

    # partitions: accumulate only groupings not contained in another one
    bases = [g for g in groupings if not any(set(g) < set(h) for h in groupings)]
    parts: dict[tuple[str, ...], _Partition] = {}
    row_codes: dict[tuple[str, ...], np.ndarray] = {}
    for g in bases:
        radix = [len(columns[c].levels) for c in g]
        flat = np.ravel_multi_index([col_codes[c] for c in g], radix) if g else np.zeros(hi - lo, int)
        present = np.unique(np.concatenate([np.asarray(x, dtype=np.int64) for x in comm.allgather(np.unique(flat))]))
        parts[g] = _Partition(g, np.stack(np.unravel_index(present, radix), axis=1))
        row_codes[g] = np.searchsorted(present, flat)
    n_groups = sum(len(p.combos) for p in parts.values())
    # every declared bin of a one-column binned grouping gets a row (empty ones too): count them all
    n_groups += sum(len(columns[g[0]].levels) for g in groupings if len(g) == 1 and columns[g[0]].kind == "bin")
    # float64 sums, plus one read's bootstrap weights: uint8 of whole RNG blocks (and their concatenation),
    # then a reordered float64 copy of the read's rows (global sizes: every rank takes the same decision)
    read_rows = min(max(store.n_rows, 1), READ_BLOCKS * RNG_BLOCK)
    weights = -(-read_rows // RNG_BLOCK) * RNG_BLOCK * b * 2 + read_rows * b * 16
    gib = (n_groups * (b + 1) * d * 8 + weights) / 2**30
    if gib > cfg.max_stats_gib:
        raise KappaError(f"{n_groups} groups × (B+1={b + 1}) × D={d} need {gib:.3g} GiB of sums and bootstrap "
                         f"weights (> max_stats_gib={cfg.max_stats_gib}); group by coarser columns or lower --bootstrap")
    timings["metadata_s"] = time.perf_counter() - t0

    # pass 2: embeddings
    t1 = time.perf_counter()
    acc = {g: Sums.zeros(len(parts[g].combos), d, b) for g in bases}
    bad_rows = np.zeros(2)  # non-finite, zero-norm
    err = None
    from ..progress import Progress

    bar = Progress(hi - lo, "kappa" if size == 1 else f"kappa rank 0/{size}", "rows", enabled=rank == 0)
    try:
        step = READ_BLOCKS * RNG_BLOCK
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            x, _ = store.read(start, stop, columns=[])
            x = x.astype(np.float64)
            sq = np.einsum("ij,ij->i", x, x)
            finite = np.isfinite(sq)
            valid = finite & (sq > 0)
            bad_rows += (np.count_nonzero(~finite), np.count_nonzero(finite & (sq == 0)))
            if not valid.all():
                x[~valid] = 0.0  # NaN·0 is NaN: invalid rows must not reach any product
            x *= np.where(valid, 1.0 / np.sqrt(np.where(valid, sq, 1.0)), 0.0)[:, None]
            w = None
            if b:
                blocks = range(start // RNG_BLOCK, -(-stop // RNG_BLOCK))
                w = np.concatenate([poisson_weights(cfg.seed, k, b) for k in blocks])[: stop - start]
            for g in bases:
                acc[g].add(row_codes[g][start - lo: stop - lo], valid, x, w)
            bar.update(stop - start)
    except (StoreError, OSError, ValueError) as exc:
        err = exc
    bar.close(final=err is None)
    dist.agree_on_errors(comm, err, KappaError)
    timings["embeddings_s"] = time.perf_counter() - t1

    rank_cpu = comm.gather(time.process_time() - cpu0, root=0)  # work per rank, load-independent
    t2 = time.perf_counter()
    dist.allreduce_sum(comm, [a for g in bases for a in acc[g].arrays()] + [bad_rows])
    timings["allreduce_s"] = time.perf_counter() - t2
    if rank != 0:
        return None

    t3 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    sim_sums: tuple[Sums, list[str]] | None = None
    for g in groupings:
        base = next(h for h in bases if set(g) <= set(h))
        part = parts[base]
        idx = [base.index(c) for c in g]
        sub = part.combos[:, idx]
        combos, mapping = np.unique(sub, axis=0, return_inverse=True)
        sums = acc[base].aggregate(mapping.ravel(), len(combos)) if g != base else acc[base]
        if len(g) == 1 and columns[g[0]].kind == "bin":  # show every declared bin, even empty ones
            nb = len(columns[g[0]].edges) - 1
            full = np.union1d(np.arange(nb), combos[:, 0])[:, None]
            pos = np.searchsorted(full[:, 0], combos[:, 0])
            sums = sums.aggregate(pos, len(full))
            combos = full
        est = _estimates(sums, d, cfg)
        for i, combo in enumerate(combos):
            levels = {c: columns[c].level_info(int(k)) for c, k in zip(g, combo)}
            row = {"grouping": ":".join(g), "group": " | ".join(v["label"] for v in levels.values()),
                   "levels": levels, "n": int(sums.n[i]), "n_skipped": int(sums.raw[i] - sums.n[i])}
            for k in CSV_COLUMNS[4:-1]:
                row[k] = float(est[k][i])
            row["flag"] = _flags(sums.n[i], est, i, cfg)
            rows.append(row)
        if cfg.similarity_by and g == (cfg.similarity_by,):
            sim_sums = (sums, [columns[g[0]].levels[int(k)] for k in combos[:, 0]])

    similarity = None
    if sim_sums is not None:
        sums, labels = sim_sums
        keep = sums.n > 0
        s, n = sums.s[keep], sums.n[keep]
        cent = s / np.linalg.norm(s, axis=1, keepdims=True)
        similarity = {"column": cfg.similarity_by, "labels": [l for l, k in zip(labels, keep) if k],
                      "n": n.astype(int).tolist(), "matrix": ((s @ cent.T) / n[:, None]).tolist()}
    timings["estimates_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    timings["rank_cpu_s"] = rank_cpu
    run = {"store": str(store.path), "n_rows": store.n_rows, "dim": d, "parts": len(store.parts) or 1,
           "ranks": size, "rows_nonfinite": int(bad_rows[0]), "rows_zero_norm": int(bad_rows[1]),
           "rng_block_rows": RNG_BLOCK, "bins": {c: columns[c].edges.tolist() for c in needed
                                                 if columns[c].kind == "bin"},
           "timings": timings, "groupings_dropped": dropped, "columns": coverage}
    return {"rows": rows, "similarity": similarity, "run": run}


# ------------------------------------------------------------------------------------ output


def _num(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v == np.inf else "" if not np.isfinite(v) else repr(v)
    return str(v)


def jsonable(o: Any) -> Any:
    """NaN/inf → None (JSON null), recursively: what kappa.json holds."""
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, list):
        return [jsonable(v) for v in o]
    return o


#: kappa.json, sealed last over the CSVs (see :mod:`icehpc.contract`): the κ run's output contract.
CONTRACT = Contract("kappa.json", ("kappa.csv", "similarity.csv"))
STAGE = storestage.StoreStage("kappa", CONTRACT, section="run")


def write_outputs(out_dir: str | os.PathLike, result: dict[str, Any]) -> list[Path]:
    """kappa.csv and similarity.csv (the marker kappa.json is sealed after them); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "kappa.csv", csv_text(CSV_COLUMNS, ([_num(r[k]) for k in CSV_COLUMNS] for r in result["rows"])))
    sim = result["similarity"]
    text = ""
    if sim is not None:  # labels are user text: csv_text keeps them from running as spreadsheet formulas
        text = csv_text([f"{sim['column']} of samples \\ centroid of"] + sim["labels"],
                        ([lab] + [repr(float(v)) for v in vals] for lab, vals in zip(sim["labels"], sim["matrix"])))
    write_atomic(out / "similarity.csv", text)
    return [out / "kappa.csv", out / "similarity.csv"]


def fingerprint_extra(cfg: KappaConfig) -> dict[str, Any]:
    """What shapes κ beyond the config and the store: the RNG block of the bootstrap weights, and
    the content (sha256) of each columns file, so a changed table reruns."""
    extra: dict[str, Any] = {"block": RNG_BLOCK}
    if cfg.columns:
        gone = [p for p in cfg.columns if not Path(p).is_file()]
        if gone:
            raise KappaError(f"columns file {gone[0]} does not exist (a CSV with a 'key' column)")
        extra["columns_sha256"] = [file_sha256(p) for p in cfg.columns]
    return extra


def fingerprint(store: Store, cfg: KappaConfig) -> str:
    """Hash of the config and the store's content: the sha256 of the file opened and the parts'
    checksums its master records (which :func:`open_store` verified against the parts). Sizes
    and mtimes are not content: a part edited in place with both kept must not be "up to date"."""
    return storestage.fingerprint(store, cfg, fingerprint_extra(cfg))


def run_kappa(store_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: KappaConfig,
              force: bool = False, comm: Any = None, provenance: dict[str, Any] | None = None
              ) -> dict[str, Any] | None:
    """Library entry point: skip if ``out_dir`` already holds this exact run (requeue-safe: its
    marker verifies every file), else compute and write on rank 0. Returns what kappa.json holds on
    rank 0 (NaN as None). Rank 0 holds the lock of ``out_dir`` throughout (:mod:`.storestage`)."""

    def write(out: Path, result: dict[str, Any], fp: str, started: float, store: Store):
        result["run"].update(fingerprint=fp, config=cfgmod.to_dict(cfg), config_source=provenance,
                             store_sha256=store.sha256, **run_facts(started))
        files = write_outputs(out, result)
        record = jsonable(result)
        return record, files, record

    return storestage.run(STAGE, store_path, out_dir, cfg, extra=fingerprint_extra(cfg), compute=compute,
                          write=write, force=force, comm=comm)


def status(args: argparse.Namespace) -> Status:
    """Would ``icehpc kappa ARGS`` skip? (read-only; see :func:`storestage.status`)."""
    cfg = config_from_args(args)
    try:
        extra = fingerprint_extra(cfg)
    except KappaError as exc:
        return Status(False, str(exc))
    st = storestage.status(STAGE, args.store, args.out, cfg, extra, force=getattr(args, "force", False))
    old = [c.get("sha256") for c in ((CONTRACT.read(args.out) or {}).get("run") or {}).get("columns") or []]
    changed = [p for p, a, b in zip(cfg.columns, old, extra.get("columns_sha256", [])) if a != b]
    if not st.done and changed:
        return Status(False, f"columns file {changed[0]} changed since {CONTRACT.marker_path(args.out)} was written")
    return st


# --------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store: master .h5, a hand-written .h5, or a folder with store.h5")
    parser.add_argument("--out", required=True, help="output folder (kappa.csv, kappa.json, similarity.csv)")
    parser.add_argument("--by", help="comma-separated groupings, ':' crosses columns "
                                     "(e.g. campaign,habit,campaign:temperature_c); default from config")
    parser.add_argument("--bins", action="append", default=[], metavar="COLUMN=E0,E1,...",
                        help="explicit bin edges of a numeric column (repeatable)")
    parser.add_argument("--columns", action="append", default=[], metavar="FILE",
                        help="CSV with a 'key' column whose other columns join the store's by key, to group by "
                             "with --by (e.g. a classify run's predictions.csv: --by predicted_habit); repeatable; "
                             "refused when it matches fewer than columns_min_match of the rows")
    parser.add_argument("--force", action="store_true", help="recompute even if --out is up to date")
    cfgmod.add_config_arguments(parser, KappaConfig, {"--min-count": "min_count", "--bootstrap": "bootstrap",
                                                      "--seed": "seed", "--similarity-by": "similarity_by",
                                                      "--columns-min-match": "columns_min_match"})


def config_from_args(args: argparse.Namespace) -> KappaConfig:
    """Config file, then dotted overrides, then the explicit flags (flags win)."""
    ov: list[str] = []
    if args.by:
        ov.append("groupings=" + json.dumps([g.strip() for g in args.by.split(",") if g.strip()]))
    if args.columns:
        ov.append("columns=" + json.dumps(args.columns))
    for item in args.bins:
        col, _, edges = item.partition("=")
        if not col or not edges:
            raise cfgmod.ConfigError(f"--bins {item!r}: expected COLUMN=E0,E1,...")
        try:
            values = [float(e) for e in edges.split(",")]
        except ValueError:
            raise cfgmod.ConfigError(f"--bins {item!r}: edges must be numbers, e.g. {col}=-40,-20,0") from None
        ov.append(f"bins.{col}=" + json.dumps({"edges": values}))
    flagged = argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *ov]})
    return cfgmod.from_args(KappaConfig, flagged)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    comm = mpi_comm()
    # a user's mistake (KappaError, StoreError, a bad columns file) is run_stage's one line, rank 0's
    res = run_kappa(args.store, args.out, cfg, force=args.force, comm=comm, provenance=cfgmod.provenance(args))
    if res is not None:
        r = res["run"]
        for c in r.get("columns") or []:
            print(f"icehpc kappa: columns {c['file']}: {c['rows_matched']:,} of {r['n_rows']:,} rows matched")
        flagged = sum(1 for row in res["rows"] if row["flag"])
        print(f"icehpc kappa: {r['n_rows']} rows × D={r['dim']} on {r['ranks']} rank(s) in "
              f"{r['timings']['total_s']:.1f} s; {len(res['rows'])} groups ({flagged} flagged); "
              f"skipped {r['rows_nonfinite']} non-finite and {r['rows_zero_norm']} zero-norm rows → {args.out}")
    return 0
