"""Offline report of a κ run: ``icehpc report KAPPA_DIR --out REPORT_DIR [--random KDIR] [--store S] …``.

One self-contained ``index.html`` (figures and thumbnails embedded as base64, inline CSS, no script,
no network) that opens from a laptop or a cluster's file browser, plus every figure as PNG, SVG and
PDF, the CSVs, and the κ tables as a CF netCDF file (``kappa.nc``, for xarray). Sections, each
drawn only when its input is given and holds data (one function each in :mod:`.sections`):

- **backbone summary** at the top (:mod:`.backbone`): architecture (patch, embed dim), steps trained,
  the data it was pretrained on and the recipe (iBOT-vMF, K prototypes, KoLeo weight, batch, seed),
  from the export header (``--backbone``), the pretraining run (``--pretrain``) and the store's record
  (``--store``; "random-init" when the store was embedded without weights); beside it, how well the
  embeddings tell the classes apart: every probe's balanced accuracy, trained against random init;
- **warnings**: near-collapsed embeddings (mean cosine to other classes' centroids
  > 0.9), groups below ``min_count``, mixed probes or polarities in one store, groupings left out
  for lack of data, pretraining metrics that flag collapse, a trained backbone whose probe is below
  random init or within one sd of it ("not distinguishable from random init");
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
  matrices, and the **label-efficiency** curves where the probe ran with ``--label-fractions``
  (:mod:`.label_efficiency`); **probes on real archives** (``--real-probe NAME=DIR``, repeatable: the
  pipeline passes each 2D-S/PIP archive it probed), a table each; **pretraining curves** (``--pretrain``,
  from metrics.jsonl);
- **provenance** (backbone file and sha256, pretraining config, shard fingerprint, commands) and
  **downloads**.

Inputs are joined by content (:func:`.build.check_joins`): the κ run must have read ``--store``,
``--shards`` must hold the store's samples with the same source images, ``--probe`` must have scored
that store, ``--backbone`` must be the backbone that embedded ``--store`` and every ``--real-probe``'s
store (each probe sealed and of its store as it is now); otherwise one line, exit 2. The report is written as a set (:mod:`.build`).

Modules: :mod:`.common` (shared helpers, :class:`~.common.Section`), :mod:`.backbone`, :mod:`.kappa_figures`,
:mod:`.store_figures`, :mod:`.pretraining`, :mod:`.netcdf`, :mod:`.sections`, :mod:`.label_efficiency`, :mod:`.build`
(assembler, :data:`CONTRACT`, :func:`status`) and this CLI.
"""
from __future__ import annotations

import argparse
import sys

from .build import CONTRACT, build_report, parse_real_probes, status
from .common import ReportError

__all__ = ["CONTRACT", "ReportError", "add_arguments", "build_report", "run", "status"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kappa_dir", help="output folder of `icehpc kappa`")
    parser.add_argument("--out", required=True, help="report folder (index.html, PNG/SVG/PDF, CSVs, kappa.nc)")
    parser.add_argument("--random", metavar="KAPPA_DIR", help="κ folder of the random-init control (drawn beside)")
    parser.add_argument("--planted", metavar="JSON", help="synth's planted.json: planted habit entropy overlaid")
    parser.add_argument("--store", help="embedding store of KAPPA_DIR: embedding map and example images")
    parser.add_argument("--shards", help="shard folder of the store's samples: example thumbnails")
    parser.add_argument("--probe", metavar="DIR", help="`icehpc probe` output folder: probe results")
    parser.add_argument("--pretrain", metavar="DIR", help="pretraining run folder: curves from metrics.jsonl")
    parser.add_argument("--backbone", help="exported backbone file: summary at the top, sha256 in the provenance")
    parser.add_argument("--real-probe", metavar="NAME=DIR", action="append",
                        help="`icehpc probe` folder of a real archive embedded by the same backbone (NAME: how the "
                             "report names it, e.g. 2D-S): a results table per archive; repeatable")


def run(args: argparse.Namespace) -> int:
    try:
        index = build_report(args.kappa_dir, args.out, random=args.random, planted=args.planted, store=args.store,
                             shards=args.shards, probe=args.probe, pretrain=args.pretrain, backbone=args.backbone,
                             real_probes=parse_real_probes(args.real_probe))
    except ReportError as exc:
        print(f"icehpc report: error: {exc}", file=sys.stderr)
        return 2
    print(f"icehpc report: {index}")
    return 0
