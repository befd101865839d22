"""How well does `icehpc classify` label a store from a fraction of its labels?

For each STORE: a stratified FRACTION of its rows (by the label column, seed SEED; the probe's
stratified split) is written as a key,label CSV, `icehpc classify STORE --labels CSV` fits on it
(C by cross-validation on those rows only) and predicts every row; accuracy and balanced accuracy
are scored on the other rows against the store's own labels. Classes with fewer labeled rows than
the folds are left out of the fit by classify, so their held-out rows count as errors. Classes
with fewer than 2 rows in the store cannot be split and are left out of the whole measurement.
Everything runs through the real CLI.

    python bench/classify_fraction.py STORE... --out DIR [--fraction 0.1] [--seed 0] [--ranks 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from icehpc.analysis.classify import CONTRACT, PREDICTIONS
from icehpc.analysis.probe import stratified_split
from icehpc.analysis.store import open_store


def measure(store: Path, out: Path, fraction: float, seed: int, label: str, ranks: int) -> dict:
    with open_store(store) as st:
        _, meta = st.read(0, st.n_rows, ["key", label], embeddings=False)
    keys, labels = meta["key"].astype(str), meta[label].astype(str)
    names, counts = np.unique(labels, return_counts=True)
    usable = np.isin(labels, names[counts >= 2]) & (labels != "")
    rows = np.flatnonzero(usable)
    train, test = stratified_split(labels[rows], 1.0 - fraction, seed)
    train, test = rows[train], rows[test]
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", label])
        w.writerows(zip(keys[train], labels[train]))
    pre = ["mpiexec", "--oversubscribe", "-n", str(ranks)] if ranks > 1 else []
    t0 = time.perf_counter()
    subprocess.run([*pre, sys.executable, "-m", "icehpc", "classify", str(store), "--labels", str(csv_path),
                    "--label-column", label, "--out", str(out / "classify")], check=True)
    wall = time.perf_counter() - t0
    with open(out / "classify" / PREDICTIONS, newline="") as fh:
        predicted = {r["key"]: r[f"predicted_{label}"] for r in csv.DictReader(fh)}
    record = json.loads((out / "classify" / CONTRACT.marker).read_text())
    y_true, y_pred = labels[test], np.array([predicted[k] for k in keys[test]])
    return {"store": str(store), "rows": int(len(keys)), "classes": int(len(names)),
            "left_out_of_measurement": {str(n): int(c) for n, c in zip(names, counts) if c < 2 or n == ""},
            "labeled": int(len(train)), "held_out": int(len(test)), "chosen_c": record["chosen_c"],
            "left_out_of_fit": record["left_out_classes"], "cv": {k: record["cv"][k] for k in (
                "accuracy", "accuracy_sd", "balanced_accuracy", "balanced_accuracy_sd")},
            "held_out_accuracy": float(accuracy_score(y_true, y_pred)),
            "held_out_balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "wall_s": wall, "ranks": max(ranks, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stores", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="habit")
    ap.add_argument("--ranks", type=int, default=1)
    args = ap.parse_args()
    results = [measure(s, args.out / f"{i}", args.fraction, args.seed, args.label, args.ranks)
               for i, s in enumerate(args.stores)]
    for r in results:
        print(f"{r['store']}: {r['rows']} rows, {r['classes']} classes; fitted on {r['labeled']} "
              f"({args.fraction:.0%}), C = {r['chosen_c']:g}; CV balanced accuracy {r['cv']['balanced_accuracy']:.3f} "
              f"± {r['cv']['balanced_accuracy_sd']:.3f}; held-out {r['held_out']}: accuracy "
              f"{r['held_out_accuracy']:.3f}, balanced accuracy {r['held_out_balanced_accuracy']:.3f} "
              f"({r['wall_s']:.1f} s on {r['ranks']} rank(s))")
    (args.out / "classify_fraction.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
