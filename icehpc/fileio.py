"""Atomic file writes shared by every stage: a reader (or a resumed job) never sees a partial file."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str, durable: bool = True) -> None:
    """Write ``data`` (str as UTF-8) to ``.NAME.tmp`` beside ``path``, then rename over ``path``.

    The temporary name is fixed, so a write cut by a kill leaves one ``.*.tmp`` file that the rerun
    overwrites (and that cleanup can glob); each output has one writer in icehpc (rank 0 or the
    rank that owns it). ``durable`` fsyncs before the rename (survives power cuts, costs time: pass
    False for bulk files that a resumed job recreates anyway).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
