"""Offline report of a κ run: ``icehpc report KAPPA_DIR --out REPORT_DIR [--random KDIR] [--store S] …``.

One self-contained ``index.html`` (figures and thumbnails embedded as base64, inline CSS, no script,
no network) that opens from a laptop or a cluster's file browser, plus every figure as PNG, SVG and
PDF, the CSVs, and the κ tables as a CF netCDF file (``kappa.nc``, for xarray). Sections, each
drawn only when its input is given and holds data:

- **warnings** at the top: near-collapsed embeddings (mean cosine to other classes' centroids
  > 0.9), groups below ``min_count``, mixed probes or polarities in one store, groupings left out
  for lack of data, pretraining metrics that flag collapse, probes no better than random init;
- **κ figures** by grouping shape (categorical → κ per group; binned → κ versus the bin centre;
  categorical × binned → one line per category, pooled dashed), each with its **controls**: the
  random-init backbone's κ (``--random``, dotted) and, on synthetic runs, the planted habit entropy
  (``--planted``, right axis, inverted: high κ = low diversity);
- the **class-similarity heatmap** (colour scale fitted to the data, classes in hierarchical-
  clustering order, values annotated);
- an **embedding map** (PCA and t-SNE on a bounded seeded sample of ``--store``) coloured by the
  class, temperature and campaign, each only where the store has known values;
- **example images** per class and per temperature bin: nearest to and farthest from the group's
  mean direction (``--store`` + ``--shards``);
- **probe results** (``--probe``) with their spread over splits, per-class recall, confusion
  matrices; **pretraining curves** (``--pretrain``, from metrics.jsonl);
- **provenance** (backbone file and sha256, pretraining config, shard fingerprint, commands) and
  **downloads**.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..config import UserError
from ..fileio import file_sha256, write_atomic

AXIS_NAMES = {"temperature_c": "temperature (°C)", "particle_width_um": "particle width (µm)",
              "pressure_hpa": "pressure (hPa)", "particle_height_um": "particle height (µm)"}
UNITS = {"temperature_c": "degC", "particle_width_um": "um", "particle_height_um": "um", "pressure_hpa": "hPa"}
ESTIMATE = "kappa_debiased"  # the CI brackets this estimator (see icehpc.analysis.kappa)
COLLAPSE_COS = 0.9  # mean cosine to other classes' centroids above this: the classes are not told apart
MAP_SAMPLE = 2000  # embedding-map rows (t-SNE is O(n log n) but slow in pure CPU at 10⁵)
FORMATS = ("png", "svg", "pdf")


class ReportError(UserError):
    """The κ folder cannot be reported on; the message says what is missing."""


def _axis(col: str) -> str:
    return AXIS_NAMES.get(col, col.replace("_", " "))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none"})
    return plt


def _save(plt, fig, path: Path) -> None:
    """``path`` (.png) and the same figure as .svg and .pdf beside it."""
    fig.tight_layout()
    for fmt in FORMATS:
        fig.savefig(path.with_suffix(f".{fmt}"))
    plt.close(fig)


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and bool(np.isfinite(v))


def _yerr(rows: list[dict]) -> np.ndarray:
    k = np.array([r[ESTIMATE] for r in rows], dtype=float)
    lo = np.array([r["ci_low"] if _finite(r["ci_low"]) else np.nan for r in rows], dtype=float)
    hi = np.array([r["ci_high"] if _finite(r["ci_high"]) else np.nan for r in rows], dtype=float)
    return np.nan_to_num(np.vstack([k - lo, hi - k]), nan=0.0).clip(min=0)


def _log_if_wide(ax, values: list[float]) -> None:
    v = [x for x in values if _finite(x) and x > 0]
    if v and max(v) / min(v) > 3:
        ax.set_yscale("log")


def _estimable(rows: list[dict]) -> list[dict]:
    return [r for r in rows if _finite(r.get(ESTIMATE))]


def _group_name(v: Any) -> str:
    """A level label for display: empty or missing labels are named, never blank."""
    text = "" if v is None else str(v)
    return text if text.strip() else "(unknown)"


def fig_categorical(plt, grouping: str, rows: list[dict], path: Path,
                    control: dict[str, dict] | None = None) -> str:
    """κ per category with CI bars, n written beside each point; random-init κ as open squares."""
    est = _estimable(rows)
    fig, ax = plt.subplots(figsize=(8, 1.9 + 0.4 * max(len(est), 1)))
    y = np.arange(len(est))
    ax.errorbar([r[ESTIMATE] for r in est], y, xerr=_yerr(est), fmt="o", color="C0", capsize=3,
                label="κ̂ trained (debiased) with CI")
    ax.plot([r["kappa"] for r in est], y, "x", color="C3", label="κ̂ MLE")
    values = [r[ESTIMATE] for r in est]
    if control:
        cy = [(yi, control[r["group"]][ESTIMATE]) for yi, r in zip(y, est)
              if r["group"] in control and _finite(control[r["group"]].get(ESTIMATE))]
        if cy:
            ax.plot([c for _, c in cy], [yi for yi, _ in cy], "s", mfc="none", color="0.45",
                    label="κ̂ random-init control")
            values += [c for _, c in cy]
    for yi, r in zip(y, est):
        ax.annotate(f"n={r['n']:,}", (r["ci_high"] if _finite(r["ci_high"]) else r[ESTIMATE], yi),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8, color="0.3")
    ax.set_yticks(y, [_group_name(r["group"]) for r in est])
    ax.invert_yaxis()
    ax.set_xlabel("vMF concentration κ  (higher = less diverse)")
    if values and max(values) / max(min(values), 1e-300) > 3:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.5 / max(len(est), 1))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0 + 0.6 / (1.9 + 0.4 * max(len(est), 1))),
              ncol=3, fontsize=8, frameon=False)
    _save(plt, fig, path)
    return _note(rows, est)


def _centre(r: dict, col: str) -> float | None:
    lev = r["levels"][col]
    return 0.5 * (lev["low"] + lev["high"]) if "low" in lev else None


def fig_binned(plt, cat: str | None, col: str, rows: list[dict], pooled: list[dict], path: Path,
               min_count: int = 0, control: dict[str, dict] | None = None,
               planted: dict[tuple, float] | None = None) -> str:
    """κ versus bin centre of ``col``, one line per level of ``cat`` (+ pooled, dashed); counts below.

    ``control``: group → row of the random-init run (same line colour, dotted, open markers).
    ``planted``: (level or "all", bin low edge) → planted habit entropy, on an inverted right axis.
    """
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    series: dict[str, list[dict]] = {}
    for r in rows:
        if _centre(r, col) is not None:
            series.setdefault(_group_name(r["levels"][cat]["label"]) if cat else "all", []).append(r)
    if pooled and cat:
        series["all (pooled)"] = [r for r in pooled if _centre(r, col) is not None]
    width = None
    all_est: list[float] = []
    ax2 = None
    drew_control = drew_planted = False
    for i, (name, rs) in enumerate(series.items()):
        pooled_line = name == "all (pooled)"
        color = "k" if pooled_line else f"C{i % 10}"
        est = _estimable(rs)
        x = [_centre(r, col) for r in est]
        all_est += [r[ESTIMATE] for r in est]
        ax.errorbar(x, [r[ESTIMATE] for r in est], yerr=_yerr(est), fmt="o-" if not pooled_line else "s--",
                    color=color, capsize=3, ms=4, lw=1.2, label=name)
        if control:
            ctl = [(c, control[r["group"]][ESTIMATE]) for c, r in zip(x, est)
                   if r["group"] in control and _finite(control[r["group"]].get(ESTIMATE))]
            if ctl:
                ax.plot([c for c, _ in ctl], [v for _, v in ctl], ":", marker="o", mfc="none", color=color,
                        alpha=0.6, ms=4, lw=1)
                all_est += [v for _, v in ctl]
                drew_control = True
        if planted:
            level = "all" if (pooled_line or not cat) else name
            pts = sorted((0.5 * (r["levels"][col]["low"] + r["levels"][col]["high"]), planted[(level, r["levels"][col]["low"])])
                         for r in rs if (level, r["levels"][col]["low"]) in planted)
            if pts:
                ax2 = ax2 or ax.twinx()
                ax2.plot([p for p, _ in pts], [e for _, e in pts], "+-", color=color, lw=0.8, alpha=0.5, ms=6)
                drew_planted = True
        xs = [_centre(r, col) for r in rs]
        axn.plot(xs, [max(r["n"], 0.8) for r in rs], "o-" if not pooled_line else "s--", color=color, ms=3, lw=1)
        if len(xs) > 1:
            width = np.min(np.diff(sorted(set(xs))))
    ax.set_ylabel("κ̂ (debiased) with CI")
    _log_if_wide(ax, all_est)
    shown = _estimable([r for rs in series.values() for r in rs])
    if shown and not drew_control:
        # a near-threshold group's CI can span 0..10×κ̂; keep the axis on the estimates (bars run off)
        lo = [max(r["ci_low"], r[ESTIMATE] / 3) if _finite(r["ci_low"]) else r[ESTIMATE] for r in shown]
        hi = [min(r["ci_high"], r[ESTIMATE] * 3) if _finite(r["ci_high"]) else r[ESTIMATE] for r in shown]
        pad = 0.08 * (max(hi) - min(lo)) or 0.05 * max(hi)
        ax.set_ylim(min(lo) / 1.15 if ax.get_yscale() == "log" else min(lo) - pad,
                    max(hi) * 1.15 if ax.get_yscale() == "log" else max(hi) + pad)
    if ax2 is not None:
        ax2.set_ylabel("planted habit entropy (nats; axis inverted)")
        ax2.invert_yaxis()
        ax2.grid(False)
    if min_count:
        axn.axhline(min_count, color="0.5", ls=":", lw=1)
        axn.annotate(f"min n = {min_count}", (1.0, min_count), xycoords=("axes fraction", "data"),
                     ha="right", va="bottom", fontsize=7, color="0.4")
    axn.set_yscale("log")
    axn.set_ylabel("n")
    axn.set_xlabel(_axis(col))
    ax.set_title(f"κ versus {_axis(col)}" + (f" per {_axis(cat)}" if cat else ""))
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    if drew_control:
        handles.append(Line2D([], [], ls=":", marker="o", mfc="none", color="0.4"))
        labels.append("random-init control (dotted)")
    if drew_planted:
        handles.append(Line2D([], [], ls="-", marker="+", color="0.4", lw=0.8))
        labels.append("planted habit entropy (right)")
    ax.legend(handles, labels, fontsize=8, ncol=2 if len(labels) > 5 else 1)
    if width:
        ax.set_xlim(min(min(_centre(r, col) for r in rs) for rs in series.values() if rs) - width,
                    max(max(_centre(r, col) for r in rs) for rs in series.values() if rs) + width)
    _save(plt, fig, path)
    outside = [r for r in rows if _centre(r, col) is None and r["n"] > 0]
    note = _note(rows, _estimable([r for r in rows if _centre(r, col) is not None]) + outside)
    if outside:
        note += f" {sum(r['n'] for r in outside):,} rows outside the bins (below/above range or missing) are in the table only."
    return note


def _note(rows: list[dict], shown: list[dict]) -> str:
    hidden = len(rows) - len(shown)
    return f"{hidden} group(s) below the minimum count or empty are not drawn (see the flagged table)." if hidden else ""


def cluster_order(m: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 − (S + Sᵀ)/2 (similar classes side by side)."""
    k = len(m)
    if k < 3:
        return np.arange(k)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d = 1.0 - 0.5 * (m + m.T)
    d = np.clip(d - np.diag(np.diag(d)), 0, None)
    return np.asarray(leaves_list(linkage(squareform(d, checks=False), "average")))


def off_diagonal_mean(m: np.ndarray) -> float:
    k = len(m)
    return float((m.sum() - np.trace(m)) / (k * (k - 1))) if k > 1 else float("nan")


def fig_similarity(plt, sim: dict, path: Path) -> None:
    """S in clustering order, colour scale fitted to the values (not ±1), every cell annotated."""
    m = np.asarray(sim["matrix"], dtype=float)
    order = cluster_order(m)
    m = m[np.ix_(order, order)]
    labels = [_group_name(sim["labels"][i]) for i in order]
    counts = [sim["n"][i] for i in order]
    k = len(labels)
    size = min(2.5 + 0.55 * k, 16)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
    if hi - lo < 1e-6:
        lo, hi = lo - 1e-3, hi + 1e-3
    im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi)
    ax.grid(False)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{l} (n={n:,})" for l, n in zip(labels, counts)])
    if k <= 25:
        digits = 3 if hi - lo < 0.05 else 2
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]:.{digits}f}", ha="center", va="center", fontsize=7 if k > 12 else 8,
                        color="black" if m[i, j] > lo + 0.6 * (hi - lo) else "white")
    ax.set_xlabel(f"centroid of {sim['column']}")
    ax.set_ylabel(f"samples from {sim['column']}")
    ax.set_title(f"mean cosine of samples to class centroids (scale {lo:.3g} … {hi:.3g})")
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean cos(x̂, centroid)")
    _save(plt, fig, path)


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return html.escape(str(v))
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------ inputs
def _load_kappa(src: Path) -> dict:
    if src.is_file():
        raise ReportError(f"{src} is a file; give the κ folder written by `icehpc kappa STORE --out KAPPA_DIR` "
                          f"(it holds kappa.json), e.g. `icehpc kappa {src} --out KDIR && icehpc report KDIR --out R`")
    try:
        return json.loads((src / "kappa.json").read_text())
    except FileNotFoundError as exc:
        raise ReportError(f"{src}/kappa.json not found: run `icehpc kappa STORE --out {src}` first") from exc
    except ValueError as exc:
        raise ReportError(f"{src}/kappa.json is not valid JSON ({exc})") from exc


def planted_entropy(planted: dict, by: str | None) -> dict[tuple, float]:
    """(level of ``by`` or "all", temperature-bin low edge) → Shannon entropy (nats) of the planted
    habit mix, pooled over the other bins with the observed counts as weights."""
    mixes: dict[tuple, dict[str, float]] = {}
    for row in planted.get("bins", []):
        if not row.get("count"):
            continue
        level = row.get(by, "all") if by else "all"
        key = (str(level), float(row["temperature_bin_c"][0]))
        mix = mixes.setdefault(key, {})
        for habit, p in row["probabilities"].items():
            mix[habit] = mix.get(habit, 0.0) + row["count"] * p
    out = {}
    for key, mix in mixes.items():
        p = np.array([v for v in mix.values() if v > 0])
        p = p / p.sum()
        out[key] = float(-(p * np.log(p)).sum())
    return out


def _metric(m: dict, key: str) -> tuple[float | None, float | None]:
    """(mean, sd over splits or None) of a probe metric, whatever shape the probe wrote."""
    v = m.get(key)
    if isinstance(v, dict):
        return v.get("mean"), v.get("sd", v.get("std"))
    sd = m.get(f"{key}_sd", m.get(f"{key}_std"))
    if isinstance(m.get("splits"), list) and v is None:
        vals = [s[key] for s in m["splits"] if isinstance(s, dict) and _finite(s.get(key))]
        if vals:
            return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return (float(v) if _finite(v) else None), (float(sd) if _finite(sd) else None)


def _fmt_ms(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- netCDF
def write_netcdf(path: Path, results: dict[str, dict]) -> None:
    """The κ tables as CF-1.8 netCDF: one variable per (statistic, grouping, backbone), on shared
    dimensions per column (categories as string coordinates; bins as centres with bounds)."""
    import xarray as xr

    coords: dict[str, Any] = {}
    levels: dict[str, dict[str, set]] = {}
    for res in results.values():
        for r in res["rows"]:
            for c, lev in r["levels"].items():
                d = levels.setdefault(c, {"bins": set(), "cats": set()})
                if "low" in lev:
                    d["bins"].add((lev["low"], lev["high"]))
                else:
                    d["cats"].add(_group_name(lev["label"]))
    dims: dict[str, tuple[str, list]] = {}
    for c, lev in levels.items():
        if lev["bins"]:  # a binned column: below/above range and missing are in the CSV only
            bounds = sorted(lev["bins"])
            dim = f"{c}_bin"
            units = UNITS.get(c, "1")
            coords[dim] = xr.Variable(dim, np.array([0.5 * (a + b) for a, b in bounds]),
                                      {"long_name": f"{_axis(c)} bin centre", "units": units, "bounds": f"{dim}_bounds",
                                       **({"standard_name": "air_temperature"} if c == "temperature_c" else {})})
            coords[f"{dim}_bounds"] = xr.Variable((dim, "nv"), np.array(bounds, dtype=float), {"units": units})
            dims[c] = (dim, bounds)
        else:
            names = sorted(lev["cats"])
            coords[c] = xr.Variable(c, np.array(names, dtype=object), {"long_name": _axis(c)})
            dims[c] = (c, names)
    stats = {"n": ("valid rows in the group", "1"), "kappa": ("vMF concentration, exact MLE", "1"),
             "kappa_debiased": ("vMF concentration, small-sample debiased", "1"),
             "ci_low": ("lower bound of the Poisson-bootstrap interval of kappa_debiased", "1"),
             "ci_high": ("upper bound of the Poisson-bootstrap interval of kappa_debiased", "1"),
             "rbar": ("mean resultant length of unit embeddings", "1")}
    data_vars: dict[str, Any] = {}
    for backbone, res in results.items():
        by: dict[str, list[dict]] = {}
        for r in res["rows"]:
            by.setdefault(r["grouping"], []).append(r)
        for g, rows in by.items():
            cols = g.split(":")
            shape = [len(dims[c][1]) for c in cols]
            arrays = {s: np.full(shape, np.nan) for s in stats}
            for r in rows:
                idx = []
                for c in cols:
                    lev = r["levels"][c]
                    key = (lev["low"], lev["high"]) if "low" in lev else _group_name(lev["label"])
                    if key not in dims[c][1]:
                        break
                    idx.append(dims[c][1].index(key))
                else:
                    for s in stats:
                        v = r.get(s)
                        arrays[s][tuple(idx)] = v if _finite(v) else np.nan
            name = "_x_".join(cols)
            for s, (long_name, units) in stats.items():
                data_vars[f"{s}_{backbone}_{name}"] = xr.Variable(
                    tuple(dims[c][0] for c in cols), arrays[s],
                    {"long_name": f"{long_name}, {backbone.replace('_', ' ')} backbone, per {' × '.join(map(_axis, cols))}",
                     "units": units})
    ds = xr.Dataset(data_vars, coords=coords, attrs={
        "Conventions": "CF-1.8", "title": "vMF concentration (kappa) of ice-crystal embeddings per group",
        "source": "icehpc kappa", "references": "von Mises-Fisher concentration of L2-normalised embeddings"})
    tmp = path.with_name(path.name + ".tmp")
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ store-based sections
def _read_sample(store_path: Path, columns: list[str], limit: int, seed: int = 0):
    """A seeded sample of at most ``limit`` rows: (unit embeddings [n, D], meta dict, all-row count)."""
    from .store import open_store

    with open_store(store_path) as s:
        have = [c for c in columns if c in s.columns]
        emb, meta = s.read(0, s.n_rows, columns=have)
        n = s.n_rows
    emb = np.asarray(emb, dtype=np.float64)
    norm = np.linalg.norm(emb, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    idx = np.flatnonzero(ok)
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    x = emb[idx] / norm[idx, None]
    return x, {c: np.asarray(v)[idx] for c, v in meta.items()}, n


def _known_str(v: np.ndarray) -> bool:
    vals = {str(a) for a in v}
    return bool(vals - {"", "None", "nan"})


def _known_num(v: np.ndarray) -> bool:
    try:
        return bool(np.isfinite(np.asarray(v, dtype=float)).any())
    except (TypeError, ValueError):
        return False


def fig_embedding_map(plt, x: np.ndarray, meta: dict[str, np.ndarray], label: str, path: Path,
                      seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """PCA and t-SNE (scikit-learn) of unit embeddings, one column per colouring with known values.

    Returns the colourings drawn and the two 2-D projections."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(x)
    pca = PCA(n_components=2, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    colourings = [c for c in (label, "temperature_c", "campaign") if c in meta and (
        _known_num(meta[c]) if c == "temperature_c" else _known_str(meta[c]) and len(set(map(str, meta[c]))) > 1)]
    cols = max(len(colourings), 1)
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 8.4), squeeze=False)
    for j, c in enumerate(colourings or [None]):
        for i, (proj, name) in enumerate(((pca, "PCA"), (tsne, "t-SNE"))):
            ax = axes[i, j]
            ax.grid(False)
            ax.set_xticks([])
            ax.set_yticks([])
            if c is None:
                ax.scatter(proj[:, 0], proj[:, 1], s=5, color="C0")
            elif c == "temperature_c":
                t = np.asarray(meta[c], dtype=float)
                known = np.isfinite(t)
                ax.scatter(proj[~known, 0], proj[~known, 1], s=4, color="0.85")
                sc = ax.scatter(proj[known, 0], proj[known, 1], s=5, c=t[known], cmap="coolwarm")
                fig.colorbar(sc, ax=ax, shrink=0.7, label=_axis(c))
            else:
                v = np.array([_group_name(a) for a in meta[c]])
                levels = sorted(set(v))
                cmap = plt.get_cmap("tab20" if len(levels) > 10 else "tab10")
                for k, lev in enumerate(levels):
                    sel = v == lev
                    ax.scatter(proj[sel, 0], proj[sel, 1], s=5, color=cmap(k % cmap.N), label=lev)
                if i == 0:
                    ax.legend(fontsize=6, markerscale=2, loc="best", ncol=1 + len(levels) // 12, frameon=False)
            ax.set_title(f"{name}" + (f", by {_axis(c)}" if c else ""), fontsize=9)
    _save(plt, fig, path)
    return colourings, pca, tsne


def _thumb(png: bytes, size: int = 72) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("L")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def example_groups(x: np.ndarray, meta: dict[str, np.ndarray], label: str, temperature_edges: list[float] | None,
                   k: int) -> list[dict]:
    """Per class and per temperature bin: keys nearest to and farthest from the group's mean direction."""
    groups: list[tuple[str, np.ndarray]] = []
    if label in meta and _known_str(meta[label]):
        v = np.array([_group_name(a) for a in meta[label]])
        groups += [(f"{label} = {lev}", v == lev) for lev in sorted(set(v))]
    if temperature_edges and "temperature_c" in meta and _known_num(meta["temperature_c"]):
        t = np.asarray(meta["temperature_c"], dtype=float)
        e = temperature_edges
        for lo, hi in zip(e[:-1], e[1:]):
            groups.append((f"temperature in [{lo:g}, {hi:g}) °C", (t >= lo) & (t < hi)))
    out = []
    for name, sel in groups:
        idx = np.flatnonzero(sel)
        if len(idx) < 2:
            continue
        mean = x[idx].sum(axis=0)
        mean /= np.linalg.norm(mean) or 1.0
        cos = x[idx] @ mean
        order = np.argsort(-cos)
        take = min(k, len(idx) // 2)
        out.append({"group": name, "n": int(len(idx)),
                    "nearest": [(str(meta["key"][idx[i]]), float(cos[i])) for i in order[:take]],
                    "farthest": [(str(meta["key"][idx[i]]), float(cos[i])) for i in order[::-1][:take]]})
    return out


def read_images(shard_dir: Path, keys: set[str], shard_of: dict[str, str]) -> dict[str, bytes]:
    """PNG bytes of ``keys``, reading only the shards that hold them."""
    from ..data.format import iter_samples

    out: dict[str, bytes] = {}
    for shard in sorted({shard_of[k] for k in keys if k in shard_of}):
        path = shard_dir / shard
        if not path.exists():
            continue
        for key, sample in iter_samples(path, ("png",)):
            if key in keys:
                out[key] = sample["png"]
    return out


def fig_pretrain(plt, metrics_path: Path, path: Path) -> list[str]:
    """Losses, teacher entropy / prototype usage and κ of the prototypes against the step."""
    records = []
    for line in metrics_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records:
        return []
    steps = np.array([r.get("step", i) for i, r in enumerate(records)], dtype=float)
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    panels = [("losses", [k for k in keys if k.startswith("loss")]),
              ("teacher entropy and prototype usage", [k for k in keys if "entropy" in k or "proto" in k]),
              ("schedule", [k for k in keys if k in ("lr", "teacher_temp", "momentum", "wd")])]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels):
        for k in ks[:8]:
            y = np.array([r.get(k, np.nan) for r in records], dtype=float)
            ax.plot(steps, y, lw=1, label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6, frameon=False)
    _save(plt, fig, path)
    return keys


def metric_warnings(metrics_path: Path) -> list[str]:
    """What a pretraining run's last records flag: collapse of the teacher or of prototype usage."""
    last = None
    for line in metrics_path.read_text().splitlines():
        try:
            last = json.loads(line)
        except ValueError:
            continue
    if not last:
        return []
    out = []
    for k, v in last.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k.endswith("proto_perplexity") and v < 4:
            out.append(f"pretraining ended with {k} = {v:.2f}: the teacher puts its mass on very few prototypes "
                       "(partial collapse)")
        if "entropy" in k and "teacher" in k and v < 0.1:
            out.append(f"pretraining ended with {k} = {v:.3f}: teacher outputs are nearly one-hot (collapse)")
        if k in ("collapse", "teacher_collapse") and v:
            out.append(f"pretraining flagged {k} = {v}")
    return out


# ------------------------------------------------------------------------------------------- page
CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;
font-size:.9em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;
padding:.25em .6em;text-align:left}th{background:#f4f4f4}tr:nth-child(even){background:#fafafa}
.summary{background:#f6f8fa;padding:.8em 1em;border-radius:6px}code,pre{background:#f6f8fa;font-size:.85em}
pre{padding:.8em;overflow-x:auto;max-height:30em}.warn{background:#fff4e5;border:1px solid #f0b160;border-radius:6px;
padding:.6em 1em}.ok{background:#eef8ee;border:1px solid #9c9;border-radius:6px;padding:.6em 1em}
.thumbs img{width:72px;height:72px;object-fit:contain;border:1px solid #ddd;margin:1px;background:#fff}
.thumbs td{vertical-align:top}nav a{margin-right:.8em}.conf figure{display:inline-block;width:49%;margin:0}"""


class Page:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: list[str] = []
        self.downloads: list[tuple[str, str]] = []  # (file name in out, description)
        self.toc: list[tuple[str, str]] = []

    def h2(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f"<h2 id='{anchor}'>{html.escape(title)}</h2>")

    def figure(self, png: str, title: str, caption: str) -> None:
        files = ", ".join(f"<a href='{html.escape(Path(png).with_suffix('.' + f).name)}'>{f.upper()}</a>"
                          for f in FORMATS if (self.out / Path(png).with_suffix("." + f).name).exists())
        self.parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{_b64(self.out / png)}'>"
                          f"<figcaption>{html.escape(caption)} Files: {files}.</figcaption></figure>")
        for f in FORMATS:
            name = Path(png).with_suffix("." + f).name
            if (self.out / name).exists():
                self.downloads.append((name, f"figure: {title}"))

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)


def build_report(kappa_dir: str | os.PathLike, out_dir: str | os.PathLike, *, random: str | os.PathLike | None = None,
                 planted: str | os.PathLike | None = None, store: str | os.PathLike | None = None,
                 shards: str | os.PathLike | None = None, probe: str | os.PathLike | None = None,
                 pretrain: str | os.PathLike | None = None, backbone: str | os.PathLike | None = None,
                 map_sample: int = MAP_SAMPLE, examples: int = 5) -> Path:
    """Read ``kappa_dir``/kappa.json (+ the optional inputs), write figures, CSVs, kappa.nc, index.html."""
    src, out = Path(kappa_dir), Path(out_dir)
    res = _load_kappa(src)
    ctl_res = _load_kappa(Path(random)) if random else None
    rows, run, sim = res["rows"], res["run"], res.get("similarity")
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    page = Page(out)
    warnings: list[str] = []
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["grouping"], []).append(r)
    ctl_by: dict[str, dict[str, dict]] = {}
    for r in (ctl_res or {}).get("rows", []):
        ctl_by.setdefault(r["grouping"], {})[r["group"]] = r
    bins = set(run.get("bins", {}))
    min_count = run["config"]["min_count"]
    planted_data = json.loads(Path(planted).read_text()) if planted and Path(planted).exists() else None
    label = (sim or {}).get("column") or run["config"].get("similarity_by") or "habit"

    # ---- warnings that need only kappa.json
    small = [r for r in rows if r["n"] and r["n"] < min_count]
    if small:
        warnings.append(f"{len(small)} group(s) have fewer than min_count = {min_count} valid rows and are not "
                        f"estimated (e.g. {', '.join(_group_name(r['group']) for r in small[:3])}); see the flagged table.")
    dropped = run.get("groupings_dropped") or {}
    if dropped:
        warnings.append(f"groupings left out for lack of data: {', '.join(dropped)} "
                        f"({'; '.join(sorted(set(dropped.values())))}).")
    offdiag = None
    if sim is not None and len(sim.get("labels", [])) > 1:
        offdiag = off_diagonal_mean(np.asarray(sim["matrix"], dtype=float))
        if offdiag > COLLAPSE_COS:
            warnings.append(f"near-collapsed embeddings: the mean cosine of samples to other classes' centroids is "
                            f"{offdiag:.3f} (> {COLLAPSE_COS}); κ differences between groups are then small in "
                            "absolute terms; compare with the random-init control.")

    # ---- κ figures with controls
    figures: list[tuple[str, str, str]] = []
    rank = {"temperature_c": 0, "particle_width_um": 1, "campaign": 2, "habit": 3}
    order = sorted(by, key=lambda g: (-len(g.split(":")), [rank.get(c, 9) for c in reversed(g.split(":"))], g))
    control_note = " Dotted/open: the random-init backbone (control)." if ctl_res else ""
    for g in order:
        cols = g.split(":")
        # column names come from data: keep the file name to safe characters (no '/', '..', markup)
        name = "kappa_" + re.sub(r"[^\w\-]", "_", g.replace(":", "_by_"), flags=re.ASCII) + ".png"
        ctl = ctl_by.get(g)
        if len(cols) == 2 and (cols[0] in bins) != (cols[1] in bins):
            cat, col = (cols[1], cols[0]) if cols[0] in bins else (cols[0], cols[1])
            pl = planted_entropy(planted_data, cat) if planted_data and col == "temperature_c" else None
            if pl and planted_data:
                pl.update(planted_entropy(planted_data, None))
            merged_ctl = {**(ctl or {}), **ctl_by.get(col, {})} if ctl_res else None
            note = fig_binned(plt, cat, col, by[g], by.get(col, []), out / name, min_count, merged_ctl, pl)
            figures.append((name, f"κ versus {_axis(col)} per {_axis(cat)}",
                            f"Points: debiased κ̂ with {run['config']['confidence']:.0%} Poisson-bootstrap CI; "
                            f"dashed: all {_axis(cat)}s pooled.{control_note}"
                            + (" Crosses (right axis, inverted): planted habit entropy." if pl else "")
                            + f" Lower panel: rows per bin. {note}"))
        elif len(cols) == 1 and cols[0] in bins:
            if any(cols[0] in g2.split(":") for g2 in by if g2 != g):
                continue  # drawn as the pooled line of a crossed figure
            pl = planted_entropy(planted_data, None) if planted_data and cols[0] == "temperature_c" else None
            note = fig_binned(plt, None, cols[0], by[g], [], out / name, min_count, ctl, pl)
            figures.append((name, f"κ versus {_axis(cols[0])}", f"All rows pooled.{control_note} {note}"))
        else:
            note = fig_categorical(plt, g.replace(":", " × "), by[g], out / name, ctl)
            figures.append((name, f"κ per {_axis(g.replace(':', ' × '))}",
                            f"Dots: debiased κ̂ with CI; crosses: exact MLE (biased upward when n is small)."
                            + (" Open squares: random-init control." if ctl else "") + f" {note}"))

    # ---- copies, netCDF
    for f in ("kappa.csv", "similarity.csv", "kappa.json"):
        if (src / f).exists() and (src / f).resolve() != (out / f).resolve():
            shutil.copyfile(src / f, out / f)
        if (out / f).exists():
            page.downloads.append((f, "κ of every group (trained backbone)" if f != "similarity.csv"
                                   else "class-centroid similarity matrix"))
    if ctl_res is not None and (Path(random) / "kappa.csv").exists():
        shutil.copyfile(Path(random) / "kappa.csv", out / "kappa_random_init.csv")
        page.downloads.append(("kappa_random_init.csv", "κ of every group (random-init control)"))
    try:
        write_netcdf(out / "kappa.nc", {"trained": res, **({"random_init": ctl_res} if ctl_res else {})})
        page.downloads.append(("kappa.nc", "κ tables as CF-1.8 netCDF (xarray.open_dataset)"))
    except ImportError as exc:
        warnings.append(f"kappa.nc not written ({exc}); install xarray and h5netcdf")

    # ---- store-based sections
    map_html = examples_html = ""
    store_meta_cols = [label, "temperature_c", "campaign", "key", "shard", "probe", "polarity"]
    if store and Path(store).exists():
        x, meta, n_rows = _read_sample(Path(store), store_meta_cols, max(map_sample, 1))
        for c, what in (("probe", "probes"), ("polarity", "polarities")):
            if c in meta and _known_str(meta[c]):
                vals = sorted({str(v) for v in meta[c] if str(v)})
                if len(vals) > 1:
                    warnings.append(f"mixed {what} in one store ({', '.join(vals)}): κ and similarities mix "
                                    "instruments; group by that column or embed them apart.")
        if len(x) >= 5:
            colourings, pca, tsne = fig_embedding_map(plt, x, meta, label, out / "embedding_map.png")
            keys = meta.get("key", np.arange(len(x)).astype(str))
            write_atomic(out / "embedding_map.csv", _csv_text(
                ["key", *colourings, "pca_1", "pca_2", "tsne_1", "tsne_2"],
                [[str(keys[i]), *[str(meta[c][i]) for c in colourings], f"{pca[i, 0]:.5g}", f"{pca[i, 1]:.5g}",
                  f"{tsne[i, 0]:.5g}", f"{tsne[i, 1]:.5g}"] for i in range(len(x))]))
            page.downloads.append(("embedding_map.csv", "2-D coordinates of the embedding map"))
            map_html = (f"embedding_map.png", "Embedding map",
                        f"{len(x):,} of {n_rows:,} embeddings (seeded sample), L2-normalised; top: PCA, bottom: "
                        f"t-SNE (scikit-learn). Coloured by {', '.join(_axis(c) for c in colourings) or 'nothing'}"
                        " (only columns with known values).")
        if shards and Path(shards).exists() and "key" in meta and "shard" in meta:
            t_edges = run.get("bins", {}).get("temperature_c")
            groups = example_groups(x, meta, label, t_edges, examples)
            shard_of = {str(k): str(s) for k, s in zip(meta["key"], meta["shard"])}
            wanted = {k for g in groups for k, _ in g["nearest"] + g["farthest"]}
            images = read_images(Path(shards), wanted, shard_of)
            lines = []
            for g in groups:
                def cells(items: list[tuple[str, float]]) -> str:
                    return "".join(f"<img alt='{html.escape(k)}' title='key {html.escape(k)}, cos {c:.3f}' "
                                   f"src='data:image/png;base64,{_thumb(images[k])}'>" for k, c in items if k in images)
                lines.append(f"<tr><td>{html.escape(g['group'])}<br><small>n = {g['n']:,}</small></td>"
                             f"<td>{cells(g['nearest'])}</td><td>{cells(g['farthest'])}</td></tr>")
            write_atomic(out / "examples.csv", _csv_text(
                ["group", "which", "key", "cos_to_mean"],
                [[g["group"], which, k, f"{c:.5f}"] for g in groups for which in ("nearest", "farthest")
                 for k, c in g[which]]))
            page.downloads.append(("examples.csv", "keys of the example images and their cosine to the group mean"))
            if lines:
                examples_html = ("<p>Per group, the images whose embedding is nearest to the group's mean direction "
                                 "(typical) and farthest from it (rare shapes, or mislabels), from the sample above. "
                                 "Hover for key and cosine.</p><table class='thumbs'><thead><tr><th>group</th>"
                                 "<th>nearest the mean direction</th><th>farthest</th></tr></thead><tbody>"
                                 + "".join(lines) + "</tbody></table>")

    # ---- probe
    probe_html = ""
    if probe and (Path(probe) / "probe.json").exists():
        pj = json.loads((Path(probe) / "probe.json").read_text())
        classes = [str(c) for c in pj.get("classes", [])]
        table = []
        best: dict[str, float] = {}
        for rep, methods in (pj.get("results") or {}).items():
            for method, m in methods.items():
                if not isinstance(m, dict):
                    continue
                acc, acc_sd = _metric(m, "accuracy")
                bal, bal_sd = _metric(m, "balanced_accuracy")
                table.append({"representation": rep, "method": method, "accuracy": _fmt_ms(acc, acc_sd),
                              "balanced accuracy": _fmt_ms(bal, bal_sd),
                              "splits": len(m["splits"]) if isinstance(m.get("splits"), list) else
                              (pj.get("split") or {}).get("n_splits", 1)})
                if bal is not None:
                    best[rep] = max(best.get(rep, 0.0), bal)
        if "pretrained" in best and "random_init" in best and best["pretrained"] <= best["random_init"]:
            warnings.append(f"the trained backbone's best probe (balanced accuracy {best['pretrained']:.3f}) does "
                            f"not beat random init ({best['random_init']:.3f}): pretraining has not learnt habits yet.")
        recall_rows = []
        conf_names = []
        for rep, methods in (pj.get("results") or {}).items():
            for method, m in methods.items():
                if not isinstance(m, dict):
                    continue
                rec = m.get("per_class_recall")
                if isinstance(rec, dict):
                    recall_rows.append({"representation / method": f"{rep} / {method}",
                                        **{c: (v.get("mean") if isinstance(v, dict) else v) for c, v in rec.items()}})
                cm = m.get("confusion_matrix")
                if cm is not None and classes and np.asarray(cm).shape == (len(classes), len(classes)):
                    fname = "confusion_" + re.sub(r"[^\w-]+", "_", f"{rep}_{method}") + ".png"
                    _fig_confusion(plt, np.asarray(cm, dtype=float), classes, f"{rep} / {method}", out / fname)
                    conf_names.append(fname)
                    page.downloads += [(Path(fname).with_suffix(f".{f}").name, f"confusion matrix {rep} / {method}")
                                       for f in FORMATS if f != "png"]
        split = pj.get("split") or {}
        probe_html = (f"<p>Class column <code>{html.escape(str(pj.get('label', '')))}</code>, {len(classes)} classes; "
                      f"{html.escape(json.dumps(split, ensure_ascii=False))}. Mean ± sd over splits where the probe "
                      "ran several.</p>" + _table(table, ["representation", "method", "accuracy",
                                                           "balanced accuracy", "splits"]))
        if recall_rows:
            probe_html += ("<details><summary>per-class recall</summary>"
                           + _table(recall_rows, ["representation / method", *classes]) + "</details>")
        probe_html += "<div class='conf'>" + "".join(f"<figure><img alt='{html.escape(n)}' src='data:image/png;base64,{_b64(out / n)}'>"
                              f"<figcaption>Row-normalised confusion matrix, {html.escape(n[10:-4].replace('_', ' '))}.</figcaption></figure>"
                              for n in conf_names) + "</div>"
        if (Path(probe) / "summary.csv").exists():
            shutil.copyfile(Path(probe) / "summary.csv", out / "probe_summary.csv")
            page.downloads.append(("probe_summary.csv", "probe accuracies"))

    # ---- pretraining
    pretrain_fig = None
    prov: list[dict[str, Any]] = []
    if pretrain and (Path(pretrain) / "metrics.jsonl").exists():
        mpath = Path(pretrain) / "metrics.jsonl"
        if fig_pretrain(plt, mpath, out / "pretrain_curves.png"):
            pretrain_fig = "pretrain_curves.png"
        warnings += metric_warnings(mpath)
        shutil.copyfile(mpath, out / "metrics.jsonl")
        page.downloads.append(("metrics.jsonl", "pretraining metrics, one JSON record per step"))
    if backbone and Path(backbone).exists():
        prov.append({"item": "backbone", "value": f"{Path(backbone).resolve()}  sha256 {file_sha256(Path(backbone))}"})
    if pretrain and (Path(pretrain) / "config.yaml").exists():
        prov.append({"item": "pretraining config", "value": f"{Path(pretrain).resolve() / 'config.yaml'}"})
    if shards and (Path(shards) / "index.json").exists():
        index_path = Path(shards) / "index.json"
        index = json.loads(index_path.read_text())
        prov.append({"item": "shards", "value": f"{Path(shards).resolve()}  index.json sha256 {file_sha256(index_path)[:16]}; "
                                                f"{json.dumps(index.get('totals', {}))}"})
        if index.get("command"):
            prov.append({"item": "command: shards", "value": " ".join(map(str, index["command"]))})
    if store and Path(f"{store}.json").exists():
        sj = json.loads(Path(f"{store}.json").read_text())
        prov.append({"item": "store", "value": f"{Path(store).resolve()}; {sj.get('rows')} rows, {sj.get('dim')}-d; "
                                               f"weights {sj.get('backbone', {}).get('weights')}"})
    prov.append({"item": "command: kappa", "value": " ".join(map(str, run.get("argv") or []))})
    prov.append({"item": "command: report", "value": " ".join(sys.argv)})
    for k in ("store", "n_rows", "dim", "ranks", "started", "host", "icehpc", "python", "numpy", "fingerprint"):
        if run.get(k) is not None:
            prov.append({"item": f"κ run: {k}", "value": run[k]})

    # ---- assemble
    flagged = [r for r in rows if r.get("flag")]
    warn_html = ("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
                 + "</ul></div>") if warnings else "<div class='ok'>No warnings.</div>"
    page.add(f"<p class='summary'><b>{run['n_rows']:,}</b> embeddings of dimension <b>{run['dim']}</b> from "
             f"<code>{html.escape(str(run['store']))}</code>; {len(rows)} groups in {len(by)} groupings; "
             f"{len(flagged)} flagged; {run['rows_nonfinite']:,} non-finite and {run['rows_zero_norm']:,} "
             f"zero-norm rows skipped. κ is the concentration of L2-normalised embeddings around their "
             f"group mean direction: high κ = low habit diversity. Groups with fewer than {min_count} valid rows "
             "are not estimated." + (" The random-init backbone is drawn beside the trained one as a control: an "
                                     "ordering both share comes from image statistics, not from learning."
                                     if ctl_res else "") + "</p>")
    page.add(warn_html)
    page.h2("kappa", "κ per group")
    for name, title, caption in figures:
        page.add(f"<h3>{html.escape(title)}</h3>")
        page.figure(name, title, caption)
    if sim is not None and sim.get("labels"):
        fig_similarity(plt, sim, out / "similarity.png")
        page.h2("similarity", f"Inter-class similarity ({sim['column']})")
        page.figure("similarity.png", "similarity", "S[i, j] = mean over samples of class i (rows) of cos(x̂, centroid "
                    "of class j) (columns); the diagonal equals R̄ of the class. Classes in average-linkage order "
                    "on 1 − S; colour scale fitted to the values."
                    + (f" Mean off-diagonal S = {offdiag:.3f}." if offdiag is not None else ""))
    if map_html:
        page.h2("map", "Embedding map")
        page.figure(*map_html)
    if examples_html:
        page.h2("examples", "Example images")
        page.add(examples_html)
    if probe_html:
        page.h2("probe", "Probe results")
        page.add(probe_html)
    if pretrain_fig:
        page.h2("pretraining", "Pretraining curves")
        page.figure(pretrain_fig, "pretraining curves", "From metrics.jsonl of the pretraining run, one point per step.")
    page.h2("flagged", f"Flagged groups ({len(flagged)})")
    page.add("<p>Flags: <code>n&lt;min</code> too few rows (not estimated), <code>empty</code> no valid rows, "
             "<code>mle_outside_ci</code> the MLE's small-sample bias exceeds the CI, <code>ci_unstable</code> too "
             "few usable bootstrap replicates, <code>degenerate</code> identical directions (κ = inf).</p>")
    page.add(_table(flagged, ["grouping", "group", "n", "n_skipped", "kappa", "kappa_debiased", "ci_low", "ci_high",
                              "flag"]) if flagged else "<p>None.</p>")
    page.add("<details><summary>table of every group (also kappa.csv)</summary>"
             + _table(rows, ["grouping", "group", "n", "rbar", "kappa", "kappa_debiased", "kappa_closed_form",
                             "ci_low", "ci_high", "flag"]) + "</details>")
    page.h2("provenance", "Provenance")
    page.add(_table(prov, ["item", "value"]))
    if pretrain and (Path(pretrain) / "config.yaml").exists():
        page.add("<details><summary>pretraining config (resolved)</summary><pre>"
                 + html.escape((Path(pretrain) / "config.yaml").read_text()) + "</pre></details>")
    page.add("<details><summary>κ configuration and bin edges</summary><pre>"
             + html.escape(json.dumps({"config": run.get("config"), "config_source": run.get("config_source"),
                                       "bins": run.get("bins"), "timings": run.get("timings")},
                                      indent=1, ensure_ascii=False, default=str)) + "</pre></details>")
    page.h2("downloads", "Downloads")
    page.add("<ul>" + "".join(f"<li><a href='{html.escape(f)}'>{html.escape(f)}</a>: {html.escape(d)}</li>"
                              for f, d in page.downloads) + "</ul>")
    nav = "<nav>" + "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t in page.toc) + "</nav>"
    doc = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>icehpc κ report</title>"
           f"<style>{CSS}</style></head><body><h1>vMF concentration (κ) report</h1>{nav}"
           + "\n".join(page.parts) + "</body></html>\n")
    index = out / "index.html"
    write_atomic(index, doc)  # last: marks completion
    return index


def _fig_confusion(plt, counts: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.5 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    if len(classes) <= 25:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if counts[i, j]:
                    ax.text(j, i, f"{fractions[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class (recall on the diagonal)")
    _save(plt, fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kappa_dir", help="output folder of `icehpc kappa`")
    parser.add_argument("--out", required=True, help="report folder (index.html, PNG/SVG/PDF, CSVs, kappa.nc)")
    parser.add_argument("--random", metavar="KAPPA_DIR", help="κ folder of the random-init control (drawn beside)")
    parser.add_argument("--planted", metavar="JSON", help="synth's planted.json: planted habit entropy overlaid")
    parser.add_argument("--store", help="embedding store of KAPPA_DIR: embedding map and example images")
    parser.add_argument("--shards", help="shard folder of the store's samples: example thumbnails")
    parser.add_argument("--probe", metavar="DIR", help="`icehpc probe` output folder: probe results")
    parser.add_argument("--pretrain", metavar="DIR", help="pretraining run folder: curves from metrics.jsonl")
    parser.add_argument("--backbone", help="exported backbone file (sha256 in the provenance)")


def run(args: argparse.Namespace) -> int:
    try:
        index = build_report(args.kappa_dir, args.out, random=args.random, planted=args.planted, store=args.store,
                             shards=args.shards, probe=args.probe, pretrain=args.pretrain, backbone=args.backbone)
    except ReportError as exc:
        print(f"icehpc report: error: {exc}", file=sys.stderr)
        return 2
    print(f"icehpc report: {index}")
    return 0
