"""The κ stage's configuration and its grouping columns: :class:`KappaConfig` (typed, bounded before
anything is allocated), the bins of numeric columns, and how a metadata column maps to level codes
(:class:`Column`, the same on every rank). The accumulation and the estimates are :mod:`.kappa`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import config as cfgmod
from ..config import field
from ..data.synth import TEMPERATURE_EDGES_C

MISSING, BELOW, ABOVE = "missing", "below range", "above range"
#: Largest bin count of one numeric column (n_bins, or edges − 1) and bootstrap replicate count a
#: config may ask for: checked when the config is built, before anything is allocated.
MAX_BINS = 10_000
MAX_BOOTSTRAP = 10_000


class KappaError(cfgmod.UserError):
    """Bad input or configuration for the κ stage; the message says what and how to fix it."""


@dataclass
class BinSpec:
    """Bins of one numeric column: explicit ``edges`` or ``n_bins`` equal bins over the data range."""

    edges: list[float] = field([], help="ascending bin edges; empty → n_bins equal bins over [min, max] of the data")
    n_bins: int = field(10, help="number of equal-width bins when edges is empty", ge=1, le=MAX_BINS)
    merge_last: int = field(1, help="merge the last k equal-width bins into one (paper's width bins: 2)", ge=1)

    def validate(self) -> None:
        if self.edges and not np.all(np.isfinite(self.edges)):
            raise ValueError(f"edges must be finite numbers, got {self.edges}")
        if len(self.edges) > MAX_BINS + 1:
            raise ValueError(f"{len(self.edges)} bin edges: at most {MAX_BINS + 1}")
        if self.edges and (len(self.edges) < 2 or np.any(np.diff(self.edges) <= 0)):
            raise ValueError(f"bin edges must be ≥ 2 strictly ascending numbers, got {self.edges}")
        if self.n_bins < 1 or not 1 <= self.merge_last <= self.n_bins:
            raise ValueError(f"need n_bins ≥ 1 and 1 ≤ merge_last ≤ n_bins, got {self.n_bins}, {self.merge_last}")


def paper_bins() -> dict[str, BinSpec]:
    """The paper's bins: 10 °C from −70 to 0; particle width in 10 equal bins, last two merged."""
    return {"temperature_c": BinSpec(edges=list(TEMPERATURE_EDGES_C)),
            "particle_width_um": BinSpec(n_bins=10, merge_last=2)}


@dataclass
class KappaConfig:
    groupings: list[str] = field(
        ["campaign", "habit", "temperature_c", "particle_width_um",
         "campaign:temperature_c", "campaign:particle_width_um"],
        help="groupings: a column, or columns crossed with ':' (campaign:temperature_c)")
    bins: dict[str, BinSpec] = dataclasses.field(
        default_factory=paper_bins,
        metadata={"help": "per numeric column: {edges: [...]} or {n_bins, merge_last}; other numeric "
                          "columns get 10 equal bins"})
    min_count: int = field(20, help="groups with fewer valid rows are reported and flagged, not estimated", ge=1)
    bootstrap: int = field(200, help="Poisson bootstrap replicates B (0: no CI)", ge=0, le=MAX_BOOTSTRAP)
    confidence: float = field(0.95, help="confidence level of the percentile interval")
    seed: int = field(0, help="bootstrap seed (with the global row index, fixes every weight)")
    similarity_by: str = field("habit", help="column for the inter-class similarity matrix ('' : none)")
    max_stats_gib: float = field(4.0, help="refuse runs whose bootstrap sums and weights would exceed this many GiB",
                                ge=0)
    drop_empty_columns: bool = field(False, help="leave out groupings over columns the store lacks or that hold "
                                                 "no known value (data without temperature or campaign) instead "
                                                 "of failing; kappa.json lists what was left out")
    columns: list[str] = field([], help="CSV files with a 'key' column (a classify run's predictions.csv, a table of "
                                        "flight-level environment, ...): their other columns join the store's by key "
                                        "and can be grouped by; the files' content enters the fingerprint")
    columns_min_match: float = field(0.5, help="refuse a columns file that holds the keys of fewer than this fraction "
                                               "of the store's rows (unmatched rows: empty text, a missing number)",
                                     ge=0, le=1)

    def validate(self) -> None:
        if not self.groupings:
            raise ValueError("groupings is empty")
        if self.min_count < 1 or self.bootstrap < 0 or not 0 < self.confidence < 1:
            raise ValueError("need min_count ≥ 1, bootstrap ≥ 0 and 0 < confidence < 1")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2^63)")


# ----------------------------------------------------------------------------------- levels

@dataclass
class Column:
    """How one metadata column maps to integer level codes (same on every rank)."""

    name: str
    kind: str  # "cat" | "bin"
    levels: list[str]
    edges: np.ndarray | None = None  # bins: ascending edges; last bin closed

    def codes(self, values: np.ndarray) -> np.ndarray:
        if self.kind == "cat":
            return np.searchsorted(np.asarray(self.levels), values).astype(np.int64)
        e = self.edges
        nb = len(e) - 1
        v = np.asarray(values, dtype=np.float64)
        c = np.searchsorted(e, v, side="right") - 1
        c[v == e[-1]] = nb - 1
        c[v < e[0]] = nb
        c[v > e[-1]] = nb + 1
        c[np.isnan(v)] = nb + 2
        return c.astype(np.int64)

    def level_info(self, code: int) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.levels[code]}
        if self.kind == "bin" and code < len(self.edges) - 1:
            out.update(low=float(self.edges[code]), high=float(self.edges[code + 1]))
        return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _bin_labels(edges: np.ndarray) -> list[str]:
    nb = len(edges) - 1
    return [f"[{_fmt(edges[i])}, {_fmt(edges[i + 1])}{']' if i == nb - 1 else ')'}" for i in range(nb)] + [
        f"{BELOW} (< {_fmt(edges[0])})", f"{ABOVE} (> {_fmt(edges[-1])})", MISSING]


def _auto_edges(spec: BinSpec, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo):  # no finite values at all: one dummy bin, everything is "missing"
        return np.array([0.0, 1.0])
    if hi <= lo:  # a single value: one closed bin [lo, lo]
        return np.array([lo, lo])
    e = np.linspace(lo, hi, spec.n_bins + 1)
    if spec.merge_last > 1:
        e = np.delete(e, np.arange(spec.n_bins + 1 - spec.merge_last, spec.n_bins))
    return e


def parse_groupings(items: Sequence[str]) -> list[tuple[str, ...]]:
    """``["campaign", "campaign:temperature_c"]`` → [("campaign",), ("campaign", "temperature_c")]."""
    out: list[tuple[str, ...]] = []
    for item in items:
        cols = tuple(c.strip() for c in str(item).split(":"))
        if not all(cols) or len(set(cols)) != len(cols):
            raise KappaError(f"bad grouping '{item}': use column or col1:col2 (no repeats)")
        if cols not in out:
            out.append(cols)
    return out
