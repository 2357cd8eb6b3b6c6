"""Max-flow analysis of a placement: the flow graph, the exact max flow and the routing weights.

The graph follows docs/original.md §6. Every compute node ``u`` that holds layers is split into four
vertices ``u_in -> u_start -> u_end -> u_out`` so that its NICs and its compute are separate
capacities; the coordinator is ``source -> source_out`` (send side) and ``sink_in -> sink``
(receive side); each link of the placement ``a -> b`` becomes ``a_out -> b_in``. All capacities are
in tokens/s (bytes/s divided by the bytes one token costs on that edge):

==========================  ==============================================================
edge                        capacity
==========================  ==============================================================
source -> source_out        coordinator out-NIC / token_size
sink_in -> sink             coordinator in-NIC / token_size
u_in -> u_start             in-NIC / token_size if u's only inbound neighbour is the source,
                            else in-NIC / (token_size + activation_size)
u_start -> u_end            typical throughput of u's GPU with its layer count (no NIC cap)
u_end -> u_out              out-NIC, as u_in -> u_start with "only outbound neighbour is the sink"
a_out -> b_in               bandwidth / token_size if a is the source or b the sink,
                            else bandwidth / (token_size + activation_size)
==========================  ==============================================================

The flow on ``a_out -> b_in`` is the routing weight of link ``a -> b`` (the IWRR weights of the
scheduler). Any exact algorithm gives the same max-flow *value*; the per-edge decomposition may
differ between algorithms.

Three ways to evaluate, from slowest to fastest:

* :func:`max_flow` -- the full :class:`FlowPlan` (value, per-link and per-node flows) with networkx;
* :func:`max_flow_value` -- only the value, same graph, networkx;
* :class:`FlowEvaluator` -- for search loops: the value straight from a layer assignment, with the
  node-split chain collapsed into one edge (exact: the three edges are in series), per-(node, k)
  capacities cached and memoised values; the max flow itself is networkx's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx

from ..cluster import ClusterSpec, DirectedLink
from ..flowplan import FlowPlan
from ..ids import SINK, SOURCE, LayerRange, NodeRef, PlanLink
from ..model import ModelSpec, ThroughputModel, get_model, max_compute_throughput
from .core import Placement

log = logging.getLogger(__name__)

SOURCE_OUT = "source_out"
SINK_IN = "sink_in"
# Uid offset of the original simulator: compute node i is "compute_node_{i+2}", source 0, sink 1.
ORIGINAL_OFFSET = 2

__all__ = [
    "ORIGINAL_OFFSET",
    "SINK_IN",
    "SOURCE_OUT",
    "FlowEvaluator",
    "arc_capacity",
    "build_flow_graph",
    "max_flow",
    "max_flow_value",
    "original_vertex_name",
    "to_original_names",
]


# --------------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------------


def _vin(v: NodeRef) -> str:
    return SINK_IN if v == SINK else f"{v}_in"


def _vout(u: NodeRef) -> str:
    return SOURCE_OUT if u == SOURCE else f"{u}_out"


def original_vertex_name(v: str, offset: int = ORIGINAL_OFFSET) -> str:
    """The original simulator's name of one of our flow-graph vertices.

    ``source``/``sink`` stay, ``source_out`` -> ``0_out``, ``sink_in`` -> ``1_in`` and ``{u}_{part}``
    -> ``{u+offset}_{part}`` (simulator uid = node id + 2).
    """
    if v in (SOURCE, SINK):
        return v
    if v == SOURCE_OUT:
        return "0_out"
    if v == SINK_IN:
        return "1_in"
    node, _, part = v.partition("_")
    return f"{int(node) + offset}_{part}"


def to_original_names(graph: nx.DiGraph, offset: int = ORIGINAL_OFFSET) -> nx.DiGraph:
    """A copy of ``graph`` with vertices renamed as the original simulator names them."""
    return nx.relabel_nodes(graph, {v: original_vertex_name(v, offset) for v in graph}, copy=True)


# --------------------------------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------------------------------


def _throughput_model(placement: Placement, tm: ThroughputModel | None) -> ThroughputModel:
    return tm if tm is not None else ThroughputModel.for_cluster(placement.model_spec, placement.cluster)


def arc_capacity(arc: DirectedLink, model: ModelSpec) -> float:
    """Tokens/s a link carries (docs/original.md §6): coordinator links move token ids only, links
    between nodes move a token id plus its activation."""
    coordinator = arc.src == SOURCE or arc.dst == SINK
    per_token = model.token_size if coordinator else model.token_size + model.activation_size
    return arc.bandwidth / per_token


def _link_capacity(placement: Placement, spec: ModelSpec, u: NodeRef, v: NodeRef) -> float:
    arc = placement.cluster.arc(u, v)
    if arc is None:
        raise ValueError(f"link {u}->{v} is not a link of cluster {placement.cluster.name}")
    return arc_capacity(arc, spec)


def build_flow_graph(placement: Placement, tm: ThroughputModel | None = None) -> nx.DiGraph:
    """The max-flow graph of ``placement`` (docs/original.md §6), capacities (tokens/s) in ``"capacity"``.

    Every node holding layers gets its four vertices, also one that no link reaches (the original
    simulator builds those too; they carry no flow). ``tm`` defaults to the throughput model of the
    placement's whole cluster mix.
    """
    tm = _throughput_model(placement, tm)
    spec = placement.model_spec
    cl = placement.cluster
    token_bytes = spec.token_size
    hop_bytes = spec.token_size + spec.activation_size
    g = nx.DiGraph()
    g.add_edge(SOURCE, SOURCE_OUT, capacity=cl.coordinator_nic_out / token_bytes)
    g.add_edge(SINK_IN, SINK, capacity=cl.coordinator_nic_in / token_bytes)
    ins: dict[NodeRef, set[NodeRef]] = {}
    outs: dict[NodeRef, set[NodeRef]] = {}
    for u, v in placement.links:
        outs.setdefault(u, set()).add(v)
        ins.setdefault(v, set()).add(u)
    for u, r in placement.layers.items():
        if r is None:
            continue
        m = cl.machine(u)
        only_src = ins.get(u) == {SOURCE}
        only_snk = outs.get(u) == {SINK}
        g.add_edge(f"{u}_in", f"{u}_start", capacity=m.nic_in / (token_bytes if only_src else hop_bytes))
        g.add_edge(
            f"{u}_start", f"{u}_end", capacity=tm.throughput(m.gpu, r[1] - r[0], exceed_profiled_max=placement.exceed_profiled_max)
        )
        g.add_edge(f"{u}_end", f"{u}_out", capacity=m.nic_out / (token_bytes if only_snk else hop_bytes))
    for u, v in placement.links:
        g.add_edge(_vout(u), _vin(v), capacity=_link_capacity(placement, spec, u, v))
    return g


def _networkx_max_flow(g: nx.DiGraph, s: int, t: int, value_only: bool) -> Any:
    """networkx max flow with the default algorithm (preflow-push), edmonds_karp as a fallback."""
    fn = nx.maximum_flow_value if value_only else nx.maximum_flow
    try:
        return fn(g, s, t)
    except nx.NetworkXUnbounded:
        raise
    except Exception as exc:  # networkx's preflow-push once raised IndexError (PLANNER_NOTES)
        log.warning("preflow_push failed (%s: %s); retrying with edmonds_karp", type(exc).__name__, exc)
        return fn(g, s, t, flow_func=nx.algorithms.flow.edmonds_karp)


def _solve(graph: nx.DiGraph, value_only: bool) -> Any:
    """Max flow of the flow graph (see :func:`_networkx_max_flow`).

    The graph is solved with integer vertex labels in insertion order: networkx keeps vertices in
    sets along the way, and with string labels the order it visits them, and so the per-edge
    decomposition it returns among equally good flows, would follow the process's string-hash
    seed. Integers hash to themselves, so the decomposition is the same in every process.
    """
    names = list(graph.nodes)
    index = {v: i for i, v in enumerate(names)}
    g = nx.relabel_nodes(graph, index, copy=True)
    result = _networkx_max_flow(g, index[SOURCE], index[SINK], value_only)
    if value_only:
        return result
    value, flow = result
    return value, {names[u]: {names[v]: f for v, f in out.items()} for u, out in flow.items()}


def max_flow(placement: Placement, tm: ThroughputModel | None = None) -> FlowPlan:
    """Exact max flow of ``placement`` with networkx (default algorithm: preflow-push)."""
    tm = _throughput_model(placement, tm)
    g = build_flow_graph(placement, tm)
    value, fd = _solve(g, value_only=False)
    link_flows: dict[tuple[NodeRef, NodeRef], float] = {}
    link_cap: dict[tuple[NodeRef, NodeRef], float] = {}
    for u, v in placement.links:
        a, b = _vout(u), _vin(v)
        link_flows[(u, v)] = float(fd[a][b])
        link_cap[(u, v)] = float(g[a][b]["capacity"])
    node_flows: dict[int, float] = {}
    node_cap: dict[int, float] = {}
    for u, r in placement.layers.items():
        if r is None:
            continue
        node_flows[u] = float(fd[f"{u}_start"][f"{u}_end"])
        node_cap[u] = float(g[f"{u}_start"][f"{u}_end"]["capacity"])
    return FlowPlan(
        value=float(value),
        link_flows=link_flows,
        node_flows=node_flows,
        node_capacity=node_cap,
        link_capacity=link_cap,
        max_compute_throughput=max_compute_throughput(placement.cluster, placement.model_spec, tm),
    )


def max_flow_value(placement: Placement, tm: ThroughputModel | None = None) -> float:
    """Only the max-flow value of ``placement`` (same graph as :func:`max_flow`)."""
    return float(_solve(build_flow_graph(placement, tm), value_only=True))


# --------------------------------------------------------------------------------------------------
# Fast evaluator for search loops
# --------------------------------------------------------------------------------------------------

def _collapsed_max_flow(n: int, edges: list[tuple[int, int, float]], s: int, t: int) -> tuple[float, list[float]]:
    """Max flow of the collapsed graph with networkx; returns (value, residual of each edge, in order)."""
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for u, v, c in edges:
        g.add_edge(u, v, capacity=c)
    value, flow = _networkx_max_flow(g, s, t, value_only=False)
    return value, [c - flow[u][v] for u, v, c in edges]


class FlowEvaluator:
    """Max-flow value of layer assignments on one cluster, fast enough for local search.

    ``value(layers)`` equals ``max_flow(Placement.from_layers(cluster, model, layers,
    partial=partial)).value`` (up to float rounding, ~1e-12 relative): the links are every usable
    cluster arc cleaned to a fixpoint, the node's in-NIC / compute / out-NIC edges (in series) are
    collapsed into one edge with the smallest of the three capacities, typical throughputs are cached
    per (node, layer count) and the flow is computed by networkx on that collapsed graph. Results are
    memoised per (layers, partial) up to ``cache_size`` entries (0 disables the memo).

    Layer ranges are not verified here (use :func:`~helix_async.placement.core.verify` on the plan you
    keep); a count above the node's profiled maximum raises unless ``exceed_profiled_max``.
    """

    def __init__(
        self,
        cluster: ClusterSpec,
        model: ModelSpec | str,
        tm: ThroughputModel | None = None,
        *,
        exceed_profiled_max: bool = False,
        cache_size: int = 20_000,
    ) -> None:
        self.cluster = cluster
        self.model = get_model(model)
        self.tm = tm if tm is not None else ThroughputModel.for_cluster(self.model, cluster)
        self.exceed_profiled_max = exceed_profiled_max
        self.cache_size = cache_size
        self.num_layers = self.model.num_layers
        token_bytes = self.model.token_size
        hop_bytes = self.model.token_size + self.model.activation_size
        n = cluster.num_nodes
        self._n = n
        self._src_cap = cluster.coordinator_nic_out / token_bytes
        self._snk_cap = cluster.coordinator_nic_in / token_bytes
        self._gpu = [cluster.machine(i).gpu for i in range(n)]
        machines = [cluster.machine(i) for i in range(n)]
        # in-NIC capacity when only the source feeds the node, and otherwise; likewise out-NIC
        self._in_src = [m.nic_in / token_bytes for m in machines]
        self._in_act = [m.nic_in / hop_bytes for m in machines]
        self._out_snk = [m.nic_out / token_bytes for m in machines]
        self._out_act = [m.nic_out / hop_bytes for m in machines]
        self._src_arc: dict[int, float] = {}  # v -> capacity of source->v (tokens/s)
        self._snk_arc: dict[int, float] = {}  # u -> capacity of u->sink
        self._pair: dict[tuple[int, int], float] = {}  # (u, v) -> capacity
        for a in cluster.arcs():
            if a.src == SOURCE:
                if a.dst != SINK:
                    self._src_arc[int(a.dst)] = arc_capacity(a, self.model)
            elif a.dst == SINK:
                self._snk_arc[int(a.src)] = arc_capacity(a, self.model)
            else:
                self._pair[(int(a.src), int(a.dst))] = arc_capacity(a, self.model)
        self._tp: dict[tuple[int, int], float] = {}
        self._memo: dict[tuple[Any, ...], float] = {}
        self.evaluations = 0  # uncached evaluations performed
        self.hits = 0

    # ---- inputs ----------------------------------------------------------------------------------

    def _held(
        self, layers: Mapping[int, LayerRange | None] | Sequence[LayerRange | None]
    ) -> dict[int, LayerRange]:
        items = layers.items() if isinstance(layers, Mapping) else enumerate(layers)
        held: dict[int, LayerRange] = {}
        L = self.num_layers
        for i, r in items:
            if r is None:
                continue
            s, e = int(r[0]), int(r[1])
            if not (0 <= s < e <= L) or not (0 <= i < self._n):
                raise ValueError(
                    f"node {i}: bad layer range [{s}, {e}) (model has {L} layers, {self._n} nodes)"
                )
            held[i] = (s, e)
        return held

    def throughput(self, node: int, k: int) -> float:
        """Typical throughput (tokens/s) of ``node`` holding ``k`` layers (cached)."""
        key = (node, k)
        tp = self._tp.get(key)
        if tp is None:
            tp = self.tm.throughput(self._gpu[node], k, exceed_profiled_max=self.exceed_profiled_max)
            self._tp[key] = tp
        return tp

    def links(
        self, layers: Mapping[int, LayerRange | None] | Sequence[LayerRange | None], partial: bool = False
    ) -> tuple[PlanLink, ...]:
        """The placement links of ``layers`` (the same set as ``placement_arcs``)."""
        return self._links(self._held(layers), partial)

    def _links(self, held: dict[int, LayerRange], partial: bool) -> tuple[PlanLink, ...]:
        L = self.num_layers
        arcs: list[PlanLink] = []
        src_arc, snk_arc, pair = self._src_arc, self._snk_arc, self._pair
        by_start: dict[int, list[int]] = {}
        for i, (s, _) in held.items():
            by_start.setdefault(s, []).append(i)
        for v in by_start.get(0, ()):
            if v in src_arc:
                arcs.append((SOURCE, v))
        items = list(held.items())
        for u, (_, eu) in items:
            if eu == L:
                if u in snk_arc:
                    arcs.append((u, SINK))
                continue
            for v in by_start.get(eu, ()):
                if (u, v) in pair:
                    arcs.append((u, v))
            if partial:
                for v, (sv, ev) in items:
                    if sv < eu < ev and (u, v) in pair:
                        arcs.append((u, v))
        # Placement graphs are DAGs (every arc strictly increases the end layer), so the fixpoint of
        # clean_arcs is exactly: u reachable from the source and v reaching the sink.
        succ: dict[NodeRef, list[NodeRef]] = {}
        pred: dict[NodeRef, list[NodeRef]] = {}
        for a, b in arcs:
            succ.setdefault(a, []).append(b)
            pred.setdefault(b, []).append(a)
        fwd: set[NodeRef] = {SOURCE}
        stack: list[NodeRef] = [SOURCE]
        while stack:
            for w in succ.get(stack.pop(), ()):
                if w not in fwd:
                    fwd.add(w)
                    stack.append(w)
        bwd: set[NodeRef] = {SINK}
        stack = [SINK]
        while stack:
            for w in pred.get(stack.pop(), ()):
                if w not in bwd:
                    bwd.add(w)
                    stack.append(w)
        return tuple(a for a in arcs if a[0] in fwd and a[1] in bwd)

    # ---- evaluation ------------------------------------------------------------------------------

    def _solve(self, held: dict[int, LayerRange], partial: bool) -> tuple[float, dict[int, float]]:
        arcs = self._links(held, partial)
        # vertices: 0 source, 1 source_out, 2 sink_in, 3 sink, node j: 4+2j (in), 5+2j (out)
        idx: dict[int, int] = {}
        ins: dict[int, list[NodeRef]] = {}
        outs: dict[int, list[NodeRef]] = {}
        for u, v in arcs:
            if u != SOURCE:
                outs.setdefault(u, []).append(v)  # type: ignore[arg-type]
            if v != SINK:
                ins.setdefault(v, []).append(u)  # type: ignore[arg-type]
        edges: list[tuple[int, int, float]] = [(0, 1, self._src_cap), (2, 3, self._snk_cap)]
        nodes = sorted(set(ins) | set(outs))
        for j, u in enumerate(nodes):
            idx[u] = j
            s, e = held[u]
            i_u = ins.get(u, ())
            o_u = outs.get(u, ())
            cin = self._in_src[u] if len(i_u) == 1 and i_u[0] == SOURCE else self._in_act[u]
            cout = self._out_snk[u] if len(o_u) == 1 and o_u[0] == SINK else self._out_act[u]
            tp = self.throughput(u, e - s)
            edges.append((4 + 2 * j, 5 + 2 * j, min(cin, tp, cout)))
        for u, v in arcs:
            if u == SOURCE:
                edges.append((1, 4 + 2 * idx[v], self._src_arc[v]))  # type: ignore[index]
            elif v == SINK:
                edges.append((5 + 2 * idx[u], 2, self._snk_arc[u]))  # type: ignore[index]
            else:
                edges.append((5 + 2 * idx[u], 4 + 2 * idx[v], self._pair[(u, v)]))  # type: ignore[index]
        value, residual = _collapsed_max_flow(4 + 2 * len(nodes), edges, 0, 3)
        self.evaluations += 1
        flows = {u: edges[2 + j][2] - residual[2 + j] for j, u in enumerate(nodes)}
        return value, flows

    def value(
        self, layers: Mapping[int, LayerRange | None] | Sequence[LayerRange | None], partial: bool = False
    ) -> float:
        """Max-flow value (tokens/s) of the placement ``Placement.from_layers(..., layers, partial)``.

        ``layers`` maps node id -> [start, end) or None (a sequence indexed by node id works too).
        """
        held = self._held(layers)
        if self.cache_size <= 0:
            return self._solve(held, partial)[0]
        key = (partial, *sorted(held.items()))
        hit = self._memo.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        value = self._solve(held, partial)[0]
        if len(self._memo) >= self.cache_size:
            del self._memo[next(iter(self._memo))]  # drop the oldest entry
        self._memo[key] = value
        return value

    def node_flows(
        self, layers: Mapping[int, LayerRange | None] | Sequence[LayerRange | None], partial: bool = False
    ) -> tuple[float, dict[int, float]]:
        """(value, flow through each node on a link) of one max flow; not memoised."""
        return self._solve(self._held(layers), partial)

    def plan(
        self,
        layers: Mapping[int, LayerRange | None],
        partial: bool = False,
        *,
        method: str = "manual",
    ) -> tuple[Placement, FlowPlan]:
        """The placement of ``layers`` and its full :class:`FlowPlan` (networkx; slow path)."""
        p = Placement.from_layers(
            self.cluster, self.model, layers, partial=partial, method=method, exceed_profiled_max=self.exceed_profiled_max
        )
        return p, max_flow(p, self.tm)
