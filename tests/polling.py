"""Waiting in tests without depending on the machine's speed.

* :func:`wait_until` / :func:`wait_until_async`: poll a condition until it holds.  Their timeout
  only turns a hang into a failure (60 s by default, far beyond what any condition here needs on a
  loaded machine); it never checks speed.  A test waits for the state it needs (a counter
  reached, a process gone, a node ready), never for a fixed time.
* :func:`read_line`: the next line a started process prints, bounded the same way.
* :class:`SteppedClock`: a :class:`helix_async.clock.Clock` whose time moves only when the test
  calls :meth:`SteppedClock.advance`, for code whose rules are about elapsed loop time (a heartbeat
  window, a quiet period) while its sockets run on a real event loop.  The test then checks the
  rule at exact times, whatever the CPU does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: seconds before a wait gives up and fails the test (a bound on hangs, not a speed check)
TIMEOUT = 60.0
#: seconds between two looks at the condition
INTERVAL = 0.01


def _not_reached(what: str, predicate: Callable[[], Any], timeout: float) -> AssertionError:
    name = what or getattr(predicate, "__name__", repr(predicate))
    return AssertionError(f"not reached within {timeout:g} s: {name}")


def wait_until(predicate: Callable[[], T], timeout: float = TIMEOUT, interval: float = INTERVAL, what: str = "") -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value, and return that
    value; raise AssertionError (naming ``what``) if ``timeout`` seconds of wall time pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _not_reached(what, predicate, timeout)
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T], timeout: float = TIMEOUT, interval: float = INTERVAL, what: str = ""
) -> T:
    """:func:`wait_until` on the running event loop: other tasks run between the looks.  The
    timeout is measured on the loop's clock (seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise _not_reached(what, predicate, timeout)
        await asyncio.sleep(interval)


def read_line(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """The next line ``proc`` writes on its (piped, text) stdout; if none comes within ``timeout``
    seconds, the process is killed and the test fails with what it wrote on stderr."""
    assert proc.stdout is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(proc.stdout.readline)
        try:
            return pending.result(timeout)
        except concurrent.futures.TimeoutError:
            proc.kill()  # (this also ends the blocked read)
            _, err = proc.communicate()
            raise AssertionError(f"no line from the process within {timeout:g} s; its stderr:\n{err}") from None


class _Timer:
    __slots__ = ("cancelled", "fn", "args")

    def __init__(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.cancelled = False
        self.fn = fn
        self.args = args

    def cancel(self) -> None:
        self.cancelled = True


class SteppedClock:
    """A clock for one event loop whose time (seconds, from ``start``) moves only in
    :meth:`advance`.  Sleepers and ``call_at`` callbacks whose time has come run then, in time
    order; ``call_soon`` is the loop's.  ``sleeps`` counts the sleeps begun so far: a task that
    sleeps in a loop has finished its round once the count grows after an :meth:`advance`."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = float(start)
        self.sleeps = 0
        self._due: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        await self.sleep_until(self.t + max(0.0, delay))

    async def sleep_until(self, deadline: float) -> None:
        self.sleeps += 1
        if deadline <= self.t:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_at(deadline, _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> _Timer:
        timer = _Timer(fn, args)
        heapq.heappush(self._due, (when, next(self._order), timer))
        return timer

    def call_soon(self, fn: Callable[..., object], *args: Any) -> asyncio.Handle:
        return asyncio.get_running_loop().call_soon(fn, *args)

    def advance(self, delay: float) -> None:
        """Move time ``delay`` seconds on and run what has come due (sleepers wake on the loop's
        next turns)."""
        self.t += delay
        while self._due and self._due[0][0] <= self.t:
            _, _, timer = heapq.heappop(self._due)
            if not timer.cancelled:
                timer.fn(*timer.args)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
