"""Preemption (SIGUSR2) and the checkpoint folder layout of a pretraining run.

This module is the one owner of that layout: :func:`commit` seals a saved tag (manifest, then
``latest``, then pruning) and :func:`model_states` is the one reader of a tag's model file for
anyone outside the trainer (``icehpc export``); it verifies the manifest first, as resume does.

Layout: ``OUT/checkpoints/step-XXXXXXXX/`` (DeepSpeed tags) each with ``icehpc-sha256.json``, the
sha256 of every file of the tag, written by rank 0 after every rank saved; ``OUT/checkpoints/latest``
names the last complete tag. On resume (:func:`resume_tag`) ``latest`` must name a tag folder
directly inside ``checkpoints/`` (``step-`` + 8 digits; never a path), and the tag must match its
manifest; otherwise the newest intact kept tag is used, with a warning, and if none is intact the
run stops with one line saying what is wrong. Trust boundary: DeepSpeed loads the tag with
``torch.load(weights_only=False)``, which can run code stored in the pickle. The manifest detects
corruption and truncation, not a person who can write the run folder (they could rewrite the
manifest too): resume only run folders that you or your group wrote, as with any pickle.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from ..config import UserError
from ..fileio import file_sha256, write_atomic

MANIFEST = "icehpc-sha256.json"
LATEST = "latest"
#: DeepSpeed's per-tag file holding the client state (teacher, config, step) of rank 0.
MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(UserError):
    """A checkpoint given to a reader (``icehpc export``) is missing or does not match its manifest."""


class ResumeError(RuntimeError):
    """The run folder cannot be resumed as it is; the message says which checkpoint and what to do."""

_TAG = re.compile(r"step-\d{8}")

#: Exit code of a rank that saved a checkpoint after SIGUSR2 and wants the job requeued (EX_TEMPFAIL).
PREEMPTED_EXIT = 75
#: How long a non-zero rank waits for submitit's requeue to kill it after a preemption checkpoint (s).
_REQUEUE_GRACE_S = 600


class PreemptFlag:
    """SIGUSR2 (Slurm ``--signal=USR2@T``, submitit's timeout/preemption signal) → finish the step,
    checkpoint on every rank, then hand over to the previous handler (submitit requeues) or exit
    with :data:`PREEMPTED_EXIT` so ``jobs/pretrain.sh`` requeues."""

    def __init__(self) -> None:
        self.raised = False
        self.previous: Any = None

    def install(self) -> None:
        if hasattr(signal, "SIGUSR2"):
            self.previous = signal.signal(signal.SIGUSR2, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = True

    def hand_over(self) -> None:
        """Call the handler we displaced. submitit's requeues the job and exits on global rank 0
        and returns on the others, which must then NOT exit first: a task ending could end the
        step before rank 0's ``scontrol requeue`` (submitit's own rule). They wait to be killed."""
        if callable(self.previous):
            self.previous(signal.SIGUSR2, None)
            time.sleep(_REQUEUE_GRACE_S)



def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def latest_tag(out: str | os.PathLike) -> str | None:
    """The last complete checkpoint tag of a run folder, or None."""
    f = checkpoint_root(out) / LATEST
    return f.read_text().strip() if f.exists() else None



def _files(tag_dir: Path) -> dict[str, Path]:
    return {str(p.relative_to(tag_dir)): p for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(tag_dir: str | os.PathLike) -> None:
    """Record the sha256 and size of every file of a finished tag (rank 0, after all ranks saved)."""
    tag_dir = Path(tag_dir)
    files = {rel: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for rel, p in _files(tag_dir).items()}
    write_atomic(tag_dir / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def check_tag(out: str | os.PathLike, tag: str) -> str | None:
    """Why tag ``tag`` of run ``out`` cannot be resumed from, or None when it is intact."""
    root = checkpoint_root(out)
    if not _TAG.fullmatch(tag):
        return f"tag {tag!r} is not a checkpoint name of this run (step-XXXXXXXX inside {root})"
    tag_dir = root / tag
    if tag_dir.is_symlink() or tag_dir.resolve().parent != root.resolve():
        return f"{tag_dir} is a link out of the run folder"
    return check_tag_dir(tag_dir)


def check_tag_dir(tag_dir: Path) -> str | None:
    """Why the tag folder ``tag_dir`` does not match its manifest, or None when it is intact."""
    if not tag_dir.is_dir():
        return f"{tag_dir} is missing"
    try:
        want = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{tag_dir}/{MANIFEST} is missing or unreadable (checkpoint incomplete or not written by icehpc)"
    have = _files(tag_dir)
    if sorted(have) != sorted(want):
        return f"{tag_dir}: files differ from its manifest (missing: {sorted(set(want) - set(have))[:3]})"
    for rel, p in have.items():
        if p.stat().st_size != want[rel]["bytes"]:
            return f"{p} is truncated or grown ({p.stat().st_size} bytes, manifest says {want[rel]['bytes']})"
        if file_sha256(p) != want[rel]["sha256"]:
            return f"{p} does not match its sha256 (corrupted on disk)"
    return None


def resume_tag(out: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(tag to resume from or None for a fresh run, warnings) — see the module docstring.

    Raises RuntimeError when checkpoints exist but none is intact."""
    root = checkpoint_root(out)
    named = latest_tag(out)
    kept = sorted((p.name for p in root.glob("step-*") if _TAG.fullmatch(p.name) and p.is_dir()), reverse=True)
    if named is None and not kept:
        return None, []
    warnings, problems = [], []
    order = ([named] if named is not None else []) + [t for t in kept if t != named]
    for tag in order:
        why = check_tag(out, tag)
        if why is None:
            if tag != named and named is not None:
                warnings.append(f"latest checkpoint {named!r} is unusable; resuming from the newest intact "
                                f"kept checkpoint {tag} instead (steps after it are redone)")
            return tag, [*problems, *warnings]
        problems.append(f"checkpoint {tag}: {why}")
    raise ResumeError(f"no intact checkpoint to resume from in {root} ({'; '.join(problems[:3])}); restore "
                       f"one from a backup or start over in a new `out` folder")


def commit(out: str | os.PathLike, tag: str, keep: int) -> None:
    """Seal tag ``tag`` that every rank has saved (rank 0 only, after a barrier): its manifest first,
    then ``latest`` atomically (so ``latest`` only ever names a verifiable tag), then prune the tags
    beyond the newest ``keep``. Only ``step-XXXXXXXX`` folders are ever removed."""
    import shutil

    root = checkpoint_root(out)
    if not _TAG.fullmatch(tag):
        raise ValueError(f"checkpoint tag {tag!r} is not step-XXXXXXXX")
    write_manifest(root / tag)
    write_atomic(root / LATEST, tag + "\n")
    tags = sorted(p.name for p in root.glob("step-*") if p.is_dir() and _TAG.fullmatch(p.name))
    for old in tags[: max(0, len(tags) - keep)]:
        if old != tag:
            shutil.rmtree(root / old, ignore_errors=True)


def model_states(path: str | os.PathLike) -> Path:
    """The verified model-states file of a run folder, its ``checkpoints/`` folder (both: the tag
    ``latest`` names) or one tag folder. Raises :class:`CheckpointError` (one line) when there is no
    checkpoint or the tag does not match its sha256 manifest: what resume would reject is never read."""
    d = Path(path)
    for root in (checkpoint_root(d), d):
        latest = root / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            why = check_tag(root.parent, tag) if root.name == "checkpoints" else \
                (f"tag {tag!r} named by {latest} is not a checkpoint name (step-XXXXXXXX)" if not _TAG.fullmatch(tag)
                 else check_tag_dir(root / tag))
            tag_dir = root / tag
            break
    else:
        if not (d / MODEL_STATES).is_file() and not (d / MANIFEST).is_file():
            raise CheckpointError(f"{d}: no checkpoint found (expected a run folder with checkpoints/{LATEST}, "
                                  f"a checkpoints/ folder, or a step-XXXXXXXX tag folder)")
        tag_dir, why = d, check_tag_dir(d)
    if why is not None:
        raise CheckpointError(f"checkpoint {tag_dir} does not verify: {why}; resume would reject it too")
    states = tag_dir / MODEL_STATES
    if not states.is_file():
        raise CheckpointError(f"{tag_dir} has no {MODEL_STATES} (not a DeepSpeed checkpoint of icehpc pretrain)")
    return states
