"""The coordinator: admission, routing, the request lifecycle and statistics (docs/original.md §7-8).

A :class:`Host` knows a ``Clock`` and a ``Transport`` only; the simulator and the runtime give it
different ones.  Queries come in through :meth:`Host.submit`; the host

1. admits the prompt: MaxFlow routes it at once with IWRR over the planned flows under the KV
   expectation (``routing.FlowRouter``); a query that cannot be placed now waits in the admission
   queue and is retried whenever a query finishes (``compat=True`` in offline mode: dropped, as the
   original did). The queue is ordered by each query's priority, then by arrival
   (:class:`AdmissionQueue`; docs/runtime.md, "Priorities").  Per-hop schedulers (Swarm, Random, Shortest-queue) only choose the first hop
   here; the workers choose the rest;
2. sends ``PromptWork`` to the first stage; the last stage answers with a ``TokenResult``;
3. issues the next iteration (``DecodeWork`` on the same route) until the query has its tokens,
   then releases its KV expectation.

Token accounting: a query of ``n`` input and ``m`` output tokens is one prompt iteration (which
yields the first token) and ``m - 1`` decodes.  ``compat=True`` follows the original simulator:
``m`` decodes after the prompt (one more iteration).

Statistics are kept per iteration, as plain arrays: finish time and latency (finish time minus
the iteration's creation; a prompt is created when its query arrives, so waiting for admission
counts) for prompts and decodes separately.
"""

from __future__ import annotations

import bisect
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock
from .ids import NodeRef, Route
from .messages import (
    Cancel,
    Error,
    Feedback,
    MigrateAbort,
    MigrateFinish,
    MigrateReserve,
    MigrateStart,
    MigrateState,
    MigrateStatus,
    PromptWork,
    TokenResult,
    make_decode_work,
    sampling_fields,
)
from .sampling import GREEDY, SampledToken, SamplingParams
from .transport.base import Transport, TransportError

__all__ = ["MIGRATED_RID_BASE", "Host", "HostStats", "LiveMove", "Query"]

#: wire ids of migrated queries count from here (above any query id a workload uses)
MIGRATED_RID_BASE = 1 << 62

_GREEDY_FIELDS = sampling_fields(GREEDY)


class AdmissionQueue:
    """The queries waiting for admission: by priority (a lower number first, as vLLM orders its
    ``priority``), first come first served within a priority."""

    __slots__ = ("_by_class", "_classes", "_n")

    def __init__(self) -> None:
        self._by_class: dict[int, deque[Query]] = {}
        self._classes: list[int] = []  # the priorities that have a queue, ascending
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[Query]:
        """In admission order."""
        for p in list(self._classes):
            yield from list(self._by_class[p])

    def append(self, q: Query) -> None:
        d = self._by_class.get(q.priority)
        if d is None:
            d = self._by_class[q.priority] = deque()
            bisect.insort(self._classes, q.priority)
        d.append(q)
        self._n += 1

    def head(self) -> Query:
        """The query admitted next (the queue must not be empty)."""
        return self._by_class[self._classes[0]][0]

    def pop_head(self) -> Query:
        p = self._classes[0]
        d = self._by_class[p]
        q = d.popleft()
        self._n -= 1
        if not d:
            del self._by_class[p]
            self._classes.pop(0)
        return q

    def waiting_before(self, priority: int) -> bool:
        """Whether a query of this priority or a more urgent one waits (a new query of
        ``priority`` must not overtake it)."""
        return bool(self._classes) and self._classes[0] <= priority

    def remove(self, q: Query) -> bool:
        d = self._by_class.get(q.priority)
        if d is None or q not in d:
            return False
        d.remove(q)
        self._n -= 1
        if not d:
            del self._by_class[q.priority]
            self._classes.remove(q.priority)
        return True

    def clear(self) -> list[Query]:
        """Empty the queue; returns what waited, in admission order."""
        out = list(self)
        self._by_class.clear()
        self._classes.clear()
        self._n = 0
        return out


def _argmax_only(s: SamplingParams) -> bool:
    """The last stage chooses the query's tokens by a plain arg-max and keeps no sampler for it (no
    temperature, penalty, ban or log-probabilities: ``executors.sampling.sampler_for``)."""
    return (s.temperature == 0 and s.repetition_penalty == 1 and s.presence_penalty == 0
            and s.frequency_penalty == 0 and s.min_tokens == 0 and s.logprobs is None)


class Query:
    """One query's lifecycle on the host."""

    __slots__ = (
        "qid",
        "input_len",
        "output_len",
        "arrived",
        "route",
        "iterations",
        "decodes_left",
        "created",
        "first_token_at",
        "finished_at",
        "admitted_at",
        "token_ids",
        "tokens",
        "error",
        "sampling",
        "rid",
        "migrations",
        "moved_at",
        "priority",
    )

    def __init__(self, qid: int, input_len: int, output_len: int, arrived: float, priority: int = 0) -> None:
        self.qid = qid
        self.priority = priority  # lower: more urgent (vLLM's convention); 0 by default
        self.input_len = input_len
        self.output_len = output_len
        self.arrived = arrived
        self.route: Route | None = None
        self.iterations = 0
        self.decodes_left = 0
        self.created = arrived  # creation time of the current iteration
        self.first_token_at = -1.0
        self.finished_at = -1.0
        self.admitted_at = -1.0
        # served for real: the prompt's token ids, and the tokens generated so far (None when the
        # workers run a cost model and no token ids travel)
        self.token_ids: tuple[int, ...] | None = None
        self.tokens: list[int] | None = None
        self.error = ""  # why the query failed ("" unless it did)
        self.sampling = GREEDY  # how the last stage chooses its tokens
        self.rid = qid  # its id on the wire: a fresh one after each migration (stale results are dropped)
        self.migrations = 0
        self.moved_at = -1.0  # when it last migrated, until its next token comes


class LiveMove:
    """A live migration of one (query, stage) in progress (docs/migration.md).

    stage: the index in the query's route; source, target: the node holding the stage now and the
    one taking it over; route: the query's route once moved; state: RESERVING (the target was asked
    for room), COPYING (the source pre-copies while the query decodes), TAIL (little is left: the
    query's next token is held back), FINISHING (held: the source sends the rest); began: when the
    host started it; held: the decode held back, held_at: since when (the downtime's start)."""

    RESERVING, COPYING, TAIL, FINISHING = range(4)

    __slots__ = ("q", "stage", "source", "target", "route", "state", "began", "held", "held_at", "gen", "reason")

    def __init__(self, q: Query, stage: int, target: int, route: Route, began: float, gen: int, reason: str) -> None:
        self.q = q
        self.stage = stage
        self.source: int = q.route[stage][0]  # type: ignore[index]
        self.target = target
        self.route = route
        self.state = LiveMove.RESERVING
        self.began = began
        self.held: Any = None
        self.held_at = -1.0
        self.gen = gen
        self.reason = reason  # why it was started (the policy's words, for logs)


@dataclass
class HostStats:
    """Counters of the host."""

    submitted: int = 0
    tokens_submitted: int = 0  # prompt plus output tokens of the queries submitted (what max flow counts)
    admitted: int = 0
    finished: int = 0
    rejected: int = 0  # dropped: compat offline (as the original), infeasible, or the queue full
    infeasible: int = 0  # no route could ever take the query
    would_abort: int = 0  # compat online: where the original's scheduler asserted
    admission_waits: int = 0  # queries that waited in the admission queue
    failed: int = 0  # admitted queries that a worker reported failed (or that were failed here)
    cancelled: int = 0  # queries their client withdrew (admitted or waiting)
    migrated: int = 0  # moves of an admitted query to a new route (its route crossed a lost node)
    replans: int = 0  # routers swapped in by replan()
    live_migrations: int = 0  # (query, stage) moves completed with their KV (docs/migration.md)
    migrations_aborted: int = 0  # live migrations called off (refused, timed out, a node lost, the query ended)
    migrations_unreserved: int = 0  # moved stages the router's KV expectation had no room for
    stale_results: int = 0  # results for a route a query has left (dropped)
    bad_messages: int = 0  # every message dropped (unknown request, unexpected kind, wrong sender)
    #: (message kind, sender) -> messages dropped because that sender may not send them (a token
    #: not from its request's last stage, an error not from a stage of its route, feedback not
    #: from a first hop)
    refused: dict[tuple[str, NodeRef], int] = field(default_factory=dict)


class Host:
    """The coordinator (see the module doc).

    router: a ``FlowRouter`` (MaxFlow), or None for per-hop scheduling. policy: the per-hop chooser
    of the source (``routing.baselines``) over ``first_hops`` ((node, start, end) of each of the
    source's links), for per-hop scheduling; free_links_only: the policy only takes an idle link
    (Random, Shortest-queue) and a prompt waits here until one is (counted in ``admission_waits``);
    peer_queue_len: a node's first-layer queue length (Shortest-queue). compat: the original's
    token accounting; with
    ``drop_rejected`` a query MaxFlow cannot place is dropped instead of queued.
    activation_bytes is unused by the host (prompts to the first stage carry token ids);
    token_id_bytes: modelled bytes per prompt token id (int32).
    """

    def __init__(
        self,
        clock: Clock,
        transport: Transport,
        *,
        router: Any = None,
        policy: Any = None,
        first_hops: Sequence[tuple[int, int, int]] = (),
        compat: bool = False,
        drop_rejected: bool = False,
        admission_capacity: int = 1 << 30,
        token_id_bytes: int = 4,
        free_links_only: bool = False,
        peer_queue_len: Callable[[NodeRef], int] | None = None,
        migration_timeout: float = 30.0,
        peer_address: Callable[[int], str] | None = None,
    ) -> None:
        if (router is None) == (policy is None):
            raise ValueError("give exactly one of router (MaxFlow) and policy (per-hop scheduling)")
        self._clock = clock
        self._transport = transport
        self._router = router
        self._policy = policy
        self._first = tuple(first_hops)
        self._first_nodes = tuple(s[0] for s in self._first)
        self._compat = compat
        self._drop = drop_rejected
        self._tid = int(token_id_bytes)
        self._free_only = free_links_only
        self._peer_len = peer_queue_len
        self._queries: dict[int, Query] = {}
        self._waiting = AdmissionQueue()
        self._by_rid: dict[int, Query] = {}  # migrated queries by their wire id
        self._migrating: deque[Query] = deque()  # admitted queries waiting for a new route
        self._next_rid = MIGRATED_RID_BASE
        #: why admission is stopped ("" while it runs): a layer has no live node
        self.admission_stopped = ""
        #: wire ids a lost node may still hold (it could not be told to drop them): per node
        self.stale_on: dict[NodeRef, list[int]] = {}
        self._admission_capacity = admission_capacity
        # live migrations in progress, by query id (docs/migration.md)
        self._moves: dict[int, LiveMove] = {}
        self._move_gen = 0
        self.migration_timeout = float(migration_timeout)
        #: a node's address for a source to dial (the runtime); None: the network knows (simulator)
        self.peer_address = peer_address
        #: (query id, stage, source, target, began, held at, resumed at, positions copied): every
        #: live migration completed
        self.live_moves: list[tuple[int, int, int, int, float, float, float, int]] = []
        #: (query id, why): every live migration called off
        self.aborted_moves: list[tuple[int, str]] = []
        #: on_moved(move): a live migration completed (the query's route is the new one)
        self.on_moved: Callable[[LiveMove], None] | None = None
        self.stats = HostStats()
        # iteration records: finish time (s) and latency (s)
        self.prompt_done = array("d")
        self.prompt_latency = array("d")
        self.decode_done = array("d")
        self.decode_latency = array("d")
        self.tokens_done = array("d")  # finish time of every iteration, weighted in tokens_count
        self.tokens_count = array("l")
        self.query_records: list[tuple[int, float, float, float, int, int]] = []
        #: the priority of each query in ``query_records``, in the same order
        self.query_priority = array("l")
        #: (query id, migrated at, next token at): every migration, once the query produces again
        self.resumed: list[tuple[int, float, float]] = []
        self.on_prompt_done: Callable[[Query], None] | None = None
        self.on_query_done: Callable[[Query], None] | None = None
        self.on_reject: Callable[[Query], None] | None = None
        #: on_token(query, token, last): every token of a query served with token ids; the token is
        #: its id, or a SampledToken when the query's sampling asks for log-probabilities
        self.on_token: Callable[[Query, Any, bool], None] | None = None
        #: on_fail(query): an admitted query failed (its ``error`` says why)
        self.on_fail: Callable[[Query], None] | None = None

    def start(self) -> None:
        self._transport.set_handler(self.on_message)
        if self._free_only:
            self._transport.set_idle_handler(self._link_idle)

    def _link_idle(self, dest: NodeRef) -> None:
        # Random / Shortest-queue: a prompt waits for a free first-hop link
        if self._waiting:
            self._retry()

    async def stop(self) -> None:
        await self._transport.close()

    # ---- read-outs ------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Queries admitted and not finished."""
        return len(self._queries)

    @property
    def waiting(self) -> int:
        """Queries waiting for admission."""
        return len(self._waiting)

    def active_queries(self) -> list[Query]:
        """The queries admitted and not finished (a copy)."""
        return list(self._queries.values())

    def is_active(self, qid: int) -> bool:
        return qid in self._queries

    def is_waiting(self, qid: int) -> bool:
        return any(q.qid == qid for q in self._waiting)

    def drop_waiting(self) -> list[Query]:
        """Empty the admission queue; returns the queries that waited (the caller tells their clients)."""
        return self._waiting.clear()

    @property
    def router(self) -> Any:
        return self._router

    def kv_bottleneck(self) -> float:
        """The KV expectation's bottleneck usage (MaxFlow), else 0."""
        return 0.0 if self._router is None else float(self._router.kv.bottleneck_usage())

    # ---- admission ------------------------------------------------------------------------------

    def submit(
        self,
        qid: int,
        input_len: int,
        output_len: int,
        token_ids: tuple[int, ...] | None = None,
        sampling: SamplingParams | tuple[float, float, int] | None = None,
        priority: int = 0,
    ) -> Query | None:
        """A query arrives now. Returns it (admitted or waiting), or None when it was dropped.

        token_ids: the prompt (``input_len`` ids) when the workers compute for real; its tokens
        then come back through ``on_token``.  Without them the prompt is a modelled payload.
        sampling: how the last stage chooses its tokens (default greedy), or the tuple
        (temperature, top_p, seed) for those three alone. With ``sampling.logprobs`` set,
        ``on_token`` gets a :class:`~helix_async.sampling.SampledToken` per token, else the id.
        priority: a lower number is admitted first (see :class:`AdmissionQueue`); within a
        priority, first come first served."""
        if qid in self._queries:
            raise ValueError(f"query {qid} is already active")
        if not -(2**31) <= priority < 2**31:  # what the wire carries (an int32)
            raise ValueError(f"query {qid}: priority must be an int32, got {priority}")
        q = Query(qid, int(input_len), int(output_len), self._clock.now(), int(priority))
        if token_ids is not None:
            if len(token_ids) != q.input_len:
                raise ValueError(f"query {qid}: {len(token_ids)} token ids for input_len {q.input_len}")
            q.token_ids = tuple(int(t) for t in token_ids)
            q.tokens = []
        if isinstance(sampling, SamplingParams):
            q.sampling = sampling
        elif sampling is not None:
            q.sampling = SamplingParams(temperature=float(sampling[0]), top_p=float(sampling[1]), seed=int(sampling[2]))
        self.stats.submitted += 1
        self.stats.tokens_submitted += q.input_len + q.output_len
        if self.admission_stopped:
            return self._wait(q)  # until coverage returns (bounded by the admission capacity)
        if self._router is not None and not self._router.feasible(q.input_len):
            # no route could ever take it (e.g. longer than every node's prompt limit): waiting
            # would block the queries behind it forever
            self.stats.infeasible += 1
            self._reject(q)
            return None
        # nobody overtakes a query moving, or one waiting at the same or a more urgent priority
        if self._migrating or self._waiting.waiting_before(q.priority):
            return self._wait(q)
        if self._admit(q):
            return q
        if self._drop:
            self._reject(q)
            return None
        if self._compat and self._router is not None:
            self.stats.would_abort += 1
        return self._wait(q)

    def _reject(self, q: Query) -> None:
        self.stats.rejected += 1
        if self.on_reject is not None:
            self.on_reject(q)
        return None

    def _wait(self, q: Query) -> Query | None:
        if len(self._waiting) >= self._admission_capacity:
            self._reject(q)
            return None
        self.stats.admission_waits += 1
        self._waiting.append(q)
        return q

    def _admit(self, q: Query) -> bool:
        router = self._router
        if router is not None:
            route = router.route(q.qid, q.input_len)
            if route is None:
                return False
        elif self._free_only:
            tp = self._transport
            j = self._policy.choose([tp.link_idle(y) for y in self._first_nodes], self._peer_len)
            if j < 0:
                return False
            route = (self._first[j],)
        else:
            j = self._policy.choose()
            route = (self._first[j],)
        q.route = route
        q.admitted_at = self._clock.now()
        q.decodes_left = q.output_len if self._compat else q.output_len - 1
        self._queries[q.qid] = q
        self.stats.admitted += 1
        self._send_prompt(q, route)
        return True

    def _retry(self) -> None:
        if self.admission_stopped:
            return
        moving = self._migrating
        while moving:
            if not self._readmit(moving[0]):
                return  # migrations go first: nobody overtakes them
            moving.popleft()
        waiting = self._waiting
        while waiting:
            if not self._admit(waiting.head()):
                return
            waiting.pop_head()

    # ---- faults: re-planned flows and migration -------------------------------------------------

    def _live(self, rid: int) -> Query | None:
        """The active query whose current route answers to wire id ``rid``, or None (stale)."""
        q = self._queries.get(rid)
        if q is not None and q.rid == rid:
            return q
        return self._by_rid.get(rid)

    @property
    def migrating(self) -> int:
        """Admitted queries waiting for a new route."""
        return len(self._migrating)

    def migrating_queries(self) -> list[Query]:
        """The admitted queries waiting for a new route (a copy)."""
        return list(self._migrating)

    def replan(self, router: Any, lost: Collection[NodeRef] = (), reason: str = "") -> list[int]:
        """Route by ``router`` from now on: MaxFlow re-planned around the ``lost`` nodes (or grown back
        when one returns).  Every admitted query whose route crosses a lost node migrates: the
        surviving workers of its route drop it (freeing its KV), and it is routed again as a prompt
        of its input plus the tokens produced so far (so its KV is rebuilt on the new route), under a
        fresh wire id; generation then goes on from its next token.  The other queries keep their
        routes and their KV expectation moves to the new router.  ``router`` None: no route covers
        every layer now; admission stops for ``reason`` (queries wait) until a later replan.
        Returns the ids of the queries that migrated.  MaxFlow only (a per-hop scheduler has no
        router)."""
        if self._router is None:
            raise ValueError("replan needs the MaxFlow router (per-hop schedulers route at the workers)")
        self.stats.replans += 1
        gone = set(lost)
        for mv in list(self._moves.values()):
            if mv.source in gone or mv.target in gone:
                # the source lost: the query migrates by recomputation below; the target lost: it
                # carries on where it is
                self._move_end(mv, "a node of the migration was lost", resume=mv.source not in gone, lost=gone)
        moved: list[int] = []
        for q in list(self._queries.values()):
            if q.route is not None and any(st[0] in gone for st in q.route):
                self._start_migration(q, gone)
                moved.append(q.qid)
        if router is None:
            self.admission_stopped = reason or "no live route covers every layer"
            return moved
        old, self._router = self._router, router
        for q in self._queries.values():
            if q.route is None:
                continue
            if q.qid in old.kv:
                old.finish(q.qid)
            try:
                router.kv.reserve(q.qid, [(st[0], st[2] - st[1]) for st in q.route], q.input_len)
            except (ValueError, KeyError):
                pass  # (its route is not in the new plan's KV model: it runs on without a reservation)
        self.admission_stopped = ""
        self._retry()
        return moved

    def _start_migration(self, q: Query, lost: set[NodeRef]) -> None:
        mv = self._moves.get(q.qid)
        if mv is not None:  # a live move of another stage of its route: off (under its present wire id)
            self._move_end(mv, "its route lost a node", resume=False, lost=lost)
        route = q.route
        assert route is not None
        for node in {st[0] for st in route}:
            if node in lost:
                self.stale_on.setdefault(node, []).append(q.rid)  # (told if it answers again)
            else:
                self._transport.send(node, Cancel(request_id=q.rid, reason="migrating: its route lost a node"))
        if self._router is not None and q.qid in self._router.kv:
            self._router.finish(q.qid)
        q.route = None
        q.migrations += 1
        q.moved_at = self._clock.now()
        self.stats.migrated += 1
        self._by_rid.pop(q.rid, None)
        q.rid = self._next_rid
        self._next_rid += 1
        self._migrating.append(q)

    def _readmit(self, q: Query) -> bool:
        """Route a migrating query anew: a prompt of its context so far (see :meth:`replan`)."""
        router = self._router
        assert router is not None
        # routed (and its KV expectation reserved) as at its admission, by its input length: the
        # tokens it produced were part of that expectation, and the longer context may exceed the
        # prompt limits the router checks (a worker runs an oversized prompt alone)
        route = router.route(q.qid, q.input_len)
        if route is None:
            return False
        q.route = route
        self._by_rid[q.rid] = q
        self._send_prompt(q, route)
        return True

    def _send_prompt(self, q: Query, route: Route) -> None:
        """The prompt iteration of ``q`` to its first stage: its input, or after a migration its
        whole context so far (input plus the tokens produced), for the rest of its tokens."""
        ctx = q.input_len + q.iterations
        ids = q.token_ids
        tokens = q.tokens
        wire_ids: tuple[int, ...] = ()
        if ids is not None:
            wire_ids = ids + tuple(tokens) if q.iterations and tokens is not None else ids
        sampling = _GREEDY_FIELDS if q.sampling is GREEDY else sampling_fields(q.sampling)
        self._transport.send(
            route[0][0],
            PromptWork(
                request_id=q.rid,
                query_id=q.qid,
                route=route,
                stage=0,
                num_tokens=ctx,
                token_ids=wire_ids,
                max_tokens=q.decodes_left + 1,
                sent_at=self._clock.now(),
                payload_bytes=ctx * self._tid if ids is None else 0,
                # the tokens it generated before a migration: the last stage counts them as output
                generated=q.iterations,
                priority=q.priority,
                **sampling,
            ),
        )

    # ---- live KV migration (docs/migration.md) ---------------------------------------------------

    @property
    def moves(self) -> dict[int, LiveMove]:
        """Live migrations in progress, by query id (do not change it)."""
        return self._moves

    def migrate(self, qid: int, stage: int, target: int, reason: str = "") -> str:
        """Start moving stage ``stage`` of query ``qid``'s route, with its KV, to node ``target``,
        while the query goes on decoding. Returns "" when it started, else why not. The caller (a
        policy) chooses a target that holds the stage's layers and is linked to the stages before
        and after it; the target itself refuses when it lacks the layers or the room."""
        q = self._queries.get(qid)
        why = ""
        if q is None:
            why = "not active"
        elif self._router is None:
            why = "per-hop scheduling: the workers route"
        elif self._compat:
            why = "compat mode"
        elif qid in self._moves:
            why = "moving already"
        elif q.route is None or q.iterations == 0 or q.decodes_left <= 0:
            why = "not decoding"
        elif not 0 <= stage < len(q.route):
            why = f"no stage {stage} in a route of {len(q.route)}"
        elif any(st[0] == target for st in q.route):
            why = f"node {target} is on its route already"
        elif stage == len(q.route) - 1 and not _argmax_only(q.sampling):
            why = "its sampler's state stays on its last stage (only plain greedy queries move it)"
        if why:
            return f"query {qid}: {why}"
        assert q is not None and q.route is not None
        x, a, b = q.route[stage]
        new = (*q.route[:stage], (target, a, b), *q.route[stage + 1 :])
        now = self._clock.now()
        self._move_gen += 1
        mv = LiveMove(q, stage, target, new, now, self._move_gen, reason)
        # the source holds at least the context before the query's last token (its next decode
        # brings that one); every stage frees the query at the context of its last decode,
        # input + output - 1 (the prompt's n + max_tokens - 1, also after a re-admission)
        ctx = q.input_len + q.iterations - 1
        self._transport.send(
            target,
            MigrateReserve(
                request_id=q.rid,
                route=new,
                stage=stage,
                context_len=ctx,
                max_context=q.input_len + q.output_len - 1,
                priority=q.priority,
                source=x,
                address="" if self.peer_address is None else self.peer_address(x),
            ),
        )
        self._moves[qid] = mv  # (after the send: a send that raises leaves no move behind)
        self._clock.call_at(now + self.migration_timeout, self._move_timeout, qid, mv.gen)
        return ""

    def _move_status(self, sender: NodeRef, msg: MigrateStatus) -> None:
        q = self._live(msg.request_id)
        mv = None if q is None else self._moves.get(q.qid)
        state = msg.state
        if mv is None:
            if q is not None and state == MigrateState.DONE and q.route and all(st[0] != sender for st in q.route):
                # a target finished a copy the host had called off meanwhile: it lets go
                self.stats.stale_results += 1
                self._transport.send(sender, Cancel(request_id=msg.request_id, reason="migration called off"))
                return
            self._refuse(MigrateStatus, sender)
            return
        if state == MigrateState.RESERVED and sender == mv.target and mv.state == LiveMove.RESERVING:
            mv.state = LiveMove.COPYING
            addr = "" if self.peer_address is None else self.peer_address(mv.target)
            self._transport.send(mv.source, MigrateStart(request_id=msg.request_id, target=mv.target, address=addr))
        elif state == MigrateState.REFUSED and (sender == mv.target or sender == mv.source):
            self._move_end(mv, f"refused by node {sender}: {msg.text}", resume=True)
        elif state == MigrateState.TAIL and sender == mv.source and mv.state == LiveMove.COPYING:
            mv.state = LiveMove.TAIL
        elif state == MigrateState.DONE and sender == mv.target and mv.state == LiveMove.FINISHING:
            self._move_switch(mv, msg.upto)
        else:
            self._refuse(MigrateStatus, sender)

    def _move_timeout(self, qid: int, gen: int) -> None:
        mv = self._moves.get(qid)
        if mv is not None and mv.gen == gen:
            self._move_end(mv, f"timed out after {self.migration_timeout:g} s", resume=True)

    def _move_end(self, mv: LiveMove, reason: str, *, resume: bool, lost: Collection[NodeRef] = ()) -> None:
        """Call a migration off: both nodes are told; a held decode goes on along the old route
        (``resume``)."""
        q = mv.q
        del self._moves[q.qid]
        self.stats.migrations_aborted += 1
        self.aborted_moves.append((q.qid, reason))
        # the source keeps the request; the target lets go of it, whether its copy is still coming
        # (MigrateAbort) or complete already (its DONE may be on the way: a Cancel frees it either way)
        tell = ((mv.source, MigrateAbort(request_id=q.rid, reason=reason)),
                (mv.target, Cancel(request_id=q.rid, reason=f"migration called off: {reason}")))
        for node, msg in tell:
            if node in lost:
                continue
            try:
                self._transport.send(node, msg)
            except TransportError:  # a node that is gone (not yet known lost): nothing to tell it
                self.stats.bad_messages += 1
        if resume and mv.held is not None and q.route is not None and not any(st[0] in lost for st in q.route):
            self._transport.send(q.route[0][0], mv.held)

    def _move_switch(self, mv: LiveMove, upto: int) -> None:
        """The target holds the whole context: the query's route takes it, the source lets go and
        the held decode goes on (docs/migration.md, "Switch")."""
        q = mv.q
        del self._moves[q.qid]
        now = self._clock.now()
        q.route = mv.route
        router = self._router
        if router is not None:
            if q.qid in router.kv:
                router.finish(q.qid)
            try:
                router.kv.reserve(q.qid, [(st[0], st[2] - st[1]) for st in mv.route], q.input_len)
            except (ValueError, KeyError):
                self.stats.migrations_unreserved += 1  # (it runs on without an expectation)
        self._transport.send(mv.source, Cancel(request_id=q.rid, reason=f"migrated to node {mv.target}"))
        held = mv.held
        work = make_decode_work(q.rid, mv.route, 0, held.context_len, held.token_id, now, held.tensors,
                                held.payload_bytes)
        self._transport.send(mv.route[0][0], work)
        self.stats.live_migrations += 1
        self.live_moves.append((q.qid, mv.stage, mv.source, mv.target, mv.began, mv.held_at, now, upto))
        if self.on_moved is not None:
            self.on_moved(mv)

    # ---- results --------------------------------------------------------------------------------

    def on_message(self, sender: NodeRef, msg: Any) -> None:
        """Transport handler: token results, errors and scheduler feedback, each accepted only from
        the peer the protocol expects (see :meth:`_from_route`); anything else is dropped and
        counted in ``stats.refused`` per (kind, sender)."""
        t = type(msg)
        if t is TokenResult:
            self._token(sender, msg)
        elif t is MigrateStatus:
            self._move_status(sender, msg)
        elif t is Feedback:
            if self._policy is not None and msg.node_id in self._first_nodes:
                if sender != msg.node_id:
                    self._refuse(t, sender)
                    return
                self._policy.observe(self._first_nodes.index(msg.node_id), msg.delay)
        elif t is Error and self._live(msg.request_id) is not None:
            q = self._live(msg.request_id)
            assert q is not None
            if not self._from_route(q, sender, msg, last=False):
                self._refuse(t, sender)
                return
            self.fail(q.qid, msg.text or f"error code {msg.code}")
        else:
            self.stats.bad_messages += 1

    def _refuse(self, kind: type, sender: NodeRef) -> None:
        st = self.stats
        st.bad_messages += 1
        key = (kind.__name__, sender)
        st.refused[key] = st.refused.get(key, 0) + 1

    def _from_route(self, q: Query, sender: NodeRef, msg: Any, *, last: bool) -> bool:
        """Whether ``sender`` may speak for ``q``'s current route: its last stage (``last``: a
        token) or any of its stages (an error).  Per-hop scheduling knows only the first hop until
        the prompt's token names the route it took: that token must come from the last stage of
        the route it names, which starts at the first hop given."""
        route = q.route
        if route is None:
            return False
        if self._router is None and q.iterations == 0 and len(route) == 1:
            named: Any = getattr(msg, "route", ())
            if last:
                return bool(named) and named[0][0] == route[0][0] and named[-1][0] == sender
            return isinstance(sender, int)
        if last:
            return route[-1][0] == sender
        return any(st[0] == sender for st in route)

    def fail(self, qid: int, reason: str) -> bool:
        """End admitted query ``qid`` as failed (``reason`` for people): its KV expectation is
        released, the workers on its route are told to drop it, ``on_fail`` is called.  Returns
        False when no such query is active."""
        return self._end(qid, reason, cancelled=False)

    def cancel(self, qid: int, reason: str = "cancelled by the client") -> bool:
        """The client withdrew query ``qid`` (it disconnected, or has what it wanted): a waiting
        query leaves the admission queue; an admitted one ends as :meth:`fail` ends it (its workers
        drop it and free its KV), counted as cancelled, not failed.  Returns False when no such
        query is waiting or active."""
        if qid not in self._queries:
            for q in self._waiting:
                if q.qid == qid:
                    self._waiting.remove(q)
                    q.error = reason
                    q.finished_at = self._clock.now()
                    self.stats.cancelled += 1
                    if self._waiting:  # the query it held back may fit now
                        self._retry()
                    return True
            return False
        return self._end(qid, reason, cancelled=True)

    def _end(self, qid: int, reason: str, *, cancelled: bool) -> bool:
        q = self._queries.pop(qid, None)
        if q is None:
            return False
        q.error = reason
        q.finished_at = self._clock.now()
        if cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.failed += 1
        self._by_rid.pop(q.rid, None)
        if q in self._migrating:
            self._migrating.remove(q)
        mv = self._moves.get(qid)
        if mv is not None:
            self._move_end(mv, reason, resume=False)
        if q.route:
            for node in {s[0] for s in q.route}:
                self._transport.send(node, Cancel(request_id=q.rid, reason=reason))
        if self._router is not None and qid in self._router.kv:
            self._router.finish(qid)
        if self.on_fail is not None:
            self.on_fail(q)
        if self._waiting:
            self._retry()
        return True

    def _token(self, sender: NodeRef, msg: TokenResult) -> None:
        q = self._live(msg.request_id)
        if q is None:
            if msg.request_id in self._queries:  # a result of a route the query has left
                self.stats.stale_results += 1
            else:
                self.stats.bad_messages += 1
            return
        if not self._from_route(q, sender, msg, last=True):
            self._refuse(TokenResult, sender)
            return
        now = self._clock.now()
        lat = now - q.created
        prompt = q.iterations == 0
        q.iterations += 1
        if prompt:
            self.prompt_done.append(now)
            self.prompt_latency.append(lat)
            self.tokens_done.append(now)
            self.tokens_count.append(q.input_len)
            q.first_token_at = now
            if msg.route and self._router is None:
                q.route = msg.route  # per-hop scheduling: the route the prompt took
        else:
            self.decode_done.append(now)
            self.decode_latency.append(lat)
            self.tokens_done.append(now)
            self.tokens_count.append(1)
        if q.moved_at >= 0:
            self.resumed.append((q.qid, q.moved_at, now))
            q.moved_at = -1.0
        tokens = q.tokens
        if tokens is not None:
            tokens.append(msg.token_id)
            if self.on_token is not None:
                lps = msg.logprobs
                tok: Any = msg.token_id if not lps else SampledToken(msg.token_id, lps[0][1], lps[1:])
                self.on_token(q, tok, q.decodes_left <= 0)
        if q.decodes_left > 0:
            q.decodes_left -= 1
            q.created = now
            route = q.route
            assert route is not None
            if self._router is not None:
                try:
                    self._router.on_decode(route)
                except ValueError:  # a route of the plan before a replan: no longer a planned path
                    pass
            # (request_id, route, stage, context_len, token_id, sent_at, tensors, payload_bytes)
            if tokens is None:
                work = make_decode_work(q.rid, route, 0, q.input_len + q.iterations, -1, now, (), self._tid)
            else:
                work = make_decode_work(q.rid, route, 0, q.input_len + q.iterations, msg.token_id, now, (), 0)
            mv = self._moves.get(q.qid) if self._moves else None
            if mv is not None and mv.state == LiveMove.TAIL:
                # the query's quiet moment: nothing of it is in flight; hold its decode while the
                # source sends the rest of its KV (docs/migration.md, "Stop-and-copy")
                mv.held = work
                mv.held_at = now
                mv.state = LiveMove.FINISHING
                self._transport.send(mv.source, MigrateFinish(request_id=q.rid))
            else:
                self._transport.send(route[0][0], work)
            if prompt and self.on_prompt_done is not None:
                self.on_prompt_done(q)
            return
        # the query is complete
        mv = self._moves.get(q.qid) if self._moves else None
        if mv is not None:  # (its stages free its KV themselves at its last token)
            self._move_end(mv, "the query finished", resume=False)
        q.finished_at = now
        del self._queries[q.qid]
        self._by_rid.pop(q.rid, None)
        self.stats.finished += 1
        self.query_records.append((q.qid, q.arrived, q.first_token_at, now, q.input_len, q.output_len))
        self.query_priority.append(q.priority)
        if self._router is not None and q.qid in self._router.kv:
            self._router.finish(q.qid)
        if self._waiting:
            self._retry()
        if prompt and self.on_prompt_done is not None:
            self.on_prompt_done(q)
        if self.on_query_done is not None:
            self.on_query_done(q)

