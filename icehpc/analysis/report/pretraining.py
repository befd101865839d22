"""Pretraining curves and the warnings a run's last metrics raise."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import _save

#: The curves' panels: (title, y label, which metrics). One quantity per axis: a learning rate of
#: 0.004 beside an EMA momentum of 0.996 would be a flat line at zero.
PANELS = (
    ("losses", "loss", lambda k: k.startswith("loss")),
    ("teacher entropy", "entropy (nats)", lambda k: "entropy" in k or k.endswith("_kl")),
    ("prototype usage", "prototypes", lambda k: k.endswith(("proto_used", "proto_perplexity"))),
    ("prototype κ (‖w‖ / τ)", "κ", lambda k: k.startswith("head_kappa_p")),
    ("learning rate", "learning rate", lambda k: k == "lr"),
    ("teacher EMA momentum", "momentum", lambda k: k == "momentum"),
    ("weight decay", "weight decay", lambda k: k == "wd"),
    ("teacher temperature", "temperature", lambda k: k == "teacher_temp"),
)


def read_metrics(metrics_path: Path) -> list[dict]:
    """The records of a pretraining run's metrics.jsonl, in order (a line that is not a JSON object,
    e.g. one cut by a kill, is skipped)."""
    records = []
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def fig_pretrain(plt, records: list[dict], path: Path) -> list[str]:
    """One panel per quantity of :data:`PANELS` present in the metrics ``records``, each with its
    own y label, against the step (legends outside the curves)."""
    if not records:
        return []
    steps = np.array([r.get("step", i) for i, r in enumerate(records)], dtype=float)
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    panels = [(t, yl, [k for k in keys if pick(k)]) for t, yl, pick in PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return []
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, ylabel, ks) in zip(axes.flat, panels):
        for k in ks[:8]:
            y = np.array([r.get(k, np.nan) for r in records], dtype=float)
            ax.plot(steps, y, lw=1, label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(ks) > 1:
            ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _save(plt, fig, path)
    return keys


def metric_warnings(records: list[dict]) -> list[str]:
    """What a pretraining run's last record flags: collapse of the teacher or of prototype usage."""
    if not records:
        return []
    last = records[-1]
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


