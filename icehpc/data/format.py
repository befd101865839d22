"""The shard format: the one place that says what a shard folder holds and how to read it.

A shard folder (written by ``icehpc shards build``) is

- ``shard-NNNNNN.tar``: per sample two members, ``KEY.png`` (8-bit grayscale) and ``KEY.json``
  (the metadata below); ``KEY`` = :func:`sample_key` of the sample's position in the sorted inputs.
  Stock ``webdataset`` and ``tar`` read it.
- ``index.json`` (:data:`INDEX`): the shards with their sample counts, bytes and sha256, the label
  vocabulary and counts, the command and config, and ``totals`` (inputs = written + rejected).
- ``rejected.jsonl`` (:data:`REJECTED`): one line per rejected input (path, input, reason, detail).

Adding a metadata field means adding it here (:data:`METADATA_KEYS`, and :data:`FLOAT_KEYS` if it
is a number): the shard builder, the synthetic manifest, the loader and the embedding store's
column types all read these names.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from ..contract import Contract

FORMAT = "icehpc-shards/1"
INDEX = "index.json"
REJECTED = "rejected.jsonl"
#: Every shard file, ``shard-NNNNNN.tar`` (:func:`shard_name`), as a glob and as an exact pattern.
SHARD_GLOB = "shard-[0-9][0-9][0-9][0-9][0-9][0-9]*.tar"
SHARD_RE = re.compile(r"shard-(\d{6,})\.tar")
#: One JSON line per input in scan order: [where, size, mtime_ns, sha256] (what ``status`` checks).
SOURCES = "sources.jsonl"
#: ``icehpc shards stats``' default histogram.
STATS = "stats.png"
#: The build's resumable scratch folder (spooled samples, chunk and shard records), removed at the end.
WORK = ".work"
#: What ``shards build`` owns in its output folder: the marker (:data:`INDEX`, written last, sealing
#: the shards and the rejection log) and every file it may write, temporaries included. Removal
#: (``--overwrite``) and "is it done" go through this, never through spelled-out names.
CONTRACT = Contract(INDEX, (SHARD_GLOB, REJECTED, SOURCES, STATS, f"{WORK}/*", ".*.tmp"))
#: The tar members of one sample, by extension.
MEMBERS = ("png", "json")

#: Metadata a manifest may give, in manifest column order (missing values are null).
METADATA_KEYS: tuple[str, ...] = ("campaign", "time", "temperature_c", "pressure_hpa", "particle_width_um",
                                  "particle_height_um", "habit", "probe", "pixel_um")
#: The numeric ones among them (µm, °C, hPa).
FLOAT_KEYS = frozenset({"temperature_c", "pressure_hpa", "particle_width_um", "particle_height_um", "pixel_um"})
#: What the builder adds to every sample's JSON (where it came from and what was converted).
PROVENANCE_KEYS: tuple[str, ...] = ("source_path", "source_sha256", "orig_width", "orig_height", "conversion")
#: Sample identity the loader adds (the key and its shard's file name).
IDENTITY_KEYS: tuple[str, ...] = ("key", "shard")
#: Column types of the embedding store's ``meta/`` datasets that the format fixes, so every part
#: has the same dtype even when a shard holds only missing values of a column. ``key`` and
#: ``shard`` are added by the loader (the sample key and its shard's file name).
NUMERIC_COLUMNS = FLOAT_KEYS | {"orig_width", "orig_height"}
STRING_COLUMNS = frozenset({"key", "shard", "campaign", "time", "habit", "probe", "source_path", "source_sha256"})


def sample_key(position: int) -> str:
    """The key of the sample at ``position`` in the sorted inputs: 9 digits, sortable, no dot."""
    return f"{position:09d}"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def read_index(shard_dir: str | os.PathLike) -> dict:
    """``shard_dir/index.json``; a missing one is a FileNotFoundError that says what to do."""
    path = Path(shard_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build shards first (icehpc shards build ... --out {shard_dir})")
    return json.loads(path.read_text())


def shard_paths(shard_dir: str | os.PathLike) -> list[str]:
    """Absolute shard paths in index order (shards with zero samples are left out)."""
    root = Path(shard_dir).resolve()
    return [str(root / s["name"]) for s in read_index(shard_dir)["shards"] if s["samples"] > 0]


def iter_samples(shard_path: str | os.PathLike, members: tuple[str, ...] = MEMBERS) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of every sample of one shard tar, in tar order, reading only the
    members named in ``members`` (e.g. ``("json",)`` skips the images)."""
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if ext not in members:
                continue
            sample = pending.setdefault(key, {})
            sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
            if len(sample) == len(members):
                del pending[key]
                yield os.path.basename(key), sample
