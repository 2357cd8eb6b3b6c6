"""The planner: heuristics, then the position model and a MILP-based large-neighbourhood search.

Shape (PLANNER_NOTES "Suggested planner shape"): every heuristic scored by exact max flow -> the
aggregated position model (also our best honest bound) -> large-neighbourhood search that frees a
few nodes at a time and re-solves the node/arc MILP with the rest fixed -> the best verified plan
by exact max flow, with the tightest bound found and the gap to it.

Anytime: ``on_improve`` is called with every new best verified plan (the CLI writes it to disk),
and a ``StopFlag`` (set by Ctrl-C/SIGTERM through ``SignalStop``) ends the search cleanly with the
best plan so far. Scheduling decisions here use wall time on purpose: planning is not simulated.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..cluster import ClusterSpec
from ..errors import ConfigError, PlanningError
from ..ids import LayerRange
from ..model import ModelSpec, ThroughputModel, check_fits, get_model
from ..settings import SearchSettings
from ..signals import StopFlag
from .core import Placement, verify
from .flow import FlowEvaluator, max_flow
from .heuristics import HEURISTICS, run_heuristic
from .milp import (
    ArcModel,
    Capacities,
    PositionModel,
    coverage_bound,
    interchangeable_classes,
    links_can_bind,
    prune_arcs,
    type_classes,
)

log = logging.getLogger("helix_async.planner")

# Every planner method, for the CLI and plan(): the MILP search and each heuristic.
METHODS: tuple[str, ...] = ("milp", *HEURISTICS)

#: Why :func:`plan` ended (``PlanResult.stop_cause``):
#:
#: * ``"optimal"`` -- the incumbent meets the upper bound (gap <= 1e-9, float rounding): proven optimal;
#: * ``"gap"`` -- the gap fell to ``gap_limit`` (above 1e-9, so not proven optimal);
#: * ``"time"`` -- ``time_limit`` seconds of wall time ran out;
#: * ``"stall"`` -- ``stall_limit`` seconds passed without an improvement;
#: * ``"rounds"`` -- the LNS solved ``round_limit`` neighbourhoods (a bound on work);
#: * ``"stop"`` -- the caller's :class:`StopFlag` was set (Ctrl-C/SIGTERM through ``SignalStop``, or
#:   the caller itself; ``PlanResult.stopped`` carries the flag's reason, e.g. ``"signal SIGTERM"``);
#: * ``"heuristic"`` -- a heuristic method was asked for: it ran once, no search.
#:
#: The checks run in this order (stop, time, optimal/gap, stall, rounds): the first that holds is the cause.
StopCause = Literal["optimal", "gap", "time", "stall", "rounds", "stop", "heuristic"]
# The gap at which a plan counts as equal to the bound (float rounding of the exact max flow).
_OPTIMAL_GAP = 1e-9


@dataclass
class PlanResult:
    """The outcome of planning: the best verified plan, its exact max flow, and the bound."""

    placement: Placement
    value: float  # exact max flow, tokens/s
    upper_bound: float  # tightest certified upper bound on any plan's max flow, tokens/s
    bound_source: str
    max_compute_throughput: float
    seconds: float
    found_by: str
    stopped: str  # why the search ended, for people ("gap limit", "signal SIGTERM", ...)
    stop_cause: StopCause  # why the search ended, for programs (see StopCause)
    history: list[tuple[float, float, str]] = field(default_factory=list)  # (seconds, value, source)
    heuristics: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """Relative gap (bound - value) / bound, in [0, 1] (0.0 when the bound itself is 0)."""
        if self.upper_bound <= 0:
            return 0.0
        return max(0.0, (self.upper_bound - self.value) / self.upper_bound)


class _PlanSearch:
    def __init__(
        self,
        cluster: ClusterSpec,
        model: ModelSpec,
        settings: SearchSettings,
        *,
        on_improve: Callable[[Placement, float], None] | None,
        progress: Callable[[dict[str, Any]], None] | None,
        stop: StopFlag,
    ) -> None:
        self.prune = settings.prune
        self.cluster = cluster
        self.model = model
        self.partial = settings.partial
        self.seed = settings.seed
        self.rng = random.Random(settings.seed)
        self.time_limit = settings.time_limit
        self.stall_limit = settings.stall_limit
        self.gap_limit = settings.gap_limit
        self.node_limit = settings.node_limit
        self.round_limit = settings.round_limit
        self.on_improve = on_improve
        self.progress = progress
        self.stop = stop
        self.t0 = time.monotonic()
        self.tm = ThroughputModel.for_cluster(model, cluster)
        check_fits(cluster, model, self.tm)
        self.caps = Capacities.build(cluster, model, self.tm)
        self.evaluator = FlowEvaluator(cluster, model, self.tm)
        self.best: Placement | None = None
        self.best_value = -1.0
        self.best_source = ""
        self.last_improve = self.t0
        self.bound = self.caps.compute_bound
        self.bound_source = "max compute throughput"
        self.history: list[tuple[float, float, str]] = []
        self.heuristics: dict[str, float] = {}
        self._flow_of: Placement | None = None
        self._flow_cache: Any = None

    # -- bookkeeping -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.time_limit - self.elapsed()

    def gap(self) -> float:
        if self.bound <= 0:
            return 0.0
        return max(0.0, (self.bound - max(self.best_value, 0.0)) / self.bound)

    def tighten(self, bound: float, source: str) -> None:
        if bound < self.best_value * (1 - 1e-9) - 1e-9:
            # a valid bound can never be below a verified plan's exact value: report, do not hide it
            log.warning("%s %.6f is below the incumbent %.6f; ignoring it", source, bound, self.best_value)
            return
        if bound < self.bound - 1e-9:
            self.bound = max(bound, self.best_value)
            self.bound_source = source
            self._report("bound")

    def _report(self, event: str) -> None:
        if self.progress is not None:
            self.progress(
                {
                    "event": event,
                    "elapsed": self.elapsed(),
                    "incumbent": max(self.best_value, 0.0),
                    "bound": self.bound,
                    "gap": self.gap(),
                    "source": self.best_source,
                }
            )

    def offer(self, layers: Mapping[int, LayerRange | None], source: str, placement: Placement | None = None) -> bool:
        """Score a candidate exactly; keep it (verified) when it beats the incumbent."""
        value = self.evaluator.value(layers, partial=self.partial)
        if value <= self.best_value + 1e-9:
            return False
        cand = placement or Placement.from_layers(
            self.cluster, self.model, layers, partial=self.partial, method="milp"
        )
        verify(cand, self.tm)
        self.best, self.best_value, self.best_source = cand, value, source
        self.last_improve = time.monotonic()
        self.history.append((self.elapsed(), value, source))
        log.info("new best %.4f tokens/s from %s at %.1f s", value, source, self.elapsed())
        if self.on_improve is not None:
            self.on_improve(self._stamped(cand), value)
        self._report("improve")
        return True

    def _stamped(self, p: Placement) -> Placement:
        return p.with_meta(
            max_flow=self.best_value,
            upper_bound=self.bound,
            bound_source=self.bound_source,
            gap=self.gap(),
            found_by=self.best_source,
            seed=self.seed,
        )

    def should_stop(self) -> tuple[StopCause, str] | None:
        """(cause, text) when the search must end now, else None; checks in StopCause's order."""
        if self.stop:
            return "stop", self.stop.reason or "stopped"
        if self.remaining() <= 0:
            return "time", "time limit"
        # 1e-9 relative: a plan equal to the bound up to float rounding is proven optimal
        if self.best_value > 0:
            gap = self.gap()
            if gap <= _OPTIMAL_GAP:
                return "optimal", "gap limit"
            if gap <= self.gap_limit:
                return "gap", "gap limit"
        if time.monotonic() - self.last_improve >= self.stall_limit:
            return "stall", "stall limit"
        return None

    # -- phases ------------------------------------------------------------------------------
    def run_heuristics(self) -> None:
        for name in HEURISTICS:
            if self.stop:
                break
            try:
                p = run_heuristic(name, self.cluster, self.model, seed=self.seed, partial=self.partial, tm=self.tm)
            except PlanningError as exc:
                log.info("heuristic %s does not apply: %s", name, exc)
                continue
            value = max_flow(p, self.tm).value
            self.heuristics[name] = value
            # forced layouts (past the profiled maximum) are reported but are not a MILP start
            if not p.exceed_profiled_max and value > self.best_value + 1e-9:
                self.best, self.best_value, self.best_source = p, value, f"heuristic {name}"
                self.last_improve = time.monotonic()
                self.history.append((self.elapsed(), value, f"heuristic {name}"))
        ids = [n.id for n in self.cluster.nodes]
        cover = pipeline_cover(self.caps, ids)
        value = self.evaluator.value(cover, partial=self.partial)
        self.heuristics["pipeline_cover"] = value
        if value > self.best_value + 1e-9:
            self.best = Placement.from_layers(self.cluster, self.model, cover, partial=self.partial, method="milp")
            verify(self.best, self.tm)
            self.best_value, self.best_source = value, "pipeline cover"
            self.history.append((self.elapsed(), value, "pipeline cover"))
        if self.best is not None and self.on_improve is not None:
            self.on_improve(self._stamped(self.best), self.best_value)
        self._report("heuristics")

    def run_position_model(self, budget: float) -> None:
        if budget <= 1 or self.stop:
            return
        start = dict(self.best.layers) if self.best is not None else None
        pm = PositionModel(self.caps, type_classes(self.cluster), time_limit=budget, seed=self.seed, stop=self.stop,
                           node_limit=self.node_limit)
        res = pm.solve(start=start)
        log.info(
            "position model: status %s, primal %.3f, dual %.3f, %.1f s", res.status, res.objective, res.dual_bound, res.seconds
        )
        if not self.partial and res.status != "userinterrupt" and res.dual_bound > 0:
            # relaxation of the real problem for full links on any graph: an honest bound
            self.tighten(res.dual_bound, "position-model dual bound")
        if res.layers is not None:
            self.offer(res.layers, "position model")

    def run_lns(self) -> tuple[StopCause, str]:
        assert self.best is not None
        ids = [n.id for n in self.cluster.nodes if self.caps.node_max_layers[n.id] > 0]
        sym = interchangeable_classes(self.cluster)
        # On a complete graph whose links never bind, the position model with most nodes pinned is
        # an exact neighbourhood and far smaller than the arc model; alternate the two there.
        exact_position = not self.partial and not links_can_bind(self.cluster, self.caps)
        classes = type_classes(self.cluster)
        size = min(4, len(ids))
        psize = min(8, len(ids))
        fails = 0
        it = 0
        while True:
            why = self.should_stop()
            if why:
                return why
            if self.round_limit is not None and it >= self.round_limit:
                return "rounds", "round limit"
            it += 1
            flow = self._best_flow()
            # a neighbourhood gets 20 s at most, unless its work is bounded (node_limit)
            cap = 20.0 if self.node_limit is None else self.remaining()
            sub_limit = max(1.0, min(cap, self.remaining()))
            if exact_position and it % 3 != 0:
                free = self._choose_free(ids, psize, flow)
                pm = PositionModel(
                    self.caps,
                    classes,
                    fixed={i: r for i, r in self.best.layers.items() if i not in free},
                    time_limit=sub_limit,
                    seed=self.seed + it,
                    stop=self.stop,
                    node_limit=self.node_limit,
                )
                pres = pm.solve(start=dict(self.best.layers))
                if pres.layers is not None and self.offer(pres.layers, f"LNS-position({len(free)} nodes)"):
                    fails = 0
                else:
                    fails += 1
                    if fails % 4 == 0 and psize < min(14, len(ids)):
                        psize += 1
                continue
            free = self._choose_free(ids, size, flow)
            keep = None
            if self.prune:
                # the incumbent's links always survive pruning, so its complete start stays valid
                keep = prune_arcs(self.cluster, min_keep=self.prune, max_keep=self.prune, must_keep=self.best.links)
            arc = ArcModel(
                self.cluster,
                self.caps,
                free=free,
                fixed=dict(self.best.layers),
                partial=self.partial,
                symmetry_classes=sym,
                time_limit=sub_limit,
                seed=self.seed + it,
                stop=self.stop,
                keep_arcs=keep,
                node_limit=self.node_limit,
            )
            res = arc.solve(start=dict(self.best.layers), start_flows=flow.link_flows)
            improved = res.layers is not None and self.offer(res.layers, f"LNS({len(free)} nodes)")
            if improved:
                fails = 0
            else:
                fails += 1
                if fails % 6 == 0 and size < min(8, len(ids)):
                    size += 1
                    log.debug("LNS neighbourhood grows to %d nodes", size)
            if it % 10 == 0:
                self._report("lns")

    def _best_flow(self) -> Any:
        """Max flow of the incumbent, computed once per incumbent (the LNS asks every iteration)."""
        assert self.best is not None
        if self._flow_of is not self.best:
            self._flow_cache = max_flow(self.best, self.tm)
            self._flow_of = self.best
        return self._flow_cache

    def _choose_free(self, ids: list[int], size: int, flow: Any) -> list[int]:
        assert self.best is not None
        layers = self.best.layers
        mode = self.rng.random()
        if mode < 0.4:
            # under-used nodes plus random partners: their capacity is where the flow can grow
            util = sorted(ids, key=lambda i: (flow.utilisation(i) if layers.get(i) is not None else -1.0, self.rng.random()))
            pick = util[: max(1, size // 2)]
            rest = [i for i in ids if i not in pick]
            pick += self.rng.sample(rest, min(size - len(pick), len(rest)))
            return sorted(pick)
        if mode < 0.7:
            # nodes around one layer boundary: the bottleneck is local along the layer axis
            L = self.caps.num_layers
            ell = self.rng.randrange(L)
            near = sorted(
                ids,
                key=lambda i: (
                    _distance(layers.get(i), ell, L),
                    self.rng.random(),
                ),
            )
            return sorted(near[:size])
        return sorted(self.rng.sample(ids, min(size, len(ids))))


def _distance(r: LayerRange | None, ell: int, far: int) -> int:
    """Layers between a range's nearest boundary and layer ``ell`` (``far`` for an unused node)."""
    if r is None:
        return far
    return min(abs(r[0] - ell), abs(r[1] - ell))


def pipeline_cover(caps: Capacities, nodes: list[int], max_pipelines: int = 12) -> dict[int, LayerRange | None]:
    """Constructive start: disjoint pipelines of equal capacity, repeated on the nodes left over.

    For p pipelines of capacity c, node i can take k_i(c) = the most layers it holds while still
    carrying c tokens/s; the nodes are dealt (largest k first) to the pipeline with the fewest
    layers so far, and (p, c) is feasible when every pipeline reaches L layers. Bisection on c for
    each p keeps the p with the largest p * c; the nodes not needed form further pipelines the
    same way. The MILP neighbourhoods then merge and rebalance pipelines at shared boundaries.
    """
    L = caps.num_layers
    layers: dict[int, LayerRange | None] = {i: None for i in nodes}
    remaining = [i for i in nodes if caps.node_max_layers[i] > 0]

    def k_of(i: int, c: float) -> int:
        best = 0
        for k in range(1, caps.node_max_layers[i] + 1):
            if caps.node_cap[(i, k)] >= c:
                best = k
        return best

    def deal(pool: list[int], p: int, c: float) -> list[list[tuple[int, int]]] | None:
        ks = sorted(((k_of(i, c), i) for i in pool), reverse=True)
        bins: list[list[tuple[int, int]]] = [[] for _ in range(p)]
        sums = [0] * p
        for k, i in ks:
            if k == 0:
                break
            j = min(range(p), key=lambda b: (sums[b] >= L, sums[b]))
            if sums[j] >= L:
                break
            bins[j].append((i, k))
            sums[j] += k
        return bins if all(x >= L for x in sums) else None

    while remaining:
        best: tuple[float, int, float, list[list[tuple[int, int]]]] | None = None
        for p in range(1, max_pipelines + 1):
            lo, hi = 0.0, max(caps.node_best(i) for i in remaining)
            if deal(remaining, p, lo + 1e-9) is None:
                break
            for _ in range(40):
                mid = (lo + hi) / 2
                if deal(remaining, p, mid) is not None:
                    lo = mid
                else:
                    hi = mid
            bins = deal(remaining, p, lo)
            if bins is not None and (best is None or p * lo > best[0]):
                best = (p * lo, p, lo, bins)
        if best is None:
            break
        for chain in best[3]:
            pos = 0
            for i, k in sorted(chain, key=lambda t: -caps.node_cap[(t[0], t[1])]):
                if pos >= L:
                    break
                take = min(k, L - pos)
                layers[i] = (pos, pos + take)
                pos += take
                remaining.remove(i)
    return layers


def plan(
    cluster: ClusterSpec,
    model: ModelSpec | str,
    settings: SearchSettings | None = None,
    *,
    on_improve: Callable[[Placement, float], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop: StopFlag | None = None,
) -> PlanResult:
    """Plan a placement of ``model`` on ``cluster`` for max flow, as ``settings`` say
    (:class:`~helix_async.settings.SearchSettings`; its defaults when None).

    ``settings.method``: "milp" (heuristics -> position model -> LNS over the MILP) or one
    heuristic's name. The search ends on the first of its limits: time, stall, gap, work
    (``round_limit``) or ``stop``. ``prune`` keeps only each node's fastest links (plus the
    incumbent's) in the MILP neighbourhoods, as Helix's pruning did for large clusters.
    on_improve: called with every new best verified plan and its max flow (tokens/s).
    progress: called with the search's events (elapsed seconds, incumbent, bound, gap, source).
    Returns the best verified plan found; an impossible time limit still returns the best heuristic.
    ``PlanResult.stop_cause`` says why the search ended (:data:`StopCause`).
    """
    settings = settings if settings is not None else SearchSettings()
    method = settings.method
    spec = get_model(model)
    if method not in METHODS:
        raise ConfigError("<argument>", "method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    s = _PlanSearch(
        cluster,
        spec,
        settings,
        on_improve=on_improve,
        progress=progress,
        stop=stop if stop is not None else StopFlag(),
    )
    s.tighten(coverage_bound(s.caps), "coverage bound")
    if method != "milp":
        p = run_heuristic(method, cluster, spec, seed=settings.seed, tm=s.tm)  # Petals with its partial links
        value = max_flow(p, s.tm).value
        s.best, s.best_value, s.best_source = p, value, f"heuristic {method}"
        s.history.append((s.elapsed(), value, s.best_source))
        why: tuple[StopCause, str] = ("heuristic", "heuristic")
    else:
        s.run_heuristics()
        if s.best is None:
            raise PlanningError(f"no heuristic produced a plan for {spec.name} on {cluster.name}")
        if s.should_stop() is None:
            s.run_position_model(min(settings.position_fraction * settings.time_limit, 120.0, s.remaining()))
        why = s.should_stop() or s.run_lns()
    assert s.best is not None
    best = s._stamped(s.best)
    return PlanResult(
        placement=best,
        value=s.best_value,
        upper_bound=s.bound,
        bound_source=s.bound_source,
        max_compute_throughput=s.caps.compute_bound,
        seconds=s.elapsed(),
        found_by=s.best_source,
        stop_cause=why[0],
        stopped=why[1],
        history=s.history,
        heuristics=s.heuristics,
    )
