"""The skeleton shared by the MPI stages that read an embedding store (kappa, curate, outliers).

Each of those stages keeps only its science (``compute``: every rank reads its block of rows and
the ranks reduce; ``write``: rank 0 writes the stage's files) and declares a :class:`StoreStage`.
This module does the rest, once: rank 0 holds the output folder's lock throughout; the fingerprint
is the stage's config plus the store's content (the sha256 of the master and of every part, as
:func:`~icehpc.analysis.store.open_store` verified them) plus what else shapes the result; "up to
date" is the stage's :class:`~icehpc.contract.Contract` verifying every file its marker lists
(decided on rank 0, broadcast, so ranks never disagree); the marker, written last, records the
fingerprint and the store it came from (path and sha256). A crash between two writes leaves a
marker that does not verify, so the rerun recomputes instead of trusting another run's CSV.

:func:`status` answers the same question without writing anything (``icehpc pipeline --plan``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import config as cfglib
from ..contract import Contract, Status
from ..dist import lock_on_root, mpi_comm, run_on_root
from .store import Store, StoreError, open_store, open_store_mpi


@dataclass(frozen=True)
class StoreStage:
    """One store stage: its name (messages), contract, and where its marker keeps the fingerprint
    (``section``: a sub-dict such as kappa's ``run``; None: the top level)."""

    name: str
    contract: Contract
    section: str | None = None


def store_facts(store: Store) -> dict[str, Any]:
    """The store's content as the fingerprint sees it: the master's sha256 and each part's."""
    return {"file": store.sha256, "parts": list(store.part_sha256), "rows": list(store.part_rows)}


def store_provenance(store: Store) -> dict[str, Any]:
    """Which store a result came from, by checksum (recorded in the marker)."""
    return {"path": str(store.path), "sha256": store.sha256, "part_sha256": list(store.part_sha256)}


def fingerprint(store: Store, cfg: Any, extra: dict[str, Any]) -> str:
    """Hash of the config, the store's content and ``extra`` (block size, image index, ...)."""
    blob = json.dumps({"cfg": cfglib.to_dict(cfg), "store": store_facts(store), **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _current(stage: StoreStage, out: Path, fp: str) -> bool:
    return stage.contract.verify(out, fp, section=stage.section) is not None


def run(stage: StoreStage, store_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: Any, *,
        extra: Callable[[Store], dict[str, Any]] | dict[str, Any],
        compute: Callable[[Store, Any, Any], Any],
        write: Callable[[Path, Any, str, float, Store], tuple[dict[str, Any], list[Path], Any]],
        force: bool = False, comm: Any = None) -> Any:
    """Lock ``out_dir`` (rank 0), open the store on every rank, skip when the contract verifies
    this fingerprint, else ``compute`` (collective; rank 0's result, None elsewhere) and on rank 0
    ``write(out, result, fingerprint, started, store) -> (record, files, returned)``; the marker
    (``record`` + the sha256 of every file in ``files``) is sealed last. Returns ``returned`` on
    rank 0, None elsewhere and when up to date."""
    comm = comm if comm is not None else mpi_comm()
    out = Path(out_dir)
    with contextlib.ExitStack() as held:
        lock_on_root(comm, held, out, f"{stage.name} output folder")
        with open_store_mpi(store_path, comm) as store:
            fp = fingerprint(store, cfg, extra(store) if callable(extra) else extra)
            if not force and run_on_root(comm, lambda: _current(stage, out, fp)):
                if comm.Get_rank() == 0:
                    print(f"icehpc {stage.name}: {out} is up to date (fingerprint {fp}); --force to redo")
                return None
            started = time.time()
            result = compute(store, cfg, comm)
            if result is None:
                return None
            # the old marker goes first: a crash (or a full disk: one line from run_stage) while the new
            # files are written leaves no seal at all, and the writers leave no temporaries
            stage.contract.marker_path(out).unlink(missing_ok=True)
            record, files, returned = write(out, result, fp, started, store)
            stage.contract.seal(out, record, files)
            return returned


def status(stage: StoreStage, store_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: Any,
           extra: Callable[[Store], dict[str, Any]] | dict[str, Any], force: bool = False) -> Status:
    """Whether :func:`run` with these arguments would skip (read-only: opens the store, hashes)."""
    if force:
        return Status(False, "--force")
    out = Path(out_dir)
    record = stage.contract.read(out)
    if record is None:
        return Status(False, f"no output yet ({stage.contract.marker_path(out)})")
    try:
        with open_store(store_path) as store:
            fp = fingerprint(store, cfg, extra(store) if callable(extra) else extra)
    except (StoreError, OSError) as exc:
        return Status(False, f"its input store cannot be read yet ({exc})")
    if _current(stage, out, fp):
        return Status(True, f"up to date (fingerprint {fp})")
    holder = record.get(stage.section) if stage.section else record
    old = holder.get("fingerprint") if isinstance(holder, dict) else None
    if old != fp:
        return Status(False, f"store or config changed (fingerprint {old} → {fp})")
    return Status(False, "a file it wrote changed or is missing since its marker was sealed")
