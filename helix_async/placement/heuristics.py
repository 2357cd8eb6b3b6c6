"""Heuristic placements: Petals, Swarm, Homogeneous (Orca-like), Separate Pipelines and SP+.

Each function returns a ``Placement`` that has passed ``verify``. Randomised heuristics draw from a
private ``random.Random(seed)`` (never the global RNG), so a seed fixes the plan; the draws differ
from the original's global-RNG stream, so the exact shipped Petals/Swarm layouts are not reproduced.
Node capacities (tokens/s) are ``ThroughputModel.node_capacity`` (docs/original.md §3.5); layer counts are
bounded by ``ThroughputModel.max_layers`` (profiled maximum within VRAM), except for the
hand-made-style separate pipelines, which may exceed the profiled maximum (``exceed_profiled_max=True``).

``best_heuristic`` runs every applicable heuristic and keeps the one the caller's evaluator (exact
max flow) scores highest; it is the warm start and fallback of the MILP planner (docs/original.md §12.1.4).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..cluster import ClusterSpec, MachineType
from ..errors import ConfigError, PlanningError
from ..ids import SINK, SOURCE, NodeRef, PlanLink
from ..model import ModelSpec, ThroughputModel, get_model
from .core import Placement, clean_arcs, placement_arcs, verify

log = logging.getLogger("helix_async.planner")


#: VRAM (bytes) each GPU of a machine keeps free of weights in layouts that exceed the profiled
#: layer maximum (the separate pipelines):
#: runtime context, activations and a minimal KV cache. 5 GB per GPU reproduces the shipped
#: hand-made layouts: a 16 GB T4 takes at most 7 LLaMA-2-70B layers (the single24 T4 pipeline uses
#: 6-7), so the 10 T4s of cluster42 (70 layers) cannot form a pipeline of their own there.
OVER_MAX_RESERVE_PER_GPU = 5e9


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def _setup(
    cluster: ClusterSpec, model: str | ModelSpec, tm: ThroughputModel | None
) -> tuple[ModelSpec, ThroughputModel]:
    spec = get_model(model)
    return spec, tm or ThroughputModel.for_cluster(spec, cluster)


def _require_fit(
    method: str, cluster: ClusterSpec, spec: ModelSpec, caps: Mapping[int, int], what: str
) -> None:
    fit = sum(caps.values())
    if fit < spec.num_layers:
        raise PlanningError(
            f"{method}: {spec.name} needs {spec.num_layers} layers but the {len(caps)} nodes of "
            f"{cluster.name} hold at most {fit} ({what})"
        )


def _max_layers(cluster: ClusterSpec, spec: ModelSpec, tm: ThroughputModel) -> dict[int, int]:
    """Node id -> most layers it may hold (profiled maximum within VRAM, at most L)."""
    return {n.id: min(tm.max_layers(cluster.machine(n.id)), spec.num_layers) for n in cluster.nodes}


def over_max_layers(
    machine: MachineType, model: str | ModelSpec, *, reserve_per_gpu: float = OVER_MAX_RESERVE_PER_GPU
) -> int:
    """Most layers a node may hold when the profiled maximum may be exceeded (separate pipelines):
    weights within VRAM minus
    ``reserve_per_gpu`` bytes per GPU (see :data:`OVER_MAX_RESERVE_PER_GPU`)."""
    spec = get_model(model)
    usable = machine.vram_bytes - reserve_per_gpu * machine.num_gpus
    if usable <= 0 or spec.param_bytes_per_layer <= 0:
        return 0
    total = int(machine.vram_bytes // spec.param_bytes_per_layer)  # = ThroughputModel.vram_layers
    return min(int(usable // spec.param_bytes_per_layer), total, spec.num_layers)


def _chain_arcs(cluster: ClusterSpec, chain: Sequence[int]) -> list[PlanLink] | None:
    """source -> chain[0] -> ... -> chain[-1] -> sink, or None when the cluster lacks one of the arcs."""
    hops: list[NodeRef] = [SOURCE, *chain, SINK]
    arcs = list(itertools.pairwise(hops))
    if any(cluster.arc(u, v) is None for u, v in arcs):
        return None
    return arcs


def _checked(placement: Placement, tm: ThroughputModel) -> Placement:
    verify(placement, tm)
    log.debug(
        "%s placement of %s on %s: %d nodes used, %d links",
        placement.method,
        placement.model,
        placement.cluster.name,
        len(placement.used_nodes()),
        len(placement.links),
    )
    return placement


# --------------------------------------------------------------------------------------------------
# Petals (docs/original.md §5.1)
# --------------------------------------------------------------------------------------------------


def petals(
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    seed: int = 0,
    max_out_links: int | None = None,
    partial: bool = True,
    tm: ThroughputModel | None = None,
) -> Placement:
    """Petals-style placement: every node holds its maximum number of layers, placed greedily.

    Nodes are visited in a random order (``random.Random(seed)`` shuffles the list of
    ``(capacity at max layers, id)`` pairs). Each node takes the window ``[w, w+K)`` whose sorted
    per-layer loads are lexicographically smallest (first ``w`` wins ties), i.e. it shores up the
    weakest layers; the node's capacity (tokens/s) is then added to each layer of its window.

    Links: source/sink links of nodes starting at 0 / ending at L, plus node-to-node links that are
    "full" (``e_i == s_j``) and, if ``partial``, "partial" (``s_j < e_i < e_j``). With
    ``max_out_links`` each node keeps at most that many node-to-node out-links: full links first,
    then partial ones, each list ordered by link bandwidth **fastest first**. (The original sorted
    ascending and so kept the *slowest* links when truncating, docs/original.md §12.2.14; fixed here.)
    Sink links do not count against the quota. Links on no source->sink path are removed.

    With ``partial=False`` only full links are used; the windows are chosen the same way, so on some
    clusters no full source->sink chain exists: then this raises :class:`PlanningError` rather than
    returning an unusable plan. Nodes that end up without links keep their layers (unused).
    """
    spec, tm = _setup(cluster, model, tm)
    L = spec.num_layers
    kmax = _max_layers(cluster, spec, tm)
    _require_fit("petals", cluster, spec, kmax, "profiled max layers within VRAM")
    rng = random.Random(seed)
    order = [(tm.node_capacity(cluster.machine(i), k), i) for i, k in kmax.items() if k > 0]
    rng.shuffle(order)

    load = [0.0] * L
    layers: dict[int, tuple[int, int] | None] = {n.id: None for n in cluster.nodes}
    for cap, i in order:
        k = kmax[i]
        # lexicographically smallest sorted window; min() keeps the first start on ties
        w = min(range(L - k + 1), key=lambda s: sorted(load[s : s + k]))
        layers[i] = (w, w + k)
        for x in range(w, w + k):
            load[x] += cap

    if max_out_links is None:
        links = placement_arcs(cluster, layers, L, partial)
    else:
        links = _petals_quota_links(cluster, layers, L, partial, max_out_links)
    if not links:
        raise PlanningError(
            f"petals: the layout on {cluster.name} has no source->sink chain of "
            f"{'usable' if partial else 'full (non-partial)'} links"
            + ("" if partial else "; use partial=True")
        )
    p = Placement(
        cluster=cluster,
        model=spec.reference,
        layers=layers,
        links=links,
        partial=partial,
        method="petals",
        meta={"seed": seed, "max_out_links": max_out_links, "min_layer_load": min(load)},
    )
    return _checked(p, tm)


def _petals_quota_links(
    cluster: ClusterSpec,
    layers: Mapping[int, tuple[int, int] | None],
    L: int,
    partial: bool,
    quota: int,
) -> tuple[PlanLink, ...]:
    if quota < 0:
        raise ConfigError("<argument>", "max_out_links", f"must be >= 0 or None, got {quota}")
    chosen: set[PlanLink] = set()
    full: dict[NodeRef, list[Any]] = {}
    part: dict[NodeRef, list[Any]] = {}
    for a in cluster.arcs():
        r_u = layers.get(a.src) if isinstance(a.src, int) else None
        r_v = layers.get(a.dst) if isinstance(a.dst, int) else None
        if a.src == SOURCE:
            if r_v is not None and r_v[0] == 0:
                chosen.add((a.src, a.dst))
        elif a.dst == SINK:
            if r_u is not None and r_u[1] == L:
                chosen.add((a.src, a.dst))
        elif r_u is not None and r_v is not None:
            if r_u[1] == r_v[0]:
                full.setdefault(a.src, []).append(a)
            elif partial and r_v[0] < r_u[1] < r_v[1]:
                part.setdefault(a.src, []).append(a)
    for u in set(full) | set(part):
        # sorted() is stable: equal bandwidths keep the cluster's arc order
        f = sorted(full.get(u, []), key=lambda a: -a.bandwidth)[:quota]
        p = sorted(part.get(u, []), key=lambda a: -a.bandwidth)[: quota - len(f)]
        chosen.update((a.src, a.dst) for a in f + p)
    return clean_arcs((a.src, a.dst) for a in cluster.arcs() if (a.src, a.dst) in chosen)


# --------------------------------------------------------------------------------------------------
# Swarm (docs/original.md §5.2)
# --------------------------------------------------------------------------------------------------


def default_num_stages(
    cluster: ClusterSpec, model: str | ModelSpec, tm: ThroughputModel | None = None
) -> int:
    """Smallest stage count s dividing L whose stage size L/s fits every node's max layers.

    LLaMA-2-70B on the shipped clusters: 20 stages of 4 layers; LLaMA-1-30B: 10 stages of 6.
    Raises PlanningError when some node cannot hold even one layer.
    """
    spec, tm = _setup(cluster, model, tm)
    L = spec.num_layers
    kmax = _max_layers(cluster, spec, tm)
    smallest = min(kmax.values())
    if smallest < 1:
        weak = sorted(i for i, k in kmax.items() if k < 1)
        raise PlanningError(
            f"swarm: nodes {weak} of {cluster.name} cannot hold a single layer of {spec.name}"
        )
    return next(s for s in range(1, L + 1) if L % s == 0 and L // s <= smallest)


def swarm(
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    num_stages: int | None = None,
    seed: int = 0,
    max_out_links: int | None = None,
    tm: ThroughputModel | None = None,
) -> Placement:
    """SWARM-parallelism placement: equal stages of ``z = L / num_stages`` layers, balanced greedily.

    Every node must hold a whole stage (``z`` <= its max layers). Nodes sorted by
    ``(capacity(z), id)`` descending each join the stage with the smallest summed capacity so far
    (first stage on ties). Links: source -> every stage-0 node, every last-stage node -> sink, and
    each node of stage q -> ``rng.sample(stage q+1, min(max_out_links, |stage q+1|))`` with
    ``random.Random(seed)`` (all of stage q+1 when ``max_out_links`` is None). Only arcs that exist
    in the cluster are candidates. ``num_stages`` defaults to :func:`default_num_stages`.
    """
    spec, tm = _setup(cluster, model, tm)
    L = spec.num_layers
    kmax = _max_layers(cluster, spec, tm)
    _require_fit("swarm", cluster, spec, kmax, "profiled max layers within VRAM")
    if num_stages is None:
        num_stages = default_num_stages(cluster, spec, tm)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1 or L % num_stages:
        raise PlanningError(
            f"swarm: num_stages must be a positive divisor of {L} ({spec.name}), got {num_stages!r}"
        )
    z = L // num_stages
    small = sorted(i for i, k in kmax.items() if k < z)
    if small:
        raise PlanningError(
            f"swarm: stage size {z} ({num_stages} stages) exceeds the max layers of nodes {small} of "
            f"{cluster.name} (smallest max: {min(kmax.values())})"
        )
    if cluster.num_nodes < num_stages:
        raise PlanningError(
            f"swarm: {num_stages} stages need at least as many nodes; {cluster.name} has {cluster.num_nodes}"
        )
    if max_out_links is not None and max_out_links < 1:
        raise ConfigError("<argument>", "max_out_links", f"must be >= 1 or None, got {max_out_links}")

    cap = {i: tm.node_capacity(cluster.machine(i), z) for i in kmax}
    stages: list[list[int]] = [[] for _ in range(num_stages)]
    sums = [0.0] * num_stages
    for i in sorted(kmax, key=lambda i: (cap[i], i), reverse=True):
        q = min(range(num_stages), key=sums.__getitem__)
        stages[q].append(i)
        sums[q] += cap[i]

    rng = random.Random(seed)
    arcs: list[PlanLink] = [(SOURCE, i) for i in stages[0] if cluster.arc(SOURCE, i) is not None]
    for q in range(num_stages - 1):
        for u in stages[q]:
            targets = [v for v in stages[q + 1] if cluster.arc(u, v) is not None]
            if max_out_links is not None and max_out_links < len(targets):
                targets = rng.sample(targets, max_out_links)
            arcs += [(u, v) for v in targets]
    arcs += [(i, SINK) for i in stages[-1] if cluster.arc(i, SINK) is not None]
    links = clean_arcs(arcs)
    if not links:
        raise PlanningError(
            f"swarm: the stages on {cluster.name} are not connected source->sink by cluster links"
        )
    layers: dict[int, tuple[int, int] | None] = {}
    for q, members in enumerate(stages):
        for i in members:
            layers[i] = (q * z, (q + 1) * z)
    p = Placement(
        cluster=cluster,
        model=spec.reference,
        layers=dict(sorted(layers.items())),
        links=links,
        partial=False,
        method="swarm",
        meta={
            "seed": seed,
            "num_stages": num_stages,
            "stage_layers": z,
            "stages": stages,
            "stage_capacity": sums,
            "max_out_links": max_out_links,
        },
    )
    return _checked(p, tm)


# --------------------------------------------------------------------------------------------------
# Homogeneous (docs/original.md §5.3)
# --------------------------------------------------------------------------------------------------


def homogeneous(
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    seed: int = 0,
    tm: ThroughputModel | None = None,
) -> Placement:
    """Orca-like separate pipelines built automatically, each node at its max layers.

    Machine types are ordered by ``K * capacity(K)`` descending (K = the type's max layers; name
    breaks ties); nodes are shuffled within each type with ``random.Random(seed)``. Walking types in
    that order and nodes in shuffled order, each node extends the current pipeline by
    ``[len, min(len + K, L))``; a pipeline is closed when it reaches L. The last, incomplete
    pipeline is discarded (its nodes stay unused, ``None``). Links: source -> first, the chain,
    last -> sink, per pipeline; a pipeline whose chain lacks a cluster arc is dropped (logged).
    """
    spec, tm = _setup(cluster, model, tm)
    L = spec.num_layers
    kmax = _max_layers(cluster, spec, tm)
    _require_fit("homogeneous", cluster, spec, kmax, "profiled max layers within VRAM")
    by_type: dict[str, list[int]] = {}
    for n in cluster.nodes:
        if kmax[n.id] > 0:
            by_type.setdefault(n.machine_type, []).append(n.id)

    def value(t: str) -> float:
        m = cluster.machine_types[t]
        k = kmax[by_type[t][0]]
        return k * tm.node_capacity(m, k)

    order = sorted(by_type, key=lambda t: (-value(t), t))
    rng = random.Random(seed)
    for t in order:
        rng.shuffle(by_type[t])

    pipelines: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    length = 0
    for t in order:
        for i in by_type[t]:
            k = min(kmax[i], L - length)
            cur.append((i, length, length + k))
            length += k
            if length == L:
                pipelines.append(cur)
                cur, length = [], 0
    if cur:
        log.info(
            "homogeneous: %d leftover nodes (%d layers) on %s form no complete pipeline",
            len(cur),
            length,
            cluster.name,
        )
    layers: dict[int, tuple[int, int] | None] = {n.id: None for n in cluster.nodes}
    arcs: list[PlanLink] = []
    chains: list[list[int]] = []
    for pipe in pipelines:
        chain = [i for i, _, _ in pipe]
        ca = _chain_arcs(cluster, chain)
        if ca is None:
            log.warning("homogeneous: pipeline %s on %s lacks a cluster link; dropped", chain, cluster.name)
            continue
        chains.append(chain)
        arcs += ca
        for i, s, e in pipe:
            layers[i] = (s, e)
    if not chains:
        raise PlanningError(f"homogeneous: no pipeline on {cluster.name} is connected by cluster links")
    p = Placement(
        cluster=cluster,
        model=spec.reference,
        layers=layers,
        links=clean_arcs(arcs),
        partial=False,
        method="homogeneous",
        meta={"seed": seed, "pipelines": chains, "type_order": order},
    )
    return _checked(p, tm)


# --------------------------------------------------------------------------------------------------
# Separate pipelines (SP) and SP+ (docs/original.md §5.4)
# --------------------------------------------------------------------------------------------------


def _split(caps: Sequence[int], L: int) -> list[int] | None:
    """Split L layers over nodes as evenly as the per-node caps allow; None if they cannot hold L.

    Layers are dealt one at a time round-robin from the last node backwards, so with equal caps the
    first nodes get the smaller share (80 over 12 nodes: 6, 6, 6, 6, then 7 x 8) as in the shipped
    hand-made layouts, and nodes with spare capacity absorb what capped ones cannot take.
    """
    if sum(caps) < L:
        return None
    counts = [0] * len(caps)
    left = L
    while left:
        for j in reversed(range(len(caps))):
            if left and counts[j] < caps[j]:
                counts[j] += 1
                left -= 1
    return counts


def _group_pipeline(
    cluster: ClusterSpec,
    spec: ModelSpec,
    tm: ThroughputModel,
    members: Sequence[int],
    caps: Mapping[int, int],
) -> list[tuple[int, int, int]] | None:
    """One pipeline over ``members`` (in the given order): (node, start, end), unused nodes left out."""
    counts = _split([caps[i] for i in members], spec.num_layers)
    if counts is None:
        return None
    pipe: list[tuple[int, int, int]] = []
    pos = 0
    for i, k in zip(members, counts, strict=True):
        if k:
            pipe.append((i, pos, pos + k))
            pos += k
    return pipe


def _default_groups(
    cluster: ClusterSpec, spec: ModelSpec, caps: Mapping[int, int], plus: bool
) -> list[list[str]]:
    """SP: one group per machine type (first-appearance order). SP+: types that can hold L layers
    on their own keep their group; all the others are pooled into one mixed group."""
    by_type: dict[str, int] = {}
    for n in cluster.nodes:
        by_type[n.machine_type] = by_type.get(n.machine_type, 0) + caps[n.id]
    if not plus:
        return [[t] for t in by_type]
    own = [[t] for t, c in by_type.items() if c >= spec.num_layers]
    pool = [t for t, c in by_type.items() if c < spec.num_layers]
    return own + ([pool] if pool else [])


def _separate(
    cluster: ClusterSpec,
    spec: ModelSpec,
    tm: ThroughputModel,
    groups: Sequence[Sequence[str]] | None,
    plus: bool,
    reserve_per_gpu: float,
) -> tuple[list[list[str]], list[list[tuple[int, int, int]]], dict[int, int]]:
    method = "separate_plus" if plus else "separate"
    caps = {
        n.id: over_max_layers(cluster.machine(n.id), spec, reserve_per_gpu=reserve_per_gpu)
        for n in cluster.nodes
    }
    _require_fit(
        method, cluster, spec, caps, f"weights within VRAM less {reserve_per_gpu / 1e9:g} GB per GPU"
    )
    if groups is None:
        groups = _default_groups(cluster, spec, caps, plus)
    else:
        known = cluster.machine_counts()
        seen: set[str] = set()
        for g in groups:
            for t in g:
                if t not in known:
                    raise ConfigError(
                        "<argument>",
                        "groups",
                        f"machine type {t!r} is not in {cluster.name} (has {', '.join(known)})",
                    )
                if t in seen:
                    raise ConfigError("<argument>", "groups", f"machine type {t!r} appears in two groups")
                seen.add(t)
    kept_groups: list[list[str]] = []
    pipelines: list[list[tuple[int, int, int]]] = []
    for g in groups:
        # Mixed groups: nodes with fewer forced layers first, so the larger shares of the split go
        # to the roomier machines; single-type groups keep id order.
        rank = {t: j for j, t in enumerate(g)}
        members = sorted(
            (n.id for n in cluster.nodes if n.machine_type in rank),
            key=lambda i: (caps[i], rank[cluster.nodes[i].machine_type], i) if len(g) > 1 else (0, 0, i),
        )
        pipe = _group_pipeline(cluster, spec, tm, members, caps)
        if pipe is None:
            log.info(
                "%s: %s nodes of %s hold at most %d of %d layers (forced); no pipeline",
                method,
                "+".join(g),
                cluster.name,
                sum(caps[i] for i in members),
                spec.num_layers,
            )
            continue
        if _chain_arcs(cluster, [i for i, _, _ in pipe]) is None:
            log.warning(
                "%s: the %s pipeline on %s lacks a cluster link; dropped", method, "+".join(g), cluster.name
            )
            continue
        kept_groups.append(list(g))
        pipelines.append(pipe)
    if not pipelines:
        per = {"+".join(g): sum(caps[n.id] for n in cluster.nodes if n.machine_type in g) for g in groups}
        raise PlanningError(
            f"{method}: no machine-type group of {cluster.name} can hold the {spec.num_layers} layers of "
            f"{spec.name} (forced layers per group: {per})"
        )
    return kept_groups, pipelines, caps


def _pipelines_placement(
    cluster: ClusterSpec,
    spec: ModelSpec,
    pipelines: Sequence[Sequence[tuple[int, int, int]]],
    method: str,
    meta: Mapping[str, Any],
) -> Placement:
    layers: dict[int, tuple[int, int] | None] = {n.id: None for n in cluster.nodes}
    arcs: list[PlanLink] = []
    for pipe in pipelines:
        chain_arcs = _chain_arcs(cluster, [i for i, _, _ in pipe])
        assert chain_arcs is not None
        arcs += chain_arcs
        for i, s, e in pipe:
            layers[i] = (s, e)
    return Placement(
        cluster=cluster,
        model=spec.reference,
        layers=layers,
        links=clean_arcs(arcs),
        partial=False,
        method=method,
        exceed_profiled_max=True,
        meta={**meta, "pipelines": [[i for i, _, _ in pipe] for pipe in pipelines]},
    )


def separate_pipelines(
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    tm: ThroughputModel | None = None,
    reserve_per_gpu: float = OVER_MAX_RESERVE_PER_GPU,
) -> Placement:
    """Separate pipelines (SP): one pipeline per machine type over all of its nodes.

    The L layers are split evenly and contiguously over the type's nodes in id order, the first
    nodes taking the smaller share (LLaMA-2-70B on single24: A100 20/20/20/20, L4 8 x 10,
    T4 6, 6, 6, 6, 7 x 8). Layer counts may exceed the profiled maximum (``exceed_profiled_max=True``), but each
    node keeps ``reserve_per_gpu`` bytes of VRAM per GPU free of weights
    (:func:`over_max_layers`); a type whose nodes cannot hold L layers that way has no pipeline.
    One placement over the whole cluster: the pipelines are disjoint chains (links only
    source -> first, along the chain, last -> sink); ``meta["pipelines"]`` lists each chain's ids.
    Raises PlanningError when no type can form a pipeline.
    """
    spec, tm = _setup(cluster, model, tm)
    groups, pipelines, _ = _separate(cluster, spec, tm, None, False, reserve_per_gpu)
    p = _pipelines_placement(
        cluster, spec, pipelines, "separate", {"groups": groups, "reserve_per_gpu": reserve_per_gpu}
    )
    return _checked(p, tm)


def separate_pipelines_plus(
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    groups: Sequence[Sequence[str]] | None = None,
    tm: ThroughputModel | None = None,
    reserve_per_gpu: float = OVER_MAX_RESERVE_PER_GPU,
) -> Placement:
    """SP+: separate pipelines plus one mixed pipeline of the types too small for their own.

    Rule (default ``groups``): every machine type whose nodes can hold L layers (forced, see
    :func:`separate_pipelines`) forms its own pipeline; the nodes of all remaining types are pooled
    into **one** mixed pipeline if together they can hold L layers (otherwise they stay unused).
    The pool's layers are split as evenly as the per-node limits allow, nodes with fewer allowed
    layers first in the chain (they take the smaller shares). LLaMA-2-70B on cluster42: A100 4 x 20,
    L4 8 x 10, L4x2 4 x 20, T4x4 4 x 20, T4x2 13, 13, 13, 13, 14, 14 and V100+T4 16 x 5. (The
    original experiment left the T4x2 pipeline out; we keep every pipeline that can form. Pass
    ``groups`` to choose explicitly.)

    ``groups``: machine-type groups, each forming at most one pipeline over all its nodes, e.g.
    ``[["A100"], ["L4"], ["V100", "T4"]]``; types not named stay unused.
    """
    spec, tm = _setup(cluster, model, tm)
    kept, pipelines, _ = _separate(cluster, spec, tm, groups, True, reserve_per_gpu)
    p = _pipelines_placement(
        cluster, spec, pipelines, "separate_plus", {"groups": kept, "reserve_per_gpu": reserve_per_gpu}
    )
    return _checked(p, tm)


def separate_pipeline_subclusters(
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    plus: bool = False,
    groups: Sequence[Sequence[str]] | None = None,
    reserve_per_gpu: float = OVER_MAX_RESERVE_PER_GPU,
) -> list[tuple[ClusterSpec, Placement]]:
    """Each SP (or SP+, with ``plus``/``groups``) pipeline as its own (sub-cluster, placement) pair.

    This is how the original evaluated SP: one simulation per sub-cluster, throughputs summed. Each
    sub-cluster holds the pipeline's nodes re-indexed 0..k-1 in chain order
    (``meta["parent_node_ids"]`` maps back); its placement is verified with a throughput model of
    the sub-cluster's own composition, as the original's per-sub-cluster runs did.
    """
    spec = get_model(model)
    tm = ThroughputModel.for_cluster(spec, cluster)
    kept, pipelines, _ = _separate(cluster, spec, tm, groups, plus or groups is not None, reserve_per_gpu)
    out: list[tuple[ClusterSpec, Placement]] = []
    for g, pipe in zip(kept, pipelines, strict=True):
        sub = cluster.subcluster([i for i, _, _ in pipe], name=f"{cluster.name}_{'_'.join(g).lower()}")
        sub_pipe = [(j, s, e) for j, (_, s, e) in enumerate(pipe)]
        p = _pipelines_placement(
            sub, spec, [sub_pipe], "separate", {"groups": [g], "reserve_per_gpu": reserve_per_gpu}
        )
        out.append((sub, _checked(p, ThroughputModel.for_cluster(spec, sub))))
    return out


# --------------------------------------------------------------------------------------------------
# registry and best-of
# --------------------------------------------------------------------------------------------------

HEURISTICS: dict[str, Callable[..., Placement]] = {
    "petals": petals,
    "swarm": swarm,
    "homogeneous": homogeneous,
    "separate": separate_pipelines,
    "separate_plus": separate_pipelines_plus,
}
#: Heuristics that draw at random (and so take a seed).
SEEDED_HEURISTICS = frozenset({"petals", "swarm", "homogeneous"})
#: Heuristics whose plans exceed the profiled layer maximum (``exceed_profiled_max=True``).
OVER_MAX_HEURISTICS = frozenset({"separate", "separate_plus"})


def run_heuristic(
    name: str,
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    seed: int = 0,
    partial: bool = True,
    tm: ThroughputModel | None = None,
) -> Placement:
    """Run the heuristic called ``name`` with the arguments it takes.

    ``seed`` goes to the seeded ones; ``partial`` to Petals (whose definition uses partial-inference
    links, docs/original.md §5.1). Raises PlanningError when it does not apply to this cluster.
    """
    if name not in HEURISTICS:
        raise ConfigError("<argument>", "method", f"unknown heuristic {name!r}; known: {', '.join(HEURISTICS)}")
    kwargs: dict[str, Any] = {"tm": tm}
    if name in SEEDED_HEURISTICS:
        kwargs["seed"] = seed
    if name == "petals":
        kwargs["partial"] = partial
    return HEURISTICS[name](cluster, model, **kwargs)


def best_heuristic(
    cluster: ClusterSpec,
    model: str | ModelSpec,
    *,
    seed: int = 0,
    evaluate: Callable[[Placement], float],
    names: Sequence[str] | None = None,
    include_over_max: bool = False,
    tm: ThroughputModel | None = None,
) -> tuple[str, Placement, float]:
    """Run every applicable heuristic and keep the one ``evaluate`` scores highest.

    Candidates: ``names`` if given, else every entry of :data:`HEURISTICS` except the forced ones
    (:data:`OVER_MAX_HEURISTICS`, separate pipelines) unless ``include_over_max``. Forced plans are left
    out by default because past the profiled maximum the throughput model works from an
    extrapolated KV capacity (``ThroughputModel.kv_capacity``), not from measurements.

    ``evaluate(placement)`` scores a plan (callers pass the exact max flow, tokens/s); the highest
    score wins, the earlier heuristic in registry order on ties. Heuristics that raise
    :class:`PlanningError` for this cluster are skipped (logged). Returns (name, placement, score);
    raises PlanningError listing every reason when none applies.
    """
    spec, tm = _setup(cluster, model, tm)
    if names is None:
        names = [n for n in HEURISTICS if include_over_max or n not in OVER_MAX_HEURISTICS]
    unknown = [n for n in names if n not in HEURISTICS]
    if unknown:
        raise ConfigError(
            "<argument>", "names", f"unknown heuristics {unknown}; known: {', '.join(HEURISTICS)}"
        )
    best: tuple[str, Placement, float] | None = None
    reasons: list[str] = []
    for name in names:
        try:
            placement = run_heuristic(name, cluster, spec, seed=seed, tm=tm)
        except PlanningError as exc:
            log.info("best_heuristic: %s skipped on %s: %s", name, cluster.name, exc)
            reasons.append(str(exc))
            continue
        score = float(evaluate(placement))
        log.info("best_heuristic: %s on %s scores %.3f", name, cluster.name, score)
        if best is None or score > best[2]:
            best = (name, placement, score)
    if best is None:
        raise PlanningError(f"no heuristic applies to {spec.name} on {cluster.name}: " + " | ".join(reasons))
    return best


__all__ = [
    "OVER_MAX_HEURISTICS",
    "OVER_MAX_RESERVE_PER_GPU",
    "HEURISTICS",
    "run_heuristic",
    "PlanningError",
    "best_heuristic",
    "default_num_stages",
    "over_max_layers",
    "homogeneous",
    "petals",
    "separate_pipeline_subclusters",
    "separate_pipelines",
    "separate_pipelines_plus",
    "swarm",
]
