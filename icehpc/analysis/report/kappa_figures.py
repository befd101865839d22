"""κ figures (categorical, binned with controls and planted entropy) and the class-similarity heatmap."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...plotting import log_axis
from .common import ESTIMATE, _axis, _finite, _group_name, _save

def _yerr(rows: list[dict]) -> np.ndarray:
    k = np.array([r[ESTIMATE] for r in rows], dtype=float)
    lo = np.array([r["ci_low"] if _finite(r["ci_low"]) else np.nan for r in rows], dtype=float)
    hi = np.array([r["ci_high"] if _finite(r["ci_high"]) else np.nan for r in rows], dtype=float)
    return np.nan_to_num(np.vstack([k - lo, hi - k]), nan=0.0).clip(min=0)


def _log_if_wide(ax, values: list[float]) -> None:
    v = [x for x in values if _finite(x) and x > 0]
    if v and max(v) / min(v) > 3:
        log_axis(ax, "y")


def _estimable(rows: list[dict]) -> list[dict]:
    return [r for r in rows if _finite(r.get(ESTIMATE))]


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
        log_axis(ax, "x")
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
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
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
        # an empty bin has no point on a log axis: masked (the line breaks there), not drawn at n = 0.8
        axn.plot(xs, [r["n"] if r["n"] > 0 else np.nan for r in rs], "o-" if not pooled_line else "s--",
                 color=color, ms=3, lw=1)
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
    log_axis(axn, "y")
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
    # outside the axes, right of the planted-entropy axis when there is one: never over the points
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.13 if ax2 is not None else 1.02, 1.0),
              borderaxespad=0, frameon=False)
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
