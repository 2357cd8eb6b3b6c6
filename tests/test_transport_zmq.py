"""The ZeroMQ transport on loopback, on a real event loop (uvloop where installed): ordered delivery
with sender names, acknowledgements and idleness, tensors, retries across a restarted peer,
duplicate and malformed frames dropped and counted, and a silent peer reported within 2 s of loop
time (on a clock the test steps, so the CPU's speed does not matter).

Every wait is for a state (a message delivered, a link idle, a counter reached), bounded only to
fail instead of hanging."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio
from polling import SteppedClock, wait_until_async

from helix_async.clock import LoopClock
from helix_async.ids import SINK, SOURCE, NodeRef
from helix_async.messages import Cancel, DecodeWork, Heartbeat
from helix_async.transport.base import Transport, TransportError
from helix_async.transport.zmq import ZmqTransport

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a base dependency off Windows
    uvloop = None


def run(coro: Callable[[], Awaitable[None]], timeout: float = 300.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro(), timeout)

    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())


class Inbox:
    def __init__(self, tp: ZmqTransport) -> None:
        self.got: list[tuple[NodeRef, Any]] = []
        tp.set_handler(lambda s, m: self.got.append((s, m)))


def test_ordered_delivery_names_acks_and_idle() -> None:
    async def main() -> None:
        clock = LoopClock()
        host = ZmqTransport(SOURCE, clock)
        w = ZmqTransport(3, clock)
        assert isinstance(host, Transport)
        await host.start()
        await w.start()
        assert host.address.startswith("tcp://127.0.0.1:") and not host.address.endswith(":*")
        hin, win = Inbox(host), Inbox(w)
        idle: list[NodeRef] = []
        host.set_idle_handler(idle.append)
        host.connect(3, w.address)
        w.connect(SOURCE, host.address)
        for i in range(50):
            host.send(3, Cancel(request_id=i, reason="x"))
        assert not host.link_idle(3)
        await wait_until_async(lambda: len(win.got) == 50)
        assert [m.request_id for _, m in win.got] == list(range(50))
        assert {s for s, _ in win.got} == {SOURCE}
        await wait_until_async(lambda: host.link_idle(3))
        assert idle == [3]
        w.send(SINK, Heartbeat(node_id=3, seq=1, now=0.0))  # SINK and SOURCE are both the host
        await wait_until_async(lambda: len(hin.got) == 1)
        assert hin.got[0][0] == 3
        with pytest.raises(TransportError, match="no link to 9"):
            host.send(9, Cancel(request_id=0))
        await host.close()
        await w.close()
        assert host.stats.unsent_at_close == 0 and w.drops.total == 0
        with pytest.raises(TransportError, match="closed"):
            host.send(3, Cancel(request_id=0))

    run(main)


def test_tensors_travel_as_frames_and_names_map() -> None:
    async def main() -> None:
        clock = LoopClock()
        a = ZmqTransport(0, clock, name="w-abc")
        b = ZmqTransport(1, clock)
        await a.start()
        await b.start()
        bin_ = Inbox(b)
        b.name_peer("w-abc", 0)
        a.connect(1, b.address)
        h = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
        a.send(1, DecodeWork(request_id=5, route=((0, 0, 2), (1, 2, 4)), stage=1, context_len=9, token_id=-1,
                             sent_at=1.5, tensors=(h,)))
        await wait_until_async(lambda: len(bin_.got) == 1)
        sender, msg = bin_.got[0]
        assert sender == 0 and np.array_equal(msg.tensors[0], h) and msg.context_len == 9
        await a.close()
        await b.close()

    run(main)


def test_messages_sent_to_a_restarted_peer_arrive_once_in_order() -> None:
    async def main() -> None:
        clock = LoopClock()
        a = ZmqTransport(0, clock, retry_after_s=0.2, heartbeat_s=0.05, dead_after_s=1.0)
        b = ZmqTransport(1, clock)
        await a.start()
        addr = await b.start()
        a.connect(1, addr)
        await b.close()  # the peer goes away before anything is sent
        for i in range(5):
            a.send(1, Cancel(request_id=i))
        await wait_until_async(lambda: a.stats.retried >= 5, what="all five resent while the peer is away")
        b2 = ZmqTransport(1, clock, bind=addr)  # comes back on the same address
        await b2.start()
        inbox = Inbox(b2)
        await wait_until_async(lambda: len(inbox.got) == 5 and a.link_idle(1))
        # one more message: it travels behind every copy sent before it on the link, so once it is
        # here, all of them have arrived, and none was delivered twice
        a.send(1, Cancel(request_id=5))
        await wait_until_async(lambda: len(inbox.got) >= 6 and a.link_idle(1))
        assert [m.request_id for _, m in inbox.got] == list(range(6))
        await a.close()
        await b2.close()

    run(main)


def test_duplicates_and_malformed_frames_are_dropped_and_counted() -> None:
    async def main() -> None:
        clock = LoopClock()
        b = ZmqTransport(1, clock)
        await b.start()
        inbox = Inbox(b)
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.IDENTITY, b"7")
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(b.address)
        from helix_async.codec import encode

        epoch = os.urandom(8)

        def hdr(kind: bytes, seq: int, ep: bytes = epoch) -> bytes:
            return struct.pack("<c8sQ", kind, ep, seq)

        def data(seq: int, msg: Any) -> list[bytes]:
            tag, fields, *rest = encode(msg)
            return [hdr(b"D", seq) + bytes(tag) + bytes(fields), *rest]

        good = data(0, Cancel(request_id=1))
        await raw.send_multipart(good)
        await raw.send_multipart(good)  # a duplicate
        await raw.send_multipart([b"D"])  # no header
        await raw.send_multipart([hdr(b"Z", 0), b"x"])  # unknown kind
        await raw.send_multipart([b"D" + b"short", b"x"])  # a header too short
        await raw.send_multipart([hdr(b"D", 1) + b"\x03\xc1"])  # bad codec
        await raw.send_multipart(data(5, Cancel(request_id=9)))  # gap
        await raw.send_multipart(data(2, Cancel(request_id=2)))
        await wait_until_async(lambda: len(inbox.got) == 2)
        await wait_until_async(lambda: b.stats.bad_frames == 3 and b.drops.total == 1)
        assert [(s, m.request_id) for s, m in inbox.got] == [(7, 1), (7, 2)]
        assert b.stats.duplicates == 1 and b.stats.out_of_order == 1

        async def ack() -> int:
            assert await raw.poll(60_000), "no acknowledgement within 60 s"
            f = await raw.recv_multipart()
            assert len(f) == 1 and len(f[0]) == 17 and f[0][:1] == b"A" and f[0][1:9] == epoch, f
            return int(struct.unpack("<c8sQ", f[0])[2])

        # the duplicate (and the gap) are acknowledged at once, without waiting for a heartbeat
        acks = [await ack()]
        # a heartbeat is answered with the cumulative acknowledgement: the next sequence number
        # expected (3: 0-2 arrived, 5 was dropped at the gap)
        await raw.send_multipart([hdr(b"H", 3)])
        while acks[-1] != 3:
            acks.append(await ack())
        assert acks == sorted(acks) and set(acks) <= {1, 2, 3}
        raw.close(0)
        ctx.term()
        await b.close()

    run(main)


def test_a_peer_that_stops_answering_is_reported_within_two_seconds() -> None:
    """The host's transport runs on a clock the test steps one heartbeat period (0.25 s, the
    default timings) at a time: after each step its heartbeat round runs, and an answered heartbeat
    is waited for, so the rule is checked at exact times however slow the machine is: a peer that
    answers is never reported; one that stops is reported at the first round after 1.5 s of
    silence (``dead_after_s``), so within 2 s of its last answer; one that answers again is back."""
    hb = 0.25  # ZmqTransport's default heartbeat_s (dead_after_s: 1.5)

    async def main() -> None:
        clock = SteppedClock()
        host = ZmqTransport(SOURCE, clock)  # default timings
        w = ZmqTransport(4, LoopClock())
        await host.start()
        await w.start()
        win = Inbox(w)
        host.connect(4, w.address)
        await wait_until_async(lambda: clock.sleeps >= 1, what="the host's heartbeat loop started")
        lost: list[tuple[NodeRef, float]] = []
        back: list[NodeRef] = []
        host.on_peer_lost = lambda p: lost.append((p, clock.now()))
        host.on_peer_back = back.append

        async def step() -> None:
            rounds = clock.sleeps
            clock.advance(hb)
            await wait_until_async(lambda: clock.sleeps > rounds, what="the host's heartbeat round")

        # 2 s of a live peer: each step's heartbeat answered (a message sent before the step is
        # acknowledged with it, so the link is idle once the answer is in)
        for i in range(8):
            host.send(4, Cancel(request_id=i))
            await step()
            await wait_until_async(lambda: host.link_idle(4), what="the heartbeat's answer")
            assert host.alive(4) and not lost
        assert [m.request_id for _, m in win.got] == list(range(8))
        t_stop = clock.now()  # its last answer
        await w.close()
        silent = 0.0
        while not lost:
            assert silent < 5.0, "a silent peer was not reported"
            await step()
            silent = clock.now() - t_stop
            assert silent > 1.5 or not lost, f"reported lost after {silent} s of silence"
        assert lost == [(4, t_stop + silent)] and 1.5 < silent <= 2.0
        assert not host.alive(4) and host.stats.peers_lost == 1
        w2 = ZmqTransport(4, LoopClock(), bind=w.address)
        await w2.start()

        def back_or_step() -> bool:
            if back:
                return True
            # another heartbeat round: one reaches w2 once the host's socket has reconnected
            clock.advance(hb)
            return False

        await wait_until_async(back_or_step, interval=0.05, what="the peer answering again")
        assert back == [4] and host.alive(4) and host.stats.peers_lost == 1
        await host.close()
        await w2.close()

    run(main)


def test_the_observers_own_late_loop_is_not_a_peers_silence() -> None:
    """The host's loop stalls for 3 s (its clock jumps 3 s in one step: its heartbeat timer fires
    2.75 s late) while the peer stays alive: the peer is not reported lost (the lag is measured,
    ``loop_lag_max``, and discounted); a peer that then really stops is still reported after 1.5 s
    of its own silence."""
    hb = 0.25

    async def main() -> None:
        clock = SteppedClock()
        host = ZmqTransport(SOURCE, clock)  # default timings: dead after 1.5 s
        w = ZmqTransport(4, LoopClock())
        await host.start()
        await w.start()
        host.connect(4, w.address)
        await wait_until_async(lambda: clock.sleeps >= 1, what="the host's heartbeat loop started")
        lost: list[NodeRef] = []
        host.on_peer_lost = lost.append

        async def step(dt: float) -> None:
            rounds = clock.sleeps
            clock.advance(dt)
            await wait_until_async(lambda: clock.sleeps > rounds, what="the host's heartbeat round")

        for i in range(3):
            host.send(4, Cancel(request_id=i))
            await step(hb)
            await wait_until_async(lambda: host.link_idle(4), what="the heartbeat's answer")
        await step(3.0)  # the stall
        assert host.stats.loop_lag_max == pytest.approx(3.0 - hb) and not lost and host.alive(4)
        for _ in range(4):  # and it goes on answering
            await step(hb)
            await wait_until_async(lambda: host.link_idle(4), what="the heartbeat's answer")
        assert not lost
        t_stop = clock.now()
        await w.close()
        while not lost:
            assert clock.now() - t_stop < 5.0, "a silent peer was not reported"
            await step(hb)
        assert lost == [4] and 1.5 < clock.now() - t_stop <= 2.0
        await host.close()

    run(main)


def test_an_oversized_frame_is_refused_and_an_outbox_keeps_a_bounded_backlog() -> None:
    """MAXMSGSIZE: a peer sending a frame over the inbox's limit is disconnected by ZeroMQ before
    anything reaches the node, and the inbox goes on serving others; an outbox whose peer never
    acknowledges keeps at most ``max_unacked`` messages (the rest dropped and counted)."""

    async def main() -> None:
        clock = LoopClock()
        w = ZmqTransport(3, clock, max_message_bytes=4096)
        src = ZmqTransport(SOURCE, clock, max_unacked=3)
        await w.start()
        await src.start()
        win = Inbox(w)
        ctx = zmq.asyncio.Context()
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        events = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        big.connect(w.address)
        try:
            await big.send_multipart([b"D" + bytes(16), bytes(1 << 20)])  # 1 MiB: over the limit
            await asyncio.wait_for(events.recv_multipart(), 60)  # ZeroMQ hung up on it
            src.connect(3, w.address)
            src.send(3, Cancel(request_id=1, reason="small"))
            await wait_until_async(lambda: win.got, what="the small message")
            # nothing of the big frame reached the transport (not even to be dropped as malformed)
            assert [m.request_id for _, m in win.got] == [1] and w.stats.bad_frames == 0 and w.drops.total == 0
            src.connect(4, "tcp://127.0.0.1:9")  # nobody there: nothing is ever acknowledged
            for i in range(5):
                src.send(4, Cancel(request_id=i))
            assert src.unacked(4) == 3 and src.stats.overflowed == 2
        finally:
            big.disable_monitor()
            events.close(0)
            big.close(0)
            ctx.term()
            await src.close()
            await w.close()

    run(main)


def test_bind_errors_are_clear() -> None:
    async def main() -> None:
        clock = LoopClock()
        a = ZmqTransport(0, clock)
        addr = await a.start()
        b = ZmqTransport(1, clock, bind=addr)
        with pytest.raises(TransportError, match="cannot bind"):
            await b.start()
        await b.close()
        await a.close()

    run(main)
