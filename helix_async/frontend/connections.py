"""The HTTP door's connection limits: how many connections one client address may hold open at
once, enforced before a byte of the request is parsed.

aiohttp bounds the rest itself (docs/api.md §Limits): the request line and header sizes
(``max_line_size``, ``max_field_size``, ``max_headers``: a 400 beyond them), the body
(``client_max_size``: a 413) and the time a connection may sit idle, before its first request or
between two (``keepalive_timeout``: closed; a request whose headers have not all come by then is
closed the same way).  What it has no knob for is a client that opens many connections: each
accepted connection here goes through :class:`GuardedProtocol`, which counts the open connections
per peer address in a :class:`ConnectionLimiter` and answers one beyond the limit with a 429 in
OpenAI's error shape, then closes it, without handing it to aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

__all__ = ["ConnectionLimiter", "GuardedProtocol", "parser_logger"]

log = logging.getLogger("helix_async.http")


class _EveryPowerOfTwo(logging.Filter):
    """Lets a record through the 1st, 2nd, 4th, 8th, ... time its message comes, as one line (the
    exception's type and text, no traceback): a flood of malformed requests is seen, and counted,
    without a traceback per request."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        n = self.seen.get(key, 0) + 1
        if len(self.seen) < 1024 or key in self.seen:  # (bounded: a new cause past 1,024 is not counted)
            self.seen[key] = n
        if n & (n - 1):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            text = str(exc).replace("\n", " ").strip()
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {text[:200]} (seen {n} times)"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def parser_logger() -> logging.Logger:
    """The logger aiohttp's request handler reports malformed requests to (``logger=``): the
    ``helix_async.http.aiohttp`` logger, rate-limited per message."""
    lg = logging.getLogger("helix_async.http.aiohttp")
    if not any(isinstance(f, _EveryPowerOfTwo) for f in lg.filters):
        lg.addFilter(_EveryPowerOfTwo())
    return lg


def _refusal(limit: int) -> bytes:
    body = json.dumps({"error": {
        "message": f"too many connections from this address (at most {limit} at once); retry later",
        "type": "rate_limit_error", "param": None, "code": "too_many_connections"}}).encode()
    head = ("HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class ConnectionLimiter:
    """Open connections per client address, at most ``per_client`` each (0: no limit).
    ``refused`` counts the connections turned away."""

    def __init__(self, per_client: int) -> None:
        self.per_client = int(per_client)
        self.open: dict[str, int] = {}
        self.refused = 0
        self._answer = _refusal(self.per_client)

    def admit(self, peer: str) -> bool:
        """Count a new connection from ``peer``; False (and not counted) when it is one too many."""
        n = self.open.get(peer, 0)
        if self.per_client and n >= self.per_client:
            self.refused += 1
            # one line per power of two refused: a flood is seen without a line per connection
            if self.refused & (self.refused - 1) == 0:
                log.warning("refused a connection from %s: %d open already (refused so far: %d)", peer, n,
                            self.refused)
            return False
        self.open[peer] = n + 1
        return True

    def release(self, peer: str) -> None:
        n = self.open.get(peer, 0) - 1
        if n > 0:
            self.open[peer] = n
        else:
            self.open.pop(peer, None)

    @property
    def answer(self) -> bytes:
        """The raw HTTP response a refused connection gets (429, OpenAI's error shape)."""
        return self._answer


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return str(peer)


class GuardedProtocol(asyncio.Protocol):
    """One accepted connection: admitted by ``limiter`` and then served by ``inner`` (aiohttp's
    request handler, every protocol event passed on), or answered 429 and closed."""

    def __init__(self, inner: Any, limiter: ConnectionLimiter) -> None:
        self.inner = inner
        self.limiter = limiter
        self.peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = _peer_of(transport)
        if not self.limiter.admit(peer):
            tr: Any = transport
            tr.write(self.limiter.answer)
            tr.close()
            self.inner = None
            return
        self.peer = peer
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.limiter.release(self.peer)
            self.peer = None
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return bool(self.inner.eof_received())
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
