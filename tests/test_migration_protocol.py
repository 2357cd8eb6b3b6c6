"""Live KV migration of one (request, stage) (docs/migration.md): the protocol end to end.

A host and four workers (a stub executor: every batch takes STEP s of virtual time) on an
in-memory network: node 0 holds layers [0, 2), nodes 1 and 3 both [2, 4), node 2 [4, 6); plan
links SOURCE->0, 0->1, 0->3, 1->2, 3->2, 2->SINK, and the cluster link 1<->3 added for the copy.
Queries go through node 1 and their stage 1 moves to node 3 while they decode. Each case runs
with the pure-Python worker and the compiled one. Loops are bounded in virtual time, never slept.
Last, the simulator with the rescheduling policy on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from helix_async.clock import LoopClock
from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES
from helix_async.cluster.spec import ClusterSpec, Link, Node
from helix_async.host import Host, LiveMove
from helix_async.ids import SINK, SOURCE, NodeRef
from helix_async.messages import MigrateKV, MigrateState, MigrateStatus
from helix_async.routing import FlowRouter, KVTracker
from helix_async.settings import WorkerSettings
from helix_async.transport import HOST
from helix_async.transport.memory import MemoryNetwork
from helix_async.vloop import VirtualTimeLoop
from helix_async.worker import BatchLimits, Worker, WorkerPy

STEP = 0.01  # seconds every stub batch takes
LAYERS = {0: (0, 2), 1: (2, 4), 3: (2, 4), 2: (4, 6)}
PLAN = [(SOURCE, 0), (0, 1), (0, 3), (1, 2), (3, 2), (2, SINK)]
CLASSES = pytest.mark.parametrize("cls", [WorkerPy, Worker], ids=["pure", "compiled"])


class StubExecutor:
    """Completes each batch STEP s after it starts; records (start, layer) of each batch."""

    def __init__(self, clock: LoopClock) -> None:
        self.clock = clock
        self.batches: list[tuple[float, int]] = []

    def run(self, batch: Any, done: Callable[[Any], None]) -> None:
        self.batches.append((self.clock.now(), batch.layer))
        self.clock.call_at(self.clock.now() + STEP, done, batch)

    def duration(self, batch: Any) -> float:
        return STEP


def payload(src: NodeRef, dst: NodeRef, msg: Any) -> float:
    return float(getattr(msg, "payload_bytes", 0))


class Cluster:
    """The four-node cluster of the module doc, with its host."""

    def __init__(self, cls: type, *, kv3: int = 100_000, timeout: float = 30.0, chunk: int = 8, tail: int = 2) -> None:
        self.loop = VirtualTimeLoop()
        self.clock = LoopClock(self.loop)
        t = DEFAULT_MACHINE_TYPES["A100"]
        links = [Link(a, b, 1e6, 0.001, isinstance(a, int) and isinstance(b, int)) for a, b in PLAN]
        links.append(Link(1, 3, 1e6, 0.001, True))
        spec = ClusterSpec("mig", {"A100": t}, tuple(Node(i, "A100") for i in range(4)), tuple(links))
        self.net = MemoryNetwork(self.clock, spec, PLAN, payload)
        self.net.add_link(1, 3)
        self.net.add_link(3, 1)
        kv = KVTracker(dict.fromkeys(LAYERS, 10**6), LAYERS, kv_fill_limit=1.0, output_ratio=0.0, avg_output_len=0,
                       num_layers=6)
        flows: dict[NodeRef, list[tuple[NodeRef, float]]] = {
            SOURCE: [(0, 1.0)], 0: [(1, 1.0), (3, 1.0)], 1: [(2, 1.0)], 3: [(2, 1.0)], 2: [(SINK, 1.0)]
        }
        router = FlowRouter(LAYERS, flows, dict.fromkeys(LAYERS, 4096), kv, 6)
        self.ex: dict[int, StubExecutor] = {}
        self.w: dict[int, Any] = {}
        for i, (a, b) in LAYERS.items():
            self.ex[i] = StubExecutor(self.clock)
            out = [y for x, y in PLAN if x == i]
            w = cls(i, self.clock, self.net.endpoint(i), self.ex[i],
                    WorkerSettings(layers=(a, b), num_layers=6, limits=BatchLimits(16, 4096, 16, 10**6),
                                   kv_capacity=kv3 if i == 3 else 100_000, activation_bytes=8,
                                   kv_token_bytes=500, migration_chunk=chunk, migration_tail=tail, out_links=out))
            w.start()
            self.w[i] = w
        self.host = Host(self.clock, self.net.endpoint(HOST), router=router, migration_timeout=timeout)
        self.host.start()
        self.tokens: dict[int, list[Any]] = {}
        self.trigger: dict[int, int] = {}  # query id -> migrate its stage 1 to node 3 at this many tokens
        self.host.on_token = self._on_token

    def _on_token(self, q: Any, tok: Any, last: bool) -> None:
        got = self.tokens.setdefault(q.qid, [])
        got.append(tok)
        if self.trigger.get(q.qid) == len(got):
            assert self.host.migrate(q.qid, 1, 3, "test") == ""

    def migrate(self, q: Any, n: int, in_callback: bool) -> None:
        """Move ``q``'s stage 1 to node 3 once it has ``n`` tokens: from ``on_token`` (the host is
        amid the token) or from outside, after the host has sent the next decode (as the policy)."""
        if in_callback:
            self.trigger[q.qid] = n
            self.until(lambda: q.qid in self.host.moves or q.iterations > n)
        else:
            self.until(lambda: q.iterations >= n)
            assert self.host.migrate(q.qid, 1, 3, "test") == ""
        assert q.qid in self.host.moves

    def submit(self, qid: int, n: int, m: int) -> Any:
        q = self.host.submit(qid, n, m, token_ids=tuple(range(1, n + 1)))
        assert q is not None and q.route is not None and q.route[1][0] == 1, "the query must go through node 1"
        return q

    def until(self, cond: Callable[[], bool], limit: float = 60.0, dt: float = 0.0005) -> None:
        """Run the loop in small steps until ``cond()`` holds (at most ``limit`` s of virtual time)."""
        end = self.loop.time() + limit
        while not cond():
            assert self.loop.time() < end, "condition not reached in time"
            self.loop.run_until(self.loop.time() + dt)

    def state(self, qid: int) -> int:
        mv = self.host.moves.get(qid)
        return -1 if mv is None else mv.state

    def settle(self) -> None:
        self.loop.run_until(self.loop.time() + 120.0)

    def idle(self) -> None:
        """Nothing of any query left on any node."""
        for i, w in self.w.items():
            assert w.kv_used == 0, f"node {i} holds {w.kv_used} KV entries"
            assert not w._mig_in and not w._mig_out, f"node {i} still migrates"

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def make() -> Any:
    made: list[Cluster] = []

    def _make(cls: type, **kw: Any) -> Cluster:
        c = Cluster(cls, **kw)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.close()


def assert_every_token_once(c: Cluster, q: Any) -> None:
    toks = c.tokens.get(q.qid, [])
    assert len(toks) == q.output_len and set(toks) == {0}  # the stub's token id is 0
    assert [(r[0], r[5]) for r in c.host.query_records] == [(q.qid, q.output_len)]
    assert q.iterations == q.output_len and c.host.active == 0
    assert sum(c.host.tokens_count) == q.input_len + q.output_len - 1


# ---- 1. a migration completes -----------------------------------------------------------------


# Regression: commit 7cea17c's Host.migrate sent MigrateReserve.max_context = input_len + iterations
# - 1 + decodes_left, right only amid a token (on_token: decodes_left not yet decremented); between
# tokens (the policy's timer) the target freed the stage one decode early and the query hung on its
# last decode. Both call points are tested (fixed by max_context = input_len + output_len - 1).
WHERE = pytest.mark.parametrize(
    "in_callback", [True, False], ids=["on_token", "between_tokens"]
)


@CLASSES
@WHERE
def test_a_stage_moves_mid_decode_and_every_token_arrives_once(make: Any, cls: type, in_callback: bool) -> None:
    c = make(cls)
    q = c.submit(0, 40, 30)
    c.migrate(q, 5, in_callback)
    c.until(lambda: c.host.stats.live_migrations == 1, limit=10.0)
    assert q.route == ((0, 0, 2), (3, 2, 4), (2, 4, 6)) and q.iterations < q.output_len
    assert c.w[1].kv_used == 0 and 0 not in c.w[1]._mig_out  # the source let go at the switch
    moved_at = c.loop.time()
    c.settle()
    s = c.host.stats
    assert (s.live_migrations, s.migrations_aborted, s.finished, s.stale_results) == (1, 0, 1, 0)
    assert_every_token_once(c, q)
    [rec] = c.host.live_moves
    qid, stage, src, dst, began, held_at, resumed_at, upto = rec
    assert (qid, stage, src, dst) == (0, 1, 1, 3)
    assert began <= held_at <= resumed_at <= moved_at
    assert upto >= 40 + 5 - 1  # the context the source held at the quiet moment
    assert (c.w[1].stats.migrated_out, c.w[3].stats.migrated_in) == (1, 1)
    assert c.w[1].stats.migrate_bytes > 0 and c.w[3].stats.bad_messages == 0
    # node 1 computed nothing of it after the switch, node 3 did (the rest of the decodes)
    assert all(t < resumed_at for t, _ in c.ex[1].batches)
    assert any(t > resumed_at for t, _ in c.ex[3].batches)
    c.idle()


# ---- 2. the target refuses ----------------------------------------------------------------------


@CLASSES
def test_a_target_without_room_refuses_and_the_query_goes_on(make: Any, cls: type) -> None:
    c = make(cls, kv3=10)  # 40+ positions x 2 layers do not fit
    q = c.submit(0, 40, 20)
    c.migrate(q, 3, in_callback=False)
    c.until(lambda: not c.host.moves, limit=5.0)
    c.settle()
    s = c.host.stats
    assert (s.live_migrations, s.migrations_aborted, s.finished) == (0, 1, 1)
    assert q.route is not None and q.route[1][0] == 1
    assert c.w[3].stats.migrate_refused == 1 and c.w[3].stats.kv_peak == 0
    assert c.ex[3].batches == []
    assert_every_token_once(c, q)
    c.idle()


# ---- 3. the target dies mid-copy ---------------------------------------------------------------




@CLASSES
# (detached: the host's abort to a node that is gone used to raise out of its timer and stop the loop)
@pytest.mark.parametrize("detach", [False, True], ids=["killed", "detached"])
def test_a_target_lost_mid_copy_times_out_and_the_query_finishes_where_it_was(
    make: Any, cls: type, detach: bool
) -> None:
    c = make(cls, timeout=1.0)
    q = c.submit(0, 60, 60)
    c.migrate(q, 3, in_callback=False)
    c.until(lambda: c.state(0) == LiveMove.COPYING, limit=5.0)  # node 3 answered MigrateReserve
    c.w[3].kill()  # it sends nothing from now on (its chunks' acknowledgements included)
    if detach:
        c.net.detach(3)  # and receives nothing
    c.settle()
    s = c.host.stats
    assert (s.live_migrations, s.migrations_aborted, s.finished) == (0, 1, 1)
    assert q.route is not None and q.route[1][0] == 1
    assert_every_token_once(c, q)
    assert c.w[1].kv_used == 0 and not c.w[1]._mig_out
    if not detach:  # it heard the abort: what it reserved is free
        assert c.w[3].kv_used == 0 and not c.w[3]._mig_in


# ---- 4. the query finishes while migrating -----------------------------------------------------


@CLASSES
def test_a_query_that_ends_mid_copy_ends_the_move_and_the_target_frees_its_room(make: Any, cls: type) -> None:
    c = make(cls, chunk=1)  # one position per round trip: the copy cannot finish in 3 tokens
    q = c.submit(0, 200, 3)
    c.migrate(q, 1, in_callback=False)
    c.until(lambda: c.w[3].kv_used > 0, limit=5.0)  # the target reserved
    c.settle()
    s = c.host.stats
    assert (s.live_migrations, s.migrations_aborted, s.finished) == (0, 1, 1)
    assert not c.host.moves
    assert_every_token_once(c, q)
    c.idle()


# ---- 5. a cancel during a migration -------------------------------------------------------------


@CLASSES
@pytest.mark.parametrize("at", [LiveMove.COPYING, LiveMove.FINISHING], ids=["copying", "held"])
def test_a_cancel_mid_migration_frees_source_and_target(make: Any, cls: type, at: int) -> None:
    c = make(cls)
    q = c.submit(0, 40, 40)
    c.migrate(q, 3, in_callback=False)
    c.until(lambda: c.state(0) == at, limit=5.0)
    got = len(c.tokens[0])
    assert c.host.cancel(0)
    c.settle()
    s = c.host.stats
    assert (s.cancelled, s.live_migrations, s.migrations_aborted, s.finished) == (1, 0, 1, 0)
    assert len(c.tokens[0]) == got and not c.host.moves and c.host.active == 0
    c.idle()


# ---- 6. trust -----------------------------------------------------------------------------------


@CLASSES
def test_kv_from_a_node_other_than_the_source_and_status_from_outsiders_are_refused(make: Any, cls: type) -> None:
    c = make(cls)
    q = c.submit(0, 40, 30)
    c.migrate(q, 3, in_callback=True)
    c.until(lambda: c.state(0) == LiveMove.COPYING, limit=5.0)
    w3 = c.w[3]
    mv3 = w3._mig_in[q.rid]
    upto, kv, bad = mv3.upto, w3.kv_used, w3.stats.bad_messages
    for sender in (2, 0):  # (node 0 is on the route, node 2 too: neither is the named source)
        w3.on_message(sender, MigrateKV(request_id=q.rid, first=upto, count=1000, final=True, sent_at=0.0,
                                        payload_bytes=0))
    assert w3.stats.bad_messages == bad + 2
    assert (mv3.upto, w3.kv_used, q.rid in w3._mig_in) == (upto, kv, True)
    assert w3.stats.migrated_in == 0
    refused = dict(c.host.stats.refused)
    for state in (MigrateState.TAIL, MigrateState.DONE):
        c.host.on_message(2, MigrateStatus(request_id=q.rid, node_id=2, state=state, upto=10**6))
    assert c.host.stats.refused.get(("MigrateStatus", 2), 0) == refused.get(("MigrateStatus", 2), 0) + 2
    assert c.state(0) == LiveMove.COPYING and q.route[1][0] == 1 and c.host.stats.live_migrations == 0
    c.settle()  # the real move completes regardless
    s = c.host.stats
    assert (s.live_migrations, s.migrations_aborted, s.finished) == (1, 0, 1)
    assert_every_token_once(c, q)
    c.idle()


@CLASSES
def test_status_for_a_query_with_no_move_changes_nothing(make: Any, cls: type) -> None:
    c = make(cls)
    q = c.submit(0, 20, 10)
    c.until(lambda: q.iterations >= 2)
    for sender, state in ((3, MigrateState.DONE), (1, MigrateState.TAIL), (3, MigrateState.RESERVED)):
        c.host.on_message(sender, MigrateStatus(request_id=q.rid, node_id=sender, state=state, upto=10**6))
    # a DONE from a node off the route is taken for a called-off copy: the node is told to drop it
    assert c.host.stats.stale_results == 1
    assert c.host.stats.refused.get(("MigrateStatus", 1)) == 1
    assert c.host.stats.refused.get(("MigrateStatus", 3)) == 1
    c.settle()
    assert q.route is not None and q.route[1][0] == 1
    assert_every_token_once(c, q)
    c.idle()


# ---- 7. the simulator --------------------------------------------------------------------------


def _sim(migration: bool) -> tuple[Any, str]:
    from helix_async.placement.io import load_shipped_layout
    from helix_async.routing.migration import MigrationConfig
    from helix_async.settings import KV_ONLINE
    from sim.report import report_json
    from sim.runner import Workload, run
    from sim.simulation import SimulationSetup

    setup = SimulationSetup(load_shipped_layout("ilp"), kv=KV_ONLINE, migration=migration,
                            migration_config=MigrationConfig(high=0.0, low=1.0, gap=0.0))
    r = run(setup, Workload(mode="online", arrivals="gamma", cv=2.0, rate=700, warmup=0, duration=30, seed=1))
    return r, report_json(r.report)


# (the policy calls Host.migrate from its timer, between tokens: under commit 7cea17c 18 of the 20
# queries hung on their last decode)
def test_simulator_migrates_many_stages_and_serves_the_same_queries() -> None:
    base, _ = _sim(False)
    r, js = _sim(True)
    h, h0 = r.sim.host, base.sim.host
    assert h.stats.live_migrations >= 20 and h.stats.live_migrations == len(h.live_moves)
    assert r.report["migration"]["completed"] == h.stats.live_migrations and r.report["migration"]["bytes"] > 0
    assert all(began <= held <= done for *_, began, held, done, _ in h.live_moves)
    recs = sorted((x[0], x[5]) for x in h.query_records)
    assert recs == sorted((x[0], x[5]) for x in h0.query_records) and len(recs) >= 10
    assert h.active == 0 and h.stats.failed == 0 and sum(h.tokens_count) == sum(h0.tokens_count)
    assert all(w.kv_used == 0 for w in r.sim.workers.values())
    _, again = _sim(True)
    assert again == js


# ---- 8. the query's route loses another node mid-move -----------------------------------------


@CLASSES
def test_a_move_ends_when_the_query_is_rerouted_by_a_lost_node(make: Any, cls: type) -> None:
    """Node 2 (the query's last stage, not part of the move) is lost while stage 1 moves: the query
    is re-admitted by recomputation under a new wire id, so the move is called off under the old
    one, and source and target both let go of it."""
    c = make(cls, chunk=1, tail=1)
    q = c.submit(0, 60, 40)
    c.migrate(q, 3, in_callback=False)
    c.until(lambda: c.state(0) == LiveMove.COPYING, limit=5.0)
    old_rid = q.rid
    c.net.detach(2)
    c.w[2].kill()
    c.host.replan(None, {2}, "node 2 lost")  # (no route left: the query waits for one)
    assert q.qid not in c.host.moves and q.rid != old_rid
    assert c.host.stats.migrations_aborted == 1
    c.loop.run_until(c.loop.time() + 5.0)
    for i in (1, 3):
        assert c.w[i].kv_used == 0 and not c.w[i]._mig_in and not c.w[i]._mig_out, f"node {i}"


# ---- 9. the move is called off after the target has installed the copy -----------------------


@CLASSES
@pytest.mark.parametrize("how", ["cancel", "timeout_then_finish"])
def test_a_move_called_off_after_the_targets_done_frees_the_target(make: Any, cls: type, how: str) -> None:
    """The target has the whole copy and its DONE is on the way when the host calls the move off (the
    client cancels, or the timeout fires and the query finishes on its old route): the target is
    told to let go, and holds nothing afterwards."""
    c = make(cls, timeout=1.0)
    q = c.submit(0, 40, 40 if how == "cancel" else 6)
    held: list[Any] = []
    status = c.host._move_status

    def hold_done(sender: Any, msg: Any) -> None:
        if msg.state == MigrateState.DONE and not held:
            held.append((sender, msg))  # delivered late, below
            return
        status(sender, msg)

    c.host._move_status = hold_done  # type: ignore[method-assign]
    c.migrate(q, 3, in_callback=False)
    c.until(lambda: bool(held), limit=5.0)
    if how == "cancel":
        assert c.host.cancel(0)
    else:
        c.until(lambda: not c.host.moves, limit=5.0)  # the timeout: the held decode goes on
        c.until(lambda: c.host.active == 0, limit=5.0)  # and the query finishes where it was
        assert_every_token_once(c, q)
    status(*held[0])  # the late DONE: refused, changes nothing
    c.settle()
    assert c.host.stats.live_migrations == 0 and c.host.stats.migrations_aborted == 1
    c.idle()
    assert 0 not in c.w[3]._reqs
