"""The ZeroMQ transport: the real network under the :class:`~helix_async.transport.base.Transport`
interface (pyzmq sockets read from the asyncio loop; the only module that imports ``zmq``).

Sockets.  Every endpoint binds one ROUTER, its inbox (``bind``: an ephemeral port by default; the
address it got is :attr:`ZmqTransport.address`), and connects one DEALER per peer it sends to, its
outbox, whose ZeroMQ identity is the endpoint's name (:attr:`ZmqTransport.name`): ``host`` for the
coordinator, the node id for an assigned worker, any other string before that.  The inbox maps a
sender's identity to the ``NodeRef`` its handler sees (``host`` is ``SOURCE``, digits a node id,
other names as given to :meth:`ZmqTransport.name_peer`, else the name itself).  Work goes worker to
worker directly; only what concerns the host goes to the host.

Every link message starts with a 17-byte header: a kind byte, the sender's epoch (8 bytes) and a
sequence number (8 bytes, little-endian).  DEALER -> ROUTER (after the identity frame ROUTER
adds)::

    data       [b"D" epoch seq + codec tag + codec fields, *codec tensor frames]
    heartbeat  [b"H" epoch seq]      seq: the oldest message not yet acknowledged (or the next one)

and back, on the same connection, ROUTER -> DEALER::

    ack        [b"A" epoch seq]      seq: the next one expected (cumulative; answers data and heartbeats)

(A small message is one frame: ZeroMQ's cost per message part dominates small messages; tensors
stay frames of their own, sent without a copy.)

Nothing is lost silently.  Messages of a link are numbered from 0 per sender ``epoch`` (random per
transport, so a restarted peer starts a new sequence); the receiver delivers them in order exactly
once (a duplicate is acknowledged again and dropped, a message after a gap waits for the retry).
Acknowledgements are cumulative and lazy: one answers each heartbeat and every ``ack_every``-th
message, so none lies on the path of the work it acknowledges.  The sender keeps every
unacknowledged message and resends all of them, in order, when the oldest has waited
``retry_after_s`` (1 s, at least two heartbeats); ``link_idle`` is therefore conservative (a link
counts as busy until its messages are acknowledged).  Heartbeats go every ``heartbeat_s`` on every
outbox; a peer from which no acknowledgement has come for ``dead_after_s`` (1.5 s: with the
heartbeat period, a silent peer is reported within 2 s) is reported through ``on_peer_lost``
(once; ``on_peer_back`` if it answers again).  Silence is measured on the peer's side only: the
watch measures how late its own timer fired (the loop's lag: a long handler, a blocking call),
drains what arrived meanwhile before judging, and discounts that lag, so a peer is declared lost
because it went silent, not because this loop was late (``stats.loop_lag_max``).  A frame that is
malformed or a message that does not decode is dropped and counted (``stats``, ``drops``), never
raised.

Who sent a message.  With CURVE, the inbox names a sender by the key it authenticated with (ZAP's
``User-Id`` on the frame: ``curve.key_bindings``: the host, node N for ``worker-N``'s key), never
by the ZeroMQ identity the sender chose; without CURVE there is nothing better than that identity
(plaintext links authenticate no one: docs/security.md).

Bounds.  Every inbox refuses frames larger than the largest legal one (``MAXMSGSIZE``,
:func:`inbox_limit`: a peer sending more is disconnected before anything is allocated); per peer,
ZeroMQ queues at most ``hwm`` messages each way, and an outbox keeps at most ``max_unacked``
messages unacknowledged (past that a send is dropped and counted, ``stats.overflowed``).

Timing reads the clock abstraction (the runtime's ``MonotonicClock``); nothing here schedules work.
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import zmq

from ..clock import Clock
from ..codec import DEFAULT_LIMITS, DropCounter, Limits, decode_or_drop, encode
from ..ids import SINK, SOURCE, NodeRef
from .base import Handler, TransportError
from .curve import CurveKeys, key_bindings, split_address

__all__ = ["HOST_NAME", "ZmqStats", "ZmqTransport", "inbox_limit"]


def _auth_log() -> Any:
    import logging

    return logging.getLogger("helix_async.transport.auth")

#: The coordinator's identity on the wire.
HOST_NAME = "host"

#: The longest context a prompt may carry on the wire (tokens): far above any model here (SmolLM2:
#: 8,192); what bounds a prompt's fields frame.
MAX_CONTEXT_TOKENS = 1 << 20
#: Bytes of a message's fields frame beyond its token-id arrays: scalars, a route of at most
#: ``Limits.max_route_stages`` stages, names, reasons and error texts (a worker's error names an
#: exception; 64 KiB is far above any we write).
_FIELDS_SLACK = 64 << 10
#: msgpack's largest encoding of one uint32 token id
_ID_BYTES = 5
#: What the wire adds to a frame the limit counts: ZeroMQ checks MAXMSGSIZE on every frame it
#: decodes, the handshake's commands (CURVE's INITIATE carries metadata) and an encrypted frame's
#: box (nonce, MAC, command name) included: 4 KiB is far above all of them.
_WIRE_SLACK = 4096
#: Inbound link state kept per sender at most (a restarted sender's old state is evicted first).
_MAX_INBOUND = 4096


def inbox_limit(max_context_tokens: int = MAX_CONTEXT_TOKENS, limits: Limits = DEFAULT_LIMITS,
                tensors: bool = True) -> int:
    """The largest legal frame an inbox may receive, bytes (its ``MAXMSGSIZE``): a tensor or
    modelled-payload frame is at most ``limits.max_frame_bytes`` (the codec refuses more); the
    first frame is the 18-byte link header and codec tag plus the fields, whose largest is a
    prompt's: its token ids and context ids (``max_context_tokens`` each, 5 bytes apiece), its
    stop ids (no more than its context), and the rest (``_FIELDS_SLACK``). tensors: False for an
    inbox no tensor is ever sent to (the host's: tokens, stats, registrations)."""
    fields = _HEADER.size + 1 + 3 * _ID_BYTES * max_context_tokens + _FIELDS_SLACK
    if not tensors:
        return _HEADER.size + 1 + _FIELDS_SLACK * 16  # a NodeStats of thousands of peers, long error texts
    return max(limits.max_frame_bytes, fields)

_DATA, _HEARTBEAT, _ACK = b"D", b"H", b"A"
_HEADER = struct.Struct("<c8sQ")  # kind, epoch, seq: 17 bytes
_pack = _HEADER.pack
_unpack = _HEADER.unpack
_unpack_from = _HEADER.unpack_from
# plain ints: pyzmq's option enums cost microseconds per call on the hot path
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)


class OutboxHealth(NamedTuple):
    """One outbox's health, as the transport measured it."""

    bytes_sent: int  # bytes of first transmissions so far
    retries: int  # messages sent again (unacknowledged within the retry time)
    rtt: float  # smoothed heartbeat round trip, seconds


@dataclass
class ZmqStats:
    """Counters of one endpoint."""

    sent: int = 0  # messages handed to send (first transmissions)
    delivered: int = 0  # messages handed to the handler
    retried: int = 0  # retransmissions
    duplicates: int = 0  # received again after delivery (dropped)
    out_of_order: int = 0  # received after a gap (dropped; the retry brings them in order)
    bad_frames: int = 0  # malformed link frames (wrong kind, sizes, unknown epoch on an ack)
    handler_errors: int = 0  # the handler raised (logged and counted; the transport goes on)
    unsent_at_close: int = 0  # messages still unacknowledged when the transport closed
    peers_lost: int = 0
    auth_failures: int = 0  # CURVE handshakes the inbox refused (a key not allowed, or no CURVE)
    overflowed: int = 0  # sends dropped: the outbox already kept max_unacked unacknowledged messages
    loop_lag_max: float = 0.0  # the latest the watch timer fired (s): this loop's worst stall
    loop_lag_total: float = 0.0  # its lateness summed (s): discounted from peers' silences
    by_reason: dict[str, int] = field(default_factory=dict)  # bad frames by reason


class _Out:
    """An outbox: the DEALER to one peer and what it has not had acknowledged."""

    __slots__ = ("peer", "address", "sock", "seq", "unacked", "last_heard", "lag_heard", "alive", "bytes", "retries",
                 "rtt", "hb_at")

    def __init__(self, peer: NodeRef, address: str, sock: Any, now: float) -> None:
        self.peer = peer
        self.address = address
        self.sock = sock
        self.seq = 0
        self.unacked: deque[tuple[int, list[Any], float]] = deque()
        self.last_heard = now
        self.lag_heard = 0.0  # the transport's summed loop lag when last heard
        self.alive = True
        self.bytes = 0  # sent, first transmissions only (headers and tensor frames)
        self.retries = 0  # messages sent again (the link lost them, or the peer was slow to answer)
        self.rtt = 0.0  # heartbeat to acknowledgement, smoothed (s); 0 until measured
        self.hb_at = -1.0  # when the heartbeat now awaiting its answer went


class ZmqTransport:
    """One node's endpoint over ZeroMQ (see the module doc).

    node: this endpoint's ``NodeRef`` (``SOURCE`` for the host). clock: the loop's clock.
    name: identity on the wire (default: ``host`` for the host, else the node id).
    bind: the inbox's address (``tcp://127.0.0.1:*``: loopback, an ephemeral port).
    max_message_bytes: the inbox's largest frame (default :func:`inbox_limit`). hwm: messages ZeroMQ
    queues per peer each way. max_unacked: messages an outbox keeps unacknowledged at most.
    numeric_names: without CURVE, a sender whose identity is digits is that node (workers name
    their outboxes so); False: only names given to :meth:`name_peer` are nodes (the host's inbox,
    where a plaintext peer could otherwise pass for any node by choosing its identity).
    """

    def __init__(
        self,
        node: NodeRef,
        clock: Clock,
        *,
        name: str | None = None,
        bind: str = "tcp://127.0.0.1:*",
        heartbeat_s: float = 0.25,
        dead_after_s: float = 1.5,
        retry_after_s: float = 1.0,
        ack_every: int = 32,
        context: zmq.Context[Any] | None = None,
        curve: CurveKeys | None = None,
        max_message_bytes: int | None = None,
        hwm: int = 100_000,
        max_unacked: int = 65_536,
        numeric_names: bool = True,
    ) -> None:
        if not (heartbeat_s > 0 and dead_after_s > heartbeat_s and retry_after_s > 0):
            raise ValueError("need heartbeat_s > 0, dead_after_s > heartbeat_s and retry_after_s > 0")
        self._node = node
        self._clock = clock
        self.name = name if name is not None else (HOST_NAME if node in (SOURCE, SINK) else str(node))
        self._bind = bind
        self._hb = heartbeat_s
        self._dead = dead_after_s
        self._retry = retry_after_s
        if ack_every < 1 or retry_after_s < 2 * heartbeat_s:
            raise ValueError("need ack_every >= 1 and retry_after_s >= 2 * heartbeat_s")
        self._ack_every = int(ack_every)
        if hwm < 1 or max_unacked < 1:
            raise ValueError("need hwm >= 1 and max_unacked >= 1")
        self._max_msg = inbox_limit() if max_message_bytes is None else int(max_message_bytes)
        self._hwm = int(hwm)
        self._max_unacked = int(max_unacked)
        self._numeric = numeric_names
        # CURVE: public key (z85, ZAP's User-Id) -> the sender it speaks for; filled at start()
        self._principals: dict[bytes, NodeRef] = {}
        self._key_of: dict[NodeRef, bytes] = {}
        self._uid = b""  # the User-Id of the message being handled (CURVE)
        self._own_ctx = context is None
        if curve is not None and not self._own_ctx:
            raise ValueError("CURVE needs the transport's own ZeroMQ context (its authenticator is per context)")
        self._ctx = context if context is not None else zmq.Context()
        self._curve = curve
        self._auth: Any = None
        self._monitor: Any = None
        self._epoch = os.urandom(8)
        self._router: Any = None
        self.address = ""
        self._outs: dict[NodeRef, _Out] = {}
        # sender (identity; with CURVE, key + identity) -> [epoch, next expected seq, delivered since the last ack, identity]
        self._inbound: dict[bytes, list[Any]] = {}
        self._names: dict[bytes, NodeRef] = {HOST_NAME.encode(): SOURCE}
        self._handler: Handler | None = None
        self._idle: Callable[[NodeRef], None] | None = None
        self._acks: set[bytes] = set()
        self._ack_pending = False
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: dict[Any, Callable[[list[bytes]], None]] = {}  # socket -> its frames' handler
        self._drains: set[Any] = set()  # sockets to drain on the next loop turn
        self._drain_pending = False
        self.closed = False
        self.stats = ZmqStats()
        self.drops = DropCounter()  # messages whose codec frames did not decode
        #: on_peer_lost(peer): no acknowledgement from ``peer`` for ``dead_after_s``
        self.on_peer_lost: Callable[[NodeRef], None] | None = None
        #: on_peer_back(peer): a peer reported lost answered again
        self.on_peer_back: Callable[[NodeRef], None] | None = None

    # ---- setup ----------------------------------------------------------------------------------

    @property
    def node(self) -> NodeRef:
        return self._node

    @property
    def curve(self) -> CurveKeys | None:
        """This endpoint's CURVE keys (None: plaintext links)."""
        return self._curve

    async def start(self) -> str:
        """Bind the inbox and start the receive and heartbeat loops; returns the inbox address."""
        if self._router is not None:
            return self.address
        curve = self._curve
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx, log=_auth_log())
            self._auth.start()
            self._auth.configure_curve(domain="*", location=curve.allowed_dir)
            for key, who in key_bindings(curve.allowed_dir).items():
                ref: NodeRef = SOURCE if who == "host" else who
                self._principals[key] = ref
                self._key_of.setdefault(ref, key)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.SNDHWM, self._hwm)  # acks only: one dropped is answered by the next
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_msg + _WIRE_SLACK)
        if curve is not None:
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            sock.curve_server = True
        try:
            sock.bind(self._bind)
        except zmq.ZMQError as e:
            sock.close(0)
            raise TransportError(f"cannot bind {self._bind}: {e}") from None
        self._router = sock
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = curve.address(endpoint) if curve is not None else endpoint
        loop = self._loop = asyncio.get_running_loop()
        self._watch_socket(sock, self._on_inbox)
        if curve is not None:
            events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            self._monitor = sock.get_monitor_socket(events)
            self._watch_socket(self._monitor, self._on_monitor)
        self._tasks.append(loop.create_task(self._watch(), name=f"zmq-watch-{self.name}"))
        return self.address

    def connect(self, peer: NodeRef, address: str) -> None:
        """Open (or move) the outbox to ``peer``'s inbox at ``address``."""
        if self._router is None:
            raise TransportError("start() the transport before connecting peers")
        if peer == SINK:
            peer = SOURCE
        old = self._outs.get(peer)
        if old is not None:
            if old.address == address:
                return
            self._close_out(old)
        endpoint, server_key = split_address(address)
        curve = self._curve
        if curve is None and server_key is not None:
            raise TransportError(f"{address} takes CURVE-encrypted links only: give this endpoint keys (--keys)")
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.name.encode())
        # a full queue refuses the send (counted); the message stays unacknowledged and is resent
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, _WIRE_SLACK)  # only acknowledgements (17 bytes) come back
        if curve is not None:
            key = server_key if server_key is not None else curve.default_server
            if key is None:
                sock.close(0)
                raise TransportError(f"no CURVE public key for {address} (its address names none)")
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            sock.curve_serverkey = key
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:  # an endpoint ZeroMQ cannot parse: the socket goes with the refusal
            sock.close(0)
            raise TransportError(f"cannot dial {address!r}: {e.strerror}") from None
        out = _Out(peer, address, sock, self._clock.now())
        self._outs[peer] = out
        self._watch_socket(sock, functools.partial(self._on_ack, out))
        for _, packet, _ in out.unacked:
            self._transmit(out, packet)

    def rename(self, node: NodeRef, name: str) -> None:
        """This endpoint becomes ``node`` named ``name`` (an assigned worker): outboxes connected from
        now on carry the new name; the open ones keep theirs (their peers know it)."""
        self._node = node
        self.name = name

    def name_peer(self, name: str, node: NodeRef) -> None:
        """Messages from identity ``name`` are delivered as from ``node``."""
        self._names[name.encode()] = node

    def peers(self) -> list[NodeRef]:
        return list(self._outs)

    @property
    def authenticated(self) -> bool:
        """Whether senders are named by their authenticated CURVE key (else by their identity)."""
        return self._curve is not None

    def key_of(self, peer: NodeRef) -> bytes | None:
        """The public key (z85) bound to ``peer`` in the allow-list (CURVE), or None."""
        return self._key_of.get(peer)

    def disconnect(self, peer: NodeRef) -> int:
        """Close the outbox to ``peer``; returns how many of its messages were never acknowledged."""
        out = self._outs.pop(SOURCE if peer == SINK else peer, None)
        if out is None:
            return 0
        self._close_out(out)
        return len(out.unacked)

    # ---- the Transport interface ----------------------------------------------------------------

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def set_idle_handler(self, handler: Callable[[NodeRef], None]) -> None:
        self._idle = handler

    def send(self, dest: NodeRef, msg: Any) -> None:
        if self.closed:
            raise TransportError(f"{self.name}: transport is closed")
        out = self._outs.get(SOURCE if dest == SINK else dest)
        if out is None:
            raise TransportError(f"{self.name}: no link to {dest!r}")
        if len(out.unacked) >= self._max_unacked:
            # the peer has not acknowledged this many: it is not reading; keep no more for it
            self.stats.overflowed += 1
            return
        frames = encode(msg)
        # the header, the codec's tag and its fields in one frame; tensors (or a modelled payload)
        # follow as frames of their own, not copied
        packet = [b"".join((_pack(_DATA, self._epoch, out.seq), frames[0], frames[1])), *frames[2:]]
        out.unacked.append((out.seq, packet, self._clock.now()))
        out.seq += 1
        n = len(packet[0])
        for f in packet[1:]:
            n += f.nbytes if hasattr(f, "nbytes") else len(f)
        out.bytes += n
        self.stats.sent += 1
        self._transmit(out, packet)

    def link_health(self) -> dict[NodeRef, OutboxHealth]:
        """Per peer: bytes sent, messages sent again, smoothed heartbeat round trip."""
        return {peer: OutboxHealth(out.bytes, out.retries, out.rtt) for peer, out in self._outs.items()}

    def bytes_sent(self) -> dict[NodeRef, int]:
        """Bytes sent to each peer so far (first transmissions: what the work needed, not retries)."""
        return {peer: out.bytes for peer, out in self._outs.items()}

    def link_idle(self, dest: NodeRef) -> bool:
        out = self._outs.get(SOURCE if dest == SINK else dest)
        return out is None or not out.unacked

    def unacked(self, dest: NodeRef) -> int:
        out = self._outs.get(SOURCE if dest == SINK else dest)
        return 0 if out is None else len(out.unacked)

    def alive(self, peer: NodeRef) -> bool:
        out = self._outs.get(SOURCE if peer == SINK else peer)
        return out is not None and out.alive

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in self._tasks:
            t.cancel()
        for out in list(self._outs.values()):
            self.stats.unsent_at_close += len(out.unacked)
            self._close_out(out)
        self._outs.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._monitor is not None:
            self._unwatch_socket(self._monitor)
            if self._router is not None:
                self._router.disable_monitor()
            self._monitor.close(0)
        if self._router is not None:
            self._unwatch_socket(self._router)
            self._router.close(0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            # every socket of this transport is closed above; destroy (not term) so that one that
            # was not can never block the loop in term() for good
            self._ctx.destroy(linger=0)

    # ---- internals ------------------------------------------------------------------------------

    def _close_out(self, out: _Out) -> None:
        self._unwatch_socket(out.sock)
        out.sock.close(0)

    # Sockets are plain (synchronous) ZeroMQ sockets read from the loop: their file descriptor
    # signals, edge-triggered, that ZMQ_EVENTS may have changed; a reader then takes every message
    # ready.  A send on a socket can consume that edge, so after sending on a socket that also
    # receives, it is drained on the next loop turn (once per turn, whatever the sends).  This
    # costs a fraction of pyzmq's asyncio wrapper per message (bench/bench_runtime.py).

    def _watch_socket(self, sock: Any, handler: Callable[[list[bytes]], None]) -> None:
        assert self._loop is not None
        self._readers[sock] = handler
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, sock)
        # what arrived before the reader was added raised no edge: look once
        self._drain_soon(sock)

    def _unwatch_socket(self, sock: Any) -> None:
        if self._readers.pop(sock, None) is not None and self._loop is not None:
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
        self._drains.discard(sock)

    def _drain(self, sock: Any) -> None:
        handler = self._readers.get(sock)
        if handler is None:
            return
        get = sock.get
        recv = sock.recv
        # CURVE inbox: the first frame is read as a zmq.Frame, for the key it was authenticated with
        uid = self._curve is not None and sock is self._router
        for _ in range(1000):  # then yield to the loop; the rest on the next turn
            try:
                if not get(_EVENTS) & _POLLIN:
                    return
                if uid:
                    first = recv(_NOBLOCK, copy=False)
                    user = first.get("User-Id")
                    self._uid = user.encode() if user else b""
                    frames = [first.bytes]
                else:
                    frames = [recv(_NOBLOCK)]
                while get(_RCVMORE):
                    frames.append(recv(_NOBLOCK))
            except zmq.Again:
                return
            except zmq.ZMQError:
                if not self.closed:
                    self._bad("recv failed")
                return
            handler(frames)
            if sock not in self._readers:  # closed by the handler
                return
        self._drain_soon(sock)

    def _drain_soon(self, sock: Any) -> None:
        self._drains.add(sock)
        if not self._drain_pending:
            self._drain_pending = True
            self._clock.call_soon(self._drain_all)

    def _drain_all(self) -> None:
        self._drain_pending = False
        socks = list(self._drains)
        self._drains.clear()
        for sock in socks:
            self._drain(sock)

    def _transmit(self, out: _Out, packet: list[Any]) -> None:
        # Non-blocking: the DEALER queues it (no high-water mark) until the peer is connected.
        try:
            if len(packet) == 1:
                out.sock.send(packet[0], _NOBLOCK)  # a small message: copying beats a zero-copy frame
            else:
                out.sock.send_multipart(packet, _NOBLOCK, copy=False)
        except zmq.ZMQError:
            self._bad("send failed")  # left unacknowledged: the retry sends it again
        self._drain_soon(out.sock)

    def _bad(self, reason: str) -> None:
        st = self.stats
        st.bad_frames += 1
        st.by_reason[reason] = st.by_reason.get(reason, 0) + 1

    def _sender(self, ident: bytes) -> NodeRef:
        ref = self._names.get(ident)
        if ref is not None:
            return ref
        try:
            text = ident.decode()
        except UnicodeDecodeError:
            return repr(ident)
        if self._numeric and text.isascii() and text.isdigit() and len(text) < 18:
            return int(text)
        return text

    def _on_inbox(self, frames: list[bytes]) -> None:
        if len(frames) < 2 or len(frames[1]) < 17:
            self._bad("missing or malformed header frame")
            return
        ident = frames[0]
        head = frames[1]
        kind, epoch, seq = _unpack_from(head)
        key = ident
        if self._curve is not None:
            # the sender is its authenticated key; the identity only tells its connections apart
            if self._uid not in self._principals:
                self._bad("no authenticated key")
                return
            key = self._uid + b"/" + ident
        st = self._inbound.get(key)
        if kind == _DATA:
            if st is None or st[0] != epoch:
                # a new sender (or a restarted one): its sequence continues from what it still holds
                st = self._new_inbound(key, epoch, seq, ident)
            if seq == st[1]:
                st[1] = seq + 1
                mv = memoryview(head)
                msg = decode_or_drop([mv[17:18], mv[18:], *frames[2:]], self.drops)
                if msg is not None:
                    self.stats.delivered += 1
                    self._deliver(self._principals[self._uid] if self._curve is not None else self._sender(ident), msg)
                st[2] += 1
                if st[2] < self._ack_every:
                    return  # acknowledged with the next heartbeat (or the ack_every-th message)
            elif seq < st[1]:
                self.stats.duplicates += 1  # a retry: acknowledge now, so that it stops
            else:
                self.stats.out_of_order += 1
        elif kind == _HEARTBEAT:
            if len(frames) != 2 or len(head) != 17:
                self._bad("heartbeat frames")
                return
            if st is None or st[0] != epoch:
                st = self._new_inbound(key, epoch, seq, ident)
        else:
            self._bad("unknown frame kind")
            return
        self._acks.add(key)
        if not self._ack_pending:
            self._ack_pending = True
            self._clock.call_soon(self._flush_acks)

    def _new_inbound(self, key: bytes, epoch: bytes, seq: int, ident: bytes) -> list[Any]:
        inbound = self._inbound
        inbound.pop(key, None)
        if len(inbound) >= _MAX_INBOUND:  # bounded whatever identities peers make up: the oldest goes
            del inbound[next(iter(inbound))]
        st = inbound[key] = [epoch, seq, 0, ident]
        return st

    def _on_monitor(self, frames: list[bytes]) -> None:
        from zmq.utils.monitor import parse_monitor_message

        try:
            event = parse_monitor_message(frames)["event"]
        except Exception:  # noqa: BLE001 - a malformed monitor message is only not counted
            return
        if event & (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            self.stats.auth_failures += 1

    def _deliver(self, sender: NodeRef, msg: Any) -> None:
        h = self._handler
        if h is None:
            self._bad("no handler")
            return
        try:
            h(sender, msg)
        except Exception:  # the node's bug must not take the transport down; counted and logged
            import logging

            self.stats.handler_errors += 1
            logging.getLogger("helix_async.transport").exception("handler failed on %s from %r", type(msg).__name__, sender)

    def _flush_acks(self) -> None:
        self._ack_pending = False
        if self.closed:
            return
        for key in self._acks:
            st = self._inbound.get(key)
            if st is None:
                continue
            st[2] = 0
            try:
                self._router.send_multipart([st[3], _pack(_ACK, st[0], st[1])], _NOBLOCK)
            except zmq.ZMQError:
                self._bad("ack send failed")
        self._acks.clear()
        self._drain_soon(self._router)

    def _on_ack(self, out: _Out, frames: list[bytes]) -> None:
        if len(frames) != 1 or len(frames[0]) != 17:
            self._bad("malformed ack")
            return
        kind, epoch, upto = _unpack(frames[0])
        if kind != _ACK:
            self._bad("malformed ack")
            return
        if epoch != self._epoch:
            self._bad("ack for another epoch")
            return
        now = self._clock.now()
        out.last_heard = now
        out.lag_heard = self.stats.loop_lag_total
        if out.hb_at >= 0:
            sample = now - out.hb_at
            out.rtt = sample if out.rtt == 0.0 else 0.8 * out.rtt + 0.2 * sample
            out.hb_at = -1.0
        if not out.alive:
            out.alive = True
            if self.on_peer_back is not None:
                self.on_peer_back(out.peer)
        q = out.unacked
        had = bool(q)
        while q and q[0][0] < upto:
            q.popleft()
        if had and not q and self._idle is not None:
            self._idle(out.peer)

    async def _watch(self) -> None:
        clock = self._clock
        st = self.stats
        while True:
            due = clock.now() + self._hb
            await clock.sleep(self._hb)
            now = clock.now()
            lag = now - due
            if lag > 0.0:
                # the loop was late (a long handler, a blocking call): what came meanwhile is read
                # first, and the lag is not counted as the peers' silence
                st.loop_lag_total += lag
                st.loop_lag_max = max(st.loop_lag_max, lag)
                if lag > self._hb / 2:
                    for out in list(self._outs.values()):
                        self._drain(out.sock)
            for out in list(self._outs.values()):
                first = out.unacked[0][0] if out.unacked else out.seq
                if out.hb_at < 0:
                    out.hb_at = now
                try:
                    out.sock.send(_pack(_HEARTBEAT, self._epoch, first), _NOBLOCK)
                except zmq.ZMQError:
                    self._bad("heartbeat send failed")
                self._drain_soon(out.sock)
                if out.unacked and now - out.unacked[0][2] >= self._retry:
                    # go back N: resend everything unacknowledged, in order
                    for i, (seq, packet, _) in enumerate(out.unacked):
                        out.unacked[i] = (seq, packet, now)
                        self.stats.retried += 1
                        out.retries += 1
                        self._transmit(out, packet)
                if out.alive and now - out.last_heard - (st.loop_lag_total - out.lag_heard) > self._dead:
                    out.alive = False
                    self.stats.peers_lost += 1
                    if self.on_peer_lost is not None:
                        self.on_peer_lost(out.peer)
