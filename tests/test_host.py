"""The coordinator (helix_async.host) with a recording transport, and one end-to-end run.

Token results are handed to the host by calling its transport handler at chosen virtual times;
expected messages, latencies and counters are worked out by hand.  The router is a hand-made
``FlowRouter`` over a 2-node chain whose KV expectation is exact (no expected output, fill limit
1): a query of ``n`` tokens reserves ``2 n`` entries on each node.  The last test runs three
queries through the whole simulator (``sim.simulation``) on a 2-node chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from helix_async.clock import LoopClock
from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES
from helix_async.cluster.spec import ClusterSpec, Link, Node
from helix_async.host import Host, Query
from helix_async.ids import SINK, SOURCE, NodeRef, Route
from helix_async.messages import Cancel, DecodeWork, Feedback, Heartbeat, PromptWork, TokenResult
from helix_async.placement import Placement
from helix_async.routing import FlowRouter, KVTracker
from helix_async.settings import WorkerSettings
from helix_async.transport import HOST
from helix_async.transport.memory import MemoryNetwork
from helix_async.vloop import VirtualTimeLoop
from helix_async.worker import BatchLimits, Worker
from sim.feeders import TraceFeeder
from sim.simulation import Simulation, SimulationSetup
from sim.workloads import TraceEntry

ROUTE: Route = ((0, 0, 2), (1, 2, 4))


class RecordingTransport:
    def __init__(self, clock: LoopClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, NodeRef, Any]] = []
        self.handler: Callable[[NodeRef, Any], None] | None = None
        self.closed = False

    @property
    def node(self) -> NodeRef:
        return SOURCE

    def set_handler(self, handler: Callable[[NodeRef, Any], None]) -> None:
        self.handler = handler

    def send(self, dest: NodeRef, msg: Any) -> None:
        self.sent.append((self.clock.now(), dest, msg))

    def link_idle(self, dest: NodeRef) -> bool:
        return True

    def set_idle_handler(self, handler: Callable[[NodeRef], None]) -> None:
        pass

    async def close(self) -> None:
        self.closed = True




def chain_router(kv_entries: int = 20) -> Any:
    """Source -> 0 [0, 2) -> 1 [2, 4) -> sink; ``kv_entries`` on each node."""
    kv = KVTracker(
        {0: kv_entries, 1: kv_entries},
        {0: (0, 2), 1: (2, 4)},
        kv_fill_limit=1.0,
        output_ratio=0.0,
        avg_output_len=0,
        num_layers=4,
    )
    links: dict[NodeRef, list[tuple[NodeRef, float]]] = {SOURCE: [(0, 1.0)], 0: [(1, 1.0)], 1: [(SINK, 1.0)]}
    return FlowRouter({0: (0, 2), 1: (2, 4)}, links, {0: 1000, 1: 1000}, kv, 4)


class Coordinator:
    def __init__(self, loop: VirtualTimeLoop, **kw: Any) -> None:
        self.loop = loop
        self.clock = LoopClock(loop)
        self.tp = RecordingTransport(self.clock)
        self.host = Host(self.clock, self.tp, **kw)
        self.host.start()
        self.prompts_done: list[tuple[float, int]] = []
        self.queries_done: list[tuple[float, int]] = []
        self.rejected: list[tuple[float, int]] = []
        self.host.on_prompt_done = lambda q: self.prompts_done.append((self.clock.now(), q.qid))
        self.host.on_query_done = lambda q: self.queries_done.append((self.clock.now(), q.qid))
        self.host.on_reject = lambda q: self.rejected.append((self.clock.now(), q.qid))

    def submit(self, t: float, qid: int, n: int, m: int) -> Query | None:
        self.loop.run_until(t)
        return self.host.submit(qid, n, m)

    def token(self, t: float, rid: int, route: Route = (), sender: NodeRef = 1) -> None:
        self.loop.run_until(t)
        assert self.tp.handler is not None
        self.tp.handler(
            sender,
            TokenResult(request_id=rid, token_id=0, context_len=0, finished=False, sent_at=t, route=route),
        )


def prompt_msg(qid: int, n: int, max_tokens: int, t: float, route: Route = ROUTE) -> PromptWork:
    return PromptWork(
        request_id=qid,
        query_id=qid,
        route=route,
        stage=0,
        num_tokens=n,
        token_ids=(),
        max_tokens=max_tokens,
        sent_at=t,
        payload_bytes=4 * n,
    )


def decode_msg(qid: int, ctx: int, t: float, route: Route = ROUTE) -> DecodeWork:
    return DecodeWork(
        request_id=qid, route=route, stage=0, context_len=ctx, token_id=-1, sent_at=t, payload_bytes=4
    )


def test_needs_exactly_one_of_router_and_policy(loop: VirtualTimeLoop) -> None:
    clock = LoopClock(loop)
    tp = RecordingTransport(clock)
    with pytest.raises(ValueError, match="exactly one"):
        Host(clock, tp)
    with pytest.raises(ValueError, match="exactly one"):
        Host(clock, tp, router=chain_router(), policy=object())


# --------------------------------------------------------------------------------------------------
# MaxFlow: admission, the query lifecycle, token accounting
# --------------------------------------------------------------------------------------------------


def test_query_lifecycle_default_accounting(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router())
    router = c.host.router
    q = c.submit(1.0, 0, 6, 3)
    assert q is not None and q.route == ROUTE and q.admitted_at == 1.0
    # prompt + (m - 1) = 2 decodes; the prompt asks for m output tokens
    assert c.tp.sent == [(1.0, 0, prompt_msg(0, 6, 3, 1.0))]
    assert router.kv.available(0) == 8 and router.kv.available(1) == 8  # 20 - 6 x 2 layers
    assert (c.host.active, c.host.waiting) == (1, 0)
    c.token(2.5, 0)
    assert c.tp.sent[1] == (2.5, 0, decode_msg(0, 7, 2.5))  # context n + 1, same route
    assert c.prompts_done == [(2.5, 0)]
    c.token(3.0, 0)
    assert c.tp.sent[2] == (3.0, 0, decode_msg(0, 8, 3.0))
    c.token(4.0, 0)
    assert len(c.tp.sent) == 3  # no third decode
    assert c.queries_done == [(4.0, 0)]
    assert router.kv.available(0) == 20 and router.kv.available(1) == 20  # released
    h = c.host
    assert (h.active, h.stats.submitted, h.stats.admitted, h.stats.finished) == (0, 1, 1, 1)
    assert list(h.prompt_done) == [2.5] and list(h.prompt_latency) == [1.5]
    assert list(h.decode_done) == [3.0, 4.0] and list(h.decode_latency) == [0.5, 1.0]
    assert list(h.tokens_done) == [2.5, 3.0, 4.0] and list(h.tokens_count) == [6, 1, 1]
    assert h.query_records == [(0, 1.0, 2.5, 4.0, 6, 3)]
    assert (q.first_token_at, q.finished_at, q.iterations) == (2.5, 4.0, 3)
    # IWRR loads: the prompt charged 6 / flow on each hop, each decode 1 / flow
    assert router.loads(SOURCE) == (8.0,) and router.loads(0) == (8.0,) and router.loads(1) == (8.0,)


def test_query_lifecycle_compat_accounting(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(), compat=True)
    c.submit(0.0, 0, 6, 3)
    assert c.tp.sent == [(0.0, 0, prompt_msg(0, 6, 4, 0.0))]  # m decodes follow: max_tokens m + 1
    for i, t in enumerate([1.0, 2.0, 3.0]):
        c.token(t, 0)
        assert c.tp.sent[-1] == (t, 0, decode_msg(0, 7 + i, t))
    c.token(4.0, 0)
    assert len(c.tp.sent) == 4
    assert c.queries_done == [(4.0, 0)]
    assert list(c.host.tokens_count) == [6, 1, 1, 1]
    assert list(c.host.decode_latency) == [1.0, 1.0, 1.0]


def test_single_output_token_finishes_at_the_prompt(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router())
    c.submit(0.0, 0, 3, 1)
    assert c.tp.sent == [(0.0, 0, prompt_msg(0, 3, 1, 0.0))]
    c.token(0.75, 0)
    assert len(c.tp.sent) == 1
    assert c.prompts_done == [(0.75, 0)] and c.queries_done == [(0.75, 0)]
    assert list(c.host.tokens_count) == [3] and list(c.host.decode_done) == []


def test_admission_queue_is_fifo_and_retried_when_a_query_finishes(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(20))
    c.submit(1.0, 0, 6, 2)  # 12 of 20 entries per node
    q1 = c.submit(1.5, 1, 6, 2)  # 12 more do not fit: waits
    q2 = c.submit(2.0, 2, 1, 2)  # 2 would fit, but nobody overtakes a waiting query
    assert q1 is not None and q2 is not None and q1.route is None
    h = c.host
    assert (h.waiting, h.active, h.stats.admission_waits, h.stats.would_abort) == (2, 1, 2, 0)
    assert [d for _, d, _ in c.tp.sent] == [0]
    c.token(3.0, 0)  # first token of 0
    c.token(4.0, 0)  # 0 finishes: 1 and then 2 are admitted
    assert c.tp.sent[2:] == [(4.0, 0, prompt_msg(1, 6, 2, 4.0)), (4.0, 0, prompt_msg(2, 1, 2, 4.0))]
    assert (h.waiting, h.active, h.stats.admitted) == (0, 2, 3)
    assert q1.admitted_at == 4.0
    assert h.router.kv.available(0) == 20 - 12 - 2
    c.token(5.0, 1)
    # the prompt latency counts the wait for admission: from arrival (1.5), not admission
    assert list(h.prompt_latency) == [2.0, 3.5]


def test_admission_follows_priority_then_arrival(loop: VirtualTimeLoop) -> None:
    """A more urgent query (a lower number) is admitted before less urgent ones that waited longer,
    and is not held behind them when it fits; within a priority, first come first served."""
    c = Coordinator(loop, router=chain_router(20))
    h = c.host
    h.submit(0, 6, 2)  # 12 of 20 entries per node
    low = h.submit(1, 6, 2, priority=5)  # does not fit: waits
    normal = h.submit(2, 6, 2)  # waits too: it does not fit either
    urgent_small = h.submit(3, 1, 2, priority=-1)  # 2 entries fit: nothing as urgent waits, so it goes at once
    urgent = h.submit(4, 6, 2, priority=-1)  # does not fit: waits, ahead of the others
    later_normal = h.submit(5, 1, 2)  # would fit, but a query of its own priority waits: it waits
    assert None not in (low, normal, urgent_small, urgent, later_normal)
    assert urgent_small is not None and urgent_small.route is not None
    assert [q.qid for q in h._waiting] == [4, 2, 5, 1]
    assert (h.waiting, h.active) == (4, 2)
    c.token(1.0, 0)
    c.token(2.0, 0)  # 0 finishes: 12 entries free, 6 held by query 3 -> the urgent 4 goes first
    assert [q.qid for q in h._waiting] == [2, 5, 1] and urgent is not None and urgent.admitted_at == 2.0
    c.token(3.0, 3)
    c.token(4.0, 3)  # 3 finishes: 2 free entries more, not enough for 2 (12): all still wait
    assert [q.qid for q in h._waiting] == [2, 5, 1]
    c.token(5.0, 4)
    c.token(6.0, 4)  # 4 finishes: 2 (12) then 5 (2) fit; 1 (12) does not
    assert [q.qid for q in h._waiting] == [1]
    assert h.cancel(1) and h.waiting == 0 and not h._waiting.waiting_before(10**6)


def test_priority_is_an_int32_and_cancelling_the_head_lets_the_next_in(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(20))
    h = c.host
    with pytest.raises(ValueError, match="priority must be an int32"):
        h.submit(9, 1, 2, priority=2**31)
    h.submit(0, 6, 2)  # 12 of 20 entries
    big = h.submit(1, 6, 2, priority=-1)  # does not fit: waits
    small = h.submit(2, 1, 2, priority=-1)  # would fit, but waits behind the urgent head
    assert big is not None and small is not None and small.route is None
    assert h.cancel(1)  # the head leaves: the query behind it fits, and goes now
    assert small.route is not None and h.waiting == 0


def test_admission_queue_orders_by_priority_then_arrival() -> None:
    from helix_async.host import AdmissionQueue

    aq = AdmissionQueue()
    qs = [Query(i, 1, 1, 0.0, p) for i, p in enumerate([0, 3, -2, 0, 3, -2])]
    for q in qs:
        aq.append(q)
    assert [q.qid for q in aq] == [2, 5, 0, 3, 1, 4] and len(aq) == 6
    assert aq.waiting_before(-2) and not aq.waiting_before(-3)
    assert aq.remove(qs[5]) and not aq.remove(qs[5])
    assert aq.head() is qs[2] and aq.pop_head() is qs[2]
    assert not aq.waiting_before(-1) and aq.waiting_before(0)
    assert [q.qid for q in aq.clear()] == [0, 3, 1, 4] and not aq and len(aq) == 0


def test_compat_offline_drops_what_it_cannot_place(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(20), compat=True, drop_rejected=True)
    c.submit(0.0, 0, 6, 2)
    assert c.submit(0.5, 1, 6, 2) is None
    h = c.host
    assert (h.stats.rejected, h.stats.submitted, h.stats.admitted, h.waiting) == (1, 2, 1, 0)
    assert c.rejected == [(0.5, 1)]
    c.token(1.0, 0)
    c.token(2.0, 0)
    c.token(3.0, 0)  # compat: 2 decodes after the prompt
    assert c.queries_done == [(3.0, 0)]
    assert len(c.tp.sent) == 3  # the dropped query is never retried


def test_compat_online_waits_and_counts_where_the_original_aborted(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(20), compat=True)
    c.submit(0.0, 0, 6, 2)
    assert c.submit(0.5, 1, 6, 2) is not None
    assert (c.host.stats.would_abort, c.host.stats.admission_waits, c.host.waiting) == (1, 1, 1)


def test_admission_capacity_bounds_the_queue(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(20), admission_capacity=1)
    c.submit(0.0, 0, 6, 2)
    assert c.submit(0.0, 1, 6, 2) is not None
    assert c.submit(0.0, 2, 6, 2) is None
    assert (c.host.waiting, c.host.stats.rejected) == (1, 1)


def test_duplicate_active_query_is_refused(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router())
    c.submit(0.0, 0, 2, 2)
    with pytest.raises(ValueError, match="query 0 is already active"):
        c.submit(0.0, 0, 2, 2)


def test_unexpected_messages_are_counted(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router())
    c.token(1.0, 42)  # unknown request
    assert c.host.stats.bad_messages == 1
    assert c.tp.handler is not None
    c.tp.handler(0, Heartbeat(node_id=0, seq=1, now=0.0))
    c.tp.handler(0, prompt_msg(3, 2, 2, 0.0))
    assert c.host.stats.bad_messages == 3
    c.tp.handler(0, Feedback(request_id=0, node_id=0, delay=0.5, sent_at=0.0))  # MaxFlow: ignored
    assert c.host.stats.bad_messages == 3
    c.submit(2.0, 0, 2, 1)
    c.token(3.0, 0)
    c.token(4.0, 0)  # after the query finished
    assert c.host.stats.bad_messages == 4
    assert c.host.stats.finished == 1
    assert c.host.kv_bottleneck() == 0.0


def test_kv_bottleneck_reads_the_router(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(20))
    c.submit(0.0, 0, 5, 2)
    assert c.host.kv_bottleneck() == 0.5  # 10 of 20 entries on every layer's node


# --------------------------------------------------------------------------------------------------
# Per-hop scheduling: the host picks the first hop only
# --------------------------------------------------------------------------------------------------


class StubPolicy:
    def __init__(self, choices: Sequence[int]) -> None:
        self.choices = list(choices)
        self.observed: list[tuple[int, float]] = []

    def choose(self, free: Sequence[bool] | None = None, queue_len: Any = None) -> int:
        return self.choices.pop(0)

    def observe(self, link: int, delta_t: float) -> None:
        self.observed.append((link, delta_t))


def test_per_hop_first_hop_and_route_from_the_last_stage(loop: VirtualTimeLoop) -> None:
    pol = StubPolicy([1])
    c = Coordinator(loop, policy=pol, first_hops=[(0, 0, 2), (2, 0, 3)])
    c.submit(0.0, 7, 4, 2)
    assert c.tp.sent == [(0.0, 2, prompt_msg(7, 4, 2, 0.0, route=((2, 0, 3),)))]
    full: Route = ((2, 0, 3), (3, 3, 4))
    c.token(1.0, 7, route=full, sender=3)  # the last stage fills in the route the prompt took
    assert c.tp.sent[1] == (1.0, 2, decode_msg(7, 5, 1.0, route=full))
    assert c.host.kv_bottleneck() == 0.0
    c.token(2.0, 7, route=full, sender=3)
    assert c.queries_done == [(2.0, 7)]
    assert c.tp.handler is not None
    c.tp.handler(2, Feedback(request_id=7, node_id=2, delay=0.25, sent_at=1.0))
    c.tp.handler(3, Feedback(request_id=7, node_id=3, delay=0.25, sent_at=1.0))  # not a first hop
    assert pol.observed == [(1, 0.25)]
    assert c.host.stats.bad_messages == 0


# --------------------------------------------------------------------------------------------------
# End to end: three queries through the simulator on a 2-node chain
# --------------------------------------------------------------------------------------------------

TRACE = [TraceEntry(0.0, 100, 5), TraceEntry(0.5, 200, 3), TraceEntry(1.0, 50, 1)]


def chain_placement() -> Placement:
    # llama1-30b (60 layers) on two T4x4 nodes holding their profiled maximum, 30 layers each
    t4x4 = DEFAULT_MACHINE_TYPES["T4x4"]
    spec = ClusterSpec(
        "chain2",
        {"T4x4": t4x4},
        (Node(0, "T4x4"), Node(1, "T4x4")),
        (
            Link(SOURCE, 0, 1e9, 0.001, False),
            Link(0, 1, 1e9, 0.001, True),
            Link(1, SINK, 1e9, 0.001, False),
        ),
    )
    return Placement.from_layers(spec, "llama1-30b", {0: (0, 30), 1: (30, 60)})


@pytest.mark.parametrize("scheduler", ["maxflow", "swarm", "random", "shortest-queue"])
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_end_to_end_chain(compat: bool, scheduler: str) -> None:
    p = chain_placement()
    assert p.links == ((SOURCE, 0), (0, 1), (1, SINK))
    sim = Simulation(SimulationSetup(p, scheduler=scheduler, compat=compat))
    try:
        assert sim.t0 == 31.0  # ceil(30 layers x 1e9 B / 1e9 B/s) + 1
        feeder = TraceFeeder(sim, TRACE)
        feeder.install()
        sim.run_until(sim.t0 + 600.0)
        h = sim.host
        assert feeder.done and feeder.finished == 3
        assert sim.loop.time() < sim.t0 + 600.0  # stopped by the feeder, not the deadline
        assert (h.stats.submitted, h.stats.admitted, h.stats.finished, h.stats.rejected) == (3, 3, 3, 0)
        assert h.stats.bad_messages == 0 and h.active == 0 and h.waiting == 0
        n_sum = 100 + 200 + 50
        decodes = (5 + 3 + 1) if compat else (4 + 2 + 0)
        assert sum(h.tokens_count) == n_sum + decodes
        assert len(h.prompt_done) == 3 and len(h.decode_done) == decodes
        assert sorted(r[0] for r in h.query_records) == [0, 1, 2]
        for qid, arrived, first, done, n, m in h.query_records:
            assert (arrived, n, m) == (sim.t0, TRACE[qid][1], TRACE[qid][2])
            assert arrived < first <= done
        assert all(lat > 0.0 for lat in h.prompt_latency)
        for w in sim.workers.values():
            assert w.kv_used == 0 and w.queued == 0
            assert w.stats.bad_messages == 0 and w.stats.kv_overflows == 0
        assert sim.workers[0].stats.prompt_tokens == n_sum * 30
        assert sim.network.dropped == 0
        if sim.host.router is not None:
            assert len(sim.host.router.kv) == 0  # every reservation released
    finally:
        sim.close()


# --------------------------------------------------------------------------------------------------
# Host + workers + simulated network, with exact times
# --------------------------------------------------------------------------------------------------

STEP = 1.0
ACT = 8


class StubExecutor:
    """Finishes every batch STEP seconds after it starts."""

    def __init__(self, clock: LoopClock) -> None:
        self.clock = clock

    def run(self, batch: Any, done: Callable[[Any], None]) -> None:
        self.clock.call_at(self.clock.now() + STEP, done, batch)

    def duration(self, batch: Any) -> float:
        return STEP


def payload(src: NodeRef, dst: NodeRef, msg: Any) -> float:
    """Work messages cost their modelled payload; token results nothing (latency only)."""
    return float(getattr(msg, "payload_bytes", 0))


@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_host_workers_and_network_exact_times(loop: VirtualTimeLoop, compat: bool) -> None:
    big = 2.0**40
    t = DEFAULT_MACHINE_TYPES["A100"]
    spec = ClusterSpec(
        "exact",
        {"A100": t},
        (Node(0, "A100"), Node(1, "A100")),
        (
            Link(SOURCE, 0, 1024.0, 0.25, False),
            Link(0, 1, 1024.0, 0.25, True),
            Link(1, SINK, 1024.0, 0.25, False),
        ),
        coordinator_nic_in=big,
        coordinator_nic_out=big,
    )
    assert t.nic_in >= 1024.0 and t.nic_out >= 1024.0  # the links are the bottleneck
    clock = LoopClock(loop)
    net = MemoryNetwork(clock, spec, [(SOURCE, 0), (0, 1), (1, SINK)], payload)
    workers = []
    for i, rng in [(0, (0, 2)), (1, (2, 4))]:
        w = Worker(
            i,
            clock,
            net.endpoint(i),
            StubExecutor(clock),
            WorkerSettings(layers=rng, num_layers=4, limits=BatchLimits(8, 10_000, 8, 100_000), kv_capacity=100_000,
                           activation_bytes=ACT, compat=compat),
        )
        w.start()
        workers.append(w)
    host = Host(clock, net.endpoint(HOST), router=chain_router(1000), compat=compat)
    host.start()
    loop.run_until(1.0)
    host.submit(0, 64, 2)
    loop.run_until(100.0)
    # prompt: 64 x 4 B at 1024 B/s + 0.25 -> node 0 at 1.5; 2 layers -> 3.5; 64 x 8 B + 0.25 -> node 1
    # at 4.25; 2 layers -> 6.25; the token (0 B) + 0.25 -> host at 6.5
    assert list(host.prompt_done) == [6.5] and list(host.prompt_latency) == [5.5]
    # decode: 4 B + 0.25, 2 layers, 8 B + 0.25, 2 layers, + 0.25
    lat = 4 / 1024 + 0.25 + 2.0 + 8 / 1024 + 0.25 + 2.0 + 0.25
    assert lat == 4.76171875
    decodes = [6.5 + lat, 6.5 + 2 * lat] if compat else [6.5 + lat]
    assert list(host.decode_done) == decodes
    assert list(host.decode_latency) == [lat] * len(decodes)
    assert host.stats.finished == 1 and host.active == 0
    assert list(host.tokens_count) == [64] + [1] * len(decodes)
    assert [w.kv_used for w in workers] == [0, 0]
    assert [w.stats.kv_peak for w in workers] == ([132, 132] if compat else [130, 130])
    assert len(host.router.kv) == 0
    st = {(d["src"], d["dst"]): d["messages"] for d in net.link_stats(1.0)}
    assert st == {(SOURCE, 0): 1 + len(decodes), (0, 1): 1 + len(decodes), (1, SINK): 1 + len(decodes)}


# --------------------------------------------------------------------------------------------------
# Problems found in review, now fixed (kept as regression tests)
# --------------------------------------------------------------------------------------------------


def test_a_query_that_can_never_be_placed_does_not_block_the_queue(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(100_000))
    assert not c.host.router.feasible(2000)  # above both nodes' prompt limit (1000)
    c.submit(0.0, 0, 2000, 2)
    c.submit(1.0, 1, 10, 2)
    assert [(d, m.request_id) for _, d, m in c.tp.sent] == [(0, 1)]
    assert c.host.stats.rejected == 1


def test_shortest_queue_policy_sees_free_links_and_queue_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    from helix_async.routing.baselines import ShortestQueuePolicy

    calls: list[tuple[Any, Any]] = []
    original = ShortestQueuePolicy.choose

    def spy(self: ShortestQueuePolicy, free: Any = None, queue_len: Any = None) -> int:
        calls.append((free, queue_len))
        return original(self, free, queue_len)

    monkeypatch.setattr(ShortestQueuePolicy, "choose", spy)
    sim = Simulation(SimulationSetup(chain_placement(), scheduler="shortest-queue"))
    try:
        feeder = TraceFeeder(sim, TRACE)
        feeder.install()
        sim.run_until(sim.t0 + 600.0)
        assert feeder.done
        assert calls
        assert all(free is not None and queue_len is not None for free, queue_len in calls)
    finally:
        sim.close()


def test_cancel_withdraws_a_waiting_query_and_ends_an_active_one(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=chain_router(20))
    failed: list[tuple[int, str]] = []
    c.host.on_fail = lambda q: failed.append((q.qid, q.error))
    c.submit(1.0, 0, 6, 4)
    c.submit(1.5, 1, 6, 2)  # waits
    h = c.host
    assert h.is_waiting(1) and not h.is_active(1)
    assert h.cancel(1, "client left")
    assert (h.waiting, h.stats.cancelled, h.stats.failed) == (0, 1, 0)
    assert not h.cancel(1) and not h.cancel(99)
    c.token(2.0, 0)  # its prompt is done; decodes go on
    assert h.router.kv.available(0) == 20 - 12
    assert h.cancel(0, "stop string")
    # the workers on its route are told, its KV expectation is released, it counts as cancelled
    cancels = [(d, m) for _, d, m in c.tp.sent if isinstance(m, Cancel)]
    assert sorted(d for d, _ in cancels) == [0, 1] and all(m.reason == "stop string" for _, m in cancels)
    assert h.router.kv.available(0) == 20
    assert (h.active, h.stats.cancelled, h.stats.failed) == (0, 2, 0)
    assert failed == [(0, "stop string")]


def diamond_router(lost: frozenset[int] = frozenset(), kv_entries: int = 100) -> Any:
    """Source -> {0, 2} [0, 2) -> {1, 3} [2, 4) -> sink, every link flow 1, minus the ``lost`` nodes."""
    stages = {n: r for n, r in {0: (0, 2), 1: (2, 4), 2: (0, 2), 3: (2, 4)}.items() if n not in lost}
    kv = KVTracker(dict.fromkeys(stages, kv_entries), stages, kv_fill_limit=1.0, output_ratio=0.0, avg_output_len=0,
                   num_layers=4)
    links: dict[NodeRef, list[tuple[NodeRef, float]]] = {
        SOURCE: [(y, 1.0) for y in (0, 2) if y in stages],
        **{x: [(y, 1.0) for y in (1, 3) if y in stages] for x in (0, 2) if x in stages},
        **{y: [(SINK, 1.0)] for y in (1, 3) if y in stages},
    }
    return FlowRouter(stages, links, dict.fromkeys(stages, 1000), kv, 4)


def test_replan_migrates_queries_that_crossed_a_lost_node_and_keeps_the_rest(loop: VirtualTimeLoop) -> None:
    from helix_async.host import MIGRATED_RID_BASE

    c = Coordinator(loop, router=diamond_router())
    h = c.host
    qs = [h.submit(0, 4, 4, token_ids=(5, 6, 7, 8)), h.submit(1, 3, 3, token_ids=(9, 10, 11)),
          h.submit(2, 3, 3, token_ids=(1, 2, 3))]
    routes = [q.route if q is not None else None for q in qs]
    # IWRR spreads them: 0 -> 1, 2 -> 1, then 2 -> 3
    assert routes == [((0, 0, 2), (1, 2, 4)), ((2, 0, 2), (1, 2, 4)), ((2, 0, 2), (3, 2, 4))]
    hit, other, kept = qs
    assert hit is not None and other is not None and kept is not None
    assert c.tp.handler is not None
    for q, sender, tok in ((hit, 1, 41), (kept, 3, 42)):  # two have their first token
        c.tp.handler(sender, TokenResult(request_id=q.qid, token_id=tok, context_len=0, finished=False, sent_at=0.0))
    c.tp.sent.clear()
    loop.run_until(5.0)
    old_rid, old_route = hit.rid, hit.route
    assert old_route is not None
    moved = h.replan(diamond_router(frozenset({1})), {1})
    assert moved == [hit.qid, other.qid] and h.stats.migrated == 2 and hit.migrations == 1
    # the surviving node of its old route drops it (old wire id); it is routed again as a prompt of
    # its context so far (input + the token produced), under a fresh wire id, and the rest of its tokens
    cancels = [(d, m) for _, d, m in c.tp.sent if isinstance(m, Cancel)]
    reason = "migrating: its route lost a node"
    assert cancels == [(0, Cancel(request_id=old_rid, reason=reason)), (2, Cancel(request_id=other.qid, reason=reason))]
    prompts = [m for _, _, m in c.tp.sent if isinstance(m, PromptWork)]
    assert [m.query_id for m in prompts] == [hit.qid, other.qid]
    assert prompts[1].num_tokens == 3 and prompts[1].token_ids == (9, 10, 11) and prompts[1].max_tokens == 3
    p = prompts[0]
    assert p.request_id == hit.rid >= MIGRATED_RID_BASE and p.query_id == hit.qid
    assert all(st[0] != 1 for st in p.route) and p.route == hit.route
    assert p.num_tokens == hit.input_len + 1 and p.token_ids == hit.token_ids + (41,)
    assert p.max_tokens == hit.output_len - 1
    # the query that kept its route holds its KV expectation in the new router
    assert kept.qid in h.router.kv and hit.qid in h.router.kv
    # a result of the old route is stale: dropped, counted, nothing sent
    c.tp.sent.clear()
    c.tp.handler(1, TokenResult(request_id=old_rid, token_id=99, context_len=0, finished=False, sent_at=0.0))
    assert h.stats.stale_results == 1 and c.tp.sent == [] and hit.tokens == [41]
    # the new route's results continue the query to its end
    loop.run_until(6.0)
    for tok in (43, 44, 45):
        c.tp.handler(3, TokenResult(request_id=hit.rid, token_id=tok, context_len=0, finished=False, sent_at=0.0))
    assert hit.tokens == [41, 43, 44, 45] and not h.is_active(hit.qid)
    assert h.resumed == [(hit.qid, 5.0, 6.0)]
    decodes = [m for _, _, m in c.tp.sent if isinstance(m, DecodeWork)]
    assert [m.request_id for m in decodes] == [hit.rid, hit.rid] and [m.token_id for m in decodes] == [43, 44]
    assert hit.qid not in h.router.kv and other.qid in h.router.kv


def test_replan_without_a_route_stops_admission_until_coverage_returns(loop: VirtualTimeLoop) -> None:
    c = Coordinator(loop, router=diamond_router())
    h = c.host
    q0 = h.submit(0, 4, 3)
    assert q0 is not None and q0.route is not None
    moved = h.replan(None, {q0.route[0][0], 1, 3}, "layers [2, 4) have no live node")
    assert moved == [0] and h.admission_stopped == "layers [2, 4) have no live node"
    q1 = h.submit(1, 2, 2)  # waits (it would have been refused as infeasible by a router)
    assert q1 is not None and q1.route is None and h.waiting == 1 and h.migrating == 1
    c.tp.sent.clear()
    h.replan(diamond_router(frozenset({0})), ())
    assert h.admission_stopped == "" and h.waiting == 0 and h.migrating == 0
    prompts = [m for _, _, m in c.tp.sent if isinstance(m, PromptWork)]
    assert [m.query_id for m in prompts] == [0, 1]  # the migration first, then the waiting query
    assert prompts[0].num_tokens == 4 and prompts[0].max_tokens == 3  # no token yet: the whole query again
    assert h.cancel(1) and h.fail(0, "test") and 0 not in h.router.kv
