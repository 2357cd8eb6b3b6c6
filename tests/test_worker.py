"""The compute node (helix_async.worker) with a stub executor and a recording transport.

The executor finishes every batch exactly ``STEP`` seconds of loop time after it starts and records
what it was given; the transport records what the worker sends.  Work is handed to the worker by
calling its transport handler (``on_message``) at chosen virtual times.  Expected batches, times,
KV counts and messages are worked out by hand in each test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from helix_async.clock import LoopClock
from helix_async.executors.base import Batch, Executor
from helix_async.executors.cost_model import HOST_COPY_S_PER_BYTE, CostModelExecutor
from helix_async.ids import SINK, SOURCE, NodeRef, Route
from helix_async.interp import BatchTimer
from helix_async.messages import Cancel, DecodeWork, Feedback, Heartbeat, PromptWork, TokenResult
from helix_async.model import GpuProfile
from helix_async.settings import WorkerSettings
from helix_async.transport import Transport
from helix_async.vloop import VirtualTimeLoop
from helix_async.worker import BatchLimits, Worker, WorkerPy

STEP = 1.0  # seconds every stub batch takes
ACT = 8  # activation bytes per token
WIDE = BatchLimits(prompt_requests=64, prompt_tokens=10_000, decode_seqs=64, decode_context=1_000_000)


class StubExecutor:
    """Completes each batch STEP seconds after it starts; records (start, layer, request ids, totals)."""

    def __init__(self, clock: LoopClock) -> None:
        self.clock = clock
        self.batches: list[tuple[float, int, tuple[int, ...]]] = []
        self.totals: list[tuple[int, int, int, int, int]] = []

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        now = self.clock.now()
        self.batches.append((now, batch.layer, tuple(it.rid for it in batch.items)))
        self.totals.append(
            (
                batch.prompt_requests,
                batch.prompt_tokens,
                batch.decode_seqs,
                batch.ctx_tokens,
                batch.host_tokens,
            )
        )
        self.clock.call_at(now + STEP, done, batch)

    def duration(self, batch: Batch) -> float:
        return STEP


class RecordingTransport:
    """Records every send as (time, dest, message); link_idle answers from ``busy``."""

    def __init__(self, clock: LoopClock, node: NodeRef) -> None:
        self.clock = clock
        self._node = node
        self.sent: list[tuple[float, NodeRef, Any]] = []
        self.handler: Callable[[NodeRef, Any], None] | None = None
        self.idle_handler: Callable[[NodeRef], None] | None = None
        self.busy: set[NodeRef] = set()
        self.closed = False

    @property
    def node(self) -> NodeRef:
        return self._node

    def set_handler(self, handler: Callable[[NodeRef, Any], None]) -> None:
        self.handler = handler

    def send(self, dest: NodeRef, msg: Any) -> None:
        self.sent.append((self.clock.now(), dest, msg))

    def link_idle(self, dest: NodeRef) -> bool:
        return dest not in self.busy

    def set_idle_handler(self, handler: Callable[[NodeRef], None]) -> None:
        self.idle_handler = handler

    async def close(self) -> None:
        self.closed = True




class Node:
    """A worker with its loop, clock, stub executor and recording transport."""

    def __init__(
        self,
        loop: VirtualTimeLoop,
        *,
        node_id: int = 0,
        layers: tuple[int, int] = (0, 2),
        num_layers: int = 2,
        limits: BatchLimits = WIDE,
        kv: int = 1_000_000,
        **kw: Any,
    ) -> None:
        self.loop = loop
        self.clock = LoopClock(loop)
        self.ex = StubExecutor(self.clock)
        self.tp = RecordingTransport(self.clock, node_id)
        live = {k: kw.pop(k) for k in ("policy", "peer_queue_len") if k in kw}
        cls = kw.pop("worker_cls", Worker)  # the compiled build by default; WorkerPy is the specification
        settings = WorkerSettings(
            layers=layers, num_layers=num_layers, limits=limits, kv_capacity=kv, activation_bytes=ACT, **kw
        )
        self.w = cls(node_id, self.clock, self.tp, self.ex, settings, **live)
        self.w.start()

    def at(self, t: float, msg: Any, sender: NodeRef = SOURCE) -> None:
        """Run the loop up to ``t`` and deliver ``msg`` then."""
        self.loop.run_until(t)
        self.w.on_message(sender, msg)

    def prompt(
        self, t: float, rid: int, route: Route, n: int, *, stage: int = 0, max_tokens: int = 1
    ) -> None:
        self.at(t, prompt(rid, route, n, stage=stage, max_tokens=max_tokens, sent_at=t))

    def decode(self, t: float, rid: int, route: Route, ctx_len: int, *, stage: int = 0) -> None:
        self.at(t, decode(rid, route, ctx_len, stage=stage, sent_at=t))

    def sent(self) -> list[tuple[float, NodeRef, str, int]]:
        return [(t, d, type(m).__name__, m.request_id) for t, d, m in self.tp.sent]


def prompt(
    rid: int, route: Route, n: int, *, stage: int = 0, max_tokens: int = 1, sent_at: float = 0.0
) -> PromptWork:
    return PromptWork(
        request_id=rid,
        query_id=rid,
        route=route,
        stage=stage,
        num_tokens=n,
        token_ids=(),
        max_tokens=max_tokens,
        sent_at=sent_at,
        payload_bytes=4 * n,
    )


def decode(rid: int, route: Route, ctx_len: int, *, stage: int = 0, sent_at: float = 0.0) -> DecodeWork:
    return DecodeWork(
        request_id=rid,
        route=route,
        stage=stage,
        context_len=ctx_len,
        token_id=-1,
        sent_at=sent_at,
        payload_bytes=4,
    )


R01: Route = ((0, 0, 2),)  # the whole 2-layer model on node 0


def test_worker_and_stubs_satisfy_the_interfaces(loop: VirtualTimeLoop) -> None:
    nd = Node(loop)
    assert isinstance(nd.ex, Executor)
    assert isinstance(nd.tp, Transport)
    assert nd.tp.handler == nd.w.on_message
    assert nd.tp.idle_handler is None  # only free-link policies listen for idle links
    with pytest.raises(ValueError, match=r"layers \[2, 2\)"):
        Worker(
            0,
            nd.clock,
            nd.tp,
            nd.ex,
            WorkerSettings(layers=(2, 2), num_layers=2, limits=WIDE, kv_capacity=1, activation_bytes=1),
        )
    loop.run_until_complete(nd.w.stop())
    assert nd.w.stopped and nd.tp.closed


# --------------------------------------------------------------------------------------------------
# Batching: FIFO with skip, limits, prompts and decodes mixed
# --------------------------------------------------------------------------------------------------


def test_same_instant_arrivals_share_a_batch_and_each_layer_runs_in_turn(loop: VirtualTimeLoop) -> None:
    nd = Node(loop)
    nd.prompt(0.0, 1, R01, 3)
    nd.prompt(0.0, 2, R01, 4)
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1, 2)), (1.0, 1, (1, 2))]
    # (prompt requests, prompt tokens, decode seqs, ctx tokens, host tokens): the host-to-GPU copy
    # is charged where requests enter the node
    assert nd.ex.totals == [(2, 7, 0, 0, 7), (2, 7, 0, 0, 0)]
    st = nd.w.stats
    assert (st.batches, st.busy_time, st.prompt_tokens, st.decode_tokens) == (2, 2.0, 14, 0)
    assert (st.forwarded, st.prompts_left, st.prompt_residence) == (2, 2, 4.0)
    assert st.queued_peak == 2 and nd.w.queued == 0


def test_fifo_with_skip_prompts(loop: VirtualTimeLoop) -> None:
    lim = BatchLimits(prompt_requests=2, prompt_tokens=10, decode_seqs=4, decode_context=1000)
    nd = Node(loop, layers=(0, 1), num_layers=1, limits=lim)
    r: Route = ((0, 0, 1),)
    for rid, n in [(1, 6), (2, 6), (3, 3), (4, 1)]:
        nd.prompt(0.0, rid, r, n)
    loop.run_until(10.0)
    # 1 (6 tokens) taken; 2 would make 12 > 10: skipped; 3 makes 9; 4 would be a third prompt
    assert nd.ex.batches == [(0.0, 0, (1, 3)), (1.0, 0, (2, 4))]
    assert nd.ex.totals == [(2, 9, 0, 0, 9), (2, 7, 0, 0, 7)]
    assert nd.sent() == [(1.0, SINK, "TokenResult", 1), (1.0, SINK, "TokenResult", 3)] + [
        (2.0, SINK, "TokenResult", 2),
        (2.0, SINK, "TokenResult", 4),
    ]


@pytest.mark.parametrize("cls", [WorkerPy, Worker] if Worker is not WorkerPy else [WorkerPy],
                         ids=lambda c: c.__module__)
def test_priorities_order_the_batch_the_kv_wait_and_preemption(loop: VirtualTimeLoop, cls: type) -> None:
    """With requests of several priorities (PromptWork.priority, a lower number first) the batch
    takes the more urgent first when not all fit; decodes carry their prompt's priority; a prompt
    waiting for KV waits behind its own or more urgent ones only; preemption takes the least
    urgent first, whatever their age, and never one more urgent than the request that overflows
    (the pure-Python specification and the compiled build alike)."""
    lim = BatchLimits(prompt_requests=2, prompt_tokens=100, decode_seqs=4, decode_context=1000)
    nd = Node(loop, layers=(0, 1), num_layers=1, limits=lim, worker_cls=cls)
    r: Route = ((0, 0, 1),)
    for rid, prio in [(1, 0), (2, 3), (3, -1), (4, 0), (5, -1)]:
        nd.at(0.0, dataclasses.replace(prompt(rid, r, 2), priority=prio))
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (3, 5)), (1.0, 0, (1, 4)), (2.0, 0, (2,))]

    nd = Node(loop, kv=20, worker_cls=cls)
    nd.at(10.0, dataclasses.replace(prompt(1, R01, 6), priority=0))  # 12 of 20 entries
    nd.at(10.0, dataclasses.replace(prompt(2, R01, 5), priority=0))  # 10 more do not fit: waits
    nd.at(10.0, dataclasses.replace(prompt(3, R01, 5), priority=-2))  # waits, ahead of 2
    nd.at(10.0, dataclasses.replace(prompt(4, R01, 1), priority=-1))  # 2 fit, but 3 is more urgent: waits behind it
    assert [it.rid for it in nd.w._kv_wait] == [3, 4, 2]
    loop.run_until(20.0)
    # 1 leaves and frees 12: 3 (10) and 4 (2) go; 2 after 3 and 4 leave
    assert [b[2] for b in nd.ex.batches] == [(1,), (1,), (3, 4), (3, 4), (2,), (2,)]

    nd = Node(loop, kv=27, worker_cls=cls)
    nd.at(20.0, dataclasses.replace(prompt(1, R01, 4, max_tokens=2), priority=0))  # 8 entries
    nd.at(20.0, dataclasses.replace(prompt(2, R01, 5, max_tokens=3), priority=1))  # 10, older but less urgent
    nd.at(20.0, dataclasses.replace(prompt(3, R01, 4, max_tokens=3), priority=0))  # 8: 26 in use
    loop.run_until(23.0)
    nd.decode(23.0, 1, R01, 5)  # +2 = 28 > 27: request 2 (the least urgent) loses its 10 entries, not 3
    assert nd.w._reqs[2].recompute and not nd.w._reqs[3].recompute and nd.w.kv_used == 18
    assert nd.w._reqs[1].prio == 0 and nd.w._reqs[2].prio == 1
    nd.decode(23.0, 2, R01, 6)  # 2 recomputes its context: it waits for KV as a prompt, at its priority
    assert [(it.rid, it.prio, it.prompt) for it in nd.w._kv_wait] == [(2, 1, True)]

    # the less urgent request overflowing does not take the KV of a more urgent one
    nd = Node(loop, kv=20, worker_cls=cls)
    nd.at(30.0, dataclasses.replace(prompt(1, R01, 4, max_tokens=3), priority=-1))  # 8 entries
    nd.at(30.0, dataclasses.replace(prompt(2, R01, 5, max_tokens=4), priority=5))  # 10: 18 in use
    loop.run_until(33.0)
    nd.decode(33.0, 2, R01, 6)  # +2 = 20: fits
    loop.run_until(36.0)
    nd.decode(36.0, 2, R01, 7)  # +2 = 22 > 20: only 1 (more urgent) holds KV besides it: nobody is preempted
    assert not nd.w._reqs[1].recompute and nd.w._reqs[1].kv == 8 and nd.w.stats.kv_preemptions == 0


def test_a_prompt_above_the_limits_runs_alone(loop: VirtualTimeLoop) -> None:
    lim = BatchLimits(prompt_requests=2, prompt_tokens=10, decode_seqs=4, decode_context=1000)
    nd = Node(loop, layers=(0, 1), num_layers=1, limits=lim)
    r: Route = ((0, 0, 1),)
    nd.prompt(0.0, 1, r, 25)
    nd.prompt(0.0, 2, r, 30)
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1,)), (1.0, 0, (2,))]
    assert nd.ex.totals == [(1, 25, 0, 0, 25), (1, 30, 0, 0, 30)]
    assert nd.w.queued == 0


def test_fifo_with_skip_decodes_by_sequences_and_context(loop: VirtualTimeLoop) -> None:
    lim = BatchLimits(prompt_requests=8, prompt_tokens=1000, decode_seqs=2, decode_context=8)
    nd = Node(loop, layers=(0, 1), num_layers=1, limits=lim)
    r: Route = ((0, 0, 1),)
    sizes = {1: 4, 2: 5, 3: 3, 4: 2}
    for rid, n in sizes.items():
        nd.prompt(0.0, rid, r, n, max_tokens=5)
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1, 2, 3, 4))]
    for rid, n in sizes.items():
        nd.decode(10.0, rid, r, n + 1)  # context n already cached
    loop.run_until(20.0)
    # 1 (ctx 4); 2 would make 9 > 8: skipped; 3 makes 7; 4 would be a third sequence
    assert nd.ex.batches[1:] == [(10.0, 0, (1, 3)), (11.0, 0, (2, 4))]
    assert nd.ex.totals[1:] == [(0, 0, 2, 7, 2), (0, 0, 2, 7, 2)]
    assert nd.w.stats.decode_tokens == 4
    assert [(m.request_id, m.context_len) for _, _, m in nd.tp.sent[4:]] == [(1, 5), (3, 4), (2, 6), (4, 3)]


def test_prompts_and_decodes_mix_in_one_batch(loop: VirtualTimeLoop) -> None:
    nd = Node(loop)
    nd.prompt(0.0, 1, R01, 5, max_tokens=3)
    loop.run_until(5.0)
    nd.decode(5.0, 1, R01, 6)
    nd.prompt(5.0, 2, R01, 7)
    loop.run_until(10.0)
    assert nd.ex.batches[2:] == [(5.0, 0, (1, 2)), (6.0, 1, (1, 2))]
    assert nd.ex.totals[2:] == [(1, 7, 1, 5, 8), (1, 7, 1, 5, 0)]
    assert nd.sent()[1:] == [(7.0, SINK, "TokenResult", 1), (7.0, SINK, "TokenResult", 2)]


# --------------------------------------------------------------------------------------------------
# One layer at a time, cycling; partial-inference stages
# --------------------------------------------------------------------------------------------------


def test_layers_run_one_at_a_time_cycling_to_the_next_non_empty(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, layers=(0, 3), num_layers=3)
    nd.prompt(0.0, 1, ((0, 0, 3),), 1)
    nd.prompt(0.0, 2, ((9, 0, 1), (0, 1, 3)), 2, stage=1)  # enters at layer 1 (partial inference)
    nd.prompt(0.0, 3, ((9, 0, 2), (0, 2, 3)), 3, stage=1)  # enters at layer 2
    nd.prompt(1.5, 4, ((0, 0, 3),), 4)  # arrives while layer 1 runs
    loop.run_until(20.0)
    assert nd.ex.batches == [
        (0.0, 0, (1,)),
        (1.0, 1, (2, 1)),
        (2.0, 2, (3, 2, 1)),
        (3.0, 0, (4,)),  # after the last layer the pointer wraps to layer 0
        (4.0, 1, (4,)),
        (5.0, 2, (4,)),
    ]
    # host tokens: those entering the node at the batch's layer
    assert [t[4] for t in nd.ex.totals] == [1, 2, 3, 4, 0, 0]
    assert nd.sent() == [(3.0, SINK, "TokenResult", 3), (3.0, SINK, "TokenResult", 2)] + [
        (3.0, SINK, "TokenResult", 1),
        (6.0, SINK, "TokenResult", 4),
    ]


def test_an_idle_node_starts_at_the_first_layer_with_work(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, layers=(0, 3), num_layers=3)
    nd.prompt(0.0, 1, ((9, 0, 2), (0, 2, 3)), 3, stage=1)
    loop.run_until(1.5)
    nd.prompt(1.5, 2, ((9, 0, 1), (0, 1, 3)), 2, stage=1)
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 2, (1,)), (1.5, 1, (2,)), (2.5, 2, (2,))]


def test_prompt_leaving_its_stage_is_forwarded_to_the_next_stage(loop: VirtualTimeLoop) -> None:
    # node 0 holds [0, 3) of a 4-layer model; request 1's stage ends at layer 2 (partial inference
    # on node 1), request 2's at layer 3
    nd = Node(loop, layers=(0, 3), num_layers=4)
    r1: Route = ((0, 0, 2), (1, 2, 4))
    r2: Route = ((0, 0, 3), (1, 3, 4))
    nd.prompt(0.0, 1, r1, 5, max_tokens=4)
    nd.prompt(0.0, 2, r2, 3, max_tokens=2)
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1, 2)), (1.0, 1, (1, 2)), (2.0, 2, (2,))]
    (t1, d1, m1), (t2, d2, m2) = nd.tp.sent
    assert (t1, d1, t2, d2) == (2.0, 1, 3.0, 1)
    assert m1 == PromptWork(
        request_id=1,
        query_id=1,
        route=r1,
        stage=1,
        num_tokens=5,
        token_ids=(),
        max_tokens=4,
        sent_at=2.0,
        payload_bytes=5 * ACT,
    )
    assert m2 == PromptWork(
        request_id=2,
        query_id=2,
        route=r2,
        stage=1,
        num_tokens=3,
        token_ids=(),
        max_tokens=2,
        sent_at=3.0,
        payload_bytes=3 * ACT,
    )
    # decodes follow the route: DecodeWork to the next stage, one token's activations
    nd.decode(10.0, 1, r1, 6)
    loop.run_until(20.0)
    assert nd.tp.sent[2] == (
        12.0,
        1,
        DecodeWork(
            request_id=1, route=r1, stage=1, context_len=6, token_id=-1, sent_at=12.0, payload_bytes=ACT
        ),
    )
    assert nd.w.stats.forwarded == 3


def test_last_layer_of_the_model_returns_a_token_to_the_sink(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, node_id=1, layers=(2, 4), num_layers=4)
    r: Route = ((0, 0, 2), (1, 2, 4))
    nd.prompt(0.0, 7, r, 5, stage=1, max_tokens=3)
    loop.run_until(5.0)
    nd.decode(5.0, 7, r, 6, stage=1)
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 2, (7,)), (1.0, 3, (7,)), (5.0, 2, (7,)), (6.0, 3, (7,))]
    assert nd.tp.sent == [
        (
            2.0,
            SINK,
            TokenResult(request_id=7, token_id=0, context_len=5, finished=False, sent_at=2.0, route=r),
        ),
        (
            7.0,
            SINK,
            TokenResult(request_id=7, token_id=0, context_len=6, finished=False, sent_at=7.0, route=r),
        ),
    ]


# --------------------------------------------------------------------------------------------------
# KV cache, default mode: reservation, waiting, preemption, release
# --------------------------------------------------------------------------------------------------


def test_kv_reserved_at_entry_and_freed_after_the_final_iteration(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, kv=100)
    nd.prompt(0.0, 1, R01, 6, max_tokens=3)  # its final iteration has context 6 + 3 - 1 = 8
    assert nd.w.kv_snapshot() == (12, 100)  # 6 tokens x 2 layers, reserved on arrival
    loop.run_until(5.0)
    assert nd.w.kv_used == 12
    nd.decode(5.0, 1, R01, 7)
    assert nd.w.kv_used == 14
    loop.run_until(10.0)
    assert nd.w.kv_used == 14
    nd.decode(10.0, 1, R01, 8)
    assert nd.w.kv_used == 16
    loop.run_until(11.5)
    assert nd.w.kv_used == 16  # still running its second layer
    loop.run_until(15.0)
    assert nd.w.kv_used == 0
    assert nd.w.stats.kv_peak == 16
    # the request is forgotten: a further decode is not accepted
    nd.decode(15.0, 1, R01, 9)
    assert nd.w.stats.bad_messages == 1


def test_prompt_that_does_not_fit_waits_fifo_until_kv_frees(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, kv=20)
    nd.prompt(0.0, 1, R01, 6)  # 12 entries
    nd.prompt(0.0, 2, R01, 5)  # 10 more would be 22 > 20: waits
    nd.prompt(0.0, 3, R01, 1)  # 2 would fit, but nobody overtakes a waiting prompt
    assert nd.w.stats.kv_waits == 2
    assert nd.w.kv_used == 12 and nd.w.queued == 1
    loop.run_until(10.0)
    # 1 leaves (its only iteration) at 2.0 and frees 12: 2 and 3 are admitted and batched at once
    assert nd.ex.batches == [(0.0, 0, (1,)), (1.0, 1, (1,)), (2.0, 0, (2, 3)), (3.0, 1, (2, 3))]
    assert nd.w.stats.kv_peak == 12
    assert nd.w.kv_used == 0
    assert nd.w.stats.kv_preemptions == 0


def test_decode_overflow_preempts_the_youngest_other_request(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, kv=27)
    nd.prompt(0.0, 1, R01, 4, max_tokens=2)  # 8 entries, final context 5
    nd.prompt(0.0, 2, R01, 5, max_tokens=3)  # 10
    nd.prompt(0.0, 3, R01, 4, max_tokens=3)  # 8: 26 in use
    loop.run_until(3.0)
    assert nd.w.kv_used == 26
    nd.decode(3.0, 1, R01, 5)  # +2 = 28 > 27: request 3 (the youngest) loses its 8 entries
    assert nd.w.stats.kv_preemptions == 1
    assert nd.w.kv_used == 20
    assert nd.w.stats.kv_peak == 26  # the peak is taken after the preemption
    # 3's next step recomputes its 4 cached tokens plus the new one: a 5-token prompt needing 10
    # entries, which do not fit (30 > 27): it waits until 1 finishes (at 5.0) and frees 10
    nd.decode(3.0, 3, R01, 5)
    assert nd.w.stats.recomputed_tokens == 4
    assert nd.w.stats.kv_waits == 1
    loop.run_until(20.0)
    assert nd.ex.batches[2:] == [(3.0, 0, (1,)), (4.0, 1, (1,)), (5.0, 0, (3,)), (6.0, 1, (3,))]
    assert nd.ex.totals[4] == (1, 5, 0, 0, 5)  # run as a prompt of the whole context
    assert nd.w.kv_used == 20  # 2 holds 10, 3 holds 10 again
    assert nd.sent()[3:] == [(5.0, SINK, "TokenResult", 1), (7.0, SINK, "TokenResult", 3)]


def test_recomputed_decode_reports_its_context_length(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, kv=20)
    nd.prompt(0.0, 1, R01, 4, max_tokens=3)  # 8
    nd.prompt(0.0, 2, R01, 5, max_tokens=2)  # 10: 18 in use
    loop.run_until(3.0)
    nd.decode(3.0, 1, R01, 5)  # 20: fits
    nd.decode(3.0, 2, R01, 6)  # 22: preempts 1; 2 finishes (and frees) at 5.0
    loop.run_until(10.0)
    nd.decode(10.0, 1, R01, 6)  # recomputes: 5 cached + 1
    loop.run_until(20.0)
    assert nd.w.stats.kv_preemptions == 1 and nd.w.stats.recomputed_tokens == 5
    assert nd.ex.batches[-2:] == [(10.0, 0, (1,)), (11.0, 1, (1,))]
    t, dest, last = nd.tp.sent[-1]
    assert (t, dest, last.request_id) == (12.0, SINK, 1)
    assert last.context_len == 6


def test_preemption_never_takes_from_the_request_that_overflows(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, kv=10)
    nd.prompt(0.0, 1, R01, 5, max_tokens=4)  # 10: full
    loop.run_until(3.0)
    nd.decode(3.0, 1, R01, 6)  # 12 > 10, nobody else to preempt: runs over capacity
    assert nd.w.stats.kv_preemptions == 0
    assert nd.w.kv_used == 12 and nd.w.stats.kv_peak == 12
    loop.run_until(10.0)
    assert nd.sent()[-1] == (5.0, SINK, "TokenResult", 1)


# --------------------------------------------------------------------------------------------------
# KV cache, compat mode (the original): taken per layer after it runs, overflow counted
# --------------------------------------------------------------------------------------------------


def test_compat_kv_taken_after_each_layer_and_overflows_counted(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, kv=10, compat=True)
    nd.prompt(0.0, 1, R01, 4, max_tokens=2)  # final context 4 + 2 - 1 = 5
    nd.prompt(0.0, 2, R01, 4, max_tokens=2)
    assert nd.w.kv_used == 0  # nothing reserved on arrival
    loop.run_until(1.5)
    assert nd.w.kv_used == 8 and nd.w.stats.kv_overflows == 0
    loop.run_until(5.0)
    assert nd.w.kv_used == 16 and nd.w.stats.kv_overflows == 1
    nd.decode(5.0, 1, R01, 5)
    nd.decode(5.0, 2, R01, 5)
    loop.run_until(6.5)
    assert nd.w.kv_used == 18 and nd.w.stats.kv_overflows == 2
    loop.run_until(10.0)
    # each held 5 tokens x 2 layers after its final iteration; both freed
    assert nd.w.kv_used == 0
    assert nd.w.stats.kv_overflows == 3
    assert nd.w.stats.kv_peak == 20
    assert (nd.w.stats.kv_waits, nd.w.stats.kv_preemptions) == (0, 0)
    assert [t for t, _, _ in nd.tp.sent] == [2.0, 2.0, 7.0, 7.0]


def test_compat_host_copy_charged_on_the_first_layer_for_everything_received(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, layers=(0, 3), num_layers=3, compat=True)
    nd.prompt(0.0, 1, ((9, 0, 1), (0, 1, 3)), 2, stage=1)  # enters at layer 1
    loop.run_until(0.5)
    nd.prompt(0.5, 2, ((0, 0, 3),), 3)
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 1, (1,)), (1.0, 2, (1,)), (2.0, 0, (2,)), (3.0, 1, (2,)), (4.0, 2, (2,))]
    # nothing charged at layer 1; layer 0 pays for both requests received since
    assert [t[4] for t in nd.ex.totals] == [0, 0, 5, 0, 0]


# --------------------------------------------------------------------------------------------------
# Cancel
# --------------------------------------------------------------------------------------------------


def test_cancel_removes_queued_work_and_frees_kv(loop: VirtualTimeLoop) -> None:
    lim = BatchLimits(prompt_requests=1, prompt_tokens=100, decode_seqs=4, decode_context=1000)
    nd = Node(loop, kv=20, limits=lim)
    nd.prompt(0.0, 1, R01, 4)  # 8
    nd.prompt(0.0, 2, R01, 4)  # 8, queued behind 1 (one prompt per batch)
    nd.prompt(0.0, 3, R01, 4)  # 8 more would be 24 > 20: waits for KV
    loop.run_until(0.5)
    assert nd.ex.batches == [(0.0, 0, (1,))]
    assert (nd.w.kv_used, nd.w.queued, nd.w.stats.kv_waits) == (16, 1, 1)
    nd.at(0.5, Cancel(request_id=2))
    assert nd.w.queued == 1  # 2 removed, 3 admitted into the freed entries
    assert nd.w.kv_used == 16
    nd.at(0.5, Cancel(request_id=99))  # unknown: nothing happens
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1,)), (1.0, 1, (1,)), (2.0, 0, (3,)), (3.0, 1, (3,))]
    assert nd.sent() == [(2.0, SINK, "TokenResult", 1), (4.0, SINK, "TokenResult", 3)]
    assert nd.w.kv_used == 0
    assert nd.w.stats.bad_messages == 0


def test_cancel_of_a_prompt_waiting_for_kv(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, kv=10)
    nd.prompt(0.0, 1, R01, 5)  # 10: full
    nd.prompt(0.0, 2, R01, 2)  # waits
    nd.at(0.5, Cancel(request_id=2))
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1,)), (1.0, 1, (1,))]
    assert nd.w.kv_used == 0 and nd.w.queued == 0


def test_cancel_while_running_drops_the_request_when_its_batch_ends(loop: VirtualTimeLoop) -> None:
    nd = Node(loop)
    nd.prompt(0.0, 1, R01, 4, max_tokens=5)
    nd.at(0.5, Cancel(request_id=1))
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1,))]
    assert nd.tp.sent == []


def test_compat_cancel_frees_only_what_the_request_took(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, compat=True)
    nd.prompt(0.0, 1, R01, 4, max_tokens=11)
    nd.prompt(0.0, 2, R01, 4, max_tokens=11)
    loop.run_until(5.0)
    assert nd.w.kv_used == 16  # 4 tokens x 2 layers each
    nd.at(5.0, Cancel(request_id=2))
    assert nd.w.kv_used == 8


# --------------------------------------------------------------------------------------------------
# Messages that are not for this node, or malformed: counted, never raised
# --------------------------------------------------------------------------------------------------


def test_unexpected_messages_are_counted(loop: VirtualTimeLoop) -> None:
    nd = Node(loop)
    nd.prompt(0.0, 1, R01, 4, max_tokens=5)
    loop.run_until(5.0)
    bad = [
        prompt(2, ((3, 0, 2),), 4),  # work for node 3
        decode(1, ((3, 0, 2),), 5),  # a decode of a known request for node 3
        decode(42, R01, 5),  # a decode for a request this node does not know
        Heartbeat(node_id=1, seq=1, now=0.0),
        TokenResult(request_id=1, token_id=0, context_len=5, finished=False, sent_at=0.0),
        "garbage",
        prompt(3, ((0, 0, 1), (1, 1, 2)), 4, stage=1),  # stage 1 is node 1's
    ]
    for i, msg in enumerate(bad, 1):
        nd.at(5.0, msg)
        assert nd.w.stats.bad_messages == i
    loop.run_until(10.0)
    assert nd.ex.batches == [(0.0, 0, (1,)), (1.0, 1, (1,))]
    assert nd.w.queued == 0


def test_work_for_layers_this_node_does_not_hold_is_counted(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, layers=(0, 2), num_layers=4)
    nd.at(0.0, prompt(1, ((0, 0, 3), (1, 3, 4)), 4))  # the stage runs past the node's layers
    nd.at(0.0, prompt(2, ((0, 1, 4),), 4))
    assert nd.w.stats.bad_messages == 2
    loop.run_until(10.0)
    assert nd.ex.batches == [] and nd.tp.sent == []
    assert nd.w.kv_used == 0


def test_refused_prompt_leaves_no_request_behind(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, layers=(0, 2), num_layers=4)
    nd.at(0.0, prompt(1, ((0, 0, 3), (1, 3, 4)), 4, max_tokens=5))
    nd.at(0.0, decode(1, ((0, 0, 2), (1, 2, 4)), 5))
    assert nd.w.stats.bad_messages == 2


def test_stage_index_past_the_route_is_counted(loop: VirtualTimeLoop) -> None:
    nd = Node(loop)
    nd.at(0.0, prompt(1, R01, 4, stage=3))
    nd.at(0.0, decode(1, R01, 5, stage=1))
    assert nd.w.stats.bad_messages == 2


# --------------------------------------------------------------------------------------------------
# Per-hop scheduling: policies, free links, feedback
# --------------------------------------------------------------------------------------------------


class StubPolicy:
    """Returns the scripted choices in turn; records what it was asked and told."""

    def __init__(self, choices: Sequence[int]) -> None:
        self.choices = list(choices)
        self.asked: list[tuple[Any, Any]] = []
        self.observed: list[tuple[int, float]] = []

    def choose(self, free: Sequence[bool] | None = None, queue_len: Any = None) -> int:
        self.asked.append((None if free is None else list(free), queue_len))
        return self.choices.pop(0)

    def observe(self, link: int, delta_t: float) -> None:
        self.observed.append((link, delta_t))


def test_policy_chooses_the_next_hop_and_extends_the_route(loop: VirtualTimeLoop) -> None:
    pol = StubPolicy([1, 0])
    nd = Node(
        loop,
        layers=(0, 2),
        num_layers=4,
        policy=pol,
        out_links=(1, 2),
        next_layers={1: (2, 4), 2: (1, 3)},
    )
    nd.prompt(0.0, 1, ((0, 0, 2),), 3, max_tokens=4)
    nd.prompt(5.0, 2, ((0, 0, 2),), 2, max_tokens=4)
    loop.run_until(10.0)
    (_, d1, m1), (_, d2, m2) = nd.tp.sent
    assert (d1, m1.route, m1.stage) == (2, ((0, 0, 2), (2, 2, 3)), 1)  # partial: from layer 2 on
    assert (d2, m2.route, m2.stage) == (1, ((0, 0, 2), (1, 2, 4)), 1)
    assert pol.asked == [(None, None), (None, None)]  # Swarm-like: no free-link test
    # decodes follow the route they carry; the policy is not asked again
    nd.decode(10.0, 1, ((0, 0, 2), (2, 2, 3), (3, 3, 4)), 4)
    loop.run_until(20.0)
    assert nd.tp.sent[-1][1] == 2 and type(nd.tp.sent[-1][2]) is DecodeWork
    assert len(pol.asked) == 2


def test_free_links_only_prompt_waits_for_an_idle_link(loop: VirtualTimeLoop) -> None:
    pol = StubPolicy([-1, 0, 0])
    peer: Callable[[NodeRef], int] = lambda y: 0  # noqa: E731
    nd = Node(
        loop,
        layers=(0, 2),
        num_layers=4,
        policy=pol,
        out_links=(1,),
        next_layers={1: (2, 4)},
        free_links_only=True,
        peer_queue_len=peer,
    )
    assert nd.tp.idle_handler is not None
    nd.tp.busy = {1}
    nd.prompt(0.0, 1, ((0, 0, 2),), 3)
    nd.prompt(0.0, 2, ((0, 0, 2),), 2)
    loop.run_until(5.0)
    assert nd.tp.sent == []
    assert nd.w.stats.link_waits == 2
    assert pol.asked == [([False], peer)]  # the second waits behind the first without asking
    nd.tp.busy = set()
    loop.run_until(6.0)
    nd.tp.idle_handler(1)  # the link went idle: waiting prompts are sent in order
    assert [(t, d, m.request_id, m.route) for t, d, m in nd.tp.sent] == [
        (6.0, 1, 1, ((0, 0, 2), (1, 2, 4))),
        (6.0, 1, 2, ((0, 0, 2), (1, 2, 4))),
    ]
    assert pol.asked[1:] == [([True], peer), ([True], peer)]
    assert pol.choices == []


def test_swarm_feedback_goes_to_the_previous_hop(loop: VirtualTimeLoop) -> None:
    nd = Node(loop, node_id=1, layers=(2, 4), num_layers=4, feedback=True)
    r: Route = ((0, 0, 2), (1, 2, 4))
    nd.at(1.0, prompt(5, r, 3, stage=1, max_tokens=2, sent_at=0.5))
    loop.run_until(10.0)
    assert nd.tp.sent == [
        (3.0, 0, Feedback(request_id=5, node_id=1, delay=2.5, sent_at=3.0)),
        (
            3.0,
            SINK,
            TokenResult(request_id=5, token_id=0, context_len=3, finished=False, sent_at=3.0, route=r),
        ),
    ]
    # the first stage reports to the host (SINK)
    nd0 = Node(loop, node_id=0, layers=(0, 2), num_layers=4, feedback=True)
    nd0.at(10.0, prompt(6, r, 3, sent_at=9.75))
    loop.run_until(20.0)
    assert nd0.tp.sent[0] == (12.0, SINK, Feedback(request_id=6, node_id=0, delay=2.25, sent_at=12.0))
    assert nd0.tp.sent[1][1] == 1


def test_feedback_is_observed_by_the_policy(loop: VirtualTimeLoop) -> None:
    pol = StubPolicy([])
    nd = Node(
        loop, layers=(0, 2), num_layers=4, policy=pol, out_links=(1, 2), next_layers={1: (2, 4), 2: (2, 4)}
    )
    nd.at(0.0, Feedback(request_id=1, node_id=2, delay=0.75, sent_at=0.0))
    nd.at(0.0, Feedback(request_id=1, node_id=7, delay=0.75, sent_at=0.0))  # not an out-link
    assert pol.observed == [(1, 0.75)]
    assert nd.w.stats.bad_messages == 1
    plain = Node(loop)  # no policy: feedback is ignored, not counted
    plain.at(0.0, Feedback(request_id=1, node_id=2, delay=0.75, sent_at=0.0))
    assert plain.w.stats.bad_messages == 0


# --------------------------------------------------------------------------------------------------
# The cost-model executor
# --------------------------------------------------------------------------------------------------

# One layer: prompt(P) = P / 2048 s on the grid (0, 1024) -> (0, 0.5); decode(D) = D / 8 s on the
# grid (0, 2, 4) -> (0, 0.25, 0.5). Every value below is exact in binary floating point.
PX, PS, DX, DS = (0.0, 1024.0), (0.0, 0.5), (0.0, 2.0, 4.0), (0.0, 0.25, 0.5)


def exact_profile() -> GpuProfile:
    return GpuProfile("X", PX, PS, DX, DS, BatchTimer(PX, PS, DX, DS))


def batch(p_tok: int, d_seq: int, host: int = 0) -> Batch:
    return Batch(0, [], 1 if p_tok else 0, p_tok, d_seq, 0, host)


def test_cost_model_prices_prompt_plus_decode(loop: VirtualTimeLoop) -> None:
    # Not a speed check: the cost model's *output* is a duration in virtual seconds, priced from
    # the hand-made profile above (PX/PS, DX/DS); these are its exact values, nothing is timed.
    clock = LoopClock(loop)
    ex = CostModelExecutor(clock, exact_profile(), activation_bytes=0)
    assert isinstance(ex, Executor)
    assert ex.duration(batch(256, 0)) == 0.125
    assert ex.duration(batch(0, 2)) == 0.25
    assert ex.duration(batch(0, 3)) == 0.375
    assert ex.duration(batch(0, 1)) == 0.25  # one decode is charged as two: 2 x decode(1)
    assert ex.duration(batch(512, 4)) == 0.25 + 0.5
    assert ex.duration(batch(0, 0)) == 0.0
    slow = CostModelExecutor(clock, exact_profile(), activation_bytes=0, time_scale=4.0)
    assert slow.duration(batch(256, 2)) == 4.0 * (0.125 + 0.25)
    with pytest.raises(ValueError, match="time_scale must be > 0"):
        CostModelExecutor(clock, exact_profile(), activation_bytes=0, time_scale=0.0)


def test_cost_model_charges_the_host_copy(loop: VirtualTimeLoop) -> None:
    assert HOST_COPY_S_PER_BYTE == 1.0 / 4e9 + 1.0 / 5e9
    ex = CostModelExecutor(LoopClock(loop), exact_profile(), activation_bytes=16384)
    assert ex.duration(batch(256, 0, host=0)) == 0.125
    assert ex.duration(batch(256, 0, host=300)) == 0.125 + 300 * (16384.0 * (1.0 / 4e9 + 1.0 / 5e9))


def test_cost_model_completes_each_batch_after_its_price(loop: VirtualTimeLoop) -> None:
    clock = LoopClock(loop)
    ex = CostModelExecutor(clock, exact_profile(), activation_bytes=0)
    done: list[tuple[float, int]] = []
    loop.run_until(1.0)
    before = loop.callbacks_run
    ex.run(batch(256, 0), lambda b: done.append((clock.now(), b.prompt_tokens)))
    ex.run(batch(0, 3), lambda b: done.append((clock.now(), b.decode_seqs)))
    loop.run_until(5.0)
    assert done == [(1.125, 256), (1.375, 3)]
    assert loop.callbacks_run - before == 2  # one timer per batch
    assert (ex.batches, ex.busy_time) == (2, 0.5)


def test_worker_on_the_cost_model(loop: VirtualTimeLoop) -> None:
    clock = LoopClock(loop)
    ex = CostModelExecutor(clock, exact_profile(), activation_bytes=0)
    tp = RecordingTransport(clock, 0)
    w = Worker(
        0, clock, tp, ex, WorkerSettings(layers=(0, 2), num_layers=2, limits=WIDE, kv_capacity=10_000, activation_bytes=ACT)
    )
    w.start()
    w.on_message(SOURCE, prompt(1, R01, 256, max_tokens=2))
    loop.run_until(1.0)
    w.on_message(SOURCE, decode(1, R01, 257))
    w.on_message(SOURCE, prompt(2, R01, 512))
    loop.run_until(5.0)
    # prompt: 2 layers x 0.125; then one batch of a decode (charged as two: 0.25) and a 512-token
    # prompt (0.25) per layer
    assert [(t, m.request_id) for t, _, m in tp.sent] == [(0.25, 1), (2.0, 1), (2.0, 2)]
    assert w.stats.busy_time == 0.25 + 2 * 0.5 and w.stats.batches == 4
    assert w.kv_used == 0


# --------------------------------------------------------------------------------------------------
# Decode gathering: a batch waits for the decodes on their way back that are expected soon
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Worker, WorkerPy], ids=["default", "pure"])
@pytest.mark.parametrize("gather", [0.0, 0.5])
def test_decodes_split_by_a_round_trip_are_gathered_again(loop: VirtualTimeLoop, cls: Any, gather: float) -> None:
    """Two requests share a prompt batch; the host answers request 1 in 0.1 s and request 2 in
    0.3 s, so their first decodes come back apart.  Without gathering they take turns from then on;
    with it the node waits (at most 0.5 x its 2-s run) for the one due back soon.  Layer-0 batches
    worked out by hand (STEP 1 s per layer, 2 layers, 3 decodes each)."""
    clock = LoopClock(loop)
    ex = StubExecutor(clock)
    tp = RecordingTransport(clock, 0)
    answer = {1: 0.1, 2: 0.3}  # the host's round trip per request, s
    record = tp.send

    def send(dest: NodeRef, msg: Any) -> None:  # the host: a token back comes back as a decode
        record(dest, msg)
        if isinstance(msg, TokenResult) and msg.context_len < 3 + 3:  # prompt of 3, max_tokens 4
            loop.call_at(clock.now() + answer[msg.request_id], w.on_message, SOURCE,
                         decode(msg.request_id, R01, msg.context_len + 1))

    tp.send = send  # type: ignore[method-assign]
    w = cls(0, clock, tp, ex, WorkerSettings(layers=(0, 2), num_layers=2, limits=WIDE, kv_capacity=10_000,
                                             activation_bytes=ACT, gather=gather))
    w.start()
    w.on_message(SOURCE, prompt(1, R01, 3, max_tokens=4))
    w.on_message(SOURCE, prompt(2, R01, 3, max_tokens=4))
    loop.run_until(30.0)
    layer0 = [(round(t, 6), rids) for t, layer, rids in ex.batches if layer == 0]
    if gather:
        assert layer0 == [(0.0, (1, 2)), (2.1, (1,)), (4.2, (2, 1)), (6.5, (1, 2)), (8.8, (2,))]
        assert w.stats.gathers == 2
        assert w.stats.gather_wait == pytest.approx(0.1 + 0.2)
    else:
        assert layer0 == [(0.0, (1, 2)), (2.1, (1,)), (4.1, (2,)), (6.1, (1,)), (8.1, (2,)), (10.1, (1,)), (12.1, (2,))]
        assert w.stats.gathers == 0
    assert w.kv_used == 0 and not w._out_reqs  # both finished; nothing awaited


def _two_requests_back_once(loop: VirtualTimeLoop, cls: Any) -> tuple[Any, StubExecutor]:
    """A node (gather 0.5) whose 2-s run of requests 1 and 2 ends at 2.05; both come back at once
    (a measured round trip of 0.05 s) and leave again at 4.05."""
    clock = LoopClock(loop)
    ex = StubExecutor(clock)
    tp = RecordingTransport(clock, 0)
    w = cls(0, clock, tp, ex, WorkerSettings(layers=(0, 2), num_layers=2, limits=WIDE, kv_capacity=10_000,
                                             activation_bytes=ACT, gather=0.5))
    w.start()
    w.on_message(SOURCE, prompt(1, R01, 3, max_tokens=9))
    w.on_message(SOURCE, prompt(2, R01, 3, max_tokens=9))
    loop.run_until(2.05)
    w.on_message(SOURCE, decode(1, R01, 4))
    w.on_message(SOURCE, decode(2, R01, 4))
    loop.run_until(4.1)
    return w, ex


@pytest.mark.parametrize("cls", [Worker, WorkerPy], ids=["default", "pure"])
def test_gathering_waits_no_longer_than_its_bound(loop: VirtualTimeLoop, cls: Any) -> None:
    """A request expected back soon that does not come: the batch starts when the bound (0.5 x the
    node's last 2-s run) has passed, without it."""
    w, ex = _two_requests_back_once(loop, cls)  # request 1 comes back again, request 2 never does
    w.on_message(SOURCE, decode(1, R01, 5))
    loop.run_until(30.0)
    layer0 = [(round(t, 6), rids) for t, layer, rids in ex.batches if layer == 0]
    assert layer0 == [(0.0, (1, 2)), (2.05, (1, 2)), (5.1, (1,))]  # 4.1 + 0.5 x 2.0
    assert w.stats.gathers == 1 and w.stats.gather_wait == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [Worker, WorkerPy], ids=["default", "pure"])
def test_a_batch_with_a_prompt_does_not_wait(loop: VirtualTimeLoop, cls: Any) -> None:
    """As the bound test, but a new prompt is queued when request 1 comes back: the batch starts at
    once with both, and request 2 is not waited for."""
    w, ex = _two_requests_back_once(loop, cls)
    w.on_message(SOURCE, prompt(3, R01, 5))
    w.on_message(SOURCE, decode(1, R01, 5))
    loop.run_until(30.0)
    layer0 = [(round(t, 6), rids) for t, layer, rids in ex.batches if layer == 0]
    assert layer0 == [(0.0, (1, 2)), (2.05, (1, 2)), (4.1, (3, 1))]
    assert w.stats.gathers == 0
