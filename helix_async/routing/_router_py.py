"""MaxFlow route selection at admission (IWRR hop by hop) and the admission queue: pure Python.

``FlowRouter`` here is the specification; ``ext/_routing.pyx`` holds its compiled twin, which must
return the same routes and leave the same IWRR loads and KV state (checked by a hypothesis test).
``AdmissionQueue`` is pure Python only and works with either twin.

Routing (docs/original.md §7.1 steps 1-4), decided once per request at admission, hop by hop from the
source. At scheduling node X (the source or a compute node) the candidates are X's out-links in
the plan, weighted by their max-flow (tokens/s), in a fixed order (node ids ascending, the sink
last; the original keeps the order its links were created in, which the shipped layouts do not
sort, so on an exact IWRR tie the two may pick different hops, docs/original.md §7.1). A request with ``n`` input tokens:

1. masks candidate Y when its link carries less than ``min_share`` (5 %) of X's total out-flow
   (this also drops zero-flow links); when Y is a compute node and ``n`` exceeds Y's prompt limit;
   when Y is a compute node and the KV expectation refuses it (``KVTracker.can_add(Y, n)``);
2. picks among the others with X's IWRR, work = ``n`` (``argmin load + n / flow``, lowest index on
   a tie), charging the chosen link;
3. runs on Y all of Y's layers when X is the source, otherwise Y's layers from X's end layer on
   (partial inference); the route ends when the sink is chosen.

Links masked by flow share never change, so they are left out of the IWRR altogether; choices and
loads are the same as with them permanently masked (the original keeps them in the list).

The walk is **greedy first, backtracking only on dead ends**. It follows the IWRR choice at every
hop, as the original's greedy walk does, as long as that leads on; when it reaches a node
whose candidates are all masked (a dead end: the original fails there, docs/original.md §12.2 items 8 and
9), it marks that node dead for this request, steps back to the previous hop and re-chooses there
with the dead node masked too -- a depth-first search over the candidates in IWRR order. A node's
candidates and masks do not depend on the path that reached it (KV is only reserved once a route is
found, and layers strictly increase along a path, so no node is visited twice on one route), so a
dead node stays dead for the rest of the search: each node is expanded at most once, and ``route``
fails only when *no* path of unmasked candidates reaches the sink. When no dead end is met the
route, and the IWRR charges, are exactly those of the greedy walk.

The IWRR charges (``load += n / flow`` on every hop of the route) are made once the whole route is
found. That is the same as charging each hop when it is chosen and restoring the saved load when the
search abandons it: a hop's charge only changes the IWRR of its own sending node, which is never met
again below it. So an abandoned hop, or a failed request, leaves every load bit for bit as it was,
nothing is reserved and ``None`` is returned; nothing asserts. On success the KV expectation
reserves ``E(n) * layers run`` on every compute node of the route.

:meth:`FlowRouter.feasible` runs the same search with the KV test of an idle cluster
(``KVTracker.can_ever_add``), so on a cluster with nothing reserved ``route(n)`` succeeds exactly
when ``feasible(n)`` is true; a request with ``feasible(n)`` false can never be routed.

A route (:data:`helix_async.ids.Route`, the one shape the host, the router and the wire use) is a
tuple of compute stages ``(node, start, end)`` (layers ``[start, end)``), consecutive in layers
from 0 to L; the source before the first stage and the sink after the last are implicit (the search
always ends on the last stage's link to the sink). ``on_decode(route)`` charges ``1 / flow`` on
every hop of the route, source -> first stage ... last stage -> sink (each decode iteration counts
one token, §7.1); ``finish(request_id)`` releases the request's KV reservation.

Unlike the original (which asserts online and drops the query offline, docs/original.md §12.2 items 8
and 9), a request that cannot be placed now waits in :class:`AdmissionQueue`.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeAlias

from ..ids import SINK, SOURCE, NodeRef, Route, Stage, node_order
from ._iwrr_py import IWRR
from ._kv_py import MAX_INPUT_LEN, MAX_LAYERS

if TYPE_CHECKING:
    from ..flowplan import FlowPlan
    from ..model import ThroughputModel
    from ..placement.core import Placement
    from ._kv_py import KVTracker

# The original's "Fail-Flow" threshold: a link with less than this share of its sender's out-flow
# is never used.
MIN_FLOW_SHARE = 0.05


class RouterInputs(NamedTuple):
    """Validated inputs shared by both twins (built by :func:`prepare_router_inputs`).

    sched: scheduling nodes, the source first, then compute nodes ascending; stages: compute node
    -> [start, end); cands: scheduling node -> eligible (next hop, flow) in candidate order;
    prompt_limits: compute node -> prompt tokens; num_layers: L.
    """

    sched: tuple[NodeRef, ...]
    stages: dict[int, tuple[int, int]]
    cands: dict[NodeRef, tuple[tuple[NodeRef, float], ...]]
    prompt_limits: dict[int, int]
    num_layers: int


def prepare_router_inputs(
    stages: Mapping[int, tuple[int, int]],
    links: Mapping[NodeRef, Sequence[tuple[NodeRef, float]]],
    prompt_limits: Mapping[int, int],
    num_layers: int,
    min_share: float = MIN_FLOW_SHARE,
) -> RouterInputs:
    """Check a routing plan and keep, per scheduling node, the links that carry enough flow.

    stages: compute node -> [start, end); links: scheduling node -> its out-links as (next hop,
    flow in tokens/s) in candidate order; prompt_limits: compute node -> max prompt tokens.
    Raises ValueError naming the first problem.
    """
    L = operator.index(num_layers)
    if not 1 <= L <= MAX_LAYERS:
        raise ValueError(f"num_layers must lie in [1, {MAX_LAYERS}], got {L}")
    min_share = float(min_share)
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must lie in [0, 1], got {min_share!r}")
    st: dict[int, tuple[int, int]] = {}
    for u in sorted(stages):
        if u in (SOURCE, SINK) or isinstance(u, bool):
            raise ValueError(f"stages must name compute nodes (ints), got {u!r}")
        a, b = (operator.index(x) for x in stages[u])
        if not 0 <= a < b <= L:
            raise ValueError(f"node {u}: layer range [{a}, {b}) is not a non-empty range inside [0, {L})")
        st[operator.index(u)] = (a, b)
    limits: dict[int, int] = {}
    for u in st:
        if u not in prompt_limits:
            raise ValueError(f"no prompt limit for compute node {u}")
        lim = operator.index(prompt_limits[u])
        if lim < 0:
            raise ValueError(f"node {u}: prompt limit must be >= 0, got {lim}")
        limits[u] = lim
    sched: tuple[NodeRef, ...] = (SOURCE, *st)
    for x in links:
        if x not in st and x != SOURCE:
            raise ValueError(f"links leave {x!r}, which is neither the source nor a node with layers")
    cands: dict[NodeRef, tuple[tuple[NodeRef, float], ...]] = {}
    for x in sched:
        out = [(y, float(f)) for y, f in links.get(x, ())]
        seen: set[NodeRef] = set()
        total = 0.0
        for y, f in out:
            if y in seen:
                raise ValueError(f"link {x}->{y} appears twice")
            seen.add(y)
            if not (f >= 0.0 and math.isfinite(f)):
                raise ValueError(f"link {x}->{y}: flow must be a finite float >= 0, got {f!r}")
            _check_link(st, L, x, y)
            total = total + f
        cands[x] = tuple((y, f) for y, f in out if f > 0.0 and not f < min_share * total)
    return RouterInputs(sched, st, cands, limits, L)


def _check_link(st: Mapping[int, tuple[int, int]], L: int, x: NodeRef, y: NodeRef) -> None:
    if y == SOURCE or (x == SOURCE and y == SINK):
        raise ValueError(f"link {x}->{y} is not a link of a pipeline")
    if y != SINK and y not in st:
        raise ValueError(f"link {x}->{y} enters a node without layers")
    if x == SOURCE:
        if st[y][0] != 0:  # type: ignore[index]
            raise ValueError(f"link source->{y}: node {y} does not start at layer 0")
        return
    end_x = st[x][1]  # type: ignore[index]
    if y == SINK:
        if end_x != L:
            raise ValueError(f"link {x}->sink: node {x} ends at layer {end_x}, not {L}")
        return
    a, b = st[y]  # type: ignore[index]
    if not a <= end_x < b:
        raise ValueError(f"link {x}->{y}: layer {end_x} (where {x} stops) is not inside [{a}, {b}) of {y}")


def placement_router_inputs(
    placement: Placement, flow_plan: FlowPlan, prompt_limits: Mapping[int, int] | None = None
) -> tuple[dict[int, tuple[int, int]], dict[NodeRef, list[tuple[NodeRef, float]]], dict[int, int], int]:
    """(stages, links, prompt_limits, num_layers) of a placement and its max flow.

    links: every placement link with its flow (0.0 when the plan has none), node ids ascending and
    the sink last. prompt_limits default to the profiled per-(GPU, layer count) limit (a forced
    layout holding more layers than were profiled gets the limit at the profiled maximum).
    """
    stages = {u: (int(r[0]), int(r[1])) for u, r in placement.layers.items() if r is not None}
    links: dict[NodeRef, list[tuple[NodeRef, float]]] = {}
    for u, v in placement.links:
        links.setdefault(u, []).append((v, float(flow_plan.link_flows.get((u, v), 0.0))))
    for out in links.values():
        out.sort(key=lambda yf: node_order(yf[0]))
    if prompt_limits is None:
        from ..model import load_profiles

        profiles = load_profiles(placement.model_spec)
        limits: dict[int, int] = {}
        for u, (a, b) in stages.items():
            ns = profiles.node_settings(placement.cluster.machine(u).gpu)
            limits[u] = ns.prompt_limit_tokens(min(b - a, ns.max_layers))
    else:
        limits = {u: operator.index(prompt_limits[u]) for u in stages if u in prompt_limits}
    return stages, links, limits, placement.num_layers


def check_input_len(n: object) -> int:
    """An input length in tokens (int, 1..MAX_INPUT_LEN)."""
    try:
        v = operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"input length must be an integer, got {type(n).__name__}") from None
    if not 1 <= v <= MAX_INPUT_LEN:
        raise ValueError(f"input length must lie in [1, {MAX_INPUT_LEN}], got {v}")
    return v


class FlowRouter:
    """MaxFlow + IWRR route selection with KV admission (see the module doc).

    stages: compute node -> [start, end); links: scheduling node -> [(next hop, flow tokens/s)] in
    candidate order; prompt_limits: compute node -> max prompt tokens; kv: the KV expectation over
    the same nodes and layer ranges; min_share: flow-share threshold (5 %).
    """

    __slots__ = (
        "_in",
        "_kv",
        "_iwrr",
        "_cands",
        "_edge",
        "_routed",
        "_failed",
        "_backtracks",
    )

    def __init__(
        self,
        stages: Mapping[int, tuple[int, int]],
        links: Mapping[NodeRef, Sequence[tuple[NodeRef, float]]],
        prompt_limits: Mapping[int, int],
        kv: KVTracker,
        num_layers: int,
        *,
        min_share: float = MIN_FLOW_SHARE,
    ) -> None:
        self._in = prepare_router_inputs(stages, links, prompt_limits, num_layers, min_share)
        check_kv_matches(self._in, kv)
        self._kv = kv
        self._iwrr: dict[NodeRef, IWRR] = {}
        self._cands: dict[NodeRef, tuple[NodeRef, ...]] = {}
        self._edge: dict[tuple[NodeRef, NodeRef], tuple[IWRR, int]] = {}
        for x in self._in.sched:
            c = self._in.cands[x]
            iw = IWRR([f for _, f in c])
            self._iwrr[x] = iw
            self._cands[x] = tuple(y for y, _ in c)
            for j, (y, _) in enumerate(c):
                self._edge[(x, y)] = (iw, j)
        self._routed = 0
        self._failed = 0
        self._backtracks = 0

    @classmethod
    def from_plan(
        cls,
        placement: Placement,
        flow_plan: FlowPlan,
        kv: KVTracker | None = None,
        *,
        prompt_limits: Mapping[int, int] | None = None,
        kv_fill_limit: float = 0.85,
        output_ratio: float = 1.0,
        tm: ThroughputModel | None = None,
        min_share: float = MIN_FLOW_SHARE,
    ) -> FlowRouter:
        """A router over ``placement`` weighted by ``flow_plan``'s link flows.

        kv defaults to a fresh tracker of this twin over the placement with (kv_fill_limit,
        output_ratio) (the simulator's offline parameters, 0.85 and 1.0; see ``KVTracker``);
        prompt limits default to the profiles.
        """
        if kv is None:
            from ._kv_py import KVTracker as _KV

            kv = _KV.from_placement(placement, kv_fill_limit=kv_fill_limit, output_ratio=output_ratio, tm=tm)
        stages, links, limits, L = placement_router_inputs(placement, flow_plan, prompt_limits)
        return cls(stages, links, limits, kv, L, min_share=min_share)

    # ---- read-outs ----------------------------------------------------------------------------------

    @property
    def kv(self) -> KVTracker:
        return self._kv

    @property
    def num_layers(self) -> int:
        return self._in.num_layers

    @property
    def scheduling_nodes(self) -> tuple[NodeRef, ...]:
        """The source, then the compute nodes with layers, ascending."""
        return self._in.sched

    def candidates(self, x: NodeRef) -> tuple[tuple[NodeRef, float], ...]:
        """(next hop, flow) of ``x``'s links that carry enough flow, in IWRR order."""
        return self._in.cands[x]

    def loads(self, x: NodeRef) -> tuple[float, ...]:
        """IWRR loads (seconds) of ``x``'s candidates."""
        return self._iwrr[x].loads

    def snapshot(self) -> tuple[tuple[NodeRef, tuple[float, ...]], ...]:
        """(scheduling node, IWRR loads) for every scheduling node, in order."""
        return tuple((x, self._iwrr[x].loads) for x in self._in.sched)

    @property
    def stats(self) -> dict[str, int]:
        """routed / failed: route() calls that returned a route / None; backtracks: dead ends that
        route() stepped back from (0 while every walk is the plain greedy one)."""
        return {"routed": self._routed, "failed": self._failed, "backtracks": self._backtracks}

    def feasible(self, n: int) -> bool:
        """Whether a request of ``n`` input tokens could ever be routed.

        The route search of :meth:`route` with every KV test made as on an idle cluster
        (``KVTracker.can_ever_add``), IWRR state untouched: on a cluster with nothing reserved,
        ``route(n)`` succeeds exactly when this is true.
        """
        return self._search(check_input_len(n), True) is not None

    # ---- routing -----------------------------------------------------------------------------------

    def _search(self, n: int, idle: bool) -> list[tuple[NodeRef, int]] | None:
        """(scheduling node, chosen candidate index) for every hop of a route of ``n`` tokens, or None.

        Greedy first, backtracking only on dead ends (see the module doc); charges nothing.
        idle: test KV as on an idle cluster (``can_ever_add``) instead of now (``can_add``).
        """
        kv = self._kv
        fits = kv.can_ever_add if idle else kv.can_add
        limits = self._in.prompt_limits
        work = float(n)
        dead: set[NodeRef] = set()
        hops: list[tuple[NodeRef, int]] = []
        x: NodeRef = SOURCE
        while True:
            cands = self._cands[x]
            mask = [
                y != SINK and (n > limits[y] or y in dead or not fits(y, n))  # type: ignore[index, arg-type]
                for y in cands
            ]
            j = self._iwrr[x].argmin(work, mask)
            if j < 0:
                if not hops:
                    return None
                # dead end: no way on from x; mask it and re-choose at the previous hop
                dead.add(x)
                x = hops.pop()[0]
                if not idle:
                    self._backtracks += 1
                continue
            hops.append((x, j))
            y = cands[j]
            if y == SINK:
                return hops
            x = y

    def route(self, request_id: Hashable, input_len: int) -> Route | None:
        """Pick a route for a request of ``input_len`` prompt tokens, or None when none fits now.

        On success the IWRR loads along the route are charged and the KV expectation reserved
        under ``request_id`` (ValueError if that id already holds a reservation). None means no
        path of unmasked candidates reaches the sink now (see the module doc); nothing changes.
        """
        n = check_input_len(input_len)
        kv = self._kv
        if request_id in kv:
            raise ValueError(f"request {request_id!r} already holds a KV reservation")
        hops = self._search(n, False)
        if hops is None:
            self._failed += 1
            return None
        stages = self._in.stages
        route: list[Stage] = []
        last_end = 0
        for x, j in hops:
            y = self._cands[x][j]
            if y == SINK:  # the last hop (the search ends there): implicit in the route
                break
            a, b = stages[y]  # type: ignore[index]
            route.append((y, a if x == SOURCE else last_end, b))  # type: ignore[arg-type]
            last_end = b
        kv.reserve(request_id, [(s[0], s[2] - s[1]) for s in route], n)
        work = float(n)
        for x, j in hops:
            self._iwrr[x].add(j, work)
        self._routed += 1
        return tuple(route)

    def on_decode(self, route: Route) -> None:
        """Charge one decode token (``1 / flow``) on every hop of ``route`` (one decode iteration):
        source -> first stage's node, ..., last stage's node -> sink.

        Only the stages' nodes are read. ValueError (and nothing charged) when a hop is not a
        candidate link of this router, e.g. a route of another plan, or with no stage.
        """
        edges = []
        x: NodeRef = SOURCE
        for stage in route:
            y: NodeRef = stage[0]
            if y == SINK:  # implicit after the last stage, never a stage's node
                raise ValueError(f"hop {x}->{y} is not a candidate link of this router")
            edges.append(self._hop(x, y))
            x = y
        edges.append(self._hop(x, SINK))
        for iw, j in edges:
            iw.add(j, 1.0)

    def _hop(self, x: NodeRef, y: NodeRef) -> tuple[IWRR, int]:
        try:
            return self._edge[(x, y)]
        except (KeyError, TypeError):  # TypeError: y is not even hashable
            raise ValueError(f"hop {x}->{y} is not a candidate link of this router") from None

    def finish(self, request_id: Hashable) -> None:
        """Release ``request_id``'s KV reservation (KeyError when it holds none)."""
        self._kv.release(request_id)

    def __repr__(self) -> str:
        return f"FlowRouter(nodes={len(self._in.sched) - 1}, L={self._in.num_layers}, kv={self._kv!r})"


def check_kv_matches(inputs: RouterInputs, kv: object) -> None:
    """The KV tracker must cover every compute node of the plan with the same layer range."""
    for u, r in inputs.stages.items():
        try:
            kr = kv.layer_range(u)  # type: ignore[attr-defined]
        except KeyError:
            raise ValueError(f"the KV tracker does not track compute node {u}") from None
        if tuple(kr) != r:
            raise ValueError(f"node {u}: KV tracker layer range {tuple(kr)} differs from the plan's {r}")


# --------------------------------------------------------------------------------------------------
# Admission queue
# --------------------------------------------------------------------------------------------------

Admission: TypeAlias = Literal["routed", "queued", "rejected"]


class RouterLike(Protocol):
    """What :class:`AdmissionQueue` needs of a router (either FlowRouter twin)."""

    @property
    def kv(self) -> Any: ...
    def route(self, request_id: Hashable, input_len: int) -> Route | None: ...
    def finish(self, request_id: Hashable) -> None: ...
    def feasible(self, n: int) -> bool: ...


class AdmissionQueue:
    """Bounded FIFO in front of a router: requests that cannot be placed now wait, oldest first.

    router: a FlowRouter (either twin); capacity: the most requests that may wait (>= 0);
    on_routed: called as ``on_routed(request_id, route)`` for every request routed, at submit or
    later in :meth:`retry`.

    Order is strict FIFO: while anything waits, a new request queues behind it rather than
    overtaking, and :meth:`retry` routes from the head and stops at the first request that still
    does not fit. No request is starved by later ones; a large request at the head does hold back
    smaller ones behind it until KV frees up (head-of-line blocking is the price of FIFO). A
    request that can never be routed (:meth:`FlowRouter.feasible` is False: no path whose every
    node takes its prompt length and, even when idle, its KV demand within ``kv_fill_limit``) is
    rejected at once (counted as ``rejected_infeasible``) instead of blocking the head for ever.
    Every request that waits is feasible, and the router backtracks out of dead ends, so on an
    idle cluster ``route`` succeeds for it: the head always moves once enough KV is released.
    """

    def __init__(
        self,
        router: RouterLike,
        capacity: int,
        on_routed: Callable[[Hashable, Route], None] | None = None,
    ) -> None:
        cap = operator.index(capacity)
        if cap < 0:
            raise ValueError(f"queue capacity must be >= 0, got {cap}")
        self._router = router
        self._cap = cap
        self._on_routed = on_routed
        self._q: deque[tuple[Hashable, int]] = deque()
        self._ids: set[Hashable] = set()
        self._stats = {
            "submitted": 0,
            "routed_at_submit": 0,
            "queued": 0,
            "routed_from_queue": 0,
            "rejected_full": 0,
            "rejected_infeasible": 0,
            "max_pending": 0,
        }

    @property
    def router(self) -> RouterLike:
        return self._router

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def pending(self) -> int:
        """Requests waiting."""
        return len(self._q)

    @property
    def rejected(self) -> int:
        """Requests turned away (queue full or never routable)."""
        return self._stats["rejected_full"] + self._stats["rejected_infeasible"]

    @property
    def stats(self) -> dict[str, int]:
        """Counters: submitted, routed_at_submit, queued, routed_from_queue, rejected_full,
        rejected_infeasible, max_pending, and pending (now)."""
        return {**self._stats, "pending": len(self._q)}

    def waiting(self) -> tuple[tuple[Hashable, int], ...]:
        """(request_id, input_len) of the waiting requests, oldest first."""
        return tuple(self._q)

    def _deliver(self, request_id: Hashable, route: Route) -> None:
        if self._on_routed is not None:
            self._on_routed(request_id, route)

    def submit(self, request_id: Hashable, input_len: int) -> Admission:
        """Route a request now, or queue it, or reject it (queue full or never routable).

        input_len: prompt tokens. Raises ValueError when ``request_id`` is already waiting or routed.
        """
        n = check_input_len(input_len)
        if request_id in self._ids:
            raise ValueError(f"request {request_id!r} is already waiting")
        if request_id in self._router.kv:
            raise ValueError(f"request {request_id!r} already holds a KV reservation")
        # counted only once the request is accepted for consideration (the errors above count nothing)
        self._stats["submitted"] += 1
        if not self._q:
            route = self._router.route(request_id, n)
            if route is not None:
                self._stats["routed_at_submit"] += 1
                self._deliver(request_id, route)
                return "routed"
        if not self._router.feasible(n):
            self._stats["rejected_infeasible"] += 1
            return "rejected"
        if len(self._q) >= self._cap:
            self._stats["rejected_full"] += 1
            return "rejected"
        self._q.append((request_id, n))
        self._ids.add(request_id)
        self._stats["queued"] += 1
        if len(self._q) > self._stats["max_pending"]:
            self._stats["max_pending"] = len(self._q)
        return "queued"

    def retry(self) -> list[tuple[Hashable, Route]]:
        """Route waiting requests from the head while they fit; returns what was routed, in order.

        Call it after KV is released (see :meth:`finish`).
        """
        out: list[tuple[Hashable, Route]] = []
        while self._q:
            rid, n = self._q[0]
            route = self._router.route(rid, n)
            if route is None:
                break
            self._q.popleft()
            self._ids.discard(rid)
            self._stats["routed_from_queue"] += 1
            out.append((rid, route))
            self._deliver(rid, route)
        return out

    def finish(self, request_id: Hashable) -> list[tuple[Hashable, Route]]:
        """Release a finished request's KV, then :meth:`retry`; returns what was routed."""
        self._router.finish(request_id)
        return self.retry()
