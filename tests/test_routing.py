"""Routing: IWRR, KV expectation, MaxFlow router, admission queue and baselines; twins agree exactly."""

from __future__ import annotations

import functools
import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helix_async import envs
from helix_async.ids import SINK, SOURCE, NodeRef
from helix_async.model import load_profiles
from helix_async.placement import load_shipped_layout
from helix_async.placement.flow import max_flow
from helix_async.routing import (
    IWRR,
    IWRRC,
    AdmissionQueue,
    FlowRouter,
    FlowRouterC,
    FlowRouterPy,
    IWRRPy,
    KVTracker,
    KVTrackerC,
    KVTrackerPy,
    RandomPolicy,
    ShortestQueuePolicy,
    SwarmPolicy,
    node_seed,
)

IWRRS = [pytest.param(IWRRPy, id="py")]
KVS = [pytest.param(KVTrackerPy, id="py")]
ROUTERS = [pytest.param((FlowRouterPy, KVTrackerPy), id="py")]
if IWRRC is not None:
    IWRRS.append(pytest.param(IWRRC, id="c"))
    KVS.append(pytest.param(KVTrackerC, id="c"))
    ROUTERS.append(pytest.param((FlowRouterC, KVTrackerC), id="c"))

needs_c = pytest.mark.skipif(IWRRC is None, reason="pure-Python build (HELIX_NO_EXTENSIONS=1)")


def test_import_site_picks_compiled_unless_disabled() -> None:
    if envs.HELIX_NO_EXTENSIONS:
        assert (IWRR, KVTracker, FlowRouter) == (IWRRPy, KVTrackerPy, FlowRouterPy)
        assert KVTrackerC is None and FlowRouterC is None
    else:
        assert (IWRR, KVTracker, FlowRouter) == (IWRRC, KVTrackerC, FlowRouterC)


# ==================================================================================================
# IWRR
# ==================================================================================================


@pytest.mark.parametrize("impl", IWRRS)
def test_iwrr_argmin_rule_and_charge(impl) -> None:
    iw = impl([1.0, 2.0, 4.0])
    # costs 4, 2, 1 -> candidate 2, charged 4/4
    assert iw.argmin(4.0) == 2 and iw.loads == (0.0, 0.0, 0.0)
    assert iw.choose(4.0) == 2
    assert iw.loads == (0.0, 0.0, 1.0)
    # costs 4, 2, 2: a tie between 1 and 2 goes to the lower index
    assert iw.choose(4.0) == 1
    assert iw.loads == (0.0, 2.0, 1.0)
    assert iw.load(1) == 2.0 and len(iw) == 3 and iw.weights == (1.0, 2.0, 4.0)


@pytest.mark.parametrize("impl", IWRRS)
def test_iwrr_equal_weights_round_robin_lowest_index_first(impl) -> None:
    iw = impl([5.0, 5.0, 5.0])
    assert [iw.choose(10) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("impl", IWRRS)
def test_iwrr_decode_adds_one_over_weight(impl) -> None:
    iw = impl([3.0, 7.0])
    iw.add(1)
    assert iw.loads == (0.0, 1.0 / 7.0)
    iw.add(1)
    assert iw.loads == (0.0, 1.0 / 7.0 + 1.0 / 7.0)
    iw.add(0, 6)
    assert iw.loads[0] == 2.0


@pytest.mark.parametrize("impl", IWRRS)
def test_iwrr_undo_and_restore_are_exact(impl) -> None:
    iw = impl([0.5, 2.0, 8.0])  # power-of-two weights: every charge is exact, so is undo
    for work in (3.0, 5.0, 1.0, 7.0):
        iw.choose(work)
    before = iw.loads
    j = iw.choose(11.0)
    assert iw.loads != before
    iw.undo(j, 11.0)
    assert iw.loads == before
    # from a zero load undo is exact for any weight
    iw = impl([3.0, 7.0, 0.1])
    j = iw.choose(13.0)
    iw.undo(j, 13.0)
    assert iw.loads == (0.0, 0.0, 0.0)
    # restore puts back a saved load bit for bit, whatever the arithmetic did
    iw = impl([0.1, 0.3])
    iw.choose(0.7)
    saved = iw.load(0)
    iw.add(0, 0.2)
    iw.restore(0, saved)
    assert iw.load(0) == saved
    iw.reset()
    assert iw.loads == (0.0, 0.0)


@pytest.mark.parametrize("impl", IWRRS)
def test_iwrr_masks(impl) -> None:
    iw = impl([1.0, 1.0, 1.0])
    assert iw.choose(1.0, [True, False, True]) == 1
    assert iw.choose(1.0, [True, True, True]) == -1  # all masked: -1, nothing charged
    assert iw.loads == (0.0, 1.0, 0.0)
    iw.set_mask([0, 1, 0])  # preset mask used when none is given
    assert iw.mask == (False, True, False)
    assert [iw.choose(1.0) for _ in range(3)] == [0, 2, 0]
    assert iw.choose(1.0, [False, False, False]) == 1  # a per-call mask overrides the preset
    iw.set_mask(None)
    assert iw.mask == (False, False, False)
    assert impl([]).choose(1.0) == -1
    with pytest.raises(ValueError, match="mask has 2 entries"):
        iw.choose(1.0, [False, False])


@pytest.mark.parametrize("impl", IWRRS)
def test_iwrr_rejects_bad_input(impl) -> None:
    for bad in ([1.0, 0.0], [-1.0], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="weight"):
            impl(bad)
    iw = impl([1.0, 2.0])
    for work in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="work"):
            iw.choose(work)
    with pytest.raises(IndexError):
        iw.add(2)
    with pytest.raises(IndexError):
        iw.undo(-1, 1.0)


@pytest.mark.parametrize("impl", IWRRS)
@pytest.mark.parametrize(
    "weights", [[3.0, 1.0], [1.0, 3.0], [5.0, 3.0, 1.0, 1.0], [1289.5, 757.9, 531.7, 0.3]], ids=str
)
def test_iwrr_counts_follow_weights(impl, weights) -> None:
    iw = impl(weights)
    picks = 2000
    counts = Counter(iw.choose(100.0) for _ in range(picks))
    total = sum(weights)
    for j, w in enumerate(weights):
        assert abs(counts[j] - picks * w / total) <= 1.0


# ==================================================================================================
# KV expectation
# ==================================================================================================


def _kv(impl, **kw):
    params = {"kv_fill_limit": 0.5, "output_ratio": 0.0, "avg_output_len": 240}
    params.update(kw)
    return impl({0: 1000, 1: 300, 2: 40}, {0: (0, 4), 1: (0, 4), 2: (4, 6)}, **params)


@pytest.mark.parametrize("impl", KVS)
def test_kv_expected_len(impl) -> None:
    assert _kv(impl, output_ratio=1.0).expected_len(100) == 340
    assert _kv(impl, output_ratio=0.6).expected_len(100) == 244  # int(100 + 144.0)
    assert _kv(impl, output_ratio=0.5, avg_output_len=3).expected_len(10) == 11  # int(11.5)


@pytest.mark.parametrize("impl", KVS)
def test_kv_can_add_threshold_at_the_boundary(impl) -> None:
    kv = _kv(impl)
    assert kv.kv_fill_limit == 0.5 and "kv_fill_limit=0.5" in repr(kv)
    # node 0: 1000 entries, 4 layers, fill limit 0.5 -> admit while 1000 - 4 * E >= 500, i.e. E <= 125
    assert kv.can_add(0, 125) and not kv.can_add(0, 126)
    assert kv.can_ever_add(0, 125) and not kv.can_ever_add(0, 126)
    # the full layer count is used even when the query would run fewer layers
    kv.reserve("a", [(0, 1)], 100)
    assert kv.available(0) == 900
    assert kv.can_add(0, 100) and not kv.can_add(0, 101)  # 900 - 4 * 100 == 500
    assert kv.can_ever_add(0, 125)
    # fill limit 1: everything may be used, exactly to zero
    kv1 = _kv(impl, kv_fill_limit=1.0)
    assert kv1.can_add(2, 20) and not kv1.can_add(2, 21)


@pytest.mark.parametrize("impl", KVS)
def test_kv_reserve_release_round_trip(impl) -> None:
    kv = _kv(impl, output_ratio=0.5, avg_output_len=10)  # E(n) = n + 5
    start = kv.snapshot()
    assert start == ((0, 1000), (1, 300), (2, 40))
    kv.reserve(7, [(0, 4), (2, 1)], 15)
    assert kv.reserved(7) == ((0, 80), (2, 20))
    assert kv.snapshot() == ((0, 920), (1, 300), (2, 20))
    assert 7 in kv and len(kv) == 1
    with pytest.raises(ValueError, match="already holds"):
        kv.reserve(7, [(1, 1)], 1)
    with pytest.raises(ValueError, match="needs"):  # node 2 has 20 left, asks 2 * 15
        kv.reserve(8, [(1, 1), (2, 2)], 10)
    with pytest.raises(ValueError, match="layers run"):
        kv.reserve(8, [(2, 3)], 1)
    with pytest.raises(ValueError, match="twice"):
        kv.reserve(8, [(1, 1), (1, 1)], 1)
    with pytest.raises(KeyError, match="not tracked"):
        kv.reserve(8, [(9, 1)], 1)
    assert kv.snapshot() == ((0, 920), (1, 300), (2, 20))  # failed reserves changed nothing
    kv.release(7)
    assert kv.snapshot() == start and len(kv) == 0 and 7 not in kv
    with pytest.raises(KeyError, match="holds no KV reservation"):
        kv.release(7)


@pytest.mark.parametrize("impl", KVS)
def test_kv_bottleneck_usage_hand_example(impl) -> None:
    kv = impl({0: 100, 1: 300, 2: 40}, {0: (0, 2), 1: (0, 2), 2: (2, 4)}, kv_fill_limit=1.0, output_ratio=0.0)
    assert kv.bottleneck_usage() == 0.0
    kv.reserve("r1", [(0, 2)], 10)  # node 0: 80 left
    # layers 0-1: free 80/2 + 300/2 = 190 of 50 + 150 = 200 -> 0.05
    assert kv.bottleneck_usage() == pytest.approx(0.05, abs=1e-15)
    kv.reserve("r2", [(2, 1)], 10)  # node 2: 30 left; layers 2-3: free 15 of 20 -> 0.25
    assert kv.bottleneck_usage() == 0.25
    kv.release("r2")
    kv.release("r1")
    assert kv.bottleneck_usage() == 0.0


@pytest.mark.parametrize("impl", KVS)
def test_kv_rejects_bad_parameters(impl) -> None:
    with pytest.raises(ValueError, match="kv_fill_limit"):
        _kv(impl, kv_fill_limit=1.5)
    with pytest.raises(ValueError, match="output_ratio"):
        _kv(impl, output_ratio=-0.1)
    with pytest.raises(ValueError, match="same nodes"):
        impl({0: 10}, {1: (0, 1)}, kv_fill_limit=1.0, output_ratio=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        impl({0: 10}, {0: (2, 2)}, kv_fill_limit=1.0, output_ratio=0.0)
    with pytest.raises(ValueError, match="input length"):
        _kv(impl).can_add(0, -1)
    with pytest.raises(TypeError):  # the old name of kv_fill_limit is gone, not silently ignored
        impl({0: 10}, {0: (0, 1)}, hwm=1.0, output_ratio=0.0)


# ==================================================================================================
# FlowRouter on the shipped single24 ILP plan
# ==================================================================================================


@functools.cache
def _ilp():
    p = load_shipped_layout("ilp")
    return p, max_flow(p)


def _router(pair, **kw):
    router_cls, kv_cls = pair
    p, fp = _ilp()
    fill, ratio = kw.pop("kv_fill_limit", 0.85), kw.pop("output_ratio", 1.0)
    kv = kv_cls.from_placement(p, kv_fill_limit=fill, output_ratio=ratio)
    return router_cls.from_plan(p, fp, kv, **kw)


def _prompt_limits():
    p, _ = _ilp()
    prof = load_profiles(p.model_spec)
    return {
        u: prof.node_settings(p.cluster.machine(u).gpu).prompt_limit_tokens(r[1] - r[0])
        for u, r in p.layers.items()
        if r is not None
    }


def _hops(route):
    """The nodes a route's requests visit after the source: its stages' nodes, then the sink."""
    return [*(node for node, _, _ in route), SINK]


def _check_route(route, n):
    p, fp = _ilp()
    limits = _prompt_limits()
    assert type(route) is tuple and all(type(s) is tuple and len(s) == 3 for s in route)
    covered = 0
    prev = SOURCE
    for node, start, end in route:
        assert type(node) is int and start == covered and start < end
        a, b = p.layers[node]
        assert a <= start and end == b
        assert n <= limits[node]
        covered = end
    assert covered == 80  # the last stage ends at the model's last layer; the sink is implicit
    for node in _hops(route):
        assert (prev, node) in p.links
        out = sum(f for _, f in fp.weights(prev))
        assert fp.link_flows[(prev, node)] >= 0.05 * out > 0
        prev = node


@pytest.mark.parametrize("pair", ROUTERS)
def test_router_routes_cover_every_layer_once_on_valid_links(pair) -> None:
    r = _router(pair)
    rng = random.Random(3)
    for i in range(300):
        n = rng.randint(1, 2048)
        route = r.route(i, n)
        assert route is not None
        _check_route(route, n)
        # every compute hop holds E(n) * layers run
        assert r.kv.reserved(i) == tuple((node, (n + 240) * (e - s)) for node, s, e in route)
        r.finish(i)
    assert r.stats == {"routed": 300, "failed": 0, "backtracks": 0}
    assert all(avail == r.kv.total(u) for u, avail in r.kv.snapshot())


@pytest.mark.parametrize("pair", ROUTERS)
def test_router_respects_prompt_limits_and_flow_share(pair) -> None:
    r = _router(pair)
    assert r.route("long", 2049) is None  # every path crosses a T4/L4 (limit 2048)
    assert not r.feasible(2049) and r.feasible(2048)
    # node 18's link to 3 and node 22's link to 21 carry no flow: never candidates
    assert [y for y, _ in r.candidates(18)] == [5, 21]
    assert [y for y, _ in r.candidates(22)] == [3, 5]
    # a custom limit on node 3 (one of the two ways on from 22) steers everything to 5
    limits = dict(_prompt_limits())
    limits[3] = 100
    r = _router(pair, prompt_limits=limits)
    for i in range(50):
        route = r.route(i, 500)
        assert 3 not in [s[0] for s in route]
        r.finish(i)


@pytest.mark.parametrize("pair", ROUTERS)
def test_router_distributes_in_proportion_to_link_flows(pair) -> None:
    r = _router(pair)
    _, fp = _ilp()
    hops: Counter = Counter()
    for i in range(3000):
        route = r.route(i, 1000)
        prev = SOURCE
        for node in _hops(route):
            hops[(prev, node)] += 1
            prev = node
        r.finish(i)
    for x in r.scheduling_nodes:
        cands = r.candidates(x)
        if len(cands) < 2:
            continue
        total_w = sum(w for _, w in cands)
        through = sum(hops[(x, y)] for y, _ in cands)
        for y, w in cands:
            assert abs(hops[(x, y)] / through - w / total_w) < 0.01, (x, y)


@pytest.mark.parametrize("pair", ROUTERS)
def test_router_failure_rolls_back_iwrr_loads(pair) -> None:
    r = _router(pair)
    for i in range(20):
        r.route(i, 300 + 17 * i)
    # fill node 4 (layers 77-80, the last stop before the sink on every path) past its mark
    r.kv.reserve("blocker", [(4, 3)], 500_000)
    loads, kv_state = r.snapshot(), r.kv.snapshot()
    assert r.route("x", 700) is None
    assert r.snapshot() == loads and r.kv.snapshot() == kv_state
    assert "x" not in r.kv and r.stats["failed"] == 1
    r.finish("blocker")
    assert r.route("x", 700) is not None


@pytest.mark.parametrize("pair", ROUTERS)
def test_router_decode_charges_every_hop(pair) -> None:
    r = _router(pair)
    route = r.route(1, 800)
    before = dict(r.snapshot())
    r.on_decode(route)
    after = dict(r.snapshot())
    prev = SOURCE
    charged = 0
    for node in _hops(route):  # the last stage's hop to the (implicit) sink is charged too
        j = [y for y, _ in r.candidates(prev)].index(node)
        w = r.candidates(prev)[j][1]
        assert after[prev][j] == before[prev][j] + 1.0 / w
        charged += 1
        prev = node
    assert charged == len(route) + 1
    assert sum(map(sum, after.values())) > sum(map(sum, before.values()))
    # a bad route is refused before anything is charged
    last = route[-1][0]
    for bad, pattern in [
        (((3, 53, 60),), r"^hop source->3 is not a candidate link"),
        (route + ((SINK, 80, 80),), rf"^hop {last}->sink is not a candidate link"),  # sink is implicit
        (route[:-1], rf"^hop {route[-2][0]}->sink is not a candidate link"),  # stops short of the sink
        ((), r"^hop source->sink is not a candidate link"),
        (((SOURCE, 0, 1),), r"^hop source->source is not a candidate link"),
    ]:
        snap = r.snapshot()
        with pytest.raises(ValueError, match=pattern):
            r.on_decode(bad)
        assert r.snapshot() == snap
    copy = tuple((node, s, e) for node, s, e in route)
    assert copy == route and copy[0] is not route[0]
    before = dict(r.snapshot())
    r.on_decode(copy)  # an equal route made elsewhere charges the same hops
    r.on_decode(route)
    after = dict(r.snapshot())
    prev = SOURCE
    for node in _hops(route):
        j = [y for y, _ in r.candidates(prev)].index(node)
        w = r.candidates(prev)[j][1]
        assert after[prev][j] == before[prev][j] + 1.0 / w + 1.0 / w
        prev = node
    with pytest.raises(ValueError, match="already holds"):
        r.route(1, 10)
    r.finish(1)
    with pytest.raises(KeyError):
        r.finish(1)


@pytest.mark.parametrize("pair", ROUTERS)
def test_router_rejects_invalid_plans(pair) -> None:
    router_cls, kv_cls = pair
    kv = kv_cls({0: 1000, 1: 1000}, {0: (0, 2), 1: (2, 4)}, kv_fill_limit=1.0, output_ratio=0.0)
    limits = {0: 100, 1: 100}
    ok = {SOURCE: [(0, 1.0)], 0: [(1, 1.0)], 1: [(SINK, 1.0)]}
    r = router_cls({0: (0, 2), 1: (2, 4)}, ok, limits, kv, 4)
    assert r.route("a", 5) == ((0, 0, 2), (1, 2, 4))
    with pytest.raises(ValueError, match="does not start at layer 0"):
        router_cls({0: (0, 2), 1: (2, 4)}, {**ok, SOURCE: [(1, 1.0)]}, limits, kv, 4)
    with pytest.raises(ValueError, match="not inside"):
        router_cls({0: (0, 2), 1: (2, 4)}, {**ok, 1: [(0, 1.0)]}, limits, kv, 4)
    with pytest.raises(ValueError, match="not 4"):
        router_cls({0: (0, 2), 1: (2, 4)}, {**ok, 0: [(SINK, 1.0)]}, limits, kv, 4)
    with pytest.raises(ValueError, match="prompt limit"):
        router_cls({0: (0, 2), 1: (2, 4)}, ok, {0: 100}, kv, 4)
    with pytest.raises(ValueError, match="differs"):
        router_cls(
            {0: (0, 2), 1: (2, 4)},
            ok,
            limits,
            kv_cls({0: 9, 1: 9}, {0: (0, 2), 1: (2, 3)}, kv_fill_limit=1.0, output_ratio=0.0),
            4,
        )


@needs_c
def test_compiled_router_needs_compiled_kv() -> None:
    p, fp = _ilp()
    assert FlowRouterC is not None
    with pytest.raises(TypeError):
        FlowRouterC.from_plan(p, fp, KVTrackerPy.from_placement(p, kv_fill_limit=0.85, output_ratio=1.0))


@pytest.mark.parametrize("pair", ROUTERS)
def test_partial_inference_runs_the_rest_of_the_next_node(pair) -> None:
    router_cls, kv_cls = pair
    stages = {0: (0, 3), 1: (2, 5), 2: (3, 6), 3: (5, 6)}
    kv = kv_cls(dict.fromkeys(stages, 10_000), stages, kv_fill_limit=1.0, output_ratio=0.0)
    links = {SOURCE: [(0, 2.0)], 0: [(1, 1.0), (2, 1.0)], 1: [(3, 1.0)], 2: [(SINK, 1.0)], 3: [(SINK, 1.0)]}
    r = router_cls(stages, links, dict.fromkeys(stages, 99), kv, 6)
    assert r.route("a", 4) == ((0, 0, 3), (1, 3, 5), (3, 5, 6))
    assert r.route("b", 4) == ((0, 0, 3), (2, 3, 6))
    assert r.kv.reserved("a") == ((0, 12), (1, 8), (3, 4))


# ==================================================================================================
# Admission queue
# ==================================================================================================


def random_plans_lazy():
    return st.deferred(lambda: random_plans())


def _small_plan(pair, capacity=100):
    router_cls, kv_cls = pair
    stages = {0: (0, 1), 1: (0, 1)}
    kv = kv_cls({0: capacity, 1: capacity}, stages, kv_fill_limit=1.0, output_ratio=0.0)
    links = {SOURCE: [(0, 1.0), (1, 1.0)], 0: [(SINK, 1.0)], 1: [(SINK, 1.0)]}
    return router_cls(stages, links, {0: 80, 1: 50}, kv, 1)


@pytest.mark.parametrize("pair", ROUTERS)
def test_queue_waits_for_kv_then_routes_in_fifo_order(pair) -> None:
    routed: list = []
    q = AdmissionQueue(_small_plan(pair), capacity=10, on_routed=lambda rid, route: routed.append(rid))
    assert q.submit("a", 60) == "routed"  # node 0 (least cost first: tie -> lower index)
    assert q.submit("b", 50) == "routed"  # node 1
    assert q.submit("c", 60) == "queued"  # 40 left on node 0, 50 on node 1 (limit 50)
    assert q.submit("d", 10) == "queued"  # would fit, but waits behind c (strict FIFO)
    assert routed == ["a", "b"] and q.pending == 2
    assert q.waiting() == (("c", 60), ("d", 10))
    assert q.finish("b") == []  # node 1 frees up, but c's 60 tokens exceed node 1's prompt limit
    assert q.finish("a") == [("c", ((0, 0, 1),)), ("d", ((1, 0, 1),))]
    assert routed == ["a", "b", "c", "d"] and q.pending == 0
    s = q.stats
    assert (s["submitted"], s["routed_at_submit"], s["queued"], s["routed_from_queue"]) == (4, 2, 2, 2)
    assert s["max_pending"] == 2 and s["pending"] == 0 and q.rejected == 0


@pytest.mark.parametrize("pair", ROUTERS)
def test_queue_bound_rejects_and_counts(pair) -> None:
    q = AdmissionQueue(_small_plan(pair), capacity=2)
    # each node holds two requests of 50 tokens
    assert [q.submit(i, 50) for i in range(8)] == ["routed"] * 4 + ["queued"] * 2 + ["rejected"] * 2
    assert q.submit("huge", 81) == "rejected"  # above every prompt limit: never routable
    s = q.stats
    assert s["rejected_full"] == 2 and s["rejected_infeasible"] == 1 and q.rejected == 3
    assert s["pending"] == q.pending == 2
    with pytest.raises(ValueError, match="already waiting"):
        q.submit(4, 5)
    with pytest.raises(ValueError, match="already holds"):
        q.submit(0, 5)
    assert q.stats == s  # neither error counts as a submission
    assert q.retry() == []
    # 60 tokens: above node 1's prompt limit, and above node 0's whole KV: never routable
    q = AdmissionQueue(_small_plan(pair, capacity=50), capacity=2)
    assert q.submit("too big for KV", 60) == "rejected" and q.stats["rejected_infeasible"] == 1


@pytest.mark.parametrize("pair", ROUTERS)
def test_queue_on_the_ilp_plan_when_kv_is_full(pair) -> None:
    r = _router(pair)
    q = AdmissionQueue(r, capacity=1000)
    results = [q.submit(i, 2000) for i in range(250)]
    n_routed = results.count("routed")
    assert 0 < n_routed < 250 and results[n_routed:] == ["queued"] * (250 - n_routed)
    assert r.kv.bottleneck_usage() > 0.7
    drained = []
    for i in range(n_routed):
        drained += [rid for rid, _ in q.finish(i)]
    assert drained == list(range(n_routed, n_routed + len(drained))) and len(drained) > 0
    k = 0
    while k < len(drained):
        drained += [rid for rid, _ in q.finish(drained[k])]
        k += 1
    assert q.pending == 0 and drained == list(range(n_routed, 250))


@pytest.mark.parametrize("pair", ROUTERS)
def test_queue_submit_error_for_a_held_reservation_counts_nothing(pair) -> None:
    q = AdmissionQueue(_small_plan(pair), capacity=4)
    assert q.submit("a", 10) == "routed"
    before = q.stats
    # empty queue: refused before the router is asked
    with pytest.raises(ValueError, match="already holds"):
        q.submit("a", 10)
    assert q.stats == before and q.router.stats["routed"] == 1  # type: ignore[attr-defined]
    # non-empty queue
    assert [q.submit(i, 50) for i in range(4)] == ["routed"] * 3 + ["queued"]
    before = q.stats
    with pytest.raises(ValueError, match="already holds"):
        q.submit(0, 10)
    assert q.stats == before and before["submitted"] == 5


# ---- dead ends: greedy first, backtrack only when the greedy walk gets stuck ---------------------


def _dead_end_plan(pair, capacity=10**9):
    """The reviewer's reproduction: source->1 (flow 10) and source->2 (flow 5); 1->3 where node 3
    takes at most 100 prompt tokens; 2->4->sink. IWRR at the source prefers 1 (twice the flow)."""
    router_cls, kv_cls = pair
    stages = {1: (0, 1), 2: (0, 1), 3: (1, 2), 4: (1, 2)}
    kv = kv_cls(dict.fromkeys(stages, capacity), stages, kv_fill_limit=1.0, output_ratio=0.0)
    links = {
        SOURCE: [(1, 10.0), (2, 5.0)],
        1: [(3, 10.0)],
        2: [(4, 5.0)],
        3: [(SINK, 10.0)],
        4: [(SINK, 5.0)],
    }
    return router_cls(stages, links, {1: 4000, 2: 4000, 3: 100, 4: 4000}, kv, 2)


@pytest.mark.parametrize("pair", ROUTERS)
def test_router_backtracks_out_of_a_dead_end(pair) -> None:
    r = _dead_end_plan(pair)
    assert r.feasible(1000) and r.feasible(10)
    # greedy: source -> 1 (cost 100 < 200), then 1 has no way on (3 refuses 1000 tokens)
    assert r.route("a", 1000) == ((2, 0, 1), (4, 1, 2))
    assert r.stats == {"routed": 1, "failed": 0, "backtracks": 1}
    # only the route's hops are charged; the abandoned source->1 hop is rolled back exactly
    assert r.snapshot() == (
        (SOURCE, (0.0, 200.0)),
        (1, (0.0,)),
        (2, (200.0,)),
        (3, (0.0,)),
        (4, (200.0,)),
    )
    assert r.kv.reserved("a") == ((2, 1000), (4, 1000))
    # a small request takes the greedy way (no dead end, no backtracking)
    assert r.route("b", 10) == ((1, 0, 1), (3, 1, 2))
    assert r.stats == {"routed": 2, "failed": 0, "backtracks": 1}
    assert r.loads(SOURCE) == (1.0, 200.0)


@pytest.mark.parametrize("pair", ROUTERS)
def test_queue_is_not_blocked_by_a_greedy_dead_end(pair) -> None:
    # the reproduction: "a" used to be queued (feasible but unroutable by the greedy walk) and hold
    # "b" behind it for ever
    q = AdmissionQueue(_dead_end_plan(pair), capacity=10)
    assert q.submit("a", 1000) == "routed"
    assert q.submit("b", 10) == "routed"
    assert q.pending == 0 and q.retry() == []
    # the same dead end caused by KV use instead of a prompt limit: the only way through 2 is full,
    # so "c" waits (it is feasible) and "d" behind it; both go once the blocker finishes
    r = _dead_end_plan(pair, capacity=3000)
    q = AdmissionQueue(r, capacity=10)
    r.kv.reserve("blocker", [(4, 1)], 2500)
    assert q.submit("c", 1000) == "queued" and q.submit("d", 10) == "queued"
    assert q.retry() == []
    r.finish("blocker")
    assert q.retry() == [
        ("c", ((2, 0, 1), (4, 1, 2))),
        ("d", ((1, 0, 1), (3, 1, 2))),
    ]


@pytest.mark.parametrize("pair", ROUTERS)
def test_queue_rejects_at_once_what_no_path_can_take(pair) -> None:
    q = AdmissionQueue(_dead_end_plan(pair, capacity=3000), capacity=10)
    # 3001 tokens fit no node's KV (capacity 3000): infeasible, rejected rather than queued
    assert not q.router.feasible(3001) and q.router.feasible(3000)
    assert q.submit("big", 3001) == "rejected"
    assert q.stats["rejected_infeasible"] == 1 and q.stats["rejected_full"] == 0 and q.pending == 0


def _paths_exist(router, limits, n, fits) -> bool:
    """Oracle: is there any source -> sink path over the router's candidates whose every compute
    node takes n prompt tokens and passes ``fits(node, n)`` (exhaustive, no memo)?"""

    def ok(x) -> bool:
        for y, _ in router.candidates(x):
            if y == SINK or (n <= limits[y] and fits(y, n) and ok(y)):
                return True
        return False

    return ok(SOURCE)


def _greedy(router, limits, n):
    """Oracle: the old greedy walk (no backtracking) from the router's current loads: the hops
    ((x, j) pairs) of its route, or None when it gets stuck."""
    x, hops = SOURCE, []
    while True:
        best, best_cost = -1, 0.0
        loads = router.loads(x)
        for j, (y, w) in enumerate(router.candidates(x)):
            if y != SINK and (n > limits[y] or not router.kv.can_add(y, n)):
                continue
            cost = loads[j] + n / w
            if best < 0 or cost < best_cost:
                best, best_cost = j, cost
        if best < 0:
            return None
        hops.append((x, best))
        y = router.candidates(x)[best][0]
        if y == SINK:
            return hops
        x = y


def _make_router(pair, plan):
    stages, links, limits, cap, kv_kw, L, share = plan
    router_cls, kv_cls = pair
    return router_cls(stages, links, limits, kv_cls(cap, stages, **kv_kw), L, min_share=share)


@pytest.mark.parametrize("pair", ROUTERS)
@settings(max_examples=150, deadline=None)
@given(plan=random_plans_lazy(), lengths=st.lists(st.integers(1, 4000), min_size=1, max_size=12))
def test_route_succeeds_on_an_idle_cluster_iff_feasible(pair, plan, lengths) -> None:
    r = _make_router(pair, plan)
    limits = plan[2]
    for i, n in enumerate(lengths):
        assert len(r.kv) == 0  # idle: nothing reserved
        expect = _paths_exist(r, limits, n, r.kv.can_ever_add)
        assert r.feasible(n) == expect
        route = r.route(i, n)
        assert (route is not None) == expect
        if route is not None:
            _check_contiguous(r, route)
            r.finish(i)


@pytest.mark.parametrize("pair", ROUTERS)
@settings(max_examples=150, deadline=None)
@given(plan=random_plans_lazy(), data=st.data())
def test_route_is_greedy_first_and_backtracks_only_on_dead_ends(pair, plan, data) -> None:
    r = _make_router(pair, plan)
    limits = plan[2]
    live: list = []
    for rid in range(data.draw(st.integers(1, 40))):
        if live and data.draw(st.integers(0, 3)) == 0:
            r.finish(live.pop(data.draw(st.integers(0, len(live) - 1))))
            continue
        n = data.draw(st.one_of(st.integers(1, 300), st.integers(1, 4000)))
        greedy = _greedy(r, limits, n)
        exists = _paths_exist(r, limits, n, r.kv.can_add)
        loads, backtracks = dict(r.snapshot()), r.stats["backtracks"]
        route = r.route(rid, n)
        assert (route is not None) == exists  # complete: fails only when no path fits now
        after = dict(r.snapshot())
        if route is None:
            assert after == loads
            continue
        live.append(rid)
        if greedy is not None:
            # no dead end met: exactly the greedy route, no backtracking
            assert [r.candidates(x)[j][0] for x, j in greedy] == _hops(route)
            assert r.stats["backtracks"] == backtracks
        else:
            assert r.stats["backtracks"] > backtracks
        # only the route's hops are charged (the last one to the sink too), each once by n / flow
        prev = SOURCE
        for node in _hops(route):
            j = [y for y, _ in r.candidates(prev)].index(node)
            assert after[prev][j] == loads[prev][j] + n / r.candidates(prev)[j][1]
            loads[prev] = tuple(after[prev][k] if k == j else v for k, v in enumerate(loads[prev]))
            prev = node
        assert after == loads


# ==================================================================================================
# The twins agree exactly
# ==================================================================================================

_weights = st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False)
_work = st.one_of(st.integers(0, 4096), st.floats(0.0, 1e4, allow_nan=False))


@needs_c
@settings(max_examples=200)
@given(st.lists(_weights, min_size=1, max_size=12), st.data())
def test_iwrr_twins_agree(weights, data) -> None:
    assert IWRRC is not None
    c, p = IWRRC(weights), IWRRPy(weights)
    n = len(weights)
    ops = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from("cmadrs"),
                _work,
                st.integers(0, n - 1),
                st.lists(st.booleans(), min_size=n, max_size=n),
            ),
            max_size=80,
        )
    )
    for op, work, j, mask in ops:
        if op == "c":
            assert c.choose(work) == p.choose(work)
        elif op == "m":
            assert c.choose(work, mask) == p.choose(work, mask)
        elif op == "a":
            c.add(j, work)
            p.add(j, work)
        elif op == "d":
            c.undo(j, work)
            p.undo(j, work)
        elif op == "r":
            c.restore(j, p.load((j + 1) % n))
            p.restore(j, p.load((j + 1) % n))
        else:
            c.set_mask(mask)
            p.set_mask(mask)
        assert c.loads == p.loads
        assert c.argmin(work) == p.argmin(work)


@needs_c
@settings(max_examples=150)
@given(st.data())
def test_kv_twins_agree(data) -> None:
    nn = data.draw(st.integers(1, 6))
    L = data.draw(st.integers(1, 12))
    nodes = data.draw(st.lists(st.integers(0, 40), min_size=nn, max_size=nn, unique=True))
    layers = {}
    for u in nodes:
        a = data.draw(st.integers(0, L - 1))
        layers[u] = (a, data.draw(st.integers(a + 1, L)))
    cap = {u: data.draw(st.integers(0, 200_000)) for u in nodes}
    kw = {
        "kv_fill_limit": data.draw(st.floats(0.0, 1.0)),
        "output_ratio": data.draw(st.floats(0.0, 2.0)),
        "avg_output_len": data.draw(st.integers(0, 300)),
        "num_layers": L,
    }
    assert KVTrackerC is not None
    c, p = KVTrackerC(cap, layers, **kw), KVTrackerPy(cap, layers, **kw)
    live: list[int] = []
    for rid in range(data.draw(st.integers(0, 60))):
        n = data.draw(st.integers(0, 3000))
        if live and data.draw(st.booleans()):
            gone = live.pop(data.draw(st.integers(0, len(live) - 1)))
            c.release(gone)
            p.release(gone)
        else:
            picked = data.draw(st.lists(st.sampled_from(nodes), max_size=nn, unique=True))
            stages = [(u, data.draw(st.integers(1, layers[u][1] - layers[u][0]))) for u in picked]
            outcome: list[str | None] = []
            for kv in (c, p):
                try:
                    kv.reserve(rid, stages, n)
                    outcome.append(None)
                except ValueError as exc:
                    outcome.append(str(exc))
            assert outcome[0] == outcome[1]
            if outcome[0] is None:
                live.append(rid)
                assert c.reserved(rid) == p.reserved(rid)
        assert c.snapshot() == p.snapshot()
        assert c.bottleneck_usage() == p.bottleneck_usage()
        for u in nodes:
            assert c.can_add(u, n) == p.can_add(u, n)
            assert c.can_ever_add(u, n) == p.can_ever_add(u, n)
        assert c.expected_len(n) == p.expected_len(n)
    with pytest.raises(KeyError):
        c.release("nope")
    with pytest.raises(KeyError):
        p.release("nope")


def _check_contiguous(router, route) -> None:
    """A route is its compute stages, consecutive from layer 0 to L, over candidate links, and the
    last stage's node links to the sink (implicit)."""
    covered, prev = 0, SOURCE
    for node, start, end in route:
        assert node not in (SOURCE, SINK) and node in [y for y, _ in router.candidates(prev)]
        assert start == covered < end
        covered = end
        prev = node
    assert covered == router.num_layers
    assert SINK in [y for y, _ in router.candidates(prev)]


def _run_router_twins(c, p, data, max_ops: int, max_len: int) -> None:
    lengths = st.one_of(st.integers(1, 300), st.integers(1, max_len))
    live: list = []
    for rid in range(data.draw(st.integers(1, max_ops))):
        action = data.draw(st.sampled_from("rrrdf"))
        if action == "d" and live:
            route_c, route_p = live[data.draw(st.integers(0, len(live) - 1))][1:]
            # each twin gets its own route or the other's (equal tuples, distinct objects)
            c.on_decode(data.draw(st.sampled_from([route_c, route_p])))
            p.on_decode(data.draw(st.sampled_from([route_c, route_p])))
        elif action == "f" and live:
            gone = live.pop(data.draw(st.integers(0, len(live) - 1)))[0]
            c.finish(gone)
            p.finish(gone)
        else:
            n = data.draw(lengths)
            rc, rp = c.route(rid, n), p.route(rid, n)
            assert rc == rp
            assert c.feasible(n) == p.feasible(n)
            if rc is not None:
                assert p.feasible(n)  # a route found now is a path the static test must see
                _check_contiguous(p, rc)
                live.append((rid, rc, rp))
        assert c.snapshot() == p.snapshot()
        assert c.kv.snapshot() == p.kv.snapshot()
    assert c.stats == p.stats
    assert c.kv.bottleneck_usage() == p.kv.bottleneck_usage()


@needs_c
@settings(max_examples=40)
@given(st.floats(0.05, 1.0), st.floats(0.0, 3.0), st.data())
def test_router_twins_agree_on_the_ilp_plan(kv_fill_limit, ratio, data) -> None:
    c = _router((FlowRouterC, KVTrackerC), kv_fill_limit=kv_fill_limit, output_ratio=ratio)
    p = _router((FlowRouterPy, KVTrackerPy), kv_fill_limit=kv_fill_limit, output_ratio=ratio)
    _run_router_twins(c, p, data, max_ops=150, max_len=2200)


@st.composite
def random_plans(draw):
    """A random valid plan: a few pipelines cut into random stages plus stray nodes, every usable
    full or partial link kept with high probability, random flows, prompt limits and KV."""
    L = draw(st.integers(1, 10))
    ids = iter(draw(st.permutations(range(40))))
    stages: dict = {}
    for _ in range(draw(st.integers(1, 3))):
        cuts = sorted(draw(st.sets(st.integers(1, L - 1), max_size=3))) if L > 1 else []
        bounds = [0, *cuts, L]
        for a, b in itertools.pairwise(bounds):
            # sometimes start a node earlier than the cut: partial inference from its predecessor
            stages[next(ids)] = (draw(st.integers(max(0, a - 1), a)), b)
    for _ in range(draw(st.integers(0, 3))):
        a = draw(st.integers(0, L - 1))
        stages[next(ids)] = (a, draw(st.integers(a + 1, L)))
    # a zero flow one time in ten; small, medium and large flows otherwise
    flow = st.integers(0, 9).flatmap(
        lambda k: st.just(0.0) if k == 0 else st.floats(*[(1e-3, 1.0), (1.0, 100.0), (1e-3, 1e4)][k % 3])
    )
    keep = st.integers(0, 9)  # keep a usable link unless 0
    links: dict = {}
    for y, (a, _) in stages.items():
        if a == 0 and draw(keep) > 0:
            links.setdefault(SOURCE, []).append((y, draw(flow)))
    for x, (_, bx) in stages.items():
        for y, (a, b) in stages.items():
            if a <= bx < b and draw(keep) > 0:
                links.setdefault(x, []).append((y, draw(flow)))
        if bx == L and draw(keep) > 0:
            links.setdefault(x, []).append((SINK, draw(flow)))
    limits = {u: draw(st.one_of(st.integers(2000, 4000), st.integers(1, 4000))) for u in stages}
    cap = {u: draw(st.one_of(st.integers(50_000, 400_000), st.integers(0, 400_000))) for u in stages}
    kv_fill_limit = st.one_of(st.sampled_from([1.0, 0.9, 0.85]), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
    kv_kw = {
        "kv_fill_limit": draw(kv_fill_limit),
        "output_ratio": draw(st.floats(0.0, 2.0)),
        "avg_output_len": draw(st.integers(0, 300)),
        "num_layers": L,
    }
    share = draw(st.sampled_from([0.0, 0.05, 0.3]))
    return stages, links, limits, cap, kv_kw, L, share


@needs_c
@settings(max_examples=150)
@given(random_plans(), st.data())
def test_router_twins_agree_on_random_plans(plan, data) -> None:
    stages, links, limits, cap, kv_kw, L, share = plan
    assert FlowRouterC is not None and KVTrackerC is not None
    c = FlowRouterC(stages, links, limits, KVTrackerC(cap, stages, **kv_kw), L, min_share=share)
    p = FlowRouterPy(stages, links, limits, KVTrackerPy(cap, stages, **kv_kw), L, min_share=share)
    assert c.scheduling_nodes == p.scheduling_nodes
    assert all(c.candidates(x) == p.candidates(x) for x in p.scheduling_nodes)
    _run_router_twins(c, p, data, max_ops=60, max_len=3000)


# ==================================================================================================
# Baselines
# ==================================================================================================


def test_swarm_heap_order_and_ema_update() -> None:
    sw = SwarmPolicy([3, 5, SINK])
    assert sw.heap() == [(0.05, 0), (0.05, 1), (0.05, 2)]
    assert [sw.choose() for _ in range(3)] == [0, 1, 2]  # equal priorities: lowest index first
    assert sw.heap() == [(0.1, 0), (0.1, 1), (0.1, 2)]
    sw.observe(1, 1.0)
    assert sw.ema == (0.05, 0.8 * 1.0 + 0.2 * 0.05, 0.05)
    sw.observe(1, 0.5)
    assert sw.ema[1] == 0.8 * 0.5 + 0.2 * (0.8 * 1.0 + 0.2 * 0.05)
    # the observation affects later pushes only: 0 and 1 tie at 0.1, 0 goes first
    assert sw.choose() == 0 and sw.choose() == 1
    assert sw.heap()[-1] == (0.1 + sw.ema[1], 1)
    assert sw.choose(free=[False, False, False]) == 2  # Swarm assigns regardless of free links
    assert SwarmPolicy([]).choose() == -1
    with pytest.raises(IndexError):
        sw.observe(3, 1.0)


def test_swarm_prefers_fast_links() -> None:
    sw = SwarmPolicy(["a", "b"])
    counts: Counter[int] = Counter()
    for _ in range(400):
        i = sw.choose()
        counts[i] += 1
        sw.observe(i, 0.01 if i == 0 else 0.04)
    assert counts[0] > 3 * counts[1]


def test_random_policies_need_an_explicit_keyword_seed() -> None:
    for cls in (RandomPolicy, ShortestQueuePolicy):
        with pytest.raises(TypeError):
            cls([1, 2])  # no shared default stream (docs/original.md §12.3 item 19)
        with pytest.raises(TypeError):
            cls([1, 2], 5)  # keyword only
        assert cls([1, 2], seed=node_seed(5, 1)).out_links == (1, 2)


def test_node_seed_is_deterministic_and_distinct_per_node() -> None:
    # pinned values: no per-process hash() salt, the same on every platform and Python
    assert node_seed(0, 0) == 0xE828E28409BC59BD
    assert node_seed(2024, SOURCE) == 463551662138297902
    assert node_seed(7, 3) == node_seed(7, 3)
    seeds = {node_seed(7, u) for u in [*range(64), SOURCE, SINK]}
    assert len(seeds) == 66
    assert node_seed(7, 3) != node_seed(8, 3)
    assert node_seed(7, 3) != node_seed(3, 7)
    assert all(0 <= s < 2**64 for s in seeds)
    with pytest.raises(TypeError):
        node_seed(7, True)  # type: ignore[arg-type]
    # distinct nodes of one run draw distinct streams
    a, b = (RandomPolicy(range(6), seed=node_seed(11, u)) for u in (1, 2))
    assert [a.choose() for _ in range(30)] != [b.choose() for _ in range(30)]


def test_random_policy_is_seeded_and_uses_its_own_rng() -> None:
    state = random.getstate()
    a, b, other = (
        RandomPolicy(range(6), seed=7),
        RandomPolicy(range(6), seed=7),
        RandomPolicy(range(6), seed=8),
    )
    sa = [a.choose() for _ in range(50)]
    assert sa == [b.choose() for _ in range(50)]
    assert sa != [other.choose() for _ in range(50)]
    assert set(sa) == set(range(6))
    free = [False, True, False, True, False, False]
    assert {a.choose(free) for _ in range(50)} == {1, 3}
    assert a.choose([False] * 6) == -1
    assert random.getstate() == state


def test_shortest_queue_picks_the_minimum_and_breaks_ties_randomly() -> None:
    state = random.getstate()
    sq = ShortestQueuePolicy([4, 7, 9, 12], seed=1)
    q = {4: 3, 7: 1, 9: 1, 12: 5}
    picks = {sq.choose(None, q) for _ in range(60)}
    assert picks == {1, 2}
    assert {sq.choose(None, lambda y: q[y]) for _ in range(60)} == {1, 2}  # a callable works too
    assert sq.choose([True, False, True, True], q) == 2
    assert sq.choose([True, False, False, True], q) == -1  # shortest receivers busy: wait
    assert sq.choose() in range(4)
    assert random.getstate() == state
    same = ShortestQueuePolicy([4, 7, 9, 12], seed=1)
    again = ShortestQueuePolicy([4, 7, 9, 12], seed=1)
    assert [same.choose(None, q) for _ in range(30)] == [again.choose(None, q) for _ in range(30)]


def test_shortest_queue_scans_past_the_sink() -> None:
    # The original stopped at the first sink link, so node 3 (also empty) after it was never used.
    sq = ShortestQueuePolicy([5, SINK, 3], seed=node_seed(0, 7))
    assert {sq.choose(None, {5: 2, 3: 0}) for _ in range(60)} == {1, 2}
    with_sink: dict[NodeRef, int] = {5: 2, 3: 0, SINK: 4}
    assert {sq.choose(None, with_sink) for _ in range(20)} == {2}
