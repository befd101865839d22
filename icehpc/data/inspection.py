"""Inspecting a shard folder: ``icehpc shards verify`` (stock webdataset re-read, hashes, accounting)
and ``icehpc shards stats`` (label and size summaries, histogram)."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .. import config as cfg
from ..fileio import write_atomic
from ..plotting import log_axis
from .format import INDEX, REJECTED, SHARD_GLOB, STATS, iter_samples
from .build import _read_json


# ---------------------------------------------------------------- verify and stats
def verify(shard_dir: str | os.PathLike) -> list[str]:
    """Problems found re-reading every shard with stock webdataset (empty list: all good)."""
    import webdataset as wds
    from ..progress import Progress

    root = Path(shard_dir)
    index = _read_json(root / INDEX)
    if index is None:
        return [f"{root}/{INDEX} missing"]
    problems = []
    total = 0
    bar = Progress(len(index["shards"]), "verify", "shards")
    for s in index["shards"]:
        bar.update(1)
        path = root / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
            continue
        data = path.read_bytes()
        if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
            problems.append(f"{s['name']}: bytes/sha256 differ from {INDEX}")
        n = 0
        try:
            dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False)
            for sample in dataset:
                n += 1
                members = set(sample) - {"__key__", "__url__", "__local_path__"}
                if members != {"png", "json"} or "." in sample["__key__"]:
                    problems.append(f"{s['name']}: sample {sample['__key__']} has members {sorted(sample)}")
                    continue
                meta = json.loads(sample["json"])
                with Image.open(io.BytesIO(sample["png"])) as im:
                    if im.mode != "L" or (im.width, im.height) != (meta["orig_width"], meta["orig_height"]):
                        problems.append(f"{s['name']}: {sample['__key__']} is {im.mode} {im.size}, json says "
                                        f"{meta['orig_width']}x{meta['orig_height']}")
        except Exception as exc:
            problems.append(f"{s['name']}: unreadable by webdataset: {type(exc).__name__}: {exc}")
        if n != s["samples"]:
            problems.append(f"{s['name']}: {n} samples, {INDEX} says {s['samples']}")
        total += n
    listed = {s["name"] for s in index["shards"]}
    problems += [f"{p.name}: not listed in {INDEX}"
                 for p in sorted(root.glob(SHARD_GLOB)) if p.name not in listed]
    bar.close()
    t = index["totals"]
    rej = root / REJECTED
    n_rej = len(rej.read_text().splitlines()) if rej.exists() else -1
    if total != t["written"] or n_rej != t["rejected"] or \
            t["inputs"] != t["written"] + t["rejected"] + t.get("not_selected", 0):
        problems.append(f"accounting: read {total} samples and {n_rej} rejections; {INDEX} says inputs "
                        f"{t['inputs']} = written {t['written']} + rejected {t['rejected']}")
    return problems


def iter_metadata(shard_dir: str | os.PathLike) -> Iterator[dict]:
    """Every sample's JSON, in index order (reads only the small JSON members)."""
    root = Path(shard_dir)
    for s in _read_json(root / INDEX)["shards"]:
        for _, sample in iter_samples(root / s["name"], ("json",)):
            yield json.loads(sample["json"])


def stats(shard_dir: str | os.PathLike, png: str | os.PathLike | None = None) -> dict:
    """Label and size summaries of a shard folder; writes a histogram PNG (default DIR/stats.png)."""
    from ..plotting import pyplot
    plt = pyplot()  # math text off: a class named "$\\frac{x$" is drawn as text, never parsed

    root = Path(shard_dir)
    index = _read_json(root / INDEX)
    if index is None:
        raise cfg.ConfigError(f"{root}/{INDEX} missing: not a shard folder")
    label_key = index["labels"]["column"]
    metas = list(iter_metadata(root))
    labels: dict[str, int] = {}
    for m in metas:
        labels[str(m[label_key])] = labels.get(str(m[label_key]), 0) + 1
    side = np.array([max(m["orig_width"], m["orig_height"]) for m in metas], dtype=float)
    width_um = np.array([m["particle_width_um"] for m in metas if m.get("particle_width_um") is not None], dtype=float)
    result = {"samples": len(metas), "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
              "crop_side_px": _summary(side), "particle_width_um": _summary(width_um)}
    print(f"{len(metas)} samples in {len(index['shards'])} shards; {index['totals']['rejected']} inputs rejected")
    print(f"{label_key:<40} {'count':>7} {'%':>6}")
    for label, n in result["labels"].items():
        print(f"{label:<40} {n:>7} {100 * n / max(1, len(metas)):>6.1f}")
    for name in ("crop_side_px", "particle_width_um"):
        s = result[name]
        print(f"{name}: " + (", ".join(f"{k} {v:.4g}" for k, v in s.items()) if s else "no values"))
    n_panels = 3 if width_um.size else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4), constrained_layout=True)
    names = list(result["labels"])
    axes[0].barh(names[::-1], [result["labels"][n] for n in names[::-1]])
    axes[0].set_xlabel("samples")
    axes[0].set_title(label_key)
    axes[1].hist(side, bins=40)
    axes[1].set_xlabel("crop side (px, longer)")
    axes[1].set_title("crop sizes")
    if width_um.size:
        axes[2].hist(width_um, bins=np.geomspace(max(width_um.min(), 1e-3), width_um.max() * 1.001, 40))
        log_axis(axes[2], "x")
        axes[2].set_xlabel("particle width (µm)")
        axes[2].set_title("particle sizes")
    out = Path(png) if png else root / STATS
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, buf.getvalue())
    print(f"histogram: {out}")
    result["png"] = str(out)
    return result


def _summary(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    q = np.percentile(x, [5, 50, 95])
    return {"n": float(x.size), "min": float(x.min()), "p5": q[0], "median": q[1], "p95": q[2], "max": float(x.max())}
