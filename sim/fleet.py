"""An elastic fleet in the simulator: spare nodes join while the load is high and leave when it falls.

Llumnix (Sun et al., OSDI'24, §4.4.3) scales its instances out when their average load stays
high and in when it stays low, and a leaving instance drains by migrating its requests away.
Here the unit is a node of a Helix plan, and what it costs is its GPU-hours at a price per type.

Every ``period`` seconds the fleet reads the host's pressure: the router's KV expectation at its
bottleneck (the share admission reads) and whether queries wait for admission.

* **Out.** When queries have waited, or the bottleneck has stayed above ``up``, for ``window``
  seconds, and no node is joining, the next spare type in the pool joins: ``placement.replan``
  gives the new node the layers that raise max flow most while no node of the plan moves (its
  first neighbourhood: the new node alone). Where no range raises max flow (on single24 the
  coordinator's links bound it), the node takes the range of as many layers as it holds whose
  layers' KV the router expects most used, so that admission finds room there; max flow then
  gives it a share of the flow. The node is paid for from that moment; it serves once
  it has loaded its layers' weights (bytes / ``load_rate``, after ``boot_s``), when the host's
  router is re-planned with it (running queries keep their routes).
* **In.** When nothing has waited and the bottleneck has stayed below ``down`` for ``window``
  seconds, the spare that joined last leaves: the router is re-planned without it (nothing new
  goes there), and its queries move off it by live migration when the simulation migrates
  (``--migration on``; the policy drains it), else they finish where they are. What is still on it
  after ``drain_s`` moves by recomputation. It is paid for until the first look that finds it
  carrying nothing (no route through it, no move to or from it), and goes back to the pool.

Between ``min_spares`` and ``max_spares`` spares serve at any time; the plan's own nodes always
serve. The report's ``fleet`` entry gives every join and leave, the GPU-hours per type and the
cost at ``prices`` (US dollars per GPU-hour; docs/simulator.md, "Elastic fleet").
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from helix_async.errors import ConfigError
from helix_async.model import ThroughputModel
from helix_async.placement import Placement
from helix_async.placement.flow import max_flow
from helix_async.placement.replan import replan

if TYPE_CHECKING:
    from .simulation import Simulation

__all__ = ["DEFAULT_PRICES", "Fleet", "FleetConfig", "fleet_cost", "parse_spares"]

#: On-demand list prices of one GPU, US dollars per hour: Google Cloud Compute Engine's GPU
#: pricing page, us-central1, the GPU's own line (the VM's CPUs and memory not included), as we
#: recorded them; docs/simulator.md gives the source. Override them with ``--prices``.
DEFAULT_PRICES: dict[str, float] = {
    "A100": 2.93,
    "V100": 2.48,
    "L4": 0.56,
    "T4": 0.35,
    "H100": 11.06,
}


@dataclass(frozen=True)
class FleetConfig:
    """The fleet's parameters (module doc). spares: (machine type, count) pairs, joined in this
    order; prices: US dollars per GPU-hour per type (default :data:`DEFAULT_PRICES`)."""

    spares: tuple[tuple[str, int], ...]
    min_spares: int = 0
    max_spares: int | None = None
    period: float = 5.0
    window: float = 30.0
    up: float = 0.85
    down: float = 0.5
    load_rate: float = 2e9
    boot_s: float = 0.0
    drain_s: float = 60.0
    prices: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def __post_init__(self) -> None:
        where = "<argument>"
        total = sum(n for _, n in self.spares)
        if not self.spares or total < 1:
            raise ConfigError(where, "--spares", "give at least one spare node (TYPE:N)")
        hi = total if self.max_spares is None else self.max_spares
        if not 0 <= self.min_spares <= hi <= total:
            raise ConfigError(where, "--autoscale", f"MIN:MAX must satisfy 0 <= MIN <= MAX <= {total} spares, got "
                                                    f"{self.min_spares}:{hi}")
        for name in ("period", "window", "load_rate", "drain_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(where, name, f"must be a number > 0, got {v!r}")
        if not (0.0 <= self.down <= self.up <= 1.0):
            raise ConfigError(where, "down", f"need 0 <= down <= up <= 1, got down {self.down}, up {self.up}")
        if self.boot_s < 0:
            raise ConfigError(where, "boot_s", f"must be >= 0, got {self.boot_s}")

    @property
    def most(self) -> int:
        return sum(n for _, n in self.spares) if self.max_spares is None else self.max_spares


def parse_spares(text: str) -> tuple[tuple[str, int], ...]:
    """``TYPE:N,TYPE:N`` (the ``--spares`` flag) as (type, count) pairs."""
    out = []
    for part in text.split(","):
        name, sep, n = part.strip().partition(":")
        if not sep or not name or not n.strip().isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"expected TYPE:N with N >= 1, got {part.strip()!r}")
        out.append((name.strip(), int(n)))
    return tuple(out)


def layer_pressure(kv: Any, num_layers: int) -> tuple[list[float], list[float]]:
    """Per layer, the share of the KV entries holding it that the router's expectation has taken
    (``KVTracker.bottleneck_usage`` is the largest of these), and those entries (tokens)."""
    free = [0.0] * num_layers
    total = [0.0] * num_layers
    for node, avail in kv.snapshot():
        a, b = kv.layer_range(node)
        k = b - a
        cap = kv.total(node)
        for layer in range(a, b):
            free[layer] += avail / k
            total[layer] += cap / k
    return [1.0 - f / t if t > 0 else 0.0 for f, t in zip(free, total, strict=True)], total


def fleet_cost(intervals: Mapping[int, list[list[float]]], types: Mapping[int, str], prices: Mapping[str, float],
               end: float) -> dict[str, Any]:
    """GPU-hours and dollars of nodes that served over ``intervals`` ([start, stop] seconds; a stop
    of inf: until ``end``), per machine type. A type without a price is an error naming it."""
    hours: dict[str, float] = {}
    for node, spans in intervals.items():
        t = types[node]
        for a, b in spans:
            hours[t] = hours.get(t, 0.0) + max(0.0, min(b, end) - a) / 3600.0
    missing = sorted(t for t in hours if t not in prices)
    if missing:
        raise ConfigError("<argument>", "--prices", f"no price for machine type(s) {', '.join(missing)}")
    dollars = {t: h * prices[t] for t, h in hours.items()}
    return {"gpu_hours": sum(hours.values()), "dollars": sum(dollars.values()),
            "by_type": {t: {"gpu_hours": hours[t], "dollars": dollars[t]} for t in sorted(hours)}}


class Fleet:
    """The fleet controller of one simulation (module doc)."""

    def __init__(self, sim: Simulation, config: FleetConfig) -> None:
        self.sim = sim
        self.config = config
        self.pool = [t for t, n in config.spares for _ in range(n)]  # the spares not serving, in order
        self.serving: list[tuple[int, Placement]] = []  # (spare node, the plan before it joined)
        self.joining: int | None = None
        self.leaving: dict[int, float] = {}  # spare -> when its drain gives up
        t0 = sim.t0
        self.intervals: dict[int, list[list[float]]] = {i: [[t0, math.inf]] for i in sim.placement.used_nodes()}
        self.types: dict[int, str] = {i: sim.placement.cluster.nodes[i].machine_type for i in self.intervals}
        from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES

        known = set(sim.placement.cluster.machine_types) | set(DEFAULT_MACHINE_TYPES)
        for t, _ in config.spares:
            if t not in known:
                raise ConfigError("<argument>", "--spares", f"unknown machine type {t!r} (known: {', '.join(sorted(known))})")
        unpriced = sorted(({t for t, _ in config.spares} | set(self.types.values())) - set(config.prices))
        if unpriced:
            raise ConfigError("<argument>", "--prices", f"no price for machine type(s) {', '.join(unpriced)}")
        self.events: list[dict[str, Any]] = []
        self._hi_since = -1.0
        self._lo_since = -1.0
        self.unusable: set[str] = set()

    def install(self) -> None:
        clock = self.sim.clock
        clock.call_at(self.sim.t0 + self.config.period, self._tick)
        if self.config.min_spares:
            self._out(self.sim.t0, "the fleet's minimum")  # (the next ones as each joins)

    # ---- decisions ------------------------------------------------------------------------------

    def _tick(self) -> None:
        sim = self.sim
        cfg = self.config
        now = sim.clock.now()
        host = sim.host
        self._settle_leaving(now)
        pressure = host.kv_bottleneck()
        hi = host.waiting > 0 or pressure > cfg.up
        lo = host.waiting == 0 and pressure < cfg.down
        self._hi_since = (self._hi_since if self._hi_since >= 0 else now) if hi else -1.0
        self._lo_since = (self._lo_since if self._lo_since >= 0 else now) if lo else -1.0
        in_service = len(self.serving) + (self.joining is not None)
        if (hi and now - self._hi_since >= cfg.window and self.joining is None and in_service < cfg.most
                and self.pool):
            self._out(now, f"KV expectation {pressure:.2f}, {host.waiting} waiting")
            self._hi_since = -1.0
        elif (lo and now - self._lo_since >= cfg.window and self.joining is None and not self.leaving
              and len(self.serving) > cfg.min_spares):
            self._in(now, f"KV expectation {pressure:.2f}")
            self._lo_since = -1.0
        sim.clock.call_at(now + cfg.period, self._tick)

    def _out(self, now: float, why: str) -> None:
        sim = self.sim
        while self.pool:
            gpu = self.pool.pop(0)
            if gpu in self.unusable:
                continue
            before = sim.placement
            try:
                res = replan(before, add=[gpu], tries=1, seed=len(self.events))
            except ConfigError:
                self.unusable.add(gpu)
                continue
            (node, layers), = res.added.items()
            placement = res.placement
            if layers is None:  # no range of it raises max flow: the range whose KV is most wanted
                placement, layers = self._kv_range(placement, node)
                if layers is None:
                    self.unusable.add(gpu)
                    continue
            self.joining = node
            self.intervals[node] = [[now, math.inf]]
            self.types[node] = gpu
            spec = sim.model
            load = (layers[1] - layers[0]) * spec.param_bytes_per_layer / self.config.load_rate
            ready = now + self.config.boot_s + load
            self.events.append({"t": now, "event": "out", "node": node, "type": gpu, "layers": list(layers),
                                "ready": ready, "why": why, "max_flow": [res.before, res.after]})
            sim.clock.call_at(ready, self._joined, node, placement, before)
            return

    def _kv_range(self, placement: Placement, node: int) -> tuple[Placement, tuple[int, int] | None]:
        """``placement`` with ``node`` holding the range of as many layers as it can hold whose
        layers the router's KV expectation finds most used (on an idle cluster: the layers with the
        fewest KV entries; ties: the lowest start); None when it can hold none, or no range gets any
        flow."""
        sim = self.sim
        spec = sim.model
        cluster = placement.cluster
        tm = ThroughputModel.for_cluster(spec, cluster)
        k = tm.max_layers(cluster.machine(node))
        L = spec.num_layers
        if k <= 0:
            return placement, None
        k = min(k, L)
        pressure, capacity = layer_pressure(sim.host.router.kv, L)
        best: tuple[float, float, int] | None = None
        for a in range(L - k + 1):
            # the most used KV first; on an idle cluster, the layers with the least KV
            score = (sum(pressure[a:a + k]), -sum(capacity[a:a + k]), -a)
            if best is None or score > best:
                best = score
        assert best is not None
        a = -best[2]
        layers = {**placement.layers, node: (a, a + k)}
        new = Placement.from_layers(cluster, spec, layers, partial=placement.partial, method=placement.method,
                                    exceed_profiled_max=placement.exceed_profiled_max)
        if max_flow(new, tm).node_flows.get(node, 0.0) <= 0.0:
            return placement, None
        return new, (a, a + k)

    def _joined(self, node: int, placement: Placement, before: Placement) -> None:
        self.sim.adopt(placement)
        self.serving.append((node, before))
        self.joining = None
        if len(self.serving) < self.config.min_spares and self.pool:
            self._out(self.sim.clock.now(), "the fleet's minimum")

    def _in(self, now: float, why: str) -> None:
        sim = self.sim
        node, before = self.serving.pop()
        # the plan without it, on today's cluster (the spares that joined after it left already)
        layers = {i: (None if i == node else r) for i, r in sim.placement.layers.items()}
        without = Placement.from_layers(sim.placement.cluster, sim.model, layers, partial=sim.placement.partial,
                                        method=before.method, exceed_profiled_max=sim.placement.exceed_profiled_max)
        sim.adopt(without)
        self.leaving[node] = now + self.config.drain_s
        if sim.migration is not None:
            sim.migration.drain(node)
        self.events.append({"t": now, "event": "in", "node": node, "type": self.types[node], "why": why})

    def _carries(self, node: int) -> bool:
        host = self.sim.host
        return (any(q.route is not None and any(st[0] == node for st in q.route) for q in host.active_queries())
                or any(node in (mv.source, mv.target) for mv in host.moves.values()))

    def _settle_leaving(self, now: float) -> None:
        sim = self.sim
        for node, deadline in list(self.leaving.items()):
            if self._carries(node):
                if now < deadline:
                    continue
                # what did not move or finish in time moves by recomputation
                sim.host.replan(sim.router_for(sim.placement), {node}, f"node {node} left the fleet")
            del self.leaving[node]
            if sim.migration is not None:
                sim.migration.draining.discard(node)
            sim.retire(node)
            self.pool.append(self.types[node])  # (it may join again)
            self.intervals[node][-1][1] = now
            self.events.append({"t": now, "event": "left", "node": node, "type": self.types[node]})

    # ---- the report -----------------------------------------------------------------------------

    def summary(self, end: float) -> dict[str, Any]:
        cost = fleet_cost(self.intervals, self.types, self.config.prices, end)
        return {
            **cost,
            "end": end,
            "spares": [list(s) for s in self.config.spares],
            "min_spares": self.config.min_spares,
            "max_spares": self.config.most,
            "events": self.events,
        }
