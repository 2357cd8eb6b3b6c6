"""The rescheduling policy: which running (query, stage) moves where, by live KV migration.

Llumnix (Sun et al., OSDI'24, §4.4) measures each instance's load as the KV its running requests
use plus a *virtual usage*: the demand of the request at the head of its queue, headroom held for
high-priority requests, and "full" for an instance that drains.  At a fixed period it pairs the
most loaded instances with the least loaded and migrates requests from the first to the second.
Here a node of a Helix plan plays the instance, and the unit that moves is one stage of a query's
route (docs/migration.md).  Everything is read through the host and a ``load`` function, so the
simulator and the runtime run the same policy; ties break by a seeded generator.

A node's load, as a share of its KV capacity:

    (KV entries in use + the KV its first waiting prompt needs + headroom) / capacity

where headroom is ``headroom`` x capacity on a node that carries a query more urgent than the
default priority, and a draining node's load is infinite.  Admission reads the router's KV
expectation, not the entries in use, so a node's load is the larger of that share and the
router's expected share of its capacity.  A round (every ``period`` s of the
clock) looks at the nodes from the most loaded down.  A node above ``high`` hands stages of its
queries to the least loaded node that holds the same layers and is linked, in the plan, to the
stages before and after; that node must stay below ``low`` once it has them, and the gap between
the two must exceed ``gap``.  The least urgent query moves first, and within a priority the one
with the shortest context (the cheapest copy).  At most ``max_moves`` migrations run at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..ids import SINK, SOURCE, NodeRef

__all__ = ["MigrationConfig", "MigrationPolicy", "NodeLoad"]

#: (KV entries in use, KV capacity, entries the first prompt waiting for KV needs)
NodeLoad = tuple[int, int, int]


@dataclass(frozen=True)
class MigrationConfig:
    """The policy's parameters (module doc). period: seconds between rounds; high: a node above
    this load share gives stages away; low: a target must stay below it with what it takes; gap:
    the least load difference worth a move; headroom: the share of capacity kept free on nodes
    carrying urgent queries; max_moves: migrations in flight at once; seed: the tie-breaker's."""

    period: float = 0.5
    high: float = 0.8
    low: float = 0.7
    gap: float = 0.15
    headroom: float = 0.1
    max_moves: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        where = "<migration policy>"
        if not (math.isfinite(self.period) and self.period > 0):
            raise ConfigError(where, "period", f"must be a number of seconds > 0, got {self.period!r}")
        for name in ("high", "low", "gap", "headroom"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ConfigError(where, name, f"must be a share in [0, 1], got {v!r}")
        if not (isinstance(self.max_moves, int) and self.max_moves >= 1):
            raise ConfigError(where, "max_moves", f"must be an integer >= 1, got {self.max_moves!r}")


class MigrationPolicy:
    """Runs the rounds of the module doc on ``host``'s clock.

    host: the :class:`~helix_async.host.Host` (MaxFlow). layers: node -> [a, b) it holds. links:
    the plan's directed links (a target must be linked to the stages around the one it takes).
    load: node -> :data:`NodeLoad` now. urgent: priorities below this count as urgent (headroom).
    """

    def __init__(
        self,
        host: Any,
        clock: Any,
        layers: Mapping[int, tuple[int, int]],
        links: Collection[tuple[NodeRef, NodeRef]],
        load: Callable[[int], NodeLoad],
        config: MigrationConfig | None = None,
        *,
        urgent: int = 0,
    ) -> None:
        self.host = host
        self.clock = clock
        self.layers = dict(layers)
        self.links = frozenset(links)
        self.load = load
        self.config = config if config is not None else MigrationConfig()
        self.urgent = urgent
        self._rng = random.Random(self.config.seed)
        self.draining: set[int] = set()
        self.rounds = 0
        self.started = 0  # migrations started
        self.refused = 0  # host.migrate() said no
        self._running = False

    def start(self) -> None:
        """Run a round every ``period`` seconds from now on."""
        if not self._running:
            self._running = True
            self.clock.call_at(self.clock.now() + self.config.period, self._tick)

    def stop(self) -> None:
        self._running = False

    def drain(self, node: int) -> None:
        """Move everything off ``node`` (scale-in, SIGTERM): its load counts as full from now on,
        and a round starts at once. A target may then fill up to its whole capacity (not ``low``)."""
        self.draining.add(node)
        self.round()

    def _tick(self) -> None:
        if not self._running:
            return
        try:
            self.round()
        finally:  # (a round that raises does not stop the next)
            self.clock.call_at(self.clock.now() + self.config.period, self._tick)

    # ---- one round ------------------------------------------------------------------------------

    def loads(self) -> dict[int, float]:
        """Each node's load share (module doc)."""
        cfg = self.config
        urgent_on: set[int] = set()
        for q in self.host.active_queries():
            if q.priority < self.urgent and q.route:
                urgent_on.update(st[0] for st in q.route)
        router = getattr(self.host, "router", None)
        kv = None if router is None else router.kv
        out: dict[int, float] = {}
        for node in self.layers:
            if node in self.draining:
                out[node] = math.inf
                continue
            used, cap, demand = self.load(node)
            if cap <= 0:
                out[node] = math.inf
                continue
            extra = cfg.headroom * cap if node in urgent_on else 0.0
            share = (used + demand + extra) / cap
            if kv is not None:
                # what admission reads: the share of the node's KV the router expects taken
                try:
                    total = kv.total(node)
                except KeyError:  # a node the current plan leaves out
                    out[node] = math.inf
                    continue
                if total > 0:
                    share = max(share, 1.0 - kv.available(node) / total + extra / cap)
            out[node] = share
        return out

    def round(self) -> int:
        """One round now; returns the migrations it started."""
        self.rounds += 1
        cfg = self.config
        host = self.host
        room = cfg.max_moves - len(host.moves)
        if room <= 0:
            return 0
        loads = self.loads()
        # (most loaded first; equal loads in a seeded order)
        order = sorted(loads, key=lambda n: (-loads[n], self._rng.random()))
        by_node: dict[int, list[tuple[Any, int]]] = {}
        for q in host.active_queries():
            if q.route is None or q.qid in host.moves or q.iterations == 0 or q.decodes_left <= 0:
                continue
            for i, st in enumerate(q.route):
                by_node.setdefault(st[0], []).append((q, i))
        started = 0
        for src in order:
            if started >= room or loads[src] <= cfg.high:
                break
            cands = by_node.get(src, ())
            # least urgent first, then the shortest context (the cheapest copy)
            for q, i in sorted(cands, key=lambda c: (-c[0].priority, c[0].input_len + c[0].iterations, c[0].qid)):
                if started >= room or loads[src] <= cfg.high:
                    break
                target = self._target(q, i, loads)
                if target is None:
                    continue
                _, a, b = q.route[i]
                used, cap, _ = self.load(target)
                share = (q.input_len + q.iterations + 1) * (b - a) / max(1, cap)
                why = host.migrate(q.qid, i, target, reason=f"node {src} at {loads[src]:.2f}, node {target} at "
                                                          f"{loads[target]:.2f}")
                if why:
                    self.refused += 1
                    continue
                started += 1
                self.started += 1
                loads[target] += share
                if not math.isinf(loads[src]):
                    loads[src] -= share
        return started

    def _target(self, q: Any, i: int, loads: Mapping[int, float]) -> int | None:
        """The least loaded node that could take stage ``i`` of ``q``'s route, or None."""
        cfg = self.config
        route = q.route
        node, a, b = route[i]
        prev: NodeRef = SOURCE if i == 0 else route[i - 1][0]
        nxt: NodeRef = SINK if i == len(route) - 1 else route[i + 1][0]
        on_route = {st[0] for st in route}
        src_load = loads[node]
        limit = 1.0 if node in self.draining else cfg.low
        router = getattr(self.host, "router", None)
        kv = None if router is None else router.kv
        best = None
        best_load = math.inf
        for y, (ya, yb) in self.layers.items():
            if y in on_route or y in self.draining or not (ya <= a and b <= yb):
                continue
            if (prev, y) not in self.links or (y, nxt) not in self.links:
                continue
            ly = loads[y]
            if math.isinf(ly):
                continue  # draining, or gone
            try:
                if kv is not None and kv.available(y) < kv.expected_len(q.input_len) * (b - a):
                    continue  # the router's expectation has no room there (admission reads it)
            except KeyError:
                continue  # a node the router's current plan leaves out (lost)
            used, cap, _ = self.load(y)
            after = ly + (q.input_len + q.iterations + 1) * (b - a) / max(1, cap)
            if after > limit or src_load - ly <= cfg.gap:
                continue
            if ly < best_load:
                best, best_load = y, ly
        return best
