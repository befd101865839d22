"""Progress of long loops: a tqdm bar on a terminal, periodic plain log lines otherwise.

A Slurm log (stderr not a TTY) gets no carriage-return bars, only lines such as
``[embed] 12,800/1,000,000 images (1.3%), 212.4 images/s, ETA 1h18m``: the first once the loop has
run :data:`FIRST_S` seconds, then one every ``every_s`` seconds (``ICEHPC_LOG_EVERY``, default
:data:`EVERY_S`) or every 10 % of the total, whichever comes first (never two within
:data:`FIRST_S` s), and a last line when the loop ends (``…, done in 0m14s``) if it ran that long.
``ICEHPC_PROGRESS=0`` silences both, ``=1`` forces the bar. Ranks other than 0 should pass
``enabled=False``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

#: seconds before the first log line (a rate over less is noise), and the least gap between lines
FIRST_S = 2.0
#: seconds between log lines (``ICEHPC_LOG_EVERY`` overrides it)
EVERY_S = 30.0
#: a log line also at every this fraction of the total
EVERY_FRACTION = 0.1


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def use_bar(stream: Any = None) -> bool:
    """A bar only on a terminal (or with ICEHPC_PROGRESS=1)."""
    forced = os.environ.get("ICEHPC_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """``with Progress(total, "embed", "images") as p: p.update(n)``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 every_s: float | None = None, stream: Any = None, initial: int = 0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.initial, self.extra = initial, ""
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and os.environ.get("ICEHPC_PROGRESS") != "0"
        self.every_s = float(os.environ.get("ICEHPC_LOG_EVERY", EVERY_S)) if every_s is None else every_s
        self.gap_s = min(FIRST_S, self.every_s)
        self.n = self.logged = initial  # ``logged``: the count of the last log line
        self.lines = 0
        self.closed = False
        self.start = self.last = time.perf_counter()
        self.bar = None
        if self.enabled and use_bar(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, file=self.stream,
                            dynamic_ncols=True, leave=False)

    def line(self, final: bool = False) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.n - self.initial) / dt  # this run's rate (a resumed loop starts at ``initial``)
        done = f"{self.n:,}" + (f"/{self.total:,} {self.unit} ({100 * self.n / max(self.total, 1):.1f}%)"
                                if self.total else f" {self.unit}")
        if final:
            eta = f", done in {_eta(dt)}"
        else:
            eta = f", ETA {_eta((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        return f"[{self.desc}] {done}, {rate:.1f} {self.unit}/s{eta}{self.extra}"

    def _due(self, now: float) -> bool:
        """A log line now: the first after ``gap_s``, then every ``every_s`` or 10 % of the total."""
        since = now - self.last
        if not self.lines:
            return since >= self.gap_s
        if since >= self.every_s:
            return True
        step = max(1, int(self.total * EVERY_FRACTION)) if self.total else 0
        return bool(step) and self.n // step > self.logged // step and since >= self.gap_s

    def _log(self, now: float, final: bool = False) -> None:
        self.last, self.logged, self.lines = now, self.n, self.lines + 1
        print(self.line(final), file=self.stream, flush=True)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts (the bar's postfix, or the end of the next log line)."""
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.extra = "".join(f", {k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self._due(now):
            self._log(now)

    def close(self, final: bool = True) -> None:
        """End the bar; in a log, a last line with the whole run's rate and time when the loop did
        work for :data:`FIRST_S` s or more, or logged before (``final=False``: none, e.g. the loop
        stopped on an error). A loop shorter than that stays silent, as it would have logged nothing."""
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif (final and self.enabled and self.n > self.initial and not self.closed
              and (self.lines or now - self.start >= self.gap_s)):
            self._log(now, final=True)
        self.closed = True  # a second close logs nothing

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(final=exc_type is None)
