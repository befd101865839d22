"""Does `icehpc classify`, fitted on human labels, side with the human or with the CNN?

``random_inspections.zip`` (Jaffeux et al. 2022) holds 900 2D-S and PIP images in folders named
``CNN:<label> Hum:<label>``: a CNN classifier's label and a human's. The images are sharded and
embedded as in ``mislabel_auroc.py`` (BACKBONE, and a random-init backbone of its shape as the
control). Per probe (their classes differ; labels prefixed by the probe), the images are split into
FOLDS stratified folds by the human label (shuffled with SEED, the same folds for both backbones);
for each fold, `icehpc classify STORE --labels CSV` is fitted on the human labels of the other
folds (CSV: key, habit) and its predictions of the held-out fold are read back. Every image is
predicted once, by a model that never saw its label.

Reported per probe and over both, per backbone: n; the share of held-out predictions equal to the
human label and to the CNN label; on undisputed images (CNN = human) the share predicted right; on
disputed ones (CNN ≠ human) the share siding with the human, with the CNN, with neither. classify
leaves classes with fewer labeled rows than its folds (= FOLDS) out of the fit (classify.json lists
them): held-out images of a human class the fold's model was not fitted on cannot be predicted
right; they stay in every share and are counted apart (``not fitted``). Everything runs through the
real CLI, each run on RANKS MPI ranks (1: no mpiexec).

    python bench/classify_inspections.py BACKBONE --out DIR [--zip PATH] [--folds 5] [--seed 0] [--ranks 1]

Writes DIR/inspections.json and DIR/inspections.csv (one row per backbone × probe).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from mislabel_auroc import ZIP, embed_both  # bench/ is on sys.path
from outliers_planted import icehpc
from sklearn.model_selection import StratifiedKFold

from icehpc.analysis.classify import CONTRACT, PREDICTIONS

BACKBONES = ("trained", "random")
LABEL = "habit"


def tabulate(human, cnn, predicted, fitted) -> dict:
    """Agreement of held-out predictions with the human and the CNN label. FITTED: whether each
    image's human class was among the classes its fold's model was fitted on. Shares of an empty
    group are NaN."""
    human, cnn, predicted = (np.asarray(a, dtype=str) for a in (human, cnn, predicted))
    fitted = np.asarray(fitted, dtype=bool)
    same, to_human, to_cnn = cnn == human, predicted == human, predicted == cnn
    disputed = ~same

    def share(hit: np.ndarray, among: np.ndarray) -> float:
        return float(hit[among].mean()) if among.any() else math.nan

    everyone = np.ones(len(human), dtype=bool)
    return {
        "n": int(len(human)), "not_fitted": int((~fitted).sum()),
        "cnn_equals_human": share(same, everyone),
        "agrees_human": share(to_human, everyone), "agrees_cnn": share(to_cnn, everyone),
        "undisputed": {"n": int(same.sum()), "not_fitted": int((~fitted & same).sum()),
                       "agrees": share(to_human, same)},
        "disputed": {"n": int(disputed.sum()), "not_fitted": int((~fitted & disputed).sum()),
                     "human": share(to_human, disputed), "cnn": share(to_cnn, disputed),
                     "neither": share(~to_human & ~to_cnn, disputed)},
    }


def folds_of(keys: list[str], human: list[str], folds: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of each of FOLDS folds, stratified by the human label where a class has
    enough images (a rarer class lands in fewer folds)."""
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        return [test for _, test in split.split(np.zeros(len(keys)), human)]


def cross_fit(store: Path, keys: list[str], human: list[str], held: list[np.ndarray], out: Path, labels_dir: Path,
              folds: int, seed: int, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, fitted) of every image in KEYS, each by the model fitted without its fold. RANKS:
    of each classify run (0: no mpiexec)."""
    predicted = np.full(len(keys), "", dtype=object)
    fitted = np.zeros(len(keys), dtype=bool)
    for k, test in enumerate(held):
        train = np.setdiff1d(np.arange(len(keys)), test)
        csv_path = labels_dir / f"fold-{k}.csv"
        if not csv_path.is_file():  # the same folds for every backbone
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            with open(csv_path, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["key", LABEL])
                w.writerows((keys[i], human[i]) for i in train)
        fold_out = out / f"fold-{k}"
        icehpc("classify", str(store), "--labels", str(csv_path), "--label-column", LABEL, "--folds", str(folds),
               "--seed", str(seed), "--out", str(fold_out), ranks=ranks)
        with open(fold_out / PREDICTIONS, newline="") as fh:
            got = {r["key"]: r[f"predicted_{LABEL}"] for r in csv.DictReader(fh)}
        classes = set(json.loads((fold_out / CONTRACT.marker).read_text())["classes"])
        for i in test:
            predicted[i] = got[keys[i]]
            fitted[i] = human[i] in classes
    return predicted.astype(str), fitted


def _cell(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.3f}"


def _json(obj):
    if isinstance(obj, dict):
        return {k: _json(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and math.isnan(obj) else obj


COLUMNS = ["backbone", "probe", "n", "not_fitted", "cnn_equals_human", "agrees_human", "agrees_cnn",
           "undisputed_n", "undisputed_agrees", "disputed_n", "disputed_not_fitted", "disputed_human",
           "disputed_cnn", "disputed_neither"]


def flat(backbone: str, probe: str, t: dict) -> dict:
    u, d = t["undisputed"], t["disputed"]
    return {"backbone": backbone, "probe": probe, "n": t["n"], "not_fitted": t["not_fitted"],
            "cnn_equals_human": t["cnn_equals_human"], "agrees_human": t["agrees_human"],
            "agrees_cnn": t["agrees_cnn"], "undisputed_n": u["n"], "undisputed_agrees": u["agrees"],
            "disputed_n": d["n"], "disputed_not_fitted": d["not_fitted"], "disputed_human": d["human"],
            "disputed_cnn": d["cnn"], "disputed_neither": d["neither"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbone", help="exported backbone (.safetensors)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--zip", type=Path, default=ZIP)
    ap.add_argument("--folds", type=int, default=5, help="cross-fitting folds, and classify's own CV folds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=1, help="MPI ranks of every icehpc run (1: no mpiexec)")
    args = ap.parse_args()
    if not args.zip.is_file():
        sys.exit(f"classify_inspections: {args.zip} not found (pass --zip)")
    if args.folds < 2:
        sys.exit(f"classify_inspections: --folds must be >= 2, got {args.folds}")
    t0 = time.perf_counter()
    o = args.out
    o.mkdir(parents=True, exist_ok=True)
    ranks = args.ranks if args.ranks > 1 else 0
    pairs = embed_both(args.zip, o, args.backbone, ranks=ranks)
    t_embed = time.perf_counter() - t0
    probes = sorted({cnn.split(":", 1)[0] for cnn, _ in pairs.values()})
    rows, result = [], {"images": len(pairs), "folds": args.folds, "seed": args.seed, "tables": {}}
    for name in BACKBONES:
        everything: dict[str, list] = {"human": [], "cnn": [], "predicted": [], "fitted": []}
        result["tables"][name] = {}
        for probe in probes:
            keys = sorted(k for k, (cnn, _) in pairs.items() if cnn.startswith(f"{probe}:"))
            human, cnn = [pairs[k][1] for k in keys], [pairs[k][0] for k in keys]
            held = folds_of(keys, human, args.folds, args.seed)
            predicted, fitted = cross_fit(o / f"{name}.h5", keys, human, held, o / name / probe, o / "labels" / probe,
                                          args.folds, args.seed, ranks)
            result["tables"][name][probe] = tabulate(human, cnn, predicted, fitted)
            for part, values in zip(everything, (human, cnn, predicted, fitted)):
                everything[part].extend(values)
        result["tables"][name]["all"] = tabulate(**everything)
        rows += [flat(name, p, t) for p, t in result["tables"][name].items()]
    result["wall_s"] = {"total": time.perf_counter() - t0, "extract_shard_embed": t_embed}

    print(f"{len(pairs)} images, {args.folds}-fold cross-fitting on the human labels (seed {args.seed}); "
          "shares of held-out predictions")
    print(f"{'backbone':8s} {'probe':5s} {'n':>4s} {'unfit':>5s} {'CNN=hum':>7s} | {'=human':>6s} {'=CNN':>6s} | "
          f"{'undisputed: n':>13s} {'right':>6s} | {'disputed: n':>11s} {'human':>6s} {'CNN':>6s} {'neither':>7s}")
    for r in rows:
        print(f"{r['backbone']:8s} {r['probe']:5s} {r['n']:4d} {r['not_fitted']:5d} {_cell(r['cnn_equals_human']):>7s} | "
              f"{_cell(r['agrees_human']):>6s} {_cell(r['agrees_cnn']):>6s} | {r['undisputed_n']:13d} "
              f"{_cell(r['undisputed_agrees']):>6s} | {r['disputed_n']:11d} {_cell(r['disputed_human']):>6s} "
              f"{_cell(r['disputed_cnn']):>6s} {_cell(r['disputed_neither']):>7s}")
    print(f"wall {result['wall_s']['total']:.0f} s (extract + shard + embed {t_embed:.0f} s)")
    (o / "inspections.json").write_text(json.dumps(_json(result), indent=1) + "\n")
    with open(o / "inspections.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)


if __name__ == "__main__":
    main()
