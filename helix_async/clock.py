"""Clocks: the only place scheduling code reads time from.

Scheduling code (host, worker, router) must not call ``time.time()``/``time.monotonic()``: it takes a
:class:`Clock` and reads *loop time* from it.  :class:`LoopClock` reads the running asyncio loop,
so the very same code runs in real time on uvloop/asyncio and in virtual time on
:class:`helix_async.vloop.VirtualTimeLoop` (the simulator), where loop time only moves when every
coroutine is blocked.

All times are seconds of loop time (floats).  On a real loop that is a monotonic clock with an
unspecified epoch; on a virtual loop it starts at the loop's ``start`` (0.0 by default).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Clock", "LoopClock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """Source of loop time for scheduling code.  All values are seconds of loop time."""

    def now(self) -> float:
        """Current loop time, in seconds."""
        ...

    async def sleep(self, delay: float) -> None:
        """Suspend for ``delay`` seconds of loop time (``delay <= 0`` just yields once).

        The wake-up follows the loop's timer resolution (see :meth:`LoopClock.sleep`).
        """
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Suspend until loop time ``deadline`` (seconds); a past deadline just yields once.

        On return ``now() >= deadline``.
        """
        ...

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> Any:
        """Run the plain callback ``fn(*args)`` at loop time ``when``; returns a handle with
        ``cancel()``.  The host's and worker's hot path (network deliveries, batch completions)
        uses callbacks rather than coroutine wake-ups: a callback costs a fraction of a task step.
        """
        ...

    def call_soon(self, fn: Callable[..., object], *args: Any) -> Any:
        """Run ``fn(*args)`` once everything already due now has run; returns a handle."""
        ...


def _wake(fut: asyncio.Future[None]) -> None:
    # A cancelled sleeper's future may already be done when its timer fires.
    if not fut.done():
        fut.set_result(None)


class LoopClock:
    """:class:`Clock` backed by an asyncio event loop's ``time()`` and timers.

    Works on any asyncio-compatible loop: the stock loop, uvloop, and ``VirtualTimeLoop``.

    ``loop``: bind the clock to this loop.  When omitted (the usual case) every call uses the loop
    running in the calling thread, so one clock object can be created before the loop exists.
    A bound clock's ``now()`` also works while its loop is not running (e.g. between
    ``VirtualTimeLoop.run_until`` steps); its ``sleep*`` methods must run on that loop.
    """

    __slots__ = ("_loop", "now", "call_at", "call_soon")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        # A bound clock resolves its scheduling methods once (hot path); an unbound one per call.
        if loop is not None:
            self.now = loop.time
            self.call_at = getattr(loop, "call_at_plain", None) or loop.call_at
            self.call_soon = getattr(loop, "call_soon_plain", None) or loop.call_soon
        else:
            self.now = self._now
            self.call_at = self._call_at
            self.call_soon = self._call_soon

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The bound loop, or None when the clock follows the running loop."""
        return self._loop

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        running = asyncio.get_running_loop()
        if self._loop is not None and running is not self._loop:
            # Sleeping on one loop with another loop's timers would never wake up.
            raise RuntimeError(f"LoopClock is bound to {self._loop!r} but runs on {running!r}")
        return running

    def _now(self) -> float:
        """Current loop time, in seconds (``loop.time()``)."""
        if self._loop is not None:
            return self._loop.time()
        return asyncio.get_running_loop().time()

    async def sleep(self, delay: float) -> None:
        """Suspend for ``delay`` seconds of loop time; ``delay <= 0`` yields to other tasks once.

        Equivalent to ``asyncio.sleep(delay)``: wakes when the loop's own timer for
        ``now() + delay`` fires.  uvloop rounds timer delays to whole milliseconds, so there it can
        wake up to half a millisecond early; use :meth:`sleep_until` when ``now()`` must have
        reached a deadline.  Raises ValueError for a NaN delay (which loops would otherwise treat
        as 0 or as garbage).
        """
        self._running_loop()
        if delay != delay:
            raise ValueError("delay must not be NaN")
        await asyncio.sleep(delay)

    async def sleep_until(self, deadline: float) -> None:
        """Suspend until loop time ``deadline`` (seconds); a deadline not in the future yields once.

        On return ``now() >= deadline``, on any loop.  The wake-up is scheduled with
        ``loop.call_at(deadline)`` rather than ``sleep(deadline - now())``: ``now + (deadline -
        now)`` need not equal ``deadline`` in floating point, and on a virtual loop the wake-up must
        land on ``deadline`` exactly (it does, with no extra loop iteration).  A real loop's timer
        may fire a little before its deadline (uvloop rounds delays to whole milliseconds): then
        the timer is re-armed, and on uvloop the rest of the millisecond is spent yielding to the
        loop (other tasks keep running).  Raises ValueError for a NaN deadline.
        """
        loop = self._running_loop()
        if deadline != deadline:
            raise ValueError("deadline must not be NaN")
        if deadline <= loop.time():
            await asyncio.sleep(0)
            return
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            handle = loop.call_at(deadline, _wake, fut)
            try:
                await fut
            finally:
                # On cancellation drop the timer so it does not linger in the loop's heap.
                handle.cancel()
            if loop.time() >= deadline:
                return

    def _call_at(self, when: float, fn: Callable[..., object], *args: Any) -> Any:
        """``loop.call_at(when, fn, *args)``; on a :class:`~helix_async.vloop.VirtualTimeLoop` its
        bare-callback variant ``call_at_plain`` (exceptions stop the simulation)."""
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        plain = getattr(loop, "call_at_plain", None)
        if plain is not None:
            return plain(when, fn, *args)
        return loop.call_at(when, fn, *args)

    def _call_soon(self, fn: Callable[..., object], *args: Any) -> Any:
        """``loop.call_soon(fn, *args)`` (``call_soon_plain`` on a virtual loop)."""
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        plain = getattr(loop, "call_soon_plain", None)
        if plain is not None:
            return plain(fn, *args)
        return loop.call_soon(fn, *args)

    def __repr__(self) -> str:
        return f"LoopClock(loop={self._loop!r})"


class MonotonicClock:
    """:class:`Clock` for real time on the running loop, with a high-resolution ``now()``.

    ``now()`` is ``time.monotonic()`` (sub-microsecond on Linux) rather than ``loop.time()``:
    uvloop's ``time()`` is libuv's cached millisecond clock, too coarse for per-token latencies of
    a fast model.  Timers are the loop's, set with ``call_later(when - now())`` (uvloop still
    rounds their delays to whole milliseconds); ``sleep_until`` returns only once ``now()`` has
    reached the deadline.  The serving runtime's host and workers use it; the simulator uses
    :class:`LoopClock` on a :class:`~helix_async.vloop.VirtualTimeLoop`.
    """

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = time.monotonic

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> Any:
        return asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), fn, *args)

    def call_soon(self, fn: Callable[..., object], *args: Any) -> Any:
        return asyncio.get_running_loop().call_soon(fn, *args)

    async def sleep(self, delay: float) -> None:
        if delay != delay:
            raise ValueError("delay must not be NaN")
        await asyncio.sleep(delay)

    async def sleep_until(self, deadline: float) -> None:
        if deadline != deadline:
            raise ValueError("deadline must not be NaN")
        left = deadline - time.monotonic()
        if left <= 0:
            await asyncio.sleep(0)
            return
        while left > 0:
            await asyncio.sleep(left)
            left = deadline - time.monotonic()

    def __repr__(self) -> str:
        return "MonotonicClock()"
