"""WebDataset shards from folder trees, zips or CSV manifests: ``icehpc shards build|verify|stats``.

Output of ``build INPUT... --out DIR``:

- ``DIR/shard-000000.tar …``: per sample ``<key>.png`` (8-bit grayscale) and ``<key>.json`` (all
  metadata + ``source_path``, ``source_sha256``, ``orig_width``, ``orig_height``, ``conversion``).
  Keys are the sample's position in the sorted input listing (``000000042``): no dots, stable
  under ``--shuffle``. Tar members carry fixed mtime/owner/mode, so a build is byte-reproducible.
- ``DIR/rejected.jsonl``: one ``{"path", "input", "reason", "detail"}`` per rejected input.
- ``DIR/index.json``: shards (samples, bytes, sha256), label vocabulary, the command and config,
  the accounting ``inputs == written + rejected`` (checked; the build fails if it does not hold).

Inputs. A folder tree or ``.zip`` where the first-level folder is the label (stored under
``--label-column``, default ``habit``); a tree whose only top-level entry is one folder that itself
holds folders is descended into (``DS_training_data/Class (01) Pri/x.png`` → ``Class (01) Pri``).
Every directory entry is ingested or written to ``rejected.jsonl``: a folder link is followed once
(``symlink_loop`` when it points back at a folder being walked), anything that is not a regular file
(device, FIFO, socket) is ``not_regular``, a broken link is ``unreadable``. A ``.csv`` input (or
``--manifest``) is a manifest: a ``path`` column (relative to the CSV's folder) plus metadata
columns, rows kept in file order. Column names must be plain (letters, digits, ``_ - ( )`` and
spaces; no ``/`` or ``.``) and must not shadow the names the tool sets itself (``key``, ``shard``,
``source_path`` …): a bad header is a config error before any work.

Confinement: a file (through any link) or manifest path must resolve inside one of the given input
folders or manifest folders; otherwise it is rejected as ``outside_root`` unless ``--allow-outside``
is given (``/etc/passwd``, ``../outside.png`` and ``/dev/zero`` in a manifest never get read).
A folder that holds a ``manifest.csv`` (``icehpc synth`` output) is read through that manifest, and
says so.

Per-column policy for manifest values: the label column must be non-empty (else ``missing_label``);
float columns (temperature_c, pressure_hpa, particle_width_um, particle_height_um, pixel_um) accept
ASCII numbers (not ``1_000`` or non-ASCII digits), and empty/NA/NaN/null mean *unknown* (stored as
null); anything else, or ±inf, rejects the sample (``bad_metadata``); ``time`` must be ISO 8601 when
present; other columns (the label included) are kept as strings, ``NA`` and ``none`` too; only an
empty cell is null. A row with more cells than the header, a cell over 128 KiB or a NUL character
(which HDF5 and netCDF strings cannot hold) is rejected (``bad_metadata``), never a crash later. ``--probe``/``--pixel-um`` fill ``probe``/``pixel_um`` where unknown.

Hostile inputs are rejected with a reason and never stop the build: ``empty``, ``unreadable``,
``too_large``, ``no_label``, ``not_image``, ``corrupt`` (truncated, bad CRC/zlib/JPEG data),
``decompression_bomb`` (declared pixels > ``max_pixels``, checked before decoding),
``unsupported_mode`` (float images or 32-bit integers beyond 16 bits), ``duplicate`` (same sha256
as an earlier input), ``not_regular``, ``outside_root``, ``symlink_loop``. Every input (file or zip
member) is read in bounded chunks, never more than ``max_file_bytes + 1`` bytes. Faithful conversions are applied instead and listed in ``conversion``:
EXIF orientation, 16-bit → 8-bit (v/257; values that use only 8, 10, 12 or 14 bits of a 16/32-bit container are
scaled by that depth, e.g. 12-bit data by v·255/4095, 8-bit values kept), alpha composited over white, palette/RGB/CMYK → luma,
first frame of multi-frame files. An 8-bit grayscale PNG is stored byte-for-byte, unless
``--polarity`` (default auto) inverts it: every shard holds dark particles on a light field.

How: pass 1 reads every input once (parallel over chunks of the sorted inputs), hashes and
validates it and spools its finished tar members in ``DIR/.work`` (scratch as large as the output,
deleted at the end); then duplicates are dropped and the sample→shard plan is fixed from the sorted
inputs (+ seed); pass 2 concatenates spooled members into shards (parallel over shards). Every
file is written under a temporary name and renamed; a rerun of the same command skips committed
chunks and shards, so a build killed at any point (SIGKILL included) ends byte-identical to an
uninterrupted one, whatever ``--workers``. Rerunning a finished build re-checks the inputs and
leaves the output untouched if nothing changed; a shard deleted or altered since is rebuilt.
One build at a time per ``--out``: the folder is locked (``DIR/.lock``); a second build stops at once
naming the holder's host and PID.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import sys
import tarfile
import unicodedata
import warnings
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import config as cfg
from ..contract import Status
from ..fileio import file_sha256, lock_dir, write_atomic
from .format import (CONTRACT, FLOAT_KEYS, FORMAT, IDENTITY_KEYS, INDEX, METADATA_KEYS, PROVENANCE_KEYS, REJECTED,
                     SHARD_GLOB, SHARD_RE, SOURCES, STATS, WORK, iter_samples, sample_key, shard_name)

MISSING_TEXT = frozenset({"", "na", "n/a", "nan", "null", "none"})
ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM")  # never e.g. EPS (runs Ghostscript)
TAR_MTIME = 946684800  # 2000-01-01: fixed so builds are byte-identical (0 makes GNU tar warn)
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
class BuildConfig:
    label_column: str = cfg.field("habit", help="metadata key that holds the class (folder name for trees/zips)")
    probe: str | None = cfg.field(None, help="probe name stored where the input gives none")
    pixel_um: float | None = cfg.field(None, help="pixel size (µm) stored where the input gives none")
    shard_samples: int = cfg.field(1000, help="at most this many samples per shard")
    shard_bytes: int = cfg.field(64 * 2**20, help="at most this many bytes per shard (one sample may exceed it)")
    shuffle: bool = cfg.field(False, help="seeded shuffle of samples across shards")
    seed: int = cfg.field(0, help="seed of --shuffle")
    max_pixels: int = cfg.field(2**25, help="reject images declaring more pixels (decompression bombs)")
    max_file_bytes: int = cfg.field(64 * 2**20, help="reject source files larger than this")
    duplicates: Literal["reject", "keep"] = cfg.field("reject", help="byte-identical inputs after the first")
    polarity: Literal["auto", "keep", "invert"] = cfg.field(
        "auto", help="auto: invert images whose border is dark (light particle on dark field) so every shard "
                     "holds dark particles on a light background; keep; invert (recorded in 'conversion')")

    def validate(self) -> None:
        if self.shard_samples < 1 or self.shard_bytes < 1:
            raise ValueError("shard_samples and shard_bytes must be >= 1")
        if not self.label_column or "." in self.label_column:
            raise ValueError("label_column must be a non-empty key without dots")
        if self.polarity not in ("auto", "keep", "invert"):
            raise ValueError(f"polarity must be auto, keep or invert, got {self.polarity!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {self.seed}")
        if self.pixel_um is not None and not (math.isfinite(self.pixel_um) and self.pixel_um > 0):
            raise ValueError(f"pixel_um must be a finite number > 0, got {self.pixel_um}")
        if self.max_pixels < 1 or self.max_file_bytes < 1:
            raise ValueError("max_pixels and max_file_bytes must be >= 1")


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
    if text.strip().lower() in MISSING_TEXT:
        return None
    if not _NUMBER_RE.fullmatch(text.strip()):
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
            raise cfg.ConfigError(f"manifest {path}: needs a 'path' and a {label_column!r} column "
                                  f"(has {reader.fieldnames})")
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


def _to_gray(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any decoded mode → 8-bit 'L' by a faithful conversion, or :class:`Reject`."""
    mode = im.mode
    if (mode in ("L", "P", "1") and "transparency" in im.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append(f"{mode}_alpha_over_white")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    if mode == "L":
        return im
    if mode in ("1", "P"):
        notes.append(f"{mode}_to_gray")
        return im.convert("L")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise Reject("unsupported_mode", f"{mode} values outside 0..65535")
        # scaled by the bit depth the values actually use (8, 10, 12, 14 or 16 bits), not by the
        # container: 8-bit values in an int32 TIFF or 12-bit data in 16 bits would come out black
        bits = next(b for b in (8, 10, 12, 14, 16) if int(a.max()) < 1 << b)
        if bits == 8:
            notes.append(f"{mode.replace(';', '')}_8bit_values_kept")
            return Image.fromarray(a.astype(np.uint8), "L")
        top = (1 << bits) - 1
        notes.append("16bit_to_8bit" if bits == 16 else f"{bits}bit_in_{mode.replace(';', '')}_to_8bit")
        return Image.fromarray(((a.astype(np.uint32) * 255 + top // 2) // top).astype(np.uint8), "L")
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        notes.append(f"{mode}_to_gray")
        return im.convert("RGB").convert("L")
    raise Reject("unsupported_mode", f"image mode {mode} has no faithful 8-bit grayscale conversion")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type
#: Chunks an 8-bit grayscale PNG may hold and still be stored byte-for-byte: every reader (Pillow
#: in the loader included) handles them without decompressing anything. Any other chunk (tRNS,
#: eXIf, acTL, and the compressed zTXt/iTXt/iCCP a decompression bomb hides in) sends the image
#: through Pillow's full decode under its caps and a re-encode.
_PLAIN_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"sBIT", b"bKGD", b"tEXt"}
_MAX_PLAIN_TEXT = 1 << 20  # tEXt bytes a plain PNG may carry (Pillow's per-chunk limit, MAX_TEXT_CHUNK)
_IEND = b"\0\0\0\0IEND\xaeB`\x82"


@dataclasses.dataclass
class PngCheck:
    """What :func:`check_png` proved of a PNG: its size, whether it is stored byte-for-byte
    (``plain``), and its inflated (filtered) image data and chunk spans, so that nothing inflates it again."""
    width: int
    height: int
    plain: bool
    raw: bytes
    idat_spans: list[tuple[int, int]]   # (start, end) of each IDAT chunk in the file

    def pixels(self) -> np.ndarray:
        """uint8 [H, W] of a plain PNG: Pillow's C unfilter over the already inflated rows (wrapped in
        a stored, uncompressed zlib stream: a copy, not a second inflate)."""
        im = Image.frombytes("L", (self.width, self.height), zlib.compress(self.raw, 0), "zip", "L")
        return np.frombuffer(im.tobytes(), np.uint8).reshape(self.height, self.width)  # read-only view

    def light_field(self) -> bool:
        """True when row 0 and column 0 of a plain PNG are all light (>= 128), read from the inflated
        rows without unfiltering the rest. Those are w + h - 1 of the 2w + 2h - 4 border pixels, more
        than half, so the border median is light and :func:`dark_border` is False: ``auto`` keeps the
        image without decoding it further. False when it cannot tell (an Avg-filtered row 0 or
        column 0 step, or a dark pixel there)."""
        w, h = self.width, self.height
        if min(w, h) < 3:
            return False
        r = np.frombuffer(self.raw, np.uint8).reshape(h, w + 1)
        f = r[:, 0]
        if f[0] == 3 or (f[1:] == 3).any():  # Avg: a halving recurrence; let the full decode decide
            return False
        # row 0 (no prior row): Sub and Paeth predict from the left pixel, None and Up from nothing
        row0 = np.cumsum(r[0, 1:], dtype=np.uint8) if f[0] in (1, 4) else r[0, 1:]
        if row0.min() < 128:
            return False
        # column 0 (no left pixel): Up and Paeth predict from the pixel above, None and Sub from nothing
        reset = f <= 1
        reset[0] = True
        c = np.cumsum(r[:, 1].astype(np.int64))
        last = np.maximum.accumulate(np.where(reset, np.arange(h), 0))
        col0 = (c - np.where(last > 0, c[last - 1], 0)) & 255
        return int(col0.min()) >= 128

    def stored_idat(self, data: bytes) -> bytes:
        """``data`` with its IDAT chunks replaced by one holding the inflated rows uncompressed:
        the same image to any reader, decoded without inflating the original stream again."""
        z = zlib.compress(self.raw, 0)
        chunk = len(z).to_bytes(4, "big") + b"IDAT" + z + zlib.crc32(b"IDAT" + z).to_bytes(4, "big")
        (first, _), (_, last) = self.idat_spans[0], self.idat_spans[-1]
        between = b"".join(data[e:s] for (_, e), (s, _) in zip(self.idat_spans, self.idat_spans[1:]))
        return data[:first] + chunk + between + data[last:]


def check_png(data: bytes, max_pixels: int) -> PngCheck | None:
    """Structural check of a PNG, inflating its image data exactly once (the caller decodes from it).

    Returns a :class:`PngCheck`: ``plain`` for an 8-bit grayscale, non-interlaced PNG holding only
    :data:`_PLAIN_CHUNKS`. Returns None when ``data`` is not a PNG with a valid IHDR (Pillow then
    decides). Raises :class:`Reject` for a bomb, a bad chunk CRC, truncation, a zlib stream that does
    not end (Adler-32) or inflates to the wrong length, or an invalid row filter: what passes decodes
    in any conforming reader.
    """
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, compression, filtering, interlace = data[24:29]
    if colour not in _PNG_CHANNELS or compression or filtering or interlace > 1 or not 0 < w * h:
        return None
    if w * h > max_pixels:
        raise Reject("decompression_bomb", f"declares {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    pos, n = 8, len(data)
    idat, spans, plain, seen_iend, text = [], [], depth == 8 and colour == 0 and interlace == 0, False, 0
    crc32 = zlib.crc32
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        tag, end = data[pos + 4:pos + 8], pos + 12 + length
        if end > n:
            raise Reject("corrupt", f"PNG truncated inside chunk {tag!r}")
        if crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise Reject("corrupt", f"PNG chunk {tag!r} fails its CRC")
        if tag == b"IDAT":
            idat.append(data[pos + 8:end - 4])
            spans.append((pos, end))
        elif tag == b"IEND":
            seen_iend = True
            break
        elif tag == b"tEXt":
            text += length
        plain = plain and tag in _PLAIN_CHUNKS
        pos = end
    if not seen_iend or not idat:
        raise Reject("corrupt", "PNG truncated (no IEND)" if not seen_iend else "PNG without IDAT")
    row = 1 + (w * depth * _PNG_CHANNELS[colour] + 7) // 8
    expected = h * row if interlace == 0 else None
    inflater = zlib.decompressobj()
    try:  # bounded output: Adam7 passes add at most a few filter bytes per row
        raw = inflater.decompress(idat[0] if len(idat) == 1 else b"".join(idat), (expected or 2 * h * row + 64) + 1)
    except zlib.error as exc:
        raise Reject("corrupt", f"PNG image data: zlib: {exc}") from None
    if not inflater.eof:
        raise Reject("corrupt", "PNG image data: zlib stream does not end")
    if expected is not None and (len(raw) != expected or max(raw[::row]) > 4):
        raise Reject("corrupt", f"PNG image data: {len(raw)} bytes for {expected} expected, or bad row filters")
    return PngCheck(w, h, plain and text <= _MAX_PLAIN_TEXT, raw, spans)


def dark_border(gray: Image.Image | np.ndarray) -> bool:
    """True when an 'L' image shows a light particle on a dark field: its border (the field) is
    dark (median < 128) and uniform (≥ 90 % of border pixels within 32 levels of the median), and
    something in it is brighter by ≥ 64 levels. Images too small to have an interior, noise, or a
    featureless frame are left alone (``auto`` then keeps them)."""
    a = np.asarray(gray)
    if min(a.shape) < 3:
        return False
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    if border.min() >= 128:  # a light field (the common case): its median is light too
        return False
    # median of uint8 values by counting (same value as np.median, rounded down like int())
    counts = np.bincount(border, minlength=256)
    cum = np.cumsum(counts)
    m = border.size
    lo = int(np.searchsorted(cum, (m - 1) // 2 + 1))
    hi = int(np.searchsorted(cum, m // 2 + 1))
    level = (lo + hi) // 2
    if level >= 128:
        return False
    near = int(cum[min(255, level + 32)]) - (int(cum[level - 33]) if level >= 33 else 0)
    return near / m >= 0.9 and int(a.max()) - level >= 64  # the same float test as np.mean(...) >= 0.9


def apply_polarity(png: bytes, gray: Image.Image | np.ndarray | None, polarity: str, notes: list[str]) -> bytes:
    """The stored convention is a dark particle on a light field (synthetic CPI data, the canvas
    padding). ``auto`` inverts an image whose border is dark, ``invert`` every image, ``keep`` none;
    an inversion re-encodes the PNG and is listed in ``notes`` (the sample's ``conversion``).
    ``gray``: the decoded pixels of ``png`` (decoded here when None)."""
    if polarity == "keep":
        return png
    if gray is None:
        gray = Image.open(io.BytesIO(png), formats=("PNG",))
        gray.load()
    if polarity == "auto" and not dark_border(gray):
        return png
    notes.append("inverted_auto_dark_border" if polarity == "auto" else "inverted")
    buf = io.BytesIO()
    Image.fromarray(255 - np.asarray(gray.convert("L") if isinstance(gray, Image.Image) else gray), "L").save(
        buf, format="PNG")
    return buf.getvalue()


def _pil_error(exc: Exception) -> Reject:
    """A Pillow failure as a rejection: its own caps (text chunks, ICC profiles) are bombs."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Image.DecompressionBombError) or "too large" in str(exc).lower() \
            or "too much memory" in str(exc).lower():
        return Reject("decompression_bomb", text)
    return Reject("corrupt", text)


def normalise(data: bytes, max_pixels: int, polarity: str = "keep") -> tuple[bytes, int, int, list[str]]:
    """Source bytes → (8-bit grayscale PNG bytes, width, height, conversions applied).

    Every input is fully decoded under the caps, whatever ``polarity``: a PNG's image data is
    inflated once (:func:`check_png`) and unfiltered from that; other formats by Pillow."""
    png = check_png(data, max_pixels)
    if png is not None and png.plain:
        notes: list[str] = []  # already what we store: keep the bytes (and their sha256) unless inverted
        try:  # check_png proved the rows complete and their filters valid: unfiltering cannot fail
            if polarity == "keep" or (polarity == "auto" and png.light_field()):
                out = data
            else:
                out = apply_polarity(data, png.pixels(), polarity, notes)
        except Exception as exc:
            raise Reject("corrupt", f"{type(exc).__name__}: {exc}") from None
        return out, png.width, png.height, notes
    source = data if png is None else png.stored_idat(data)
    try:
        im = Image.open(io.BytesIO(source), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise Reject("not_image", f"not a {'/'.join(ALLOWED_FORMATS)} image") from None
    except Exception as exc:  # hostile headers raise anything (SyntaxError, struct.error, ...)
        raise _pil_error(exc) from None
    w, h = im.size
    fmt = im.format
    if w * h > max_pixels:
        raise Reject("decompression_bomb", f"declares {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    if w < 1 or h < 1:
        raise Reject("corrupt", f"declares {w}x{h} pixels")
    raw_mode = im.tile[0].args if fmt == "PNG" and im.tile else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. odd EXIF: harmless for the pixels
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:
        raise _pil_error(exc) from None
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"first_of_{frames}_frames")
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as exc:
            raise Reject("corrupt", f"EXIF orientation: {type(exc).__name__}: {exc}") from None
        notes.append(f"exif_orientation_{orientation}")
    gray = _to_gray(im, notes)
    notes.insert(0, f"{fmt}_{raw_mode or im.mode}_reencoded")
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    return apply_polarity(buf.getvalue(), gray, polarity, notes), gray.width, gray.height, notes


# ---------------------------------------------------------------- check pass (read once, spool)
# POSIX ustar headers with fixed mode 0444, uid/gid 0, owner "icehpc" and mtime: byte-identical
# to what tarfile writes for such a TarInfo (a test checks it), ~20× faster than TarFile.addfile,
# which would cost more than everything else a sample needs.
_TAR_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_TAR_MTIME = b"%011o\0" % TAR_MTIME
_TAR_TAIL = b"0" + bytes(100) + b"ustar\x0000" + b"icehpc".ljust(32, b"\0") * 2 + bytes(16 + 155 + 12)
_TAR_TAIL_SUM = sum(_TAR_TAIL) + 8 * 32  # + the checksum field counted as spaces


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member (header + data + padding) of a ustar archive."""
    head = name.encode().ljust(100, b"\0") + _TAR_MODE_IDS + b"%011o\0" % len(data) + _TAR_MTIME
    if len(head) != 148:
        raise ValueError(f"tar member name too long: {name!r}")
    return head + b"%06o\0 " % (sum(head) + _TAR_TAIL_SUM) + _TAR_TAIL + data + bytes(-len(data) % 512)


def tar_end(size: int) -> bytes:
    """End-of-archive blocks plus padding to a whole 10240-byte record, as tarfile writes them."""
    return bytes(1024 + (-(size + 1024) % tarfile.RECORDSIZE))


def _sample_json(item: Item, c: BuildConfig, sha: str, w: int, h: int, notes: list[str]) -> bytes:
    meta: dict[str, Any] = {k: None for k in METADATA_KEYS}
    meta.update(item.meta)
    if meta.get("probe") is None and c.probe is not None:
        meta["probe"] = c.probe
    if meta.get("pixel_um") is None and c.pixel_um is not None:
        meta["pixel_um"] = c.pixel_um
    meta.update(source_path=item.source_path, source_sha256=sha, orig_width=w, orig_height=h, conversion=notes)
    return json.dumps(meta, sort_keys=True).encode()


def _chunk_key(items: list[Item], c: BuildConfig) -> str:
    import PIL
    return hashlib.sha256(json.dumps([FORMAT, "check/2", PIL.__version__, cfg.to_dict(c),
                                      [[i.ordinal, i.source_path, str(i.where), i.meta] for i in items]],
                                     sort_keys=True).encode()).hexdigest()


def _check_chunk(out: str, k: int, items: list[Item], c: BuildConfig) -> list[list]:
    """Read, hash and validate a chunk of inputs once; spool each sample's finished tar members.

    Returns per item ``[sha256, rejection, spool offset, spool length, size, mtime_ns]`` (the last
    two: the file's stat, null for zip members), also saved (with the spool) in DIR/.work so a
    resumed build skips finished chunks.
    """
    work = Path(out) / WORK
    key = _chunk_key(items, c)
    done = _read_json(work / f"check-{k:06d}.json")
    spool = work / f"check-{k:06d}.bin"
    if done and done["key"] == key and spool.exists() and spool.stat().st_size == done["bytes"]:
        return done["items"]
    results, blobs, offset = [], [], 0
    for item in items:
        facts: list = [None, None]
        try:
            data = read_source(item, c.max_file_bytes, facts)
            sha = hashlib.sha256(data).hexdigest()
            png, w, h, notes = normalise(data, c.max_pixels, c.polarity)
        except Reject as exc:
            results.append([None, [exc.reason, exc.detail], 0, 0, *facts])
            continue
        name = sample_key(item.ordinal)
        blob = tar_member(f"{name}.json", _sample_json(item, c, sha, w, h, notes)) + tar_member(f"{name}.png", png)
        blobs.append(blob)
        results.append([sha, None, offset, len(blob), *facts])
        offset += len(blob)
    # the spool is scratch: no fsync; a resume re-checks its size and redoes the chunk if short
    write_atomic(spool, b"".join(blobs), durable=False)
    write_atomic(work / f"check-{k:06d}.json", json.dumps({"key": key, "bytes": offset, "items": results}).encode(),
                 durable=False)
    return results


# ---------------------------------------------------------------- plan and shard pass
def _plan_shards(candidates: list[Item], c: BuildConfig) -> list[list[Item]]:
    """Greedy split of the accepted samples (shuffled if asked) by count and exact tar bytes."""
    order = list(candidates)
    if c.shuffle:
        perm = np.random.default_rng(c.seed).permutation(len(order))
        order = [order[i] for i in perm]
    shards: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for item in order:
        if current and (len(current) >= c.shard_samples or size + item.spool[2] + 1024 > c.shard_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.spool[2]
    if current:
        shards.append(current)
    return shards


def _write_shard(out: str, index: int, entries: list[tuple[int, int, int]], labels: dict[str, int],
                 fingerprint: str) -> dict:
    """Concatenate spooled samples ``(chunk, offset, length)`` into one shard, atomically."""
    work = Path(out) / WORK
    files: dict[int, Any] = {}
    parts = []
    try:
        for chunk, offset, length in entries:
            if chunk not in files:
                files[chunk] = open(work / f"check-{chunk:06d}.bin", "rb")
            parts.append(os.pread(files[chunk].fileno(), length, offset))
    finally:
        for f in files.values():
            f.close()
    body = b"".join(parts)
    data = body + tar_end(len(body))
    summary = {"name": shard_name(index), "samples": len(entries), "bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), "labels": labels, "fingerprint": fingerprint}
    root = Path(out)
    # scratch like the spool (no fsync): a summary cut by a crash reads as absent and the shard is redone
    write_atomic(work / f"{shard_name(index)}.json", json.dumps(summary).encode(), durable=False)
    write_atomic(root / shard_name(index), data)  # the rename commits the shard
    return summary


def _rejection(item: Item) -> dict:
    reason, detail = item.reject
    return {"path": item.source_path, "input": item.input_name, "reason": reason, "detail": detail}


def _done_summary(root: Path, index: int, fingerprint: str) -> dict | None:
    side = root / WORK / f"{shard_name(index)}.json"
    if not (root / shard_name(index)).exists() or not side.exists():
        return None
    summary = _read_json(side)
    return summary if summary is not None and summary.get("fingerprint") == fingerprint else None


def _canonical_command(inputs: list[str], manifests: list[str], out: str, c: BuildConfig) -> list[str]:
    cmd = ["icehpc", "shards", "build", *inputs, "--out", out]
    for m in manifests:
        cmd += ["--manifest", m]
    for f in dataclasses.fields(BuildConfig):
        value = getattr(c, f.name)
        if value != f.default:
            flag = "--" + f.name.replace("_", "-")
            cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def _pool_map(fn: Any, tasks: list[tuple], workers: int) -> Iterator[Any]:
    """``fn(*task)`` for each task, in task order; in-process when one worker."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield fn(*t)
        return
    with ProcessPoolExecutor(min(workers, len(tasks))) as pool:
        yield from pool.map(fn, *zip(*tasks))


CHUNK = 500  # inputs per check task (and per resumable spool file)


def build(inputs: list[str], out: str | os.PathLike, c: BuildConfig, *, manifests: Iterable[str] = (),
          workers: int = 1, progress: bool = True, overwrite: bool = False, allow_outside: bool = False,
          provenance: dict[str, Any] | None = None, keys: Iterable[str] | dict[str, str | None] | None = None,
          keys_sha256: str | None = None) -> dict:
    """Build (or finish, or confirm) the shards of ``inputs`` in ``out``; returns the index.

    ``keys`` (e.g. the ``key`` column of ``icehpc curate``'s ``curated.csv``): keep only the inputs
    whose key in a build of the same inputs is listed; they keep that key, the others are not read.

    The whole build holds the lock of ``out`` (:func:`icehpc.fileio.lock_dir`): a second build
    into the same folder raises :class:`icehpc.fileio.LockedError` before touching anything.
    """
    Path(out).mkdir(parents=True, exist_ok=True)
    with lock_dir(out, "shard folder"):
        return _build(inputs, out, c, manifests=manifests, workers=workers, progress=progress,
                      overwrite=overwrite, allow_outside=allow_outside, provenance=provenance,
                      keys=None if keys is None else (dict(keys) if isinstance(keys, dict) else dict.fromkeys(keys)),
                      keys_sha256=keys_sha256)


def read_keys(path: str | os.PathLike) -> dict[str, str | None]:
    """key → recorded ``source_sha256`` (None where the CSV has no such column) of a CSV (``icehpc
    curate``'s ``curated.csv``), for ``build --keys``: with sha256s the build checks that each key
    still names the input it was built from (provenance), and refuses keys of other inputs."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "key" not in (reader.fieldnames or []):
            raise cfg.ConfigError(f"--keys {path}: no 'key' column (columns: {reader.fieldnames})")
        has_sha = "source_sha256" in (reader.fieldnames or [])
        return {row["key"].strip(): ((row["source_sha256"] or "").strip() or None) if has_sha else None
                for row in reader}


def _shard_intact(root: Path, s: dict) -> bool:
    path = root / s["name"]
    if not path.is_file() or path.stat().st_size != s["bytes"]:
        return False
    return file_sha256(path) == s["sha256"]


def _labels(shard: list[Item], c: BuildConfig) -> dict[str, int]:
    labels: dict[str, int] = {}
    for i in shard:
        labels[str(i.meta[c.label_column])] = labels.get(str(i.meta[c.label_column]), 0) + 1
    return labels


def _build(inputs: list[str], out: str | os.PathLike, c: BuildConfig, *, manifests: Iterable[str],
           workers: int, progress: bool, overwrite: bool, allow_outside: bool,
           provenance: dict[str, Any] | None, keys: dict[str, str | None] | None = None,
           keys_sha256: str | None = None) -> dict:
    """:func:`build` under the folder lock.

    Pass 1 (parallel over chunks of the sorted inputs): read each input once, sha256, validate,
    and spool its finished tar members in DIR/.work. Then duplicates are dropped and the plan
    fixed. Pass 2 (parallel over shards): concatenate spooled members into shards. Both passes
    skip work already committed by an earlier, killed run; nothing depends on ``workers``.
    """
    from tqdm import tqdm
    import PIL

    manifests = list(manifests)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    work = root / WORK
    if overwrite:
        _clean(root)
    for p in [*root.glob(".*.tmp"), *work.glob(".*.tmp")]:  # cut by a kill; always rewritten whole
        p.unlink()
    items = scan(list(inputs), c.label_column, manifests, allow_outside=allow_outside, exclude=root)
    not_selected = 0
    if keys is not None:  # a curated subset: the inputs keep the keys of the full build
        by_key = {sample_key(i.ordinal): i for i in items}
        unknown = keys.keys() - by_key.keys()
        if unknown:
            raise cfg.ConfigError(f"--keys: {len(unknown)} of {len(keys)} keys name no input of this build "
                                  f"(e.g. {min(unknown)}); the keys must come from a build of the same inputs")
        not_selected = len(items) - len(keys)
        items = [i for k, i in by_key.items() if k in keys]
    index_path = root / INDEX
    old = _read_json(index_path)
    if old is not None and (old.get("config") != cfg.to_dict(c) or old.get("inputs") != _input_summary(items)):
        raise cfg.ConfigError(f"{root} already holds a shard build of other inputs or options; delete it, "
                              f"choose another --out, or pass --overwrite")
    work.mkdir(exist_ok=True)
    todo = [i for i in items if i.reject is None]
    chunks = [todo[s:s + CHUNK] for s in range(0, len(todo), CHUNK)]
    checked: list[list] = []
    with tqdm(total=len(todo), unit="file", desc="check", disable=not progress) as bar:
        for part in _pool_map(_check_chunk, [(str(root), k, ch, c) for k, ch in enumerate(chunks)], workers):
            checked += part
            bar.update(len(part))
    first_of: dict[str, Item] = {}
    facts: dict[int, tuple] = {}
    for n, (item, (sha, rej, offset, length, size, mtime_ns)) in enumerate(zip(todo, checked)):
        item.sha256, item.spool = sha, (n // CHUNK, offset, length)
        facts[item.ordinal] = (size, mtime_ns)
        if rej is not None:
            item.reject = tuple(rej)
        elif sha in first_of and c.duplicates == "reject":
            item.reject = ("duplicate", f"same sha256 as {first_of[sha].source_path}")
        else:
            first_of.setdefault(sha, item)
    if keys is not None:  # provenance: a key's recorded source must be the input read under it now
        for item in todo:
            want = keys.get(sample_key(item.ordinal))
            if want is not None and item.sha256 is not None and want != item.sha256:
                shutil.rmtree(work, ignore_errors=True)
                raise cfg.ConfigError(f"--keys: key {sample_key(item.ordinal)} was built from content sha256 "
                                      f"{want[:12]}…, but this build's input under that key ({item.source_path}) "
                                      f"is {item.sha256[:12]}…: the keys come from a build of other inputs")
    candidates = [i for i in items if i.reject is None]
    plan = _plan_shards(candidates, c)
    fingerprint = hashlib.sha256(json.dumps({
        "format": FORMAT, "config": cfg.to_dict(c), "pillow": PIL.__version__, "zlib": zlib.ZLIB_VERSION,
        "plan": [[[i.ordinal, i.source_path, i.sha256, i.meta] for i in shard] for shard in plan],
    }, sort_keys=True).encode()).hexdigest()
    reuse: dict[int, dict] = {}
    if old is not None:
        if old.get("fingerprint") != fingerprint:
            shutil.rmtree(work, ignore_errors=True)
            raise cfg.ConfigError(f"{root} holds a shard build of inputs whose content has changed since; "
                                  f"pass --overwrite to rebuild")
        bad = [s["name"] for s in old["shards"] if not _shard_intact(root, s)]
        if not bad:
            shutil.rmtree(work, ignore_errors=True)
            _report(old, root)
            return old
        # the check pass above re-spooled every input: rebuild exactly the lost shards from it
        print(f"shards: {len(bad)} shard(s) missing or changed since the build ({', '.join(bad[:3])}"
              f"{' …' if len(bad) > 3 else ''}); rebuilding them")
        reuse = {k: {**s, "labels": _labels(plan[k], c), "fingerprint": fingerprint}
                 for k, s in enumerate(old["shards"]) if s["name"] not in bad}
    for p in root.glob(SHARD_GLOB):  # shards beyond this plan: left by a killed build of other inputs
        number = SHARD_RE.fullmatch(p.name)
        if number is not None and int(number[1]) >= len(plan):  # any other name is not ours: left alone
            p.unlink()

    summaries: dict[int, dict] = dict(reuse)
    for k in range(len(plan)):
        done = None if k in summaries else _done_summary(root, k, fingerprint)
        if done is not None:
            summaries[k] = done
    pending = [k for k in range(len(plan)) if k not in summaries]
    tasks = []
    for k in pending:
        tasks.append((str(root), k, [i.spool for i in plan[k]], _labels(plan[k], c), fingerprint))
    with tqdm(total=len(candidates), unit="img", desc="shards", disable=not progress,
              initial=sum(len(plan[k]) for k in summaries)) as bar:
        for k, summary in zip(pending, _pool_map(_write_shard, tasks, workers)):
            summaries[k] = summary
            bar.update(len(plan[k]))

    rejected = [_rejection(i) for i in items if i.reject is not None]
    write_atomic(root / REJECTED, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    # what status() checks a later run against: every input's stat and content, in scan order
    write_atomic(root / SOURCES, "".join(json.dumps([_where_key(i), *facts.get(i.ordinal, (None, None)),
                                                     i.sha256 if i.ordinal in facts else None]) + "\n"
                                         for i in items).encode())
    label_counts: dict[str, int] = {}
    for sm in summaries.values():
        for label, n in sm["labels"].items():
            label_counts[label] = label_counts.get(label, 0) + n
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    shards = [{k: summaries[i][k] for k in ("name", "samples", "bytes", "sha256")} for i in range(len(plan))]
    written = sum(sm["samples"] for sm in shards)
    index = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "shards": shards,
        "labels": {"column": c.label_column, "vocabulary": sorted(label_counts),
                   "counts": dict(sorted(label_counts.items()))},
        "totals": {"inputs": len(items) + not_selected, "written": written, "rejected": len(rejected),
                   "rejected_by_reason": dict(sorted(reasons.items())),
                   **({"not_selected": not_selected} if keys is not None else {})},
        "input_files": _input_files(list(inputs), manifests),
        "inputs": _input_summary(items),
        "command": _canonical_command(list(inputs), manifests, str(out), c),
        "config": cfg.to_dict(c),
        "config_source": provenance,
    }
    if keys is not None:
        index["keys_sha256"] = keys_sha256
    if len(items) != written + len(rejected):
        raise RuntimeError(f"accounting broken: {len(items)} inputs != {written} written + {len(rejected)} rejected")
    # the marker last, sealing every shard, the rejection log and the sources (size, mtime, sha256)
    index = CONTRACT.seal(root, index, [root / s["name"] for s in shards] + [root / REJECTED, root / SOURCES])
    shutil.rmtree(work, ignore_errors=True)
    _report(index, root)
    return index


def _where_key(item: Item) -> str:
    return item.where if isinstance(item.where, str) else f"{item.where[0]}#{item.where[1]}"


def _input_files(inputs: list[str], manifests: list[str]) -> dict[str, list]:
    """(size, mtime_ns, sha256 or None) of every INPUT that is a file: zips (by stat: their members'
    content is in the sources list) and CSV manifests (hashed: they hold the metadata)."""
    out = {}
    for given in [*inputs, *manifests]:
        path = Path(given)
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            path = path / MANIFEST_NAME
        if path.is_file():
            st = path.stat()
            is_csv = path.suffix.lower() == ".csv" or given in manifests
            out[str(path)] = [st.st_size, st.st_mtime_ns, file_sha256(path) if is_csv else None]
    return out


def _input_summary(items: list[Item]) -> list[dict]:
    counts: dict[str, int] = {}
    for i in items:
        counts[i.input_name] = counts.get(i.input_name, 0) + 1
    return [{"name": k, "files": v} for k, v in counts.items()]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:  # a non-durable work file cut by a crash: treat as absent
        return None


def _clean(root: Path) -> None:
    """Remove this tool's outputs from ``root`` (:data:`format.CONTRACT`: shards, index, rejection
    log, histogram, work and temporary files); a user's own files there stay."""
    CONTRACT.remove(root)


def _report(index: dict, root: Path) -> None:
    t = index["totals"]
    reasons = ", ".join(f"{k} {v}" for k, v in t["rejected_by_reason"].items()) or "none"
    unselected = f" + {t['not_selected']} not selected by --keys" if "not_selected" in t else ""
    print(f"shards: {t['inputs']} inputs = {t['written']} written + {t['rejected']} rejected ({reasons}){unselected}; "
          f"{len(index['shards'])} shards, {len(index['labels']['vocabulary'])} labels in {root}")


# ---------------------------------------------------------------- verify and stats
def verify(shard_dir: str | os.PathLike) -> list[str]:
    """Problems found re-reading every shard with stock webdataset (empty list: all good)."""
    import webdataset as wds
    from tqdm import tqdm

    root = Path(shard_dir)
    index = _read_json(root / INDEX)
    if index is None:
        return [f"{root}/{INDEX} missing"]
    problems = []
    total = 0
    for s in tqdm(index["shards"], unit="shard", desc="verify", disable=None):  # None: only on a terminal
        path = root / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
            continue
        data = path.read_bytes()
        if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
            problems.append(f"{s['name']}: bytes/sha256 differ from {INDEX}")
        n = 0
        try:
            dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False)
            for sample in dataset:
                n += 1
                members = set(sample) - {"__key__", "__url__", "__local_path__"}
                if members != {"png", "json"} or "." in sample["__key__"]:
                    problems.append(f"{s['name']}: sample {sample['__key__']} has members {sorted(sample)}")
                    continue
                meta = json.loads(sample["json"])
                with Image.open(io.BytesIO(sample["png"])) as im:
                    if im.mode != "L" or (im.width, im.height) != (meta["orig_width"], meta["orig_height"]):
                        problems.append(f"{s['name']}: {sample['__key__']} is {im.mode} {im.size}, json says "
                                        f"{meta['orig_width']}x{meta['orig_height']}")
        except Exception as exc:
            problems.append(f"{s['name']}: unreadable by webdataset: {type(exc).__name__}: {exc}")
        if n != s["samples"]:
            problems.append(f"{s['name']}: {n} samples, {INDEX} says {s['samples']}")
        total += n
    listed = {s["name"] for s in index["shards"]}
    problems += [f"{p.name}: not listed in {INDEX}"
                 for p in sorted(root.glob(SHARD_GLOB)) if p.name not in listed]
    t = index["totals"]
    rej = root / REJECTED
    n_rej = len(rej.read_text().splitlines()) if rej.exists() else -1
    if total != t["written"] or n_rej != t["rejected"] or \
            t["inputs"] != t["written"] + t["rejected"] + t.get("not_selected", 0):
        problems.append(f"accounting: read {total} samples and {n_rej} rejections; {INDEX} says inputs "
                        f"{t['inputs']} = written {t['written']} + rejected {t['rejected']}")
    return problems


def iter_metadata(shard_dir: str | os.PathLike) -> Iterator[dict]:
    """Every sample's JSON, in index order (reads only the small JSON members)."""
    root = Path(shard_dir)
    for s in _read_json(root / INDEX)["shards"]:
        for _, sample in iter_samples(root / s["name"], ("json",)):
            yield json.loads(sample["json"])


def stats(shard_dir: str | os.PathLike, png: str | os.PathLike | None = None) -> dict:
    """Label and size summaries of a shard folder; writes a histogram PNG (default DIR/stats.png)."""
    from ..plotting import pyplot
    plt = pyplot()  # math text off: a class named "$\\frac{x$" is drawn as text, never parsed

    root = Path(shard_dir)
    index = _read_json(root / INDEX)
    if index is None:
        raise cfg.ConfigError(f"{root}/{INDEX} missing: not a shard folder")
    label_key = index["labels"]["column"]
    metas = list(iter_metadata(root))
    labels: dict[str, int] = {}
    for m in metas:
        labels[str(m[label_key])] = labels.get(str(m[label_key]), 0) + 1
    side = np.array([max(m["orig_width"], m["orig_height"]) for m in metas], dtype=float)
    width_um = np.array([m["particle_width_um"] for m in metas if m.get("particle_width_um") is not None], dtype=float)
    result = {"samples": len(metas), "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
              "crop_side_px": _summary(side), "particle_width_um": _summary(width_um)}
    print(f"{len(metas)} samples in {len(index['shards'])} shards; {index['totals']['rejected']} inputs rejected")
    print(f"{label_key:<40} {'count':>7} {'%':>6}")
    for label, n in result["labels"].items():
        print(f"{label:<40} {n:>7} {100 * n / max(1, len(metas)):>6.1f}")
    for name in ("crop_side_px", "particle_width_um"):
        s = result[name]
        print(f"{name}: " + (", ".join(f"{k} {v:.4g}" for k, v in s.items()) if s else "no values"))
    n_panels = 3 if width_um.size else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4), constrained_layout=True)
    names = list(result["labels"])
    axes[0].barh(names[::-1], [result["labels"][n] for n in names[::-1]])
    axes[0].set_xlabel("samples")
    axes[0].set_title(label_key)
    axes[1].hist(side, bins=40)
    axes[1].set_xlabel("crop side (px, longer)")
    axes[1].set_title("crop sizes")
    if width_um.size:
        axes[2].hist(width_um, bins=np.geomspace(max(width_um.min(), 1e-3), width_um.max() * 1.001, 40))
        axes[2].set_xscale("log")
        axes[2].set_xlabel("particle width (µm)")
        axes[2].set_title("particle sizes")
    out = Path(png) if png else root / STATS
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, buf.getvalue())
    print(f"histogram: {out}")
    result["png"] = str(out)
    return result


def _summary(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    q = np.percentile(x, [5, 50, 95])
    return {"n": float(x.size), "min": float(x.min()), "p5": q[0], "median": q[1], "p95": q[2], "max": float(x.max())}


# ---------------------------------------------------------------- status (read-only)
def status(args: argparse.Namespace) -> Status:
    """Is the build in ``args.out`` complete and built from these inputs, bytes and options?

    Writes nothing. The seal (:data:`format.CONTRACT`) must verify; the config, command and
    ``--keys`` file must match; the inputs are scanned again and must be the same files; each file is
    stat'ed and rehashed only when its size or mtime changed (a touched copy still passes; changed
    bytes under a manifest do not); a zip whose stat changed has its members rehashed."""
    root = Path(args.out)
    record = CONTRACT.verify(root)
    if record is None:
        return Status(False, f"no complete shard build in {root}")
    c = cfg.from_args(BuildConfig, args)
    if record.get("config") != cfg.to_dict(c):
        return Status(False, f"{root} was built with other options")
    inputs, manifests = list(args.inputs), list(args.manifest)
    if record.get("command") != _canonical_command(inputs, manifests, str(args.out), c):
        return Status(False, f"{root} was built from other inputs or by another command")
    keys = getattr(args, "keys", None)
    if (file_sha256(keys) if keys else None) != record.get("keys_sha256"):
        return Status(False, "--keys names another key list than the build's")
    changed_zips = set()
    for given, (size, mtime_ns, sha) in (record.get("input_files") or {}).items():
        try:
            st = os.stat(given)
        except OSError:
            return Status(False, f"input {given} is gone")
        if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
            continue
        if sha is not None:
            if file_sha256(given) != sha:
                return Status(False, f"manifest {given} changed since the build")
        else:
            changed_zips.add(given)
    with contextlib.redirect_stderr(io.StringIO()):  # scan's notes belong to a build, not a status
        items = scan(inputs, c.label_column, manifests, allow_outside=getattr(args, "allow_outside", False),
                     exclude=root)
    if keys:
        wanted = read_keys(keys)
        items = [i for i in items if sample_key(i.ordinal) in wanted]
    try:
        sources = [json.loads(line) for line in (root / SOURCES).read_text().splitlines()]
    except (OSError, ValueError):
        return Status(False, f"{root}/{SOURCES} unreadable")
    if [_where_key(i) for i in items] != [s[0] for s in sources]:
        return Status(False, "the input files changed since the build (added, removed or renamed)")
    rehashed = 0
    for item, (where, size, mtime_ns, sha) in zip(items, sources):
        if sha is None:  # rejected before or while reading: its bytes never reached a shard
            continue
        if isinstance(item.where, str):
            try:
                st = os.stat(item.where)
            except OSError:
                return Status(False, f"input {item.source_path} is gone")
            if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                continue
        elif item.where[0] not in changed_zips:
            continue
        rehashed += 1
        try:
            now = hashlib.sha256(read_source(item, c.max_file_bytes)).hexdigest()
        except Reject as exc:
            return Status(False, f"input {item.source_path} is now unreadable ({exc.reason})")
        if now != sha:
            return Status(False, f"input {item.source_path} changed since the build")
    return Status(True, f"up to date: {len(items)} inputs unchanged ({rehashed} rehashed after a stat change)")


# ---------------------------------------------------------------- command line
def default_workers() -> int:
    """CPUs this process may use (Slurm's allocation where there is one)."""
    return int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="folder trees / zips / CSV manifests → WebDataset shards",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("inputs", nargs="*", metavar="INPUT", help="folder tree, .zip, or .csv manifest")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--manifest", action="append", default=[], metavar="CSV", help="CSV manifest input (repeatable)")
    cfg.add_config_arguments(b, BuildConfig, {"--" + f.name.replace("_", "-"): f.name
                                              for f in dataclasses.fields(BuildConfig)})
    b.add_argument("--workers", type=int, default=default_workers(), help="processes (output does not depend on it)")
    b.add_argument("--overwrite", action="store_true", help="delete an earlier build in --out first")
    b.add_argument("--allow-outside", action="store_true",
                   help="read files (manifest paths, links) that resolve outside the given input and manifest "
                        "folders; default: reject them as outside_root")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--keys", metavar="CSV", help="keep only the inputs whose key (in a build of the same inputs) "
                                                 "is in this CSV's 'key' column, e.g. icehpc curate's curated.csv")
    v = sub.add_parser("verify", help="re-read every shard with stock webdataset; check counts and hashes")
    v.add_argument("dir")
    s = sub.add_parser("stats", help="label and size summaries, and a histogram PNG")
    s.add_argument("dir")
    s.add_argument("--png", help="histogram path (default DIR/stats.png)")


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        problems = verify(args.dir)
        for p in problems:
            print(f"verify: {p}")
        if not problems:
            index = _read_json(Path(args.dir) / INDEX)
            t = index["totals"]
            print(f"verify: OK: {len(index['shards'])} shards, {t['written']} samples match {INDEX}; "
                  f"{t['inputs']} inputs = {t['written']} written + {t['rejected']} rejected")
        return 1 if problems else 0
    if args.action == "stats":
        stats(args.dir, args.png)
        return 0
    if not args.inputs and not args.manifest:
        raise cfg.ConfigError("shards build needs at least one INPUT or --manifest")
    c = cfg.from_args(BuildConfig, args)
    build(args.inputs, args.out, c, manifests=args.manifest, workers=args.workers,
          progress=not args.no_progress, overwrite=args.overwrite, allow_outside=args.allow_outside,
          provenance=cfg.provenance(args), keys=read_keys(args.keys) if args.keys else None,
          keys_sha256=file_sha256(args.keys) if args.keys else None)
    return 0
