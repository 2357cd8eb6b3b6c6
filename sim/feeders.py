"""Workloads that feed a :class:`sim.simulation.Simulation` (docs/original.md §8.8).

* :class:`OfflineFeeder` -- a population of queries kept topped up: ``initial`` queries at
  ``start + 0.1 i``; afterwards, until ``end``, MaxFlow launches one more query 0.1 s after each
  prompt or query completion while the KV expectation's bottleneck usage is at most ``feed_hwm``
  (0.8) and no query waits for admission (the original had no admission queue: it dropped what
  it could not place); the per-hop schedulers replace each finished query (a constant
  population).
* :class:`TraceFeeder` -- replays a trace (online: generated from an arrival series; or read
  from a CSV): each query is submitted at its arrival time.

Lengths come from a seeded :class:`sim.workloads.LengthSampler`; nothing reads the global RNG.
Either feeder takes ``priority``: called once per query as it is submitted, in submission order,
it gives the query's priority (:class:`PriorityDraw`; default 0 for all).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from helix_async.host import Query

from .simulation import Simulation
from .workloads import LengthSampler, TraceEntry

__all__ = ["FEED_GAP_S", "FEED_HWM", "HIGH_PRIORITY", "OfflineFeeder", "PriorityDraw", "TraceFeeder"]

#: Delay between a completion and the query it launches, and between initial queries (s).
FEED_GAP_S = 0.1
#: Offline MaxFlow feeding stops while the KV expectation's bottleneck usage is above this.
FEED_HWM = 0.8
#: the priority of the high class (``--priority-share``); the others keep 0 (a lower number is
#: more urgent, as vLLM's ``priority``)
HIGH_PRIORITY = -1


class PriorityDraw:
    """Each call: :data:`HIGH_PRIORITY` with probability ``share``, else 0, from a stream of its own
    seeded by ``seed`` (so the lengths and arrivals drawn are the same with any share)."""

    def __init__(self, share: float, seed: int) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the high-priority share must be in [0, 1], got {share}")
        self.share = share
        self.rng = random.Random(f"priority:{seed}")

    def __call__(self) -> int:
        return HIGH_PRIORITY if self.rng.random() < self.share else 0


class OfflineFeeder:
    """Offline workload (see the module doc). ``end``: last time a completion may launch a query."""

    def __init__(
        self,
        sim: Simulation,
        sampler: LengthSampler,
        *,
        initial: int,
        start: float,
        end: float,
        feed_hwm: float = FEED_HWM,
        priority: Callable[[], int] | None = None,
    ) -> None:
        if initial < 1:
            raise ValueError(f"initial queries must be >= 1, got {initial}")
        self.sim = sim
        self.sampler = sampler
        self.initial = initial
        self.start = start
        self.end = end
        self.feed_hwm = feed_hwm
        self.priority = priority
        self.launched = 0
        # a router admits by the KV expectation: top up when a prompt is done, unless KV is short
        self._kv_admission = sim.policy.routes_at_admission
        host = sim.host
        if self._kv_admission:
            host.on_prompt_done = self._completion
            host.on_query_done = self._completion
        else:
            host.on_query_done = self._completion

    def install(self) -> None:
        at = self.sim.clock.call_at
        for i in range(self.initial):
            at(self.start + FEED_GAP_S * i, self._launch)

    def _launch(self) -> None:
        n, m = self.sampler.sample()
        qid = self.launched
        self.launched += 1
        self.sim.host.submit(qid, n, m, priority=self.priority() if self.priority is not None else 0)

    def _completion(self, q: Query) -> None:
        clock = self.sim.clock
        now = clock.now()
        if now > self.end:
            return
        host = self.sim.host
        if self._kv_admission and host.kv_bottleneck() > self.feed_hwm:
            return
        if host.waiting and not self.sim.setup.compat:
            # queries already wait for admission: the cluster cannot serve more now
            return
        clock.call_at(now + FEED_GAP_S, self._launch)


class TraceFeeder:
    """Submits each trace entry at its arrival time; ``done`` once every query has finished."""

    def __init__(self, sim: Simulation, trace: Sequence[TraceEntry], priority: Callable[[], int] | None = None) -> None:
        if not trace:
            raise ValueError("the trace holds no queries")
        self.sim = sim
        self.trace = list(trace)
        self.priority = priority
        self.launched = 0
        sim.host.on_query_done = self._finished
        self.finished = 0

    def install(self) -> None:
        """Schedule every arrival; one before ``t0`` (models still loading) is submitted at ``t0``."""
        at = self.sim.clock.call_at
        t0 = self.sim.t0
        for qid, (t, n, m) in enumerate(self.trace):
            at(max(float(t), t0), self._submit, qid, n, m)

    def _submit(self, qid: int, n: int, m: int) -> None:
        self.launched += 1
        self.sim.host.submit(qid, n, m, priority=self.priority() if self.priority is not None else 0)

    def _finished(self, q: Query) -> None:
        self.finished += 1
        if self.finished >= len(self.trace) - self.sim.host.stats.rejected:
            self.sim.loop.stop()

    @property
    def done(self) -> bool:
        return self.finished + self.sim.host.stats.rejected >= len(self.trace)
