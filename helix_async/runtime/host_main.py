"""``python -m helix_async host``: the coordinator of a real cluster.

:class:`HostServer` binds the host's inbox (``--listen``), takes worker registrations and gives
each a node of the plan (the node id a worker asks for, else the first free node of its machine
type), and once every node the plan uses has registered sends each its ``AssignLayers`` (layer
range, model, next hops with their addresses).  When all have declared themselves ready it runs
the very :class:`~helix_async.host.Host` the simulator runs, on the real clock, over ZeroMQ:
MaxFlow routes each request at admission, work goes worker to worker, tokens come back here.

Requests come from the async Python API (:meth:`HostServer.generate`: prompt token ids in, tokens
out as they are produced) or from a trace replayed on the real clock (:meth:`HostServer.replay`).

Failures: a worker that stops answering (the transport's heartbeats, within 2 s) fails every
request whose route crosses it, with a reason naming the node; requests on other routes go on.  New
requests routed over a lost node fail at once (re-planning around it is the faults issue).
``shutdown`` lets in-flight requests finish for a grace period, cancels the rest, tells every
worker to stop and closes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..clock import MonotonicClock
from ..errors import HelixError
from ..flowplan import FlowPlan
from ..host import Host, Query
from ..ids import SINK, SOURCE, NodeRef
from ..messages import (
    AssignLayers,
    Cancel,
    DecodeWork,
    Error,
    ErrorCode,
    Heartbeat,
    NodeStats,
    PromptWork,
    Register,
    Shutdown,
)
from ..placement import Placement
from ..placement.flow import max_flow
from ..roles import Replanner
from ..runlog import RunLog
from ..transport.base import Handler
from ..transport.zmq import ZmqTransport

__all__ = ["HostServer", "RequestFailed"]

log = logging.getLogger("helix_async.host")


class RequestFailed(HelixError, RuntimeError):
    """A request the cluster could not serve (the message says why).

    kind: ``overloaded`` (the admission queue is full: try again later), ``unavailable`` (the
    host is not serving: starting or shutting down), ``cancelled`` (at shutdown) or ``failed``
    (a worker failed it or was lost)."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _NodeState:
    node: int
    gpu: str
    layers: tuple[int, int]
    name: str = ""
    address: str = ""
    ready: bool = False
    lost: bool = False
    capabilities: tuple[str, ...] = ()
    stats: Any = None  # the node's last NodeStats
    stats_at: float = -1.0  # when it came (host clock)
    draining: bool = False  # asked to leave: its requests moved, then told to stop
    lost_at: float = -1.0  # when it was last reported lost (host clock)


@dataclass
class HostCounters:
    registrations: int = 0
    refused: int = 0
    workers_lost: int = 0
    bad_messages: int = 0
    failed_on_lost_worker: int = 0  # requests no live route could take within the recovery timeout
    migrated: int = 0  # requests moved off a lost or draining worker
    rejoined: int = 0  # workers that took a lost node's place
    drained: int = 0  # workers that left on request (SIGTERM)
    cancelled_at_shutdown: int = 0
    log: list[str] = field(default_factory=list)


class _Guard:
    """The host's transport, refusing work for lost workers: the request fails instead of waiting
    on a node that will not answer."""

    def __init__(self, server: HostServer, tp: ZmqTransport) -> None:
        self._server = server
        self._tp = tp

    @property
    def node(self) -> NodeRef:
        return SOURCE

    def set_handler(self, handler: Handler) -> None:  # the server dispatches
        pass

    def set_idle_handler(self, handler: Callable[[NodeRef], None]) -> None:
        self._tp.set_idle_handler(handler)

    def link_idle(self, dest: NodeRef) -> bool:
        return self._tp.link_idle(dest)

    def send(self, dest: NodeRef, msg: Any) -> None:
        st = self._server.nodes.get(dest) if isinstance(dest, int) else None
        if st is not None and st.lost and type(msg) in (PromptWork, DecodeWork):
            rid = msg.request_id
            self._server.clock.call_soon(self._server._fail, rid, f"worker {dest} is lost")
            return
        self._tp.send(dest, msg)  # cancels still go: a worker that answers again frees that KV

    async def close(self) -> None:
        await self._tp.close()


class HostServer:
    """The host process's state and API (see the module doc).

    placement, flow: the plan (flow: its max flow, computed when None). listen: the inbox address.
    kv: the KV expectation (fill limit, output ratio). admission_capacity: most queries waiting for
    admission (beyond: rejected). emulate_time_scale: the cost-model emulation (workers that price
    batches instead of computing them): hold the host's messages back by its links' modelled
    transfer times, slowed by this factor. recovery_timeout: seconds a request may wait for a
    live route after its worker was lost (then it fails, saying why). curve: the host's CURVE keys
    (``transport.curve``), or None for plaintext links. A link whose heartbeat round trip passes
    ``slow_link_rtt`` s, or that resends ``lossy_link_retries`` messages between two reports, is
    degraded: the flows are re-planned with the link capped at ``link_degrade_factor`` times what
    it carried, so max flow moves the rest to other paths and IWRR sends it that much less;
    ``link_recover_s`` s without trouble restore it.

    Faults: a worker reported lost (or draining) leaves the flows: max flow is re-planned without
    it and every request whose route crossed it migrates (``Host.replan``); a worker that registers
    for a lost node takes its place, its neighbours are told its address, and once it is ready the
    flows grow back.
    """

    def __init__(
        self,
        placement: Placement,
        flow: FlowPlan | None = None,
        *,
        listen: str = "tcp://127.0.0.1:*",
        kv: tuple[float, float] = (0.9, 0.6),
        admission_capacity: int = 4096,
        log_dir: str | None = None,
        emulate_time_scale: float | None = None,
        recovery_timeout: float = 60.0,
        curve: Any = None,
        slow_link_rtt: float = 1.0,
        lossy_link_retries: int = 8,
        link_degrade_factor: float = 0.25,
        link_recover_s: float = 30.0,
    ) -> None:
        self.placement = placement
        self.model = placement.model_spec
        self.flow = flow if flow is not None else max_flow(placement)
        self.current_flow = self.flow  # the flows routed by now (re-planned around faults)
        self.clock = MonotonicClock()
        self.tp = ZmqTransport(SOURCE, self.clock, bind=listen, curve=curve)
        self.nodes: dict[int, _NodeState] = {}
        for i in placement.used_nodes():
            r = placement.layers[i]
            assert r is not None
            self.nodes[i] = _NodeState(i, placement.cluster.machine(i).gpu, r)
        self._names: dict[str, int] = {}
        self.counters = HostCounters()
        self.host: Host | None = None
        self._kv = kv
        self._capacity = admission_capacity
        self._assigned = False
        self._ready: asyncio.Event | None = None
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._qids = itertools.count()
        self._closing = False
        self.on_query_done: Callable[[Query], None] | None = None
        self.log_dir = log_dir
        self.emulate_time_scale = emulate_time_scale
        self.recovery_timeout = float(recovery_timeout)
        self.replanner = Replanner(placement, kv)
        self.slow_link_rtt = float(slow_link_rtt)
        self.lossy_link_retries = int(lossy_link_retries)
        self.link_degrade_factor = float(link_degrade_factor)
        self.link_recover_s = float(link_recover_s)
        #: (src, dst) -> [smoothed round trip s, retries so far, last seen bad at (-1: never), degraded]
        self.link_health: dict[tuple[NodeRef, NodeRef], list[Any]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self.runlog: RunLog | None = None
        self.log_files: list[Any] = []

    # ---- life -----------------------------------------------------------------------------------

    async def start(self) -> str:
        """Bind the inbox; returns its address (what workers ``--connect`` to)."""
        self._ready = asyncio.Event()
        address = await self.tp.start()
        self.tp.set_handler(self._on_message)
        self.tp.on_peer_lost = self._peer_lost
        self.tp.on_peer_back = self._peer_back
        return address

    @property
    def address(self) -> str:
        return self.tp.address

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until every node of the plan has registered, loaded its layers and said so."""
        assert self._ready is not None, "start() first"
        await asyncio.wait_for(self._ready.wait(), timeout)

    @property
    def closing(self) -> bool:
        """Shutting down (or shut): no new request is taken."""
        return self._closing

    @property
    def ready(self) -> bool:
        return self._ready is not None and self._ready.is_set()

    @property
    def admission_capacity(self) -> int:
        return self._capacity

    @property
    def overloaded(self) -> bool:
        """The admission queue is full: a new request would be rejected."""
        return self.host is not None and self.host.waiting >= self._capacity

    async def shutdown(self, reason: str = "host shutting down", grace: float = 5.0) -> None:
        """Stop admitting; let in-flight requests finish for ``grace`` seconds, cancel the rest;
        tell every worker to stop; close."""
        if self._closing:
            return
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        host = self.host
        if host is not None:
            deadline = self.clock.now() + grace
            while host.active + host.waiting and self.clock.now() < deadline:
                await asyncio.sleep(0.02)
            for q in host.active_queries():
                self.counters.cancelled_at_shutdown += 1
                host.fail(q.qid, f"cancelled: {reason}")
            for q in host.drop_waiting():
                self.counters.cancelled_at_shutdown += 1
                self._finish_stream(q.qid, RequestFailed(f"cancelled: {reason}", "cancelled"))
        for st in self.nodes.values():
            if st.address and not st.lost:
                self.tp.send(st.node, Shutdown(reason=reason))
        for _ in range(100):  # until the workers have the message (or 1 s)
            if all(self.tp.link_idle(n) for n, st in self.nodes.items() if st.address and not st.lost):
                break
            await asyncio.sleep(0.01)
        await self.tp.close()
        if self.log_dir and self.runlog is not None:
            self.log_files = self.runlog.write(self.log_dir)

    # ---- registration ---------------------------------------------------------------------------

    def _on_message(self, sender: NodeRef, msg: Any) -> None:
        t = type(msg)
        if t is Register:
            self._register(sender, msg)
        elif t is Heartbeat:
            pass
        elif t is NodeStats:
            st = self.nodes.get(msg.node_id)
            if st is None or sender != msg.node_id:
                self.counters.bad_messages += 1
                return
            st.stats = msg
            st.stats_at = self.clock.now()
            if msg.retried and msg.rtt_us:
                for peer, retried, rtt in zip(msg.peers, msg.retried, msg.rtt_us, strict=True):
                    self._observe_link(msg.node_id, SOURCE if peer < 0 else peer, retried, rtt / 1e6)
        elif t is Error and msg.request_id < 0:
            node = self._names.get(msg.name) if hasattr(msg, "name") else None
            log.error("worker %r reports: %s", sender if node is None else node, msg.text)
            self.counters.log.append(f"worker {sender!r}: {msg.text}")
        elif self.host is not None:
            self.host.on_message(sender, msg)
        else:
            self.counters.bad_messages += 1

    def _refuse(self, msg: Register, why: str) -> None:
        self.counters.refused += 1
        log.warning("refused worker %s (%s): %s", msg.name, msg.address, why)
        self.tp.connect(msg.name, msg.address)
        self.tp.send(msg.name, Error(request_id=-1, code=int(ErrorCode.NOT_ASSIGNED), text=why))

    def _register(self, sender: NodeRef, msg: Register) -> None:
        self.counters.registrations += 1
        if "ready" in msg.capabilities:
            node = self._names.get(msg.name)
            if node is None or node != msg.node_id:
                self.counters.bad_messages += 1
                return
            ready = self.nodes[node]
            ready.ready = True
            log.info("node %d ready (%s)", node, msg.name)
            if self.host is not None:  # a rejoined worker: the flows grow back
                ready.lost = False
                self._replan(f"worker {node} rejoined")
            elif all(x.ready for x in self.nodes.values()):
                self._serve()
            return
        if "draining" in msg.capabilities:
            node = self._names.get(msg.name)
            if node is None or node != msg.node_id:
                self.counters.bad_messages += 1
                return
            self._drain(node)
            return
        if msg.name in self._names:  # the same worker again (a retried registration)
            return
        gpu = msg.machine_type.lower()
        rejoin = self._assigned
        if msg.node_id >= 0:
            found = self.nodes.get(msg.node_id)
            if found is None:
                self._refuse(msg, f"node {msg.node_id} is not in the plan (its nodes: {sorted(self.nodes)})")
                return
            st = found
            if st.name and not (rejoin and st.lost):
                self._refuse(msg, f"node {msg.node_id} is taken by {st.name}")
                return
            if st.gpu.lower() != gpu:
                self._refuse(msg, f"node {msg.node_id} is a {st.gpu} in the plan, the worker is a {msg.machine_type}")
                return
        else:
            free = [s for s in self.nodes.values() if s.gpu.lower() == gpu and (not s.name if not rejoin else s.lost)]
            if not free:
                why = "the plan's nodes are all assigned and live" if rejoin else f"no free {msg.machine_type} node in the plan"
                self._refuse(msg, why)
                return
            st = free[0]
        if rejoin:
            # a lost node's place: the old worker's name no longer speaks for it
            self._names.pop(st.name, None)
            st.ready = False
            st.draining = False
            st.stats = None
            self.counters.rejoined += 1
        st.name = msg.name
        st.address = msg.address
        st.capabilities = msg.capabilities
        self._names[msg.name] = st.node
        self.tp.name_peer(msg.name, st.node)
        self.tp.connect(st.node, msg.address)
        log.info("worker %s (%s) is node %d [%d, %d)", msg.name, msg.address, st.node, *st.layers)
        if rejoin:
            log.warning("worker %s takes the place of lost node %d", msg.name, st.node)
            self._assign_one(st.node)
            # its neighbours learn its new address (live ones only: a lost one gets it when it rejoins)
            for x in self.placement.in_links(st.node):
                if isinstance(x, int) and x in self.nodes and not self.nodes[x].lost:
                    self._assign_one(x)
        elif all(s.name for s in self.nodes.values()):
            self._assign()

    def _assign(self) -> None:
        self._assigned = True
        for i in self.nodes:
            self._assign_one(i)

    def _assign_one(self, i: int) -> None:
        p = self.placement
        st = self.nodes[i]
        hops = []
        for y in p.out_links(i):
            # (a last stage returns its tokens to the host it registered with: not a hop here)
            if isinstance(y, int) and y in self.nodes:
                ys = self.nodes[y]
                hops.append((y, ys.address, ys.layers[0], ys.layers[1]))
        prev = tuple(x for x in p.in_links(i) if isinstance(x, int))
        self.tp.send(
            i,
            AssignLayers(node_id=i, model=self.model.name, start=st.layers[0], end=st.layers[1], plan_id=1,
                         next_hops=tuple(hops), prev_nodes=prev),
        )

    def _serve(self) -> None:
        router, self.current_flow, _ = self.replanner.router(frozenset())
        transport: Any = _Guard(self, self.tp)
        if self.emulate_time_scale is not None:
            # the cost-model emulation: the coordinator's links as the cluster file has them
            from ..transport.emulated import EmulatedLinks, links_from

            links = links_from(self.placement.cluster, SOURCE)
            transport = EmulatedLinks(transport, self.clock, links, self.emulate_time_scale)
        host = Host(self.clock, transport, router=router, admission_capacity=self._capacity)
        host.on_token = self._on_token
        host.on_fail = self._on_fail
        host.on_reject = self._on_reject
        host.on_query_done = self._on_done
        self.host = host
        self.runlog = RunLog(self.clock.now())
        self._watchdog = asyncio.get_running_loop().create_task(self._recovery_watch(), name="recovery-watch")
        assert self._ready is not None
        self._ready.set()
        log.info("all %d nodes ready: serving", len(self.nodes))

    # ---- failures -------------------------------------------------------------------------------

    def _peer_lost(self, peer: NodeRef) -> None:
        if not isinstance(peer, int) or peer not in self.nodes:
            return
        st = self.nodes[peer]
        if st.lost:
            return
        st.lost = True
        st.lost_at = self.clock.now()
        self.counters.workers_lost += 1
        log.error("worker %d (%s) stopped answering", peer, st.name)
        if self.host is not None:
            self._replan(f"worker {peer} is lost")

    def _peer_back(self, peer: NodeRef) -> None:
        if not (isinstance(peer, int) and peer in self.nodes and self.nodes[peer].lost):
            return
        st = self.nodes[peer]
        if st.draining or not st.ready:
            return
        # a stall, not a crash: it drops what it held for requests that moved, and serves again
        log.warning("worker %d answers again; back in service", peer)
        host = self.host
        if host is not None:
            for rid in host.stale_on.pop(peer, []):
                self.tp.send(peer, Cancel(request_id=rid, reason="it moved while this worker was silent"))
        st.lost = False
        if host is not None:
            self._replan(f"worker {peer} is back")

    def _drain(self, node: int) -> None:
        """The worker asked to leave (SIGTERM): move its requests off it, then tell it to stop."""
        st = self.nodes[node]
        if st.draining:
            return
        st.draining = True
        st.lost = True
        st.lost_at = self.clock.now()
        self.counters.drained += 1
        log.warning("worker %d (%s) is draining", node, st.name)
        if self.host is not None:
            for rid in self.host.stale_on.pop(node, []):
                self.tp.send(node, Cancel(request_id=rid, reason="drained"))
            self._replan(f"worker {node} is draining")
            for rid in self.host.stale_on.pop(node, []):  # the ones moved just now: it is alive, tell it
                self.tp.send(node, Cancel(request_id=rid, reason="drained"))
        self.tp.send(node, Shutdown(reason="drained: its requests moved to other workers"))

    def _replan(self, why: str) -> None:
        host = self.host
        assert host is not None
        lost: set[NodeRef] = {n for n, st in self.nodes.items() if st.lost}
        router, flow, reason = self.replanner.router(frozenset(n for n in lost if isinstance(n, int)))
        moved = host.replan(router, lost, reason)
        if router is not None:
            self.current_flow = flow
        self.counters.migrated += len(moved)
        if reason:
            log.error("%s: %s", why, reason)
        log.warning("%s: max flow re-planned to %.1f tokens/s over %d live nodes; %d requests migrated", why,
                    flow.value, len(self.nodes) - len(lost), len(moved))

    def _observe_link(self, src: NodeRef, dst: NodeRef, retried: int, rtt: float) -> None:
        """One report of a link's health: degrade it past the thresholds, restore it after quiet."""
        if dst == SOURCE:
            dst = SINK  # a worker's link to the host is the plan's link to the sink
        key = (src, dst)
        h = self.link_health.setdefault(key, [0.0, retried, -1.0, False])
        new_retries = retried - h[1]
        h[0], h[1] = rtt, retried
        now = self.clock.now()
        if rtt > self.slow_link_rtt or new_retries >= self.lossy_link_retries:
            h[2] = now
            if not h[3] and self.host is not None:
                h[3] = True
                # cap the link at a fraction of what it carries now: max flow moves the rest elsewhere
                f = self.current_flow.link_flows.get(key, 0.0)
                cap = self.current_flow.link_capacity.get(key, 0.0)
                if f > 0 and cap > 0:
                    scale = self.replanner.link_scale.get(key, 1.0) * self.link_degrade_factor * f / cap
                    self.replanner.link_scale[key] = max(scale, 1e-9)
                    self._replan(f"link {src}->{dst} is slow or lossy (round trip {rtt:.3f} s, {new_retries} resent)")
        elif h[3] and now - h[2] > self.link_recover_s:
            h[3] = False
            if self.replanner.link_scale.pop(key, None) is not None and self.host is not None:
                self._replan(f"link {src}->{dst} is healthy again")

    async def _recovery_watch(self) -> None:
        """Fail requests that found no live route within ``recovery_timeout`` of their migration;
        watch the host's own links."""
        while not self._closing:
            await self.clock.sleep(min(1.0, self.recovery_timeout / 4))
            host = self.host
            if host is None:
                continue
            for peer, (_b, retried, rtt) in self.tp.link_health().items():
                if isinstance(peer, int) and peer in self.nodes and not self.nodes[peer].lost and rtt > 0:
                    self._observe_link(SOURCE, peer, retried, rtt)
            now = self.clock.now()
            for q in host.migrating_queries():
                if q.moved_at >= 0 and now - q.moved_at > self.recovery_timeout:
                    self.counters.failed_on_lost_worker += 1
                    reason = host.admission_stopped or "no live route could take it"
                    host.fail(q.qid, f"its worker was lost and {reason} (waited {self.recovery_timeout:g} s)")

    @property
    def admission_stopped(self) -> str:
        """Why new requests are not admitted now ("" while they are)."""
        return "" if self.host is None else self.host.admission_stopped

    def _fail(self, qid: int, reason: str) -> None:
        if self.host is not None:
            self.host.fail(qid, reason)

    # ---- requests -------------------------------------------------------------------------------

    def _on_token(self, q: Query, token: int, last: bool) -> None:
        if self.runlog is not None:
            self.runlog.token(q.qid, self.clock.now())
        s = self._streams.get(q.qid)
        if s is not None:
            s.put_nowait(token)

    def _finish_stream(self, qid: int, end: Any) -> None:
        s = self._streams.get(qid)
        if s is not None:
            s.put_nowait(end)

    def _on_done(self, q: Query) -> None:
        if self.runlog is not None:
            self.runlog.finished(q.qid, q.route)
        self._finish_stream(q.qid, None)
        if self.on_query_done is not None:
            self.on_query_done(q)

    def _on_fail(self, q: Query) -> None:
        if self.runlog is not None:
            self.runlog.finished(q.qid, q.route, q.error)
        self._finish_stream(q.qid, RequestFailed(q.error, "cancelled" if q.error.startswith("cancelled") else "failed"))

    def _on_reject(self, q: Query) -> None:
        self._finish_stream(q.qid, RequestFailed("rejected: the admission queue is full or no route can take it", "overloaded"))

    async def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        qid: int | None = None,
    ) -> AsyncGenerator[int, None]:
        """Serve one request: yields its ``max_tokens`` tokens as they come (greedy, or sampled at
        ``temperature`` within ``top_p`` from a generator seeded by ``seed``).  Raises
        :class:`RequestFailed` when the cluster cannot serve it."""
        if self.host is None or self._closing:
            raise RequestFailed("the host is not serving" + (" (shutting down)" if self._closing else " yet"), "unavailable")
        if not prompt:
            raise ValueError("empty prompt")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not (temperature >= 0 and 0 < top_p <= 1 and seed >= 0):
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and seed >= 0")
        vocab = self.model.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt):
            raise ValueError(f"token ids must be in [0, {vocab})")
        q_id = next(self._qids) if qid is None else qid
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[q_id] = stream
        if self.runlog is not None:
            self.runlog.submitted(q_id, len(prompt), max_tokens, self.clock.now())
        try:
            sampling = (float(temperature), float(top_p), int(seed))
            if self.host.submit(q_id, len(prompt), max_tokens, tuple(int(t) for t in prompt), sampling) is None:
                raise RequestFailed("rejected: the admission queue is full or no route can take it", "overloaded")
            got = 0
            while True:
                item = await stream.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                got += 1
                yield item
        finally:
            self._streams.pop(q_id, None)
            if self.host is not None:
                # the caller stopped reading (it has what it wanted, or went away): free its KV
                self.host.cancel(q_id, "cancelled by the client")

    async def complete(self, prompt: Sequence[int], max_tokens: int, **sampling: Any) -> list[int]:
        """All the tokens of one request (see :meth:`generate`)."""
        return [t async for t in self.generate(prompt, max_tokens, **sampling)]
