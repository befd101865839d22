"""HDF5 embedding store: part files (one per shard from `icehpc embed`), a master file of virtual datasets over them.

Schema (also what a user writes by hand; a single such file is a valid store):

* ``embeddings`` — [N, D] float32 or float16, one row per particle image;
* ``meta/<column>`` — length-N numbers or UTF-8 strings (``campaign``, ``habit``, ``temperature_c``,
  ``particle_width_um``, ``key``, …).

Parts written by :func:`write_part` also hold ``icehpc/present`` (uint8 ones). The master written by
:func:`write_master` maps every dataset onto its parts with HDF5 virtual datasets; ``icehpc/present``
is virtual with fill value 0, which no part contains. HDF5 silently returns fill values for a
missing source file or dataset, so the master also records per part its sha256 and its datasets
with their shapes and dtypes (``part_sha256``, ``part_datasets``), and :func:`open_store` checks
them all, plus that no ``key`` occurs twice: a lost, truncated, rewritten, copied or edited part is
a :class:`StoreError` naming it, never rows of fill values or silently different numbers.
:meth:`Store.read` still checks the marker. Files are created with the umask's permissions.

Parts and master also name their dimensions for netCDF readers (``xarray.open_dataset(STORE)``, engine h5netcdf
or netCDF4): HDF5 dimension scales ``sample`` [N] and ``feature`` [D] (no data stored: netCDF's mark of
a dimension without a variable) attached to every dataset, and every meta column also linked at the
root (an HDF5 hard link: the same dataset under a second name, no copy), so the store reads as one
Dataset ``embeddings(sample, feature)`` + one variable per column along ``sample``, with ``key`` as
a coordinate. A column whose name the root already uses (``sample``, ``feature``, ``embeddings``,
``meta``, ``icehpc``) stays under ``meta/`` only (``xarray.open_dataset(STORE, group="meta")``).
Stores written before this have no scales: h5py and :func:`open_store` read them as before, xarray
sees ``embeddings`` on ``phony_dim_*`` dimensions and no metadata at the root.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from ..config import UserError
from ..fileio import file_sha256

EMB = "embeddings"
META = "meta"
PRESENT = "icehpc/present"
MASTER_NAME = "store.h5"  # what open_store looks for when given a directory
SAMPLE, FEATURE = "sample", "feature"  # dimension names netCDF readers (xarray) see
_STR = h5py.string_dtype("utf-8")
#: the NAME netCDF gives a dimension scale that is not also a variable (no coordinate values)
_DIM_ONLY = "This is a netCDF dimension but not a netCDF variable."


class StoreError(UserError):
    """The store is unusable as given; the message says which file/dataset and why."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _datasets(f: h5py.File) -> dict[str, list]:
    """path → [shape, dtype] of every dataset of a part (what the master maps onto it), under each
    of its names: a dataset that is also linked at the root is listed as ``meta/<column>`` too."""
    out: dict[str, list] = {}

    def visit(name: str, link) -> None:
        if isinstance(link, h5py.HardLink) and isinstance(obj := f[name], h5py.Dataset):
            out[name] = [list(obj.shape), str(obj.dtype)]

    f.visititems_links(visit)
    return dict(sorted(out.items()))


def _name_dimensions(f: h5py.File, n: int, d: int) -> None:
    """Dimension scales ``sample`` [n] and ``feature`` [d] attached to every dataset, each meta
    column hard-linked at the root where its name is free, ``key`` as the coordinate (module doc)."""
    for name, size in ((SAMPLE, n), (FEATURE, d)):
        f.create_dataset(name, shape=(size,), dtype="f4").make_scale(f"{_DIM_ONLY}{size:10d}")  # never written
    sample = f[SAMPLE]
    f[EMB].dims[0].attach_scale(sample)
    f[EMB].dims[1].attach_scale(f[FEATURE])
    f[PRESENT].dims[0].attach_scale(sample)
    columns = dict(f[META].items()) if META in f else {}
    for name, ds in columns.items():
        ds.dims[0].attach_scale(sample)
        if name not in f:
            f[name] = ds
    if "key" in columns:
        f[EMB].attrs["coordinates"] = "key"


def _atomic_h5(path: str | os.PathLike, fill) -> None:
    """Run ``fill(h5py.File)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask like open() does
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _column_array(name: str, values, n: int) -> np.ndarray:
    if not name.strip() or "/" in name or "." in name:  # HDF5 would make groups ('a/b') or fail ('.')
        raise StoreError(f"meta column name {name!r} cannot be stored (empty, or holds '/' or '.'); rename it")
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise StoreError(f"meta column '{name}' has shape {arr.shape}, expected ({n},)")
    if arr.dtype.kind in "US" or arr.dtype == object:
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in arr], dtype=object)
    if arr.dtype.kind not in "biuf":
        raise StoreError(f"meta column '{name}': unsupported dtype {arr.dtype} (numbers or strings)")
    return arr


def write_part(path: str | os.PathLike, embeddings, meta: Mapping[str, Sequence],
               attrs: Mapping[str, str] | None = None) -> None:
    """Write one part: ``embeddings`` [n, D] (float16 stays float16, other floats → float32) and
    ``meta`` columns of length n; ``attrs`` (strings) pin its provenance (e.g. the shard's sha256).
    Atomic: readers see the old file or the complete new one."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise StoreError(f"embeddings must be [n, D], got shape {emb.shape}")
    if emb.dtype.kind != "f":
        raise StoreError(f"embeddings must be floating point, got {emb.dtype}")
    emb = emb if emb.dtype == np.float16 else emb.astype(np.float32, copy=False)
    n = emb.shape[0]
    cols = {str(k): _column_array(str(k), v, n) for k, v in meta.items()}

    def fill(f: h5py.File) -> None:
        f.create_dataset(EMB, data=emb)
        g = f.create_group(META)
        for k, arr in cols.items():
            g.create_dataset(k, data=arr, dtype=_STR if arr.dtype == object else arr.dtype)
        f.create_dataset(PRESENT, data=np.ones(n, dtype=np.uint8))
        _name_dimensions(f, n, emb.shape[1])
        f.attrs["icehpc_store"] = "part"
        for k, v in (attrs or {}).items():
            f.attrs[k] = str(v)

    _atomic_h5(path, fill)


def _describe_part(path: Path) -> tuple[int, int, np.dtype, dict[str, h5py.Datatype]]:
    if not path.exists():
        raise StoreError(f"part file {path} does not exist")
    with h5py.File(path, "r") as f:
        if EMB not in f:
            raise StoreError(f"{path}: no '{EMB}' dataset")
        e = f[EMB]
        if e.ndim != 2:
            raise StoreError(f"{path}: '{EMB}' has shape {e.shape}, expected [N, D]")
        cols = {k: f[META][k].dtype for k in f[META]} if META in f else {}
        for k in cols:
            if f[META][k].shape != (e.shape[0],):
                raise StoreError(f"{path}: meta/{k} has shape {f[META][k].shape}, expected ({e.shape[0]},)")
        return e.shape[0], e.shape[1], e.dtype, cols


def write_master(path: str | os.PathLike, part_paths: Sequence[str | os.PathLike]) -> None:
    """Master file whose datasets are virtual over ``part_paths`` in order (atomic).

    Parts must agree on D, the embedding dtype and the set of meta columns. Sources are recorded
    relative to the master's folder, so the store folder can be moved as a whole.
    """
    path = Path(path)
    parts = [Path(p) for p in part_paths]
    if not parts:
        raise StoreError("write_master: no part files given")
    info = [_describe_part(p) for p in parts]
    rows = [i[0] for i in info]
    d, dtype, cols = info[0][1], info[0][2], info[0][3]
    for p, (_, dp, tp, cp) in zip(parts, info):
        if dp != d:
            raise StoreError(f"embedding dimension mismatch: {parts[0]} has D={d}, {p} has D={dp}")
        if tp != dtype:
            raise StoreError(f"embedding dtype mismatch: {parts[0]} is {dtype}, {p} is {tp}")
        if set(cp) != set(cols):
            raise StoreError(f"meta columns differ: {parts[0]} has {sorted(cols)}, {p} has {sorted(cp)}")
    total = int(sum(rows))
    rel = [os.path.relpath(p.resolve(), path.resolve().parent) for p in parts]
    sums = [file_sha256(p) for p in parts]
    layouts = []
    for p in parts:
        with h5py.File(p, "r") as pf:
            layouts.append(json.dumps(_datasets(pf), sort_keys=True))

    def vds(f: h5py.File, name: str, dt, tail: tuple, fillvalue) -> None:
        layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dt)
        off = 0
        for src, n in zip(rel, rows):
            if n:
                layout[off:off + n] = h5py.VirtualSource(src, name, shape=(n, *tail), dtype=dt)
            off += n
        f.create_virtual_dataset(name, layout, fillvalue=fillvalue)

    def fill(f: h5py.File) -> None:
        vds(f, EMB, dtype, (d,), np.nan)
        for k, dt in cols.items():
            is_str = h5py.check_string_dtype(dt) is not None
            vds(f, f"{META}/{k}", _STR if is_str else dt, (), None if is_str else 0)
        vds(f, PRESENT, np.uint8, (), 0)
        _name_dimensions(f, total, d)
        f.attrs["icehpc_store"] = "master"
        f.attrs["parts"] = np.array(rel, dtype=_STR)
        f.attrs["part_rows"] = np.array(rows, dtype=np.int64)
        f.attrs["part_sha256"] = np.array(sums, dtype=_STR)
        f.attrs["part_datasets"] = np.array(layouts, dtype=_STR)

    _atomic_h5(path, fill)


@dataclass
class Store:
    """An open store (file handle kept open; use as a context manager or call :meth:`close`)."""

    path: Path
    n_rows: int
    dim: int
    columns: list[str]
    column_kinds: dict[str, str]  # column → "str" | "num"
    parts: list[Path] = field(default_factory=list)
    part_rows: list[int] = field(default_factory=list)
    #: sha256 of each part as recorded by the master (checked by open_store), and of the file opened
    part_sha256: list[str] = field(default_factory=list)
    sha256: str = ""
    _f: h5py.File | None = None

    def read(self, start: int, stop: int, columns: Sequence[str] | None = None,
             embeddings: bool = True) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """Rows [start, stop): (float32 [n, D] or None, {column: values}); strings come back as
        a numpy ``str`` array. Raises StoreError if any row maps to a missing part."""
        if not 0 <= start <= stop <= self.n_rows:
            raise StoreError(f"read({start}, {stop}) outside 0..{self.n_rows}")
        f = self._f
        assert f is not None, "store is closed"
        if self.parts:
            present = f[PRESENT][start:stop]
            if present.size and not present.all():
                bad = start + int(np.flatnonzero(present == 0)[0])
                raise StoreError(f"{self.path}: row {bad} maps to a missing or truncated part "
                                 f"({self._part_of(bad)}); re-run the stage that wrote the parts")
        emb = None
        if embeddings:
            emb = f[EMB][start:stop]
            emb = emb.astype(np.float32, copy=False)
        meta = {}
        for c in self.columns if columns is None else columns:
            if c not in self.column_kinds:
                raise StoreError(f"{self.path}: no meta column '{c}' (have {self.columns})")
            ds = f[META][c]
            if self.column_kinds[c] == "str":
                meta[c] = _read_text(ds, start, stop, self.path, c)
            else:
                meta[c] = ds[start:stop]
        return emb, meta

    def _part_of(self, row: int) -> str:
        ends = np.cumsum(self.part_rows)
        i = int(np.searchsorted(ends, row, side="right"))
        return str(self.parts[i]) if i < len(self.parts) else "?"

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_text(ds: h5py.Dataset, start: int | None, stop: int | None, path: Path, name: str) -> np.ndarray:
    """Rows [start, stop) of a string column as a numpy ``str`` array. Bytes are read as UTF-8,
    also where the dataset says ASCII (what h5py writes for numpy bytes, whatever they hold); bytes
    that are not UTF-8 text are a StoreError naming the column, not a traceback."""
    try:
        return ds.asstr(encoding="utf-8")[start:stop].astype(str)
    except UnicodeDecodeError as exc:
        bad = exc.object[max(0, exc.start - 4): exc.start + 4] if isinstance(exc.object, bytes) else b""
        raise StoreError(f"{path}: meta/{name} holds bytes that are not UTF-8 text (e.g. {bad!r}); rewrite that "
                         "column as UTF-8 strings (h5py.string_dtype('utf-8'))") from None


def _text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _check_part(path: Path, part: Path, rows: int, d: int, sha: str | None, layout: str | None) -> None:
    if not part.exists():
        raise StoreError(f"{path}: part {part} is missing (the master maps {rows} rows onto it); re-run "
                         "`icehpc embed` with the same arguments to recompute it")
    try:
        with h5py.File(part, "r") as pf:
            got = pf[EMB].shape if EMB in pf else None
            have = _datasets(pf)
    except OSError as exc:
        raise StoreError(f"{path}: part {part} is not a readable HDF5 file ({exc}); delete it and re-run "
                         "`icehpc embed` to recompute it") from None
    if got is None or got[0] != rows or got[1] != d:
        raise StoreError(f"{path}: part {part} has embeddings {got}, the master expects ({rows}, {d}); "
                         "it was rewritten after the master — rebuild the master")
    if layout is not None:
        want = json.loads(layout)
        if have != want:
            diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have.get(k))
            raise StoreError(f"{path}: part {part} datasets differ from what the master recorded ({diff[:4]}); "
                             "the part was edited or replaced: delete it and re-run `icehpc embed`")
    if sha is not None and file_sha256(part) != sha:
        raise StoreError(f"{path}: part {part} does not match the sha256 the master recorded: it was rewritten, "
                         "replaced or edited after the master; delete it and re-run `icehpc embed`")


def open_store_mpi(path: str | os.PathLike, comm: Any) -> Store:
    """:func:`open_store` for an MPI job: rank 0 verifies every part once (a bad part is the same
    StoreError on every rank), then each rank opens the store without reading the parts again."""
    from ..dist import run_on_root

    run_on_root(comm, lambda: open_store(path).close())
    return open_store(path, verify=False)


def open_store(path: str | os.PathLike, verify: bool = True) -> Store:
    """Open a master file, a single hand-written file, or a folder holding ``store.h5``.

    ``verify`` (default) checks every part of a master against the recorded checksum and datasets
    (reads every part once) and that the ``key`` column, where there is one, has no duplicates."""
    path = Path(path)
    if path.is_dir():
        if not (path / MASTER_NAME).exists():
            raise StoreError(f"store {path} is a folder without {MASTER_NAME}; give the .h5 file written by "
                             "`icehpc embed --out STORE.h5`")
        path = path / MASTER_NAME
    if not path.exists():
        raise StoreError(f"store {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        if EMB not in f:
            raise StoreError(f"{path}: no '{EMB}' dataset (schema: embeddings [N, D] + meta/<column>)")
        e = f[EMB]
        if not isinstance(e, h5py.Dataset) or e.ndim != 2 or e.dtype.kind != "f":
            got = f"{e.dtype} {e.shape}" if isinstance(e, h5py.Dataset) else "a group"
            raise StoreError(f"{path}: '{EMB}' must be a float [N, D] array, got {got}")
        n, d = int(e.shape[0]), int(e.shape[1])
        if d < 2:
            raise StoreError(f"{path}: '{EMB}' has D={d} feature(s) per row; directions (cosines, κ) need D ≥ 2")
        kinds: dict[str, str] = {}
        if META in f and not isinstance(f[META], h5py.Group):
            raise StoreError(f"{path}: '{META}' must be a group of columns meta/<column>, it is a dataset")
        if META in f:
            for k, ds in f[META].items():
                if not isinstance(ds, h5py.Dataset):
                    raise StoreError(f"{path}: {META}/{k} is a group; {META}/ holds only columns (length-N "
                                     f"datasets): move {META}/{k}/* up as {META}/<column>")
                if ds.shape != (n,):
                    raise StoreError(f"{path}: meta/{k} has shape {ds.shape}, expected ({n},)")
                if h5py.check_string_dtype(ds.dtype) is not None:
                    kinds[k] = "str"
                elif ds.dtype.kind in "biuf":
                    kinds[k] = "num"
                else:
                    raise StoreError(f"{path}: meta/{k} has unsupported dtype {ds.dtype}")
        parts: list[Path] = []
        rows: list[int] = []
        sums: list[str] = []
        if f.attrs.get("icehpc_store") == "master":
            try:
                rel = _text(f.attrs["parts"])
                rows = [int(r) for r in f.attrs["part_rows"]]
                sums = _text(f.attrs["part_sha256"]) if "part_sha256" in f.attrs else []
                layouts = _text(f.attrs["part_datasets"]) if "part_datasets" in f.attrs else []
            except (KeyError, TypeError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                raise StoreError(f"{path}: the master's part list is damaged ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:120]}); rebuild it with `icehpc embed`") from None
            if len(rows) != len(rel):
                raise StoreError(f"{path}: the master lists {len(rel)} parts but {len(rows)} row counts; rebuild it "
                                 "with `icehpc embed`")
            parts = [(path.parent / r) for r in rel]
            for i, (p, r) in enumerate(zip(parts, rows)):
                _check_part(path, p, r, d, sums[i] if verify and sums else None, layouts[i] if layouts else None)
            if sum(rows) != n:
                raise StoreError(f"{path}: parts hold {sum(rows)} rows but the master has {n}")
        store = Store(path=path, n_rows=n, dim=d, columns=sorted(kinds), column_kinds=kinds,
                      parts=parts, part_rows=rows, part_sha256=sums, sha256=file_sha256(path), _f=f)
        if verify and kinds.get("key") == "str" and n:
            keys = _read_text(f[META]["key"], None, None, path, "key")
            uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
            if len(uniq) != n:
                dup = uniq[counts > 1][:3].tolist()
                rows_at = [store._part_of(int(first[counts > 1][0]))] if parts else [str(path)]
                raise StoreError(f"{path}: sample keys occur more than once ({dup}, e.g. in {rows_at[0]}): a part "
                                 "was copied or shards hold duplicate keys; delete the duplicated part and re-run "
                                 "`icehpc embed`")
        return store
    except BaseException:
        f.close()
        raise
