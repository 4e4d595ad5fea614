"""Progress for long work: a bar on a terminal, periodic log lines with rate and ETA otherwise.

Batch jobs write to log files, where a redrawn bar is noise; people at a terminal want the bar.
Log lines come every ``interval_s`` seconds ($SOFTCACHE_PROGRESS_SECONDS, default 10) with the
rate and ETA, plus one closing line with the total time, so a job log always says how long the
step took even when it finished before the first interval.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "it",
                 stream: TextIO | None = None, interval_s: float | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval_s = interval_s if interval_s is not None else float(os.environ.get("SOFTCACHE_PROGRESS_SECONDS", "10"))
        self.done = 0
        self._start = self._last = time.perf_counter()
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"softcache: {self.desc}: {self.done}/{self.total} {self.unit} "
              f"({rate:.1f} {self.unit}/s, eta {eta:.0f}s)", file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and et is None and self.total:
            elapsed = max(self.elapsed, 1e-9)
            print(f"softcache: {self.desc}: done, {self.done}/{self.total} {self.unit} in {elapsed:.1f}s "
                  f"({self.done / elapsed:.1f} {self.unit}/s)", file=self.stream, flush=True)
