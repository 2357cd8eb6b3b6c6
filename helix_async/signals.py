"""Process plumbing: a stop flag that long work polls, set by the first Ctrl-C or SIGTERM.

The planner's solvers poll a :class:`StopFlag` and stop with their best solution; the CLI wraps
long work in :class:`SignalStop` so that the first SIGINT/SIGTERM sets the flag instead of killing
the process (the host and workers will stop the same way).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopFlag", "SignalStop"]


class StopFlag:
    """Set by Ctrl-C/SIGTERM (or a caller); solvers poll it and stop with their best solution."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        self.reason = self.reason or reason
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


class SignalStop:
    """Context manager: the first SIGINT/SIGTERM sets ``flag`` instead of killing the process.

    A second SIGINT raises KeyboardInterrupt as usual (a person who insists gets out at once).
    Only installs handlers in the main thread.
    """

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag.set(f"signal {signal.Signals(signum).name}")

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self.flag

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
