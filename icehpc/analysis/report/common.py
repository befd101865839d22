"""What every report section shares: names and units of axes, the figure saver (every figure
through :func:`icehpc.plotting.pyplot`, math text off), table and page helpers, and
:class:`Section`, what each section returns to the assembler (:mod:`.build`)."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config import UserError

AXIS_NAMES = {"temperature_c": "temperature (°C)", "particle_width_um": "particle width (µm)",
              "pressure_hpa": "pressure (hPa)", "particle_height_um": "particle height (µm)"}
UNITS = {"temperature_c": "degC", "particle_width_um": "um", "particle_height_um": "um", "pressure_hpa": "hPa"}
_UNIT_TEXT = {"degC": "°C", "um": "µm"}  # UNITS (CF spelling, kappa.nc) as a reader writes them
ESTIMATE = "kappa_debiased"  # the CI brackets this estimator (see icehpc.analysis.kappa)
COLLAPSE_COS = 0.9  # mean cosine to other classes' centroids above this: the classes are not told apart
MAP_SAMPLE = 2000  # embedding-map rows (t-SNE is O(n log n) but slow in pure CPU at 10⁵)
FORMATS = ("png", "svg", "pdf")


class ReportError(UserError):
    """The κ folder cannot be reported on; the message says what is missing."""


def _axis(col: str) -> str:
    return AXIS_NAMES.get(col, col.replace("_", " "))


def _plt():
    """matplotlib.pyplot, the one way icehpc opens it (Agg, house style, math text off)."""
    from ...plotting import pyplot

    return pyplot()


def _save(plt, fig, path: Path) -> None:
    """``path`` (.png) and the same figure as .svg and .pdf beside it."""
    fig.tight_layout()
    for fmt in FORMATS:
        fig.savefig(path.with_suffix(f".{fmt}"))
    plt.close(fig)


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and bool(np.isfinite(v))


def _group_name(v: Any) -> str:
    """A level label for display: empty or missing labels are named, never blank."""
    text = "" if v is None else str(v)
    return text if text.strip() else "(unknown)"


def describe_group(row: dict) -> str:
    """A κ group as a reader names it: every column with its level, bins with their unit
    (``campaign = arctic, temperature_c [-40, -30) °C``)."""
    said = []
    for col, lev in (row.get("levels") or {}).items():
        label = _group_name(lev.get("label"))
        unit = _UNIT_TEXT.get(UNITS.get(col, ""), UNITS.get(col, ""))
        said.append(f"{col} {label}" + (f" {unit}" if unit else "") if "low" in lev else f"{col} = {label}")
    return ", ".join(said) or _group_name(row.get("group"))


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return html.escape(str(v))
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# ------------------------------------------------------------------------------------------- page
CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;
font-size:.9em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;
padding:.25em .6em;text-align:left}th{background:#f4f4f4}tr:nth-child(even){background:#fafafa}
.summary{background:#f6f8fa;padding:.8em 1em;border-radius:6px}code,pre{background:#f6f8fa;font-size:.85em}
pre{padding:.8em;overflow-x:auto;max-height:30em}.warn{background:#fff4e5;border:1px solid #f0b160;border-radius:6px;
padding:.6em 1em}.ok{background:#eef8ee;border:1px solid #9c9;border-radius:6px;padding:.6em 1em}
.thumbs img{width:72px;height:72px;object-fit:contain;border:1px solid #ddd;margin:1px;background:#fff}
.thumbs td{vertical-align:top}nav a{margin-right:.8em}.conf figure{display:inline-block;width:49%;margin:0}"""


class Page:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: list[str] = []
        self.downloads: list[tuple[str, str]] = []  # (file name in out, description)
        self.toc: list[tuple[str, str]] = []

    def h2(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f"<h2 id='{anchor}'>{html.escape(title)}</h2>")

    def figure(self, png: str, title: str, caption: str) -> None:
        files = ", ".join(f"<a href='{html.escape(Path(png).with_suffix('.' + f).name)}'>{f.upper()}</a>"
                          for f in FORMATS if (self.out / Path(png).with_suffix("." + f).name).exists())
        self.parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{_b64(self.out / png)}'>"
                          f"<figcaption>{html.escape(caption)} Files: {files}.</figcaption></figure>")
        for f in FORMATS:
            name = Path(png).with_suffix("." + f).name
            if (self.out / name).exists():
                self.downloads.append((name, f"figure: {title}"))

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)




@dataclass
class Section:
    """What one report section gives the assembler: its html (empty: nothing to show), the files
    it wrote for download (name in the report folder, description) and its warnings."""

    html: str = ""
    downloads: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def figure_html(out: Path, png: str, title: str, caption: str) -> tuple[str, list[tuple[str, str]]]:
    """An embedded figure with links to its PNG/SVG/PDF files, and those files as downloads."""
    page = Page(out)
    page.figure(png, title, caption)
    return "".join(page.parts), page.downloads
