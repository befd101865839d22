"""Pretraining curves and the warnings a run's last metrics raise."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import _save

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


