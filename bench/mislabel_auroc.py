"""Does `icehpc outliers` find real mislabels? AUROC on the random-inspection set.

``random_inspections.zip`` (Jaffeux et al. 2022) holds 900 2D-S and PIP images in folders named
``CNN:<label> Hum:<label>``: the CNN classifier's label and a human's. Where they differ, the CNN
label is wrong. This bench shards the 900 images with the CNN label as ``habit`` (prefixed by the
probe: the two probes' classes differ), embeds them with BACKBONE and with a random-init backbone of
its shape, scores every CNN label with `icehpc outliers --label habit`, and reports the AUROC of
the ``mislabel`` score for CNN ≠ human. The geometric features of the probes' baseline (z-scored)
go through the same outlier stage as a third representation. The kNN runs within the 900 images,
whose CNN labels are themselves often wrong. Everything runs through the real CLI.

    python bench/mislabel_auroc.py BACKBONE --out DIR [--zip PATH] [--k 20]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
from outliers_planted import icehpc  # the same CLI runner (bench/ is on sys.path)
from sklearn.metrics import roc_auc_score

from icehpc.analysis.store import open_store

ZIP = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "oap-jaffeux2022" / "random_inspections.zip"
FOLDER = re.compile(r"Details classif (2DS|PIP)/CNN:(.+?) Hum:(.+?)/([^/]+)$")
PROBES = {"2DS": ("2D-S", 10.0), "PIP": ("PIP", 100.0)}


def extract(zip_path: Path, out: Path) -> dict[str, tuple[str, str]]:
    """Images under OUT/images, OUT/manifest.csv (CNN label as habit); path → (CNN, human) label."""
    labels, rows = {}, []
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(z.namelist()):
            m = FOLDER.search(name)
            if not m or name.endswith("/"):
                continue
            probe, cnn, human, _ = m.groups()
            rel = f"images/{probe}/{len(rows):04d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(z.read(name))
            labels[rel] = (f"{probe}:{cnn.strip()}", f"{probe}:{human.strip()}")
            rows.append({"path": rel, "habit": labels[rel][0], "probe": PROBES[probe][0],
                         "pixel_um": PROBES[probe][1]})
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return labels


def embed_both(zip_path: Path, out: Path, backbone: str | Path, ranks: int) -> dict[str, tuple[str, str]]:
    """Extract ZIP_PATH into OUT, shard it (OUT/shards) and embed it with BACKBONE (OUT/trained.h5)
    and with a random-init backbone of its shape (OUT/random.h5); store key → (CNN, human) label.
    The two stores share keys and metadata. RANKS: of the embeds (0: no mpiexec)."""
    labels = extract(zip_path, out)
    icehpc("shards", "build", "--manifest", str(out / "manifest.csv"), "--out", str(out / "shards"), "--no-progress")
    icehpc("embed", str(out / "shards"), "--checkpoint", str(backbone), "--out", str(out / "trained.h5"), ranks=ranks)
    icehpc("embed", str(out / "shards"), "--random-init", "--like", str(backbone), "--out", str(out / "random.h5"),
           ranks=ranks)
    with open_store(out / "trained.h5") as s:
        _, meta = s.read(0, s.n_rows, ["key", "source_path"])
    # source_path ends with the manifest path: images/<probe>/<n>.png
    return {str(k): labels["/".join(Path(str(src)).parts[-3:])] for k, src in zip(meta["key"], meta["source_path"])}


def geometric_store(shards: Path, like: Path, path: Path) -> None:
    """A store of the z-scored geometric features, rows and metadata as in the embedded store LIKE."""
    from icehpc.analysis.probe import geometric_features_from_shards
    from icehpc.analysis.store import write_master, write_part

    keys, feats = geometric_features_from_shards(shards, workers=2)
    with open_store(like) as s:
        _, meta = s.read(0, s.n_rows, ["key", "habit", "source_path"])
    order = {k: i for i, k in enumerate(keys.tolist())}
    x = feats[[order[k] for k in meta["key"].tolist()]]
    x = (x - np.nanmean(x, axis=0)) / np.maximum(np.nanstd(x, axis=0), 1e-12)
    write_part(path.parent / f"{path.stem}-part.h5", np.nan_to_num(x).astype(np.float32),
               {c: [str(v) for v in meta[c]] for c in ("key", "habit", "source_path")})
    write_master(path, [path.parent / f"{path.stem}-part.h5"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbone", help="exported backbone (.safetensors)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--zip", type=Path, default=ZIP)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    if not args.zip.is_file():
        sys.exit(f"mislabel_auroc: {args.zip} not found (pass --zip)")
    o = args.out
    o.mkdir(parents=True, exist_ok=True)
    pairs = embed_both(args.zip, o, args.backbone, ranks=2)
    geometric_store(o / "shards", o / "trained.h5", o / "geometric.h5")
    wrong = sum(c != h for c, h in pairs.values())
    cnn_wrong = {k: cnn != human for k, (cnn, human) in pairs.items()}
    result = {"images": len(pairs), "cnn_wrong": wrong, "k": args.k, "auroc": {}}
    for name in ("trained", "random", "geometric"):
        icehpc("outliers", str(o / f"{name}.h5"), "--out", str(o / f"outliers-{name}"), "--label", "habit",
               "--k", str(args.k), ranks=2)
        with open(o / f"outliers-{name}" / "outliers.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        y = [cnn_wrong[r["key"]] for r in rows]
        result["auroc"][name] = float(roc_auc_score(y, [float(r["mislabel"]) for r in rows]))
        print(f"{name:9s}: mislabel AUROC {result['auroc'][name]:.3f} for CNN != human "
              f"({wrong} of {len(pairs)}, k = {args.k})", flush=True)
    (o / "auroc.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
