"""Can `icehpc outliers` find planted rare shapes? Precision at the planted count.

A synthetic set is drawn (`icehpc synth`), then a fraction of one campaign's samples is redrawn as
another habit (same metadata, same seeded RNG stream, new shape) and the manifest relabelled; the
set is sharded, embedded with BACKBONE and scored by `icehpc outliers` for several k. Reported:
precision at the planted count for `rarity` and `local_ratio`, and, as a control, the same for the
rarest habit that occurs naturally. Everything runs through the real CLI.

``--habit capped_column`` (default; one of ``synth.PLANT_ONLY_HABITS``) plants a habit the set does
not otherwise hold; a habit of the natural mix (e.g. ``dendrite``) joins the samples it already has.

    python bench/outliers_planted.py BACKBONE --out DIR [--n 3000] [--habit capped_column] [--random-init]
        [--campaign tropical-anvil] [--fraction 0.03] [--k 20,100,300]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from icehpc.data import synth


def icehpc(*args: str, ranks: int = 0) -> None:
    pre = ["mpiexec", "--oversubscribe", "-n", str(ranks)] if ranks else []
    subprocess.run([*pre, sys.executable, "-m", "icehpc", *args], check=True, stdout=subprocess.DEVNULL)


def plant(folder: Path, seed: int, habit: str, campaign: str, fraction: float) -> set[str]:
    """Redraw ``fraction`` × n samples of ``campaign`` as ``habit``: their image paths."""
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pool = [i for i, r in enumerate(rows) if r["campaign"] == campaign and r["habit"] != habit]
    pick = np.random.default_rng(seed).choice(pool, size=min(len(pool), round(fraction * len(rows))), replace=False)
    for i in pick:
        meta, rng = synth.sample_metadata(seed, int(i))
        meta["habit"] = habit
        buf = io.BytesIO()
        Image.fromarray(synth.render(meta, rng), "L").save(buf, format="PNG")
        (folder / rows[i]["path"]).write_bytes(buf.getvalue())
        rows[i]["habit"] = habit
        rows[i]["particle_height_um"] = str(round(meta["particle_height_um"], 3))
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {rows[i]["path"] for i in pick}


def precision_at(scores: dict[str, float], positives: set[str]) -> float:
    top = sorted(scores, key=lambda k: -scores[k])[:len(positives)]
    return len(set(top) & positives) / max(len(positives), 1)


def neighbour_purity(x: np.ndarray, habits, of: list[str], k: int = 10) -> dict[str, float]:
    """Per habit in ``of``: the mean fraction of its rows' k nearest (cosine) neighbours with the same
    habit. Low: the embedding does not set the habit apart, and no neighbour score can find it."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    habits = np.asarray(habits).astype(str)
    out = {}
    for h in of:
        rows = np.flatnonzero(habits == h)
        sim = x[rows] @ x.T
        sim[np.arange(len(rows)), rows] = -np.inf
        nn = np.argpartition(-sim, k, axis=1)[:, :k]
        out[h] = float((habits[nn] == h).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbone", help="exported backbone (.safetensors)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--habit", default="capped_column")
    ap.add_argument("--campaign", default="tropical-anvil")
    ap.add_argument("--fraction", type=float, default=0.03)
    ap.add_argument("--k", default="20,100,300")
    ap.add_argument("--random-init", action="store_true",
                    help="embed with a seeded random-init backbone shaped like BACKBONE (the control)")
    args = ap.parse_args()
    o = args.out
    icehpc("synth", "--out", str(o / "synth"), "--n", str(args.n), "--seed", str(args.seed), "--no-progress")
    planted_paths = plant(o / "synth", args.seed, args.habit, args.campaign, args.fraction)
    icehpc("shards", "build", "--manifest", str(o / "synth" / "manifest.csv"), "--out", str(o / "shards"),
           "--no-progress")
    weights = ["--random-init", "--like"] if args.random_init else ["--checkpoint"]
    icehpc("embed", str(o / "shards"), *weights, args.backbone, "--out", str(o / "store.h5"), ranks=2)
    from icehpc.analysis.store import open_store

    with open_store(o / "store.h5") as s:
        vectors, meta = s.read(0, s.n_rows, ["key", "habit", "source_path"])
    keys = meta["key"].tolist()
    planted = {k for k, p in zip(keys, meta["source_path"]) if any(p.endswith(q) for q in planted_paths)}
    counts = Counter(meta["habit"].tolist())
    natural = min((h for h in counts if h != args.habit), key=counts.get)
    control = {k for k, h in zip(keys, meta["habit"]) if h == natural}
    purity = neighbour_purity(np.asarray(vectors, dtype=np.float64), meta["habit"], [args.habit, natural])
    result = {"planted": len(planted), "planted_habit": args.habit, "campaign": args.campaign,
              "weights": "random-init" if args.random_init else "checkpoint", "habit_counts": dict(counts),
              "control_habit": natural, "control_count": len(control), "neighbour_purity_10": purity, "by_k": {}}
    print(f"same habit among the 10 nearest neighbours: planted {args.habit} {purity[args.habit]:.2f}, "
          f"{natural} {purity[natural]:.2f}", flush=True)
    for k in map(int, args.k.split(",")):
        icehpc("outliers", str(o / "store.h5"), "--out", str(o / f"outliers-k{k}"), "--k", str(k), ranks=2)
        with open(o / f"outliers-k{k}" / "outliers.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        row = {}
        for col in ("rarity", "local_ratio"):
            sc = {r["key"]: float(r[col]) for r in rows}
            row[col] = {"planted": precision_at(sc, planted), "control": precision_at(sc, control)}
        result["by_k"][k] = row
        print(f"k = {k:4d}: precision at {len(planted)} planted {args.habit} (chance {len(planted) / len(keys):.3f}): "
              f"rarity {row['rarity']['planted']:.2f}, local_ratio {row['local_ratio']['planted']:.2f}; "
              f"control ({len(control)} natural {natural}): {row['rarity']['control']:.2f} / "
              f"{row['local_ratio']['control']:.2f}", flush=True)
    (o / "planted.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
