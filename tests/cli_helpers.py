"""The one check that a command-line mistake ended as the project promises: one line, no traceback."""
from __future__ import annotations

import subprocess


def one_clear_line(proc: subprocess.CompletedProcess, *words: str, code: int | None = None) -> str:
    """``proc`` failed (with exit ``code`` when given) printing exactly one stderr line, no traceback,
    that holds every word in ``words``; returns that line."""
    if code is None:
        assert proc.returncode != 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a command a test will Ctrl-C: SIGINT back at its default. A background job
    of a non-interactive shell (``make test &``, some CI runners) starts with SIGINT ignored; children
    inherit that and Python then never raises KeyboardInterrupt, unlike a terminal's foreground job."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
