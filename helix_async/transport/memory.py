"""The simulated network: messages cost ``latency + bytes / rate`` per hop, in virtual time.

Built from the cluster file (links' bandwidth and latency, nodes' NIC speeds, the coordinator's
NICs) and the directed links a placement uses.  Messages are never encoded: a ``size`` function
gives each message's bytes (``codec.wire_size`` by default; the Helix formulas in compat mode).

Every directed link is a FIFO: one transfer is on the wire at a time and the next starts when it
has been serialised (``bytes / rate``); each then propagates for the link's latency, pipelined.
What differs between the three modes is the rate of a transfer (docs/original.md §8.3):

``"fair"`` (default, work-conserving)
    ``min(link bandwidth, sender out-NIC / busy out-links, receiver in-NIC / busy in-links)``,
    the NIC shares counted over the links busy when the transfer starts (this one included).
    An idle link never holds bandwidth.
``"reserved"`` (``--compat helix`` with the MaxFlow scheduler)
    the original's static reservation: each link always sends at
    ``floor(min(bandwidth, out-NIC * share_out, in-NIC * share_in))`` with shares proportional to
    the link's planned byte flow, even while the other links are idle (§7.1 step 5).  The rate
    being fixed, a send's whole schedule is known when it is queued: one timer per message (two
    in the other modes: end of serialisation, then delivery).
``"available"`` (``--compat helix`` with the per-hop schedulers)
    ``min(out-NIC / #out-links, link bandwidth, receiver in-NIC not yet taken)`` (§7.3), the
    receiver's in-NIC held while serialising.

Messages that are not on a planned link (control: Swarm feedback, cancels) travel with the latency
of the cluster link between the two nodes and are not charged bandwidth.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Absolute imports: this file is also compiled as helix_async._ext._memory (see the end).
from helix_async.clock import Clock
from helix_async.cluster import ClusterSpec
from helix_async.ids import SINK, SOURCE, NodeRef
from helix_async.transport.base import HOST, Handler, TransportError

__all__ = ["MODES", "MemoryNetwork", "MemoryNetworkPy", "MemoryTransport", "SizeFn"]

MODES = ("fair", "reserved", "available")

#: ``size(src, dst, msg) -> bytes`` of one message on the link src -> dst.
SizeFn = Callable[[NodeRef, NodeRef, Any], float]


class _Link:
    __slots__ = (
        "src",
        "dst",
        "bandwidth",
        "latency",
        "rate",
        "queue",
        "busy",
        "free_at",
        "messages",
        "bytes",
        "busy_time",
        "max_queue",
        "pending",
    )

    def __init__(self, src: NodeRef, dst: NodeRef, bandwidth: float, latency: float) -> None:
        self.src = src
        self.dst = dst
        self.bandwidth = bandwidth
        self.latency = latency
        self.rate = bandwidth  # the fixed rate in "reserved" mode
        self.queue: deque[tuple[Any, float]] = deque()
        self.busy = False
        self.free_at = -math.inf  # "reserved" mode: when the last queued byte has left
        self.messages = 0
        self.bytes = 0.0
        self.busy_time = 0.0
        self.max_queue = 0
        self.pending: deque[float] = deque()  # start times of transfers not started yet


class MemoryNetwork:
    """All links of one simulated cluster (see the module doc).

    clock: the simulation's clock (a ``LoopClock`` bound to the ``VirtualTimeLoop``).
    cluster: NIC speeds and the physical links. arcs: the directed links messages may use (the
    placement's links). size: bytes of a message on a link. mode: ``"fair"``, ``"reserved"`` or
    ``"available"``. reserved_rates: bytes/s per arc, required in ``"reserved"`` mode.
    """

    def __init__(
        self,
        clock: Clock,
        cluster: ClusterSpec,
        arcs: Iterable[tuple[NodeRef, NodeRef]],
        size: SizeFn,
        *,
        mode: str = "fair",
        reserved_rates: Mapping[tuple[NodeRef, NodeRef], float] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"network mode must be one of {MODES}, got {mode!r}")
        self._clock = clock
        self._at = clock.call_at
        self._size = size
        self.mode = mode
        self._reserved = mode == "reserved"
        self._cluster = cluster
        self.links: dict[tuple[NodeRef, NodeRef], _Link] = {}
        self._out_nic: dict[NodeRef, float] = {SOURCE: cluster.coordinator_nic_out}
        self._in_nic: dict[NodeRef, float] = {SINK: cluster.coordinator_nic_in}
        for node in cluster.nodes:
            m = cluster.machine(node.id)
            self._out_nic[node.id] = m.nic_out
            self._in_nic[node.id] = m.nic_in
        self._n_out: dict[NodeRef, int] = {}
        for u, v in arcs:
            if mode == "reserved" and (reserved_rates is None or (u, v) not in reserved_rates):
                raise ValueError(f"reserved mode needs a rate for link {u} -> {v}")
            self.add_link(u, v, reserved_rates[(u, v)] if reserved_rates is not None and mode == "reserved" else None)
        self._busy_out: dict[NodeRef, int] = dict.fromkeys(self._out_nic, 0)
        self._busy_in: dict[NodeRef, int] = dict.fromkeys(self._in_nic, 0)
        self._in_used: dict[NodeRef, float] = dict.fromkeys(self._in_nic, 0.0)
        self._handlers: dict[NodeRef, Handler] = {}
        self._idle_handlers: dict[NodeRef, Callable[[NodeRef], None]] = {}
        self.control_messages = 0
        self.dropped = 0

    def grow(self, cluster: ClusterSpec) -> None:
        """The cluster gained nodes (an elastic fleet): ``cluster`` is the old one plus them; their
        NICs join the network, and links to and from them can be added."""
        self._cluster = cluster
        for node in cluster.nodes:
            if node.id not in self._out_nic:
                m = cluster.machine(node.id)
                self._out_nic[node.id] = m.nic_out
                self._in_nic[node.id] = m.nic_in
                self._busy_out[node.id] = 0
                self._busy_in[node.id] = 0
                self._in_used[node.id] = 0.0

    def add_link(self, u: NodeRef, v: NodeRef, rate: float | None = None) -> None:
        """Messages from ``u`` to ``v`` take the cluster's link between them from now on (its
        bandwidth shared as every link's is; ``rate``: its reserved rate in ``"reserved"`` mode).
        Without a link a message is delivered after the latency alone (control traffic); a live
        migration's KV copy between two nodes that hold the same layers needs one."""
        if (u, v) in self.links:
            return
        arc = self._cluster.arc(u, v)
        if arc is None:
            raise ValueError(f"no cluster link {u} -> {v}")
        link = _Link(u, v, float(arc.bandwidth), float(arc.latency))
        if self._reserved:
            link.rate = float(arc.bandwidth) if rate is None else float(rate)
        self.links[(u, v)] = link
        self._n_out[u] = self._n_out.get(u, 0) + 1

    # ---- endpoints ------------------------------------------------------------------------------

    def endpoint(self, node: NodeRef) -> MemoryTransport:
        """The transport of ``node`` (``HOST`` for the coordinator)."""
        if node != HOST and node not in self._out_nic:
            raise TransportError(f"no node {node!r} in cluster {self._cluster.name}")
        return MemoryTransport(self, node)

    def _receiver(self, dest: NodeRef) -> NodeRef:
        return HOST if dest == SINK else dest

    def _set_handler(self, node: NodeRef, handler: Handler | None) -> None:
        # the host's endpoint also receives what is addressed to SINK
        for key in ((HOST, SINK) if node == HOST else (node,)):
            if handler is None:
                self._handlers.pop(key, None)
            else:
                self._handlers[key] = handler

    def detach(self, node: NodeRef) -> None:
        """``node`` receives nothing from now on: what is delivered to it is dropped, as on a machine
        that died (fault injection; its endpoint is not told)."""
        self._set_handler(node, None)

    # ---- sending --------------------------------------------------------------------------------

    def send(self, src: NodeRef, dest: NodeRef, msg: Any) -> None:
        link = self.links.get((src, dest))
        if link is None:
            self._control(src, dest, msg)
            return
        size = self._size(src, dest, msg)
        link.messages += 1
        link.bytes += size
        if self._reserved:
            # The rate is fixed, so the transfer's whole schedule is known now: it starts when
            # the link's earlier transfers have been serialised -- one timer per message (its
            # delivery).
            now = self._clock.now()
            start = link.free_at if link.free_at > now else now
            dur = size / link.rate
            finish = start + dur
            link.free_at = finish
            link.busy_time += dur
            pending = link.pending
            while pending and pending[0] <= now:
                pending.popleft()
            if start > now:
                pending.append(start)
                if len(pending) > link.max_queue:
                    link.max_queue = len(pending)
            self._at(finish + link.latency, self._deliver, dest, src, msg)
            if src in self._idle_handlers:
                self._at(finish, self._maybe_idle, link)
            return
        link.queue.append((msg, size))
        if len(link.queue) > link.max_queue:
            link.max_queue = len(link.queue)
        if not link.busy:
            self._start(link)

    def _control(self, src: NodeRef, dest: NodeRef, msg: Any) -> None:
        if self._receiver(dest) not in self._handlers:
            raise TransportError(f"no endpoint {dest!r} to send {type(msg).__name__} to from {src!r}")
        a = self._cluster.arc(src, dest) or self._cluster.arc(dest, src)
        if a is None and dest == SINK:  # to the host: its link to the sender
            a = self._cluster.arc(src, SINK) or self._cluster.arc(SOURCE, src)
        latency = 0.0 if a is None else float(a.latency)
        self.control_messages += 1
        self._at(self._clock.now() + latency, self._deliver, dest, src, msg)

    def _start(self, link: _Link) -> None:
        msg, size = link.queue.popleft()
        src, dst = link.src, link.dst
        bo = self._busy_out[src] + 1
        bi = self._busy_in[dst] + 1
        self._busy_out[src] = bo
        self._busy_in[dst] = bi
        if self.mode == "fair":
            rate = min(link.bandwidth, self._out_nic[src] / bo, self._in_nic[dst] / bi)
        else:  # "available"
            rate = min(
                link.bandwidth,
                self._out_nic[src] / self._n_out[src],
                self._in_nic[dst] - self._in_used[dst],
            )
            if rate <= 10.0:  # the original's free-link threshold (TOKEN_SLOW_LINK, B/s)
                rate = 10.0
        self._in_used[dst] += rate
        link.busy = True
        dur = size / rate
        link.busy_time += dur
        self._at(self._clock.now() + dur, self._sent, link, msg, rate)

    def _sent(self, link: _Link, msg: Any, rate: float) -> None:
        src, dst = link.src, link.dst
        self._busy_out[src] -= 1
        self._busy_in[dst] -= 1
        self._in_used[dst] -= rate
        link.busy = False
        if link.latency > 0.0:
            self._at(self._clock.now() + link.latency, self._deliver, dst, src, msg)
        else:
            self._deliver(dst, src, msg)
        if link.queue:
            self._start(link)
        else:
            idle = self._idle_handlers.get(src)
            if idle is not None:
                idle(dst)

    def _maybe_idle(self, link: _Link) -> None:
        # a transfer has been serialised; the link is idle if it was the last one queued
        if link.free_at <= self._clock.now():
            idle = self._idle_handlers.get(link.src)
            if idle is not None:
                idle(link.dst)

    def _deliver(self, dest: NodeRef, src: NodeRef, msg: Any) -> None:
        handler = self._handlers.get(dest)
        if handler is None:
            self.dropped += 1
            return
        handler(src, msg)

    def link_idle(self, src: NodeRef, dest: NodeRef) -> bool:
        link = self.links.get((src, dest))
        if link is None:
            return True
        if self.mode == "reserved":
            return link.free_at <= self._clock.now()
        return not link.busy and not link.queue

    # ---- statistics -----------------------------------------------------------------------------

    def link_stats(self, horizon: float) -> list[dict[str, Any]]:
        """Per link: messages, bytes, busy fraction of ``horizon`` seconds, longest queue."""
        out = []
        for (u, v), link in self.links.items():
            out.append(
                {
                    "src": u,
                    "dst": v,
                    "messages": link.messages,
                    "bytes": link.bytes,
                    "busy_fraction": (link.busy_time / horizon) if horizon > 0 else 0.0,
                    "max_queue": link.max_queue,
                }
            )
        return out


class MemoryTransport:
    """One node's endpoint on a :class:`MemoryNetwork` (implements ``Transport``)."""

    __slots__ = ("_net", "_node", "closed", "send")

    def __init__(self, net: MemoryNetwork, node: NodeRef) -> None:
        self._net = net
        self._node = node
        self.closed = False
        #: ``send(dest, msg)``: queue ``msg`` for ``dest`` (bound once: the simulator's hot path)
        self.send: Callable[[NodeRef, Any], None] = functools.partial(net.send, node)

    @property
    def node(self) -> NodeRef:
        return self._node

    def set_handler(self, handler: Handler) -> None:
        self._net._set_handler(self._node, handler)

    def set_idle_handler(self, handler: Callable[[NodeRef], None]) -> None:
        self._net._idle_handlers[self._node] = handler

    def _closed_send(self, dest: NodeRef, msg: Any) -> None:
        raise TransportError(f"transport of {self._node!r} is closed")

    def link_idle(self, dest: NodeRef) -> bool:
        return self._net.link_idle(self._node, dest)

    async def close(self) -> None:
        self.closed = True
        self.send = self._closed_send
        self._net._set_handler(self._node, None)


# The compiled build: setup.py compiles this very file, with the C types of
# helix_async/_ext/_memory.pxd, into helix_async._ext._memory; it replaces the classes above unless
# HELIX_NO_EXTENSIONS is set.  ``MemoryNetworkPy`` stays the pure-Python class (the specification).
MemoryNetworkPy = MemoryNetwork
if __name__ == "helix_async.transport.memory":
    from helix_async import _ext

    _compiled = _ext.load("_memory")
    if _compiled is not None:
        # (not a plain assignment: Cython refuses to rebind a cdef class name, even here)
        globals()["MemoryNetwork"] = _compiled.MemoryNetwork
