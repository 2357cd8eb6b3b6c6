"""Tests of the virtual-time event loop (helix_async.vloop) and LoopClock (helix_async.clock).

The tests of asyncio semantics run on the virtual loop, uvloop (the runtime loop) and the stock
asyncio loop; on the real loops they use millisecond delays and check only order and behaviour.
The virtual-only tests are deterministic: virtual time does not depend on the machine.  No test
asserts wall-clock time; speed is measured in bench/bench_vloop.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import pickle
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from helix_async import vloop
from helix_async.clock import Clock, LoopClock
from helix_async.errors import HelixError
from helix_async.vloop import DeadlockError, VirtualTimeIOError, VirtualTimeLoop, run_virtual


def now() -> float:
    return asyncio.get_running_loop().time()


# ---------------------------------------------------------------------------- shared semantics
#
# The tests in this section are about asyncio semantics that host/worker code relies on, so they
# run on the virtual loop and on the real-time loops too: uvloop (the runtime loop) and the stock
# asyncio loop.  On real loops they use delays of a few milliseconds and assert only order and
# behaviour, never how long anything took.  Virtual-only behaviour (time jumps, exact timestamps,
# refused I/O and threads, deadlock detection, run_until/run_virtual) is tested further down.

_LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "virtual": VirtualTimeLoop,
    "asyncio": asyncio.new_event_loop,
}
try:
    import uvloop
except ImportError:  # a core dependency: only a broken install lacks it (its cases are skipped)
    pass
else:
    _LOOP_FACTORIES["uvloop"] = uvloop.new_event_loop

# A real loop's timers fire at least this long after they were scheduled: long enough for a test's
# synchronous scheduling code to finish first (uvloop's timers have millisecond resolution).
_MARGIN = 0.005


def _loops(*names: str) -> list[Any]:
    return [
        pytest.param(
            name,
            id=name,
            marks=pytest.mark.skipif(name not in _LOOP_FACTORIES, reason=f"{name} is not importable"),
        )
        for name in names
    ]


# Every loop.
ALL_LOOPS = _loops("virtual", "uvloop", "asyncio")
# Loops that run timers in the order they were scheduled when their deadlines tie, and run a timer
# whose deadline has passed at the current time, after everything already due: the virtual loop by
# design, uvloop through libuv (timers ordered by (deadline, start order); a past deadline becomes
# call_soon).  Stock asyncio orders its timer heap by deadline only, so neither holds there.
# uvloop counts whole milliseconds and turns call_at(when) into a delay from a clock read that may
# tick before the timer starts, so two call_at() with the same `when` can land 1 ms apart there:
# exact equal-deadline FIFO is tested on the virtual loop only (see the timer heap section).
FIFO_LOOPS = _loops("virtual", "uvloop")


@pytest.fixture
def any_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh loop of the kind named by the test's parameter; closed cleanly afterwards."""
    lp = _LOOP_FACTORIES[request.param]()
    try:
        yield lp
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                lp.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            lp.run_until_complete(lp.shutdown_asyncgens())
        finally:
            lp.close()


def _run_callbacks(lp: asyncio.AbstractEventLoop, schedule: Callable[[], object], wait: float) -> None:
    """Run ``schedule()`` as a callback on ``lp``, then run until a timer ``wait`` s later fires.

    That last timer is set after ``schedule()`` returns, so however long scheduling takes it comes
    after every timer ``schedule()`` set less than ``wait`` s ahead (loops run due timers in
    deadline order).
    """

    async def main() -> None:
        done = lp.create_future()

        def run() -> None:
            schedule()
            lp.call_later(wait, done.set_result, None)

        lp.call_soon(run)
        await done

    lp.run_until_complete(main())


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_call_soon_is_fifo_per_iteration(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    order: list[Any] = []

    def cb(i: int) -> None:
        order.append(i)
        if i % 2 == 0:
            # Scheduled while the batch runs: runs after the whole batch, in scheduling order.
            lp.call_soon(order.append, ("child", i))

    def schedule() -> None:
        for i in range(100):
            lp.call_soon(cb, i)

    _run_callbacks(lp, schedule, _MARGIN)
    assert order == list(range(100)) + [("child", i) for i in range(0, 100, 2)]


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_timers_run_in_deadline_order(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    order: list[int] = []
    ticks = [7, 2, 9, 4, 1, 8, 3, 6, 5, 10]

    def schedule() -> None:
        base = lp.time()
        for k in ticks:
            # 2 ms apart: uvloop may move a call_at deadline by 1 ms (see FIFO_LOOPS).
            lp.call_at(base + _MARGIN + 0.002 * k, order.append, k)

    _run_callbacks(lp, schedule, _MARGIN + 0.03)
    assert order == sorted(ticks)


@pytest.mark.parametrize("any_loop", FIFO_LOOPS, indirect=True)
def test_equal_delay_timers_run_fifo(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    order: list[int] = []

    def schedule() -> None:
        # Interleave other delays so the heap really has to sort, and schedule the equal-delay
        # timers from many heap positions.
        for i in range(1000):
            lp.call_later(_MARGIN + 0.003, order.append, i)
            lp.call_later(_MARGIN + 0.001 * (i % 7), lambda: None)

    _run_callbacks(lp, schedule, _MARGIN + 0.02)
    assert order == list(range(1000))


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_past_deadline_timer_runs_after_ready_callbacks(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    order: list[str] = []

    def schedule() -> None:
        lp.call_soon(order.append, "soon-1")
        lp.call_soon(order.append, "soon-2")
        lp.call_later(-1.0, order.append, "negative-delay")
        lp.call_at(lp.time() - 5.0, order.append, "past")

    _run_callbacks(lp, schedule, _MARGIN)
    assert order[:2] == ["soon-1", "soon-2"]
    assert sorted(order[2:]) == ["negative-delay", "past"]


@pytest.mark.parametrize("any_loop", FIFO_LOOPS, indirect=True)
def test_past_deadline_timer_does_not_overtake_timers_due_now(
    any_loop: asyncio.AbstractEventLoop,
) -> None:
    # A deadline in the past means "now": the timer runs after the callbacks and timers that were
    # already due now, in the order they were scheduled.  (Stock asyncio runs due timers in
    # deadline order, so there "past" would overtake "due-now".)
    lp = any_loop
    order: list[str] = []

    def schedule() -> None:
        lp.call_soon(order.append, "soon")
        lp.call_at(lp.time(), order.append, "due-now")
        lp.call_later(-1.0, order.append, "negative-delay")
        lp.call_at(lp.time() - 0.5, order.append, "past")
        lp.call_later(0, order.append, "zero-delay")

    _run_callbacks(lp, schedule, _MARGIN)
    assert order == ["soon", "due-now", "negative-delay", "past", "zero-delay"]


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_cancelled_callbacks_and_tasks(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    ran: list[str] = []
    cancelled: list[str] = []

    async def sleeper() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append("sleeper")
            raise
        ran.append("sleeper finished")

    async def main() -> None:
        base = lp.time()
        handles = [
            lp.call_soon(ran.append, "soon"),
            lp.call_later(_MARGIN, ran.append, "later"),
            lp.call_at(base + _MARGIN, ran.append, "at"),
            lp.call_at(base + _MARGIN, ran.append, "at-twin"),  # same deadline, one cancelled
            lp.call_later(-1.0, ran.append, "past"),
        ]
        for h in handles[::2]:
            h.cancel()
        assert all(h.cancelled() for h in handles[::2]) and not handles[1].cancelled()
        task = asyncio.create_task(sleeper())
        await asyncio.sleep(0)  # let it start sleeping
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        await asyncio.sleep(_MARGIN + 0.005)

    lp.run_until_complete(main())
    assert sorted(ran) == ["at-twin", "later"]
    assert cancelled == ["sleeper"]


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_timeout_and_wait_for(any_loop: asyncio.AbstractEventLoop) -> None:
    inner_cancelled: list[bool] = []

    async def slow(delay: float) -> str:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            inner_cancelled.append(True)
            raise
        return "done"

    async def main() -> list[str]:
        out = []
        try:
            async with asyncio.timeout(0.002):
                await asyncio.sleep(3600)
        except TimeoutError:
            out.append("timeout")
        try:
            await asyncio.wait_for(slow(3600), timeout=0.002)
        except TimeoutError:
            out.append("wait_for timeout")
        out.append(await asyncio.wait_for(slow(0.001), timeout=3600))
        return out

    assert any_loop.run_until_complete(main()) == ["timeout", "wait_for timeout", "done"]
    assert inner_cancelled == [True]


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_callbacks_run_in_their_context(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="default")
    seen: list[tuple[str, str]] = []

    def record(tag: str) -> None:
        seen.append((tag, var.get()))

    ctx = contextvars.copy_context()
    ctx.run(var.set, "explicit")

    def schedule() -> None:
        var.set("caller")  # a callback runs in a copy of the context current when scheduled
        lp.call_soon(record, "soon")
        lp.call_soon(record, "soon-ctx", context=ctx)
        lp.call_later(0.001, record, "later-ctx", context=ctx)
        lp.call_at(lp.time() + 0.001, record, "at")

    _run_callbacks(lp, schedule, _MARGIN)
    assert sorted(seen) == [
        ("at", "caller"),
        ("later-ctx", "explicit"),
        ("soon", "caller"),
        ("soon-ctx", "explicit"),
    ]


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_callback_exception_goes_to_the_handler(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    caught: list[BaseException | None] = []
    ran: list[str] = []
    lp.set_exception_handler(lambda _lp, context: caught.append(context.get("exception")))

    def boom() -> None:
        raise ValueError("boom")

    def schedule() -> None:
        lp.call_soon(boom)
        lp.call_soon(ran.append, "after")
        lp.call_later(0.001, boom)
        lp.call_later(0.002, ran.append, "later")

    _run_callbacks(lp, schedule, _MARGIN)
    assert ran == ["after", "later"]  # the loop keeps going
    assert [type(e) for e in caught] == [ValueError, ValueError]


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_loop_clock_now_sleep_sleep_until(any_loop: asyncio.AbstractEventLoop) -> None:
    lp = any_loop
    bound = LoopClock(lp)
    free = LoopClock()
    assert isinstance(bound, Clock) and isinstance(free, Clock)
    before = lp.time()
    assert before <= bound.now() <= lp.time()  # a bound clock reads its loop while stopped
    assert bound.loop is lp and free.loop is None

    async def main() -> None:
        stamps = [free.now()]
        assert before <= stamps[0] <= lp.time()

        await free.sleep(0.001)  # the loop's timer: on uvloop it may fire up to 0.5 ms early
        stamps.append(bound.now())

        # Deadlines off the loop's clock grid (uvloop counts whole milliseconds and rounds a
        # timer's delay to the nearest one): sleep_until never returns before its deadline.
        for k in range(8):
            deadline = bound.now() + 0.001 + 0.0002 * k
            await bound.sleep_until(deadline)
            assert free.now() >= deadline
            stamps.append(free.now())

        # A past deadline, sleep(0) and sleep(-1) just yield once: a callback scheduled before
        # the await runs before it returns, the loop time does not go backwards.
        for op in (
            lambda: bound.sleep_until(free.now() - 1.0),
            lambda: free.sleep(0),
            lambda: free.sleep(-1.0),
        ):
            yielded: list[bool] = []
            lp.call_soon(yielded.append, True)
            await op()
            assert yielded == [True]
            stamps.append(free.now())

        assert stamps == sorted(stamps)  # loop time never goes backwards

    lp.run_until_complete(main())


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_loop_clock_sleep_until_cancel(any_loop: asyncio.AbstractEventLoop) -> None:
    clock = LoopClock()

    async def main() -> str:
        task = asyncio.create_task(clock.sleep_until(clock.now() + 3600.0))
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return "cancelled"

    assert any_loop.run_until_complete(main()) == "cancelled"


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_loop_clock_bound_to_other_loop_refuses(any_loop: asyncio.AbstractEventLoop) -> None:
    other = VirtualTimeLoop()
    try:

        async def main() -> None:
            with pytest.raises(RuntimeError, match="bound to"):
                await LoopClock(other).sleep(0.001)
            with pytest.raises(RuntimeError, match="bound to"):
                await LoopClock(other).sleep_until(0.0)

        any_loop.run_until_complete(main())
    finally:
        other.close()


@pytest.mark.parametrize("any_loop", ALL_LOOPS, indirect=True)
def test_loop_clock_rejects_nan(any_loop: asyncio.AbstractEventLoop) -> None:
    clock = LoopClock()

    async def main() -> None:
        with pytest.raises(ValueError, match="NaN"):
            await clock.sleep(math.nan)
        with pytest.raises(ValueError, match="NaN"):
            await clock.sleep_until(math.nan)

    any_loop.run_until_complete(main())


# ---------------------------------------------------------------------------- long sleeps


def test_hours_of_virtual_sleep_are_fast_and_exact() -> None:
    # 10 tasks; task i sleeps 2.4 h (8640 s) in steps of 30 * k_i s (k_i divides 288, so each is
    # a whole number of steps): 24 h of virtual sleeping in all.
    ks = [1, 2, 3, 4, 6, 8, 9, 12, 16, 18]

    async def sleeper(i: int) -> tuple[int, float]:
        step = 30.0 * ks[i]
        for _ in range(8640 // (30 * ks[i])):
            await asyncio.sleep(step)
        return i, now()

    async def main() -> list[tuple[int, float]]:
        return await asyncio.gather(*(sleeper(i) for i in range(10)))

    # Finishing at all proves time jumped: a real-time loop would need 2.4 hours (speed is in bench/).
    results = run_virtual(main())
    assert results == [(i, 8640.0) for i in range(10)]


def test_start_time_and_sleep_until_exact() -> None:
    async def main() -> list[float]:
        clock = LoopClock()
        seen = [clock.now()]
        for _ in range(10):
            await asyncio.sleep(0.1)
        seen.append(clock.now())
        await clock.sleep_until(3600.0)
        seen.append(clock.now())
        await clock.sleep_until(1e9 + 0.3)
        seen.append(clock.now())
        return seen

    acc = 100.0
    for _ in range(10):
        acc += 0.1  # the same float additions the loop does: now + delay, ten times
    assert run_virtual(main(), start=100.0) == [100.0, acc, 3600.0, 1e9 + 0.3]


def test_time_never_goes_backwards(loop: VirtualTimeLoop) -> None:
    stamps: list[tuple[str, float]] = []

    def record(tag: str) -> None:
        stamps.append((tag, loop.time()))

    def at_five() -> None:
        record("five")
        # Scheduled in the past: must run at the current time, never rewind the clock.
        loop.call_at(1.0, record, "past")
        loop.call_later(-3.0, record, "negative-delay")

    loop.call_at(5.0, at_five)
    loop.call_at(7.0, record, "seven")
    loop.run_until(10.0)
    assert stamps == [("five", 5.0), ("past", 5.0), ("negative-delay", 5.0), ("seven", 7.0)]
    assert loop.time() == 10.0
    with pytest.raises(ValueError):
        loop.run_until(9.0)


# ---------------------------------------------------------------------------- timer heap


@pytest.mark.parametrize("debug", [False, True], ids=["fast", "debug"])
def test_past_timer_is_queued_at_the_current_time(debug: bool) -> None:
    lp = VirtualTimeLoop(start=2.0)
    try:
        lp.set_debug(debug)
        stamps: list[tuple[str, float]] = []
        handles: list[asyncio.TimerHandle] = []
        next_at: list[float | None] = []

        def record(tag: str) -> None:
            stamps.append((tag, lp.time()))

        def at_five() -> None:
            handles.append(lp.call_later(-1.0, record, "negative-delay"))
            handles.append(lp.call_at(0.5, record, "past"))  # before start: still "now"
            next_at.append(lp.next_timer_at())

        lp.call_at(5.0, at_five)
        lp.call_at(5.0, record, "due-at-five")  # due in the same iteration as at_five
        lp.call_at(6.0, lambda: lp.call_at(5.5, record, "past-at-six"))
        lp.call_at(6.0, record, "six")
        lp.run_until(10.0)
        assert stamps == [
            ("due-at-five", 5.0),
            ("negative-delay", 5.0),
            ("past", 5.0),
            ("six", 6.0),
            ("past-at-six", 6.0),
        ]
        assert next_at == [5.0]  # they fire now, not at their (past) deadlines
        assert [h.when() for h in handles] == [4.0, 0.5]  # the deadlines asked for
        assert lp.next_timer_at() is None and lp._timer_cancelled_count == 0
    finally:
        lp.close()


def test_fifo_same_time_call_at(loop: VirtualTimeLoop) -> None:
    order: list[int] = []
    # Interleave other times so the heap really has to sort, and schedule equal-time timers from
    # many heap positions.
    for i in range(1000):
        loop.call_at(5.0, order.append, i)
        loop.call_at(5.0 + (i % 7), lambda: None)
    loop.run_until(100.0)
    assert order == list(range(1000))


def test_fifo_tasks_sleep_until() -> None:
    async def waiter(i: int, order: list[int]) -> None:
        await LoopClock().sleep_until(5.0)
        assert now() == 5.0
        order.append(i)

    async def main() -> list[int]:
        order: list[int] = []
        await asyncio.gather(*(waiter(i, order) for i in range(1000)))
        return order

    assert run_virtual(main()) == list(range(1000))


def test_cancelled_timers_are_skipped_and_compacted(loop: VirtualTimeLoop) -> None:
    fired: list[int] = []
    handles = [loop.call_at(float(i % 10), fired.append, i) for i in range(1000)]
    for h in handles[::2]:
        h.cancel()
    assert loop.next_timer_at() == 1.0  # every timer at an even time (even i) was cancelled
    loop.run_until(20.0)
    assert sorted(fired) == list(range(1, 1000, 2))
    assert loop.next_timer_at() is None
    assert loop._timer_cancelled_count == 0  # the count of cancelled timers in the heap stays exact


def test_debug_mode_timers_cancel_and_order() -> None:
    lp = VirtualTimeLoop(start=1.0)
    try:
        lp.set_debug(True)
        order: list[int] = []
        handles = [lp.call_at(3.0, order.append, i) for i in range(10)]
        handles[4].cancel()
        lp.call_later(0.5, order.append, -1)
        soon = lp.call_soon(order.append, -2)
        assert handles[0]._source_traceback  # type: ignore[attr-defined]  # debug keeps origins
        assert soon._source_traceback  # type: ignore[attr-defined]
        lp.run_until(5.0)
        assert order == [-2, -1, 0, 1, 2, 3, 5, 6, 7, 8, 9]
        assert lp.next_timer_at() is None and lp._timer_cancelled_count == 0
    finally:
        lp.close()


def test_fast_handles_match_stock_constructors(loop: VirtualTimeLoop) -> None:
    # The loop's one-frame Handle/TimerHandle constructors must set every slot the stock ones set.
    def cb(x: int) -> None:
        pass

    ctx = contextvars.copy_context()
    cases: list[tuple[Any, Any, tuple[float, ...]]] = [
        (asyncio.Handle, vloop._Handle, ()),
        (asyncio.TimerHandle, vloop._Timer, (2.5,)),
    ]
    for stock_cls, fast_cls, lead in cases:
        slots = {s for klass in stock_cls.__mro__ for s in getattr(klass, "__slots__", ())}
        slots.discard("__weakref__")
        stock = stock_cls(*lead, cb, (1,), loop, ctx)
        fast = fast_cls(*lead, cb, (1,), loop, ctx)
        assert {k: getattr(fast, k) for k in slots} == {k: getattr(stock, k) for k in slots}
        assert repr(fast).replace(fast_cls.__name__, stock_cls.__name__) == repr(stock)
        fast.cancel()
        stock.cancel()
        assert {k: getattr(fast, k) for k in slots} == {k: getattr(stock, k) for k in slots}


# ---------------------------------------------------------------------------- timeouts


def test_asyncio_timeout_fires_at_exact_virtual_time() -> None:
    async def main() -> tuple[float, float]:
        await asyncio.sleep(1.25)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2.5):
                await asyncio.sleep(3600)
        first = now()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(10.0):
                await asyncio.Event().wait()
        return first, now()

    assert run_virtual(main()) == (1.25 + 2.5, 10.0)


def test_wait_for_times_out_and_succeeds_exactly() -> None:
    async def slow(delay: float) -> str:
        await asyncio.sleep(delay)
        return "done"

    async def main() -> tuple[float, str, float]:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow(10.0), timeout=0.75)
        t_timeout = now()
        result = await asyncio.wait_for(slow(2.0), timeout=5.0)
        return t_timeout, result, now()

    assert run_virtual(main()) == (0.75, "done", 2.75)


# ---------------------------------------------------------------------------- deadlock


def test_deadlock_on_unresolved_future() -> None:
    async def main() -> None:
        await asyncio.sleep(2.0)
        await asyncio.get_running_loop().create_future()

    with pytest.raises(DeadlockError) as info:
        run_virtual(main())
    err = info.value
    assert isinstance(err, HelixError) and isinstance(err, RuntimeError)
    assert err.virtual_time == 2.0
    assert err.pending_tasks == 1
    assert "t=2.0" in str(err) and "1 task(s) pending" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.virtual_time == 2.0


def test_deadlock_counts_all_blocked_tasks() -> None:
    async def main() -> None:
        ev = asyncio.Event()
        workers = [asyncio.create_task(ev.wait(), name=f"w{i}") for i in range(3)]
        await asyncio.gather(*workers)

    with pytest.raises(DeadlockError) as info:
        run_virtual(main())
    assert info.value.pending_tasks == 4
    msg = str(info.value)
    # Tasks are listed in creation order: main's task, then w0, w1, w2.
    assert ".main)" in msg and msg.index(".main)") < msg.index("w0") < msg.index("w1") < msg.index("w2")


def test_deadlock_even_with_until() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    with pytest.raises(DeadlockError):
        run_virtual(main(), until=50.0)


def test_sleep_forever_is_a_deadlock() -> None:
    async def main() -> None:
        await asyncio.sleep(float("inf"))

    with pytest.raises(DeadlockError):
        run_virtual(main())


def test_run_until_complete_deadlock_then_loop_still_usable(loop: VirtualTimeLoop) -> None:
    fut = loop.create_future()
    with pytest.raises(DeadlockError):
        loop.run_until_complete(fut)
    # The driver (outside the loop) may still resolve it; the loop keeps working.
    fut.set_result(7)
    assert loop.run_until_complete(fut) == 7


# ---------------------------------------------------------------------------- refused I/O


def _refused(coro_fn: Callable[[], Awaitable[object]], call: str) -> None:
    async def main() -> None:
        await coro_fn()

    with pytest.raises(VirtualTimeIOError) as info:
        run_virtual(main())
    assert info.value.call == call
    assert f"loop.{call}()" in str(info.value) and "virtual time" in str(info.value)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_refuses_open_connection() -> None:
    _refused(lambda: asyncio.open_connection("127.0.0.1", 9), "create_connection")


def test_refuses_start_server() -> None:
    _refused(lambda: asyncio.start_server(lambda r, w: None, "127.0.0.1", 0), "create_server")


def test_refuses_to_thread() -> None:
    _refused(lambda: asyncio.to_thread(time.sleep, 0), "run_in_executor")


def test_refuses_run_in_executor() -> None:
    async def go() -> None:
        await asyncio.get_running_loop().run_in_executor(None, print)

    _refused(go, "run_in_executor")


def test_refuses_getaddrinfo() -> None:
    async def go() -> None:
        await asyncio.get_running_loop().getaddrinfo("localhost", 80)

    _refused(go, "getaddrinfo")


def test_refuses_subprocess() -> None:
    _refused(lambda: asyncio.create_subprocess_exec("true"), "subprocess_exec")


def test_refuses_add_reader_and_signals(loop: VirtualTimeLoop) -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(VirtualTimeIOError, match=r"loop\.add_reader\(\)"):
            loop.add_reader(a.fileno(), print)
        with pytest.raises(VirtualTimeIOError, match=r"loop\.sock_recv\(\)"):
            loop.sock_recv(a, 1)
    finally:
        a.close()
        b.close()
    with pytest.raises(VirtualTimeIOError, match=r"loop\.add_signal_handler\(\)"):
        loop.add_signal_handler(2, print)


def test_call_soon_threadsafe_from_other_thread_refused() -> None:
    errors: list[BaseException] = []

    async def main() -> str:
        loop = asyncio.get_running_loop()
        # Same thread: behaves like call_soon.
        fut: asyncio.Future[str] = loop.create_future()
        loop.call_soon_threadsafe(fut.set_result, "ok")

        def other() -> None:
            try:
                loop.call_soon_threadsafe(print)
            except VirtualTimeIOError as exc:
                errors.append(exc)

        th = threading.Thread(target=other)
        th.start()
        th.join()  # blocks the loop thread briefly; fine for a test
        return await fut

    assert run_virtual(main()) == "ok"
    assert len(errors) == 1 and "another thread" in str(errors[0])


# ---------------------------------------------------------------------------- run_virtual


def test_run_virtual_until_stops_at_deadline() -> None:
    seen: list[float] = []
    cancelled_at: list[float] = []

    async def main() -> str:
        try:
            while True:
                await asyncio.sleep(3.0)
                seen.append(now())
        except asyncio.CancelledError:
            cancelled_at.append(now())
            raise

    assert run_virtual(main(), until=10.0) is None
    assert seen == [3.0, 6.0, 9.0]
    assert cancelled_at == [10.0]


def test_run_virtual_until_is_half_open() -> None:
    async def main() -> str:
        await asyncio.sleep(10.0)
        return "finished"

    # A timer due exactly at the deadline does not run (as SimPy's env.run(until=...)).
    assert run_virtual(main(), until=10.0) is None
    assert run_virtual(main(), until=10.000001) == "finished"


def test_run_virtual_returns_early_when_main_finishes() -> None:
    async def main() -> float:
        await asyncio.sleep(1.5)
        return now()

    assert run_virtual(main(), until=1000.0, start=2.0) == 3.5


def test_exceptions_in_main_propagate() -> None:
    class Boom(Exception):
        pass

    async def main() -> None:
        await asyncio.sleep(1.0)
        raise Boom("at t=1")

    with pytest.raises(Boom, match="at t=1"):
        run_virtual(main())


def test_run_virtual_cleans_up() -> None:
    cleaned: list[str] = []

    async def background() -> None:
        try:
            await asyncio.sleep(1e6)
        finally:
            cleaned.append("background")

    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            cleaned.append("agen")

    async def main() -> int:
        asyncio.create_task(background())
        gen = agen()
        value = await gen.__anext__()  # left suspended on purpose
        await asyncio.sleep(0)
        return value

    assert run_virtual(main()) == 1
    assert sorted(cleaned) == ["agen", "background"]
    # No loop left running or set for this thread.
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_leftover_tasks_cancelled_in_creation_order() -> None:
    cleaned: list[tuple[int, float]] = []

    async def worker(i: int) -> None:
        try:
            await asyncio.sleep(1e6)
        finally:
            cleaned.append((i, now()))

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(50):
                tg.create_task(worker(i))
            await asyncio.sleep(7.0)
            raise_later = asyncio.get_running_loop().create_future()
            await raise_later  # never resolved: the deadline below ends the run

    assert run_virtual(main(), until=30.0) is None
    assert cleaned == [(i, 30.0) for i in range(50)]


def test_task_registry_is_pruned(loop: VirtualTimeLoop) -> None:
    async def short(i: int) -> int:
        await asyncio.sleep(i % 3)
        return i

    async def main() -> list[int]:
        out = []
        for _ in range(20):
            out += await asyncio.gather(*(asyncio.create_task(short(i)) for i in range(500)))
        return out

    assert sum(loop.run_until_complete(main())) == 20 * sum(range(500))
    assert len(loop._task_refs) < 2000  # 10,001 tasks were made; finished ones are dropped
    assert loop.pending_tasks() == []


def test_run_virtual_debug_mode_same_result() -> None:
    async def main() -> list[float]:
        stamps = []
        for d in (0.5, 0.25, 2.0):
            await asyncio.sleep(d)
            stamps.append(now())
        return stamps

    assert run_virtual(main(), debug=True) == run_virtual(main()) == [0.5, 0.75, 2.75]


def test_loop_stop_inside_main_is_an_error() -> None:
    async def main() -> None:
        asyncio.get_running_loop().stop()
        await asyncio.sleep(1.0)

    with pytest.raises(RuntimeError, match="stopped"):
        run_virtual(main())


def test_deadlock_in_cleanup_is_reported() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(1e6)
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # swallows the cancellation and blocks forever

    async def main() -> str:
        asyncio.create_task(stubborn())
        await asyncio.sleep(1.0)
        return "done"

    with pytest.raises(DeadlockError, match="while cancelling leftover tasks"):
        run_virtual(main())


def test_run_virtual_rejects_bad_arguments() -> None:
    async def main() -> None:
        pass

    with pytest.raises(TypeError):
        run_virtual(main)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        run_virtual(main(), until=-1.0)

    async def nested() -> None:
        run_virtual(main())

    with pytest.raises(RuntimeError, match="running event loop"):
        run_virtual(nested())


def test_run_until_steps_a_long_lived_loop(loop: VirtualTimeLoop) -> None:
    log: list[tuple[float, str]] = []
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def worker() -> None:
        while True:
            item = await queue.get()
            await asyncio.sleep(0.5)
            log.append((loop.time(), item))

    task = loop.create_task(worker())
    loop.run_until(1.0)  # worker idle: not a deadlock for run_until
    assert loop.time() == 1.0 and log == []
    queue.put_nowait("a")  # injected by the driver between steps
    loop.run_until(1.5)
    assert log == []  # its timer is due exactly at 1.5: half-open interval
    loop.run_until(2.0)
    assert log == [(1.5, "a")]
    task.cancel()
    loop.run_until(3.0)
    assert task.cancelled()


# ---------------------------------------------------------------------------- LoopClock


def test_loop_clock_on_virtual_loop(loop: VirtualTimeLoop) -> None:
    bound = LoopClock(loop)
    free = LoopClock()
    assert isinstance(bound, Clock) and isinstance(free, Clock)
    assert bound.now() == 0.0  # a bound clock reads its loop even while stopped

    async def main() -> list[float]:
        out = [free.now()]
        await free.sleep(2.5)
        out.append(bound.now())
        await bound.sleep_until(7.0)
        out.append(free.now())
        await bound.sleep_until(3.0)  # past deadline: just yields
        out.append(free.now())
        await free.sleep(0)
        out.append(free.now())
        return out

    assert loop.run_until_complete(main()) == [0.0, 2.5, 7.0, 7.0, 7.0]


def test_loop_clock_sleep_until_cancel_removes_timer(loop: VirtualTimeLoop) -> None:
    clock = LoopClock()

    async def main() -> None:
        task = asyncio.create_task(clock.sleep_until(100.0))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run_until_complete(main())
    assert loop.next_timer_at() is None
    assert loop.time() == 1.0


# ---------------------------------------------------------------------------- scenario


def test_event_queue_gather_producer_consumer() -> None:
    async def main() -> list[tuple[float, str]]:
        log: list[tuple[float, str]] = []
        go = asyncio.Event()
        queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=2)

        async def producer() -> None:
            await go.wait()
            log.append((now(), "go"))
            for i in range(5):
                await asyncio.sleep(1.0)  # produce one item per second
                await queue.put(i)  # blocks while the queue is full
                log.append((now(), f"put {i}"))
            await queue.put(None)

        async def consumer(name: str, service: float) -> None:
            while (item := await queue.get()) is not None:
                await asyncio.sleep(service)
                log.append((now(), f"{name} done {item}"))
            await queue.put(None)  # let the other consumer stop too

        async def starter() -> None:
            await asyncio.sleep(2.0)
            go.set()

        await asyncio.gather(producer(), consumer("A", 2.5), consumer("B", 4.0), starter())
        return log

    # At t=8 both consumers wake; B's timer (set at t=4) precedes A's (set at t=5.5): FIFO order.
    # B then takes item 3 and A item 4, and the producer's blocked put(None) goes through.
    assert run_virtual(main()) == [
        (2.0, "go"),
        (3.0, "put 0"),
        (4.0, "put 1"),
        (5.0, "put 2"),
        (5.5, "A done 0"),
        (6.0, "put 3"),
        (7.0, "put 4"),
        (8.0, "B done 1"),
        (8.0, "A done 2"),
        (10.5, "A done 4"),
        (12.0, "B done 3"),
    ]


def test_repeated_runs_are_identical() -> None:
    async def main() -> list[tuple[float, int]]:
        log: list[tuple[float, int]] = []

        async def job(i: int) -> None:
            for k in range(3):
                await asyncio.sleep(0.1 * ((i * 7 + k) % 5))
                log.append((now(), i))

        await asyncio.gather(*(job(i) for i in range(50)))
        return log

    assert run_virtual(main()) == run_virtual(main())


# ---------------------------------------------------------------------- bare callbacks (call_at_plain)


def test_plain_callbacks_run_in_time_then_fifo_order() -> None:
    loop = VirtualTimeLoop()
    seen: list[tuple[float, str]] = []

    def note(tag: str) -> None:
        seen.append((loop.time(), tag))

    loop.call_at_plain(2.0, note, "b")
    loop.call_at_plain(1.0, note, "a")
    loop.call_at_plain(2.0, note, "c")
    loop.call_soon_plain(note, "now")
    loop.run_until(5.0)
    assert seen == [(0.0, "now"), (1.0, "a"), (2.0, "b"), (2.0, "c")]
    assert loop.time() == 5.0
    loop.close()


def test_plain_callback_at_or_after_the_deadline_waits() -> None:
    loop = VirtualTimeLoop()
    seen: list[float] = []
    loop.call_at_plain(5.0, lambda: seen.append(loop.time()))
    loop.run_until(1.0)  # must return: the only callback is due later
    assert seen == [] and loop.time() == 1.0
    loop.run_until(5.0)  # half-open: a callback at the deadline stays pending
    assert seen == []
    loop.run_until(6.0)
    assert seen == [5.0]
    loop.close()


def test_plain_callback_cancel_and_past_deadline() -> None:
    loop = VirtualTimeLoop(start=10.0)
    seen: list[str] = []
    h = loop.call_at_plain(11.0, seen.append, "cancelled")
    loop.call_at_plain(3.0, seen.append, "past")  # a past time means now
    h.cancel()
    assert h.cancelled()
    loop.run_until(20.0)
    assert seen == ["past"]
    loop.close()


def test_plain_callback_exception_stops_the_run_and_propagates() -> None:
    loop = VirtualTimeLoop()
    seen: list[float] = []

    def boom() -> None:
        raise KeyError("broken")

    loop.call_at_plain(1.0, boom)
    loop.call_at_plain(2.0, lambda: seen.append(loop.time()))
    with pytest.raises(KeyError, match="broken"):
        loop.run_until(10.0)
    assert loop.time() == 1.0 and seen == []
    loop.run_until(10.0)  # the rest of the schedule is intact
    assert seen == [2.0]
    loop.close()


def test_plain_callbacks_interleave_with_tasks() -> None:
    seen: list[tuple[float, str]] = []

    async def main() -> str:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        loop.call_at_plain(1.5, lambda: seen.append((loop.time(), "plain")))
        await asyncio.sleep(1.0)
        seen.append((loop.time(), "task"))
        await asyncio.sleep(1.0)
        seen.append((loop.time(), "task"))
        return "done"

    assert run_virtual(main()) == "done"
    assert seen == [(1.0, "task"), (1.5, "plain"), (2.0, "task")]


def test_loop_clock_bound_uses_plain_callbacks() -> None:
    loop = VirtualTimeLoop()
    clock = LoopClock(loop)
    seen: list[float] = []
    clock.call_at(3.0, lambda: seen.append(clock.now()))
    clock.call_soon(lambda: seen.append(clock.now()))
    loop.run_until(4.0)
    assert seen == [0.0, 3.0]
    loop.close()
