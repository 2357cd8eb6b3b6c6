"""Virtual-time event loop throughput: VirtualTimeLoop next to a bare heapq scheduler, in one run.

Run: ``python bench/bench_vloop.py [--timers N] [--tasks T] [--sleeps K] [--chain N] [--gc-off]``.

The simulator drives every request, batch and network transfer through ``VirtualTimeLoop``, so its
cost per callback bounds how fast a simulated hour can run.  The floor is a minimal discrete-event
scheduler (a heap of ``(when, seq, fn, args)``, :class:`HeapLoop` below): the ratio says what the
asyncio machinery (handles, futures, tasks) costs on top of it.

Workloads (seeded RNG, times drawn before timing starts):

* ``timers``: N callbacks ``call_at`` uniformly random times in [0, 1000) s, then run them all.
* ``tasks``: T coroutines each sleeping K random (exponential, mean 1 s) delays.  The asyncio
  version costs two callbacks per sleep (timer fires a future, then the task step), the heap
  version one generator resume, so the table also gives ns per simulated sleep ("event").
* ``call_soon chain``: N callbacks each scheduling the next with ``call_soon``, on the stock
  asyncio loop, on uvloop if installed, and on VirtualTimeLoop: for reference only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import random
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ns_per_op, table  # noqa: E402

from helix_async.vloop import VirtualTimeLoop  # noqa: E402

# ---------------------------------------------------------------------------- the floor


class HeapLoop:
    """Minimal discrete-event scheduler: FIFO among equal times, virtual ``now`` in seconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._seq = 0
        self.callbacks_run = 0

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``when`` (seconds); a past ``when`` means now.

        Same ordering as ``VirtualTimeLoop``: a past deadline is queued at the current time, behind
        what is already due (so the floor pays for the same comparison).
        """
        self._seq += 1
        heapq.heappush(self._heap, (when if when > self.now else self.now, self._seq, fn, args))

    def spawn(self, proc: Generator[float, None, None]) -> None:
        """Start a process: a generator yielding delays (seconds) to sleep between steps."""
        self.call_at(self.now, self._step, proc)

    def _step(self, proc: Generator[float, None, None]) -> None:
        try:
            delay = next(proc)
        except StopIteration:
            return
        self.call_at(self.now + delay, self._step, proc)

    def run(self) -> None:
        """Run until the schedule is empty."""
        heap, pop, n = self._heap, heapq.heappop, 0
        while heap:
            when, _, fn, args = pop(heap)
            self.now = when  # never earlier than now: call_at keys past deadlines at now
            fn(*args)
            n += 1
        self.callbacks_run += n


# ---------------------------------------------------------------------------- workloads


@dataclass
class Row:
    """One measured line: ``ns`` per callback and per simulated event (sleep or timer)."""

    workload: str
    loop: str
    callbacks: int
    events: int
    ns_per_callback: float
    ns_per_event: float


def _draw_times(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, 1000.0) for _ in range(n)]


def _draw_sleeps(tasks: int, sleeps: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.expovariate(1.0) for _ in range(sleeps)] for _ in range(tasks)]


# Set by main(--gc-off): measure with the cyclic garbage collector disabled.  With ~10^5 live
# handles/tuples, the collector's generation-2 passes are a large share of the cost of both loops.
GC_OFF = False


def _measure(fn: Callable[[], int], repeat: int) -> tuple[int, float]:
    """Run ``fn`` (returns callbacks run) best-of-``repeat``; give callbacks and best ns per run."""
    was_enabled = gc.isenabled()
    if GC_OFF:
        gc.disable()
    try:
        callbacks = fn()  # also the warm-up; workloads are deterministic, so counts do not vary
        ns_run = ns_per_op(fn, 1, repeat=repeat, min_time=0.0)
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()
    return callbacks, ns_run


def bench_timers(n: int, seed: int, repeat: int) -> list[Row]:
    """N random-time callbacks on VirtualTimeLoop and on HeapLoop."""
    whens = _draw_times(n, seed)

    def noop() -> None:
        pass

    def on_vloop() -> int:
        loop = VirtualTimeLoop()
        try:
            call_at = loop.call_at
            for w in whens:
                call_at(w, noop)
            loop.run_until(1001.0)
            return loop.callbacks_run
        finally:
            loop.close()

    def on_heap() -> int:
        loop = HeapLoop()
        call_at = loop.call_at
        for w in whens:
            call_at(w, noop)
        loop.run()
        return loop.callbacks_run

    rows = []
    for name, fn in (("VirtualTimeLoop", on_vloop), ("HeapLoop", on_heap)):
        cbs, ns = _measure(fn, repeat)
        rows.append(Row("timers", name, cbs, n, ns / cbs, ns / n))
    return rows


def bench_tasks(tasks: int, sleeps: int, seed: int, repeat: int) -> list[Row]:
    """T coroutines x K random sleeps on VirtualTimeLoop, T generators x K on HeapLoop."""
    plan = _draw_sleeps(tasks, sleeps, seed)
    events = tasks * sleeps

    async def proc_async(delays: list[float]) -> None:
        for d in delays:
            await asyncio.sleep(d)

    async def main() -> None:
        await asyncio.gather(*(proc_async(d) for d in plan))

    def on_vloop() -> int:
        loop = VirtualTimeLoop()
        try:
            loop.run_until_complete(main())
            return loop.callbacks_run
        finally:
            loop.close()

    def proc_gen(delays: list[float]) -> Generator[float, None, None]:
        yield from delays

    def on_heap() -> int:
        loop = HeapLoop()
        for d in plan:
            loop.spawn(proc_gen(d))
        loop.run()
        return loop.callbacks_run

    rows = []
    for name, fn in (("VirtualTimeLoop", on_vloop), ("HeapLoop", on_heap)):
        cbs, ns = _measure(fn, repeat)
        rows.append(Row("tasks", name, cbs, events, ns / cbs, ns / events))
    return rows


def bench_call_soon_chain(n: int, repeat: int) -> list[Row]:
    """N chained call_soon callbacks on stock asyncio, uvloop (if installed), VirtualTimeLoop."""
    factories: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [
        ("asyncio (stock)", asyncio.new_event_loop)
    ]
    try:
        import uvloop

        factories.append(("uvloop", uvloop.new_event_loop))
    except ImportError:
        pass
    factories.append(("VirtualTimeLoop", VirtualTimeLoop))

    def make(factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], int]:
        def run() -> int:
            loop = factory()
            left = n

            def step() -> None:
                nonlocal left
                left -= 1
                if left:
                    loop.call_soon(step)
                else:
                    loop.stop()

            try:
                loop.call_soon(step)
                loop.run_forever()
            finally:
                loop.close()
            return n

        return run

    rows = []
    for name, factory in factories:
        cbs, ns = _measure(make(factory), repeat)
        rows.append(Row("call_soon chain", name, cbs, n, ns / cbs, ns / n))
    return rows


# ---------------------------------------------------------------------------- report


def run_all(
    *,
    timers: int = 100_000,
    tasks: int = 500,
    sleeps: int = 100,
    chain: int = 100_000,
    seed: int = 0,
    repeat: int = 3,
) -> list[Row]:
    """Run every workload; return the rows (importable entry point)."""
    return [
        *bench_timers(timers, seed, repeat),
        *bench_tasks(tasks, sleeps, seed, repeat),
        *bench_call_soon_chain(chain, repeat),
    ]


def format_rows(rows: Sequence[Row]) -> str:
    """Table with ns/callback, ns/event, and the ratio to the same workload's HeapLoop row."""
    floor = {r.workload: r for r in rows if r.loop == "HeapLoop"}
    out: list[tuple[str, ...]] = []
    for r in rows:
        base = floor.get(r.workload)
        if base is None:
            ratio_cb = ratio_ev = "-"
        else:
            ratio_cb = f"{r.ns_per_callback / base.ns_per_callback:.1f}x"
            ratio_ev = f"{r.ns_per_event / base.ns_per_event:.1f}x"
        out.append(
            (
                r.workload,
                r.loop,
                f"{r.callbacks:,}",
                f"{r.ns_per_callback:.0f}",
                f"{1e9 / r.ns_per_callback / 1e6:.2f}",
                ratio_cb,
                f"{r.ns_per_event:.0f}",
                ratio_ev,
            )
        )
    header = ("workload", "loop", "callbacks", "ns/callback", "M cb/s", "vs heap", "ns/event", "vs heap")
    return table(out, header)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--timers", type=int, default=100_000, help="callbacks in the timers workload")
    ap.add_argument("--tasks", type=int, default=500, help="coroutines in the tasks workload")
    ap.add_argument("--sleeps", type=int, default=100, help="sleeps per coroutine")
    ap.add_argument("--chain", type=int, default=100_000, help="length of the call_soon chain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--gc-off", action="store_true", help="disable the cyclic GC while measuring")
    args = ap.parse_args(argv)
    global GC_OFF
    GC_OFF = args.gc_off
    rows = run_all(
        timers=args.timers,
        tasks=args.tasks,
        sleeps=args.sleeps,
        chain=args.chain,
        seed=args.seed,
        repeat=args.repeat,
    )
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
