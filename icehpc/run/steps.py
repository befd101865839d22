"""A pipeline step: one stage invocation, its pipeline record, and the question "must it run?".

A step is *pending* (:func:`evaluate`) when any of these holds, and the log says which:

- its stage says its output is not complete and current: the stage module's ``status(args)``
  (:class:`icehpc.contract.Status`; for a stage without one yet, its marker file exists);
- its pipeline record (``OUT/.pipeline/STEP.json``: the command, the facts of every file it reads
  outside OUT, the fingerprints of the steps it waits for) differs from this plan's;
- a step it waits for is pending (a rerun of shards reruns everything after it).

Evaluating writes nothing. Before a pending step runs (locally, at submission, or at the start of
its own Slurm job: :meth:`Step.prepare`), the outputs of a run with another record are removed:
only the stage's own files (its :class:`~icehpc.contract.Contract`'s marker and patterns, and their
temporaries), never a whole folder, so a user's notes or figures under ``--out`` stay.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import Contract, Status
from ..fileio import write_atomic
from .stages import stage as stage_info


@dataclass(frozen=True)
class Output:
    """Files a step writes: those of ``contract`` inside ``folder``."""

    folder: Path
    contract: Contract


@dataclass
class Step:
    """One stage invocation: ``icehpc STAGE ARGV`` on ``ranks`` processes.

    ``done``: the stage's marker (the fallback when its module has no ``status``); ``owns``: the
    stage's files (what :meth:`prepare` may remove); ``record``/``parts``/``fingerprint``: the
    pipeline's record of the command, files read and upstream (:func:`fingerprint_steps`);
    ``pending``/``why``: filled by :func:`evaluate`."""

    name: str
    stage: str
    argv: list[str]
    done: Path
    ranks: int = 1
    after: tuple[str, ...] = ()
    owns: tuple[Output, ...] = ()
    record: Path | None = None
    parts: dict[str, Any] | None = None
    fingerprint: str = ""
    pending: bool | None = None
    why: str = ""

    @property
    def launcher(self) -> str:
        return stage_info(self.stage).launcher

    def command(self) -> list[str]:
        """The local command line, from the stage's launcher kind: torchrun, mpiexec or plain."""
        cli = ["-m", "icehpc", self.stage, *self.argv]
        if self.launcher == "torch" and self.ranks > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={self.ranks}", *cli]
        if self.launcher == "mpi" and self.ranks > 1:
            from .launch import mpiexec_prefix

            return [*mpiexec_prefix(), "-n", str(self.ranks), sys.executable, "-u", *cli]
        return [sys.executable, "-u", *cli]

    def recorded(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.record.read_text()) if self.record else None
        except (OSError, ValueError):
            return None

    def record_matches(self) -> bool:
        if self.record is None:
            return True
        rec = self.recorded()
        return rec is not None and rec.get("fingerprint") == self.fingerprint

    def status(self) -> Status:
        """The stage's own answer (read-only), or "its marker exists" for a stage without one."""
        import importlib

        from .stages import parse_stage_args

        module = importlib.import_module(stage_info(self.stage).module)
        ask = getattr(module, "status", None)
        if ask is None:
            return Status(self.done.exists(), f"marker {self.done.name} exists" if self.done.exists()
                          else f"no output yet ({self.done.name})")
        try:
            return ask(parse_stage_args(self.stage, self.argv))
        except SystemExit:
            return Status(False, "its arguments do not parse")
        except Exception as exc:  # noqa: BLE001 - an input not there yet, say: not done
            return Status(False, f"{type(exc).__name__}: {exc}")

    def is_done(self) -> bool:
        """Complete and current on its own (upstream not considered: see :func:`evaluate`)."""
        return self.record_matches() and self.status().done

    def why_run(self) -> str:
        """Why this step must run (after :func:`evaluate`, its verdict; else its own reasons)."""
        return self.why or "; ".join(self._reasons()) or "up to date"

    def _reasons(self) -> list[str]:
        said = []
        rec = self.recorded() if self.record else None
        if self.record is not None and rec is None and self.done.exists():
            said.append("no fingerprint recorded for its output (made by an older icehpc or by hand)")
        elif rec is not None and rec.get("fingerprint") != self.fingerprint:
            said.append("inputs changed: " + describe_change(rec.get("parts") or {}, self.parts or {}))
        st = self.status()
        if not st.done:
            said.append(st.why + ("; resuming" if not said and rec is not None else ""))
        return said

    def stale_files(self) -> list[Path]:
        """The stage's files that :meth:`prepare` would remove now (none when the record matches)."""
        if self.record_matches():
            return []
        return [p for out in self.owns for p in out.contract.listed(out.folder)]

    def prepare(self) -> list[Path]:
        """Before running: remove the stage's own files of a run with another record, then record
        this fingerprint. Recording first is safe: outputs of any other record are gone, so a
        marker that appears later comes from this command; a killed step keeps its outputs and its
        record, and resumes. Returns what was removed."""
        if self.record is None:
            return []
        gone = []
        if not self.record_matches():
            for out in self.owns:
                gone += out.contract.remove(out.folder)
        self.record.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.record, json.dumps({"step": self.name, "fingerprint": self.fingerprint,
                                              "parts": self.parts}, indent=1) + "\n")
        return gone


def evaluate(steps: list[Step]) -> list[Step]:
    """Fill every step's ``pending`` and ``why`` in plan order (read-only); returns the pending."""
    pending: dict[str, bool] = {}
    for step in steps:
        said = step._reasons()
        up = sorted(a for a in step.after if pending.get(a))
        if up and not said:
            said.append(f"upstream step(s) {', '.join(up)} rerun")
        step.pending, step.why = bool(said), "; ".join(said)
        pending[step.name] = step.pending
    return [s for s in steps if s.pending]


# ------------------------------------------------------------------------------------ fingerprints
#: Files up to this size are hashed for a step's fingerprint; bigger ones (image zips) by size and mtime.
HASH_FILES_UP_TO = 1 << 20


def _listing(entries: list[tuple[str, Path]]) -> dict[str, Any]:
    h = hashlib.sha256()
    for rel, p in entries:
        try:
            st = p.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return {"files": len(entries), "listing_sha256": h.hexdigest()[:16]}


def _manifest_images(path: Path) -> dict[str, Any] | None:
    """Size and mtime of every image a CSV manifest names (its ``path`` column, relative to the
    CSV's folder), so replacing an image's bytes under the same name changes the fingerprint."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                return None
            rels = [row.get("path") or "" for row in reader]
    except (OSError, csv.Error):
        return None
    return _listing([(r, path.parent / r) for r in rels if r and "\0" not in r])


def _file_fact(path: Path) -> Any:
    """What a step's fingerprint knows of a file or folder it reads outside the run folder."""
    if path.is_dir():
        entries = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            entries += [(os.path.relpath(os.path.join(root, f), path), Path(root) / f) for f in sorted(files)]
        return _listing(entries)
    st = path.stat()
    if st.st_size <= HASH_FILES_UP_TO:
        fact: dict[str, Any] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
    else:
        fact = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.suffix.lower() == ".csv":
        images = _manifest_images(path)
        if images is not None:
            fact["images"] = images
    return fact


def fingerprint_steps(steps: list[Step], out: Path) -> None:
    """Fill every step's ``parts`` and ``fingerprint`` (in plan order: upstream first) and ``record``."""
    by_name: dict[str, Step] = {}
    for step in steps:
        files = {}
        for token in step.argv:
            candidate = token.partition("=")[2] if "=" in token and not token.startswith("/") else token
            p = Path(candidate)
            if p.is_absolute() and p.exists() and out not in p.parents and p != out:
                files[str(p)] = _file_fact(p)
        step.parts = {"command": [step.stage, *step.argv], "files": files,
                      "upstream": {a: by_name[a].fingerprint for a in step.after if a in by_name}}
        blob = json.dumps(step.parts, sort_keys=True).encode()
        step.fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        step.record = out / ".pipeline" / f"{step.name}.json"
        by_name[step.name] = step


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """One line: which command arguments, files or upstream steps differ between two fingerprints."""
    said = []
    a, b = old.get("command") or [], new.get("command") or []
    if a != b and len(a) == len(b):
        said += [(f"{a[i - 1]} " if i and a[i - 1].startswith("--") else "") + f"{a[i]} → {b[i]}"
                 for i in range(len(a)) if a[i] != b[i]]
    elif a != b:
        gone = [t for t in a if t not in b]
        added = [t for t in b if t not in a]
        said.append("command " + (f"{shlex.join(gone) or '∅'} → {shlex.join(added) or '∅'}" if gone or added
                                  else "argument order"))
    fa, fb = old.get("files") or {}, new.get("files") or {}
    changed = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    if changed:
        said.append("file(s) " + ", ".join(changed[:3]) + (" …" if len(changed) > 3 else ""))
    ua, ub = old.get("upstream") or {}, new.get("upstream") or {}
    up = sorted(k for k in set(ua) | set(ub) if ua.get(k) != ub.get(k))
    if up:
        said.append("upstream step(s) " + ", ".join(up) + " changed")
    return "; ".join(said) or "fingerprint scheme changed"
