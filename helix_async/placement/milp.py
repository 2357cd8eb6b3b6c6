"""MILP models of the placement problem in PySCIPOpt, and the upper bounds a planner can certify.

Two models:

* ``ArcModel``: the Helix MILP (docs/original.md §4) with the fixes of §12.1: per-arc big-M no larger
  than what the arc's endpoints can carry, the aggregate cut ``L * F <= sum_i k_i * T_i(k_i)``,
  ``F <= U``, at most one direction per node pair, lexicographic symmetry breaking inside classes
  of interchangeable nodes, and a complete warm start. Any subset of nodes can be fixed, which
  turns it into the neighbourhood of the large-neighbourhood search.
* ``PositionModel``: the aggregated model of PLANNER_NOTES (layer boundaries as vertices, counts of
  nodes of each type holding each range). It ignores links, so it is a relaxation of the real
  problem without partial inference on any graph: its dual bound is an honest upper bound, and on a
  complete graph whose links never bind its optimum is the optimum.

Only the placement is taken from a solver; its value is always recomputed by exact max flow.
PySCIPOpt is imported lazily so the runtime does not need a solver.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..cluster import ClusterSpec
from ..extras import require
from ..ids import SINK, SOURCE, LayerRange, NodeRef
from ..model import ModelSpec, ThroughputModel, max_compute_throughput
from ..signals import StopFlag
from .flow import arc_capacity

log = logging.getLogger("helix_async.planner")


@dataclass(frozen=True)
class Capacities:
    """Per-node and per-arc capacities (tokens/s) shared by the models and the bounds."""

    num_layers: int
    node_max_layers: Mapping[int, int]
    node_cap: Mapping[tuple[int, int], float]  # (node, k) -> tokens/s through all k layers
    arc_cap: Mapping[tuple[NodeRef, NodeRef], float]  # directed cluster arcs
    source_cap: float
    sink_cap: float
    compute_bound: float  # the cluster's max compute throughput (tokens/s), a bound on any max flow

    @classmethod
    def build(cls, cluster: ClusterSpec, model: ModelSpec, tm: ThroughputModel) -> Capacities:
        tau = model.token_size
        alpha = model.activation_size
        node_max: dict[int, int] = {}
        node_cap: dict[tuple[int, int], float] = {}
        for n in cluster.nodes:
            m = cluster.machine(n.id)
            kmax = tm.max_layers(m)
            node_max[n.id] = kmax
            nic = min(m.nic_in, m.nic_out) / (tau + alpha)
            for k in range(1, kmax + 1):
                # Same capacity as the flow graph's start->end edge, also bounded by the NIC edges.
                node_cap[(n.id, k)] = min(tm.throughput(m.gpu, k), nic)
        arc_cap: dict[tuple[NodeRef, NodeRef], float] = {}
        for a in cluster.arcs():
            arc_cap[(a.src, a.dst)] = arc_capacity(a, model)
        # the same formula as everywhere else (docs/original.md §3.5); it bounds these capacities too
        U = max_compute_throughput(cluster, model, tm)
        return cls(
            num_layers=model.num_layers,
            node_max_layers=node_max,
            node_cap=node_cap,
            arc_cap=arc_cap,
            source_cap=cluster.coordinator_nic_out / tau,
            sink_cap=cluster.coordinator_nic_in / tau,
            compute_bound=U,
        )

    def node_best(self, i: int) -> float:
        kmax = self.node_max_layers[i]
        return max((self.node_cap[(i, k)] for k in range(1, kmax + 1)), default=0.0)


def coverage_bound(caps: Capacities, iters: int = 100) -> float:
    """Threshold-coverage bound (PLANNER_NOTES): the largest F with L*F <= sum_i max_k k*min(T_ik, F).

    Every token passes one holder of every layer, and a node carries at most min(T_i(k), F) of the
    flow F, so any plan's max flow F satisfies the inequality. Found by bisection on F.
    """
    L = caps.num_layers
    nodes = [i for i, kmax in caps.node_max_layers.items() if kmax > 0]

    def feasible(F: float) -> bool:
        total = 0.0
        for i in nodes:
            total += max(k * min(caps.node_cap[(i, k)], F) for k in range(1, caps.node_max_layers[i] + 1))
        # At the bound the inequality is often an equality (g(F) = L*F exactly); the relative
        # slack absorbs the float rounding of the sum so bisection does not stop short of it.
        return L * F <= total * (1 + 1e-12)

    lo, hi = 0.0, max(caps.compute_bound, 1e-9) * 1.000001
    hi = min(hi, caps.source_cap, caps.sink_cap) if caps.source_cap > 0 else hi
    if feasible(hi):
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return hi


def _scip() -> Any:
    return require("pyscipopt", "plan")


def _make_model(name: str, *, time_limit: float, seed: int, node_limit: int | None = None, verbose: bool = False) -> Any:
    """A SCIP model that stops after ``time_limit`` seconds of wall time or, when given,
    ``node_limit`` branch-and-bound nodes (a bound on work, whatever the machine's speed)."""
    scip = _scip()
    m = scip.Model(name)
    if not verbose:
        m.hideOutput()
    m.setParam("limits/time", max(0.5, float(time_limit)))
    if node_limit is not None:
        m.setParam("limits/nodes", int(node_limit))
    m.setParam("randomization/randomseedshift", int(seed) % 2**31)
    m.setParam("misc/catchctrlc", False)  # our SignalStop + event handler stop the solve cleanly
    return m


def _attach_stop(m: Any, stop: StopFlag | None) -> Any:
    """Poll ``stop`` at every solved node / found solution and interrupt SCIP when it is set."""
    if stop is None:
        return None
    scip = _scip()

    class _StopHandler(scip.Eventhdlr):  # type: ignore[name-defined]
        def eventinit(self) -> None:
            self.model.catchEvent(scip.SCIP_EVENTTYPE.NODESOLVED, self)
            self.model.catchEvent(scip.SCIP_EVENTTYPE.LPSOLVED, self)

        def eventexit(self) -> None:
            self.model.dropEvent(scip.SCIP_EVENTTYPE.NODESOLVED, self)
            self.model.dropEvent(scip.SCIP_EVENTTYPE.LPSOLVED, self)

        def eventexec(self, event: Any) -> None:
            if stop:
                self.model.interruptSolve()

    h = _StopHandler()
    m.includeEventhdlr(h, "helix_stop", "interrupt the solve when a stop was requested")
    return h


@dataclass
class SolveResult:
    """What a MILP solve returned: a placement candidate (or None), SCIP's bounds and status."""

    layers: dict[int, LayerRange | None] | None
    objective: float  # SCIP's primal value (NOT trusted as the plan's value)
    dual_bound: float
    status: str
    seconds: float


class PositionModel:
    """Aggregated position model: counts of type-class nodes per layer range, flows per range.

    ``classes`` groups nodes with identical capacity tables (same machine type); a class's
    capacity for k layers is its nodes' common ``node_cap``. Nodes may be pinned (fixed ranges)
    so the model can also serve as a neighbourhood on a complete graph.
    """

    def __init__(
        self,
        caps: Capacities,
        classes: Mapping[str, list[int]],
        *,
        fixed: Mapping[int, LayerRange | None] | None = None,
        time_limit: float = 60.0,
        seed: int = 0,
        stop: StopFlag | None = None,
        kv_tokens: Mapping[tuple[int, int], float] | None = None,
        kv_floor: float = 0.0,
        min_layers: int = 1,
        node_limit: int | None = None,
    ) -> None:
        """time_limit: seconds of wall time; node_limit: branch-and-bound nodes (None: no bound).
        kv_tokens: (node, k) -> tokens of context the node holds per layer with k layers; with
        ``kv_floor`` > 0 every layer must be held by nodes summing to at least that many tokens (the
        KV that bounds how many requests are in flight, linear in the counts). min_layers: a used
        node holds at least this many layers (or its maximum, if lower), which bounds a route's
        depth at ceil(L / min_layers) stages."""
        self.caps = caps
        self.classes = {c: list(ids) for c, ids in classes.items()}
        self.fixed = dict(fixed or {})
        if kv_floor > 0 and kv_tokens is None:
            raise ValueError("kv_floor needs kv_tokens")
        self.kv_tokens = dict(kv_tokens or {})
        self.kv_floor = float(kv_floor)
        self.min_layers = int(min_layers)
        self.time_limit = time_limit
        self.node_limit = node_limit
        self.seed = seed
        self.stop = stop

    def solve(self, start: Mapping[int, LayerRange | None] | None = None) -> SolveResult:
        scip = _scip()
        caps = self.caps
        L = caps.num_layers
        m = _make_model("helix-position", time_limit=self.time_limit, seed=self.seed, node_limit=self.node_limit)
        m.setHeuristics(scip.SCIP_PARAMSETTING.AGGRESSIVE)
        _attach_stop(m, self.stop)
        n: dict[tuple[str, int, int], Any] = {}
        g: dict[tuple[str, int, int], Any] = {}
        starts_at: dict[int, list[Any]] = {b: [] for b in range(L + 1)}
        ends_at: dict[int, list[Any]] = {b: [] for b in range(L + 1)}
        free_count: dict[str, int] = {}
        pinned: dict[tuple[str, int, int], int] = {}
        for c, ids in self.classes.items():
            free_ids = [i for i in ids if i not in self.fixed]
            free_count[c] = len(free_ids)
            for i in ids:
                r = self.fixed.get(i)
                if i in self.fixed and r is not None:
                    pinned[(c, r[0], r[1] - r[0])] = pinned.get((c, r[0], r[1] - r[0]), 0) + 1
            rep = ids[0]
            kmax = caps.node_max_layers[rep]
            kmin = min(self.min_layers, kmax)
            for s in range(L):
                for k in range(1, min(kmax, L - s) + 1):
                    key = (c, s, k)
                    lo = pinned.get(key, 0)
                    if k < kmin and lo == 0:
                        continue
                    hi = lo + free_count[c]
                    if hi == 0:
                        continue
                    nv = m.addVar(vtype="I", lb=lo, ub=hi, name=f"n_{c}_{s}_{k}")
                    gv = m.addVar(vtype="C", lb=0.0, name=f"g_{c}_{s}_{k}")
                    m.addCons(gv <= caps.node_cap[(rep, k)] * nv)
                    n[key], g[key] = nv, gv
                    starts_at[s].append(gv)
                    ends_at[s + k].append(gv)
        for c, ids in self.classes.items():
            keys = [key for key in n if key[0] == c]
            if keys:
                m.addCons(scip.quicksum(n[key] for key in keys) <= len(ids) - sum(
                    1 for i in ids if i in self.fixed and self.fixed[i] is None
                ))
        F = m.addVar(vtype="C", lb=0.0, ub=min(caps.source_cap, caps.sink_cap, caps.compute_bound), name="F")
        m.addCons(F == scip.quicksum(starts_at[0]))
        m.addCons(F == scip.quicksum(ends_at[L]))
        for b in range(1, L):
            m.addCons(scip.quicksum(ends_at[b]) == scip.quicksum(starts_at[b]))
        # Aggregate cut: each token needs L layer executions.
        m.addCons(
            L * F <= scip.quicksum(key[2] * caps.node_cap[(self.classes[key[0]][0], key[2])] * n[key] for key in n)
        )
        if self.kv_floor > 0:
            for layer in range(L):
                m.addCons(
                    scip.quicksum(
                        self.kv_tokens[(self.classes[key[0]][0], key[2])] * var
                        for key, var in n.items()
                        if key[1] <= layer < key[1] + key[2]
                    )
                    >= self.kv_floor
                )
        m.setObjective(F, "maximize")
        if start is not None:
            self._warm_start(m, n, start)
        m.optimize()
        return self._result(m, n)

    def _warm_start(self, m: Any, n: Mapping[tuple[str, int, int], Any], start: Mapping[int, LayerRange | None]) -> None:
        counts: dict[tuple[str, int, int], int] = {}
        for c, ids in self.classes.items():
            for i in ids:
                r = start.get(i)
                if r is not None:
                    key = (c, r[0], r[1] - r[0])
                    counts[key] = counts.get(key, 0) + 1
        sol = m.createPartialSol()
        for key, var in n.items():
            m.setSolVal(sol, var, counts.get(key, 0))
        m.addSol(sol)

    def _result(self, m: Any, n: Mapping[tuple[str, int, int], Any]) -> SolveResult:
        status = m.getStatus()
        dual = m.getDualbound()
        secs = m.getSolvingTime()
        if m.getNSols() == 0:
            return SolveResult(None, 0.0, dual, status, secs)
        sol = m.getBestSol()
        obj = m.getSolObjVal(sol)
        # Hand out ranges to concrete nodes: pinned nodes keep theirs, free nodes of the class take
        # the remaining counts in id order (on a complete, uniform graph any matching is as good).
        layers: dict[int, LayerRange | None] = {}
        for c, ids in self.classes.items():
            want: list[LayerRange] = []
            for key, var in n.items():
                if key[0] != c:
                    continue
                cnt = int(round(m.getSolVal(sol, var)))
                want += [(key[1], key[1] + key[2])] * cnt
            for i in ids:
                if i in self.fixed:
                    r = self.fixed[i]
                    layers[i] = r
                    if r is not None and r in want:
                        want.remove(r)
            for i in ids:
                if i not in self.fixed:
                    layers[i] = want.pop(0) if want else None
        return SolveResult(layers, obj, dual, status, secs)


class ArcModel:
    """The node/arc MILP of Helix with tightened big-M, cuts and symmetry breaking.

    free: nodes whose ranges the solver chooses; every other node keeps ``fixed[node]``.
    partial: allow partial-inference links (s_j <= e_i < e_j).
    time_limit: seconds of wall time; node_limit: branch-and-bound nodes (None: no bound).
    """

    def __init__(
        self,
        cluster: ClusterSpec,
        caps: Capacities,
        *,
        free: Iterable[int],
        fixed: Mapping[int, LayerRange | None],
        partial: bool = False,
        symmetry_classes: Iterable[list[int]] = (),
        time_limit: float = 30.0,
        seed: int = 0,
        stop: StopFlag | None = None,
        aggressive: bool = True,
        verbose: bool = False,
        keep_arcs: Iterable[tuple[NodeRef, NodeRef]] | None = None,
        node_limit: int | None = None,
    ) -> None:
        self.cluster = cluster
        self.caps = caps
        self.free = sorted(set(free))
        self.fixed = {i: r for i, r in fixed.items() if i not in self.free}
        self.partial = partial
        self.symmetry_classes = [sorted(c) for c in symmetry_classes]
        self.time_limit = time_limit
        self.seed = seed
        self.stop = stop
        self.aggressive = aggressive
        self.verbose = verbose
        self.keep_arcs = None if keep_arcs is None else set(keep_arcs)
        self.node_limit = node_limit

    def solve(self, start: Mapping[int, LayerRange | None] | None = None, start_flows: Mapping[tuple[NodeRef, NodeRef], float] | None = None) -> SolveResult:
        scip = _scip()
        qs = scip.quicksum
        caps = self.caps
        L = caps.num_layers
        m = _make_model("helix-arc", time_limit=self.time_limit, seed=self.seed, node_limit=self.node_limit,
                        verbose=self.verbose)
        if self.aggressive:
            m.setHeuristics(scip.SCIP_PARAMSETTING.AGGRESSIVE)
        _attach_stop(m, self.stop)
        free = set(self.free)
        s: dict[int, Any] = {}
        b: dict[tuple[int, int], Any] = {}
        e: dict[int, Any] = {}  # expression or constant
        sv: dict[int, Any] = {}
        cap_expr: dict[int, Any] = {}
        work_expr: list[Any] = []
        kexpr: dict[int, Any] = {}
        for i in self.free:
            kmax = caps.node_max_layers[i]
            if kmax <= 0:
                continue
            s[i] = m.addVar(vtype="I", lb=0, ub=L - 1, name=f"start_{i}")
            for k in range(1, kmax + 1):
                b[(i, k)] = m.addVar(vtype="B", name=f"hold_{i}_{k}")
            m.addCons(qs(b[(i, k)] for k in range(1, kmax + 1)) == 1)
            kexpr[i] = qs(k * b[(i, k)] for k in range(1, kmax + 1))
            e[i] = s[i] + kexpr[i]
            m.addCons(e[i] <= L)
            sv[i] = s[i]
            cap_expr[i] = qs(caps.node_cap[(i, k)] * b[(i, k)] for k in range(1, kmax + 1))
            work_expr.append(qs(k * caps.node_cap[(i, k)] * b[(i, k)] for k in range(1, kmax + 1)))
        for i, r in self.fixed.items():
            if r is None:
                continue
            sv[i] = r[0]
            e[i] = r[1]
            cap_expr[i] = caps.node_cap.get((i, r[1] - r[0]), 0.0)
            work_expr.append((r[1] - r[0]) * cap_expr[i])
        active = set(sv)

        def node_range_cap(i: int) -> float:
            if i in free:
                return caps.node_best(i)
            return float(cap_expr[i])

        f: dict[tuple[NodeRef, NodeRef], Any] = {}
        d: dict[tuple[NodeRef, NodeRef], Any] = {}
        inflow: dict[int, list[Any]] = {i: [] for i in active}
        outflow: dict[int, list[Any]] = {i: [] for i in active}
        src_flows: list[Any] = []
        snk_flows: list[Any] = []
        for (u, v), c in caps.arc_cap.items():
            if (u != SOURCE and u not in active) or (v != SINK and v not in active):
                continue
            if self.keep_arcs is not None and (u, v) not in self.keep_arcs:
                continue
            # Tight big-M: an arc never carries more than its endpoints can (docs/original.md §12.1 item 1).
            M = c
            if u != SOURCE:
                M = min(M, node_range_cap(u))  # type: ignore[arg-type]
            if v != SINK:
                M = min(M, node_range_cap(v))  # type: ignore[arg-type]
            if M <= 0:
                continue
            u_free = u in free
            v_free = v in free
            name = f"{u}_{v}"
            if not u_free and not v_free:
                ok = _arc_valid(u, v, sv, e, L, self.partial)
                if not ok:
                    continue
                fv = m.addVar(vtype="C", lb=0.0, ub=M, name=f"flow_{name}")
            else:
                dv = m.addVar(vtype="B", name=f"switch_{name}")
                fv = m.addVar(vtype="C", lb=0.0, ub=M, name=f"flow_{name}")
                m.addCons(fv <= M * dv)
                d[(u, v)] = dv
                if u == SOURCE:
                    m.addCons(sv[v] <= L * (1 - dv))  # type: ignore[index]
                elif v == SINK:
                    m.addCons(L * dv <= e[u])  # type: ignore[index]
                elif not self.partial:
                    # d=1 => s_v == e_u
                    m.addCons(sv[v] - e[u] <= L * (1 - dv))  # type: ignore[index]
                    m.addCons(e[u] - sv[v] <= L * (1 - dv))  # type: ignore[index]
                else:
                    # d=1 => s_v <= e_u <= e_v - 1
                    m.addCons(sv[v] - e[u] <= L * (1 - dv))  # type: ignore[index]
                    m.addCons(e[u] - e[v] + 1 <= (L + 1) * (1 - dv))  # type: ignore[index]
            f[(u, v)] = fv
            if u == SOURCE:
                src_flows.append(fv)
            else:
                outflow[u].append(fv)  # type: ignore[index]
            if v == SINK:
                snk_flows.append(fv)
            else:
                inflow[v].append(fv)  # type: ignore[index]
        for (u, v), dv in d.items():
            if u != SOURCE and v != SINK and (v, u) in d:
                if str(u) < str(v):
                    m.addCons(dv + d[(v, u)] <= 1)
        for i in active:
            m.addCons(qs(inflow[i]) == qs(outflow[i]))
            m.addCons(qs(inflow[i]) <= cap_expr[i])
        F = m.addVar(vtype="C", lb=0.0, ub=min(caps.source_cap, caps.sink_cap, caps.compute_bound), name="F")
        m.addCons(F == qs(src_flows))
        m.addCons(F == qs(snk_flows))
        m.addCons(L * F <= qs(work_expr))  # aggregate cut
        sym_members = [[i for i in cls if i in free and i in kexpr] for cls in self.symmetry_classes]
        for members in sym_members:
            for a, c in zip(members, members[1:], strict=False):
                # lexicographic (k desc, then start asc) among interchangeable nodes
                m.addCons(kexpr[a] >= kexpr[c])
                m.addCons(s[a] - s[c] <= L * (kexpr[a] - kexpr[c]))
        m.setObjective(F, "maximize")
        if start is not None:
            start, start_flows = _canonical_start(start, start_flows, sym_members, L)
            self._warm_start(m, s, b, d, f, F, start, start_flows)
        m.optimize()
        status = m.getStatus()
        dual = m.getDualbound()
        secs = m.getSolvingTime()
        if m.getNSols() == 0:
            return SolveResult(None, 0.0, dual, status, secs)
        sol = m.getBestSol()
        layers: dict[int, LayerRange | None] = dict(self.fixed)
        for i in self.free:
            if i not in s:
                layers[i] = None
                continue
            st = int(round(m.getSolVal(sol, s[i])))
            k = next(k for k in range(1, caps.node_max_layers[i] + 1) if m.getSolVal(sol, b[(i, k)]) > 0.5)
            layers[i] = (st, st + k)
        return SolveResult(layers, m.getSolObjVal(sol), dual, status, secs)

    def _warm_start(
        self,
        m: Any,
        s: Mapping[int, Any],
        b: Mapping[tuple[int, int], Any],
        d: Mapping[tuple[NodeRef, NodeRef], Any],
        f: Mapping[tuple[NodeRef, NodeRef], Any],
        F: Any,
        start: Mapping[int, LayerRange | None],
        flows: Mapping[tuple[NodeRef, NodeRef], float] | None,
    ) -> None:
        """A complete start (ranges, switches, flows) when flows are given, else a partial one."""
        L = self.caps.num_layers
        sv: dict[int, int] = {}
        ev: dict[int, int] = {}
        for i in self.free:
            r = start.get(i)
            if i not in s:
                continue
            if r is None:
                # an unused node in the start still needs a range in this model: park it at the end
                kmax = self.caps.node_max_layers[i]
                r = (L - 1, L) if kmax >= 1 else None
            if r is None:
                continue
            sv[i], ev[i] = r
        for i, r in self.fixed.items():
            if r is not None:
                sv[i], ev[i] = r
        complete = flows is not None
        sol = m.createSol() if complete else m.createPartialSol()
        for i, var in s.items():
            m.setSolVal(sol, var, sv[i])
            k = ev[i] - sv[i]
            for kk in range(1, self.caps.node_max_layers[i] + 1):
                m.setSolVal(sol, b[(i, kk)], 1.0 if kk == k else 0.0)
        if complete:
            assert flows is not None
            total = 0.0
            for (u, v), var in f.items():
                val = max(0.0, float(flows.get((u, v), 0.0)))
                ub = var.getUbGlobal()
                val = min(val, ub)
                m.setSolVal(sol, var, val)
                if u == SOURCE:
                    total += val
            for (u, v), var in d.items():
                valid = _arc_valid(u, v, sv, ev, L, self.partial)
                m.setSolVal(sol, var, 1.0 if valid else 0.0)
            m.setSolVal(sol, F, total)
            accepted = m.addSol(sol, free=True)
            if not accepted:
                log.debug("complete warm start rejected by SCIP; falling back to a partial start")
                psol = m.createPartialSol()
                for i, var in s.items():
                    m.setSolVal(psol, var, sv[i])
                    k = ev[i] - sv[i]
                    for kk in range(1, self.caps.node_max_layers[i] + 1):
                        m.setSolVal(psol, b[(i, kk)], 1.0 if kk == k else 0.0)
                m.addSol(psol)
        else:
            m.addSol(sol)


def _canonical_start(
    start: Mapping[int, LayerRange | None],
    flows: Mapping[tuple[NodeRef, NodeRef], float] | None,
    classes: Iterable[list[int]],
    L: int,
) -> tuple[dict[int, LayerRange | None], dict[tuple[NodeRef, NodeRef], float] | None]:
    """Permute the start within classes of interchangeable nodes so it obeys the symmetry breaking.

    The lexicographic constraints ask for (k descending, start ascending) in id order inside each
    class; a start in another order would be rejected and the solve would begin cold. Swapping
    interchangeable nodes changes neither the plan's value nor its links' capacities, so the start
    is re-labelled (ranges and flows alike) to the order the model accepts.
    """
    perm: dict[int, int] = {}
    out = dict(start)
    for members in classes:
        if len(members) < 2:
            continue

        def key(i: int) -> tuple[int, int, int]:
            r = start.get(i)
            if r is None:  # parked at the last layer by the warm start
                r = (L - 1, L)
            return (-(r[1] - r[0]), r[0], i)

        for new_id, old_id in zip(sorted(members), sorted(members, key=key), strict=True):
            perm[old_id] = new_id
            out[new_id] = start.get(old_id)
    if not perm or flows is None:
        return out, None if flows is None else dict(flows)

    def relabel(x: NodeRef) -> NodeRef:
        return perm.get(x, x) if isinstance(x, int) else x

    return out, {(relabel(u), relabel(v)): val for (u, v), val in flows.items()}


def _arc_valid(u: NodeRef, v: NodeRef, sv: Mapping[int, Any], ev: Mapping[int, Any], L: int, partial: bool) -> bool:
    if u == SOURCE:
        return int(sv[v]) == 0  # type: ignore[index]
    if v == SINK:
        return int(ev[u]) == L  # type: ignore[index]
    eu, svv, evv = int(ev[u]), int(sv[v]), int(ev[v])  # type: ignore[index]
    if eu == svv:
        return True
    return partial and svv <= eu < evv


def prune_arcs(
    cluster: ClusterSpec,
    *,
    min_keep: int,
    max_keep: int,
    threshold: float = 0.0,
    must_keep: Iterable[tuple[NodeRef, NodeRef]] = (),
) -> set[tuple[NodeRef, NodeRef]]:
    """Link pruning after Helix's (docs/original.md §2.4), never dropping a link in ``must_keep``.

    Per endpoint (coordinator and each node) links are ranked by bandwidth, fastest first, ties
    by name ascending: the first ``min_keep`` stay, ranks up to ``max_keep`` stay if their bandwidth is at
    least ``threshold`` bytes/s. Two differences from the original: it breaks ties by name
    descending, and it keeps a source link only above the threshold (strictly); so where links
    share one bandwidth a different set can survive. A pair link kept by either end survives in both directions. The
    original could drop every link of its warm start (docs/original.md §12.1 item 4); the arcs of the
    start passed as ``must_keep`` are always kept here.
    """
    kept: set[tuple[NodeRef, NodeRef]] = set(must_keep)

    def take(ranked: list[tuple[float, str, tuple[NodeRef, NodeRef]]]) -> None:
        ranked.sort(key=lambda t: (-t[0], t[1]))
        for rank, (bw, _, arc) in enumerate(ranked):
            if rank < min_keep or (rank < max_keep and bw >= threshold):
                kept.add(arc)
                if arc[0] != SOURCE and arc[1] != SINK:
                    kept.add((arc[1], arc[0]))

    arcs = cluster.arcs()
    take([(a.bandwidth, str(a.dst), (a.src, a.dst)) for a in arcs if a.src == SOURCE])
    take([(a.bandwidth, str(a.src), (a.src, a.dst)) for a in arcs if a.dst == SINK])
    for n in cluster.nodes:
        pair = [a for a in arcs if a.src == n.id and a.dst != SINK]
        take([(a.bandwidth, str(a.dst), (a.src, a.dst)) for a in pair])
    return kept


def interchangeable_classes(cluster: ClusterSpec) -> list[list[int]]:
    """Groups of nodes that are interchangeable: same machine type and identical links to everyone else."""
    arcs = {(a.src, a.dst): (a.bandwidth, a.latency) for a in cluster.arcs()}
    ids = [n.id for n in cluster.nodes]

    def signature(i: int) -> tuple:
        sig: list[Any] = [cluster.nodes[i].machine_type]
        sig.append(arcs.get((SOURCE, i)))
        sig.append(arcs.get((i, SINK)))
        return tuple(sig)

    groups: dict[tuple, list[int]] = {}
    for i in ids:
        groups.setdefault(signature(i), []).append(i)
    out: list[list[int]] = []
    for members in groups.values():
        # refine: pairwise identical links to every third node
        remaining = list(members)
        while remaining:
            a = remaining.pop(0)
            cls = [a]
            for c in list(remaining):
                same = all(
                    arcs.get((a, x)) == arcs.get((c, x)) and arcs.get((x, a)) == arcs.get((x, c))
                    for x in ids
                    if x not in (a, c)
                ) and arcs.get((a, c)) == arcs.get((c, a))
                if same:
                    cls.append(c)
                    remaining.remove(c)
            if len(cls) > 1:
                out.append(cls)
    return out


def type_classes(cluster: ClusterSpec) -> dict[str, list[int]]:
    """Nodes grouped by machine type (the position model's classes)."""
    out: dict[str, list[int]] = {}
    for n in cluster.nodes:
        out.setdefault(n.machine_type, []).append(n.id)
    return out


def links_can_bind(cluster: ClusterSpec, caps: Capacities) -> bool:
    """True when some arc's capacity is below what its endpoints could push (position model inexact)."""
    for (u, v), c in caps.arc_cap.items():
        lim = math.inf
        if u != SOURCE:
            lim = min(lim, caps.node_best(u))  # type: ignore[arg-type]
        if v != SINK:
            lim = min(lim, caps.node_best(v))  # type: ignore[arg-type]
        if u == SOURCE and v == SINK:
            continue
        if c < lim:
            return True
    return not cluster.is_complete()

