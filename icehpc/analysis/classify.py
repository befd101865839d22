"""Label every row of an embedding store from a few labeled ones: ``icehpc classify``.

``icehpc classify STORE --labels LABELS --out DIR [--label-column habit] [--folds 5] [--seed 0]``,
any number of MPI ranks or none. LABELS gives a class to some of the store's keys:

- a CSV with a ``key`` column and a label column (the ``--label-column`` name, else ``label``);
- an embedding store with ``key`` and the label column in its metadata (the store itself, or
  another store of the same samples);
- a shard folder (``icehpc shards build``): the label column of every sample's JSON.

Empty labels mean "unlabeled". Every label key must be a row of STORE: otherwise one line with the
counts and a few of the keys, exit 2. When both LABELS and STORE know each sample's source image
(``source_sha256``), a key naming another image is refused too (:mod:`.joins`).

The model is the probe's (:func:`.probe.logreg_model`): logistic regression on standardised
features (scikit-learn pipeline). Its inverse regularisation C is chosen
from ``c_grid`` by stratified ``folds``-fold cross-validation on the labeled rows only (shuffled
with ``seed``; highest mean balanced accuracy, ties to the smaller C), then the model is refitted on
every labeled row. Classes with fewer labeled rows than ``folds`` cannot be cross-validated: they
are left out of the fit and listed.

MPI: every rank owns whole global blocks of :data:`BLOCK` rows. Pass 1: each rank reads the keys of
its rows and the embeddings of its labeled rows; rank 0 gathers them (store order), checks the keys,
fits and broadcasts the fitted model. Pass 2: each rank predicts its blocks; rank 0 gathers and
writes. Blocks are global, so the output does not depend on the rank count.

Output in DIR: ``predictions.csv`` (store order: ``key``, ``predicted_<label>``, ``probability``
of that class, ``entropy_bits`` of the predicted distribution (base-2 logarithm: 0 = certain,
log2(classes) = uniform), ``labeled`` (1/0), ``given_<label>`` (the label LABELS gives, empty for
unlabeled rows), then ``p_<class>`` per class, summing to 1; rows with a non-finite embedding
have empty predictions). It has a ``key`` column, so ``icehpc kappa STORE --columns
DIR/predictions.csv --by predicted_habit`` groups by the prediction. ``classify.json``, written last,
seals it (:data:`CONTRACT`): rows, labeled rows, classes and label counts, the chosen C, the
cross-validated accuracy and balanced accuracy (mean ± sd over the folds, and per C), the inputs'
sha256 and the fingerprint a rerun compares (config, store content, labels content).
"""
from __future__ import annotations

import argparse
import csv
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfglib
from .. import dist
from ..config import field
from ..contract import Contract, Status
from ..dist import mpi_comm, run_on_root
from ..fileio import csv_text, file_sha256, run_facts, write_atomic
from . import storestage
from .joins import SOURCE, source_mismatch
from .probe import as_text, logreg_model
from .store import Store, StoreError, open_store

#: Rows per ownership / prediction block: ranks own whole blocks and every block is predicted as one
#: matrix, so the numbers do not depend on the rank count. Part of the result's definition.
BLOCK = 4096
#: Bits: the entropy column's unit (its name says it too).
ENTROPY_COLUMN = "entropy_bits"


class ClassifyError(cfglib.UserError):
    """Bad input or configuration for classify; the message says what and how to fix it."""


@dataclass
class ClassifyConfig:
    label_column: str = field("habit", help="the class column: of a labeled store or shard set, or of the CSV "
                                            "(else its 'label' column)")
    c_grid: list[float] = field([0.001, 0.01, 0.1, 1.0, 10.0], help="candidate inverse L2 strengths C of the "
                                "logistic regression, ascending; cross-validation picks one", ge=0)
    folds: int = field(5, help="stratified cross-validation folds on the labeled rows", ge=2)
    seed: int = field(0, help="seed of the fold shuffle and of the solver", ge=0)
    max_iter: int = field(2000, help="solver iterations per fit", ge=1)

    def validate(self) -> None:
        if not self.c_grid or any(c <= 0 for c in self.c_grid) or self.c_grid != sorted(set(self.c_grid)):
            raise ValueError(f"c_grid must be distinct positive numbers in ascending order, got {self.c_grid}")
        if not self.label_column.strip():
            raise ValueError("label_column is empty")


# ------------------------------------------------------------------------------------------- labels
@dataclass
class Labels:
    """key → label (non-empty) of one LABELS input, with each key's source sha256 where it gives one."""

    kind: str  # csv | store | shards
    keys: np.ndarray  # str
    labels: np.ndarray  # str
    sources: dict[str, str]


def labels_kind(path: str | os.PathLike) -> str:
    """What LABELS is: ``shards`` (a folder with the shard index), ``store`` (an HDF5 file or a
    folder with the store's master), else ``csv``."""
    import h5py

    from ..data.format import INDEX
    from .store import MASTER_NAME

    p = Path(path)
    if p.is_dir():
        if (p / INDEX).is_file():
            return "shards"
        if (p / MASTER_NAME).is_file():
            return "store"
        raise ClassifyError(f"--labels {path} is a folder without a shard index ({INDEX}) or a store ({MASTER_NAME})")
    if not p.is_file():
        raise ClassifyError(f"--labels {path} does not exist (a CSV of key,label; a labeled store; or a shard folder)")
    return "store" if h5py.is_hdf5(p) else "csv"


def labels_fact(path: str | os.PathLike) -> dict[str, str]:
    """The content of LABELS as a rerun compares it: the CSV's sha256, the store file's (a master
    records its parts' checksums) or the shard index's (it records every shard's)."""
    from ..data.format import INDEX

    kind = labels_kind(path)
    if kind == "csv":
        sha = file_sha256(path)
    elif kind == "shards":
        sha = file_sha256(Path(path) / INDEX)
    else:
        with open_store(path, verify=False) as st:
            sha = st.sha256
    return {"kind": kind, "sha256": sha}


def read_labels(path: str | os.PathLike, column: str, store: Store | None = None) -> Labels:
    """The labeled keys of LABELS (rows with an empty label are unlabeled and left out); a key given
    twice is a :class:`ClassifyError`. ``store``: the store being classified, already verified, read
    in place when LABELS names it too (its parts are not hashed again)."""
    import contextlib
    import json

    from .store import MASTER_NAME

    kind = labels_kind(path)
    sources: dict[str, str] = {}
    if kind == "csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = reader.fieldnames or []
                name = column if column in header else "label"
                if "key" not in header or name not in header:
                    raise ClassifyError(f"--labels {path}: a CSV needs a 'key' column and a '{column}' or 'label' "
                                        f"column (it has {header})")
                rows = [(r["key"] or "", r[name] or "") for r in reader]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ClassifyError(f"--labels {path} is not a readable CSV ({exc})") from None
        keys, labels = as_text([k for k, _ in rows]), as_text([v for _, v in rows])
    elif kind == "store":
        master = Path(path) / MASTER_NAME if Path(path).is_dir() else Path(path)
        same = store is not None and master.resolve() == Path(store.path).resolve()
        with contextlib.nullcontext(store) if same else open_store(path) as st:
            missing = [c for c in ("key", column) if c not in st.columns]
            if missing:
                raise ClassifyError(f"--labels {path}: the store has no meta column {missing} (columns: {st.columns}); "
                                    "choose the class column with --label-column")
            _, meta = st.read(0, st.n_rows, ["key", column] + ([SOURCE] if SOURCE in st.columns else []),
                              embeddings=False)
        keys, labels = as_text(meta["key"]), as_text(meta[column])
        if SOURCE in meta:
            sources = dict(zip(keys.tolist(), as_text(meta[SOURCE]).tolist()))
    else:
        from ..data.format import iter_samples, shard_paths

        ks, ls = [], []
        for shard in shard_paths(path):
            for key, sample in iter_samples(shard, ("json",)):
                meta = json.loads(sample["json"])
                ks.append(key)
                ls.append(meta.get(column))
                sources[key] = str(meta.get(SOURCE) or "")
        keys, labels = as_text(ks), as_text(ls)
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise ClassifyError(f"--labels {path}: {len(dup)} key(s) are given more than once (e.g. "
                            f"{', '.join(dup[:3].tolist())}); give each key one label")
    keep = np.char.str_len(np.char.strip(labels)) > 0
    if not keep.any():
        raise ClassifyError(f"--labels {path}: no key has a non-empty '{column}' label")
    return Labels(kind, keys[keep], labels[keep], sources)


# ------------------------------------------------------------------------------------------ the fit
def fit(x: np.ndarray, y: np.ndarray, cfg: ClassifyConfig) -> dict[str, Any]:
    """Choose C by stratified cross-validation on (x, y), refit on all of it. Returns the fitted
    pipeline (``model``), the chosen C and the per-fold scores."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from threadpoolctl import threadpool_limits

    pipe = logreg_model(cfg.seed, max_iter=cfg.max_iter)
    search = GridSearchCV(pipe, {"logisticregression__C": list(cfg.c_grid)},
                          scoring={"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy"},
                          refit="balanced_accuracy", cv=StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed),
                          n_jobs=1, error_score="raise")
    with threadpool_limits(limits=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search.fit(np.asarray(x, dtype=np.float64), y)
    res = search.cv_results_
    best = int(search.best_index_)
    cv: dict[str, Any] = {"folds": cfg.folds, "seed": cfg.seed}
    for metric in ("accuracy", "balanced_accuracy"):
        per_fold = [float(res[f"split{i}_test_{metric}"][best]) for i in range(cfg.folds)]
        cv[metric] = float(np.mean(per_fold))
        cv[f"{metric}_sd"] = float(np.std(per_fold, ddof=1))
        cv[f"{metric}_per_fold"] = per_fold
    cv["by_c"] = [{"c": float(c), "accuracy": float(a), "balanced_accuracy": float(b)}
                  for c, a, b in zip(cfg.c_grid, res["mean_test_accuracy"], res["mean_test_balanced_accuracy"])]
    not_converged = sum(1 for w in caught if "converge" in str(w.message).lower())
    return {"model": search.best_estimator_, "c": float(cfg.c_grid[best]), "cv": cv,
            "convergence_warnings": not_converged}


def predict(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, K] float64, valid [n]) of one block; rows with a non-finite value get NaN."""
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    valid = np.isfinite(x).all(axis=1)
    proba = np.full((len(x), len(model.classes_)), np.nan)
    if valid.any():
        with threadpool_limits(limits=1):
            proba[valid] = model.predict_proba(x[valid])
    return proba, valid


def entropy_bits(proba: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of probabilities; NaN rows stay NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(proba > 0, -proba * np.log2(np.where(proba > 0, proba, 1.0)), 0.0)
    out = terms.sum(axis=1)
    out[np.isnan(proba).any(axis=1)] = np.nan
    return np.maximum(out, 0.0)


# --------------------------------------------------------------------------------------- compute
def _blocks(lo: int, hi: int):
    for start in range(lo, hi, BLOCK):
        yield start, min(start + BLOCK, hi)


def _check_keys(labels: Labels, found: np.ndarray, store: Store) -> None:
    """Every label key must be a store row (rank 0, after the gather)."""
    missing = np.flatnonzero(~found)
    if missing.size:
        eg = ", ".join(labels.keys[missing[:3]].tolist())
        raise ClassifyError(f"{missing.size:,} of {len(labels.keys):,} label keys are not in the store {store.path}, "
                            f"e.g. {eg}; give labels of this store's samples (its meta/key column)")


def compute(store: Store, cfg: ClassifyConfig, comm: Any, labels_path: str) -> dict[str, Any] | None:
    """The collective run: rank 0 gets the result dict, other ranks None. Errors are raised
    identically on every rank."""
    rank, size = comm.Get_rank(), comm.Get_size()
    t0 = time.perf_counter()
    if "key" not in store.columns:
        raise ClassifyError(f"store {store.path} has no meta column 'key' (columns: {store.columns}): labels are "
                            "matched by key; was it written by `icehpc embed`?")
    labels = run_on_root(comm, lambda: read_labels(labels_path, cfg.label_column, store))
    position = {k: i for i, k in enumerate(labels.keys.tolist())}
    lo, hi = dist.block_range(store.n_rows, rank, size, BLOCK)

    # pass 1: keys of my rows, embeddings (and sources) of my labeled rows
    err: BaseException | None = None
    mine: dict[str, Any] = {}
    try:
        cols = ["key"] + ([SOURCE] if SOURCE in store.columns else [])
        _, meta = store.read(lo, hi, cols, embeddings=False)
        keys = as_text(meta["key"])
        idx = np.fromiter((position.get(k, -1) for k in keys.tolist()), dtype=np.int64, count=len(keys))
        rows = np.flatnonzero(idx >= 0)
        xs = []
        for start, stop in _blocks(lo, hi):
            sel = rows[(rows >= start - lo) & (rows < stop - lo)]
            if sel.size:
                x, _ = store.read(start, stop, [])
                xs.append(x[sel - (start - lo)])
        mine = {"rows": rows + lo, "label_index": idx[rows],
                "x": np.concatenate(xs) if xs else np.zeros((0, store.dim), np.float32),
                "sources": as_text(meta[SOURCE])[rows] if SOURCE in meta else None}
    except (StoreError, OSError, ValueError) as exc:
        err = exc
    dist.agree_on_errors(comm, err, ClassifyError)
    gathered = comm.gather(mine, root=0)
    t_read = time.perf_counter() - t0

    def fit_on_root() -> dict[str, Any]:
        label_index = np.concatenate([g["label_index"] for g in gathered])
        x = np.concatenate([g["x"] for g in gathered])
        found = np.zeros(len(labels.keys), dtype=bool)
        found[label_index] = True
        _check_keys(labels, found, store)
        if labels.sources and all(g["sources"] is not None for g in gathered):
            theirs = np.concatenate([g["sources"] for g in gathered])
            why = source_mismatch(f"--labels {labels_path}", {k: labels.sources.get(k, "") for k in
                                                               labels.keys[label_index].tolist()},
                                  dict(zip(labels.keys[label_index].tolist(), theirs.tolist())))
            if why:
                raise ClassifyError(why)
        y_text = labels.labels[label_index]
        finite = np.isfinite(x).all(axis=1)
        names, counts = np.unique(y_text[finite], return_counts=True)
        left_out = {str(n): int(c) for n, c in zip(names, counts) if c < cfg.folds}
        use = finite & ~np.isin(y_text, list(left_out))
        classes = sorted(set(y_text[use].tolist()))
        if len(classes) < 2:
            raise ClassifyError(f"--labels {labels_path}: need at least 2 classes with >= {cfg.folds} labeled rows "
                                f"(--folds) and finite embeddings, found {classes or 'none'} (too few: {left_out}); "
                                "give more labels or lower --folds")
        fitted = fit(x[use], y_text[use], cfg)
        fitted.update(classes=classes, left_out=left_out, n_labeled=int(len(label_index)), n_fit=int(use.sum()),
                      labeled_nonfinite=int((~finite).sum()),
                      label_counts={c: int(n) for c, n in zip(*np.unique(y_text[use], return_counts=True))})
        return fitted

    fitted = run_on_root(comm, fit_on_root)
    gathered = None  # the labeled rows: no longer needed on rank 0
    t_fit = time.perf_counter() - t0 - t_read

    # pass 2: predict my blocks
    err = None
    got: dict[str, Any] = {}
    from ..progress import Progress

    bar = Progress(hi - lo, "classify" if size == 1 else f"classify rank 0/{size}", "rows", enabled=rank == 0)
    try:
        probas, valids = [], []
        for start, stop in _blocks(lo, hi):
            x, _ = store.read(start, stop, [])
            p, v = predict(fitted["model"], x)
            probas.append(p)
            valids.append(v)
            bar.update(stop - start)
        k = len(fitted["classes"])
        got = {"keys": keys, "proba": np.concatenate(probas) if probas else np.zeros((0, k)),
               "valid": np.concatenate(valids) if valids else np.zeros(0, bool)}
    except (StoreError, OSError, ValueError) as exc:
        err = exc
    bar.close()
    dist.agree_on_errors(comm, err, ClassifyError)
    parts = comm.gather(got, root=0)
    if rank != 0:
        return None
    keys = np.concatenate([g["keys"] for g in parts])
    proba = np.concatenate([g["proba"] for g in parts])
    valid = np.concatenate([g["valid"] for g in parts])
    given = np.array([labels.labels[position[k]] if k in position else "" for k in keys.tolist()], dtype=str)
    classes = np.asarray(fitted["model"].classes_).astype(str)
    predicted = np.where(valid, classes[np.argmax(np.where(valid[:, None], proba, 0.0), axis=1)], "")
    run = {
        "store": str(store.path), "store_sha256": store.sha256, "n_rows": int(store.n_rows), "dim": int(store.dim),
        "ranks": size, "labels": {"path": labels_path, "kind": labels.kind, "column": cfg.label_column},
        "n_labels": int(len(labels.keys)), "n_labeled": fitted["n_labeled"], "n_fit": fitted["n_fit"],
        "labeled_nonfinite": fitted["labeled_nonfinite"], "rows_nonfinite": int((~valid).sum()),
        "classes": classes.tolist(), "label_counts": fitted["label_counts"], "left_out_classes": fitted["left_out"],
        "predicted_counts": {c: int(n) for c, n in zip(*np.unique(predicted[valid], return_counts=True))},
        "c_grid": list(cfg.c_grid), "chosen_c": fitted["c"], "cv": fitted["cv"],
        "convergence_warnings": fitted["convergence_warnings"], "entropy": ENTROPY_COLUMN,
        "timings": {"read_labeled_s": t_read, "fit_s": t_fit, "total_s": time.perf_counter() - t0},
    }
    return {"keys": keys, "proba": proba, "valid": valid, "given": given, "predicted": predicted, "run": run}


# ---------------------------------------------------------------------------------------- output
#: classify.json, sealed last over predictions.csv: the classify run's output contract.
CONTRACT = Contract("classify.json", ("predictions.csv",))
STAGE = storestage.StoreStage("classify", CONTRACT)
PREDICTIONS = "predictions.csv"


def _num(v: float) -> str:
    return repr(float(v)) if np.isfinite(v) else ""


def write_predictions(out: Path, res: dict[str, Any], label: str) -> Path:
    classes = res["run"]["classes"]
    header = ["key", f"predicted_{label}", "probability", ENTROPY_COLUMN, "labeled", f"given_{label}",
              *[f"p_{c}" for c in classes]]
    proba, valid = res["proba"], res["valid"]
    top = np.where(valid, np.nanmax(np.where(valid[:, None], proba, 0.0), axis=1), np.nan)
    ent = entropy_bits(proba)
    labeled = np.char.str_len(res["given"]) > 0

    def rows():
        for i, key in enumerate(res["keys"].tolist()):
            yield [key, res["predicted"][i], _num(top[i]), _num(ent[i]), int(labeled[i]), res["given"][i],
                   *[_num(p) for p in proba[i]]]

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PREDICTIONS, csv_text(header, rows()))
    return out / PREDICTIONS


def fingerprint_extra(labels_path: str | os.PathLike) -> dict[str, Any]:
    """What shapes the result beyond the config and the store: the labels' content, and the block."""
    return {"labels": labels_fact(labels_path), "block": BLOCK}


def run_classify(store_path: str | os.PathLike, labels_path: str | os.PathLike, out_dir: str | os.PathLike,
                 cfg: ClassifyConfig, *, force: bool = False, comm: Any = None,
                 provenance: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Library entry: None when ``out_dir`` is up to date (its marker verifies this fingerprint),
    else fit, predict, and (rank 0) write predictions.csv and seal classify.json; returns the
    record on rank 0."""
    labels_path = str(labels_path)
    extra = fingerprint_extra(labels_path)

    def write(out: Path, res: dict[str, Any], fp: str, started: float, store: Store):
        res["run"].update(fingerprint=fp, inputs_sha256={"store": store.sha256, "labels": extra["labels"]["sha256"]},
                          store_parts_sha256=list(store.part_sha256), config=cfglib.to_dict(cfg),
                          config_source=provenance, **run_facts(started))
        path = write_predictions(out, res, cfg.label_column)
        return res["run"], [path], res["run"]

    return storestage.run(STAGE, store_path, out_dir, cfg, extra=extra,
                          compute=lambda store, c, cm: compute(store, c, cm, labels_path), write=write,
                          force=force, comm=comm)


def status(args: argparse.Namespace) -> Status:
    """Would ``icehpc classify ARGS`` skip? (read-only)."""
    if getattr(args, "force", False):
        return Status(False, "--force")
    try:
        extra = fingerprint_extra(args.labels)
    except (cfglib.UserError, OSError) as exc:
        return Status(False, f"--labels cannot be read yet ({exc})")
    st = storestage.status(STAGE, args.store, args.out, cfglib.from_args(ClassifyConfig, args), extra)
    old = ((CONTRACT.read(args.out) or {}).get("inputs_sha256") or {}).get("labels")
    if not st.done and old and old != extra["labels"]["sha256"]:
        return Status(False, f"--labels {args.labels} changed since {CONTRACT.marker_path(args.out)} was written")
    return st


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="embedding store to label: master .h5, a hand-written .h5, or a folder with "
                                      "store.h5")
    parser.add_argument("--labels", required=True,
                        help="the known labels: a CSV (key + the label column, or 'label'), a labeled store, or a "
                             "shard folder; every key must be a row of STORE")
    parser.add_argument("--out", required=True, help=f"output folder ({PREDICTIONS}, {CONTRACT.marker})")
    parser.add_argument("--force", action="store_true", help="recompute even if --out is up to date")
    cfglib.add_config_arguments(parser, ClassifyConfig, {"--label-column": "label_column", "--folds": "folds",
                                                         "--seed": "seed", "--max-iter": "max_iter"})


def run(args: argparse.Namespace) -> int:
    cfg = cfglib.from_args(ClassifyConfig, args)
    comm = mpi_comm()
    res = run_classify(args.store, args.labels, args.out, cfg, force=args.force, comm=comm,
                       provenance=cfglib.provenance(args, cfg))
    if res is not None:
        cv = res["cv"]
        print(f"icehpc classify: {res['n_rows']:,} rows on {res['ranks']} rank(s); fitted on {res['n_fit']:,} "
              f"labeled rows, {len(res['classes'])} classes, C = {res['chosen_c']:g}; {cv['folds']}-fold CV accuracy "
              f"{cv['accuracy']:.4f} ± {cv['accuracy_sd']:.4f}, balanced {cv['balanced_accuracy']:.4f} ± "
              f"{cv['balanced_accuracy_sd']:.4f} → {Path(args.out) / PREDICTIONS}")
        if res["left_out_classes"]:
            print(f"  left out (fewer labeled rows than --folds): {res['left_out_classes']}")
        if res["convergence_warnings"]:
            print(f"  {res['convergence_warnings']} fit(s) stopped at max_iter={cfg.max_iter} before converging; "
                  "raise --max-iter if the chosen C is among them")
    return 0
