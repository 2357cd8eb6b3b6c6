"""Emulated links: a real transport whose messages are held back as a modelled network would.

For the cost-model emulation (a whole heterogeneous cluster on one machine, in real time): every
message from this node to ``dest`` waits until ``latency + wire_size / bandwidth`` of the cluster
file's link has passed, times ``time_scale``, before the inner transport (ZeroMQ on loopback)
carries it.  Per link, messages queue FIFO: one starts its transfer when the previous one has
left.  The NICs are not modelled (in the shipped clusters a link is slower than either NIC); that,
and what loopback itself adds, is part of the drift ``bench/bench_runtime.py`` measures against the
simulator, whose network shares NIC bandwidth.  Messages to destinations without a link in the
table (control messages to the host, for instance) pass at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..clock import Clock
from ..codec import wire_size
from ..ids import NodeRef
from .base import Handler, Transport

__all__ = ["EmulatedLinks", "links_from"]


def links_from(cluster: Any, node: NodeRef) -> dict[NodeRef, tuple[float, float]]:
    """``{dest: (bandwidth bytes/s, latency s)}`` of ``node``'s out-links in ``cluster``
    (a ``ClusterSpec``); the host's SINK side is keyed SINK."""
    return {a.dst: (float(a.bandwidth), float(a.latency)) for a in cluster.out_arcs(node)}


class EmulatedLinks:
    """Wraps ``inner`` (see the module doc). links: ``{dest: (bandwidth, latency)}``."""

    def __init__(
        self,
        inner: Transport,
        clock: Clock,
        links: Mapping[NodeRef, tuple[float, float]],
        time_scale: float = 1.0,
        size: Callable[[Any], int] = wire_size,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        self._inner = inner
        self._clock = clock
        self._links = dict(links)
        self._scale = float(time_scale)
        self._size = size
        self._free_at: dict[NodeRef, float] = {}
        self._pending: dict[NodeRef, int] = {}
        self._idle: Callable[[NodeRef], None] | None = None
        self.delayed = 0

    @property
    def node(self) -> NodeRef:
        return self._inner.node

    def set_handler(self, handler: Handler) -> None:
        self._inner.set_handler(handler)

    def set_idle_handler(self, handler: Callable[[NodeRef], None]) -> None:
        self._idle = handler
        self._inner.set_idle_handler(self._inner_idle)

    def _inner_idle(self, dest: NodeRef) -> None:
        if not self._pending.get(dest) and self._idle is not None:
            self._idle(dest)

    def connect(self, peer: NodeRef, address: str) -> None:
        """Open a link to ``peer`` on the transport underneath (a live migration's pair)."""
        connect = getattr(self._inner, "connect", None)
        if connect is not None:
            connect(peer, address)

    def link_idle(self, dest: NodeRef) -> bool:
        return not self._pending.get(dest) and self._inner.link_idle(dest)

    def send(self, dest: NodeRef, msg: Any) -> None:
        link = self._links.get(dest)
        if link is None:
            self._inner.send(dest, msg)
            return
        bw, lat = link
        now = self._clock.now()
        start = max(now, self._free_at.get(dest, now))
        sent = start + self._size(msg) / bw * self._scale
        self._free_at[dest] = sent
        self._pending[dest] = self._pending.get(dest, 0) + 1
        self.delayed += 1
        self._clock.call_at(sent + lat * self._scale, self._release, dest, msg)

    def _release(self, dest: NodeRef, msg: Any) -> None:
        self._pending[dest] -= 1
        if getattr(self._inner, "closed", False):
            return  # the endpoint closed (or crashed) while the message was on the modelled wire
        self._inner.send(dest, msg)

    async def close(self) -> None:
        await self._inner.close()
