"""icehpc.fileio under attack: a killed lock holder releases its lock, temp names are per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icehpc import fileio

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------ concurrent writers
def test_1_lock_is_released_by_a_killed_holder_and_blocks_other_stages(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from icehpc.fileio import lock_dir\n"
                               f"with lock_dir({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(fileio.LockedError, match=f"PID {holder.pid}"):
            with fileio.lock_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with fileio.lock_dir(out):  # SIGKILL released it: no stale lock to clean up
        pass


def test_1_atomic_temp_names_are_per_process(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
    fileio.write_atomic(tmp_path / "x.json", "{}")
    assert seen == [f".x.json.{os.getpid()}.tmp"]


def test_a_lock_taken_a_moment_ago_is_named_by_its_holder_not_unknown(tmp_path):
    """The holder writes 'host … PID …' just after flock: a second writer that reads the file in
    between must wait for the name instead of reporting 'an unknown process' (a CI flake)."""
    import fcntl
    import threading

    from icehpc.fileio import LockedError, lock_dir

    folder = tmp_path / "out"
    folder.mkdir()
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, name not yet written
    timer = threading.Timer(0.2, lambda: os.pwrite(fd, b"host somewhere PID 4242\n", 0))
    timer.start()
    try:
        with pytest.raises(LockedError, match="in use by host somewhere PID 4242"):
            with lock_dir(folder):
                pass
    finally:
        timer.join()
        os.close(fd)
