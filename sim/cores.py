"""Nodes that are processes of one machine, sharing its cores while they compute.

The original gives every node a device of its own.  Our CPU clusters (``tiny3``: three worker
processes on one machine) share a few cores: while ``k`` workers compute at once, the machine gives
them ``A(k)`` cores in all, ``min(k, cores)`` on a machine of their own, and each progresses at
``min(1, A(k) / k)`` (processor sharing, as a fair scheduler shares the cores).  On a machine that
others use too, ``A(k)`` is measured: the CPU time ``k`` busy processes started beside the
workers get per second (``bench/bench_drift.py``'s probe; Linux groups a session's threads and
shares the cores between groups first, so it is not a count of threads).  A batch's price from the
profile is then work, seconds of one core to itself (a profile timed by ``profile --clock cpu``),
done at that rate, and every start or end of a batch on the machine changes the rate of the others.

:class:`SharedCores` is the machine; :class:`SharedCoreExecutor` prices a node's batches with a
:class:`~helix_async.executors.cost_model.CostModelExecutor` (the same layer, lone-decode and head
rules) and runs them at the machine's rate.  A run of layers is tracked in work: ``shorten`` stops it
at a layer's end, as the cost model's runs are stopped.  Nothing here reads the wall clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from helix_async.clock import Clock
from helix_async.executors.base import Batch
from helix_async.executors.cost_model import CostModelExecutor

__all__ = ["SharedCoreExecutor", "SharedCores"]


class SharedCores:
    """``cores`` cores shared by the executors computing on them; ``available``: the cores measured
    available to ``k`` = 1, 2, ... busy processes (the last entry for more), else ``min(k, cores)``."""

    def __init__(self, clock: Clock, cores: float, available: tuple[float, ...] = ()) -> None:
        if not cores > 0:
            raise ValueError(f"cores must be > 0, got {cores!r}")
        if any(not 0 < a <= cores for a in available):
            raise ValueError(f"available cores must be in (0, {cores:g}], got {available!r}")
        self._clock = clock
        self.cores = float(cores)
        self.available = tuple(float(a) for a in available)
        self._running: list[SharedCoreExecutor] = []
        self.peak = 0  # most executors computing at once

    def rate(self, computing: int) -> float:
        """Seconds of work per second for each of ``computing`` executors computing at once."""
        if not computing:
            return 1.0
        av = self.available
        a = av[min(computing, len(av)) - 1] if av else min(float(computing), self.cores)
        return min(1.0, a / computing)

    def _changed(self) -> None:
        now = self._clock.now()
        r = self.rate(len(self._running))
        for ex in self._running:
            ex.set_rate(now, r)

    def enter(self, ex: SharedCoreExecutor) -> None:
        self._running.append(ex)
        self.peak = max(self.peak, len(self._running))
        self._changed()

    def leave(self, ex: SharedCoreExecutor) -> None:
        self._running.remove(ex)
        self._changed()


class SharedCoreExecutor:
    """A node's executor on :class:`SharedCores`: batches priced by ``pricing`` (seconds of work),
    done at the machine's rate (see the module doc)."""

    __slots__ = ("_pricing", "_cores", "_clock", "busy_time", "batches", "_batch", "_done", "_ends", "_target",
                 "_work", "_at", "_rate", "_handle", "_started")

    def __init__(self, clock: Clock, pricing: CostModelExecutor, cores: SharedCores) -> None:
        self._clock = clock
        self._pricing = pricing
        self._cores = cores
        self.busy_time = 0.0
        self.batches = 0
        self._batch: Batch | None = None
        self._done: Callable[[Batch], None] | None = None
        self._ends: list[float] = []  # work at each layer's end of the running run (then the head's)
        self._target = 0.0  # work at which the running batch is done
        self._work = 0.0  # work done at time _at
        self._at = 0.0
        self._rate = 1.0
        self._handle: Any = None
        self._started = 0.0

    def duration(self, batch: Batch) -> float:
        """Seconds of work of ``batch`` (its time alone on a core)."""
        return self._pricing.duration(batch)

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        first, rest = self._pricing.layer_times(batch)
        ends = [first]
        for _ in range(batch.layers - 1):
            ends.append(ends[-1] + rest)
        self._ends = ends
        self._target = ends[-1] + self._pricing.head_time(batch, batch.layers)
        self._batch = batch
        self._done = done
        now = self._clock.now()
        self._started = now
        self._work = 0.0
        self._at = now
        self._handle = None
        self.batches += batch.layers
        self._cores.enter(self)  # sets the rate, and with it the timer

    def set_rate(self, now: float, rate: float) -> None:
        """The machine's rate changed at ``now``: account the work done so far, move the timer."""
        self._work += (now - self._at) * self._rate
        self._at = now
        self._rate = rate
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        left = max(0.0, self._target - self._work)
        self._handle = self._clock.call_at(self._at + left / self._rate, self._finish)

    def _finish(self) -> None:
        batch, done = self._batch, self._done
        assert batch is not None and done is not None
        self._handle = None
        self._batch = None
        self.busy_time += self._clock.now() - self._started
        self._cores.leave(self)
        done(batch)

    def shorten(self, batch: Batch, layers: int) -> int:
        """Stop the running ``batch`` after ``max(layers, the layer running now)`` layers; returns
        that count (``batch.layers`` unchanged when it is not below it)."""
        n = batch.layers
        if layers >= n or batch is not self._batch:
            return n
        now = self._clock.now()
        work = self._work + (now - self._at) * self._rate
        ends = self._ends
        j = 1
        while j < layers or ends[j - 1] < work:
            j += 1
            if j >= n:
                return n
        self.batches -= n - j
        batch.layers = j
        self._target = ends[j - 1]
        self._work = work
        self._at = now
        self._schedule()
        return j
