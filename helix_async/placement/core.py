"""The placement value: which layers each node holds and which directed links a plan may use.

A ``Placement`` is the contract between planners, the flow analysis, the simulator and the
runtime. It carries its cluster, so a plan file is self-contained. Every planner returns only
placements that pass ``verify``.

Link rules (docs/original.md §4.7): source->i iff node i starts at layer 0; i->sink iff it ends at L;
i->j iff j starts exactly where i ends ("full"), or, with partial inference, iff
``s_j <= e_i < e_j`` (j runs only its layers from e_i on). Unlike the original, dangling links are
removed to a fixpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..cluster import ClusterSpec
from ..errors import PlacementError
from ..ids import SINK, SOURCE, LayerRange, NodeRef, PlanLink
from ..model import ModelSpec, ThroughputModel, get_model


def arc_kind(layers: Mapping[int, LayerRange | None], u: NodeRef, v: NodeRef, num_layers: int) -> str | None:
    """"full", "partial" or None: whether arc u->v is usable for these layer ranges."""
    if u == SOURCE:
        if v == SINK:
            return None
        r = layers.get(v)  # type: ignore[arg-type]
        return "full" if r is not None and r[0] == 0 else None
    ru = layers.get(u)  # type: ignore[arg-type]
    if ru is None:
        return None
    if v == SINK:
        return "full" if ru[1] == num_layers else None
    rv = layers.get(v)  # type: ignore[arg-type]
    if rv is None:
        return None
    if ru[1] == rv[0]:
        return "full"
    if rv[0] <= ru[1] < rv[1]:
        return "partial"
    return None


def clean_arcs(arcs: Iterable[PlanLink]) -> tuple[PlanLink, ...]:
    """Drop arcs that cannot lie on a source->sink path, repeating until nothing changes."""
    kept = list(dict.fromkeys(arcs))
    while True:
        has_in = {v for _, v in kept}
        has_out = {u for u, _ in kept}
        nxt = [
            (u, v)
            for u, v in kept
            if (u == SOURCE or u in has_in) and (v == SINK or v in has_out)
        ]
        if len(nxt) == len(kept):
            return tuple(nxt)
        kept = nxt


def placement_arcs(
    cluster: ClusterSpec, layers: Mapping[int, LayerRange | None], num_layers: int, partial: bool = False
) -> tuple[PlanLink, ...]:
    """All cluster arcs usable by ``layers`` (full, plus partial ones if ``partial``), cleaned."""
    out: list[PlanLink] = []
    for a in cluster.arcs():
        kind = arc_kind(layers, a.src, a.dst, num_layers)
        if kind == "full" or (kind == "partial" and partial):
            out.append((a.src, a.dst))
    return clean_arcs(out)


@dataclass(frozen=True, eq=False)
class Placement:
    """Layer ranges per node and the directed links the plan uses.

    layers: node id -> [start, end) or None for an unused node (every cluster node has an entry).
    links: directed usable arcs ((SOURCE|id) -> (id|SINK)).
    partial: whether partial inference (a node starting inside its predecessor's range) is allowed.
    exceed_profiled_max: hand-made layouts may exceed the profiled layer maximum (VRAM must still fit).
    """

    cluster: ClusterSpec
    model: str
    layers: Mapping[int, LayerRange | None]
    links: tuple[PlanLink, ...]
    partial: bool = False
    method: str = "manual"
    exceed_profiled_max: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_layers(
        cls,
        cluster: ClusterSpec,
        model: str | ModelSpec,
        layers: Mapping[int, LayerRange | None],
        *,
        partial: bool = False,
        method: str = "manual",
        exceed_profiled_max: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> Placement:
        """Build a placement whose links are every usable cluster arc (cleaned to a fixpoint)."""
        spec = get_model(model)
        full = {n.id: layers.get(n.id) for n in cluster.nodes}
        full = {i: (None if r is None else (int(r[0]), int(r[1]))) for i, r in full.items()}
        return cls(
            cluster=cluster,
            model=spec.reference,
            layers=full,
            links=placement_arcs(cluster, full, spec.num_layers, partial),
            partial=partial,
            method=method,
            exceed_profiled_max=exceed_profiled_max,
            meta=dict(meta or {}),
        )

    @property
    def model_spec(self) -> ModelSpec:
        return get_model(self.model)

    @property
    def num_layers(self) -> int:
        return self.model_spec.num_layers

    def used_nodes(self) -> list[int]:
        """Nodes with a layer range and at least one link (in id order)."""
        on_links = {u for u, _ in self.links} | {v for _, v in self.links}
        return [i for i, r in self.layers.items() if r is not None and i in on_links]

    def layer_count(self, node: int) -> int:
        r = self.layers[node]
        return 0 if r is None else r[1] - r[0]

    def out_links(self, u: NodeRef) -> list[NodeRef]:
        return [v for a, v in self.links if a == u]

    def in_links(self, v: NodeRef) -> list[NodeRef]:
        return [u for u, b in self.links if b == v]

    def with_meta(self, **extra: Any) -> Placement:
        return Placement(
            self.cluster, self.model, self.layers, self.links, self.partial, self.method, self.exceed_profiled_max,
            {**self.meta, **extra},
        )

    def same_plan(self, other: Placement) -> bool:
        """Equal layer ranges and links (ignores method and meta)."""
        return dict(self.layers) == dict(other.layers) and set(self.links) == set(other.links)


def verify(placement: Placement, tm: ThroughputModel | None = None) -> None:
    """Check a placement; raise PlacementError listing every violation.

    Checks: each range lies in [0, L) and fits its node (profiled max layers unless forced, and
    VRAM); links exist in the cluster and are valid for the ranges (full, or partial when
    allowed); no dangling link; at least one source->sink path; every source->sink path executes
    layers 0..L-1 exactly once (a node reached over a partial link runs only the layers after its
    predecessor's end).
    """
    cl = placement.cluster
    spec = placement.model_spec
    L = spec.num_layers
    tm = tm or ThroughputModel.for_cluster(spec, cl)
    problems: list[str] = []
    ids = {n.id for n in cl.nodes}
    if set(placement.layers) != ids:
        problems.append("layers must name every cluster node exactly once")
    for i, r in placement.layers.items():
        if r is None:
            continue
        s, e = r
        if not (0 <= s < e <= L):
            problems.append(f"node {i}: layer range [{s}, {e}) not within [0, {L}) or empty")
            continue
        if i not in ids:
            continue
        m = cl.machine(i)
        k = e - s
        cap = tm.vram_layers(m) if placement.exceed_profiled_max else tm.max_layers(m)
        if k > cap:
            why = "VRAM" if placement.exceed_profiled_max else "profiled max layers / VRAM"
            problems.append(f"node {i} ({m.name}): holds {k} layers, at most {cap} fit ({why})")
        elif placement.exceed_profiled_max:
            try:
                tm.kv_capacity(m.gpu, k)
            except ValueError as exc:  # weights leave no room for a KV cache
                problems.append(f"node {i} ({m.name}): {exc}")
    arcset = {(a.src, a.dst) for a in cl.arcs()}
    for u, v in placement.links:
        if (u, v) not in arcset:
            problems.append(f"link {u}->{v}: not a link of cluster {cl.name}")
            continue
        kind = arc_kind(placement.layers, u, v, L)
        if kind is None or (kind == "partial" and not placement.partial):
            problems.append(f"link {u}->{v}: not valid for the layer ranges ({placement.layers.get(u)} -> {placement.layers.get(v)})")  # type: ignore[arg-type]
    if not problems:
        cleaned = set(clean_arcs(placement.links))
        for arc in placement.links:
            if arc not in cleaned:
                problems.append(f"link {arc[0]}->{arc[1]}: dangling (on no source->sink path)")
    if not problems:
        problems += _path_problems(placement, L)
    if problems:
        raise PlacementError(problems, f"{placement.method} placement of {spec.name} on {cl.name}")


def _path_problems(placement: Placement, L: int) -> list[str]:
    # With valid links every hop strictly increases the executed end layer, so the graph is a DAG
    # and a DFS over (node, layers executed so far) terminates; each path's coverage is checked.
    out_adj: dict[NodeRef, list[NodeRef]] = {}
    for u, v in placement.links:
        out_adj.setdefault(u, []).append(v)
    if not out_adj.get(SOURCE):
        return ["no source->sink path: no link leaves the coordinator"]
    problems: list[str] = []
    seen: set[tuple[NodeRef, int]] = set()
    stack: list[tuple[NodeRef, int]] = [(SOURCE, 0)]
    reached_sink = False
    while stack and len(problems) < 5:
        node, done = stack.pop()
        if (node, done) in seen:
            continue
        seen.add((node, done))
        for v in out_adj.get(node, []):
            if v == SINK:
                if done != L:
                    problems.append(f"path through node {node} reaches the sink after {done} of {L} layers")
                reached_sink = True
                continue
            r = placement.layers[v]  # type: ignore[index]
            assert r is not None
            if not (r[0] <= done < r[1]):
                problems.append(f"node {v} holds [{r[0]}, {r[1]}) but is entered after layer {done}")
                continue
            stack.append((v, r[1]))
    if not reached_sink and not problems:
        problems.append("no source->sink path")
    return problems
