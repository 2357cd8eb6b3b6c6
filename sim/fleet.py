"""An elastic fleet in the simulator: spare nodes join while the load is high and leave when it falls.

Llumnix (Sun et al., OSDI'24, §4.4.3) scales its instances out when their average load stays
high and in when it stays low, and a leaving instance drains by migrating its requests away.
Here the unit is a node of a Helix plan, and what it costs is its GPU-hours at a price per type.

Every ``period`` seconds the fleet reads the host's pressure: the router's KV expectation at its
bottleneck (the share admission reads; Llumnix's load is likewise KV, in use and virtual),
whether queries wait for admission, and the compute of the busiest layer over the last
``window``. A layer's compute is what the nodes holding it did: each one's share of the time
spent computing, weighted by its capacity in max flow, over their capacity. (KV alone does not
see busy nodes: prompts then queue on the workers, not at the host.) The load is high when
queries wait, the expectation is above ``up`` or the compute above ``busy``; it is low when none
waits, the expectation is below ``down`` and the compute at most ``busy``. (A lightly loaded
pipeline's compute share is not small: its batches are small, so the compute only marks a
saturated layer.)

* **Out.** When the load has stayed high for ``out_window`` seconds (default ``window``), and
  no node is joining, the next spare type in the pool joins: ``placement.replan`` gives the new node the layers that raise max flow most while no node of the plan moves (its
  first neighbourhood: the new node alone). Where no range raises max flow (on single24 the
  coordinator's links bound it), the node takes the range of as many layers as it holds whose
  layers' KV the router expects most used, so that admission finds room there; max flow then
  gives it a share of the flow. The node is paid for from that moment; it serves once
  it has loaded its layers' weights (bytes / ``load_rate``, after ``boot_s``), when the host's
  router is re-planned with it (running queries keep their routes).
* **In.** When the load has stayed low for ``window`` seconds, the spare that joined last leaves: the router is re-planned without it (nothing new
  goes there), and its queries move off it by live migration when the simulation migrates
  (``--migration on``; the policy drains it), else they finish where they are. What is still on it
  after ``drain_s`` moves by recomputation. It is paid for until the first look that finds it
  carrying nothing (no route through it, no move to or from it), and goes back to the pool.

* **Shrink** (``shrink``, ``--shrink``). With it the plan's own nodes may leave too, once no
  spare is left above ``min_spares``: the node whose leaving costs the least max flow (ties: the
  dearest, then the lowest id) leaves, if every layer stays served, the max flow left is at least
  the tokens offered over the last ``window`` (prompt and output, per second) over ``down``, and
  the KV expectation of every layer, on what is left, stays at most halfway between ``down`` and
  ``up``. (The compute share is no guard here: a pipeline's busy share is no measure of its
  spare capacity, since batches grow with the load. As a guard it blocked 4 of 10 leaves on one
  plan and bought no latency; docs/simulator.md, "Elastic fleet".) When the load rises,
  a plan node that left joins again, with its own layers, after loading them: the one whose
  return raises max flow most, else the last to leave, of those that the max flow with them
  gives a share. Spares join once no plan node that left would carry flow. (A plan node that
  carries no flow serves nothing: it is the first to leave, at no cost in max flow, and stays
  away.)

Between ``min_spares`` and ``max_spares`` spares serve at any time; without ``shrink`` the plan's
own nodes always serve. The report's ``fleet`` entry gives every join and leave, the GPU-hours
per type and the cost at ``prices`` (US dollars per GPU-hour; docs/simulator.md, "Elastic fleet").
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
    shrink: bool = False
    max_spares: int | None = None
    period: float = 5.0
    window: float = 30.0
    out_window: float | None = None
    up: float = 0.85
    down: float = 0.5
    busy: float = 0.9
    load_rate: float = 2e9
    boot_s: float = 0.0
    drain_s: float = 60.0
    prices: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def __post_init__(self) -> None:
        where = "<argument>"
        total = sum(n for _, n in self.spares)
        if (not self.spares or total < 1) and not self.shrink:
            raise ConfigError(where, "--spares", "give at least one spare node (TYPE:N), or --shrink")
        hi = total if self.max_spares is None else self.max_spares
        if not 0 <= self.min_spares <= hi <= total:
            raise ConfigError(where, "--autoscale", f"MIN:MAX must satisfy 0 <= MIN <= MAX <= {total} spares, got "
                                                    f"{self.min_spares}:{hi}")
        if self.out_window is not None and not (math.isfinite(self.out_window) and self.out_window > 0):
            raise ConfigError(where, "out_window", f"must be a number > 0, got {self.out_window!r}")
        for name in ("period", "window", "load_rate", "drain_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(where, name, f"must be a number > 0, got {v!r}")
        if not (0.0 < self.busy <= 1.0):
            raise ConfigError(where, "busy", f"must be in (0, 1], got {self.busy!r}")
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
        self.plan_nodes: frozenset[int] = frozenset(self.intervals)
        self.resting: list[tuple[int, tuple[int, int]]] = []  # plan nodes that left: (node, its layers)
        self._left_layers: dict[int, tuple[int, int]] = {}
        #: one per look over the last ``window``: (time, tokens submitted by then, node -> (its
        #: worker then, that worker's busy seconds))
        self._looks: list[tuple[float, int, dict[int, tuple[Any, float]]]] = []
        self._flow: tuple[Placement, Any] | None = None  # (a plan, its max flow)

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
        busy = {i: (w, w.stats.busy_time) for i, w in sim.workers.items() if not w.stopped}
        self._looks.append((now, host.stats.tokens_submitted, busy))
        while len(self._looks) > 1 and self._looks[1][0] <= now - cfg.window:
            self._looks.pop(0)
        pressure = host.kv_bottleneck()
        compute = max(self.layer_busy(now), default=0.0)
        hi = host.waiting > 0 or pressure > cfg.up or compute > cfg.busy
        lo = host.waiting == 0 and pressure < cfg.down and compute <= cfg.busy
        self._hi_since = (self._hi_since if self._hi_since >= 0 else now) if hi else -1.0
        self._lo_since = (self._lo_since if self._lo_since >= 0 else now) if lo else -1.0
        in_service = len(self.serving) + (self.joining is not None)
        if (hi and now - self._hi_since >= (cfg.window if cfg.out_window is None else cfg.out_window)
                and self.joining is None
                and (self.resting or (in_service < cfg.most and self.pool))):
            self._out(now, f"KV expectation {pressure:.2f}, compute {compute:.2f}, {host.waiting} waiting")
            self._hi_since = -1.0
        elif lo and now - self._lo_since >= cfg.window and self.joining is None and not self.leaving:
            if len(self.serving) > cfg.min_spares:
                self._in(now, f"KV expectation {pressure:.2f}, compute {compute:.2f}")
            elif cfg.shrink:
                self._shrink(now, f"KV expectation {pressure:.2f}, compute {compute:.2f}")
            self._lo_since = -1.0
        sim.clock.call_at(now + cfg.period, self._tick)

    def flow(self) -> Any:
        """Today's plan's max flow (kept until the plan changes)."""
        p = self.sim.placement
        if self._flow is None or self._flow[0] is not p:
            self._flow = (p, max_flow(p, ThroughputModel.for_cluster(self.sim.model, p.cluster)))
        return self._flow[1]

    def offered(self, now: float) -> float:
        """Tokens (prompt and output) submitted per second over the last ``window``."""
        if not self._looks or now <= self._looks[0][0]:
            return 0.0
        t, n, _ = self._looks[0]
        return (self.sim.host.stats.tokens_submitted - n) / (now - t)

    def busy_shares(self, now: float) -> dict[int, float]:
        """Each serving worker's share of the last ``window`` spent computing (what the looks saw),
        in [0, 1]; a node whose worker is not the one of the window's first look (it joined or came
        back since) is left out."""
        if not self._looks or now <= self._looks[0][0]:
            return {}
        t, _, then = self._looks[0]
        out = {}
        for i, w in self.sim.workers.items():
            seen = then.get(i)
            if w.stopped or seen is None or seen[0] is not w:
                continue
            out[i] = min(1.0, max(0.0, (w.stats.busy_time - seen[1]) / (now - t)))
        return out

    def layer_busy(self, now: float) -> list[float]:
        """Per layer, the compute its nodes did over the last window (each node's busy share times
        its capacity) over the capacity that holds the layer."""
        caps = self.flow().node_capacity
        busy = self.busy_shares(now)
        L = self.sim.model.num_layers
        work = [0.0] * L
        cap = [0.0] * L
        for i, r in self.sim.placement.layers.items():
            c = caps.get(i, 0.0)
            if r is None or c <= 0.0 or i not in busy:  # (a node measured over less than the window: out)
                continue
            for x in range(r[0], r[1]):
                work[x] += busy[i] * c
                cap[x] += c
        return [w / c if c > 0 else 0.0 for w, c in zip(work, cap, strict=True)]

    def _out(self, now: float, why: str) -> None:
        sim = self.sim
        back = self._comeback()
        if back is not None:  # a plan node that left comes back first, with its own layers
            node, own, placement = back
            before = sim.placement
            self.joining = node
            self.intervals[node].append([now, math.inf])
            ready = now + self.config.boot_s + (own[1] - own[0]) * sim.model.param_bytes_per_layer / \
                self.config.load_rate
            self.events.append({"t": now, "event": "out", "node": node, "type": self.types[node],
                                "layers": list(own), "ready": ready, "why": why, "plan_node": True})
            sim.clock.call_at(ready, self._joined, node, placement, before)
            return
        if len(self.serving) >= self.config.most:
            return
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

    def _comeback(self) -> tuple[int, tuple[int, int], Placement] | None:
        """The plan node that left whose return, with its own layers, raises max flow most (ties:
        the last to leave) among those the max flow with them gives a share, and the plan with it;
        None when none would carry flow (it would serve nothing)."""
        sim = self.sim
        tm = ThroughputModel.for_cluster(sim.model, sim.placement.cluster)
        now_flow = self.flow().value
        best: tuple[float, int] | None = None
        found: tuple[int, tuple[int, int], Placement] | None = None
        for k, (node, layers) in enumerate(self.resting):
            with_it = self._with(node, layers)
            fp = max_flow(with_it, tm)
            if fp.node_flows.get(node, 0.0) <= 1e-9:
                continue
            gain = round(max(0.0, fp.value - now_flow), 6)  # (rounded: near-equal gains tie)
            if best is None or (gain, k) > best:
                best, found = (gain, k), (node, layers, with_it)
        if found is not None:
            self.resting = [x for x in self.resting if x[0] != found[0]]
        return found

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
        new = self._with(node, (a, a + k), placement)
        if max_flow(new, tm).node_flows.get(node, 0.0) <= 0.0:
            return placement, None
        return new, (a, a + k)

    def _joined(self, node: int, placement: Placement, before: Placement) -> None:
        self.sim.adopt(placement)
        if node not in self.plan_nodes:
            self.serving.append((node, before))
        self.joining = None
        if len(self.serving) < self.config.min_spares and self.pool:
            self._out(self.sim.clock.now(), "the fleet's minimum")

    def _with(self, node: int, layers: tuple[int, int] | None, base: Placement | None = None) -> Placement:
        """``base`` (default today's plan) with ``node`` holding ``layers`` (None: none; the other
        nodes keep theirs)."""
        p = self.sim.placement if base is None else base
        return Placement.from_layers(p.cluster, self.sim.model, {**p.layers, node: layers}, partial=p.partial,
                                     method=p.method, exceed_profiled_max=p.exceed_profiled_max)

    def _in(self, now: float, why: str) -> None:
        node, _ = self.serving.pop()
        # the plan without it, on today's cluster (the spares that joined after it left already)
        self._leave(now, node, self._with(node, None), why)

    def _shrink(self, now: float, why: str) -> None:
        """A plan node leaves, if one may (module doc, "Shrink")."""
        sim = self.sim
        cfg = self.config
        kv = sim.host.router.kv
        L = sim.model.num_layers
        pressure, total = layer_pressure(kv, L)
        used = [p * t for p, t in zip(pressure, total, strict=True)]
        ceiling = (cfg.down + cfg.up) / 2
        need = self.offered(now) / cfg.down
        tm = ThroughputModel.for_cluster(sim.model, sim.placement.cluster)
        moving = {n for mv in sim.host.moves.values() for n in (mv.source, mv.target)}
        best: tuple[tuple[float, float, int], int, Placement] | None = None
        for node in sorted(self.plan_nodes):
            if sim.placement.layers.get(node) is None or node in self.leaving or node in moving:
                continue
            try:
                a, b = kv.layer_range(node)
                per_layer = kv.total(node) / (b - a)
            except KeyError:  # not in the router's plan: it holds no KV of it
                a, b, per_layer = 0, 0, 0.0
            if any(used[x] > ceiling * (total[x] - per_layer) for x in range(a, b)):
                continue
            without = self._with(node, None)
            flow = max_flow(without, tm).value
            if flow <= 0.0 or flow < need:
                continue
            score = (round(flow, 6), cfg.prices[self.types[node]], -node)  # (rounded: near-equal flows tie)
            if best is None or score > best[0]:
                best = (score, node, without)
        if best is not None:
            self._leave(now, best[1], best[2], f"{why}, max flow {best[0][0]:.0f} left for {need * cfg.down:.0f} "
                                               "tokens/s offered")

    def _leave(self, now: float, node: int, without: Placement, why: str) -> None:
        sim = self.sim
        if node in self.plan_nodes:
            r = sim.placement.layers[node]
            assert r is not None
            self._left_layers[node] = (r[0], r[1])
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
            if node in self.plan_nodes:
                self.resting.append((node, self._left_layers.pop(node)))
            else:
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
            "shrink": self.config.shrink,
            "max_spares": self.config.most,
            "events": self.events,
        }
