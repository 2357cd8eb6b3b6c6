"""What the front door needs from a serving host: the protocol the HTTP API and its metrics talk to.

:class:`~helix_async.frontend.openai_api.OpenAIServer` and
:class:`~helix_async.frontend.metrics.Metrics` see a host only through :class:`ServingHost`:
submit a request and read its tokens as an async stream, stop reading to cancel it, ask whether
the host is serving, and take a :class:`HostSnapshot` of its counters for ``/metrics``.  The
runtime's coordinator (``helix_async.runtime.host_main.HostServer``) implements it over worker
processes; the front door's tests implement it in memory, with no worker, no torch and no process.

Time: :meth:`ServingHost.now` is the host's clock in seconds (monotonic; only differences mean
anything), the same clock the latencies in the metrics are measured on.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..sampling import SampledToken, SamplingParams

__all__ = ["HostSnapshot", "LinkReport", "NodeReport", "ServingHost"]


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One worker node as the host last heard of it.

    node: its id in the plan. up: it answers heartbeats. report_age: seconds since its last
    report (None: it has not reported yet, and the fields below are zero). kv_use: the share of
    its KV cache in use, 0 to 1. queued: work items waiting at it. dropped: malformed frames and
    messages it dropped. bytes_out: bytes it sent to each peer (``"host"`` or a node id as text).
    batches, busy_s: batches it has run, and the seconds from their starts to their ends.
    """

    node: int
    up: bool
    report_age: float | None = None
    kv_use: float = 0.0
    queued: int = 0
    dropped: int = 0
    bytes_out: Mapping[str, int] = field(default_factory=dict)
    batches: int = 0
    busy_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LinkReport:
    """The health of one directed link (``src`` and ``dst``: ``"host"`` or a node id as text).

    rtt: the heartbeat round trip, smoothed (s). retries: messages sent again on it so far.
    degraded: its share of the flows is cut (it was seen slow or lossy).
    """

    src: str
    dst: str
    rtt: float
    retries: int
    degraded: bool


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """The host's counters and gauges at one moment (what ``/metrics`` shows).

    waiting: requests in the admission queue. active: requests admitted on the cluster (any
    client). dropped: malformed frames and messages the host itself dropped. bytes_out: bytes the
    host sent to each node (node id as text). nodes, links: per worker and per link. plan_flows:
    each link's flow in the plan's max flow (tokens/s), keyed ``(src, dst)`` as in
    :class:`LinkReport`. admission_stopped: some layer has no live worker, so nothing is admitted.
    workers_lost, workers_rejoined, workers_drained, requests_migrated, requests_unrecovered:
    counts since the host started (unrecovered: requests moved off a lost worker that no live
    route took in time).
    """

    waiting: int = 0
    active: int = 0
    dropped: int = 0
    bytes_out: Mapping[str, int] = field(default_factory=dict)
    nodes: Sequence[NodeReport] = ()
    links: Sequence[LinkReport] = ()
    plan_flows: Mapping[tuple[str, str], float] = field(default_factory=dict)
    admission_stopped: bool = False
    workers_lost: int = 0
    workers_rejoined: int = 0
    workers_drained: int = 0
    requests_migrated: int = 0
    requests_unrecovered: int = 0


class ServingHost(Protocol):
    """A host that serves requests (see the module doc)."""

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to ``vocab_size - 1``."""
        ...

    @property
    def workers(self) -> int:
        """Worker nodes in the plan (all of them, live or not)."""
        ...

    @property
    def ready(self) -> bool:
        """Every worker has registered and loaded its layers: requests are served."""
        ...

    @property
    def closing(self) -> bool:
        """Shutting down (or shut): no new request is taken."""
        ...

    @property
    def admission_stopped(self) -> str:
        """Why new requests are not admitted now ("" while they are)."""
        ...

    @property
    def overloaded(self) -> bool:
        """The admission queue is full: a new request would be rejected."""
        ...

    @property
    def admission_capacity(self) -> int:
        """Requests that may wait for admission at most."""
        ...

    def now(self) -> float:
        """The host's clock, seconds."""
        ...

    def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        sampling: SamplingParams | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[int | SampledToken, None]:
        """Serve one request: yields up to ``max_tokens`` tokens as they are produced, chosen by
        ``sampling`` (default: greedy; its fields and their order are in
        :mod:`helix_async.sampling`). Each token is its id, or a :class:`SampledToken` (the id, its
        log-probability and the ``sampling.logprobs`` most likely tokens') when ``sampling.logprobs``
        is not None. ``temperature``, ``top_p``, ``seed``: those three alone, in place of
        ``sampling`` (ValueError with it). ``priority``: a lower number is admitted first
        (vLLM's convention; docs/runtime.md, "Priorities").

        The host does not stop at a stop token: the caller stops reading. ``min_tokens`` bans the
        ids of ``sampling.stop_token_ids`` until that many tokens came, so they should include the
        model's end-of-text ids when the end of text is to be held back too.

        Raises :class:`helix_async.errors.RequestFailed` (its ``kind`` says why) when the host cannot serve it, and
        ValueError for a request it would never take (empty prompt, ids out of range).  Closing the
        generator early (``aclose()``, or leaving an ``async for``) cancels the request: the host
        frees what it holds for it."""
        ...

    def snapshot(self) -> HostSnapshot:
        """The counters and gauges for ``/metrics``, now."""
        ...
