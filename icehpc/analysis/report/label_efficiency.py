"""The report's label-efficiency section: how the probes' accuracy grows with the number of training
labels, for the pretrained backbone and its controls (``icehpc probe --label-fractions``).

Reads probe.json's ``label_efficiency`` rows, redraws the probe's figure (its own
:func:`icehpc.analysis.probe.plot_label_efficiency`) as PNG, SVG and PDF, shows the table and copies
the probe's CSV for download. A probe run without ``--label-fractions`` gives an empty section."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..probe import (LABEL_EFFICIENCY_COLUMNS, LABEL_EFFICIENCY_CSV, LABEL_EFFICIENCY_FIGURE, METHOD_NAMES,
                     plot_label_efficiency)
from .common import FORMATS, Section, _finite, _table, figure_html
from .sections import _fmt_ms, _metric

#: Every file this section writes into the report folder (the report's contract owns them).
FILES = (LABEL_EFFICIENCY_CSV, *(str(Path(LABEL_EFFICIENCY_FIGURE).with_suffix(f".{f}")) for f in FORMATS))


def _well_formed(row: object) -> bool:
    """A row as ``icehpc probe`` writes it (a name, a known method, finite numbers); others are left out."""
    return (isinstance(row, dict) and isinstance(row.get("representation"), str) and row.get("method") in METHOD_NAMES
            and all(_finite(row.get(k)) for k in LABEL_EFFICIENCY_COLUMNS[2:]))


def section(out: Path, probe_dir: Path, pj: dict) -> Section:
    """Figure, table and CSV of the label-efficiency curves in ``pj`` (probe.json), if it has any."""
    rows = [r for r in ((pj.get("label_efficiency") or {}).get("rows") or []) if _well_formed(r)]
    if not rows:
        return Section()
    plot_label_efficiency(rows, len(pj.get("classes") or []), out / LABEL_EFFICIENCY_FIGURE, FORMATS)
    fig, downloads = figure_html(
        out, LABEL_EFFICIENCY_FIGURE, "Label efficiency",
        "Probe accuracy versus the number of training labels: on each split the probes are fitted on a stratified "
        "subset of its training rows (at least one per class; a smaller subset lies inside every larger one) and "
        "scored on the split's full test set. Lines: mean over the splits; bands: ± sd; dotted: chance. "
        "Fraction 1 is the probe table above.")
    sec = Section(fig, downloads)
    fractions = sorted({r.get("fraction") for r in rows if _finite(r.get("fraction"))})
    labels = {r["fraction"]: r.get("n_train_labels") for r in rows if r.get("fraction") in fractions}
    columns = {f: f"{f:g} ({labels[f]:,} labels)" if isinstance(labels[f], int) else f"{f:g}" for f in fractions}
    for key, what in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy")):
        table: dict[tuple, dict] = {}
        for r in rows:
            if r.get("fraction") in columns:
                name = (r.get("representation"), METHOD_NAMES[r["method"]])
                cells = table.setdefault(name, {"representation": name[0], "method": name[1]})
                cells[columns[r["fraction"]]] = _fmt_ms(*_metric(r, key))
        sec.html += (f"<p>{what} (mean ± sd over the splits) per fraction of the training labels:</p>"
                     + _table(list(table.values()), ["representation", "method", *columns.values()]))
    if (probe_dir / LABEL_EFFICIENCY_CSV).exists():
        shutil.copyfile(probe_dir / LABEL_EFFICIENCY_CSV, out / LABEL_EFFICIENCY_CSV)
        sec.downloads.append((LABEL_EFFICIENCY_CSV, "label-efficiency curves (mean ± sd over splits per fraction)"))
    return sec
