"""The transport interface shared by the simulated network and the real one.

A transport is one node's door to the others.  Nodes are named as everywhere else
(:mod:`helix_async.ids`): compute nodes by id, the coordinator by ``SOURCE`` (where prompts enter)
and ``SINK`` (where tokens come back); both names reach the host, whose own endpoint is ``HOST``
(an alias of ``SOURCE``).

Delivery is by callback, not by an awaited ``recv``: the receiving side registers one
``handler(sender, message)`` and the transport calls it on the event loop for every message, in
arrival order.  A callback costs a fraction of a coroutine wake-up, and the simulator delivers
millions of messages (measured in ``bench/bench_sim.py``).  A handler must not block; it may call
``send``.

``send`` never blocks and never drops silently: it queues the message for the link to ``dest``
and returns; an unknown destination raises :class:`TransportError` at once (a bug in the caller,
not a network condition).  Per destination, messages arrive in the order they were sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ..errors import HelixError
from ..ids import SOURCE, NodeRef

__all__ = ["HOST", "Handler", "Transport", "TransportError"]

#: The host's own endpoint name (it sends as SOURCE and receives what is sent to SINK).
HOST: NodeRef = SOURCE

#: ``handler(sender, message)``: called on the loop for every delivered message.
Handler = Callable[[NodeRef, Any], None]


class TransportError(HelixError, RuntimeError):
    """A send the transport cannot carry out (unknown peer, closed transport)."""


@runtime_checkable
class Transport(Protocol):
    """One node's endpoint (see the module doc)."""

    @property
    def node(self) -> NodeRef:
        """This endpoint's node (``HOST`` for the host)."""
        ...

    def set_handler(self, handler: Handler) -> None:
        """Register the callback that receives every message addressed to this node."""
        ...

    def send(self, dest: NodeRef, msg: Any) -> None:
        """Queue ``msg`` for ``dest`` (a compute node id, or ``SINK`` for the host)."""
        ...

    def link_idle(self, dest: NodeRef) -> bool:
        """Whether nothing is queued or in flight on the link to ``dest`` (per-hop schedulers that
        only hand a request to a free link ask this)."""
        ...

    def set_idle_handler(self, handler: Callable[[NodeRef], None]) -> None:
        """Register ``handler(dest)``, called when the link to ``dest`` becomes idle."""
        ...

    async def close(self) -> None:
        """Stop sending and receiving; queued messages are dropped and counted."""
        ...
