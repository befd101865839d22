"""Joins checked by content: a stage that reads another run's output refuses one that merely
shares key names with its own inputs.

Each sample carries the sha256 of its source image (``source_sha256``: a shard sample's JSON and
the store's meta column of the same name). Two outputs describe the same samples when every key
they share names the same source; a κ run names its store by a fingerprint of the store's content
(:func:`icehpc.analysis.kappa.fingerprint`); a probe records the sha256 of the store it scored.
Every check here returns None when the inputs match, else one line saying what differs (the caller
raises it as a :class:`~icehpc.config.UserError`: one line, exit 2).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

SOURCE = "source_sha256"  # the provenance column shared by shards (sample JSON) and stores (meta)


def samples_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 of the sorted (key, source sha256) pairs: which samples, by content, an output holds."""
    h = hashlib.sha256()
    for key, src in sorted(pairs):
        h.update(f"{key}\t{src}\n".encode())
    return h.hexdigest()


def source_mismatch(what: str, mine: Mapping[str, str], theirs: Mapping[str, str], *, need_all: bool = True) -> str | None:
    """Why ``theirs`` (key → source sha256 of another run's output) does not hold the samples of
    ``mine``: a key missing (when ``need_all``) or a key whose source image differs. Empty source
    values (hand-written stores without provenance) are not compared."""
    missing = [k for k in mine if k not in theirs]
    if need_all and missing:
        return (f"{what} is missing {len(missing)} of the {len(mine)} samples (first: {missing[:3]}); "
                "give the output built from the same samples")
    differ = [k for k, s in mine.items() if k in theirs and s and theirs[k] and s != theirs[k]]
    if differ:
        return (f"{what} holds other images under {len(differ)} of the same keys (source_sha256 differs, first: "
                f"{differ[:3]}): it was built from another data set; give the matching one")
    return None


def kappa_store_mismatch(kappa_run: Mapping[str, Any], store_path: str | os.PathLike, what: str = "--store") -> str | None:
    """Why the κ run (``kappa.json``'s ``run`` section) was not computed from the store at
    ``store_path``: another row count or dimension, or another file whose content does not give the
    κ run's fingerprint. The same file that κ read is accepted."""
    from .. import config as cfglib
    from . import kappa as kp
    from .store import open_store

    with open_store(store_path) as store:
        if (kappa_run.get("n_rows"), kappa_run.get("dim")) != (store.n_rows, store.dim):
            return (f"{what} {store_path} holds {store.n_rows} rows of dimension {store.dim} but the κ run was "
                    f"computed from {kappa_run.get('store')} ({kappa_run.get('n_rows')} rows, {kappa_run.get('dim')}-d)")
        recorded = kappa_run.get("fingerprint")
        try:
            same_content = recorded is not None and kp.fingerprint(
                store, cfglib._build(kp.KappaConfig, dict(kappa_run.get("config") or {}))) == recorded
        except Exception:  # an older or newer kappa.json layout: fall back to the path below
            same_content = False
        same_file = kappa_run.get("store") is not None and Path(str(kappa_run["store"])).resolve() == store.path.resolve()
    if same_content or same_file:
        return None
    return (f"{what} {store_path} is not the store the κ run read ({kappa_run.get('store')}; its content does "
            "not give the κ run's fingerprint): give the store the κ folder was computed from")


# ------------------------------------------------------------------------- per-key columns of a table
class KeyTable:
    """Per-key columns from a CSV with a ``key`` column (``kappa --columns FILE``: a classify run's
    predictions.csv, or any user table such as flight-level environment per particle).

    Every other column is numbers when each non-empty cell parses as one (empty cells: NaN), else
    text (empty cells: ""). A missing ``key`` column, an empty column name or a key given twice is
    a :class:`~icehpc.config.UserError` (one line)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import csv
        from collections import Counter

        from ..config import UserError
        from ..fileio import file_sha256

        self.path = str(path)
        if not Path(path).is_file():
            raise UserError(f"columns file {path} does not exist (a CSV with a 'key' column)")
        self.sha256 = file_sha256(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh)
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
        from ..config import UserError

        if tables and "key" not in store.column_kinds:
            raise UserError(f"{store.path}: no meta column 'key' to join the columns files on (have {store.columns})")
        self._store, self.tables = store, tables
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

    def matched(self, start: int, stop: int) -> list[int]:
        """Per table, how many of rows [start, stop) have their key in it."""
        if not self.tables:
            return []
        _, meta = self._store.read(start, stop, ["key"], embeddings=False)
        return [int((t.positions(meta["key"].tolist()) >= 0).sum()) for t in self.tables]

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
