"""Progress that shows in a terminal (a tqdm bar) and in a piped log (CI, nohup, a cluster job):
there, a log line at most every `every_s` seconds or each 10% of the work, with rate and ETA."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("pipeline.common.progress")


class LogProgress:
    """The part of tqdm's interface the stages use (update, set_postfix, context manager), as log lines."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, every_s: float = 30.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.every_s = every_s
        self.started = self.last_time = time.perf_counter()
        self.last_fraction = initial / total if total else 0.0  # total None or 0: unknown, report on time only
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        fraction = self.n / self.total if self.total else 0.0
        done = bool(self.total) and self.n >= self.total
        if now - self.last_time >= self.every_s or fraction - self.last_fraction >= 0.1 or done:
            self.last_time, self.last_fraction = now, fraction
            self._log(now)

    def _log(self, now: float) -> None:
        rate = (self.n - self.start_n) / max(now - self.started, 1e-9)
        if not self.total:
            log.info("%s: %d %s, %.1f %s/s%s", self.desc, self.n, self.unit, rate, self.unit, self.postfix)
            return
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        log.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, ETA %s%s", self.desc, self.n, self.total, self.unit,
                 100 * self.n / max(self.total, 1), rate, self.unit, _clock(eta), self.postfix)

    def set_postfix(self, **values) -> None:
        self.postfix = ", " + ", ".join(f"{k}={v}" for k, v in values.items()) if values else ""

    def close(self) -> None:
        pass

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def progress(total: int | None, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar on a terminal, log lines otherwise, nothing when not `enabled` (non-main ranks)."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(total, desc, unit, initial)
