"""Atomic file writes and output-folder locks shared by every stage.

A reader (or a resumed job) never sees a partial file, and two jobs never write one output folder
at once: :func:`lock_dir` takes an exclusive ``fcntl`` lock on ``DIR/.lock`` that the kernel drops
when the holder exits (SIGKILL included), so a stale lock needs no cleanup.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

LOCK_NAME = ".lock"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LockedError(RuntimeError):
    """Another live process holds the output folder's lock; the message names it (host, PID)."""


def write_atomic(path: str | os.PathLike, data: bytes | str | list[bytes], durable: bool = True) -> None:
    """Write ``data`` (str as UTF-8, a list of bytes in order) to ``.NAME.tmp`` beside ``path``, then
    rename over ``path``.

    The temporary name carries the writer's PID (``.NAME.PID.tmp``), so two processes never write
    one temporary file; a write cut by a kill leaves a ``.*.tmp`` file that cleanup can glob. Each
    output folder has one writer job (:func:`lock_dir`). ``durable`` fsyncs before the rename (survives power cuts, costs time: pass
    False for bulk files that a resumed job recreates anyway).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(data, list):
                fh.writelines(data)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk (ENOSPC), a kill by signal handler: leave no temporary behind
        tmp.unlink(missing_ok=True)
        raise


def _holder(path: Path, wait_s: float = 1.0) -> str:
    """Who holds the lock, as written in the lock file. The holder writes it just after taking the
    lock, so a file still empty is read again for up to ``wait_s`` before giving up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text or time.monotonic() >= deadline:
            return text or "an unknown process"
        time.sleep(0.02)


@contextlib.contextmanager
def lock_dir(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the ``with`` block.

    A second writer fails at once with :class:`LockedError` naming the holder (``host PID N``)
    instead of waiting or interleaving its files with the first one's. The lock is advisory
    (``flock``): it guards icehpc against itself, e.g. a Slurm requeue while the old job still runs.
    On filesystems without ``flock`` support (some NFS mounts) the error says so.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{what} {folder} is in use by {_holder(path)} (lock {path}); wait for that "
                              "job to end or cancel it, or choose another output folder") from None
        except OSError as exc:
            raise LockedError(f"cannot lock {path} ({exc}); this filesystem may not support flock: "
                              "put the output on a local or Lustre/GPFS folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} PID {os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the flock


def check_output_path(path: str | os.PathLike, what: str = "--out", folder: bool = True) -> None:
    """Raise a one-line :class:`~icehpc.config.UserError` when ``path`` (named ``what`` in the
    message) cannot be an output folder (``folder``) or output file: it, or a folder above it, is
    an existing file; or a file's path is a folder. Called before anything is written."""
    from .config import UserError

    p = Path(path)
    above = next((a for a in reversed(p.parents) if a.exists() and not a.is_dir()), None)
    if above is not None:
        problem = f"is inside {above}, which is a file, not a folder"
    elif folder and os.path.lexists(p) and not p.is_dir():
        problem = "is a file, not a folder"
    elif not folder and p.is_dir():
        problem = "is a folder, not a file"
    else:
        return
    raise UserError(f"{what} {path} {problem}; choose " + ("a folder" if folder else "a file name"))


#: First characters that make a spreadsheet read a cell as a formula (CSV/formula injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs: text starting like a formula (``=cmd|' /C calc'!A0``)
    gets a leading ``'``; numbers, and text that reads as a number (``-3.5``), are left as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def csv_text(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """CSV (``\n`` line ends) of ``header`` and ``rows``, every text cell :func:`spreadsheet_safe`."""
    import csv
    import io

    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow([spreadsheet_safe(h) for h in header])
    wr.writerows([spreadsheet_safe(v) for v in row] for row in rows)
    return buf.getvalue()


def run_facts(started: float) -> dict[str, Any]:
    """Where and how a stage ran, for its output's record: start time, host, versions, argv."""
    import numpy as np

    from . import __version__

    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "host": socket.gethostname(),
            "icehpc": __version__, "python": platform.python_version(), "numpy": np.__version__, "argv": sys.argv}
