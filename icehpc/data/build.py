"""The resumable shard build (check pass, plan, shard pass, sealed index) and its read-only ``status``.

See :mod:`icehpc.data.shards` for the whole contract; the output names are :mod:`icehpc.data.format`'s."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np

from .. import config as cfg
from ..contract import Status
from ..fileio import file_sha256, lock_dir, write_atomic
from .format import (CONTRACT, FORMAT, INDEX, METADATA_KEYS, REJECTED, SHARD_GLOB, SHARD_RE, SOURCES, WORK,
                     sample_key, shard_name)
from .tarwriter import tar_end, tar_member
from .inputs import Item, MANIFEST_NAME, Reject, read_source, scan
from .images import normalise


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
    write_atomic(spool, blobs, durable=False)
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
    """Concatenate spooled samples ``(chunk, offset, length)`` into one shard, atomically: one read
    per run of samples that lie back to back in a spool (all of them unless shuffled), no joins."""
    work = Path(out) / WORK
    runs: list[list[int]] = []
    for chunk, offset, length in entries:
        if runs and runs[-1][0] == chunk and runs[-1][1] + runs[-1][2] == offset:
            runs[-1][2] += length
        else:
            runs.append([chunk, offset, length])
    files: dict[int, Any] = {}
    parts = []
    try:
        for chunk, offset, length in runs:
            if chunk not in files:
                files[chunk] = open(work / f"check-{chunk:06d}.bin", "rb")
            parts.append(os.pread(files[chunk].fileno(), length, offset))
    finally:
        for f in files.values():
            f.close()
    size = sum(map(len, parts))
    parts.append(tar_end(size))
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    summary = {"name": shard_name(index), "samples": len(entries), "bytes": size + len(parts[-1]),
               "sha256": digest.hexdigest(), "labels": labels, "fingerprint": fingerprint}
    root = Path(out)
    # scratch like the spool (no fsync): a summary cut by a crash reads as absent and the shard is redone
    write_atomic(work / f"{shard_name(index)}.json", json.dumps(summary).encode(), durable=False)
    write_atomic(root / shard_name(index), parts)  # the rename commits the shard
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
    import PIL

    from ..progress import Progress

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
    with Progress(len(todo), "check", "files", enabled=progress) as bar:
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
    with Progress(len(candidates), "shards", "images", enabled=progress,
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
    index = CONTRACT.seal(root, index, [root / s["name"] for s in shards] + [root / REJECTED, root / SOURCES],
                          digests={summaries[k]["name"]: summaries[k]["sha256"] for k in pending})
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
