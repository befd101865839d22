"""WebDataset shards from folder trees, zips or CSV manifests: ``icehpc shards build|verify|stats``.

Output of ``build INPUT... --out DIR``:

- ``DIR/shard-000000.tar …``: per sample ``<key>.png`` (8-bit grayscale) and ``<key>.json`` (all
  metadata + ``source_path``, ``source_sha256``, ``orig_width``, ``orig_height``, ``conversion``).
  Keys are the sample's position in the sorted input listing (``000000042``): no dots, stable
  under ``--shuffle``. Tar members carry fixed mtime/owner/mode, so a build is byte-reproducible.
- ``DIR/rejected.jsonl``: one ``{"path", "input", "reason", "detail"}`` per rejected input.
- ``DIR/sources.jsonl``: per input (scan order) its location, size, mtime and sha256: what
  :func:`status` checks a later run against (stat first, rehash only where the stat changed).
- ``DIR/index.json``: shards (samples, bytes, sha256), label vocabulary, the command and config,
  the accounting ``inputs == written + rejected (+ not_selected by --keys)`` (checked; the build
  fails if it does not hold). Written last, it seals the shards, ``rejected.jsonl`` and
  ``sources.jsonl`` (size, mtime, sha256: :data:`icehpc.data.format.CONTRACT`). ``--overwrite``
  removes only the files of that contract; a user's own files in DIR stay.

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

``--keys CSV`` keeps the inputs whose key is in the CSV's ``key`` column; when it also has a
``source_sha256`` column, every selected input must still have that content (keys of another data
set are one line, exit 2); unselected inputs are counted as ``not_selected``.

How: pass 1 reads every input once (one open, one read(), no stat of the file beyond the read's
fstat; a PNG's image data inflated once and unfiltered from that; parallel over chunks of the sorted
inputs), hashes and validates it and spools its finished tar members in ``DIR/.work`` (scratch as large as the output,
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
import dataclasses
import os
from pathlib import Path

from .. import config as cfg
from ..fileio import file_sha256
from .build import BuildConfig, _read_json, build, read_keys, status  # noqa: F401  (status: the stage's answer)
from .format import INDEX, STATS
from .inspection import stats, verify

#: The parts of the build, by concern: :mod:`.inputs` (scanning trees, zips and manifests; reading),
#: :mod:`.images` (checks and conversions), :mod:`.tarwriter`, :mod:`.build` (resumable build and
#: ``status``), :mod:`.inspection` (verify, stats), :mod:`.format` (the format and its contract);
#: this module is the command line over :func:`build`, :func:`verify` and :func:`stats`.


# ---------------------------------------------------------------- command line
def default_workers() -> int:
    """CPUs this process may use (Slurm's allocation where there is one)."""
    return int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="folder trees / zips / CSV manifests → WebDataset shards",
                       description=cfg.help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("inputs", nargs="*", metavar="INPUT", help="folder tree, .zip, or .csv manifest")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--manifest", action="append", default=[], metavar="CSV", help="CSV manifest input (repeatable)")
    cfg.add_config_arguments(b, BuildConfig, {"--" + f.name.replace("_", "-"): f.name
                                              for f in dataclasses.fields(BuildConfig)})
    b.add_argument("--workers", type=cfg.at_least(1), default=default_workers(), help="processes (output does not depend on it)")
    b.add_argument("--overwrite", action="store_true", help="delete an earlier build in --out first")
    b.add_argument("--allow-outside", action="store_true",
                   help="read files (manifest paths, links) that resolve outside the given input and manifest "
                        "folders; default: reject them as outside_root")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--keys", metavar="CSV", help="keep only the inputs whose key (in a build of the same inputs) "
                                                 "is in this CSV's 'key' column, e.g. icehpc curate's curated.csv")
    v = sub.add_parser("verify", help="re-read every shard with stock webdataset; check counts and hashes")
    v.add_argument("dir", help=f"shard folder (with {INDEX}) from `icehpc shards build`")
    s = sub.add_parser("stats", help="label and size summaries, and a histogram PNG")
    s.add_argument("dir", help=f"shard folder (with {INDEX}) from `icehpc shards build`")
    s.add_argument("--out", metavar="PNG", help=f"histogram PNG to write (default DIR/{STATS})")
    s.add_argument("--png", dest="out", help=argparse.SUPPRESS)  # its former name, still accepted


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
        stats(args.dir, args.out)
        return 0
    if not args.inputs and not args.manifest:
        raise cfg.ConfigError("shards build needs at least one INPUT or --manifest")
    c = cfg.from_args(BuildConfig, args)
    build(args.inputs, args.out, c, manifests=args.manifest, workers=args.workers,
          progress=not args.no_progress, overwrite=args.overwrite, allow_outside=args.allow_outside,
          provenance=cfg.provenance(args), keys=read_keys(args.keys) if args.keys else None,
          keys_sha256=file_sha256(args.keys) if args.keys else None)
    return 0
