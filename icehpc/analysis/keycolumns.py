"""Per-key columns from outside a store, joined onto its rows by key (``kappa --columns FILE``).

:class:`KeyTable` reads a CSV with a ``key`` column (a classify run's ``predictions.csv``, a user's
table of flight-level environment per particle, ...); :class:`JoinedStore` shows a store with those
columns added, so a stage that groups by metadata columns groups by them the same way. Bad files
are refused with one line (:class:`~icehpc.config.UserError`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import UserError


class KeyTable:
    """Per-key columns from a CSV with a ``key`` column (``kappa --columns FILE``: a classify run's
    predictions.csv, or any user table such as flight-level environment per particle).

    Every other column is numbers when each non-empty cell parses as one (empty cells: NaN), else
    text (empty cells: ""). A missing ``key`` column, an empty column name or a key given twice is
    a :class:`~icehpc.config.UserError` (one line)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        if not Path(path).is_file():
            raise UserError(f"columns file {path} does not exist (a CSV with a 'key' column)")
        data = Path(path).read_bytes()  # read once: the sha256 is of the very bytes parsed
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
            header = next(reader, [])
            rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"columns file {path} is not a readable CSV ({exc})") from None
        if "key" not in header:
            raise UserError(f"columns file {path} has no 'key' column (header: {header[:8]}); it is joined by key")
        names = [h for h in header if h != "key"]
        if not all(n.strip() for n in names) or len(set(header)) != len(header):
            raise UserError(f"columns file {path}: column names must be non-empty and distinct (header: {header[:8]})")
        width = len(header)
        short = next((i for i, r in enumerate(rows) if len(r) != width), None)
        if short is not None:
            raise UserError(f"columns file {path}: line {short + 2} has {len(rows[short])} cells, the header {width}")
        cells = {h: [r[i] for r in rows] for i, h in enumerate(header)}
        keys = cells.pop("key")
        self.index = {k: i for i, k in enumerate(keys)}
        if len(self.index) != len(keys):
            dup = [k for k, n in Counter(keys).items() if n > 1]
            raise UserError(f"columns file {path}: {len(dup):,} key(s) occur more than once (e.g. "
                            f"{', '.join(dup[:3])}); give one row per key")
        self.columns: dict[str, np.ndarray] = {}
        self.kinds: dict[str, str] = {}
        for name, values in cells.items():
            try:
                self.columns[name] = np.array([float(v) if v.strip() else np.nan for v in values], dtype=np.float64)
                self.kinds[name] = "num"
            except ValueError:
                self.columns[name] = np.array(values, dtype=str)
                self.kinds[name] = "str"

    def positions(self, keys: Iterable[str]):
        """Row of each key in this table, -1 where it has none."""
        return np.fromiter((self.index.get(k, -1) for k in keys), dtype=np.int64)

    def take(self, name: str, pos: Any):
        """Column ``name`` at rows ``pos`` (from :meth:`positions`); -1 → NaN or ""."""
        col = self.columns[name]
        missing = np.nan if self.kinds[name] == "num" else ""
        out = np.where(pos >= 0, col[np.maximum(pos, 0)], missing) if len(col) else np.full(len(pos), missing)
        return out if self.kinds[name] == "num" else out.astype(str)


class JoinedStore:
    """A :class:`~icehpc.analysis.store.Store` with the columns of :class:`KeyTable` files joined
    by the store's ``key``: they appear in ``columns`` / ``column_kinds`` and :meth:`read` fills
    them (rows without a match: NaN or ""). Everything else is the store's."""

    def __init__(self, store: Any, tables: list[KeyTable]) -> None:
        if "key" not in store.column_kinds:
            raise UserError(f"{store.path}: no meta column 'key' to join the columns files on (have {store.columns})")
        self._store = store
        self._owner: dict[str, KeyTable] = {}
        for t in tables:
            for name in t.columns:
                if name in store.column_kinds or name in self._owner:
                    where = "the store" if name in store.column_kinds else self._owner[name].path
                    raise UserError(f"columns file {t.path}: column '{name}' is also in {where}; rename it in the file")
                self._owner[name] = t
        self.column_kinds = {**store.column_kinds, **{n: t.kinds[n] for n, t in self._owner.items()}}
        self.columns = sorted(self.column_kinds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def read(self, start: int, stop: int, columns: Any = None, embeddings: bool = True):
        wanted = list(self.columns if columns is None else columns)
        joined = [c for c in wanted if c in self._owner]
        own = [c for c in wanted if c not in self._owner]
        if joined and "key" not in own:
            own.append("key")
        emb, meta = self._store.read(start, stop, own, embeddings)
        pos: dict[int, np.ndarray] = {}
        for c in joined:
            table = self._owner[c]
            if id(table) not in pos:
                pos[id(table)] = table.positions(meta["key"].tolist())
            meta[c] = table.take(c, pos[id(table)])
        return emb, {c: meta[c] for c in wanted}
