"""Local search for plans that serve well: the served model (``served.py``) as the objective.

The served objective is not linear (batch times, Little's law, a minimum over layers of KV), so it
is searched here rather than in the MILP: a pool of the best distinct plans found so far, each
step taking one of them, applying one to three random moves and keeping the result when it enters
the pool. Moves keep a plan's pipeline connected where they can:

* ``cut``: shift a layer boundary ``b`` by one or two layers, for every node ending or starting at
  ``b`` at once (the nodes stay joined);
* ``grow``/``shrink``: one end of one node by one layer (creates or removes overlap);
* ``replicate``: an unused node (or a used one, moved) takes the range of a node of the plan, or
  the span of two adjacent ones, where it fits;
* ``drop``: a node leaves the plan;
* ``split``: a node's range is divided with an unused node.

Every candidate is checked (ranges within the node's profiled maximum, every layer covered, a
positive max flow) before it is scored. ``seed`` fixes every random choice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..cluster import ClusterSpec
from ..ids import LayerRange
from ..model import ModelSpec, ThroughputModel, get_model
from ..signals import StopFlag
from .core import Placement, verify
from .flow import FlowEvaluator, max_flow
from .objectives import THROUGHPUT, Objective
from .served import ServedModel, ServedPrediction

__all__ = ["Candidate", "ServedSearch", "perturb", "stages", "swap_stages"]

Layers = dict[int, LayerRange | None]


@dataclass
class Candidate:
    """A scored plan: the served model's prediction and the score the search maximises."""

    placement: Placement
    prediction: ServedPrediction
    score: float
    source: str


def _key(layers: Mapping[int, LayerRange | None]) -> tuple[Any, ...]:
    return tuple(sorted((i, r) for i, r in layers.items() if r is not None))


def perturb(layers: Mapping[int, LayerRange | None], max_k: Mapping[int, int], num_layers: int, rng: random.Random) -> Layers | None:
    """One random move (see the module doc) on a copy of ``layers``; None when it does not apply."""
    new: Layers = dict(layers)
    used = [i for i, r in new.items() if r is not None]
    free = [i for i, r in new.items() if r is None]
    L = num_layers
    move = rng.choice(("cut", "cut", "grow", "shrink", "replicate", "replicate", "drop", "split"))
    if move == "cut" and used:
        bounds = sorted({r[1] for i in used if (r := new[i]) is not None and r[1] < L})
        if not bounds:
            return None
        b = rng.choice(bounds)
        d = rng.choice((-2, -1, 1, 2))
        nb = b + d
        if not 0 < nb < L:
            return None
        for i in used:
            r = new[i]
            assert r is not None
            s, e = r
            s2 = nb if s == b else s
            e2 = nb if e == b else e
            if (s2, e2) != (s, e):
                if not (0 <= s2 < e2 <= L) or e2 - s2 > max_k[i]:
                    return None
                new[i] = (s2, e2)
        return new
    if move in ("grow", "shrink") and used:
        i = rng.choice(used)
        r = new[i]
        assert r is not None
        s, e = r
        if move == "grow":
            s, e = (s - 1, e) if rng.random() < 0.5 else (s, e + 1)
        else:
            s, e = (s + 1, e) if rng.random() < 0.5 else (s, e - 1)
        if not (0 <= s < e <= L) or e - s > max_k[i]:
            return None
        new[i] = (s, e)
        return new
    if move == "replicate" and used:
        pool = free if free and rng.random() < 0.7 else used
        i = rng.choice(pool)
        j = rng.choice(used)
        rj = new[j]
        assert rj is not None
        s, e = rj
        if rng.random() < 0.3:
            # the span of j and a node starting where j ends
            nxt = [x for x in used if (rx := new[x]) is not None and rx[0] == e]
            if nxt:
                rx = new[rng.choice(nxt)]
                assert rx is not None
                e = rx[1]
        if i == j or e - s > max_k[i]:
            return None
        new[i] = (s, e)
        return new
    if move == "drop" and len(used) > 1:
        new[rng.choice(used)] = None
        return new
    if move == "split" and used and free:
        i = rng.choice(used)
        r = new[i]
        assert r is not None
        s, e = r
        if e - s < 2:
            return None
        c = rng.randint(s + 1, e - 1)
        j = rng.choice(free)
        if c - s > max_k[i] or e - c > max_k[j]:
            return None
        new[i] = (s, c)
        new[j] = (c, e)
        return new
    return None


def _covered(layers: Mapping[int, LayerRange | None], L: int) -> bool:
    seen = [False] * L
    for r in layers.values():
        if r is not None:
            for x in range(r[0], r[1]):
                seen[x] = True
    return all(seen)


class ServedSearch:
    """Maximise ``objective``'s score of the served model's prediction over plans of one cluster
    (see the module doc).

    pool: how many distinct plans are kept (the top candidates the planner may simulate).
    """

    def __init__(
        self,
        cluster: ClusterSpec,
        model: ModelSpec | str,
        served: ServedModel,
        *,
        objective: Objective = THROUGHPUT,
        partial: bool = False,
        seed: int = 0,
        pool: int = 12,
        tm: ThroughputModel | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        self.cluster = cluster
        self.model = get_model(model)
        self.served = served
        self.objective = objective
        self.partial = partial
        self.rng = random.Random(seed)
        self.pool_size = pool
        self.tm = tm if tm is not None else ThroughputModel.for_cluster(self.model, cluster)
        self.evaluator = FlowEvaluator(cluster, self.model, self.tm)
        self.stop = stop if stop is not None else StopFlag()
        self.max_k = {n.id: self.tm.max_layers(cluster.machine(n.id)) for n in cluster.nodes}
        self.pool: list[Candidate] = []
        #: the best candidate descending from each start (kept even when the pool drops it), and
        #: each start as it was offered
        self.best_by_origin: dict[str, Candidate] = {}
        self.starts: dict[str, Candidate] = {}
        self._seen: set[tuple[Any, ...]] = set()
        self.evaluations = 0

    def evaluate(self, layers: Mapping[int, LayerRange | None], source: str, *, partial: bool | None = None) -> Candidate | None:
        """Score a layer assignment (with partial-inference links when ``partial``, by default the
        search's setting); None when it is not a servable plan."""
        partial = self.partial if partial is None else partial
        L = self.model.num_layers
        if not _covered(layers, L):
            return None
        if any(r is not None and r[1] - r[0] > self.max_k[i] for i, r in layers.items()):
            return None
        if self.evaluator.value(layers, partial=partial) <= 0:
            return None
        p = Placement.from_layers(self.cluster, self.model, layers, partial=partial, method="served")
        # nodes the links cannot reach are not part of the plan
        used = set(p.used_nodes())
        if any(r is not None and i not in used for i, r in p.layers.items()):
            p = Placement.from_layers(
                self.cluster, self.model, {i: (r if i in used else None) for i, r in p.layers.items()},
                partial=partial, method="served",
            )
        try:
            verify(p, self.tm)
        except Exception:  # noqa: BLE001 - an invalid neighbour is simply not a candidate
            return None
        self.evaluations += 1
        pred = self.served.predict(p, max_flow(p, self.tm), self.tm)
        return Candidate(p, pred, self.objective.score_prediction(pred), source)

    def offer(self, cand: Candidate | None) -> bool:
        """Keep ``cand`` when it is new and enters the pool; True when it became the best."""
        if cand is None:
            return False
        key = _key(cand.placement.layers)
        if key in self._seen:
            return False
        self._seen.add(key)
        origin = origin_of(cand.source)
        if origin == cand.source:
            self.starts.setdefault(origin, cand)
        if origin not in self.best_by_origin or cand.score > self.best_by_origin[origin].score:
            self.best_by_origin[origin] = cand
        if len(self.pool) >= self.pool_size and cand.score <= self.pool[-1].score:
            return False
        best = not self.pool or cand.score > self.pool[0].score
        self.pool.append(cand)
        self.pool.sort(key=lambda c: -c.score)
        del self.pool[self.pool_size:]
        return best

    def seed_with(self, plans: Iterable[tuple[Placement, str]]) -> None:
        """Offer each plan. One whose ``partial`` setting differs from the search's (Petals, with
        partial-inference links) is scored as it is; the others are rebuilt by :meth:`evaluate`
        (every usable link, unreachable nodes dropped), as the search's moves rebuild plans."""
        for p, source in plans:
            try:
                verify(p, self.tm)
            except Exception:  # noqa: BLE001 - a start that is not a valid plan is skipped
                continue
            if p.partial == self.partial:
                self.offer(self.evaluate(p.layers, source))
                continue
            self.evaluations += 1
            pred = self.served.predict(p, max_flow(p, self.tm), self.tm)
            self.offer(Candidate(p, pred, self.objective.score_prediction(pred), source))

    def run(self, seconds: float, *, progress: Callable[[Candidate], None] | None = None, max_steps: int | None = None) -> list[Candidate]:
        """Search for ``seconds`` of wall time (or ``max_steps`` steps); returns the pool, best first."""
        if not self.pool:
            raise ValueError("the served search needs at least one starting plan")
        deadline = time.monotonic() + seconds
        L = self.model.num_layers
        step = 0
        while time.monotonic() < deadline and not self.stop:
            if max_steps is not None and step >= max_steps:
                break
            step += 1
            # favour the best plans: rank r is picked with weight 1 / (r + 1)
            weights = [1.0 / (r + 1) for r in range(len(self.pool))]
            base = self.rng.choices(self.pool, weights)[0]
            layers: Layers | None = dict(base.placement.layers)
            for _ in range(self.rng.choice((1, 1, 2, 3))):
                assert layers is not None
                layers = perturb(layers, self.max_k, L, self.rng)
                if layers is None:
                    break
            if layers is None:
                continue
            origin = base.source.removeprefix("local search from ")
            cand = self.evaluate(layers, f"local search from {origin}")
            if self.offer(cand) and progress is not None and cand is not None:
                progress(cand)
        return list(self.pool)


def stages(layers: Mapping[int, LayerRange | None], num_layers: int) -> list[LayerRange] | None:
    """The plan's stages in order when it is a chain of them (every two distinct ranges are
    disjoint and together they cover ``[0, num_layers)``, replicas sharing a range); else None."""
    rs = sorted({r for r in layers.values() if r is not None})
    pos = 0
    for r in rs:
        if r[0] != pos:
            return None
        pos = r[1]
    return rs if pos == num_layers and rs else None


def swap_stages(layers: Mapping[int, LayerRange | None], num_layers: int, a: int, b: int) -> Layers | None:
    """``layers`` with stages ``a`` and ``b`` (indices into :func:`stages`) exchanged: every node
    keeps its stage (its layer count and its replicas), the stages between move up or down. None
    when the plan is not a chain of stages or an index is out of range."""
    rs = stages(layers, num_layers)
    if rs is None or not (0 <= a < len(rs) and 0 <= b < len(rs)) or a == b:
        return None
    order = list(rs)
    order[a], order[b] = order[b], order[a]
    moved: dict[LayerRange, LayerRange] = {}
    pos = 0
    for r in order:
        moved[r] = (pos, pos + r[1] - r[0])
        pos += r[1] - r[0]
    return {i: (None if r is None else moved[r]) for i, r in layers.items()}


def origin_of(source: str) -> str:
    """The start a candidate descends from ("local search from X" -> X)."""
    return source.removeprefix("local search from ")
