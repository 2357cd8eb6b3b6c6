"""Re-placing layers while serving, from the plan in force: few moves, bounded work.

When a node leaves the fleet (lost, or retired by an elastic policy) the layers it held must be
taken up by others; when one joins, it should take some. Every node that changes its layers must
load new weights while it serves: a move is costly. :func:`replan` therefore starts from the
current plan, drops the lost nodes, adds the new ones (``ClusterSpec.with_node``: connected as a
node of their region already is), and lets the new nodes and at most ``max_moves`` of the others
choose layer ranges, everyone else keeping theirs. Each try is one neighbourhood of the planner's arc MILP
(:class:`~helix_async.placement.milp.ArcModel`) with those nodes free and the rest fixed,
maximising the max flow, bounded by branch-and-bound nodes (work), not by seconds. The tries
pick their free nodes around the lost nodes' layers first (when nodes only join: none, the new
ones choosing alone), then at random (seeded). The result is
verified like any plan. docs/planner.md, "Re-planning from a plan".

The next issue makes this fast and judges plans by what the runtime serves; here it is correct
and bounded in moves.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..ids import LayerRange
from ..model import ThroughputModel
from .core import Placement, verify
from .flow import FlowEvaluator, max_flow
from .milp import ArcModel, Capacities, interchangeable_classes

__all__ = ["ReplanResult", "replan"]

#: a try's seconds when its work bound does not end it first (the bound is what is meant to end it)
_TRY_SECONDS = 3600.0


@dataclass(frozen=True)
class ReplanResult:
    """What :func:`replan` found.

    placement: the new plan (verified). before: the old plan's max flow (tokens/s). without: the
    max flow with the lost nodes gone and nobody moving (0 when some layer is no longer held).
    after: the new plan's max flow. moved: the nodes of the old plan whose layer ranges changed
    (lost ones excluded), with their old and new ranges. tries: MILP neighbourhoods solved.
    added: the new nodes' ids and the ranges they took (None: none was worth it)."""

    placement: Placement
    before: float
    without: float
    after: float
    moved: dict[int, tuple[LayerRange | None, LayerRange | None]]
    tries: int
    added: dict[int, LayerRange | None] = field(default_factory=dict)


def _distance(r: LayerRange | None, lo: int, hi: int, far: int) -> int:
    """Layers between range ``r`` and the span [lo, hi) (0 when they overlap; ``far`` when unused)."""
    if r is None:
        return far
    if r[1] <= lo:
        return lo - r[1] + 1
    if r[0] >= hi:
        return r[0] - hi + 1
    return 0


def replan(
    placement: Placement,
    lose: Collection[int] = (),
    *,
    add: Sequence[str] = (),
    region: str | None = None,
    max_moves: int = 4,
    tries: int = 6,
    node_limit: int = 2000,
    seed: int = 0,
) -> ReplanResult:
    """A plan without the nodes ``lose`` and with new nodes of the machine types ``add`` (in
    ``region``; default: the largest), changing at most ``max_moves`` other nodes' layers (see the
    module doc). ``tries``: neighbourhoods to solve; ``node_limit``: branch-and-bound nodes each.
    Raises ConfigError naming ``--lose`` for an unknown or unused node, ``--add`` for an unknown
    type, and ``--max-moves`` when no neighbourhood of that many nodes covers every layer again."""
    if not lose and not add:
        raise ConfigError("<argument>", "--lose", "give a node that leaves (--lose) or a machine type that joins (--add)")
    cluster = placement.cluster
    known = {n.id for n in cluster.nodes}
    for i in lose:
        if i not in known:
            raise ConfigError("<argument>", "--lose", f"node {i} is not in the plan's cluster (nodes {min(known)}.."
                                                      f"{max(known)})")
        if placement.layers.get(i) is None:
            raise ConfigError("<argument>", "--lose", f"node {i} holds no layers in this plan: losing it changes nothing")
    if max_moves < 1:
        raise ConfigError("<argument>", "--max-moves", f"must be at least 1, got {max_moves}")
    model = placement.model_spec
    old = dict(placement.layers)
    before = max_flow(placement).value
    added: list[int] = []
    for t_name in add:
        cluster, nid = cluster.with_node(t_name, region)
        added.append(nid)
    tm = ThroughputModel.for_cluster(model, cluster)
    caps = Capacities.build(cluster, model, tm)
    evaluator = FlowEvaluator(cluster, model, tm)
    partial = placement.partial
    start: dict[int, LayerRange | None] = {i: (None if i in lose else r) for i, r in old.items()}
    start.update({i: None for i in added})
    without = evaluator.value(start, partial=partial)
    best_layers: Mapping[int, LayerRange | None] | None = start if without > 0 else None
    best = without if without > 0 else 0.0
    ids = [n.id for n in cluster.nodes if n.id not in lose and n.id not in added and caps.node_max_layers[n.id] > 0]
    if not ids and not added:
        raise ConfigError("<argument>", "--lose", "no node that can hold layers would be left")
    L = model.num_layers
    rng = random.Random(seed)
    if lose:  # the nodes nearest the lost layers first
        lost_lo = min(old[i][0] for i in lose)  # type: ignore[index]
        lost_hi = max(old[i][1] for i in lose)  # type: ignore[index]
        near = sorted(ids, key=lambda i: (_distance(start.get(i), lost_lo, lost_hi, L + 1), i))
    else:  # the busiest nodes first: the layers a new node can relieve
        flow = max_flow(placement)
        near = sorted(ids, key=lambda i: (-flow.utilisation(i), i))
    k = min(max_moves, len(ids))
    sym = interchangeable_classes(cluster)
    done = 0
    for t in range(tries):
        if k == 0 and t > 0:
            break  # no old node can move: every try would be the same neighbourhood, the new nodes alone
        if t == 0:
            # around the lost layers; with nodes only joining, the new nodes alone (no move at all)
            free = near[:k] if lose else []
        elif t % 2 == 1:
            # half around the lost layers, half anywhere: capacity elsewhere may take the shift
            half = max(1, k // 2)
            pool = [i for i in ids if i not in near[:half]]
            free = near[:half] + rng.sample(pool, min(k - half, len(pool)))
        else:
            free = rng.sample(ids, k)
        free = [*added, *free]
        arc = ArcModel(cluster, caps, free=free, fixed=start, partial=partial, symmetry_classes=sym,
                       time_limit=_TRY_SECONDS, seed=seed + t, node_limit=node_limit)
        res = arc.solve(start=dict(start) if without > 0 else None)
        done += 1
        if res.layers is None:
            continue
        value = evaluator.value(res.layers, partial=partial)
        if value > best + 1e-9:
            best, best_layers = value, dict(res.layers)
    if best_layers is None or best <= 0:
        change = ", ".join([*(f"without node {i}" for i in sorted(lose)), *(f"with a new {t}" for t in add)])
        raise ConfigError("<argument>", "--max-moves",
                          f"no plan moving at most {max_moves} node(s) holds every layer {change} after {done} tries: "
                          "allow more moves, or plan afresh")
    new = Placement.from_layers(cluster, model, best_layers, partial=partial, method="replan",
                                meta={"replanned_from": placement.method, "lost": sorted(lose), "added": added})
    verify(new, tm)
    moved = {i: (old.get(i), new.layers.get(i)) for i in sorted(old)
             if i not in lose and old.get(i) != new.layers.get(i)}
    return ReplanResult(new, before, without, best, moved, done, {i: new.layers.get(i) for i in added})
