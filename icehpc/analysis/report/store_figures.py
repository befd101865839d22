"""Store-based figures: the embedding map (PCA, t-SNE) and example images nearest to / farthest
from each group's mean direction (thumbnails read from the shards)."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from .common import _axis, _group_name, _save

def _read_sample(store_path: Path, columns: list[str], limit: int, seed: int = 0):
    """A seeded sample of at most ``limit`` rows: (unit embeddings [n, D], meta dict, all-row count)."""
    from ..store import open_store

    with open_store(store_path) as s:
        have = [c for c in columns if c in s.columns]
        emb, meta = s.read(0, s.n_rows, columns=have)
        n = s.n_rows
    emb = np.asarray(emb, dtype=np.float64)
    norm = np.linalg.norm(emb, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    idx = np.flatnonzero(ok)
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    x = emb[idx] / norm[idx, None]
    return x, {c: np.asarray(v)[idx] for c, v in meta.items()}, n


def _known_str(v: np.ndarray) -> bool:
    vals = {str(a) for a in v}
    return bool(vals - {"", "None", "nan"})


def _known_num(v: np.ndarray) -> bool:
    try:
        return bool(np.isfinite(np.asarray(v, dtype=float)).any())
    except (TypeError, ValueError):
        return False


def fig_embedding_map(plt, x: np.ndarray, meta: dict[str, np.ndarray], label: str, path: Path,
                      seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """PCA and t-SNE (scikit-learn) of unit embeddings, one column per colouring with known values.

    Returns the colourings drawn and the two 2-D projections."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(x)
    pca = PCA(n_components=2, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    colourings = [c for c in (label, "temperature_c", "campaign") if c in meta and (
        _known_num(meta[c]) if c == "temperature_c" else _known_str(meta[c]) and len(set(map(str, meta[c]))) > 1)]
    cols = max(len(colourings), 1)
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 8.4), squeeze=False)
    for j, c in enumerate(colourings or [None]):
        for i, (proj, name) in enumerate(((pca, "PCA"), (tsne, "t-SNE"))):
            ax = axes[i, j]
            ax.grid(False)
            ax.set_xticks([])
            ax.set_yticks([])
            if c is None:
                ax.scatter(proj[:, 0], proj[:, 1], s=5, color="C0")
            elif c == "temperature_c":
                t = np.asarray(meta[c], dtype=float)
                known = np.isfinite(t)
                ax.scatter(proj[~known, 0], proj[~known, 1], s=4, color="0.85")
                sc = ax.scatter(proj[known, 0], proj[known, 1], s=5, c=t[known], cmap="coolwarm")
                fig.colorbar(sc, ax=ax, shrink=0.7, label=_axis(c))
            else:
                v = np.array([_group_name(a) for a in meta[c]])
                levels = sorted(set(v))
                cmap = plt.get_cmap("tab20" if len(levels) > 10 else "tab10")
                for k, lev in enumerate(levels):
                    sel = v == lev
                    ax.scatter(proj[sel, 0], proj[sel, 1], s=5, color=cmap(k % cmap.N), label=lev)
                if i == 0:
                    ax.legend(fontsize=6, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                              ncol=1 + len(levels) // 12, frameon=False)  # beside the points, not over them
            ax.set_title(f"{name}" + (f", by {_axis(c)}" if c else ""), fontsize=9)
    _save(plt, fig, path)
    return colourings, pca, tsne


def _thumb(png: bytes, size: int = 72) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("L")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def example_groups(x: np.ndarray, meta: dict[str, np.ndarray], label: str, temperature_edges: list[float] | None,
                   k: int) -> list[dict]:
    """Per class and per temperature bin: keys nearest to and farthest from the group's mean direction."""
    groups: list[tuple[str, np.ndarray]] = []
    if label in meta and _known_str(meta[label]):
        v = np.array([_group_name(a) for a in meta[label]])
        groups += [(f"{label} = {lev}", v == lev) for lev in sorted(set(v))]
    if temperature_edges and "temperature_c" in meta and _known_num(meta["temperature_c"]):
        t = np.asarray(meta["temperature_c"], dtype=float)
        e = temperature_edges
        for lo, hi in zip(e[:-1], e[1:]):
            groups.append((f"temperature in [{lo:g}, {hi:g}) °C", (t >= lo) & (t < hi)))
    out = []
    for name, sel in groups:
        idx = np.flatnonzero(sel)
        if len(idx) < 2:
            continue
        mean = x[idx].sum(axis=0)
        mean /= np.linalg.norm(mean) or 1.0
        cos = x[idx] @ mean
        order = np.argsort(-cos)
        take = min(k, len(idx) // 2)
        out.append({"group": name, "n": int(len(idx)),
                    "nearest": [(str(meta["key"][idx[i]]), float(cos[i])) for i in order[:take]],
                    "farthest": [(str(meta["key"][idx[i]]), float(cos[i])) for i in order[::-1][:take]]})
    return out


def read_images(shard_dir: Path, keys: set[str], shard_of: dict[str, str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """(PNG bytes, source_sha256) of ``keys``, reading only the shards that hold them."""
    import json

    from ...data.format import iter_samples

    out: dict[str, bytes] = {}
    sources: dict[str, str] = {}
    for shard in sorted({shard_of[k] for k in keys if k in shard_of}):
        path = shard_dir / shard
        if not path.exists():
            continue
        for key, sample in iter_samples(path, ("png", "json")):
            if key in keys:
                out[key] = sample["png"]
                try:
                    sources[key] = str(json.loads(sample["json"]).get("source_sha256") or "")
                except (ValueError, AttributeError):
                    sources[key] = ""
    return out, sources
