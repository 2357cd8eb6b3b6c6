"""``python -m helix_async host``: the coordinator of a real cluster.

:class:`HostServer` binds the host's inbox (``HostSettings.listen``), takes worker registrations
and gives each a node of the plan (the node id a worker asks for, else the first free node of its
machine type), and once every node the plan uses has registered sends each its ``AssignLayers``
(layer range, model, next hops with their addresses).  When all have declared themselves ready it
runs the very :class:`~helix_async.host.Host` the simulator runs, on the real clock, over ZeroMQ:
MaxFlow routes each request at admission, work goes worker to worker, tokens come back here.

Requests come from the async Python API (:meth:`HostServer.generate`: prompt token ids in, tokens
out as they are produced), which is the serving-host protocol the HTTP front door talks to
(:class:`~helix_async.frontend.host_protocol.ServingHost`); the ``host`` command also drives it
with a trace replayed on the real clock or an offline population
(:func:`helix_async.runtime.commands.replay_trace`, :func:`~helix_async.runtime.commands.offline`).

Failures (docs/faults.md): a worker that stops answering (the transport's heartbeats, within 2 s),
or that asks to leave (SIGTERM: it drains), leaves the flows.  :class:`~helix_async.roles.Replanner`
re-plans max flow over the live nodes (the plan's layer ranges stay; no new placement is solved)
and :meth:`Host.replan <helix_async.host.Host.replan>` moves every request whose route crossed
the node to a live route, rebuilding its KV there; a request that finds none within
``recovery_timeout`` fails, saying why, and while some layer has no live node admission stops.
Work sent to a node already known lost fails its request at once.  A worker that registers for a
lost node takes its place, and once it is ready the flows grow back; a worker that answers again
after a stall is back in service.  A slow or lossy link has its flow capped, and restored after a
quiet period.  ``shutdown`` lets in-flight requests finish for a grace period, cancels the rest,
tells every worker to stop and closes.

Who may say what (docs/security.md).  A registration is taken only from a sender that may hold the
node: with CURVE, the node its key is bound to (``worker-N``'s key: node N, whatever node id the
message asks for); its address must parse and, with CURVE, name that same key, before the node is
given.  A registrant that goes silent before it is ready, or that is not ready within
``ready_timeout_s`` of its assignment, frees its node.  A refused registrant is told why over an
outbox that is closed once the answer is acknowledged (or after ``refusal_linger_s``), and at most
``max_refusals`` such answers are in flight (the rest are refused without one).  ``NodeStats`` and a
node's own errors are taken only from that node; tokens and request errors only from a stage of the
request's route (:meth:`Host.on_message <helix_async.host.Host.on_message>`).  Everything else is
dropped and counted per (kind, sender) (:attr:`HostServer.dropped`), logged rate-limited per cause.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..clock import MonotonicClock
from ..errors import RequestFailed
from ..flowplan import FlowPlan
from ..frontend.host_protocol import HostSnapshot, LinkReport, NodeReport
from ..host import Host, Query
from ..ids import SINK, SOURCE, NodeRef
from ..logs import RateLimitedLog
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
from ..routing.migration import MigrationPolicy
from ..routing.policies import runtime_policy
from ..runlog import RunLog
from ..sampling import SampledToken, SamplingParams
from ..settings import HostSettings
from ..transport.base import Handler
from ..transport.curve import check_address, warn_plaintext
from ..transport.zmq import ZmqTransport, inbox_limit

__all__ = ["HostCounters", "HostServer", "LinkHealth"]

log = logging.getLogger("helix_async.host")

_SEED_MAX = (1 << 63) - 1  # a seed travels as a non-negative int64 (PromptWork.seed)


class LinkHealth(NamedTuple):
    """What the host knows of one directed link's health.

    rtt: the last reported heartbeat round trip, smoothed (s). retries: messages resent on it so
    far, as last reported. bad_at: when it was last seen slow or lossy (host clock, s; -1: never).
    degraded: its flow is capped now.
    """

    rtt: float = 0.0
    retries: int = 0
    bad_at: float = -1.0
    degraded: bool = False


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
    assigned_at: float = -1.0  # when its registrant was last sent its layers (host clock)


@dataclass
class HostCounters:
    registrations: int = 0
    refused: int = 0
    workers_lost: int = 0
    bad_messages: int = 0
    failed_on_lost_worker: int = 0  # requests no live route could take within the recovery timeout
    migrated: int = 0  # requests moved off a lost or draining worker
    rejoined: int = 0  # workers that took a lost node's place
    drained: int = 0  # workers that left on request (SIGTERM, or the operator's POST /admin/retire)
    cancelled_at_shutdown: int = 0
    freed: int = 0  # registrants that lost their node: silent, or not ready in time
    refused_silently: int = 0  # registrations refused without an answer (bad address, too many answers in flight)
    log: list[str] = field(default_factory=list)


def _label(n: NodeRef) -> str:
    """A node as the metrics name it: ``"host"`` for the coordinator's two sides, else its id."""
    return "host" if isinstance(n, str) else str(n)


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

    placement, flow: the plan (flow: its max flow, computed when None). settings: how it serves
    (:class:`~helix_async.settings.HostSettings`: inbox address, KV expectation, admission
    capacity, logs, emulation, recovery and link-health thresholds; its defaults when None).
    curve: the host's CURVE keys (``transport.curve``), or None for plaintext links.

    Faults: a worker reported lost (or draining) leaves the flows: max flow is re-planned without
    it and every request whose route crossed it migrates (``Host.replan``); a worker that registers
    for a lost node takes its place, its neighbours are told its address, and once it is ready the
    flows grow back.  A link whose heartbeat round trip passes ``settings.slow_link_rtt``, or that
    resends ``settings.lossy_link_retries`` messages between two reports, is degraded: the flows
    are re-planned with the link capped at ``settings.link_degrade_factor`` times what it carried,
    so max flow moves the rest to other paths and IWRR sends it that much less;
    ``settings.link_recover_s`` seconds without trouble restore it.
    """

    def __init__(
        self,
        placement: Placement,
        flow: FlowPlan | None = None,
        settings: HostSettings | None = None,
        *,
        curve: Any = None,
    ) -> None:
        self.settings = settings = settings if settings is not None else HostSettings()
        # refused before anything is bound: a scheduler the runtime cannot run starts nothing
        policy = runtime_policy(settings.scheduler, "--scheduler")
        self.placement = placement
        self.model = placement.model_spec
        self.flow = flow if flow is not None else max_flow(placement)
        self.current_flow = self.flow  # the flows routed by now (re-planned around faults)
        self.clock = MonotonicClock()
        # the host's inbox takes no tensors: tokens, stats, registrations
        self.tp = ZmqTransport(SOURCE, self.clock, bind=settings.listen, curve=curve,
                               max_message_bytes=inbox_limit(tensors=False), numeric_names=False)
        self.nodes: dict[int, _NodeState] = {}
        for i in placement.used_nodes():
            r = placement.layers[i]
            assert r is not None
            self.nodes[i] = _NodeState(i, placement.cluster.machine(i).gpu, r)
        self._names: dict[str, int] = {}
        self.counters = HostCounters()
        self.host: Host | None = None
        #: the rescheduling policy (``settings.migration``), once serving
        self.migration: MigrationPolicy | None = None
        self._assigned = False
        self._ready: asyncio.Event | None = None
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._qids = itertools.count()
        self._closing = False
        self.on_query_done: Callable[[Query], None] | None = None
        self.replanner = Replanner(placement, settings.kv, policy=policy)
        #: (src, dst) -> the link's health, from the workers' reports and the host's own heartbeats
        self.link_health: dict[tuple[NodeRef, NodeRef], LinkHealth] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self.runlog: RunLog | None = None
        self.log_files: list[Any] = []
        #: (message kind, sender) -> messages dropped because that sender may not send them
        self.dropped: dict[tuple[str, NodeRef], int] = {}
        self.ready_timeout_s = 600.0  # from its assignment: loading a large model takes a while
        self.refusal_linger_s = 10.0
        self.max_refusals = 16
        self._refusals: dict[str, float] = {}  # refusal outbox -> when it closes at the latest
        self._rlog = RateLimitedLog(log, self.clock.now)
        self._reg_watch: asyncio.Task[None] | None = None
        #: seconds a draining worker's requests may take to move by live migration (settings.migration)
        self.drain_migration_s = 20.0
        self._tasks_drain: list[asyncio.Task[None]] = []

    # ---- life -----------------------------------------------------------------------------------

    async def start(self) -> str:
        """Bind the inbox; returns its address (what workers ``--connect`` to)."""
        self._ready = asyncio.Event()
        address = await self.tp.start()
        self.tp.set_handler(self._on_message)
        self.tp.on_peer_lost = self._peer_lost
        self.tp.on_peer_back = self._peer_back
        self._reg_watch = asyncio.get_running_loop().create_task(self._registration_watch(), name="registration-watch")
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
        """Requests that may wait for admission at most (``settings.admission_capacity``)."""
        return self.settings.admission_capacity

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to ``vocab_size - 1`` (the plan's model)."""
        return self.model.vocab_size

    @property
    def workers(self) -> int:
        """Worker nodes in the plan."""
        return len(self.nodes)

    def now(self) -> float:
        """The host's clock (monotonic seconds)."""
        return self.clock.now()

    @property
    def overloaded(self) -> bool:
        """The admission queue is full: a new request would be rejected."""
        return self.host is not None and self.host.waiting >= self.settings.admission_capacity

    async def shutdown(self, reason: str = "host shutting down", grace: float | None = None) -> None:
        """Stop admitting; let in-flight requests finish for ``grace`` seconds (None:
        ``settings.shutdown_grace``), cancel the rest; tell every worker to stop; close."""
        if self._closing:
            return
        self._closing = True
        if self.migration is not None:
            self.migration.stop()
        if grace is None:
            grace = self.settings.shutdown_grace
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reg_watch is not None:
            self._reg_watch.cancel()
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
        if self.settings.log_dir and self.runlog is not None:
            self.log_files = self.runlog.write(self.settings.log_dir)

    # ---- registration ---------------------------------------------------------------------------

    def _drop(self, kind: type, sender: NodeRef, why: str) -> None:
        """A message ``sender`` may not send: dropped, counted per (kind, sender), logged rate-limited."""
        self.counters.bad_messages += 1
        key = (kind.__name__, sender)
        self.dropped[key] = self.dropped.get(key, 0) + 1
        self._rlog.warning(f"dropped {kind.__name__}: {why}", "dropped %s from %r: %s", kind.__name__, sender, why)

    def _on_message(self, sender: NodeRef, msg: Any) -> None:
        t = type(msg)
        if t is Register:
            self._register(sender, msg)
        elif t is Heartbeat:
            pass
        elif t is NodeStats:
            st = self.nodes.get(msg.node_id)
            if st is None or sender != msg.node_id:
                self._drop(t, sender, "stats not from the node they describe")
                return
            st.stats = msg
            st.stats_at = self.clock.now()
            if msg.retried and msg.rtt_us:
                for peer, retried, rtt in zip(msg.peers, msg.retried, msg.rtt_us, strict=True):
                    self._observe_link(msg.node_id, SOURCE if peer < 0 else peer, retried, rtt / 1e6)
        elif t is Error and msg.request_id < 0:
            # (sender: the node id of a registered worker, the transport names it so)
            if not (isinstance(sender, int) and sender in self.nodes and self.nodes[sender].name):
                self._drop(t, sender, "a node's error not from a registered node")
                return
            try:
                code = ErrorCode(msg.code).name
            except ValueError:  # a code newer than this host: still logged, by number
                code = str(msg.code)
            log.error("worker %r reports %s: %s", sender, code, msg.text)
            self.counters.log.append(f"worker {sender!r} ({code}): {msg.text}")
        elif self.host is not None:
            self.host.on_message(sender, msg)
        else:
            self.counters.bad_messages += 1

    def _refuse(self, msg: Register, why: str, *, answer: bool = True) -> None:
        """Refuse a registration: counted, logged (rate-limited), and answered with an ``Error`` over
        a short-lived outbox, at most ``max_refusals`` at a time (``answer``: its address is fit to
        dial)."""
        self.counters.refused += 1
        self._rlog.warning(f"refused registration: {why.split(' (')[0]}", "refused worker %.64r (%.96r): %s",
                           msg.name, msg.address, why)
        if not answer or len(self._refusals) >= self.max_refusals:
            self.counters.refused_silently += 1
            return
        peer = "refused:" + msg.name
        try:
            self.tp.connect(peer, msg.address)
        except Exception:  # noqa: BLE001 - an address ZeroMQ refuses: no answer (counted above)
            self.counters.refused_silently += 1
            return
        self._refusals[peer] = self.clock.now() + self.refusal_linger_s
        self.tp.send(peer, Error(request_id=-1, code=int(ErrorCode.NOT_ASSIGNED), text=why))

    @property
    def refusals_in_flight(self) -> int:
        """Refusal answers whose outbox is still open (at most ``max_refusals``)."""
        return len(self._refusals)

    def _free(self, node: int, why: str) -> None:
        """A registrant that did not become ready loses its node: the next worker may take it."""
        st = self.nodes[node]
        log.warning("worker %s frees node %d: %s", st.name, node, why)
        self._names.pop(st.name, None)
        self.tp.disconnect(node)
        st.name = ""
        st.address = ""
        st.ready = False
        st.assigned_at = -1.0
        self.counters.freed += 1
        if self._assigned:  # its neighbours hold its old address: it is replaced as a lost node is
            st.lost = True
            st.lost_at = self.clock.now()

    async def _registration_watch(self) -> None:
        """Close refusal outboxes once answered (or late); free nodes whose registrant is not
        ready within ``ready_timeout_s`` of its assignment."""
        while not self._closing:
            await self.clock.sleep(0.25)
            now = self.clock.now()
            for peer, until in list(self._refusals.items()):
                if self.tp.link_idle(peer) or now > until:
                    self.tp.disconnect(peer)
                    del self._refusals[peer]
            for node, st in self.nodes.items():
                if st.name and not st.ready and st.assigned_at >= 0 and now - st.assigned_at > self.ready_timeout_s:
                    self._free(node, f"not ready {self.ready_timeout_s:g} s after its assignment")

    def _register(self, sender: NodeRef, msg: Register) -> None:
        self.counters.registrations += 1
        if "ready" in msg.capabilities:
            node = self._names.get(msg.name)
            if node is None or node != msg.node_id or sender != node:
                self._drop(Register, sender, "a ready notice not from the node's registrant")
                return
            ready = self.nodes[node]
            ready.ready = True
            ready.lost = False
            log.info("node %d ready (%s)", node, msg.name)
            if self.host is not None:  # a rejoined worker: the flows grow back
                self._replan(f"worker {node} rejoined")
            elif all(x.ready for x in self.nodes.values()):
                self._serve()
            return
        if "draining" in msg.capabilities:
            node = self._names.get(msg.name)
            if node is None or node != msg.node_id or sender != node:
                self._drop(Register, sender, "a draining notice not from the node's registrant")
                return
            self._drain(node)
            return
        if msg.name in self._names:  # the same worker again (a retried registration)
            return
        authenticated = self.tp.authenticated
        # the address first: a node is never given to a registrant that cannot be dialled back
        bad = check_address(msg.address, self.tp.key_of(sender) if authenticated else None)
        if bad:
            self._refuse(msg, f"its address is unusable: {bad}", answer=False)
            return
        want = msg.node_id
        if authenticated:
            # the key is the authority: it speaks for one node, whatever the message asks for
            if not (isinstance(sender, int) and sender in self.nodes):
                self._refuse(msg, f"its key is bound to no node of the plan (it speaks for {sender!r})")
                return
            if want >= 0 and want != sender:
                self._refuse(msg, f"its key is bound to node {sender}, not node {want}")
                return
            want = sender
        gpu = msg.machine_type.lower()
        rejoin = self._assigned
        if want >= 0:
            found = self.nodes.get(want)
            if found is None:
                self._refuse(msg, f"node {want} is not in the plan (its nodes: {sorted(self.nodes)})")
                return
            st = found
            if st.name and not (rejoin and st.lost):
                self._refuse(msg, f"node {want} is taken by {st.name}")
                return
            if st.gpu.lower() != gpu:
                self._refuse(msg, f"node {want} is a {st.gpu} in the plan, the worker is a {msg.machine_type}")
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
            # its neighbours learn its new address: live ones, and lost ones already taken again (not
            # ready yet); a lost one still untaken gets it when it is taken
            for x in self.placement.in_links(st.node):
                if isinstance(x, int) and x in self.nodes:
                    xs = self.nodes[x]
                    if xs.address and (not xs.lost or xs.assigned_at >= xs.lost_at):
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
            # (a freed node has no address yet: its neighbours learn the next one when it is taken)
            if isinstance(y, int) and y in self.nodes and self.nodes[y].address:
                ys = self.nodes[y]
                hops.append((y, ys.address, ys.layers[0], ys.layers[1]))
        prev = tuple(x for x in p.in_links(i) if isinstance(x, int))
        st.assigned_at = self.clock.now()
        self.tp.send(
            i,
            AssignLayers(node_id=i, model=self.model.name, start=st.layers[0], end=st.layers[1], plan_id=1,
                         next_hops=tuple(hops), prev_nodes=prev),
        )

    def _serve(self) -> None:
        router, self.current_flow, _ = self.replanner.router(frozenset())
        transport: Any = _Guard(self, self.tp)
        if self.settings.emulate_time_scale is not None:
            # the cost-model emulation: the coordinator's links as the cluster file has them
            from ..transport.emulated import EmulatedLinks, links_from

            links = links_from(self.placement.cluster, SOURCE)
            transport = EmulatedLinks(transport, self.clock, links, self.settings.emulate_time_scale)
        host = Host(self.clock, transport, router=router, admission_capacity=self.settings.admission_capacity,
                    peer_address=self._address_of)
        host.on_token = self._on_token
        host.on_fail = self._on_fail
        host.on_reject = self._on_reject
        host.on_query_done = self._on_done
        self.host = host
        if self.settings.migration:
            layers = {i: st.layers for i, st in self.nodes.items()}
            self.migration = MigrationPolicy(host, self.clock, layers, self.placement.links, self._node_load)
            self.migration.start()
        self.runlog = RunLog(self.clock.now())
        self._watchdog = asyncio.get_running_loop().create_task(self._recovery_watch(), name="recovery-watch")
        assert self._ready is not None
        self._ready.set()
        log.info("all %d nodes ready: serving", len(self.nodes))
        if self.tp.curve is None:
            warn_plaintext("the host")

    def _address_of(self, node: int) -> str:
        """Where node ``node``'s worker listens (a migration's source dials it there)."""
        st = self.nodes.get(node)
        return "" if st is None else st.address

    def _node_load(self, node: int) -> tuple[int, int, int]:
        """(KV in use, KV capacity, 0) of a node from its last ``NodeStats`` (before its first: none
        in use, of the plan's capacity); none for a node lost or draining (the policy moves nothing
        there)."""
        st = self.nodes.get(node)
        if st is None or st.lost or st.draining:
            return (0, 0, 0)
        if st.stats is None:
            host = self.host
            try:
                return (0, 0 if host is None else int(host.router.kv.total(node)), 0)
            except KeyError:
                return (0, 0, 0)
        return (st.stats.kv_used, st.stats.kv_capacity, 0)

    # ---- failures -------------------------------------------------------------------------------

    def _peer_lost(self, peer: NodeRef) -> None:
        if not isinstance(peer, int) or peer not in self.nodes:
            return
        st = self.nodes[peer]
        if st.lost:
            return
        if st.name and not st.ready and not st.draining:
            self._free(peer, "it went silent before it was ready")  # (a wedge: an address nobody answers at)
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

    def node_states(self) -> list[dict[str, Any]]:
        """Every node of the plan: id, name, GPU, layers and state (serving; draining, or left once
        drained; lost; or waiting for its worker), for ``GET /admin/nodes``."""
        out = []
        for i in sorted(self.nodes):
            st = self.nodes[i]
            state = ("left" if st.draining and st.lost else "draining" if st.draining else "lost" if st.lost
                     else "serving" if st.ready else "waiting")
            out.append({"node": i, "name": st.name, "gpu": st.gpu, "layers": list(st.layers), "state": state})
        return out

    def retire(self, node: int) -> tuple[int, str]:
        """Retire ``node`` on the operator's word (``POST /admin/retire``): it drains as a worker
        told to stop (SIGTERM) does (:meth:`_drain`), then is told to stop. Returns an HTTP status
        and what happens: 202 and "draining by live migration" (or "by recomputation"); else,
        with nothing changed, 404 (not in the plan), 503 (not serving yet, or shutting down) or
        409 (the node is not serving, is already draining, or no other live node holds some of
        its layers) and the reason."""
        st = self.nodes.get(node) if isinstance(node, int) and not isinstance(node, bool) else None
        if st is None:
            return 404, f"node {node!r} is not in the plan (nodes: {sorted(self.nodes)})"
        if self.host is None or self._closing:
            return 503, "the cluster is not serving" + (" (shutting down)" if self._closing else " yet")
        if st.draining:
            return 409, f"node {node} is already draining"
        if st.lost or not st.ready:
            return 409, f"node {node} is not serving (lost or not registered)"
        gone = frozenset(n for n, x in self.nodes.items() if x.lost or x.draining) | {node}
        if self.replanner.router(gone)[0] is None:
            gaps = self.replanner.uncovered(gone)
            what = (f"it is the last live node holding layers {', '.join(f'[{a}, {b})' for a, b in gaps)}" if gaps
                    else "no path of live links would cross the plan without it")
            return 409, f"node {node}: {what}; retiring it would stop the service"
        how = "live migration" if self.migration is not None else "recomputation"
        log.warning("node %d (%s) retired by the operator: draining by %s", node, st.name, how)
        self._drain(node)
        return 202, f"draining by {how}"

    def _drain(self, node: int) -> None:
        """The worker asked to leave (SIGTERM): move its requests off it, then tell it to stop.

        With ``settings.migration``, by live migration first (docs/migration.md, "Draining"): the
        flows are re-planned without the node, so nothing new goes there, and the policy moves
        every stage it holds to a node with the same layers, KV and all; what has not moved within
        ``drain_migration_s`` (no such node, or a move refused) is moved by recomputation, as
        without migration."""
        st = self.nodes[node]
        if st.draining:
            return
        if self.migration is not None and self.host is not None:
            st.draining = True
            self.counters.drained += 1
            log.warning("worker %d (%s) is draining: its requests move by live migration", node, st.name)
            host = self.host
            gone = frozenset(n for n, x in self.nodes.items() if x.lost or x.draining)
            router, flow, reason = self.replanner.router(gone)
            if router is not None:
                host.replan(router, (), reason)  # (no node lost: every request keeps its route)
                self.current_flow = flow
            self.migration.drain(node)
            self._tasks_drain.append(asyncio.get_running_loop().create_task(self._finish_drain(node)))
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

    def _carries(self, node: int) -> bool:
        host = self.host
        return host is not None and any(q.route is not None and any(s[0] == node for s in q.route)
                                        for q in host.active_queries())

    async def _finish_drain(self, node: int) -> None:
        """Wait (bounded) until a draining node carries no request, then let it go; what is still
        on it by then moves by recomputation."""
        deadline = self.clock.now() + self.drain_migration_s
        while self._carries(node) and self.clock.now() < deadline and not self._closing:
            await self.clock.sleep(0.05)
        if self._closing or self.host is None:
            return
        st = self.nodes[node]
        st.lost = True
        st.lost_at = self.clock.now()
        if self.migration is not None:
            self.migration.draining.discard(node)
        host = self.host
        for rid in host.stale_on.pop(node, []):
            self.tp.send(node, Cancel(request_id=rid, reason="drained"))
        self._replan(f"worker {node} drained")  # (moves by recomputation what is still on it)
        for rid in host.stale_on.pop(node, []):
            self.tp.send(node, Cancel(request_id=rid, reason="drained"))
        self.tp.send(node, Shutdown(reason="drained: its requests moved to other workers"))

    def _replan(self, why: str) -> None:
        host = self.host
        assert host is not None
        lost: set[NodeRef] = {n for n, st in self.nodes.items() if st.lost}
        # a node draining by migration serves what it holds until it has moved, but takes nothing new
        out = lost | {n for n, st in self.nodes.items() if st.draining}
        router, flow, reason = self.replanner.router(frozenset(n for n in out if isinstance(n, int)))
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
        cfg = self.settings
        old = self.link_health.get(key, LinkHealth(retries=retried))
        new_retries = retried - old.retries
        h = old._replace(rtt=rtt, retries=retried)
        now = self.clock.now()
        replan = ""
        if rtt > cfg.slow_link_rtt or new_retries >= cfg.lossy_link_retries:
            h = h._replace(bad_at=now)
            if not h.degraded and self.host is not None:
                h = h._replace(degraded=True)
                # cap the link at a fraction of what it carries now: max flow moves the rest elsewhere
                f = self.current_flow.link_flows.get(key, 0.0)
                cap = self.current_flow.link_capacity.get(key, 0.0)
                if f > 0 and cap > 0:
                    scale = self.replanner.link_scale.get(key, 1.0) * cfg.link_degrade_factor * f / cap
                    self.replanner.link_scale[key] = max(scale, 1e-9)
                    replan = f"link {src}->{dst} is slow or lossy (round trip {rtt:.3f} s, {new_retries} resent)"
        elif h.degraded and now - h.bad_at > cfg.link_recover_s:
            h = h._replace(degraded=False)
            if self.replanner.link_scale.pop(key, None) is not None and self.host is not None:
                replan = f"link {src}->{dst} is healthy again"
        self.link_health[key] = h
        if replan:
            self._replan(replan)

    async def _recovery_watch(self) -> None:
        """Fail requests that found no live route within ``recovery_timeout`` of their migration;
        watch the host's own links."""
        while not self._closing:
            await self.clock.sleep(min(1.0, self.settings.recovery_timeout / 4))
            host = self.host
            if host is None:
                continue
            for peer, h in self.tp.link_health().items():
                if isinstance(peer, int) and peer in self.nodes and not self.nodes[peer].lost and h.rtt > 0:
                    self._observe_link(SOURCE, peer, h.retries, h.rtt)
            now = self.clock.now()
            timeout = self.settings.recovery_timeout
            for q in host.migrating_queries():
                if q.moved_at >= 0 and now - q.moved_at > timeout:
                    self.counters.failed_on_lost_worker += 1
                    reason = host.admission_stopped or "no live route could take it"
                    host.fail(q.qid, f"its worker was lost and {reason} (waited {timeout:g} s)")

    def snapshot(self) -> HostSnapshot:
        """The counters and gauges the front door's ``/metrics`` shows, now (see
        :class:`~helix_async.frontend.host_protocol.HostSnapshot`)."""
        now = self.clock.now()
        host = self.host
        tp = self.tp
        nodes = []
        for node, st in sorted(self.nodes.items()):
            up = bool(st.address) and not st.lost
            ns = st.stats
            if ns is None:
                nodes.append(NodeReport(node, up))
                continue
            nodes.append(NodeReport(
                node, up, report_age=max(0.0, now - st.stats_at),
                kv_use=ns.kv_used / ns.kv_capacity if ns.kv_capacity > 0 else 0.0, queued=int(ns.queued),
                dropped=int(ns.bad_frames), batches=int(ns.batches), busy_s=float(ns.busy_s),
                bytes_out={_label(SOURCE if peer < 0 else peer): int(n) for peer, n in zip(ns.peers, ns.bytes_out, strict=True)},
            ))
        links = [LinkReport(_label(a), _label(b), h.rtt, h.retries, h.degraded) for (a, b), h in self.link_health.items()]
        plan_flows: dict[tuple[str, str], float] = {}
        for (u, v), f in self.flow.link_flows.items():
            key = (_label(u), _label(v))
            plan_flows[key] = plan_flows.get(key, 0.0) + float(f)
        c = self.counters
        return HostSnapshot(
            waiting=host.waiting if host is not None else 0,
            active=host.active if host is not None else 0,
            dropped=tp.stats.bad_frames + tp.drops.total + c.bad_messages + (host.stats.bad_messages if host else 0),
            bytes_out={_label(peer): n for peer, n in tp.bytes_sent().items() if isinstance(peer, int)},
            nodes=tuple(nodes),
            links=tuple(links),
            plan_flows=plan_flows,
            admission_stopped=bool(self.admission_stopped),
            workers_lost=c.workers_lost,
            workers_rejoined=c.rejoined,
            workers_drained=c.drained,
            requests_migrated=c.migrated,
            requests_unrecovered=c.failed_on_lost_worker,
        )

    @property
    def admission_stopped(self) -> str:
        """Why new requests are not admitted now ("" while they are)."""
        return "" if self.host is None else self.host.admission_stopped

    def _fail(self, qid: int, reason: str) -> None:
        if self.host is not None:
            self.host.fail(qid, reason)

    # ---- requests -------------------------------------------------------------------------------

    def _on_token(self, q: Query, token: int | SampledToken, last: bool) -> None:
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
        sampling: SamplingParams | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        qid: int | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[int | SampledToken, None]:
        """Serve one request: yields its ``max_tokens`` tokens as they come, chosen by ``sampling``
        (default greedy): token ids, or :class:`SampledToken` s with their log-probabilities when
        ``sampling.logprobs`` is set.  ``temperature``, ``top_p``, ``seed``: those three alone, in
        place of ``sampling`` (not with it).  Raises :class:`RequestFailed` when the cluster cannot
        serve it, ValueError for a request it would never take."""
        if self.host is None or self._closing:
            raise RequestFailed("the host is not serving" + (" (shutting down)" if self._closing else " yet"), "unavailable")
        if not prompt:
            raise ValueError("empty prompt")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        sampling = _sampling_of(sampling, temperature, top_p, seed)
        vocab = self.model.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in sampling.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        q_id = next(self._qids) if qid is None else qid
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[q_id] = stream
        if self.runlog is not None:
            self.runlog.submitted(q_id, len(prompt), max_tokens, self.clock.now())
        try:
            if self.host.submit(q_id, len(prompt), max_tokens, tuple(int(t) for t in prompt), sampling,
                                priority=priority) is None:
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

    async def complete(self, prompt: Sequence[int], max_tokens: int, **sampling: Any) -> list[Any]:
        """All the tokens of one request (see :meth:`generate`)."""
        return [t async for t in self.generate(prompt, max_tokens, **sampling)]


def _sampling_of(sampling: SamplingParams | None, temperature: float | None, top_p: float | None,
                 seed: int | None) -> SamplingParams:
    """A request's sampling from :meth:`HostServer.generate`'s arguments (ValueError when bad)."""
    if sampling is None:
        sampling = SamplingParams(
            temperature=0.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            seed=0 if seed is None else int(seed),
        )
    elif temperature is not None or top_p is not None or seed is not None:
        raise ValueError("give sampling, or temperature / top_p / seed, not both")
    if sampling.seed > _SEED_MAX:
        raise ValueError(f"seed must be <= {_SEED_MAX}, got {sampling.seed}")
    return sampling
