"""Habit probes: are the embeddings meaningful? kNN and logistic regression against baselines.

The protocol follows the paper: a weighted cosine kNN (k = 20, T = 0.07, votes weighted by
exp(cos/T), as in DINO) and a logistic regression on standardised features, on one stratified
train/test split per seed, ``--splits`` of them (default 5: seeds 0-4), reported as mean ± sd.
Every representation is scored on the *same* splits (rows are matched by the sample key), so the
numbers are directly comparable:

- the store under test (usually the pretrained backbone),
- optionally a store from a random-init backbone (``--random-store``): what the architecture alone
  gives,
- optionally the paper's geometric baseline (``--images SHARDS``): six contour features of the
  binarised particle (aspect ratio, area ratio, circularity, solidity, complexity, equivalent
  diameter) with logistic regression, and the same without its size feature (``geometric_shape``:
  what an embedding of a size-normalised, bbox-framed crop can know).

Label efficiency (``--label-fractions 0.01,0.05,0.1,0.25,1``): on each split the probes are fitted
again on a stratified fraction of the training rows (:func:`label_subset`: at least one per class,
nested across fractions, the test rows unchanged) and scored on the full test set; fraction 1 *is*
the probe above. The curves (mean ± sd over the splits per fraction) go to probe.json
(``label_efficiency``), :data:`LABEL_EFFICIENCY_CSV` and :data:`LABEL_EFFICIENCY_FIGURE`
(accuracy versus number of training labels).

Output in DIR: ``probe.json`` (all metrics, class names, split, inputs), ``summary.csv`` (one row
per representation × method), one confusion-matrix PNG per representation × method and, with
``--label-fractions``, the label-efficiency CSV and figure; ``probe.json`` is written last and seals
the others (:data:`CONTRACT`, with the sha256 of each input
store and shard index: :func:`status` answers "up to date?" without writing).

Joins are checked by content (:mod:`icehpc.analysis.joins`): ``--random-store`` must hold the same
keys with the same source images (``source_sha256``) as the store, and ``--images`` shards the same
source image under every key; a mismatch is one line, exit 2. Rows with a NaN/inf embedding (in
either store) are skipped and counted (``rows_nonfinite`` in probe.json), as κ does.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import config as cfglib
from ..config import UserError
from ..config import field
from ..contract import Contract, Status
from ..fileio import csv_text, file_sha256, lock_dir, write_atomic
from .joins import SOURCE, source_mismatch

#: The label-efficiency table and figure (``--label-fractions``); the report shows and copies them.
LABEL_EFFICIENCY_CSV = "label_efficiency.csv"
LABEL_EFFICIENCY_FIGURE = "label_efficiency.png"
#: probe.json (written last) seals summary.csv, the confusion and label-efficiency figures.
CONTRACT = Contract("probe.json", ("summary.csv", LABEL_EFFICIENCY_CSV, LABEL_EFFICIENCY_FIGURE, "confusion_*.png",
                                   "confusion_*.svg", "confusion_*.pdf"))
#: The columns of LABEL_EFFICIENCY_CSV, also the keys of each row of probe.json's ``label_efficiency``.
LABEL_EFFICIENCY_COLUMNS = ("representation", "method", "fraction", "n_train_labels", "accuracy", "accuracy_sd",
                            "balanced_accuracy", "balanced_accuracy_sd", "splits")
METHOD_NAMES = {"knn": "weighted kNN", "logreg": "logistic regression"}

GEOMETRIC_FEATURES = ("aspect_ratio", "area_ratio", "circularity", "solidity", "complexity",
                      "log10_equivalent_diameter_um")


# --------------------------------------------------------------------------- geometric baseline
def particle_mask(image: np.ndarray, min_contrast: float = 16.0) -> np.ndarray:
    """bool [h, w]: the particle's pixels, holes filled, specks removed, cropped to its bounding
    box plus a one-pixel background margin (shape features do not depend on position).

    Works for either polarity (the real OAP archives are white-on-black, the shards and synthetic
    CPI images dark-on-light): the background level is the median of the border pixels and a pixel
    belongs to the particle when it differs from it by more than half the largest difference (the
    half-maximum contour, robust to blur and noise). Components under 1 % of the largest one are
    dropped as noise; an image without contrast gives an empty mask.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    contrast = np.abs(img - np.median(border))
    peak = float(contrast.max())
    if peak < min_contrast:
        return np.zeros((0, 0), dtype=bool)
    mask = contrast > 0.5 * peak
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    mask = np.pad(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)  # crop: 5× faster below
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= 0.01 * sizes.max()) + 1
        mask = np.isin(labels, keep)
    return ndimage.binary_fill_holes(mask)


def contour_features(image: np.ndarray, pixel_um: float = 1.0) -> np.ndarray:
    """float64 [6] in :data:`GEOMETRIC_FEATURES` order (NaN for an empty image).

    aspect ratio = minor/major axis of the second moments; area ratio = area / area of the circle
    whose diameter is the maximum (Feret) dimension; circularity = 4πA/P²; solidity = A / convex
    hull area; complexity = P / convex hull perimeter (1 for convex shapes, larger for branched
    ones); equivalent diameter = 2√(A/π) in µm (log10). The perimeter P is the Crofton estimate
    from boundary crossings in four directions, unbiased for every orientation within a few %
    (plain edge counts overestimate diagonal edges by up to √2).
    """
    from scipy.spatial import ConvexHull, QhullError

    mask = particle_mask(image)
    area = float(mask.sum())
    if area == 0:
        return np.full(len(GEOMETRIC_FEATURES), np.nan)
    # Crofton perimeter: boundary crossings along lines in 4 directions (spacing 1, 1, 1/√2, 1/√2).
    padded = np.pad(mask, 1)  # a particle cut off at the image border still gets a closed contour
    axial = (np.count_nonzero(padded[1:, :] != padded[:-1, :])
             + np.count_nonzero(padded[:, 1:] != padded[:, :-1]))
    diagonal = (np.count_nonzero(padded[1:, 1:] != padded[:-1, :-1])
                + np.count_nonzero(padded[1:, :-1] != padded[:-1, 1:]))
    perimeter = np.pi / 8.0 * (axial + diagonal / np.sqrt(2.0))

    ys, xs = np.nonzero(mask)
    # Second moments; +1/12 is a pixel's own variance, so a one-pixel-wide line has finite axes.
    cov = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True) if area > 1 else np.zeros((2, 2))
    evals = np.linalg.eigvalsh(cov + np.eye(2) / 12.0)
    aspect_ratio = float(np.sqrt(evals[0] / evals[1]))

    # Hull over the corners of the boundary pixels: the exact hull of the pixelated particle.
    eroded = np.zeros_like(mask)
    eroded[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                          & mask[1:-1, :-2] & mask[1:-1, 2:])
    by, bx = np.nonzero(mask & ~eroded)
    corners = np.concatenate([np.stack([bx + dx, by + dy], axis=1)
                              for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)  # duplicates: harmless
    try:
        hull = ConvexHull(corners)
        hull_area, hull_perimeter = float(hull.volume), float(hull.area)
        vertices = corners[hull.vertices]
    except QhullError:  # cannot happen for ≥ 1 pixel (4 corners), kept for degenerate inputs
        hull_area, hull_perimeter, vertices = area, perimeter, corners
    diffs = vertices[:, None, :] - vertices[None, :, :]
    max_dimension = float(np.sqrt((diffs ** 2).sum(-1).max()))

    equivalent_diameter_um = 2.0 * np.sqrt(area / np.pi) * pixel_um
    return np.array([
        aspect_ratio,
        area / (np.pi * max_dimension ** 2 / 4.0),
        4.0 * np.pi * area / perimeter ** 2,
        area / hull_area,
        perimeter / hull_perimeter,
        np.log10(equivalent_diameter_um),
    ])


def iter_shard_images(shard_path: str) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, uint8 [H, W] at the stored resolution, metadata) for every sample of one shard tar.

    Reads the tar members directly rather than through the canvas loader, because the geometric
    features need the stored pixel scale, which the canvas resize would change.
    """
    from PIL import Image

    from ..data.format import iter_samples

    for key, sample in iter_samples(shard_path):
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L"))
        yield key, image, json.loads(sample["json"])


def _shard_geometric_features(shard_path: str) -> tuple[list[str], list[np.ndarray], list[str]]:
    keys, rows, sources = [], [], []
    for key, image, meta in iter_shard_images(shard_path):
        try:
            pixel_um = float(meta.get("pixel_um"))
        except (TypeError, ValueError):
            pixel_um = float("nan")
        keys.append(key)
        rows.append(contour_features(image, pixel_um if np.isfinite(pixel_um) and pixel_um > 0 else 1.0))
        sources.append(str(meta.get(SOURCE) or ""))
    return keys, rows, sources


def geometric_features_from_shards(shard_dir: str | Path, workers: int = 1, with_sources: bool = False):
    """(keys [N] str, features float64 [N, 6]) of every sample in a shard folder, shards in parallel;
    with ``with_sources`` also each sample's ``source_sha256`` (for the join check).

    Particles without a known ``pixel_um`` get their equivalent diameter in pixels.
    """
    from concurrent.futures import ProcessPoolExecutor

    from ..data.format import shard_paths

    paths = shard_paths(str(shard_dir))
    if workers > 1 and len(paths) > 1:
        with ProcessPoolExecutor(min(workers, len(paths))) as pool:
            results = list(pool.map(_shard_geometric_features, paths))
    else:
        results = [_shard_geometric_features(p) for p in paths]
    keys = np.asarray([k for ks, _, _ in results for k in ks], dtype=str)
    rows = np.asarray([r for _, rs, _ in results for r in rs], dtype=np.float64).reshape(-1, len(GEOMETRIC_FEATURES))
    if with_sources:
        return keys, rows, [s for _, _, ss in results for s in ss]
    return keys, rows


# --------------------------------------------------------------------------- probes
def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 2048) -> np.ndarray:
    """Weighted cosine kNN (DINO protocol): int [n_test] predicted class indices.

    train_x [n_train, D], test_x [n_test, D] any float; rows are L2-normalised here. The k nearest
    training rows by cosine vote for their class with weight exp(cos / temperature).
    """
    def normalise(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    train, test = normalise(train_x), normalise(test_x)
    k = min(k, len(train))
    out = np.empty(len(test), dtype=np.int64)
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sim, idx, axis=1)
        weights = np.exp((top - 1.0) / temperature)  # shifted by the max cosine: no overflow
        votes = np.zeros((len(sim), n_classes), dtype=np.float64)
        np.add.at(votes, (np.arange(len(sim))[:, None], train_y[idx]), weights)
        out[start:start + chunk] = votes.argmax(axis=1)
    return out


def logreg_model(seed: int, c: float = 1.0, max_iter: int = 2000) -> Any:
    """The project's linear probe (also ``icehpc classify``'s model): logistic regression on
    standardised features, missing values → training median (scikit-learn pipeline, unfitted)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                         LogisticRegression(C=c, max_iter=max_iter, random_state=seed))


def logreg_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int,
                   c: float = 1.0, max_iter: int = 2000) -> np.ndarray:
    """Fit :func:`logreg_model` on the training rows, predict the test rows."""
    from threadpoolctl import threadpool_limits

    model = logreg_model(seed, c, max_iter)
    # One BLAS thread: these matrices are small, and spinning BLAS threads slow a busy node badly.
    with threadpool_limits(limits=1):
        model.fit(np.asarray(train_x, dtype=np.float64), train_y)
        return model.predict(np.asarray(test_x, dtype=np.float64))


def score(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """accuracy, balanced accuracy, per-class recall and the confusion matrix (rows = true)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, recall_score

    labels = np.arange(len(classes))
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), stratified by label, fixed seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def label_subset(labels: np.ndarray, train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices: a stratified ``fraction`` of the training rows ``train`` (sorted indices into
    ``labels``): of each class's n training rows, round(fraction·n) and at least one.

    The rows are the first of one permutation per class seeded by ``seed`` alone, so the subsets of
    one split are nested (a smaller fraction's rows lie in every larger one's) and fraction 1 gives
    ``train`` itself."""
    rng = np.random.default_rng(seed)
    train = np.asarray(train)
    picked = []
    for c in np.unique(labels[train]):
        rows = train[labels[train] == c]
        order = rng.permutation(len(rows))  # drawn for every fraction alike: the nesting
        picked.append(rows[order[:min(len(rows), max(1, int(np.floor(fraction * len(rows) + 0.5))))]])
    return np.sort(np.concatenate(picked)) if picked else train[:0]


def check_label_fractions(fractions: list[float]) -> None:
    """ValueError naming ``--label-fractions`` unless every fraction is in (0, 1], sorted and unique."""
    if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
        raise ValueError(f"--label-fractions {','.join(f'{f:g}' for f in fractions)}: need increasing, distinct "
                         "fractions of the training labels in (0, 1], e.g. 0.01,0.05,0.1,0.25,1")


# --------------------------------------------------------------------------- inputs
def as_text(values: Any) -> np.ndarray:
    """A str array of metadata values: bytes decoded as UTF-8, None as ""."""
    values = np.asarray(values, dtype=object if isinstance(values, list) else None)
    if values.dtype.kind in "SO":
        return np.array([v.decode() if isinstance(v, bytes) else "" if v is None else str(v) for v in values],
                        dtype=str)
    return values.astype(str)


def read_store(path: str | Path, label: str, with_sources: bool = False):
    """(keys [N] str, labels [N] str, embeddings float32 [N, D]) of an embedding store; with
    ``with_sources`` also ({key: source_sha256}, the store file's sha256)."""
    from .store import open_store

    store = open_store(str(path))
    for column in ("key", label):
        if column not in store.columns:
            hint = "choose the class column with --label" if column == label else "was it written by `icehpc embed`?"
            raise UserError(f"store {path} has no meta column '{column}' (columns: {sorted(store.columns)}); {hint}")
    embeddings, meta = store.read(0, store.n_rows)
    keys = as_text(meta["key"])
    out = keys, as_text(meta[label]), np.asarray(embeddings, dtype=np.float32)
    if not with_sources:
        return out
    src = as_text(meta[SOURCE]) if SOURCE in meta else np.full(len(keys), "")
    return (*out, dict(zip(keys.tolist(), src.tolist())), store.sha256)


def _align(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``values`` reordered to the order of ``wanted`` keys; error if any is missing."""
    position = {k: i for i, k in enumerate(keys)}
    missing = [k for k in wanted if k not in position]
    if missing:
        raise UserError(f"{what}: {len(missing)} of {len(wanted)} keys of the store are missing "
                        f"(first: {missing[:3]}); it must hold the same samples")
    return values[np.fromiter((position[k] for k in wanted), dtype=np.int64, count=len(wanted))]


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1) if x.size else np.ones(len(x), dtype=bool)


# --------------------------------------------------------------------------- output
def plot_confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path,
                   formats: tuple[str, ...] = ("png",)) -> None:
    """Row-normalised confusion matrix (rows: true class), annotated with recall and counts (up to
    25 classes). The one drawing of it: the report calls this too. ``path`` (.png) and each other
    format of ``formats`` beside it, each written atomically."""
    from ..plotting import pyplot

    plt = pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    for i in range(len(classes) if len(classes) <= 25 else 0):
        for j in range(len(classes)):
            if counts[i, j]:
                ax.text(j, i, f"{fractions[i, j]:.2f}\n{int(counts[i, j])}", ha="center", va="center",
                        fontsize=7, color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class (recall on the diagonal)")
    _save(plt, fig, path, formats)


def _save(plt, fig, path: Path, formats: tuple[str, ...]) -> None:
    """``fig`` as ``path`` (.png) and each other format of ``formats`` beside it, each atomically."""
    fig.tight_layout()
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, dpi=110, format=fmt)
        os.replace(tmp, target)
    plt.close(fig)


def plot_label_efficiency(rows: list[dict], n_classes: int, path: Path, formats: tuple[str, ...] = ("png",)) -> None:
    """Accuracy (top) and balanced accuracy (bottom) versus the number of training labels (log
    axis), one panel per method and one line per representation with its ±sd band over the splits;
    dotted: chance (1 / classes). ``rows``: probe.json's ``label_efficiency`` rows. The one drawing
    of it: the report calls this too."""
    from ..plotting import log_axis, pyplot

    plt = pyplot()
    methods = [m for m in METHOD_NAMES if any(r["method"] == m for r in rows)]
    reps = list(dict.fromkeys(r["representation"] for r in rows))
    colours = {rep: f"C{i}" for i, rep in enumerate(reps)}
    fig, axes = plt.subplots(2, len(methods), figsize=(5.2 * len(methods), 7.0), squeeze=False, sharey="row")
    for col, method in enumerate(methods):
        for row, (key, what) in enumerate((("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"))):
            ax = axes[row, col]
            for rep in reps:
                pts = sorted((r for r in rows if r["representation"] == rep and r["method"] == method),
                             key=lambda r: r["fraction"])
                if not pts:
                    continue
                n = np.array([p["n_train_labels"] for p in pts], dtype=float)
                mean = np.array([p[key] for p in pts], dtype=float)
                sd = np.array([p[f"{key}_sd"] for p in pts], dtype=float)
                ax.plot(n, mean, "o-", color=colours[rep], label=rep, ms=4)
                ax.fill_between(n, mean - sd, mean + sd, color=colours[rep], alpha=0.2, lw=0)
            if n_classes > 1:
                ax.axhline(1.0 / n_classes, color="grey", ls=":", lw=1, label="_chance")
            log_axis(ax, "x")
            ax.set_title(f"{METHOD_NAMES[method]}: {what}", fontsize=9)
            ax.set_xlabel("training labels (stratified subset of each split's training rows)", fontsize=8)
            if col == 0:
                ax.set_ylabel(what)
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    if n_classes > 1:
        legend["chance (1 / classes)"] = axes[0, 0].lines[-1]
    axes[0, -1].legend(legend.values(), legend.keys(), fontsize=8)  # every representation, the panels may differ
    _save(plt, fig, path, formats)



@dataclass
class ProbeSettings:
    k: int = field(20, help="kNN neighbours")
    temperature: float = field(0.07, help="kNN vote temperature")
    test_fraction: float = field(0.2, help="stratified test share")
    seed: int = field(0, help="split and solver seed", ge=0)
    logreg_c: float = field(1.0, help="inverse L2 strength of the logistic regression")
    min_class_count: int = field(5, help="classes with fewer samples are left out and listed", ge=0)
    splits: int = field(5, help="stratified splits, seeds seed … seed+splits−1, the same for every representation; "
                               "metrics are their mean ± sd")
    label_fractions: list[float] = field([], help="label-efficiency curve: on each split, the probes fitted again on "
                                                  "these stratified fractions of the training labels (increasing, in "
                                                  "(0, 1]; [] = none)")

    def validate(self) -> None:
        if self.k < 1 or self.temperature <= 0 or not 0 < self.test_fraction < 1 or self.logreg_c <= 0 \
                or self.splits < 1:
            raise ValueError("need k >= 1, temperature > 0, 0 < test_fraction < 1, logreg_c > 0 and splits >= 1")
        check_label_fractions(self.label_fractions)


def _inputs_sha256(store: str | Path, random_store: str | Path | None, images: str | Path | None) -> dict[str, str]:
    """The content of each input, as :func:`status` compares it: the store files' sha256 (a master
    records its parts' checksums) and the shard folder's ``index.json`` sha256."""
    from .store import open_store

    out = {}
    for name, path in (("store", store), ("random_store", random_store)):
        if path is not None:
            with open_store(str(path), verify=False) as st:
                out[name] = st.sha256
    if images is not None:
        out["images_index"] = _images_index_sha256(images)
    return out


def _images_index_sha256(images: str | Path) -> str:
    from ..data.format import INDEX

    index = Path(images) / INDEX
    return file_sha256(index) if index.is_file() else ""


def _fingerprint(label: str, name: str, settings: "ProbeSettings", inputs_sha256: dict[str, str]) -> str:
    blob = json.dumps({"label": label, "name": name, "settings": cfglib.to_dict(settings),
                       "inputs": inputs_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_probes(store: str | Path, out_dir: str | Path, *, label: str = "habit", name: str = "pretrained",
               random_store: str | Path | None = None, images: str | Path | None = None,
               settings: ProbeSettings = ProbeSettings(), workers: int = 1,
               provenance: dict | None = None) -> dict:
    """Score every representation on one stratified split and write probe.json, summary.csv, PNGs.

    Rows whose label is empty and classes with fewer than ``settings.min_class_count`` samples are
    left out (listed in the JSON) because a stratified split cannot place them in both halves; rows
    with a non-finite embedding in any store are skipped and counted. Inputs that are not of the
    same samples (by key and source image) are refused with a :class:`UserError`. With
    ``settings.label_fractions`` also the label-efficiency curves (:func:`label_subset` per split).
    """
    out = Path(out_dir)
    keys, labels, features, sources, store_sha = read_store(store, label, with_sources=True)
    if len(set(keys)) != len(keys):
        raise UserError(f"store {store}: duplicate keys; cannot match rows across representations")
    inputs_sha256 = {"store": store_sha}
    r_features = None
    nonfinite = {name: int((~_finite_rows(features)).sum())}
    keep = _finite_rows(features)
    if random_store is not None:
        r_keys, _, r_all, r_sources, inputs_sha256["random_store"] = read_store(random_store, label, with_sources=True)
        what = f"--random-store {random_store}"
        why = source_mismatch(what, sources, r_sources)
        extra_keys = set(r_sources) - set(sources)
        if why is None and extra_keys:
            why = (f"{what} holds {len(extra_keys)} samples the store {store} does not (first: "
                   f"{sorted(extra_keys)[:3]}): it must hold the same samples")
        if why:
            raise UserError(why)
        r_features = _align(r_keys, r_all, keys, f"random store {random_store}")
        nonfinite["random_init"] = int((~_finite_rows(r_features)).sum())
        keep &= _finite_rows(r_features)
    geometric_all = None
    if images is not None:
        g_keys, g_features, g_sources = geometric_features_from_shards(images, workers, with_sources=True)
        why = source_mismatch(f"--images {images}", sources, dict(zip(g_keys.tolist(), g_sources)))
        if why:
            raise UserError(why)
        geometric_all = _align(g_keys, g_features, keys, f"shards {images}")
        inputs_sha256["images_index"] = _images_index_sha256(images)
    keys, labels, features = keys[keep], labels[keep], features[keep]
    names, counts = np.unique(labels, return_counts=True)
    too_small = {str(n): int(c) for n, c in zip(names, counts) if c < settings.min_class_count or n == ""}
    keep2 = ~np.isin(labels, list(too_small))
    keys, labels, features = keys[keep2], labels[keep2], features[keep2]
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise UserError(f"store {store}: need at least 2 classes in '{label}' with >= {settings.min_class_count} "
                        f"samples and finite embeddings, found {classes or 'none'} (left out: {too_small}); "
                        "lower --min-class-count or choose another --label")
    y = np.searchsorted(np.asarray(classes), labels)
    seeds = [settings.seed + i for i in range(max(1, settings.splits))]
    splits = [stratified_split(y, settings.test_fraction, s) for s in seeds]  # the same for every representation
    train, test = splits[0]

    representations: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {name: (features, ("knn", "logreg"))}
    inputs = {name: str(store)}
    if r_features is not None:
        representations["random_init"] = (r_features[keep][keep2], ("knn", "logreg"))
        inputs["random_init"] = str(random_store)
    extra: dict = {}
    if geometric_all is not None:
        geometric = geometric_all[keep][keep2]
        representations["geometric"] = (geometric, ("logreg",))
        # without the size feature (equivalent diameter): what framed, size-normalised crops can know
        representations["geometric_shape"] = (geometric[:, :-1], ("logreg",))
        inputs["geometric"] = inputs["geometric_shape"] = str(images)
        extra["geometric_empty_images"] = int(np.isnan(geometric).all(axis=1).sum())
        extra["geometric_features"] = list(GEOMETRIC_FEATURES)

    out.mkdir(parents=True, exist_ok=True)
    with lock_dir(out, "probe output folder"):
        CONTRACT.remove(out)  # the marker first: a crash below leaves no seal over a partial set
        results: dict[str, dict] = {}
        rows = []
        written = []
        curves: list[dict] = []
        fractions = sorted({*settings.label_fractions, 1.0})  # 1: the probe itself, fitted once
        for rep, (x, methods) in representations.items():
            results[rep] = {"dim": int(x.shape[1])}
            for method in methods:
                by_fraction: dict[float, dict] = {}
                for fraction in fractions:
                    per_split, n_labels = [], []
                    for seed, (tr, te) in zip(seeds, splits):
                        sub = tr if fraction == 1.0 else label_subset(y, tr, fraction, seed)
                        if method == "knn":
                            pred = knn_predict(x[sub], y[sub], x[te], len(classes), settings.k, settings.temperature)
                        else:
                            pred = logreg_predict(x[sub], y[sub], x[te], seed, settings.logreg_c)
                        per_split.append(score(y[te], pred, classes))
                        n_labels.append(len(sub))
                    by_fraction[fraction] = _over_splits(per_split)
                    if fraction in settings.label_fractions:
                        m = by_fraction[fraction]
                        curves.append({"representation": rep, "method": method, "fraction": fraction,
                                       "n_train_labels": int(round(float(np.mean(n_labels)))),
                                       **{k: m[k] for k in LABEL_EFFICIENCY_COLUMNS[4:-1]}, "splits": len(seeds),
                                       "accuracy_per_split": m["accuracy_per_split"],
                                       "balanced_accuracy_per_split": m["balanced_accuracy_per_split"]})
                metrics = results[rep][method] = by_fraction[1.0]
                fig = out / f"confusion_{rep}_{method}.png"
                plot_confusion(np.asarray(metrics["confusion_matrix"]), classes,
                               f"{rep} / {method}: acc {metrics['accuracy']:.3f}, "
                               f"bal. acc {metrics['balanced_accuracy']:.3f}", fig)
                written.append(fig.name)
                rows.append((rep, method, metrics["accuracy"], metrics["balanced_accuracy"]))

        report = {
            "label": label, "classes": classes, "inputs": inputs, "inputs_sha256": inputs_sha256,
            "fingerprint": _fingerprint(label, name, settings, inputs_sha256),
            "rows_nonfinite": nonfinite,
            "split": {"seed": settings.seed, "seeds": seeds, "test_fraction": settings.test_fraction,
                      "n_train": int(len(train)),
                      "n_test": int(len(test)), "left_out_classes": too_small},
            "settings": {"knn_k": settings.k, "knn_temperature": settings.temperature,
                         "logreg_c": settings.logreg_c},
            "results": results, **extra, "config": provenance,
        }
        write_atomic(out / "summary.csv", csv_text(
            ["representation", "method", "accuracy", "accuracy_sd", "balanced_accuracy", "balanced_accuracy_sd",
             "splits"],
            [(r, m, f"{a:.4f}", f"{results[r][m]['accuracy_sd']:.4f}", f"{b:.4f}",
              f"{results[r][m]['balanced_accuracy_sd']:.4f}", len(seeds)) for r, m, a, b in rows]))
        written.append("summary.csv")
        if curves:
            report["label_efficiency"] = {"fractions": list(settings.label_fractions), "rows": curves}
            write_atomic(out / LABEL_EFFICIENCY_CSV, csv_text(list(LABEL_EFFICIENCY_COLUMNS), [
                [c[k] if isinstance(c[k], (str, int)) else f"{c[k]:.4g}" if k == "fraction" else f"{c[k]:.4f}"
                 for k in LABEL_EFFICIENCY_COLUMNS] for c in curves]))
            plot_label_efficiency(curves, len(classes), out / LABEL_EFFICIENCY_FIGURE)
            written += [LABEL_EFFICIENCY_CSV, LABEL_EFFICIENCY_FIGURE]
        report = CONTRACT.seal(out, report, written)  # last: marks completion, lists every file
    return report


def _over_splits(per_split: list[dict]) -> dict:
    """The metrics of several splits as one: accuracy and balanced accuracy as mean, sd (ddof 1; 0
    for one split) and per split; per-class recall and confusion matrix of the first split."""
    metrics = dict(per_split[0])
    for key in ("accuracy", "balanced_accuracy"):
        values = np.array([m[key] for m in per_split])
        metrics[key] = float(values.mean())
        metrics[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        metrics[f"{key}_per_split"] = values.tolist()
    return metrics


def status(args: argparse.Namespace) -> Status:
    """Whether ``icehpc probe`` with ``args`` would find its output complete and current (read-only):
    the marker verifies (every file as sealed) and its fingerprint, over the settings and the sha256
    of each input, equals that of the given inputs."""
    out = Path(args.out)
    record = CONTRACT.verify(out)
    if record is None:
        return Status(False, f"{out / CONTRACT.marker} missing, incomplete or changed")
    try:
        settings = settings_from_args(args)
        want = _fingerprint(args.label, args.name, settings,
                            _inputs_sha256(args.store, args.random_store, args.images))
    except (UserError, OSError, ValueError) as exc:
        return Status(False, f"inputs unreadable ({exc})")
    if record.get("fingerprint") != want:
        return Status(False, f"inputs or settings changed since {out / CONTRACT.marker} was written")
    return Status(True, f"up to date (fingerprint {want})")


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="HDF5 embedding store (master or single file) to probe")
    parser.add_argument("--label", default="habit", help="meta column with the class label (default habit)")
    parser.add_argument("--out", required=True, help="output folder (probe.json, summary.csv, PNGs)")
    parser.add_argument("--name", default="pretrained", help="name of STORE's representation in the output")
    parser.add_argument("--random-store", help="store of the same samples from a random-init backbone")
    parser.add_argument("--images", help="shard folder of the same samples: adds the geometric baseline")
    parser.add_argument("--workers", type=cfglib.at_least(1), default=len(os.sched_getaffinity(0)),
                        help="processes for the geometric features (default: CPUs available)")
    parser.add_argument("--label-fractions", metavar="F1,F2,...",
                        help="label-efficiency curve over these fractions of the training labels, e.g. "
                             "0.01,0.05,0.1,0.25,1 (= config key label_fractions)")
    cfglib.add_config_arguments(parser, ProbeSettings, {
        "--k": "k", "--temperature": "temperature", "--test-fraction": "test_fraction", "--seed": "seed",
        "--splits": "splits", "--logreg-c": "logreg_c", "--min-class-count": "min_class_count"})


def settings_from_args(args: argparse.Namespace) -> ProbeSettings:
    """Config file, dotted overrides, then the flags (``--label-fractions`` included; flags win)."""
    ov = list(args.overrides)
    if args.label_fractions is not None:
        try:
            ov.append("label_fractions=" + json.dumps([float(f) for f in args.label_fractions.split(",")]))
        except ValueError:
            raise cfglib.ConfigError(f"--label-fractions {args.label_fractions!r}: expected numbers like "
                                     "0.01,0.05,0.1,0.25,1") from None
    return cfglib.from_args(ProbeSettings, argparse.Namespace(**{**vars(args), "overrides": ov}))


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    report = run_probes(args.store, args.out, label=args.label, name=args.name,
                        random_store=args.random_store, images=args.images, settings=settings,
                        workers=args.workers, provenance=cfglib.provenance(args, settings))
    print(f"probe on '{report['label']}': {len(report['classes'])} classes, "
          f"{report['split']['n_train']} train / {report['split']['n_test']} test")
    skipped = {k: v for k, v in report["rows_nonfinite"].items() if v}
    if skipped:
        print(f"  skipped rows with a NaN/inf embedding: "
              f"{', '.join(f'{v:,} in {k}' for k, v in skipped.items())}")
    for rep, res in report["results"].items():
        for method in ("knn", "logreg"):
            if method in res:
                m = res[method]
                print(f"  {rep:<16} {method:<7} accuracy {m['accuracy']:.4f} ± {m['accuracy_sd']:.4f}  "
                      f"balanced {m['balanced_accuracy']:.4f} ± {m['balanced_accuracy_sd']:.4f}")
    if "label_efficiency" in report:
        print(f"label efficiency over {len(settings.label_fractions)} fractions of the training labels: "
              f"{Path(args.out) / LABEL_EFFICIENCY_CSV}, {Path(args.out) / LABEL_EFFICIENCY_FIGURE}")
    print(f"results: {Path(args.out) / 'probe.json'}")
    return 0
