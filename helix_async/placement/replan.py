"""Re-placing layers while serving, from the plan in force: few moves, bounded work.

When a node leaves the fleet (lost, or retired by an elastic policy) the layers it held must be
taken up by others, and every node that changes its layers must load new weights while it
serves: a move is costly. :func:`replan` therefore starts from the current plan, drops the lost
nodes, and lets at most ``max_moves`` of the others choose new layer ranges, everyone else
keeping theirs. Each try is one neighbourhood of the planner's arc MILP
(:class:`~helix_async.placement.milp.ArcModel`) with those nodes free and the rest fixed,
maximising the max flow, bounded by branch-and-bound nodes (work), not by seconds. The tries
pick their free nodes around the lost nodes' layers first, then at random (seeded). The result is
verified like any plan. docs/planner.md, "Re-planning from a plan".

The next issue makes this fast and judges plans by what the runtime serves; here it is correct
and bounded in moves.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from ..ids import LayerRange
from ..model import ThroughputModel
from .core import Placement, verify
from .flow import FlowEvaluator
from .milp import ArcModel, Capacities, interchangeable_classes

__all__ = ["ReplanResult", "replan"]

#: a try's seconds when its work bound does not end it first (the bound is what is meant to end it)
_TRY_SECONDS = 3600.0


@dataclass(frozen=True)
class ReplanResult:
    """What :func:`replan` found.

    placement: the new plan (verified). before: the old plan's max flow (tokens/s). without: the
    max flow with the lost nodes gone and nobody moving (0 when some layer is no longer held).
    after: the new plan's max flow. moved: the nodes whose layer ranges changed (lost ones
    excluded), with their old and new ranges. tries: MILP neighbourhoods solved."""

    placement: Placement
    before: float
    without: float
    after: float
    moved: dict[int, tuple[LayerRange | None, LayerRange | None]]
    tries: int


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
    lose: Collection[int],
    *,
    max_moves: int = 4,
    tries: int = 6,
    node_limit: int = 2000,
    seed: int = 0,
) -> ReplanResult:
    """A plan without the nodes ``lose``, changing at most ``max_moves`` other nodes' layers (see
    the module doc). ``tries``: neighbourhoods to solve; ``node_limit``: branch-and-bound nodes each.
    Raises ConfigError naming ``--lose`` for an unknown or unused node, and naming
    ``--max-moves`` when no neighbourhood of that many nodes covers every layer again."""
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
    tm = ThroughputModel.for_cluster(model, cluster)
    caps = Capacities.build(cluster, model, tm)
    evaluator = FlowEvaluator(cluster, model, tm)
    partial = placement.partial
    old = dict(placement.layers)
    start: dict[int, LayerRange | None] = {i: (None if i in lose else r) for i, r in old.items()}
    before = evaluator.value(old, partial=partial)
    without = evaluator.value(start, partial=partial)
    best_layers: Mapping[int, LayerRange | None] | None = start if without > 0 else None
    best = without if without > 0 else 0.0
    ids = [n.id for n in cluster.nodes if n.id not in lose and caps.node_max_layers[n.id] > 0]
    if not ids:
        raise ConfigError("<argument>", "--lose", "no node that can hold layers would be left")
    L = model.num_layers
    lost_lo = min(old[i][0] for i in lose)  # type: ignore[index]
    lost_hi = max(old[i][1] for i in lose)  # type: ignore[index]
    rng = random.Random(seed)
    near = sorted(ids, key=lambda i: (_distance(start.get(i), lost_lo, lost_hi, L + 1), i))
    k = min(max_moves, len(ids))
    sym = interchangeable_classes(cluster)
    done = 0
    for t in range(tries):
        if t == 0:
            free = near[:k]  # around the lost layers
        elif t % 2 == 1:
            # half around the lost layers, half anywhere: capacity elsewhere may take the shift
            half = max(1, k // 2)
            pool = [i for i in ids if i not in near[:half]]
            free = near[:half] + rng.sample(pool, min(k - half, len(pool)))
        else:
            free = rng.sample(ids, k)
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
        raise ConfigError("<argument>", "--max-moves",
                          f"no plan moving at most {max_moves} node(s) holds every layer without node(s) "
                          f"{', '.join(map(str, sorted(lose)))} after {done} tries: allow more moves, or plan afresh")
    new = Placement.from_layers(cluster, model, best_layers, partial=partial, method="replan",
                                meta={"replanned_from": placement.method, "lost": sorted(lose)})
    verify(new, tm)
    moved = {i: (old.get(i), new.layers.get(i)) for i in sorted(old)
             if i not in lose and old.get(i) != new.layers.get(i)}
    return ReplanResult(new, before, without, best, moved, done)
