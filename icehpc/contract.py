"""A stage's output contract: the files it owns in its output folder, and the marker that seals them.

Every stage declares one :class:`Contract` beside its writer (``kappa.CONTRACT``, ...): the name of
its marker (a JSON file written last) and the patterns of every file it may write there. The
marker's ``outputs`` section lists each file the finished run wrote with its size, mtime and
sha256, so "up to date" is a check of the whole set (:meth:`Contract.verify`): a crash between two
writes leaves the old marker over files that no longer match it, which is *not* up to date.

Nothing outside the contract is ever deleted: :meth:`Contract.remove` removes only the marker, the
files it lists and files matching the stage's own patterns, with the temporaries of those names
(``.NAME.PID.tmp``, from :func:`icehpc.fileio.write_atomic`; never another stage's temporaries in a
shared folder); a user's notes or figures in the same folder stay. :meth:`Contract.foreign` names files that are
not the stage's, for stages that prefer to refuse a folder holding them.

Every stage module also answers, without writing anything, whether running it with given arguments
would redo work: ``status(args) -> Status`` (``args``: the stage's parsed ``argparse.Namespace``).
``icehpc pipeline`` (and its ``--plan`` preview) asks each stage this instead of restating the
stage's file names or fingerprints.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .fileio import file_sha256, write_atomic

#: The lock every writer keeps in its output folder (:func:`icehpc.fileio.lock_dir`).
LOCK = ".lock"


def file_fact(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """What a marker records of one output file: size, mtime (ns) and sha256 (``sha256``: already
    computed by the writer from the very bytes it wrote, so the file is not read again)."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or file_sha256(path)}


def fact_matches(path: Path, fact: dict[str, Any], full: bool = False) -> bool:
    """True when ``path`` still holds what ``fact`` recorded. Size and mtime equal: trusted unless
    ``full`` (then, and whenever the stat differs, the sha256 decides: a touched copy passes)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != fact.get("bytes"):
        return False
    if not full and st.st_mtime_ns == fact.get("mtime_ns"):
        return True
    return file_sha256(path) == fact.get("sha256")


@dataclass(frozen=True)
class Status:
    """A stage's answer to "is my output for these arguments complete and current?".

    ``why``: one line for the log, e.g. ``"up to date (fingerprint 3f2a…)"`` or ``"input
    2ds_training.zip changed since the build"``. Computing it writes nothing."""

    done: bool
    why: str


@dataclass(frozen=True)
class Contract:
    """The files one stage writes into its output folder.

    ``marker``: the JSON file written last (relative to the folder). ``patterns``: glob patterns
    (relative paths, ``fnmatch`` syntax, ``**`` not needed: ``*`` crosses ``/``) of every file the
    stage may write, complete or partial, the marker excluded."""

    marker: str
    patterns: tuple[str, ...] = ()

    def marker_path(self, folder: str | os.PathLike) -> Path:
        return Path(folder) / self.marker

    def owns(self, rel: str) -> bool:
        """Whether a path relative to the folder is this stage's: its lock, marker or outputs, or the
        temporary ``.NAME.X.tmp`` of one of those (``X``: the writer's PID)."""
        names = (self.marker, *self.patterns)
        if rel.rsplit("/", 1)[-1] == LOCK or any(fnmatch.fnmatch(rel, p) for p in names):
            return True
        folder, _, base = rel.rpartition("/")
        if base.startswith(".") and base.endswith(".tmp") and base.count(".") >= 3:
            inner = base[1:-4].rsplit(".", 1)[0]
            return any(fnmatch.fnmatch(f"{folder}/{inner}" if folder else inner, p) for p in names)
        return False

    def read(self, folder: str | os.PathLike) -> dict[str, Any] | None:
        """The marker's JSON, or None when it is missing or unreadable."""
        try:
            record = json.loads(self.marker_path(folder).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def seal(self, folder: str | os.PathLike, record: dict[str, Any], files: Iterable[str | os.PathLike],
             digests: dict[str, str] | None = None) -> dict:
        """Write the marker last: ``record`` plus ``outputs`` = {relative name: size, mtime, sha256}
        of every file in ``files`` (paths inside ``folder``, already written). ``digests``: {relative
        name: sha256} of files this writer hashed as it wrote them in this run. Returns the record."""
        root = Path(folder).resolve()
        outputs = {}
        for f in files:
            p = Path(f)
            # a relative path is the writer's own spelling (``out / "kappa.csv"`` with a relative
            # ``--out``: from the working folder) when it lies in ``folder``, else relative to it
            p = p.resolve() if p.is_absolute() or p.resolve().is_relative_to(root) else (root / p).resolve()
            rel = p.relative_to(root).as_posix()
            if not self.owns(rel):
                raise ValueError(f"{rel} is not among this stage's outputs {self.patterns}")
            outputs[rel] = file_fact(p, (digests or {}).get(rel))
        record = {**record, "outputs": outputs}
        write_atomic(self.marker_path(root), json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n")
        return record

    def verify(self, folder: str | os.PathLike, fingerprint: str | None = None, *, section: str | None = None,
               full: bool = False) -> dict[str, Any] | None:
        """The marker's record when it is complete: every file it lists is there as recorded (see
        :func:`fact_matches`) and, when given, its fingerprint (under ``section``) equals
        ``fingerprint``. None otherwise: missing marker, a file changed or gone, another fingerprint,
        or a marker without an ``outputs`` list (written before contracts)."""
        root = Path(folder)
        record = self.read(root)
        if record is None or not isinstance(record.get("outputs"), dict):
            return None
        if fingerprint is not None:
            holder = record.get(section) if section else record
            if not isinstance(holder, dict) or holder.get("fingerprint") != fingerprint:
                return None
        for rel, fact in record["outputs"].items():
            if not isinstance(fact, dict) or not fact_matches(root / rel, fact, full):
                return None
        return record

    def listed(self, folder: str | os.PathLike) -> list[Path]:
        """Files the stage owns in ``folder`` now: the marker's list and whatever matches its patterns."""
        root = Path(folder)
        if not root.is_dir():
            return []
        found: set[Path] = set()
        record = self.read(root) or {}
        for rel in (record.get("outputs") or {}):
            if self.owns(rel) and (root / rel).is_file():
                found.add(root / rel)
        for dirpath, dirs, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                rel = p.relative_to(root).as_posix()
                if rel != self.marker and n != LOCK and self.owns(rel) and not p.is_symlink():
                    found.add(p)
        return sorted(found)

    def foreign(self, folder: str | os.PathLike) -> list[str]:
        """Relative names of files in ``folder`` that are not this stage's (a user's notes, say)."""
        root = Path(folder)
        if not root.is_dir():
            return []
        out = []
        for dirpath, dirs, names in os.walk(root):
            for n in names:
                rel = (Path(dirpath) / n).relative_to(root).as_posix()
                if not self.owns(rel):
                    out.append(rel)
        return sorted(out)

    def remove(self, folder: str | os.PathLike) -> list[Path]:
        """Remove this stage's files from ``folder``: the marker first (so a crash midway leaves no
        seal), then every file :meth:`listed`, then the sub-folders that this left empty. Files and
        folders the stage does not own are never touched. Returns what was removed."""
        root = Path(folder)
        files = self.listed(root)
        marker = self.marker_path(root)
        gone = [marker] if marker.is_file() else []
        for p in [*gone, *files]:
            p.unlink(missing_ok=True)
        gone += files
        for d in sorted({p.parent for p in files}, key=lambda d: -len(d.parts)):
            while d != root and root in d.parents:
                try:
                    d.rmdir()  # only when empty
                except OSError:
                    break
                d = d.parent
        return gone
