"""Logs rate-limited per cause: what a peer can make happen once per message must not become one
log line (let alone a traceback) per message.

:class:`RateLimitedLog` logs the first ``burst`` events of each cause as they come; after that,
events of that cause are only counted, and one summary line per ``period`` seconds (of the clock
it is given: loop time, never the wall clock) says how many were suppressed.  Causes are short
strings chosen by the caller (``"register: bad address"``, ``"refused TokenResult from 7"``);
their number is bounded too (``max_causes``): past it, new causes share one overflow bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["RateLimitedLog"]

_OVERFLOW = "(other causes)"


class RateLimitedLog:
    """A logger wrapper that rate-limits per cause (see the module doc).

    now: the clock (seconds). burst: events of one cause logged in full before the rest are only
    counted. period: seconds between two summary lines of one cause. max_causes: causes tracked
    one by one; further ones are counted together.
    """

    __slots__ = ("_log", "_now", "_burst", "_period", "_max", "_seen", "_suppressed", "_summary_at")

    def __init__(self, logger: logging.Logger, now: Callable[[], float], *, burst: int = 5, period: float = 60.0,
                 max_causes: int = 256) -> None:
        if burst < 0 or period <= 0 or max_causes < 1:
            raise ValueError("need burst >= 0, period > 0 and max_causes >= 1")
        self._log = logger
        self._now = now
        self._burst = burst
        self._period = period
        self._max = max_causes
        self._seen: dict[str, int] = {}  # cause -> events so far
        self._suppressed: dict[str, int] = {}  # cause -> events not logged since its last summary
        self._summary_at: dict[str, float] = {}  # cause -> when its last summary (or first suppression) was

    def log(self, level: int, cause: str, fmt: str, *args: Any) -> bool:
        """One event of ``cause``: logged (``fmt % args`` at ``level``) while within the burst, else
        counted, with a summary when a period has passed.  Returns whether the event was logged."""
        if cause not in self._seen and len(self._seen) >= self._max:
            cause = _OVERFLOW
        n = self._seen.get(cause, 0) + 1
        self._seen[cause] = n
        if n <= self._burst:
            self._log.log(level, fmt, *args)
            return True
        now = self._now()
        self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
        first = self._summary_at.setdefault(cause, now)
        if now - first >= self._period:
            self._log.log(level, "%s: %d more like this in the last %.0f s (logged %d in full, then counted)", cause,
                          self._suppressed[cause], now - first, self._burst)
            self._suppressed[cause] = 0
            self._summary_at[cause] = now
        return False

    def warning(self, cause: str, fmt: str, *args: Any) -> bool:
        return self.log(logging.WARNING, cause, fmt, *args)

    def count(self, cause: str) -> int:
        """Events of ``cause`` so far (logged or not)."""
        return self._seen.get(cause, 0)

    def suppressed(self) -> dict[str, int]:
        """Per cause, the events not logged since its last summary."""
        return {c: n for c, n in self._suppressed.items() if n}
