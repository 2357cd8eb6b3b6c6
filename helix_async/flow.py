"""Max-flow analysis of a placement: the flow graph, the exact max flow and the routing weights.

The graph follows HELIX_SPEC §6. Every compute node ``u`` that holds layers is split into four
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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from .cluster import SINK, SOURCE, Arc, ClusterSpec, NodeRef
from .model import ModelSpec, ThroughputModel, get_model, max_compute_throughput

if TYPE_CHECKING:
    # Only for annotations: importing the placement package here would make ``helix_async.flow``
    # and planners that import it (placement.search) depend on import order.
    from .placement.core import Arc2, LayerRange, Placement

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
    "FlowPlan",
    "arc_key",
    "build_flow_graph",
    "max_flow",
    "max_flow_value",
    "original_vertex_name",
    "parse_arc_key",
    "plot_placement",
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


def _ref_str(ref: NodeRef) -> str:
    return str(ref)


def _ref_parse(text: str) -> NodeRef:
    text = text.strip()
    if text in (SOURCE, SINK):
        return text
    return int(text)


def arc_key(u: NodeRef, v: NodeRef) -> str:
    """String key of a link, e.g. ``"source->3"``, ``"3->7"``, ``"7->sink"``."""
    return f"{_ref_str(u)}->{_ref_str(v)}"


def parse_arc_key(key: str) -> tuple[NodeRef, NodeRef]:
    """Inverse of :func:`arc_key`."""
    a, sep, b = key.partition("->")
    if not sep:
        raise ValueError(f"not a link key (expected 'u->v'): {key!r}")
    return _ref_parse(a), _ref_parse(b)


def _ref_order(ref: NodeRef) -> tuple[int, int]:
    if ref == SOURCE:
        return (0, 0)
    if ref == SINK:
        return (2, 0)
    return (1, int(ref))


# --------------------------------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------------------------------


def _throughput_model(placement: Placement, tm: ThroughputModel | None) -> ThroughputModel:
    return tm if tm is not None else ThroughputModel.for_cluster(placement.model_spec, placement.cluster)


def arc_capacity(arc: Arc, model: ModelSpec) -> float:
    """Tokens/s a link carries (HELIX_SPEC §6): coordinator links move token ids only, links
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
    """The max-flow graph of ``placement`` (HELIX_SPEC §6), capacities (tokens/s) in ``"capacity"``.

    Every node holding layers gets its four vertices, also one that no link reaches (the original
    simulator builds those too; they carry no flow). ``tm`` defaults to the throughput model of the
    placement's whole cluster mix.
    """
    tm = _throughput_model(placement, tm)
    spec = placement.model_spec
    cl = placement.cluster
    tau = spec.token_size
    tau_alpha = spec.token_size + spec.activation_size
    g = nx.DiGraph()
    g.add_edge(SOURCE, SOURCE_OUT, capacity=cl.coordinator_nic_out / tau)
    g.add_edge(SINK_IN, SINK, capacity=cl.coordinator_nic_in / tau)
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
        g.add_edge(f"{u}_in", f"{u}_start", capacity=m.nic_in / (tau if only_src else tau_alpha))
        g.add_edge(
            f"{u}_start", f"{u}_end", capacity=tm.throughput(m.gpu, r[1] - r[0], force=placement.force)
        )
        g.add_edge(f"{u}_end", f"{u}_out", capacity=m.nic_out / (tau if only_snk else tau_alpha))
    for u, v in placement.links:
        g.add_edge(_vout(u), _vin(v), capacity=_link_capacity(placement, spec, u, v))
    return g


def _solve(graph: nx.DiGraph, value_only: bool) -> Any:
    """networkx max flow with the default algorithm (preflow-push), edmonds_karp as a fallback."""
    fn = nx.maximum_flow_value if value_only else nx.maximum_flow
    try:
        return fn(graph, SOURCE, SINK)
    except nx.NetworkXUnbounded:
        raise
    except Exception as exc:  # networkx's preflow-push once raised IndexError (PLANNER_NOTES)
        log.warning("preflow_push failed (%s: %s); retrying with edmonds_karp", type(exc).__name__, exc)
        return fn(graph, SOURCE, SINK, flow_func=nx.algorithms.flow.edmonds_karp)


# --------------------------------------------------------------------------------------------------
# FlowPlan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowPlan:
    """The max flow of a placement and its routing weights (all tokens/s).

    ``link_flows[(u, v)]`` is the flow on placement link u->v (the routing weight), ``link_capacity``
    that link's capacity; ``node_flows[i]`` the flow through node i's compute edge and
    ``node_capacity[i]`` its capacity (typical throughput), for every node holding layers.
    ``max_compute_throughput`` is the cluster's upper bound U (HELIX_SPEC §3.5).
    """

    value: float
    link_flows: dict[tuple[NodeRef, NodeRef], float] = field(default_factory=dict)
    node_flows: dict[int, float] = field(default_factory=dict)
    node_capacity: dict[int, float] = field(default_factory=dict)
    link_capacity: dict[tuple[NodeRef, NodeRef], float] = field(default_factory=dict)
    max_compute_throughput: float = math.nan

    def weights(self, u: NodeRef) -> list[tuple[NodeRef, float]]:
        """(next hop, flow) for every link leaving ``u``: node ids ascending, the sink last."""
        out = [(v, f) for (a, v), f in self.link_flows.items() if a == u]
        out.sort(key=lambda vf: _ref_order(vf[0]))
        return out

    def in_weights(self, v: NodeRef) -> list[tuple[NodeRef, float]]:
        """(previous hop, flow) for every link entering ``v``: the source first, then ids ascending."""
        out = [(u, f) for (u, b), f in self.link_flows.items() if b == v]
        out.sort(key=lambda uf: _ref_order(uf[0]))
        return out

    def utilisation(self, node: int) -> float:
        """Flow over capacity of a node's compute (0.0 for a node without capacity)."""
        cap = self.node_capacity.get(node, 0.0)
        return self.node_flows.get(node, 0.0) / cap if cap > 0 else 0.0

    def link_utilisation(self, u: NodeRef, v: NodeRef) -> float:
        cap = self.link_capacity.get((u, v), 0.0)
        return self.link_flows.get((u, v), 0.0) / cap if cap > 0 else 0.0

    @property
    def efficiency(self) -> float:
        """value / max_compute_throughput."""
        u = self.max_compute_throughput
        return self.value / u if u and u > 0 and not math.isnan(u) else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A TOML/JSON-friendly dict (link keys "u->v", node keys "i"); see :meth:`from_dict`."""
        links = sorted(self.link_flows, key=lambda a: (_ref_order(a[0]), _ref_order(a[1])))
        cap_links = sorted(self.link_capacity, key=lambda a: (_ref_order(a[0]), _ref_order(a[1])))
        d: dict[str, Any] = {
            "value": float(self.value),
            "link_flows": {arc_key(*a): float(self.link_flows[a]) for a in links},
            "node_flows": {str(i): float(self.node_flows[i]) for i in sorted(self.node_flows)},
            "node_capacity": {str(i): float(self.node_capacity[i]) for i in sorted(self.node_capacity)},
            "link_capacity": {arc_key(*a): float(self.link_capacity[a]) for a in cap_links},
        }
        if not math.isnan(self.max_compute_throughput):
            d["max_compute_throughput"] = float(self.max_compute_throughput)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowPlan:
        """Inverse of :meth:`to_dict` (raises ValueError/KeyError on malformed input)."""
        return cls(
            value=float(d["value"]),
            link_flows={parse_arc_key(k): float(v) for k, v in d.get("link_flows", {}).items()},
            node_flows={int(k): float(v) for k, v in d.get("node_flows", {}).items()},
            node_capacity={int(k): float(v) for k, v in d.get("node_capacity", {}).items()},
            link_capacity={parse_arc_key(k): float(v) for k, v in d.get("link_capacity", {}).items()},
            max_compute_throughput=float(d.get("max_compute_throughput", math.nan)),
        )


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
    try:
        value, flow = nx.maximum_flow(g, s, t)
    except Exception as exc:  # networkx's preflow-push once raised IndexError (PLANNER_NOTES)
        log.warning("preflow_push failed (%s: %s); retrying with edmonds_karp", type(exc).__name__, exc)
        value, flow = nx.maximum_flow(g, s, t, flow_func=nx.algorithms.flow.edmonds_karp)
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
    keep); a count above the node's profiled maximum raises unless ``force``.
    """

    def __init__(
        self,
        cluster: ClusterSpec,
        model: ModelSpec | str,
        tm: ThroughputModel | None = None,
        *,
        force: bool = False,
        cache_size: int = 20_000,
    ) -> None:
        self.cluster = cluster
        self.model = get_model(model)
        self.tm = tm if tm is not None else ThroughputModel.for_cluster(self.model, cluster)
        self.force = force
        self.cache_size = cache_size
        self.num_layers = self.model.num_layers
        tau = self.model.token_size
        tau_alpha = self.model.token_size + self.model.activation_size
        n = cluster.num_nodes
        self._n = n
        self._src_cap = cluster.coordinator_nic_out / tau
        self._snk_cap = cluster.coordinator_nic_in / tau
        self._gpu = [cluster.machine(i).gpu for i in range(n)]
        machines = [cluster.machine(i) for i in range(n)]
        # in-NIC capacity when only the source feeds the node, and otherwise; likewise out-NIC
        self._in_src = [m.nic_in / tau for m in machines]
        self._in_act = [m.nic_in / tau_alpha for m in machines]
        self._out_snk = [m.nic_out / tau for m in machines]
        self._out_act = [m.nic_out / tau_alpha for m in machines]
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
            tp = self.tm.throughput(self._gpu[node], k, force=self.force)
            self._tp[key] = tp
        return tp

    def links(
        self, layers: Mapping[int, LayerRange | None] | Sequence[LayerRange | None], partial: bool = False
    ) -> tuple[Arc2, ...]:
        """The placement links of ``layers`` (the same set as ``placement_arcs``)."""
        return self._links(self._held(layers), partial)

    def _links(self, held: dict[int, LayerRange], partial: bool) -> tuple[Arc2, ...]:
        L = self.num_layers
        arcs: list[Arc2] = []
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
        from .placement.core import Placement

        p = Placement.from_layers(
            self.cluster, self.model, layers, partial=partial, method=method, force=self.force
        )
        return p, max_flow(p, self.tm)


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def _lanes(placement: Placement, nodes: list[int]) -> dict[int, int]:
    """Greedy interval packing: each node on the lowest lane free at its start layer."""
    lane_end: list[int] = []
    out: dict[int, int] = {}
    order = sorted(nodes, key=lambda i: (placement.layers[i][0], -placement.layers[i][1], i))  # type: ignore[index]
    for i in order:
        s, e = placement.layers[i]  # type: ignore[misc]
        for k, end in enumerate(lane_end):
            if end <= s:
                lane_end[k] = e
                out[i] = k
                break
        else:
            out[i] = len(lane_end)
            lane_end.append(e)
    return out


def plot_placement(placement: Placement, flow_plan: FlowPlan | None, path: str | Path) -> Path:
    """Draw a placement and its flow to a PNG at ``path`` (matplotlib, Agg backend).

    Nodes are boxes over their layer range (x) on lanes (y), coloured by utilisation (flow/capacity),
    labelled "id type [s,e)"; links are arrows from the end of one box to where the next box is
    entered, width and opacity by flow (zero-flow links dotted grey); the title gives the max flow
    and the max compute throughput. ``flow_plan`` defaults to ``max_flow(placement)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors
    from matplotlib.patches import FancyBboxPatch

    if flow_plan is None:
        flow_plan = max_flow(placement)
    cl = placement.cluster
    L = placement.num_layers
    nodes = [i for i, r in placement.layers.items() if r is not None]
    lanes = _lanes(placement, nodes)
    n_lanes = max(lanes.values(), default=0) + 1
    fig, ax = plt.subplots(figsize=(18, max(3.2, 0.62 * n_lanes + 1.7)), dpi=110)
    cmap = plt.get_cmap("viridis")
    norm = colors.Normalize(0.0, 1.0)
    box_h, gap = 0.74, 0.2  # lane units; layer units left free at each end of a box
    mid = (n_lanes - 1) / 2
    src_x, sink_x = -4.0, L + 4.0

    def y_of(ref: NodeRef) -> float:
        return mid if ref in (SOURCE, SINK) else float(lanes[int(ref)])

    max_link = max(flow_plan.link_flows.values(), default=0.0) or 1.0
    for (u, v), f in sorted(flow_plan.link_flows.items(), key=lambda kv: kv[1]):
        # from the end of u's box to the point where v is entered (v's start, or inside v's range
        # for a partial link)
        x0 = src_x + 1.5 if u == SOURCE else float(placement.layers[u][1]) - gap  # type: ignore[index]
        if v == SINK:
            x1 = sink_x - 1.5
        elif u == SOURCE:
            x1 = float(placement.layers[v][0]) + gap  # type: ignore[index]
        else:
            x1 = float(placement.layers[u][1]) + gap  # type: ignore[index]
        y0, y1 = y_of(u), y_of(v)
        if f <= 1e-9:
            ax.plot([x0, x1], [y0, y1], ls=":", lw=0.6, color="0.6", zorder=1)
            continue
        share = f / max_link
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={
                "arrowstyle": "-|>",
                "lw": 0.5 + 3.5 * share,
                "color": "tab:red",
                "alpha": 0.4 + 0.5 * share,
                "mutation_scale": 7,
                "shrinkA": 0,
                "shrinkB": 0,
            },
            zorder=2,
        )
    for i in nodes:
        s, e = placement.layers[i]  # type: ignore[misc]
        y = lanes[i]
        face = cmap(norm(min(1.0, flow_plan.utilisation(i))))
        ax.add_patch(
            FancyBboxPatch(
                (s + gap, y - box_h / 2),
                e - s - 2 * gap,
                box_h,
                boxstyle="round,pad=0,rounding_size=0.12",
                facecolor=face,
                edgecolor="black",
                lw=0.6,
                zorder=3,
            )
        )
        r, g, b, _ = face
        ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
        mtype = cl.nodes[i].machine_type
        if e - s >= 2:
            ax.text(
                (s + e) / 2,
                y,
                f"{i} {mtype}\n[{s},{e})",
                ha="center",
                va="center",
                fontsize=6.5,
                color=ink,
                zorder=4,
                linespacing=1.1,
            )
        else:  # one layer: too narrow for a horizontal label
            ax.text(
                (s + e) / 2,
                y,
                f"{i} {mtype} [{s},{e})",
                ha="center",
                va="center",
                fontsize=5,
                rotation=90,
                color=ink,
                zorder=4,
            )
    for x, name in ((src_x, "source"), (sink_x, "sink")):
        ax.add_patch(
            FancyBboxPatch(
                (x - 1.5, mid - box_h / 2),
                3.0,
                box_h,
                boxstyle="round,pad=0,rounding_size=0.2",
                facecolor="0.88",
                edgecolor="black",
                lw=0.6,
                zorder=3,
            )
        )
        ax.text(x, mid, name, ha="center", va="center", fontsize=7, zorder=4)
    ax.set_xlim(src_x - 2.0, sink_x + 2.0)
    ax.set_ylim(-0.6, n_lanes - 0.4)
    ax.invert_yaxis()
    ax.set_yticks([])
    ax.set_xlabel("layer")
    step = 5 if L <= 40 else 10
    ax.set_xticks(list(range(0, L + 1, step)))
    ax.grid(axis="x", color="0.92", zorder=0)
    U = flow_plan.max_compute_throughput
    title = (
        f"{placement.method} placement of {placement.model} on {cl.name}: "
        f"max flow {flow_plan.value:.2f} tok/s, max compute throughput {U:.2f} tok/s"
    )
    ax.set_title(title, fontsize=10)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    sm.set_array([])
    fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01, label="utilisation (flow / capacity)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
