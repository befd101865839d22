"""The report's sections. Each reads its own inputs, writes its figures and CSVs into the (temporary)
report folder and returns a :class:`~.common.Section`: html, downloads and warnings. The assembler
(:mod:`.build`) only places them on the page."""
from __future__ import annotations

import html
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ...data.format import INDEX
from ...ssl.config import METRICS, RUN_CONFIG
from ...fileio import csv_text, file_sha256, write_atomic
from ..joins import SOURCE, source_mismatch
from .common import (COLLAPSE_COS, FORMATS, ReportError, Section, _axis, _b64, _finite, _group_name, _table,
                     describe_group, figure_html)
from ..science import planted_entropy
from .kappa_figures import fig_binned, fig_categorical, fig_similarity, off_diagonal_mean

STORE_META = ["temperature_c", "campaign", "key", "shard", "probe", "polarity", SOURCE]


# ------------------------------------------------------------------------------------------ κ
def kappa_warnings(res: dict) -> Section:
    """Warnings that need only kappa.json: small groups, dropped groupings, near-collapse."""
    rows, run, sim = res["rows"], res["run"], res.get("similarity")
    min_count = run["config"]["min_count"]
    out = Section()
    small = [r for r in rows if r["n"] and r["n"] < min_count]
    if small:
        named = "; ".join(f"{describe_group(r)}: {r['n']:,} samples" for r in small[:3])
        out.warnings.append(f"{len(small)} group(s) have fewer than min_count = {min_count} valid rows and are not "
                            f"estimated (e.g. {named}); see the flagged table.")
    dropped = run.get("groupings_dropped") or {}
    if dropped:
        out.warnings.append(f"groupings left out for lack of data: {', '.join(dropped)} "
                            f"({'; '.join(sorted(set(dropped.values())))}).")
    if sim is not None and len(sim.get("labels", [])) > 1:
        offdiag = off_diagonal_mean(np.asarray(sim["matrix"], dtype=float))
        if offdiag > COLLAPSE_COS:
            out.warnings.append(f"near-collapsed embeddings: the mean cosine of samples to other classes' centroids "
                                f"is {offdiag:.3f} (> {COLLAPSE_COS}); κ differences between groups are then small "
                                "in absolute terms; compare with the random-init control.")
    return out


def kappa_figures(plt, out: Path, res: dict, ctl_res: dict | None, planted_data: dict | None) -> Section:
    """One figure per grouping shape, with the random-init control and the planted entropy."""
    rows, run = res["rows"], res["run"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["grouping"], []).append(r)
    ctl_by: dict[str, dict[str, dict]] = {}
    for r in (ctl_res or {}).get("rows", []):
        ctl_by.setdefault(r["grouping"], {})[r["group"]] = r
    bins = set(run.get("bins", {}))
    min_count = run["config"]["min_count"]
    figures: list[tuple[str, str, str]] = []
    rank = {"temperature_c": 0, "particle_width_um": 1, "campaign": 2, "habit": 3}
    order = sorted(by, key=lambda g: (-len(g.split(":")), [rank.get(c, 9) for c in reversed(g.split(":"))], g))
    control_note = " Dotted/open: the random-init backbone (control)." if ctl_res else ""
    for g in order:
        cols = g.split(":")
        # column names come from data: keep the file name to safe characters (no '/', '..', markup)
        name = "kappa_" + re.sub(r"[^\w\-]", "_", g.replace(":", "_by_"), flags=re.ASCII) + ".png"
        ctl = ctl_by.get(g)
        if len(cols) == 2 and (cols[0] in bins) != (cols[1] in bins):
            cat, col = (cols[1], cols[0]) if cols[0] in bins else (cols[0], cols[1])
            pl = planted_entropy(planted_data, cat) if planted_data and col == "temperature_c" else None
            if pl and planted_data:
                pl.update(planted_entropy(planted_data, None))
            merged_ctl = {**(ctl or {}), **ctl_by.get(col, {})} if ctl_res else None
            note = fig_binned(plt, cat, col, by[g], by.get(col, []), out / name, min_count, merged_ctl, pl)
            figures.append((name, f"κ versus {_axis(col)} per {_axis(cat)}",
                            f"Points: debiased κ̂ with {run['config']['confidence']:.0%} Poisson-bootstrap CI; "
                            f"dashed: all {_axis(cat)}s pooled.{control_note}"
                            + (" Crosses (right axis, inverted): planted habit entropy." if pl else "")
                            + f" Lower panel: rows per bin. {note}"))
        elif len(cols) == 1 and cols[0] in bins:
            if any(cols[0] in g2.split(":") for g2 in by if g2 != g):
                continue  # drawn as the pooled line of a crossed figure
            pl = planted_entropy(planted_data, None) if planted_data and cols[0] == "temperature_c" else None
            note = fig_binned(plt, None, cols[0], by[g], [], out / name, min_count, ctl, pl)
            figures.append((name, f"κ versus {_axis(cols[0])}", f"All rows pooled.{control_note} {note}"))
        else:
            note = fig_categorical(plt, g.replace(":", " × "), by[g], out / name, ctl)
            figures.append((name, f"κ per {_axis(g.replace(':', ' × '))}",
                            "Dots: debiased κ̂ with CI; crosses: exact MLE (biased upward when n is small)."
                            + (" Open squares: random-init control." if ctl else "") + f" {note}"))
    sec = Section()
    for name, title, caption in figures:
        fig, dl = figure_html(out, name, title, caption)
        sec.html += f"<h3>{html.escape(title)}</h3>" + fig
        sec.downloads += dl
    return sec


def kappa_copies(out: Path, src: Path, random: Path | None, ctl_res: dict | None) -> Section:
    """kappa.csv, similarity.csv, kappa.json (and the control's kappa.csv) copied for download."""
    sec = Section()
    for f in ("kappa.csv", "similarity.csv", "kappa.json"):
        if (src / f).exists():
            shutil.copyfile(src / f, out / f)
            sec.downloads.append((f, "κ of every group (trained backbone)" if f != "similarity.csv"
                                  else "class-centroid similarity matrix"))
    if ctl_res is not None and random is not None and (random / "kappa.csv").exists():
        shutil.copyfile(random / "kappa.csv", out / "kappa_random_init.csv")
        sec.downloads.append(("kappa_random_init.csv", "κ of every group (random-init control)"))
    return sec


def netcdf(out: Path, res: dict, ctl_res: dict | None) -> Section:
    from .netcdf import write_netcdf

    try:
        write_netcdf(out / "kappa.nc", {"trained": res, **({"random_init": ctl_res} if ctl_res else {})})
    except ImportError as exc:
        return Section(warnings=[f"kappa.nc not written ({exc}); install xarray and h5netcdf"])
    return Section(downloads=[("kappa.nc", "κ tables as CF-1.8 netCDF (xarray.open_dataset)")])


def similarity(plt, out: Path, sim: dict | None) -> Section:
    if sim is None or not sim.get("labels"):
        return Section()
    fig_similarity(plt, sim, out / "similarity.png")
    offdiag = off_diagonal_mean(np.asarray(sim["matrix"], dtype=float)) if len(sim["labels"]) > 1 else None
    fig, dl = figure_html(out, "similarity.png", "similarity", "S[i, j] = mean over samples of class i (rows) of "
                          "cos(x̂, centroid of class j) (columns); the diagonal equals R̄ of the class. Classes in "
                          "average-linkage order on 1 − S; colour scale fitted to the values."
                          + (f" Mean off-diagonal S = {offdiag:.3f}." if offdiag is not None else ""))
    return Section(fig, dl)


# ------------------------------------------------------------------------------------ store
def store_sample(store: Path, label: str, map_sample: int) -> tuple[np.ndarray, dict, int, Section]:
    """The seeded sample of the store every store section shares, and its mixed-instrument warnings."""
    from .store_figures import _known_str, _read_sample

    x, meta, n_rows = _read_sample(store, [label, *STORE_META], max(map_sample, 1))
    sec = Section()
    for c, what in (("probe", "probes"), ("polarity", "polarities")):
        if c in meta and _known_str(meta[c]):
            vals = sorted({str(v) for v in meta[c] if str(v)})
            if len(vals) > 1:
                sec.warnings.append(f"mixed {what} in one store ({', '.join(vals)}): κ and similarities mix "
                                    "instruments; group by that column or embed them apart.")
    return x, meta, n_rows, sec


def embedding_map(plt, out: Path, x: np.ndarray, meta: dict, n_rows: int, label: str) -> Section:
    from .store_figures import fig_embedding_map

    if len(x) < 5:
        return Section()
    colourings, pca, tsne = fig_embedding_map(plt, x, meta, label, out / "embedding_map.png")
    keys = meta.get("key", np.arange(len(x)).astype(str))
    write_atomic(out / "embedding_map.csv", csv_text(
        ["key", *colourings, "pca_1", "pca_2", "tsne_1", "tsne_2"],
        [[str(keys[i]), *[str(meta[c][i]) for c in colourings], f"{pca[i, 0]:.5g}", f"{pca[i, 1]:.5g}",
          f"{tsne[i, 0]:.5g}", f"{tsne[i, 1]:.5g}"] for i in range(len(x))]))
    fig, dl = figure_html(out, "embedding_map.png", "Embedding map",
                          f"{len(x):,} of {n_rows:,} embeddings (seeded sample), L2-normalised; top: PCA, bottom: "
                          f"t-SNE (scikit-learn). Coloured by {', '.join(_axis(c) for c in colourings) or 'nothing'}"
                          " (only columns with known values).")
    return Section(fig, [("embedding_map.csv", "2-D coordinates of the embedding map"), *dl])


def examples(out: Path, shards: Path, x: np.ndarray, meta: dict, label: str, t_edges: list | None,
             k: int) -> Section:
    """Thumbnails nearest to / farthest from each group's mean direction. The shards must hold the
    store's samples: every shown key with the same source image (``source_sha256``), else one line."""
    from .store_figures import _thumb, example_groups, read_images

    if "key" not in meta or "shard" not in meta:
        return Section()
    groups = example_groups(x, meta, label, t_edges, k)
    shard_of = {str(kk): str(s) for kk, s in zip(meta["key"], meta["shard"])}
    wanted = {kk for g in groups for kk, _ in g["nearest"] + g["farthest"]}
    images, sources = read_images(shards, wanted, shard_of)
    store_src = ({str(kk): str(s) for kk, s in zip(meta["key"], meta[SOURCE])} if SOURCE in meta
                 else {kk: "" for kk in wanted})
    why = source_mismatch(f"--shards {shards}", {kk: store_src.get(kk, "") for kk in sorted(wanted)},
                          {kk: sources.get(kk, "") for kk in images})
    if why:
        raise ReportError(why)
    lines = []
    for g in groups:
        def cells(items: list[tuple[str, float]]) -> str:
            return "".join(f"<img alt='{html.escape(kk)}' title='key {html.escape(kk)}, cos {c:.3f}' "
                           f"src='data:image/png;base64,{_thumb(images[kk])}'>" for kk, c in items if kk in images)
        lines.append(f"<tr><td>{html.escape(g['group'])}<br><small>n = {g['n']:,}</small></td>"
                     f"<td>{cells(g['nearest'])}</td><td>{cells(g['farthest'])}</td></tr>")
    write_atomic(out / "examples.csv", csv_text(
        ["group", "which", "key", "cos_to_mean"],
        [[g["group"], which, kk, f"{c:.5f}"] for g in groups for which in ("nearest", "farthest")
         for kk, c in g[which]]))
    sec = Section(downloads=[("examples.csv", "keys of the example images and their cosine to the group mean")])
    if lines:
        sec.html = ("<p>Per group, the images whose embedding is nearest to the group's mean direction "
                    "(typical) and farthest from it (rare shapes, or mislabels), from the sample above. "
                    "Hover for key and cosine.</p><table class='thumbs'><thead><tr><th>group</th>"
                    "<th>nearest the mean direction</th><th>farthest</th></tr></thead><tbody>"
                    + "".join(lines) + "</tbody></table>")
    return sec


# ------------------------------------------------------------------------------------ probe
#: How the probe's methods and representations read in a table.
METHODS = {"knn": "kNN", "logreg": "LR"}
TRAINED, RANDOM = "pretrained", "random_init"  # the probe's names of the two backbones' representations


def _metric(m: dict, key: str) -> tuple[float | None, float | None]:
    """(mean, sd over splits or None) of a probe metric as ``icehpc probe`` writes it."""
    v, sd = m.get(key), m.get(f"{key}_sd")
    return (float(v) if _finite(v) else None), (float(sd) if _finite(sd) else None)


def _fmt_ms(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def split_text(pj: dict) -> str:
    """The probe's splits in words: how many, which seeds, train/test sizes, classes left out."""
    split = pj.get("split") or {}
    seeds = [int(s) for s in split.get("seeds") or [split.get("seed", 0)]]
    text = (f"{len(seeds)} stratified train/test splits (seeds {seeds[0]}–{seeds[-1]})" if len(seeds) > 1
            else f"one stratified train/test split (seed {seeds[0]})")
    if _finite(split.get("test_fraction")):
        text += f", {1 - split['test_fraction']:.0%} / {split['test_fraction']:.0%}"
    if isinstance(split.get("n_train"), int) and isinstance(split.get("n_test"), int):
        text += f": {split['n_train']:,} train and {split['n_test']:,} test samples each"
    left = split.get("left_out_classes") or {}
    if left:
        text += ("; left out (too few samples or no label): "
                 + ", ".join(f"{_group_name(c)} ({n:,})" for c, n in left.items()))
    return text


def versus_random(pj: dict, where: str) -> list[str]:
    """The trained backbone's balanced accuracy against random init's, per method: a warning when
    the difference is within one sd over splits (the larger of the two) or trained is below."""
    res = pj.get("results") or {}
    trained, rand = res.get(TRAINED) or {}, res.get(RANDOM) or {}
    verdicts: dict[str, list[str]] = {}
    for method in [m for m in trained if isinstance(trained[m], dict) and isinstance(rand.get(m), dict)]:
        (a, sa), (b, sb) = _metric(trained[method], "balanced_accuracy"), _metric(rand[method], "balanced_accuracy")
        if a is None or b is None:
            continue
        sd = max(sa or 0.0, sb or 0.0)
        verdict = "below" if a - b < -sd else "within" if abs(a - b) <= sd else None
        if verdict:
            verdicts.setdefault(verdict, []).append(f"{METHODS.get(method, method)} {_fmt_ms(a, sa)} vs {_fmt_ms(b, sb)}")
    said = {"within": "is not distinguishable from random init (difference within one sd over splits",
            "below": "is below random init (by more than one sd over splits"}
    why = {"within": "pretraining has not learnt these classes (yet)",
           "below": "pretraining made the embeddings worse for these classes"}
    return [f"{where}: the trained backbone {said[v]}; balanced accuracy trained vs random init: "
            f"{', '.join(found)}): {why[v]}." for v, found in verdicts.items()]


def _confusions(out: Path, pj: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Confusion matrices of every representation/method (the probe's own plot_confusion)."""
    from ..probe import plot_confusion

    classes = [str(c) for c in pj.get("classes", [])]
    names, downloads = [], []
    for rep, methods in (pj.get("results") or {}).items():
        for method, m in methods.items():
            cm = m.get("confusion_matrix") if isinstance(m, dict) else None
            if cm is not None and classes and np.asarray(cm).shape == (len(classes), len(classes)):
                fname = "confusion_" + re.sub(r"[^\w-]+", "_", f"{rep}_{method}", flags=re.ASCII) + ".png"
                plot_confusion(np.asarray(cm, dtype=float), classes, f"{rep} / {method}", out / fname, FORMATS)
                names.append(fname)
                downloads += [(Path(fname).with_suffix(f".{f}").name, f"confusion matrix {rep} / {method}")
                              for f in FORMATS if f != "png"]
    return names, downloads


def probe(out: Path, probe_dir: Path, pj: dict) -> Section:
    """The probe's table (mean ± sd over splits), per-class recall and confusion matrices (drawn by
    the probe's own :func:`icehpc.analysis.probe.plot_confusion`)."""
    sec = Section(warnings=versus_random(pj, f"probe of this store ({pj.get('label', '')})"))
    classes = [str(c) for c in pj.get("classes", [])]
    table, recall_rows = [], []
    for rep, methods in (pj.get("results") or {}).items():
        for method, m in methods.items():
            if not isinstance(m, dict):
                continue
            acc, acc_sd = _metric(m, "accuracy")
            bal, bal_sd = _metric(m, "balanced_accuracy")
            table.append({"representation": rep, "method": method, "accuracy": _fmt_ms(acc, acc_sd),
                          "balanced accuracy": _fmt_ms(bal, bal_sd),
                          "splits": len(m.get("accuracy_per_split") or [acc])})
            rec = m.get("per_class_recall")
            if isinstance(rec, dict):
                recall_rows.append({"representation / method": f"{rep} / {method}", **rec})
    conf_names, sec.downloads = _confusions(out, pj)
    sec.html = (f"<p>Class column <code>{html.escape(str(pj.get('label', '')))}</code>, {len(classes)} classes; "
                f"{html.escape(split_text(pj))}. Mean ± sd over the splits.</p>"
                + _table(table, ["representation", "method", "accuracy", "balanced accuracy", "splits"]))
    if recall_rows:
        sec.html += ("<details><summary>per-class recall</summary>"
                     + _table(recall_rows, ["representation / method", *classes]) + "</details>")
    sec.html += "<div class='conf'>" + "".join(
        f"<figure><img alt='{html.escape(n)}' src='data:image/png;base64,{_b64(out / n)}'><figcaption>"
        f"Row-normalised confusion matrix, {html.escape(n[10:-4].replace('_', ' '))}.</figcaption></figure>"
        for n in conf_names) + "</div>"
    if (probe_dir / "summary.csv").exists():
        shutil.copyfile(probe_dir / "summary.csv", out / "probe_summary.csv")
        sec.downloads.append(("probe_summary.csv", "probe accuracies"))
    return sec


def archive_rows(pj: dict) -> list[dict[str, Any]]:
    """One row per representation: kNN and LR accuracy and balanced accuracy (mean ± sd over
    splits), samples and classes."""
    split = pj.get("split") or {}
    n = sum(v for v in (split.get("n_train"), split.get("n_test")) if isinstance(v, int))
    rows = []
    for rep, methods in (pj.get("results") or {}).items():
        row: dict[str, Any] = {"representation": rep}
        for method, name in METHODS.items():
            m = methods.get(method)
            m = m if isinstance(m, dict) else {}
            row[f"{name} accuracy"] = _fmt_ms(*_metric(m, "accuracy"))
            row[f"{name} balanced accuracy"] = _fmt_ms(*_metric(m, "balanced_accuracy"))
        rows.append({**row, "n": n, "classes": len(pj.get("classes") or [])})
    return rows


def real_probes(out: Path, probes: dict[str, tuple[Path, dict]]) -> Section:
    """A table per real archive (``--real-probe NAME=DIR``): the same backbone probed on its images."""
    sec = Section()
    cols = ["representation", *(f"{m} {k}" for m in METHODS.values() for k in ("accuracy", "balanced accuracy")),
            "n", "classes"]
    for name, (folder, pj) in probes.items():
        sec.warnings += versus_random(pj, f"{name} probe")
        classes = ", ".join(_group_name(c) for c in pj.get("classes") or [])
        sec.html += (f"<h3>{html.escape(name)}</h3><p>Class column <code>{html.escape(str(pj.get('label', '')))}"
                     f"</code>: {html.escape(classes)}; {html.escape(split_text(pj))}. Mean ± sd over the splits; "
                     "kNN: cosine k-nearest neighbours, LR: logistic regression.</p>" + _table(archive_rows(pj), cols))
        if (folder / "summary.csv").exists():
            dest = "probe_summary_" + re.sub(r"[^\w-]+", "_", name, flags=re.ASCII) + ".csv"
            shutil.copyfile(folder / "summary.csv", out / dest)
            sec.downloads.append((dest, f"probe accuracies on {name}"))
    if sec.html:
        sec.html = ("<p>The trained and the random-init backbones embedded each real archive, then were probed as "
                    "above (<code>geometric</code>: contour features of the images, a baseline that needs no "
                    "network).</p>" + sec.html)
    return sec


# -------------------------------------------------------------------------------- pretraining
def pretraining(plt, out: Path, pretrain: Path) -> Section:
    from .pretraining import fig_pretrain, metric_warnings, read_metrics

    mpath = pretrain / METRICS
    records = read_metrics(mpath)
    sec = Section(warnings=metric_warnings(records))
    if fig_pretrain(plt, records, out / "pretrain_curves.png"):
        sec.html, sec.downloads = figure_html(out, "pretrain_curves.png", "pretraining curves",
                                              "From metrics.jsonl of the pretraining run, one point per step.")
    shutil.copyfile(mpath, out / METRICS)
    sec.downloads.append((METRICS, "pretraining metrics, one JSON record per step"))
    return sec


# ---------------------------------------------------------------------------------- provenance
def provenance(run: dict, *, store: Path | None, shards: Path | None, pretrain: Path | None,
               backbone: Path | None, backbone_sha256: str) -> Section:
    """``backbone_sha256``: the backbone file's, as the report's inputs recorded it (not hashed again)."""
    prov: list[dict[str, Any]] = []
    if backbone and backbone.exists():
        prov.append({"item": "backbone", "value": f"{backbone.resolve()}  sha256 {backbone_sha256}"})
    if pretrain and (pretrain / RUN_CONFIG).exists():
        prov.append({"item": "pretraining config", "value": f"{pretrain.resolve() / RUN_CONFIG}"})
    if shards and (shards / INDEX).exists():
        index_path = shards / INDEX
        index = json.loads(index_path.read_text())
        prov.append({"item": "shards", "value": f"{shards.resolve()}  index.json sha256 {file_sha256(index_path)[:16]}; "
                                                f"{json.dumps(index.get('totals', {}))}"})
        if index.get("command"):
            prov.append({"item": "command: shards", "value": " ".join(map(str, index["command"]))})
    if store and Path(f"{store}.json").exists():
        sj = json.loads(Path(f"{store}.json").read_text())
        prov.append({"item": "store", "value": f"{store.resolve()}; {sj.get('rows')} rows, {sj.get('dim')}-d; "
                                               f"weights {sj.get('backbone', {}).get('weights')}"})
    prov.append({"item": "command: kappa", "value": " ".join(map(str, run.get("argv") or []))})
    prov.append({"item": "command: report", "value": " ".join(sys.argv)})
    for k in ("store", "n_rows", "dim", "ranks", "started", "host", "icehpc", "python", "numpy", "fingerprint"):
        if run.get(k) is not None:
            prov.append({"item": f"κ run: {k}", "value": run[k]})
    text = _table(prov, ["item", "value"])
    if pretrain and (pretrain / RUN_CONFIG).exists():
        text += ("<details><summary>pretraining config (resolved)</summary><pre>"
                 + html.escape((pretrain / RUN_CONFIG).read_text()) + "</pre></details>")
    text += ("<details><summary>κ configuration and bin edges</summary><pre>"
             + html.escape(json.dumps({"config": run.get("config"), "config_source": run.get("config_source"),
                                       "bins": run.get("bins"), "timings": run.get("timings")},
                                      indent=1, ensure_ascii=False, default=str)) + "</pre></details>")
    return Section(text)
