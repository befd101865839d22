"""Offline report of a κ run: ``icehpc report KAPPA_DIR --out REPORT_DIR``.

Writes PNG figures, copies of the CSVs and one self-contained ``index.html`` (figures embedded as
base64, inline CSS, no network) that opens from a laptop or a cluster's file browser. Figures are
chosen by grouping shape: categorical → κ per group; one binned column → κ versus the bin centre;
categorical × binned → one line per category (the paper's κ-versus-temperature and κ-versus-width
per campaign, with the pooled curve dashed). Every point carries its bootstrap CI and its count.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..config import UserError
from ..fileio import write_atomic

AXIS_NAMES = {"temperature_c": "temperature (°C)", "particle_width_um": "particle width (µm)",
              "pressure_hpa": "pressure (hPa)", "particle_height_um": "particle height (µm)"}
ESTIMATE = "kappa_debiased"  # the CI brackets this estimator (see icehpc.analysis.kappa)


class ReportError(UserError):
    """The κ folder cannot be reported on; the message says what is missing."""


def _axis(col: str) -> str:
    return AXIS_NAMES.get(col, col.replace("_", " "))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _finite(v: Any) -> bool:
    return v is not None and np.isfinite(v)


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


def fig_categorical(plt, grouping: str, rows: list[dict], path: Path) -> str:
    """κ per category with CI bars, n written beside each point."""
    est = _estimable(rows)
    fig, ax = plt.subplots(figsize=(8, 1.9 + 0.4 * max(len(est), 1)))
    y = np.arange(len(est))
    ax.errorbar([r[ESTIMATE] for r in est], y, xerr=_yerr(est), fmt="o", color="C0", capsize=3,
                label="κ̂ (debiased) with CI")
    ax.plot([r["kappa"] for r in est], y, "x", color="C3", label="κ̂ MLE")
    for yi, r in zip(y, est):
        ax.annotate(f"n={r['n']:,}", (r["ci_high"] if _finite(r["ci_high"]) else r[ESTIMATE], yi),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8, color="0.3")
    ax.set_yticks(y, [r["group"] for r in est])
    ax.invert_yaxis()
    ax.set_xlabel("vMF concentration κ  (higher = less diverse)")
    v = [r[ESTIMATE] for r in est]
    if v and max(v) / max(min(v), 1e-300) > 3:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.5 / max(len(est), 1))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0 + 0.6 / (1.9 + 0.4 * max(len(est), 1))),
              ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return _note(rows, est)


def _centre(r: dict, col: str) -> float | None:
    lev = r["levels"][col]
    return 0.5 * (lev["low"] + lev["high"]) if "low" in lev else None


def fig_binned(plt, cat: str | None, col: str, rows: list[dict], pooled: list[dict], path: Path,
               min_count: int = 0) -> str:
    """κ versus bin centre of ``col``, one line per level of ``cat`` (+ pooled, dashed); counts below."""
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(8, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    series: dict[str, list[dict]] = {}
    for r in rows:
        if _centre(r, col) is not None:
            series.setdefault(r["levels"][cat]["label"] if cat else "all", []).append(r)
    if pooled and cat:
        series["all (pooled)"] = [r for r in pooled if _centre(r, col) is not None]
    width = None
    all_est: list[float] = []
    for i, (name, rs) in enumerate(series.items()):
        pooled_line = name == "all (pooled)"
        color = "k" if pooled_line else f"C{i % 10}"
        est = _estimable(rs)
        x = [_centre(r, col) for r in est]
        all_est += [r[ESTIMATE] for r in est]
        ax.errorbar(x, [r[ESTIMATE] for r in est], yerr=_yerr(est), fmt="o-" if not pooled_line else "s--",
                    color=color, capsize=3, ms=4, lw=1.2, label=name)
        xs = [_centre(r, col) for r in rs]
        axn.plot(xs, [max(r["n"], 0.8) for r in rs], "o-" if not pooled_line else "s--", color=color, ms=3, lw=1)
        if len(xs) > 1:
            width = np.min(np.diff(sorted(set(xs))))
    ax.set_ylabel("κ̂ (debiased) with CI")
    _log_if_wide(ax, all_est)
    # a near-threshold group's CI can span 0..10×κ̂; keep the axis on the estimates (bars run off)
    shown = _estimable([r for rs in series.values() for r in rs])
    if shown:
        lo = [max(r["ci_low"], r[ESTIMATE] / 3) if _finite(r["ci_low"]) else r[ESTIMATE] for r in shown]
        hi = [min(r["ci_high"], r[ESTIMATE] * 3) if _finite(r["ci_high"]) else r[ESTIMATE] for r in shown]
        pad = 0.08 * (max(hi) - min(lo)) or 0.05 * max(hi)
        ax.set_ylim(min(lo) / 1.15 if ax.get_yscale() == "log" else min(lo) - pad,
                    max(hi) * 1.15 if ax.get_yscale() == "log" else max(hi) + pad)
    if min_count:
        axn.axhline(min_count, color="0.5", ls=":", lw=1)
        axn.annotate(f"min n = {min_count}", (1.0, min_count), xycoords=("axes fraction", "data"),
                     ha="right", va="bottom", fontsize=7, color="0.4")
    axn.set_yscale("log")
    axn.set_ylabel("n")
    axn.set_xlabel(_axis(col))
    ax.set_title(f"κ versus {_axis(col)}" + (f" per {_axis(cat)}" if cat else ""))
    ax.legend(fontsize=8, ncol=2 if len(series) > 5 else 1)
    if width:
        ax.set_xlim(min(min(_centre(r, col) for r in rs) for rs in series.values() if rs) - width,
                    max(max(_centre(r, col) for r in rs) for rs in series.values() if rs) + width)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    outside = [r for r in rows if _centre(r, col) is None and r["n"] > 0]
    note = _note(rows, _estimable([r for r in rows if _centre(r, col) is not None]) + outside)
    if outside:
        note += f" {sum(r['n'] for r in outside):,} rows outside the bins (below/above range or missing) are in the table only."
    return note


def _note(rows: list[dict], shown: list[dict]) -> str:
    hidden = len(rows) - len(shown)
    return f"{hidden} group(s) below the minimum count or empty are not drawn (see the flagged table)." if hidden else ""


def fig_similarity(plt, sim: dict, path: Path) -> None:
    m = np.asarray(sim["matrix"], dtype=float)
    labels = sim["labels"]
    k = len(labels)
    size = min(2.5 + 0.55 * k, 16)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    vmax = float(np.nanmax(np.abs(m))) or 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.grid(False)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{l} (n={n:,})" for l, n in zip(labels, sim["n"])])
    if k <= 25:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(m[i, j]) > 0.6 * vmax else "black")
    ax.set_xlabel(f"centroid of {sim['column']}")
    ax.set_ylabel(f"samples from {sim['column']}")
    ax.set_title("mean cosine of samples to class centroids")
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean cos(x̂, centroid)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;
font-size:.9em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;
padding:.25em .6em;text-align:left}th{background:#f4f4f4}tr:nth-child(even){background:#fafafa}
.summary{background:#f6f8fa;padding:.8em 1em;border-radius:6px}code,pre{background:#f6f8fa;font-size:.85em}
pre{padding:.8em;overflow-x:auto}"""


def build_report(kappa_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Read ``kappa_dir``/kappa.json (+ CSVs), write figures, CSV copies and index.html."""
    src, out = Path(kappa_dir), Path(out_dir)
    if src.is_file():
        raise ReportError(f"{src} is a file; give the κ folder written by `icehpc kappa STORE --out KAPPA_DIR` "
                          f"(it holds kappa.json), e.g. `icehpc kappa {src} --out KDIR && icehpc report KDIR --out R`")
    try:
        res = json.loads((src / "kappa.json").read_text())
    except FileNotFoundError as exc:
        raise ReportError(f"{src}/kappa.json not found: run `icehpc kappa STORE --out {src}` first") from exc
    except ValueError as exc:
        raise ReportError(f"{src}/kappa.json is not valid JSON ({exc})") from exc
    rows, run, sim = res["rows"], res["run"], res.get("similarity")
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["grouping"], []).append(r)
    bins = set(run.get("bins", {}))
    figures: list[tuple[str, str, str]] = []  # (file, title, caption)

    def add(name: str, title: str, caption: str) -> None:
        figures.append((name, title, caption))

    # categorical × binned first (the paper's figures), then single binned, then categorical
    rank = {"temperature_c": 0, "particle_width_um": 1, "campaign": 2, "habit": 3}
    order = sorted(by, key=lambda g: (-len(g.split(":")), [rank.get(c, 9) for c in reversed(g.split(":"))], g))
    for g in order:
        cols = g.split(":")
        name = "kappa_" + g.replace(":", "_by_") + ".png"
        if len(cols) == 2 and (cols[0] in bins) != (cols[1] in bins):
            cat, col = (cols[1], cols[0]) if cols[0] in bins else (cols[0], cols[1])
            note = fig_binned(plt, cat, col, by[g], by.get(col, []), out / name, run["config"]["min_count"])
            add(name, f"κ versus {_axis(col)} per {_axis(cat)}",
                f"Points: debiased κ̂ with {run['config']['confidence']:.0%} Poisson-bootstrap CI; "
                f"dashed: all {_axis(cat)}s pooled. Lower panel: rows per bin. {note}")
        elif len(cols) == 1 and cols[0] in bins:
            if any(cols[0] in g2.split(":") for g2 in by if g2 != g):
                continue  # drawn as the pooled line of a crossed figure
            note = fig_binned(plt, None, cols[0], by[g], [], out / name, run["config"]["min_count"])
            add(name, f"κ versus {_axis(cols[0])}", f"All rows pooled. {note}")
        else:
            note = fig_categorical(plt, g.replace(":", " × "), by[g], out / name)
            add(name, f"κ per {_axis(g.replace(':', ' × '))}",
                f"Dots: debiased κ̂ with CI; crosses: exact MLE (biased upward when n is small). {note}")
    if sim is not None and sim.get("labels"):
        fig_similarity(plt, sim, out / "similarity.png")
        add("similarity.png", f"Inter-class similarity ({sim['column']})",
            "S[i, j] = mean over samples of class i (rows) of cos(x̂, centroid of class j) (columns); "
            "the diagonal equals R̄ of the class.")

    for f in ("kappa.csv", "similarity.csv", "kappa.json"):
        if (src / f).exists() and (src / f).resolve() != (out / f).resolve():
            shutil.copyfile(src / f, out / f)

    flagged = [r for r in rows if r.get("flag")]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>icehpc κ report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>vMF concentration (κ) report</h1>",
             f"<p class='summary'><b>{run['n_rows']:,}</b> embeddings of dimension <b>{run['dim']}</b> from "
             f"<code>{html.escape(run['store'])}</code>; {len(rows)} groups in {len(by)} groupings; "
             f"{len(flagged)} flagged; {run['rows_nonfinite']:,} non-finite and {run['rows_zero_norm']:,} "
             f"zero-norm rows skipped. κ is the concentration of L2-normalised embeddings around their "
             f"group mean direction: high κ = low habit diversity. Groups with fewer than "
             f"{run['config']['min_count']} valid rows are not estimated.</p>"]
    for name, title, caption in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><figure><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)} "
                     f"File: <code>{name}</code>.</figcaption></figure>")
    parts.append(f"<h2>Flagged groups ({len(flagged)})</h2>")
    parts.append("<p>Flags: <code>n&lt;min</code> too few rows (not estimated), <code>empty</code> no valid "
                 "rows, <code>mle_outside_ci"
                 "</code> the MLE's small-sample bias exceeds the CI, <code>ci_unstable</code> too few "
                 "usable bootstrap replicates.</p>")
    parts.append(_table(flagged, ["grouping", "group", "n", "n_skipped", "kappa", "kappa_debiased", "ci_low",
                                  "ci_high", "flag"])
                 if flagged else "<p>None.</p>")
    parts.append("<h2>All groups</h2><details><summary>table of every group (also kappa.csv)</summary>")
    parts.append(_table(rows, ["grouping", "group", "n", "rbar", "kappa", "kappa_debiased",
                               "kappa_closed_form", "ci_low", "ci_high", "flag"]) + "</details>")
    prov = {k: run.get(k) for k in ("store", "n_rows", "dim", "parts", "ranks", "started", "host", "icehpc",
                                    "python", "numpy", "fingerprint", "rng_block_rows", "timings")}
    parts.append("<h2>Provenance</h2>" + _table([{"key": k, "value": json.dumps(v) if isinstance(v, dict) else v}
                                                  for k, v in prov.items()], ["key", "value"]))
    parts.append("<details><summary>configuration and bin edges</summary><pre>"
                 + html.escape(json.dumps({"config": run.get("config"), "bins": run.get("bins"),
                                           "argv": run.get("argv")}, indent=1, ensure_ascii=False))
                 + "</pre></details></body></html>\n")
    index = out / "index.html"
    write_atomic(index, "\n".join(parts))
    return index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kappa_dir", help="output folder of `icehpc kappa`")
    parser.add_argument("--out", required=True, help="report folder (index.html, PNGs, CSVs)")
    parser.add_argument("--random", metavar="KAPPA_DIR", help="κ folder of the random-init control (drawn beside)")
    parser.add_argument("--planted", metavar="JSON", help="synth's planted.json: planted habit entropy overlaid")
    parser.add_argument("--store", help="embedding store of KAPPA_DIR: embedding map and example images")
    parser.add_argument("--shards", help="shard folder of the store's samples: example thumbnails")
    parser.add_argument("--probe", metavar="DIR", help="`icehpc probe` output folder: probe results")
    parser.add_argument("--pretrain", metavar="DIR", help="pretraining run folder: curves from metrics.jsonl")
    parser.add_argument("--backbone", help="exported backbone file (sha256 in the provenance)")


def run(args: argparse.Namespace) -> int:
    try:
        index = build_report(args.kappa_dir, args.out)
    except ReportError as exc:
        print(f"icehpc report: error: {exc}", file=sys.stderr)
        return 2
    print(f"icehpc report: {index}")
    return 0
