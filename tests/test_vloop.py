"""Tests of the virtual-time event loop (helix_async.vloop) and LoopClock (helix_async.clock).

Everything here is deterministic: virtual time does not depend on the machine.  No test asserts
wall-clock speed beyond one very generous sanity bound; speed is measured in bench/bench_vloop.py.
"""

from __future__ import annotations

import asyncio
import contextvars
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


@pytest.fixture
def loop() -> Iterator[VirtualTimeLoop]:
    lp = VirtualTimeLoop()
    try:
        yield lp
    finally:
        lp.close()


def now() -> float:
    return asyncio.get_running_loop().time()


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


# ---------------------------------------------------------------------------- FIFO order


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


def test_loop_clock_bound_to_other_loop_refuses(loop: VirtualTimeLoop) -> None:
    async def main() -> None:
        await LoopClock(loop).sleep(1.0)

    with pytest.raises(RuntimeError, match="bound to"):
        run_virtual(main())


def test_loop_clock_on_stock_asyncio() -> None:
    async def main() -> bool:
        clock = LoopClock()
        t0 = clock.now()
        await clock.sleep(0.001)
        await clock.sleep_until(clock.now() + 0.001)
        return clock.now() >= t0 + 0.002

    assert asyncio.run(main())


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
