"""The compute node: per-layer queues, batching, KV cache, forwarding (docs/original.md §8.4-8.6).

A :class:`Worker` holds layers ``[a, b)`` of the model.  It knows three interfaces only: a
``Clock``, a ``Transport`` (messages in and out) and an ``Executor`` (runs a batch); the same
class serves the simulator (virtual clock, in-memory network, cost model) and the runtime (real
clock, ZeroMQ, torch).

Execution model (the original's, §8.5): one FIFO queue per local layer; a request whose stage
starts at layer ``s`` enters queue ``s``.  The node runs one layer at a time: it takes the queue
of its current layer (or the next non-empty one, cyclically), builds a batch by scanning that
queue in arrival order and taking each request that still fits the node's limits (prompt requests
and tokens, decode sequences and context; a request that does not fit is skipped, no
head-of-line blocking), runs it, moves every request to its next layer's queue (or forwards it
after its stage's last layer) and moves on to the next layer with work.  Prompts and decodes mix
in one batch.

KV cache (§8.6), in token x layer entries against the node's capacity:

* default: a request reserves its stage's entries when it enters the node's batch at its stage's
  first layer (a prompt ``n * k`` for ``k`` stage layers, a decode ``k``); when they do not fit,
  it waits in its queue (counted in ``kv_waits``) and the next request is tried;
* ``compat=True`` (the original): entries are taken after each layer runs, whatever the capacity;
  each time the use passes the capacity is counted in ``kv_overflows``, where the original
  aborted the run ("Exceed KV-cache capacity!").

Entries are freed when the request's last token has passed this node, or on ``Cancel``.

Decode gathering (default mode, ``settings.gather`` > 0; not the original's): the decodes of one
batch travel on to the host and come back one by one.  Started at the first arrival, the next
batch would hold only part of them, and the rest would form a second batch, taking turns with the
first from then on: two batches cost nearly twice one when a step streams the weights either way.
So before a batch starts at a layer where requests enter, the node looks at its requests that are
on their way back (they left it, and it measured their previous round trip) and waits for those
expected within ``gather`` times its last run's duration: until they have all arrived, or that
bound has passed on its clock.  Groups that are a whole batch apart (a pipeline of several stages
keeping each busy) are not waited for, and a batch with a prompt in it never waits.
docs/runtime.md, "Decode gathering".

Forwarding: a request carries its route (``helix_async.ids.Route``).  With a fixed route
(MaxFlow: the host chose every stage at admission) the next stage is in the message; with a
per-hop ``policy`` (Swarm, Random, Shortest-queue: §7.3-7.5) a prompt's next hop is chosen here
when it leaves, appended to its route, and its decodes follow that route later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# Absolute imports: this file is also compiled as helix_async._ext._worker (see the end).
from helix_async.clock import Clock
from helix_async.executors.base import Batch, ExecFailure, Executor
from helix_async.ids import SINK, NodeRef
from helix_async.messages import (
    Cancel,
    DecodeWork,
    Error,
    ErrorCode,
    Feedback,
    MigrateAbort,
    MigrateFinish,
    MigrateKV,
    MigrateReserve,
    MigrateStart,
    MigrateState,
    MigrateStatus,
    PromptWork,
    make_decode_work,
    make_feedback,
    make_prompt_work,
    make_token_result,
)
from helix_async.sampling import SampledToken
from helix_async.transport.base import Transport

if TYPE_CHECKING:
    from helix_async.settings import WorkerSettings

__all__ = ["BatchLimits", "Worker", "WorkerPy", "WorkerStats"]


@dataclass(frozen=True)
class BatchLimits:
    """What one batch may hold (the node's profiled settings for its layer count, §3.3).

    prompt_requests / prompt_tokens: most prompts and prompt tokens; decode_seqs: most decode
    sequences; decode_context: most tokens of context summed over the batch's decodes.
    """

    prompt_requests: int
    prompt_tokens: int
    decode_seqs: int
    decode_context: int


class _Item:
    """A request's current iteration on this node (a prompt or one decode step)."""

    __slots__ = ("rid", "prompt", "tokens", "ctx", "layer", "end", "entry", "stage", "route", "msg", "arrived", "data",
                 "prio")

    def __init__(
        self, rid: int, prompt: bool, tokens: int, ctx: int, layer: int, end: int, stage: int, route: Any, msg: Any
    ) -> None:
        self.rid = rid
        self.prompt = prompt
        self.tokens = tokens  # tokens this iteration processes (n for a prompt, 1 for a decode)
        self.ctx = ctx  # tokens already in the KV cache before this iteration
        self.layer = layer  # next layer to run
        self.end = end  # the stage's end layer (exclusive)
        self.entry = layer  # the stage's first layer on this node
        self.stage = stage
        self.route = route
        self.msg = msg
        self.arrived = 0.0
        # what a computing executor made of it so far: hidden states between layers, the chosen
        # token after the model's last layer, or an ExecFailure; None under the cost model
        self.data: Any = None
        self.prio = 0  # its request's priority (a lower number first; see Worker._step)


class _Req:
    """What the node remembers of a request between iterations."""

    __slots__ = ("kv", "last_ctx", "layers", "seq", "recompute", "ctx_done", "entry", "t_out", "rt", "awaited", "prio")

    def __init__(self, last_ctx: int, layers: int, seq: int, entry: int = 0, prio: Any = 0) -> None:
        self.kv = 0  # KV entries reserved on this node (default mode)
        self.ctx_done = 0  # tokens cached per layer after its last iteration that left this node
        self.last_ctx = last_ctx  # context_len of the request's final iteration
        self.layers = layers  # layers its stage runs here
        self.seq = seq  # admission order on this node (the youngest is preempted first)
        self.recompute = False  # its KV here was preempted: the next iteration recomputes it
        self.entry = entry  # its stage's first layer on this node
        # decode gathering (Worker._gather_decodes): when its last iteration left this node (-1 while
        # it is here), how long its previous round trip took (-1 before one is measured), and
        # whether the node waits for it now
        self.t_out = -1.0
        self.rt = -1.0
        self.awaited = False
        self.prio = prio  # the request's priority (PromptWork.priority)


@dataclass
class WorkerStats:
    """Counters of one worker (read them any time)."""

    batches: int = 0
    busy_time: float = 0.0
    prompt_tokens: int = 0
    decode_tokens: int = 0
    kv_waits: int = 0
    kv_preemptions: int = 0
    recomputed_tokens: int = 0
    kv_overflows: int = 0
    kv_peak: int = 0
    queued_peak: int = 0
    bad_messages: int = 0
    forwarded: int = 0
    link_waits: int = 0
    failed: int = 0  # requests the executor could not compute (reported to the host)
    prompt_residence: float = 0.0  # seconds prompts spent on this node (queueing + compute)
    prompts_left: int = 0
    decode_residence: float = 0.0
    decodes_left: int = 0
    gathers: int = 0  # times a decode batch waited for decodes on their way back (see Worker)
    gather_wait: float = 0.0  # seconds spent so waiting
    migrated_out: int = 0  # requests' stages this node handed to another (live migration)
    migrated_in: int = 0  # requests' stages it took over
    migrate_refused: int = 0  # migrations it refused or could not copy
    migrate_aborted: int = 0  # migrations the host called off while this node took part
    migrate_bytes: int = 0  # KV bytes it sent (real or modelled)


class _Move:
    """One migration of a request's stage as this node sees it: at the source (``peer``: the target)
    or at the target (``peer``: the source). upto: positions sent (source) or received (target);
    busy: a chunk is on its way (source: not yet acknowledged; target: being imported); tail: the
    source told the host that little is left; final: the last chunk is sent (source); kv: the
    entries the target holds for it; req: the target's record of the request, kept out of the
    node's requests until the copy is complete."""

    __slots__ = ("peer", "upto", "busy", "tail", "final", "finish", "kv", "req", "reserved")

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.upto = 0
        self.busy = False
        self.tail = False
        self.final = False
        self.finish = False  # (source) the host's MigrateFinish came while a chunk was on its way
        self.kv = 0
        self.reserved = 0  # (target) positions reserved so far
        self.req: Any = None


def _priority(item: _Item) -> Any:
    return item.prio


def _discard(dest: NodeRef, msg: Any) -> None:
    """The send of a killed worker."""


class Worker:
    """One compute node (see the module doc).

    node_id: this node. settings: its configuration (:class:`~helix_async.settings.WorkerSettings`:
    layers, batch limits, KV capacity, out-links, the model's sizes, what a per-hop policy needs,
    compat and fusing). policy: the per-hop next-hop chooser (``choose()`` / ``observe()``, see
    ``routing.policies``) over ``settings.out_links``; None for fixed routes (MaxFlow).
    peer_queue_len: the first-layer queue length of a neighbour (Shortest-queue), or None.
    """

    def __init__(
        self,
        node_id: int,
        clock: Clock,
        transport: Transport,
        executor: Executor,
        settings: WorkerSettings,
        *,
        policy: Any = None,
        peer_queue_len: Callable[[NodeRef], int] | None = None,
    ) -> None:
        a, b = settings.layers
        num_layers = settings.num_layers
        if not 0 <= a < b <= num_layers:
            raise ValueError(f"node {node_id}: layers [{a}, {b}) not within [0, {num_layers})")
        limits = settings.limits
        self.settings = settings
        self.node_id = node_id
        self._clock = clock
        self._now = clock.now
        self._soon = clock.call_soon
        self._transport = transport
        self._send = transport.send
        self._executor = executor
        # runs of layers in one executor call when the executor can shorten them (see _step)
        self._shorten: Callable[[Batch, int], int] | None = (
            getattr(executor, "shorten", None) if settings.fuse else None
        )
        # an executor that keeps per-request state (a real KV cache) is told when a request is freed
        self._release: Callable[[int], None] | None = getattr(executor, "release", None)
        self.a, self.b, self.num_layers = a, b, num_layers
        self.limits = limits
        self._lim = (limits.prompt_requests, limits.prompt_tokens, limits.decode_seqs, limits.decode_context)
        self.kv_capacity = int(settings.kv_capacity)
        self.kv_used = 0
        self._act = int(settings.activation_bytes)
        self._tok = int(settings.token_bytes)
        n = b - a
        # One FIFO per local layer, with running totals per layer so that a batch that takes the
        # whole queue (the common case) is decided without looking at its requests.
        self._queues: list[list[_Item]] = [[] for _ in range(n)]
        self._queued_prompts = [0] * n  # prompts in each layer's queue
        self._queued_prompt_tokens = [0] * n  # their tokens
        self._queued_decodes = [0] * n  # decodes in each layer's queue
        self._queued_decode_ctx = [0] * n  # their context tokens
        # tokens in each layer's queue that enter the node at that layer (their host-to-GPU copy)
        self._queued_host_tokens = [0] * n
        self._queued = 0  # requests in all the queues
        # requests on the node (queued or running) whose stage ends before the node's last layer
        # (0 in the common case: every request then runs to layer b and leaves together)
        self._ending_early = 0
        self._cur = 0  # index of the current layer
        self._busy = False
        self._batch: Batch | None = None  # the batch running now
        self._purge = False  # a request of the running batch was cancelled
        self._cancel_debt = 0  # compat: KV the running batch takes for cancelled requests
        self._credited = 0  # compat: layers of the running run of layers whose KV is taken already
        self._kick_pending = False
        self._host_tokens = 0  # compat: tokens received since the first layer last ran
        self._reqs: dict[int, _Req] = {}
        self._seq = 0
        self._kv_wait: deque[_Item] = deque()  # default mode: prompts waiting for KV
        self._policy = policy
        self._out = tuple(settings.out_links)
        self._next_layers = dict(settings.next_layers)
        self._free_only = settings.free_links_only
        self._peer_len = peer_queue_len
        self._link_wait: deque[_Item] = deque()  # prompts waiting for a free out-link
        self._compat = settings.compat
        self._feedback = settings.feedback
        # decode gathering (see the module's docstring); off in compat mode
        self._gather = 0.0 if settings.compat else float(settings.gather)
        self._out_reqs: dict[int, _Req] = {}  # requests on their way back here, by id
        self._last_run_s = 0.0  # duration of the last run from the node's first layer to its last
        self._entry_started = -1.0  # when the run now going through the node's layers began there
        self._awaiting = 0  # requests the node waits for now
        self._gathering = False
        self._gather_gen = 0  # the current wait's number (a stale timer finds another)
        self._gather_from = 0.0  # when the current wait began
        self._no_gather = False  # the next _step starts without waiting (a wait just ended)
        # live KV migration (docs/migration.md): by request id, at the source and at the target
        self._mig_out: dict[int, _Move] = {}
        self._mig_in: dict[int, _Move] = {}
        self._kv_token_bytes = int(settings.kv_token_bytes)
        self._mig_chunk = int(settings.migration_chunk)
        self._mig_tail = int(settings.migration_tail)
        # an executor holding real KV exports and imports it (torch); None: the copy is modelled
        self._export: Callable[..., None] | None = getattr(executor, "export_kv", None)
        self._import: Callable[..., None] | None = getattr(executor, "import_kv", None)
        self.stats = WorkerStats()
        self.stopped = False

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start receiving work."""
        self._transport.set_handler(self.on_message)
        if self._free_only:
            self._transport.set_idle_handler(self._link_idle)

    async def stop(self) -> None:
        """Stop receiving; close the transport."""
        self.stopped = True
        await self._transport.close()

    def kill(self) -> None:
        """A crash (the simulator's fault injection): from now on this worker starts nothing and
        sends nothing; what it was running is lost with it.  (Its network endpoint is detached by
        the caller.)"""
        self.stopped = True
        self._send = _discard

    # ---- read-outs ------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting in this node's layer queues."""
        return self._queued

    def first_queue_len(self) -> int:
        """Requests waiting at the node's first layer (what Shortest-queue compares)."""
        return len(self._queues[0])

    def kv_snapshot(self) -> tuple[int, int]:
        """(used, capacity) KV entries."""
        return self.kv_used, self.kv_capacity

    def kv_demand(self) -> int:
        """KV entries the first prompt waiting for KV here needs (0: none waits)."""
        if not self._kv_wait:
            return 0
        item = self._kv_wait[0]
        return item.tokens * (item.end - item.layer)

    # ---- inbound --------------------------------------------------------------------------------

    def on_message(self, sender: NodeRef, msg: Any) -> None:
        """Transport handler: work, cancels and scheduler feedback; anything else is counted."""
        t = type(msg)
        if t is DecodeWork:
            route = msg.route
            if not 0 <= msg.stage < len(route):
                self.stats.bad_messages += 1
                return
            stage = route[msg.stage]
            req = self._reqs.get(msg.request_id)
            if req is None or stage[0] != self.node_id:
                self.stats.bad_messages += 1
                return
            item = _Item(msg.request_id, False, 1, msg.context_len - 1, stage[1], stage[2], msg.stage, route, msg)
            item.prio = req.prio
            if req.t_out >= 0.0:
                self._returned(msg.request_id, req)
            if req.recompute:
                # its KV here was preempted: this step first recomputes the whole context
                req.recompute = False
                self.stats.recomputed_tokens += item.ctx
                item.prompt = True
                item.tokens = item.ctx + 1
                item.ctx = 0
        elif t is PromptWork:
            route = msg.route
            if not 0 <= msg.stage < len(route):
                self.stats.bad_messages += 1
                return
            stage = route[msg.stage]
            if stage[0] != self.node_id or not self.a <= stage[1] < stage[2] <= self.b:
                self.stats.bad_messages += 1
                return
            n = msg.num_tokens
            rid = msg.request_id
            item = _Item(rid, True, n, 0, stage[1], stage[2], msg.stage, route, msg)
            item.prio = msg.priority
            if rid not in self._reqs:
                self._seq += 1
                self._reqs[rid] = _Req(n + msg.max_tokens - 1, stage[2] - stage[1], self._seq, stage[1], msg.priority)
        elif t is Feedback:
            self._observe(msg)
            return
        elif t is Cancel:
            self._cancel(msg.request_id)
            return
        elif t is MigrateKV:
            self._mig_kv(sender, msg)
            return
        elif t is MigrateStatus:
            self._mig_received(sender, msg)
            return
        elif t is MigrateReserve:
            self._mig_reserve(msg)
            return
        elif t is MigrateStart:
            self._mig_start(msg)
            return
        elif t is MigrateFinish:
            self._mig_finish(msg.request_id)
            return
        elif t is MigrateAbort:
            self._mig_abort(msg.request_id)
            return
        else:
            self.stats.bad_messages += 1
            return
        if not self.a <= item.layer < item.end <= self.b:
            self.stats.bad_messages += 1
            return
        item.arrived = self._now()
        if self._compat:
            self._host_tokens += item.tokens
        elif not self._reserve(item):
            return
        self._enqueue(item)

    def _reserve(self, item: _Item) -> bool:
        """Default mode: reserve the KV ``item`` adds here; False when it must wait (it is queued)."""
        need = item.tokens * (item.end - item.layer)
        req = self._reqs[item.rid]
        wait = self._kv_wait
        if item.prompt and ((wait and wait[0].prio <= item.prio) or self.kv_used + need > self.kv_capacity):
            # prompts wait by priority, first come first served within one; a decode never waits (it
            # would hold KV others need)
            self.stats.kv_waits += 1
            if not wait or wait[-1].prio <= item.prio:
                wait.append(item)
            else:  # ahead of the first less urgent one
                i = 0
                while wait[i].prio <= item.prio:
                    i += 1
                wait.insert(i, item)
            return False
        self.kv_used += need
        req.kv += need
        if self.kv_used > self.kv_capacity:
            self._preempt(item.rid)
        if self.kv_used > self.stats.kv_peak:
            self.stats.kv_peak = self.kv_used
        return True

    def _preempt(self, keep: int) -> None:
        """Default mode: free the least urgent requests' KV, the youngest first among equals, until the
        cache fits again; each recomputes its context on its next step here (vLLM's recompute
        preemption). Never a request more urgent than ``keep``, the one whose KV overflowed: when
        only such requests hold KV, the cache stays over its capacity until they finish."""
        floor = self._reqs[keep].prio
        victims = sorted(
            ((r.prio, r.seq, rid) for rid, r in self._reqs.items() if rid != keep and r.kv > 0 and r.prio >= floor),
            reverse=True,
        )
        for _, _, rid in victims:
            if self.kv_used <= self.kv_capacity:
                break
            r = self._reqs[rid]
            self.kv_used -= r.kv
            r.kv = 0
            r.recompute = True
            if rid in self._mig_out:  # what it was copying is gone
                self._mig_refuse_out(rid, "its KV was preempted")
            if self._release is not None:
                self._release(rid)
            self.stats.kv_preemptions += 1

    def _enqueue(self, item: _Item) -> None:
        """A request arriving at the node joins its first layer's queue."""
        self._enqueue_moved(item)
        self._queued_host_tokens[item.layer - self.a] += item.tokens
        batch = self._batch
        if batch is not None and batch.layers > 1 and batch.layer < item.layer < batch.layer + batch.layers:
            # it would join the running batch at its layer: end the run of layers before that one
            self._shorten(batch, item.layer - batch.layer)  # type: ignore[misc]
        if item.end != self.b:
            self._ending_early += 1
        if self._queued > self.stats.queued_peak:
            self.stats.queued_peak = self._queued
        if not self._busy and not self._kick_pending:
            # Start on the next loop turn, so that requests arriving at the same instant share a batch.
            self._kick_pending = True
            self._soon(self._kick)

    def _kick(self) -> None:
        self._kick_pending = False
        if not self._busy and not self.stopped:
            self._step()

    # ---- execution ------------------------------------------------------------------------------

    def _step(self) -> None:
        """Pick the layer and the batch, and start it (no-op when there is nothing to run, or while
        the node waits for decodes on their way back)."""
        if self._gathering:
            return
        queues = self._queues
        n = len(queues)
        cur = self._cur
        for _ in range(n):
            if queues[cur]:
                break
            cur += 1
            if cur == n:
                cur = 0
        else:
            return
        self._cur = cur
        if self._gather > 0.0:
            if self._no_gather:
                self._no_gather = False
            elif self._out_reqs and self._start_gather(cur):
                return
        q = queues[cur]
        pmr, pmt, dmt, dmc = self._lim
        p_req = self._queued_prompts[cur]
        p_tok = self._queued_prompt_tokens[cur]
        d_seq = self._queued_decodes[cur]
        d_ctx = self._queued_decode_ctx[cur]
        if p_req <= pmr and p_tok <= pmt and d_seq <= dmt and d_ctx <= dmc:
            # the whole queue fits one batch
            chosen = q
            queues[cur] = []
            host = self._queued_host_tokens[cur]
            self._queued_prompts[cur] = self._queued_prompt_tokens[cur] = self._queued_decodes[cur] = 0
            self._queued_decode_ctx[cur] = self._queued_host_tokens[cur] = 0
        else:
            # FIFO with skip (§8.5): take each request that still fits, leave the rest in order; with
            # requests of several priorities, the more urgent are considered first
            first = q[0].prio
            for it in q:
                if it.prio != first:
                    q = sorted(q, key=_priority)
                    break
            p_req = p_tok = d_seq = d_ctx = host = 0
            chosen = []
            skipped = []
            for item in q:
                if item.prompt:
                    if p_req + 1 > pmr or p_tok + item.tokens > pmt:
                        skipped.append(item)
                        continue
                    p_req += 1
                    p_tok += item.tokens
                else:
                    if d_seq + 1 > dmt or d_ctx + item.ctx > dmc:
                        skipped.append(item)
                        continue
                    d_seq += 1
                    d_ctx += item.ctx
                if item.layer == item.entry:
                    host += item.tokens
                chosen.append(item)
            queues[cur] = skipped
            self._queued_prompts[cur] -= p_req
            self._queued_prompt_tokens[cur] -= p_tok
            self._queued_decodes[cur] -= d_seq
            self._queued_decode_ctx[cur] -= d_ctx
            self._queued_host_tokens[cur] -= host
            if not chosen:  # a single request above the limits: run it alone rather than never
                chosen = [skipped.pop(0)]
                it = chosen[0]
                if it.prompt:
                    p_req, p_tok = 1, it.tokens
                    self._queued_prompts[cur] -= 1
                    self._queued_prompt_tokens[cur] -= it.tokens
                else:
                    d_seq, d_ctx = 1, it.ctx
                    self._queued_decodes[cur] -= 1
                    self._queued_decode_ctx[cur] -= it.ctx
                if it.layer == it.entry:
                    host = it.tokens
                    self._queued_host_tokens[cur] -= it.tokens
        self._queued -= len(chosen)
        # A run of layers: the batch goes on through the next layers while nothing else waits in
        # their queues and none of its requests leaves the node before them; the node would run it
        # alone there, layer after layer, anyway.  A request that arrives at one of those layers
        # before the batch reaches it shortens the run (_enqueue), as it would have joined there.
        last = cur
        if self._shorten is not None:
            last = n - 1
            if self._ending_early:
                for it in chosen:
                    if it.end - self.a - 1 < last:
                        last = it.end - self.a - 1
            j = cur + 1
            while j <= last:
                if queues[j]:
                    last = j - 1
                    break
                j += 1
        if self._compat:
            # the original charges, on the node's first layer, every request received since
            if cur == 0:
                host = self._host_tokens
                self._host_tokens = 0
            else:
                host = 0
        batch = Batch(self.a + cur, chosen, p_req, p_tok, d_seq, d_ctx, host)
        batch.layers = last - cur + 1
        self._credited = 0
        batch.started = self._now()
        if cur == 0:
            self._entry_started = batch.started
        self._busy = True
        self._batch = batch
        self._executor.run(batch, self._done)

    def _done(self, batch: Batch) -> None:
        """The executor finished ``batch``: advance its requests and start the next batch."""
        st = self.stats
        k = batch.layers
        st.batches += k
        st.busy_time += self._now() - batch.started
        st.prompt_tokens += batch.prompt_tokens * k
        st.decode_tokens += batch.decode_seqs * k
        self._batch = None
        items = batch.items
        purge = self._purge
        if purge:  # requests cancelled while this batch ran stop here
            self._purge = False
            items = [it for it in items if it.rid in self._reqs]
        if self._compat:
            # the original takes KV after each layer: n entries per prompt, one per decode
            self.kv_used -= self._cancel_debt
            self._cancel_debt = 0
            self._take_layer_kv(batch, k - self._credited)
        layer = batch.layer + k - 1
        nxt = layer + 1
        b = self.b
        forward: list[_Item] | None = None
        if nxt < b:
            i = nxt - self.a
            for item in items:
                item.layer = nxt
            whole = not purge
            if whole and self._ending_early:
                for item in items:
                    if item.end <= nxt:
                        whole = False
                        break
            if whole:
                self._queues[i].extend(items)
                self._queued_prompts[i] += batch.prompt_requests
                self._queued_prompt_tokens[i] += batch.prompt_tokens
                self._queued_decodes[i] += batch.decode_seqs
                self._queued_decode_ctx[i] += batch.ctx_tokens
                self._queued += len(items)
            else:
                forward = []
                for item in items:
                    if nxt < item.end:
                        self._enqueue_moved(item)
                    else:
                        forward.append(item)
        else:
            forward = items
        self._busy = False
        self._cur = (layer - self.a + 1) % len(self._queues)
        if nxt == b and self._entry_started >= 0.0:
            # a run from the entry layer to the node's last (fused or layer by layer): its duration
            self._last_run_s = self._now() - self._entry_started
            self._entry_started = -1.0
        if forward:
            for item in forward:
                self._leave(item)
        if not self._busy:
            self._step()

    # ---- decode gathering (see the module's docstring) ----------------------------------------

    def _start_gather(self, cur: Any) -> bool:
        """Before a batch at local layer ``cur``: wait for the requests entering there that are on
        their way back and expected within ``gather`` x the last run (True: the node waits now)."""
        if self._queued_prompts[cur] or self._queued_decodes[cur] >= self._lim[2]:
            return False  # a prompt waits (it would wait longer), or the batch is full already
        entry = self.a + cur
        now = self._now()
        horizon = now + self._gather * self._last_run_s
        n = 0
        for req in self._out_reqs.values():
            if req.rt >= 0.0 and req.entry == entry and req.t_out + req.rt <= horizon:
                req.awaited = True
                n += 1
        if n == 0:
            return False
        self._awaiting = n
        self._gathering = True
        self._gather_gen += 1
        self._gather_from = now
        self.stats.gathers += 1
        self._clock.call_at(horizon, self._gather_timeout, self._gather_gen)
        return True

    def _gather_timeout(self, gen: Any) -> None:
        if gen == self._gather_gen and self._gathering and not self.stopped:
            self._end_gather()

    def _end_gather(self) -> None:
        """Stop waiting (every awaited request arrived, or the bound passed): start the batch."""
        for req in self._out_reqs.values():
            req.awaited = False
        self._awaiting = 0
        self._gathering = False
        self.stats.gather_wait += self._now() - self._gather_from
        self._no_gather = True
        if not self._busy and not self._kick_pending and not self.stopped:
            self._kick_pending = True
            self._soon(self._kick)

    def _returned(self, rid: Any, req: _Req) -> None:
        """Request ``rid`` is back at this node: its round trip is measured."""
        req.rt = self._now() - req.t_out
        req.t_out = -1.0
        del self._out_reqs[rid]
        if req.awaited:
            req.awaited = False
            self._awaiting -= 1
            if self._awaiting == 0 and self._gathering:
                self._end_gather()

    def _enqueue_moved(self, item: _Item) -> None:
        """``item`` joins the queue of its (next) layer ``item.layer``."""
        i = item.layer - self.a
        self._queues[i].append(item)
        if item.prompt:
            self._queued_prompts[i] += 1
            self._queued_prompt_tokens[i] += item.tokens
        else:
            self._queued_decodes[i] += 1
            self._queued_decode_ctx[i] += item.ctx
        self._queued += 1

    # ---- outbound -------------------------------------------------------------------------------

    def _leave(self, item: _Item) -> None:
        """``item`` ran its stage's last layer: send it on, or its token to the host."""
        if item.end != self.b:
            self._ending_early -= 1
        if item.rid not in self._reqs:  # cancelled while its batch ran
            return
        now = self._now()
        st = self.stats
        st.forwarded += 1
        if item.prompt:
            st.prompt_residence += now - item.arrived
            st.prompts_left += 1
        else:
            st.decode_residence += now - item.arrived
            st.decodes_left += 1
        route = item.route
        stage = item.stage
        if self._feedback:
            prev = SINK if stage == 0 else route[stage - 1][0]
            # (request_id, node_id, delay, sent_at)
            self._send(prev, make_feedback(item.rid, self.node_id, max(0.0, now - item.msg.sent_at), now))
        if stage + 1 < len(route):
            self._emit(item, route[stage + 1][0], route, now)
        elif item.end == self.num_layers:
            self._emit(item, SINK, route, now)
        elif self._policy is not None and item.msg.__class__ is PromptWork:
            if self._link_wait or not self._choose_and_emit(item, now):
                st.link_waits += 1
                self._link_wait.append(item)
        else:
            st.bad_messages += 1  # a decode with no next stage: its route is broken
            self._free(item.rid)

    def _choose_and_emit(self, item: _Item, now: float) -> bool:
        out = self._out
        if self._free_only:
            tp = self._transport
            free = [tp.link_idle(y) for y in out]
            j = self._policy.choose(free, self._peer_len)
            if j < 0:
                return False
        else:
            j = self._policy.choose()
        y = out[j]
        if y == SINK:
            self._emit(item, SINK, item.route, now)
        else:
            nb = self._next_layers[y][1]
            self._emit(item, y, (*item.route, (y, item.end, nb)), now)
        return True

    def _link_idle(self, dest: NodeRef) -> None:
        """A link went idle: send the prompts that wait for a free link, in order."""
        wait = self._link_wait
        now = self._now()
        while wait:
            if not self._choose_and_emit(wait[0], now):
                return
            wait.popleft()

    def _emit(self, item: _Item, dest: NodeRef, route: Any, now: float) -> None:
        msg = item.msg
        data = item.data
        if data is not None and data.__class__ is ExecFailure:
            self._fail(item, data.reason)
            return
        if dest == SINK:
            # (request_id, token_id, context_len, finished, sent_at, route, logprobs): the chosen
            # token (an int, or a SampledToken when the request asked for log-probabilities)
            lps: tuple = ()
            if data is None:
                tok = 0
            elif data.__class__ is SampledToken:
                tok, lps = data.token_id, ((data.token_id, data.logprob), *data.top)
            else:
                tok = data
            out: Any = make_token_result(
                item.rid,
                tok,
                msg.num_tokens if msg.__class__ is PromptWork else msg.context_len,
                False,
                now,
                route,
                lps,
            )
        elif msg.__class__ is PromptWork:
            # (request_id, query_id, route, stage, num_tokens, token_ids, max_tokens, sent_at,
            #  tensors, payload_bytes, then the sampling fields, context_ids, generated, priority): the hidden
            #  states computed, or modelled; the sampling parameters travel on to the last stage, and
            #  the first stage's token ids with them when the last stage needs them
            n = msg.num_tokens
            ctx_ids = msg.context_ids
            if msg.token_ids and msg.needs_context:
                ctx_ids = msg.token_ids
            tensors: tuple = ()
            modelled = 0
            if data is None:
                modelled = n * self._act
            else:
                tensors = (data,)
            out = make_prompt_work(
                item.rid, msg.query_id, route, item.stage + 1, n, (), msg.max_tokens, now, tensors, modelled,
                msg.temperature, msg.top_p, msg.seed, msg.top_k, msg.min_p, msg.presence_penalty,
                msg.frequency_penalty, msg.repetition_penalty, msg.min_tokens, msg.stop_token_ids, msg.logprobs,
                ctx_ids, msg.generated, msg.priority,
            )
        elif data is None:
            # (request_id, route, stage, context_len, token_id, sent_at, tensors, payload_bytes)
            out = make_decode_work(item.rid, route, item.stage + 1, msg.context_len, -1, now, (), self._act)
        else:
            out = make_decode_work(item.rid, route, item.stage + 1, msg.context_len, -1, now, (data,), 0)
        self._send(dest, out)
        req = self._reqs.get(item.rid)
        if req is not None:
            ctx_after = msg.num_tokens if msg.__class__ is PromptWork else msg.context_len
            req.ctx_done = ctx_after
            if ctx_after >= req.last_ctx:
                self._free(item.rid)
            elif self._gather > 0.0:
                req.t_out = now
                self._out_reqs[item.rid] = req

    def _fail(self, item: _Item, reason: str) -> None:
        """The executor could not compute ``item``: tell the host, and forget the request here."""
        self.stats.failed += 1
        self._send(SINK, Error(request_id=item.rid, code=int(ErrorCode.INTERNAL), text=f"node {self.node_id}: {reason}"))
        self._free(item.rid)

    def _observe(self, fb: Any) -> None:
        if self._policy is None:
            return
        try:
            j = self._out.index(fb.node_id)
        except ValueError:
            self.stats.bad_messages += 1
            return
        self._policy.observe(j, fb.delay)

    # ---- KV -------------------------------------------------------------------------------------

    def _settle_run(self) -> None:
        """Compat, before the KV use falls during a run of layers: take the KV of the run's layers
        that have finished (layer by layer, their overflow and peak checks came before the fall)
        and end the run at the layer running now."""
        batch = self._batch
        if batch is None or batch.layers - self._credited <= 1:
            return
        g = self._shorten(batch, 1)  # type: ignore[misc]
        self._take_layer_kv(batch, g - 1 - self._credited)
        self._credited = g - 1

    def _take_layer_kv(self, batch: Batch, layers: int) -> None:
        """Compat: ``batch`` takes its KV for ``layers`` layers, one layer at a time as the original
        does (n entries per prompt, one per decode), each checked against the capacity."""
        per = batch.prompt_tokens + batch.decode_seqs
        st = self.stats
        for _ in range(layers):
            self.kv_used += per
            if self.kv_used > self.kv_capacity:
                st.kv_overflows += 1
            if self.kv_used > st.kv_peak:
                st.kv_peak = self.kv_used

    def _free(self, rid: int) -> None:
        req = self._reqs.pop(rid, None)
        if req is None:
            self._mig_drop_in(rid)
            return
        self._mig_out.pop(rid, None)
        if req.t_out >= 0.0:
            self._returned(rid, req)  # it will not come back
        if self._release is not None:
            self._release(rid)
        if self._compat:
            self._settle_run()
            held = req.last_ctx * req.layers
        else:
            held = req.kv
        self.kv_used -= held
        if not self._compat and self._kv_wait:
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        wait = self._kv_wait
        while wait:
            item = wait[0]
            need = item.tokens * (item.end - item.layer)
            if self.kv_used + need > self.kv_capacity:
                return
            wait.popleft()
            req = self._reqs.get(item.rid)
            if req is None:  # cancelled while waiting
                continue
            self.kv_used += need
            req.kv += need
            if self.kv_used > self.stats.kv_peak:
                self.stats.kv_peak = self.kv_used
            self._enqueue(item)

    def _cancel(self, rid: int) -> None:
        queued = [it for q in self._queues for it in q if it.rid == rid]
        for i, q in enumerate(self._queues):
            kept = [it for it in q if it.rid != rid]
            if len(kept) != len(q):
                for it in q:
                    if it.rid == rid:
                        if it.prompt:
                            self._queued_prompts[i] -= 1
                            self._queued_prompt_tokens[i] -= it.tokens
                        else:
                            self._queued_decodes[i] -= 1
                            self._queued_decode_ctx[i] -= it.ctx
                        if it.layer == it.entry:
                            self._queued_host_tokens[i] -= it.tokens
                        if it.end != self.b:
                            self._ending_early -= 1
                        self._queued -= 1
                self._queues[i] = kept
        self._kv_wait = deque(it for it in self._kv_wait if it.rid != rid)
        self._link_wait = deque(it for it in self._link_wait if it.rid != rid)
        req = self._reqs.get(rid)
        if req is None:
            self._mig_drop_in(rid)
            return
        batch = self._batch
        running = [] if batch is None else [it for it in batch.items if it.rid == rid]
        if self._compat:
            self._settle_run()
        if running:
            self._purge = True
            if batch is not None and batch.layers > 1:
                self._shorten(batch, 1)  # type: ignore[misc]  # stop at the end of the running layer
        if self._compat:
            # what it holds here: its cached context on every stage layer, plus what its current
            # iteration has taken on the layers it has run (those of the running run of layers
            # that _settle_run has credited included; the running layer takes nothing yet: _done
            # adds its entries, less this debt)
            held = req.ctx_done * req.layers
            for it in queued:
                held += it.tokens * (it.layer - it.entry)
            for it in running:
                held += it.tokens * (it.layer - it.entry + self._credited)
            k = 1 if batch is None else batch.layers - self._credited
            self._cancel_debt += k * sum(it.tokens for it in running)
            self.kv_used -= held
            self._reqs.pop(rid, None)
            if self._release is not None:
                self._release(rid)
            if not self._busy and self._queued and not self._kick_pending:
                self._kick_pending = True
                self._soon(self._kick)
            return
        self._free(rid)


    # ---- live KV migration of a request's stage (docs/migration.md) -----------------------------

    def _mig_status(self, rid: int, dest: NodeRef, state: int, upto: int = -1, text: str = "") -> None:
        self._send(dest, MigrateStatus(request_id=rid, node_id=self.node_id, state=state, upto=upto, text=text))

    def _dial(self, node: Any, address: str) -> bool:
        """Open a link to ``node`` at ``address`` for a migration (a ZeroMQ transport; a network that
        knows every node has nothing to open). False when the address cannot be dialled."""
        connect = getattr(self._transport, "connect", None)
        if connect is None:
            return True
        try:
            connect(node, address)
        except Exception:  # an address the transport refuses
            return False
        return True

    def _mig_reserve(self, msg: Any) -> None:
        """Target: reserve KV for the request's stage, or refuse (the host sent this)."""
        rid = msg.request_id
        stage = msg.route[msg.stage]
        why = ""
        if self._compat:
            why = "compat mode takes no migrations"
        elif stage[0] != self.node_id or not self.a <= stage[1] < stage[2] <= self.b:
            why = f"node {self.node_id} does not hold layers [{stage[1]}, {stage[2]})"
        elif rid in self._reqs or rid in self._mig_in:
            why = f"request {rid} is here already"
        k = stage[2] - stage[1]
        need = msg.context_len * k
        if not why and self.kv_used + need > self.kv_capacity:
            why = f"{need} KV entries needed, {self.kv_capacity - self.kv_used} free"
        if not why and msg.address and not self._dial(msg.source, msg.address):
            why = f"cannot reach node {msg.source} at {msg.address}"
        if why:
            self.stats.migrate_refused += 1
            self._mig_status(rid, SINK, MigrateState.REFUSED, -1, why)
            return
        mv = _Move(msg.source)
        self.kv_used += need
        if self.kv_used > self.stats.kv_peak:
            self.stats.kv_peak = self.kv_used
        mv.kv = need
        mv.reserved = msg.context_len
        self._seq += 1
        mv.req = _Req(msg.max_context, k, self._seq, stage[1], msg.priority)
        self._mig_in[rid] = mv
        self._mig_status(rid, SINK, MigrateState.RESERVED, msg.context_len)

    def _mig_kv(self, sender: NodeRef, msg: Any) -> None:
        """Target: a chunk of the request's KV from its source."""
        rid = msg.request_id
        mv = self._mig_in.get(rid)
        if mv is None or sender != mv.peer or msg.first != mv.upto or mv.busy:
            self.stats.bad_messages += 1  # not the named source, or out of order
            return
        mv.busy = True
        shape: Any = getattr(msg.tensors[0], "shape", ()) if msg.tensors else ()
        if msg.first + msg.count > mv.req.last_ctx:
            self._mig_imported((mv, msg), f"positions up to {msg.first + msg.count}, past the request's last "
                                          f"context {mv.req.last_ctx}")
        elif msg.tensors and (len(shape) != 5 or shape[3] != msg.count):
            self._mig_imported((mv, msg), f"KV of shape {tuple(shape)} for {msg.count} positions")
        elif msg.tensors and self._import is not None:
            self._import(rid, msg.first, msg.tensors[0], self._mig_imported, (mv, msg))
        elif msg.tensors or (self._import is not None and msg.count):
            self._mig_imported((mv, msg), "KV tensors where none are expected" if msg.tensors else "no KV tensors")
        else:
            self._mig_imported((mv, msg), None)

    def _mig_imported(self, what: Any, error: Any) -> None:
        """Target: a chunk is in the cache (error: why it is not)."""
        mv: _Move
        mv, msg = what
        rid = msg.request_id
        if self._mig_in.get(rid) is not mv:  # aborted meanwhile (its import goes with the executor's release)
            if self._release is not None and rid not in self._reqs and rid not in self._mig_in:
                self._release(rid)
            return
        mv.busy = False
        if error is not None:
            self.stats.migrate_refused += 1
            self._mig_drop_in(rid)
            self._mig_status(rid, SINK, MigrateState.REFUSED, -1, f"node {self.node_id}: {error}")
            return
        upto = msg.first + msg.count
        mv.upto = upto
        if upto > mv.reserved:  # positions made at the source since the reservation
            extra = (upto - mv.reserved) * mv.req.layers
            mv.reserved = upto
            mv.kv += extra
            self.kv_used += extra
            if self.kv_used > self.stats.kv_peak:
                self.stats.kv_peak = self.kv_used
        if not msg.final:
            self._mig_status(rid, mv.peer, MigrateState.RECEIVED, upto)
            return
        # the whole context is here: the request's stage is this node's from now on
        del self._mig_in[rid]
        req = mv.req
        req.kv = mv.kv
        req.ctx_done = upto
        self._reqs[rid] = req
        self.stats.migrated_in += 1
        self._mig_status(rid, SINK, MigrateState.DONE, upto)
        if self.kv_used > self.kv_capacity:
            self._preempt(rid)

    def _mig_drop_in(self, rid: int) -> None:
        """Target: forget an incoming migration and what it holds."""
        mv = self._mig_in.pop(rid, None)
        if mv is None:
            return
        self.kv_used -= mv.kv
        if self._release is not None:
            self._release(rid)
        if self._kv_wait:
            self._admit_waiting()

    def _mig_start(self, msg: Any) -> None:
        """Source: begin copying the request's KV to the target while it goes on decoding here."""
        rid = msg.request_id
        req = self._reqs.get(rid)
        why = ""
        if req is None:
            why = f"request {rid} is not on node {self.node_id}"
        elif rid in self._mig_out:
            why = f"request {rid} is moving already"
        elif req.recompute or req.kv == 0:
            why = f"request {rid} holds no KV on node {self.node_id} now (preempted)"
        elif msg.target == self.node_id:
            why = "the target is this node"
        if why:
            self.stats.migrate_refused += 1
            self._mig_status(rid, SINK, MigrateState.REFUSED, -1, why)
            return
        if msg.address and not self._dial(msg.target, msg.address):
            self.stats.migrate_refused += 1
            self._mig_status(rid, SINK, MigrateState.REFUSED, -1, f"cannot reach node {msg.target} at {msg.address}")
            return
        mv = _Move(msg.target)
        self._mig_out[rid] = mv
        self._mig_next(rid, mv)

    def _mig_next(self, rid: int, mv: _Move) -> None:
        """Source: send the next chunk, or tell the host that only the tail is left."""
        left = self._reqs[rid].ctx_done - mv.upto
        if left <= self._mig_tail:
            if not mv.tail:
                mv.tail = True
                self._mig_status(rid, SINK, MigrateState.TAIL, mv.upto)
            return
        self._mig_send(rid, mv, min(left, self._mig_chunk), False)

    def _mig_send(self, rid: int, mv: _Move, count: int, final: bool) -> None:
        mv.busy = True
        mv.final = final
        if self._export is not None and count:
            self._export(rid, mv.upto, count, self._mig_exported, (mv, rid, mv.upto, count, final))
        else:
            self._mig_exported((mv, rid, mv.upto, count, final), None)

    def _mig_exported(self, what: Any, data: Any) -> None:
        """Source: a chunk is read out of the cache (None: modelled, or nothing to copy)."""
        mv: _Move
        mv, rid, first, count, final = what
        if self._mig_out.get(rid) is not mv:  # aborted, cancelled or finished meanwhile
            return
        if data is not None and data.__class__ is ExecFailure:
            self._mig_refuse_out(rid, data.reason)
            return
        req = self._reqs[rid]
        if data is None:
            size = count * req.layers * self._kv_token_bytes
            msg = MigrateKV(request_id=rid, first=first, count=count, final=final, sent_at=self._now(),
                            payload_bytes=size)
        else:
            size = int(getattr(data, "nbytes", 0))
            msg = MigrateKV(request_id=rid, first=first, count=count, final=final, sent_at=self._now(),
                            tensors=(data,))
        self.stats.migrate_bytes += size
        mv.upto = first + count
        self._send(mv.peer, msg)
        if final:
            self.stats.migrated_out += 1

    def _mig_received(self, sender: NodeRef, msg: Any) -> None:
        """Source: the target acknowledged a chunk: send the next (flow control, one chunk at a time)."""
        rid = msg.request_id
        mv = self._mig_out.get(rid)
        if mv is None or sender != mv.peer or msg.state != MigrateState.RECEIVED or not mv.busy or mv.final:
            self.stats.bad_messages += 1
            return
        mv.busy = False
        if mv.finish:
            self._mig_finish(rid)
        else:
            self._mig_next(rid, mv)

    def _mig_finish(self, rid: int) -> None:
        """Source, at the request's quiet moment (the host holds its next decode): the last chunk."""
        mv = self._mig_out.get(rid)
        if mv is None or mv.final:
            self.stats.bad_messages += 1
            return
        if mv.busy:  # a chunk is on its way: the last one follows its acknowledgement
            mv.finish = True
            return
        self._mig_send(rid, mv, self._reqs[rid].ctx_done - mv.upto, True)

    def _mig_refuse_out(self, rid: int, why: str) -> None:
        self._mig_out.pop(rid, None)
        self.stats.migrate_refused += 1
        self._mig_status(rid, SINK, MigrateState.REFUSED, -1, f"node {self.node_id}: {why}")

    def _mig_abort(self, rid: int) -> None:
        """The host called the migration off: the source keeps the request, the target lets go."""
        if self._mig_out.pop(rid, None) is not None:
            self.stats.migrate_aborted += 1
        elif rid in self._mig_in:
            self.stats.migrate_aborted += 1
            self._mig_drop_in(rid)


# The compiled build: setup.py compiles this very file, with the C types of
# helix_async/_ext/_worker.pxd, into helix_async._ext._worker; it replaces the classes above unless
# HELIX_NO_EXTENSIONS is set.  ``WorkerPy`` stays the pure-Python class (the specification, and
# what the agreement tests run the compiled one against).
WorkerPy = Worker
if __name__ == "helix_async.worker":
    from helix_async import _ext

    _compiled = _ext.load("_worker")
    if _compiled is not None:
        # (not a plain assignment: Cython refuses to rebind a cdef class name, even here)
        globals()["Worker"] = _compiled.Worker
