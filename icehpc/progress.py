"""Progress of long loops: a tqdm bar on a terminal, periodic plain log lines otherwise.

A Slurm log (stderr not a TTY) gets no carriage-return bars, only a line such as
``[embed] 12,800/1,000,000 images (1.3%), 212.4 images/s, ETA 1h18m`` every ``every_s`` seconds
(``ICEHPC_LOG_EVERY`` seconds, default 60). ``ICEHPC_PROGRESS=0`` silences both, ``=1`` forces the
bar. Ranks other than 0 should pass ``enabled=False``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any


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
        self.every_s = float(os.environ.get("ICEHPC_LOG_EVERY", "60")) if every_s is None else every_s
        self.n = initial
        self.start = self.last = time.perf_counter()
        self.bar = None
        if self.enabled and use_bar(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, file=self.stream,
                            dynamic_ncols=True, leave=False)

    def line(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.n - self.initial) / dt  # this run's rate (a resumed loop starts at ``initial``)
        done = f"{self.n:,}" + (f"/{self.total:,} {self.unit} ({100 * self.n / max(self.total, 1):.1f}%)"
                                if self.total else f" {self.unit}")
        eta = f", ETA {_eta((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        return f"[{self.desc}] {done}, {rate:.1f} {self.unit}/s{eta}{self.extra}"

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
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
