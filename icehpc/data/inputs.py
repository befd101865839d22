"""Shard inputs: scanning folder trees, zips and CSV manifests into :class:`Item` s (labels, metadata
under the per-column policy, confinement to the input folders) and reading each input once, capped.

Part of ``icehpc shards build`` (see :mod:`icehpc.data.shards` for the whole contract)."""
from __future__ import annotations

import csv
import dataclasses
import errno
import math
import os
import re
import stat
import sys
import unicodedata
import zipfile
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import config as cfg
from .format import FLOAT_KEYS, IDENTITY_KEYS, PROVENANCE_KEYS


MISSING_TEXT = frozenset({"", "na", "n/a", "nan", "null", "none"})
#: Names the tool itself writes into every sample's JSON or the embedding store: a manifest column
#: of that name would silently replace them (``key``/``shard`` are the store's sample identity).
RESERVED_COLUMNS = frozenset(IDENTITY_KEYS + PROVENANCE_KEYS)
_COLUMN_RE = re.compile(r"[^\W][\w \-()]*")  # word characters, space, - and (): safe in HDF5, HTML, files
_MAX_DEPTH = 64  # folder nesting followed below an input (links included)


class Reject(Exception):
    """An input that cannot become a sample: ``reason`` is a short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Item:
    """One input file. ``where``: a filesystem path, or (zip path, member index)."""
    ordinal: int
    input_name: str
    source_path: str          # printable, location-independent: "<input name>/<path inside>"
    where: str | tuple[str, int]
    meta: dict[str, Any]
    reject: tuple[str, str] | None = None
    sha256: str | None = None                 # from the check pass
    spool: tuple[int, int, int] = (0, 0, 0)   # (chunk, offset, length) of its spooled tar members
    #: real input roots when the item's folder lies inside them: its last path component, if a link,
    #: is resolved and confined when it is opened (O_NOFOLLOW), so scanning costs no stat per file
    confine: tuple[str, ...] | None = None


def printable(path: str) -> str:
    """A path with non-UTF-8 bytes shown as ``\\xNN`` (valid JSON/UTF-8 everywhere)."""
    return path if path.isascii() else os.fsencode(path).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- scanning inputs
def _descend(tops: dict[str, bool], children: Any) -> list[str]:
    """Prefix parts to strip: descend while the only top entry is a folder that holds folders."""
    prefix: list[str] = []
    while len(tops) == 1:
        (name, is_dir), = tops.items()
        sub = children(prefix + [name])
        if not is_dir or not any(sub.values()):
            break
        prefix.append(name)
        tops = sub
    return prefix


def _walk(base: str, exclude: str | None = None) -> list[tuple[str, tuple[str, str] | None]]:
    """(full path, rejection or None) for every non-folder entry below ``base``, folder links followed.

    A link is followed once per occurrence; one that points at a folder on the current path (a
    loop) becomes a ``symlink_loop`` entry, a folder that cannot be listed an ``unreadable`` one,
    so nothing below ``base`` goes uncounted."""
    found: list[tuple[str, tuple[str, str] | None]] = []

    def visit(folder: str, ancestors: frozenset[str], depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            found.append((folder, ("unreadable", f"cannot list folder: {exc}")))
            return
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                is_dir = False
            if not is_dir:
                found.append((e.path, None))
                continue
            real = os.path.realpath(e.path)
            if real == exclude:  # the build's own output folder inside an input: not an input
                continue
            if real in ancestors:
                found.append((e.path, ("symlink_loop", f"folder link to {printable(real)} points back at a folder "
                                                       "being walked; not followed")))
            elif depth >= _MAX_DEPTH:
                found.append((e.path, ("unreadable", f"folders nested deeper than {_MAX_DEPTH}; not followed")))
            else:
                visit(e.path, ancestors | {real}, depth + 1)

    visit(base, frozenset({os.path.realpath(base)}), 0)
    return found


def _tree_items(root: Path, exclude: str | None = None) -> Iterator[tuple[str, str, str, tuple[str, str] | None]]:
    """(path below the label root, path below ``root``, full path, rejection) per entry, byte-sorted."""
    def children(parts: list[str]) -> dict[str, bool]:
        d = root.joinpath(*parts)
        return {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(d)}

    prefix = _descend(children([]), children)
    base = root.joinpath(*prefix)
    found = [(os.path.relpath(full, base), full, rej) for full, rej in _walk(str(base), exclude)]
    found.sort(key=lambda x: os.fsencode(x[0]))
    for rel, full, rej in found:
        yield rel, os.path.relpath(full, root), full, rej


def _zip_items(path: Path) -> Iterator[tuple[str, str, int]]:
    """(path below the label root, member name, member index) per file member, sorted."""
    with zipfile.ZipFile(path) as z:
        infos = list(z.infolist())
    entries = [(zi.filename.strip("/").split("/"), zi.is_dir()) for zi in infos]

    def children(parts: list[str]) -> dict[str, bool]:
        n, out = len(parts), {}
        for p, is_dir in entries:
            if len(p) > n and p[:n] == parts:
                out[p[n]] = out.get(p[n], False) or len(p) > n + 1 or is_dir
        return out

    skip = len(_descend(children([]), children))
    rows = [("/".join(p[skip:]), zi.filename, i)
            for i, ((p, is_dir), zi) in enumerate(zip(entries, infos)) if not is_dir]
    rows.sort(key=lambda r: (r[0].encode("utf-8", "surrogateescape"), r[2]))
    yield from rows


#: A number in a float column: ASCII decimal or scientific notation only (Python's float() also takes
#: ``1_000`` and non-ASCII digits such as ``٣``, which no other reader of the metadata would).
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf(?:inity)?", re.ASCII | re.IGNORECASE)
#: Longest manifest cell (path or metadata) accepted: the csv module's own default field limit.
MAX_CELL = 128 * 1024


def _parse_float(column: str, text: str) -> float | None:
    """A stripped cell of a float column → its value, None when missing, or :class:`Reject`."""
    if text.lower() in MISSING_TEXT:
        return None
    if not _NUMBER_RE.fullmatch(text):
        raise Reject("bad_metadata", f"column {column}: {text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise Reject("bad_metadata", f"column {column}: {text!r} is not finite")
    return value


def _check_cell(column: str, text: str) -> None:
    """Refuse a value that a later stage cannot store (HDF5/netCDF strings hold no NUL) or that is
    absurdly long: the row is rejected with a reason instead of crashing a later stage."""
    if len(text) > MAX_CELL:
        raise Reject("bad_metadata", f"column {column}: {len(text)} characters > {MAX_CELL}")
    if "\0" in text:
        raise Reject("bad_metadata", f"column {column}: holds a NUL character, which HDF5 and netCDF strings "
                                     "cannot store")


def _row_meta(row: dict[str, str], label_column: str) -> dict[str, Any]:
    """Typed metadata of one manifest row under the per-column policy (module docstring)."""
    meta: dict[str, Any] = {}
    for column, raw in row.items():
        if column == "path":
            continue
        if column is None:  # csv.DictReader's bin for cells beyond the header
            raise Reject("bad_metadata", f"{len(raw)} more cell(s) than the header has columns")
        column, text = printable(column), printable((raw or "").strip())  # CSV bytes that are not UTF-8
        if len(text) > MAX_CELL or "\0" in text:
            _check_cell(column, text)
        if column in FLOAT_KEYS:
            meta[column] = _parse_float(column, text)
        elif not text:  # strings: only an empty cell is missing ("NA", "none" are kept as written)
            meta[column] = None
        elif column == "time":
            try:
                datetime.fromisoformat(text)
            except ValueError:
                raise Reject("bad_metadata", f"column time: {text!r} is not ISO 8601") from None
            meta[column] = text
        else:
            meta[column] = text
    if meta.get(label_column):
        meta[label_column] = _label(meta[label_column])
    if not meta.get(label_column):
        raise Reject("missing_label", f"label column {label_column!r} is empty or absent")
    return meta


def _label(text: str) -> str:
    """A class name in Unicode NFC: the NFC and NFD spellings of one folder name (macOS writes NFD)
    look identical and must be one class."""
    return unicodedata.normalize("NFC", text)


#: A folder given as INPUT that holds this file is read through it (labels and metadata from the CSV).
MANIFEST_NAME = "manifest.csv"


def _inside(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _outside(path: str) -> Reject:
    return Reject("outside_root", f"resolves to {printable(os.path.realpath(path))}, outside the input "
                                  "folders; pass --allow-outside to read it")


def _confine(item: Item, roots: tuple[str, ...], real_dirs: dict[str, str]) -> None:
    """Reject a filesystem item whose real path (links resolved) is outside every input root.

    The item's folder is resolved once per folder (``real_dirs``); when it is inside, only the last
    component can still lead outside, and :func:`read_source` checks that as it opens the file."""
    if item.reject is not None or not isinstance(item.where, str):
        return
    folder = os.path.dirname(item.where)
    real = real_dirs.get(folder)
    if real is None:
        real = real_dirs[folder] = os.path.realpath(folder)
    if any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        item.confine = roots
    elif not _inside(item.where, list(roots)):
        exc = _outside(item.where)
        item.reject = (exc.reason, exc.detail)


def scan(inputs: list[str], label_column: str, manifests: Iterable[str] = (),
         allow_outside: bool = False, exclude: str | os.PathLike | None = None) -> list[Item]:
    """Every input file as an :class:`Item`, in a deterministic order (inputs as given, then sorted).

    Unless ``allow_outside``, files must resolve inside the given folders or the manifests' folders.
    ``exclude`` (the output folder) is skipped where it lies inside an input folder."""
    exclude = os.path.realpath(exclude) if exclude is not None else None
    items: list[Item] = []
    manifest_set = {str(m) for m in manifests}
    given_all = [*inputs, *manifests]
    # roots: the folder inputs and the manifests' folders (a zip's folder is not an input root)
    roots = tuple(os.path.realpath(g) if Path(g).is_dir() else os.path.realpath(Path(g).parent)
                  for g in given_all if Path(g).is_dir() or str(g) in manifest_set or Path(g).suffix.lower() == ".csv")
    real_dirs: dict[str, str] = {}
    for given in given_all:
        path = Path(given)
        name = printable(path.resolve().name)
        start = len(items)
        if str(given) in manifest_set or path.suffix.lower() == ".csv":
            items += _scan_manifest(path, name, label_column, len(items))
        elif path.is_dir() and (path / MANIFEST_NAME).is_file():
            # `synth` output and hand-made datasets: the manifest holds the labels and metadata
            print(f"shards: {given} holds {MANIFEST_NAME}: using it as the manifest "
                  f"(same as --manifest {path / MANIFEST_NAME})", file=sys.stderr, flush=True)
            items += _scan_manifest(path / MANIFEST_NAME, MANIFEST_NAME, label_column, len(items))
        elif path.is_dir():
            for rel, below, full, rej in _tree_items(path, exclude):
                parts = Path(rel).parts
                item = Item(len(items), name, f"{name}/{printable(below)}", full, {})
                if rej is not None:
                    item.reject = rej
                elif len(parts) < 2:
                    item.reject = ("no_label", "file is not inside a label folder")
                else:
                    item.meta[label_column] = _label(printable(parts[0]))
                items.append(item)
        elif path.is_file() and zipfile.is_zipfile(path):
            try:
                members = list(_zip_items(path))
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise cfg.ConfigError(f"input {given}: zip archive is corrupt ({exc}); re-download or repair it "
                                      "(zip -FF)") from None
            for rel, member, index in members:
                parts = rel.split("/")
                item = Item(len(items), name, f"{name}/{printable(member)}", (str(path), index), {})
                if len(parts) < 2:
                    item.reject = ("no_label", "file is not inside a label folder")
                else:
                    item.meta[label_column] = _label(parts[0])
                items.append(item)
        elif path.is_file() and path.suffix.lower() == ".zip":
            raise cfg.ConfigError(f"input {given}: zip archive is truncated or corrupt (no central directory "
                                  "found); re-download it or repair it (zip -FF) and pass the repaired file")
        elif not path.exists():
            raise cfg.ConfigError(f"input {given}: does not exist")
        else:
            raise cfg.ConfigError(f"input {given}: not a folder, a .zip or a .csv manifest")
        if not allow_outside:
            for item in items[start:]:
                _confine(item, roots, real_dirs)
    return items


def check_column_names(names: list[str], where: str) -> None:
    """Raise ConfigError for a manifest header the shards and the store cannot carry faithfully."""
    seen: set[str] = set()
    for raw in names:
        name = "" if raw is None else raw.strip()
        if name in seen:
            why = "occurs twice in the header"
        elif name in RESERVED_COLUMNS:
            why = "is set by icehpc itself (reserved names: " + ", ".join(sorted(RESERVED_COLUMNS)) + ")"
        elif name.startswith("__"):
            why = "starts with '__' (reserved for webdataset)"
        elif not _COLUMN_RE.fullmatch(name):
            why = "is not a plain name (use letters, digits, '_', '-', '(', ')' and spaces; no '/' or '.')"
        else:
            seen.add(name)
            continue
        raise cfg.ConfigError(f"manifest {where}: column name {printable(name)!r} {why}; rename that column")


def _scan_manifest(path: Path, name: str, label_column: str, start: int) -> list[Item]:
    if not path.is_file():
        raise cfg.UserError(f"manifest {path} " + ("is a folder, not a CSV file" if path.is_dir() else
                                                    "does not exist") + "; check the path")
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames or label_column not in reader.fieldnames:
            hint = ("" if not reader.fieldnames or label_column in reader.fieldnames else
                    "; if the class is in another column, name it with --label-column COLUMN "
                    "(pipeline: data.label_column=COLUMN)")
            raise cfg.ConfigError(f"manifest {path}: needs a 'path' and a {label_column!r} column "
                                  f"(has {reader.fieldnames}){hint}")
        check_column_names(list(reader.fieldnames), str(path))
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, path.stat().st_size + 1))  # long cells are rejected per row below
        try:
            rows = list(reader)
        finally:
            csv.field_size_limit(limit)
    items, parent = [], str(path.parent)
    for row in rows:
        rel = (row.get("path") or "").strip()
        if len(rel) > MAX_CELL:
            rel = rel[:64] + "…"  # the row is rejected below; keep the log line short
        full = os.path.join(parent, rel)
        item = Item(start + len(items), name, f"{name}/{printable(rel)}", full, {})
        try:
            if not rel:
                raise Reject("unreadable", "empty path cell")
            _check_cell("path", (row.get("path") or "").strip())
            item.meta = _row_meta(row, label_column)
        except Reject as exc:
            item.reject = (exc.reason, exc.detail)
        items.append(item)
    return items


# ---------------------------------------------------------------- reading and normalising
_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _read_capped(f: Any, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of ``f``, in 1 MiB reads: a stream longer than it claims (a
    zip member, a file growing, a device) can never cost more memory than the cap."""
    parts, total = [], 0
    while True:
        block = f.read(min(1 << 20, max_bytes + 1 - total))
        if not block:
            return b"".join(parts)
        parts.append(block)
        total += len(block)
        if total > max_bytes:
            raise Reject("too_large", f"more than max_file_bytes {max_bytes}")


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def read_source(item: Item, max_bytes: int, facts: list | None = None) -> bytes:
    """The bytes of one input (raises :class:`Reject`); zips are opened once per process.
    ``facts``: gets the file's (size, mtime_ns) from the fstat the read does anyway.

    Files are opened non-blocking (a FIFO cannot hang the build) and must be regular files."""
    try:
        if isinstance(item.where, tuple):
            zpath, index = item.where
            z = _ZIPS.get((os.getpid(), zpath))
            if z is None:
                z = _ZIPS[(os.getpid(), zpath)] = zipfile.ZipFile(zpath)
            info = z.infolist()[index]
            if info.file_size > max_bytes:  # zipfile never inflates past the declared size
                raise Reject("too_large", f"{info.file_size} bytes > max_file_bytes {max_bytes}")
            with z.open(info) as f:
                data = _read_capped(f, max_bytes)
        else:
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(item.where, flags | (os.O_NOFOLLOW if item.confine is not None else 0))
            except OSError as exc:  # ELOOP under O_NOFOLLOW: the name is a link; confine where it leads
                if exc.errno != errno.ELOOP or item.confine is None:
                    raise
                if not _inside(item.where, list(item.confine)):
                    raise _outside(item.where) from None
                fd = os.open(item.where, flags)
            with open(fd, "rb", buffering=0) as f:
                st = os.fstat(fd)
                if facts is not None:
                    facts[:] = [st.st_size, st.st_mtime_ns]
                if not stat.S_ISREG(st.st_mode):
                    kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
                    raise Reject("not_regular", f"{kind}, not a regular file; not read")
                if st.st_size > max_bytes:
                    raise Reject("too_large", f"{st.st_size} bytes > max_file_bytes {max_bytes}")
                # one read() of the whole file; a short read is the end of a regular file, and only a
                # file that grew (or shrank) since the fstat costs more reads
                data = f.read(st.st_size + 1)
                if len(data) > max_bytes:
                    raise Reject("too_large", f"more than max_file_bytes {max_bytes}")
                if len(data) != st.st_size:
                    data += _read_capped(f, max_bytes - len(data))
    except (OSError, RuntimeError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise Reject("unreadable", f"{type(exc).__name__}: {exc}") from None
    if len(data) > max_bytes:  # grew while being read
        raise Reject("too_large", f"more than max_file_bytes {max_bytes}")
    if not data:
        raise Reject("empty", "zero bytes")
    return data
