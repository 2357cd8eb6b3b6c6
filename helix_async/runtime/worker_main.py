"""``python -m helix_async worker``: one compute node of a real cluster.

The process binds its inbox on an ephemeral port, connects to the host and registers (its node id
if given, its machine type, its inbox address, its executor).  The host answers with
``AssignLayers`` once every node of the plan has registered: the layer range, the plan's model and
the addresses of the next hops.  The worker then builds its executor by name from
:mod:`helix_async.executors.registry` (``torch``: the model's layers from a Hugging Face
checkpoint or seeded dummy weights; ``cost-model``: the simulator's executor on the real clock,
slowed by ``time_scale``; ``null``: no cost, to measure the runtime's own overhead), connects to
its next hops, declares itself ready, and runs the very :class:`~helix_async.worker.Worker` the
simulator runs until the host says ``Shutdown`` or the process gets SIGINT/SIGTERM.

Start order does not matter: the transport keeps (and retries) the registration until the host is
there.  A refusal by the host, a model that does not load or does not fit: one line, exit 2; the
host is told why first (``Error`` with ``OUT_OF_MEMORY`` when the layers do not fit the device,
``LOAD_FAILED`` for any other load failure).

Who may say what (docs/security.md).  Control messages (``AssignLayers``, ``Error``, ``Shutdown``,
``Cancel``) are taken only from the host; work (``PromptWork``, ``DecodeWork``) only from the node
before this one on its route, which must be one of the assignment's ``prev_nodes`` (or the host,
for a first stage's stage 0); ``Feedback`` only from a next hop.  With CURVE the sender is the
node its key is bound to (the transport's), without it the identity it chose.  Anything else is
dropped and counted per (kind, sender) (:attr:`WorkerServer.dropped`, in the ``NodeStats``
drop count), logged rate-limited per cause.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import Mapping
from typing import Any

from ..aio import run
from ..clock import MonotonicClock
from ..errors import ConfigError, HelixError
from ..executors.registry import ExecutorContext, ExecutorLoadError, executor_entry
from ..ids import SINK, SOURCE, NodeRef
from ..logs import RateLimitedLog
from ..messages import (
    AssignLayers,
    Cancel,
    DecodeWork,
    Error,
    ErrorCode,
    Feedback,
    MigrateAbort,
    MigrateFinish,
    MigrateKV,
    MigrateReserve,
    MigrateStart,
    MigrateStatus,
    NodeStats,
    PromptWork,
    Register,
    Shutdown,
)
from ..model import get_model, load_profiles
from ..roles import node_limits
from ..settings import WorkerOptions, WorkerSettings
from ..transport.base import TransportError
from ..transport.zmq import ZmqTransport
from ..worker import Worker

__all__ = ["WorkerExit", "WorkerOptions", "WorkerServer", "run_worker"]

log = logging.getLogger("helix_async.worker")

#: the kinds the worker itself handles (once the sender passed ``WorkerServer._allowed``)
_TO_WORKER = frozenset({PromptWork, DecodeWork, Cancel, Feedback, MigrateReserve, MigrateStart, MigrateKV, MigrateStatus,
                        MigrateFinish, MigrateAbort})


class WorkerExit(HelixError, RuntimeError):
    """The worker cannot serve (refused by the host, a model that does not load): exit 2."""


class WorkerServer:
    """One worker process's life (see the module doc)."""

    def __init__(self, opts: WorkerOptions, *, links: Mapping[NodeRef, tuple[float, float]] | None = None) -> None:
        """links: emulate these out-links (``{dest: (bandwidth, latency)}``, scaled by the time
        scale) under the cost model; default: those of ``opts.plan``'s cluster when it is given."""
        opts.check()
        self.opts = opts
        self.entry = executor_entry(opts.executor)
        self.links = links
        self.clock = MonotonicClock()
        self.name = f"w-{uuid.uuid4().hex[:12]}"
        from ..transport.curve import security

        key_name = opts.key_name or (f"worker-{opts.node_id}" if opts.node_id >= 0 else "")
        if opts.keys and not key_name:
            raise ConfigError("<argument>", "--key-name", "with --keys and no --node-id, name the worker's key pair")
        curve = security(opts.keys or None, key_name, [("--bind", opts.bind), ("--connect", opts.connect)]
                         + ([("--advertise", opts.advertise)] if opts.advertise else []), opts.insecure)
        self.tp = ZmqTransport(opts.node_id if opts.node_id >= 0 else self.name, self.clock, name=self.name, bind=opts.bind,
                               curve=curve)
        self.worker: Worker | None = None
        self.executor: Any = None
        self.node_id = opts.node_id
        self._assigned: asyncio.Future[AssignLayers] | None = None
        # the same layers assigned again while they load (a neighbour taken meanwhile): its hops win
        self._reassigned: AssignLayers | None = None
        self._stop: asyncio.Event | None = None
        self.exit_reason = ""
        self.bad_messages = 0
        #: (message kind, sender) -> messages dropped because that sender may not send them here
        self.dropped: dict[tuple[str, NodeRef], int] = {}
        self._prev: frozenset[NodeRef] = frozenset()  # who may send work here (the assignment's)
        self._next: frozenset[NodeRef] = frozenset()  # who may send feedback here
        self._rlog = RateLimitedLog(log, self.clock.now)
        self.stats_every_s = 1.0
        self.drain_timeout_s = 30.0
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []

    # ---- life -----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._assigned = loop.create_future()
        self._stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        if self.entry.extra is not None:
            # import the executor's dependency (torch) before registering: slow the first time, and
            # a missing extra is a one-line error before anything has started
            from ..extras import require

            require(*self.entry.extra)
        try:
            await self.tp.start()
            self.tp.set_handler(self._on_control)
            self.tp.connect(SOURCE, self.opts.connect)
            self.tp.on_peer_lost = self._peer_lost
            self._register(ready=False)
            log.info("worker %s registering with %s (inbox %s)", self.name, self.opts.connect, self.tp.address)
            stop_wait = loop.create_task(self._stop.wait())
            waits: set[asyncio.Future[Any]] = {self._assigned, stop_wait}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if self._assigned.done():
                await self._start_serving(self._assigned.result())
                await self._stop.wait()
            stop_wait.cancel()
            return 0
        finally:
            await self._close()

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        assert self._stop is not None
        if self.worker is not None and not self._draining and self.tp.alive(SOURCE) and self.drain_timeout_s > 0:
            # drain: the host moves this worker's requests elsewhere, then says stop (a second
            # signal, or no answer within the drain timeout, stops at once)
            self._draining = True
            log.info("worker %s: signal %s, draining", self.name, name)
            self.exit_reason = f"signal {name} (drained)"
            self._register(ready=False, draining=True)
            self._tasks.append(asyncio.get_running_loop().create_task(self._drain_deadline()))
            return
        log.info("worker %s: signal %s, stopping", self.name, name)
        self.exit_reason = f"signal {name}"
        self._stop.set()

    async def _drain_deadline(self) -> None:
        await self.clock.sleep(self.drain_timeout_s)
        if self._stop is not None and not self._stop.is_set():
            log.warning("worker %s: no word from the host after %g s of draining; stopping", self.name, self.drain_timeout_s)
            self._stop.set()

    async def _close(self) -> None:
        # let the last messages (tokens, the shutdown echo) be acknowledged, briefly
        for _ in range(50):
            if all(self.tp.link_idle(p) for p in self.tp.peers()):
                break
            await asyncio.sleep(0.01)
        if self.worker is not None:
            self.worker.stopped = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.tp.close()
        if self.executor is not None and hasattr(self.executor, "close"):
            self.executor.close()

    def _register(self, ready: bool, draining: bool = False) -> None:
        caps = (self.opts.executor, self.opts.device) + (("ready",) if ready else ()) + (("draining",) if draining else ())
        self.tp.send(
            SINK,
            Register(
                node_id=self.node_id,
                name=self.name,
                machine_type=self.opts.gpu,
                address=self._advertised(),
                num_gpus=1,
                gpu_memory_bytes=max(0, self.opts.memory_bytes),
                capabilities=caps,
            ),
        )

    def _advertised(self) -> str:
        """The address peers dial: --advertise (with this worker's key when CURVE is on) or the bound one."""
        if not self.opts.advertise:
            return self.tp.address
        curve = self.tp.curve
        return curve.address(self.opts.advertise) if curve is not None else self.opts.advertise

    def _peer_lost(self, peer: NodeRef) -> None:
        log.warning("worker %s: peer %r stopped answering", self.name, peer)

    # ---- messages -------------------------------------------------------------------------------

    def _drop(self, kind: type, sender: NodeRef, why: str) -> None:
        """A message ``sender`` may not send here: dropped, counted per (kind, sender), logged rate-limited."""
        self.bad_messages += 1
        key = (kind.__name__, sender)
        self.dropped[key] = self.dropped.get(key, 0) + 1
        self._rlog.warning(f"dropped {kind.__name__}: {why}", "worker %s: dropped %s from %r: %s", self.name, kind.__name__,
                           sender, why)

    def _allowed(self, sender: NodeRef, msg: Any) -> str:
        """Why ``sender`` may not send ``msg`` here ("" when it may)."""
        t = type(msg)
        if t is PromptWork or t is DecodeWork:
            stage = msg.stage
            expected = SOURCE if stage == 0 else msg.route[stage - 1][0]
            if sender != expected or sender not in self._prev:
                return "work not from the node before this one on its route"
            return ""
        if t is Feedback:
            return "" if sender in self._next else "feedback not from a next hop"
        if t is MigrateKV or t is MigrateStatus:
            # between the two nodes of a migration (the worker checks it is the pair the host named)
            return "" if isinstance(sender, int) else "a migration's chunk or answer not from a worker"
        return "" if sender == SOURCE else "a control message not from the host"

    def _on_control(self, sender: NodeRef, msg: Any) -> None:
        t = type(msg)
        why = self._allowed(sender, msg)
        if why:
            self._drop(t, sender, why)
            return
        if t in _TO_WORKER:
            if self.worker is not None:
                self.worker.on_message(sender, msg)
            else:
                self.bad_messages += 1
            return
        if t is AssignLayers:
            assert self._assigned is not None
            if self._assigned.done():
                first = self._assigned.result() if self._assigned.exception() is None else None
                same = first is not None and msg.node_id == first.node_id and (msg.start, msg.end) == (first.start, first.end)
                if same and self.worker is not None:
                    # a neighbour was replaced: reach it at its new address (what was queued for
                    # the old one is dropped with its outbox)
                    for node, address, _s, _e in msg.next_hops:
                        try:
                            self.tp.connect(node, address)
                        except TransportError as e:
                            self._rlog.warning("undialable hop", "worker %s: next hop %s: %s", self.name, node, e)
                            self.bad_messages += 1
                    self._next = frozenset(n for n, _, _, _ in msg.next_hops)
                    log.info("worker %s: next hops now %s", self.name, [(n, a) for n, a, _, _ in msg.next_hops])
                elif same:
                    self._reassigned = msg  # still loading: serving starts with these hops
                else:
                    log.warning("worker %s: an assignment of other layers is ignored", self.name)
                    self.bad_messages += 1
                return
            self._assigned.set_result(msg)
            return
        if t is Error:
            self.exit_reason = f"refused by the host: {msg.text}"
            if self._assigned is not None and not self._assigned.done():
                self._assigned.set_exception(WorkerExit(self.exit_reason))
            return
        if t is Shutdown:
            log.info("worker %s: host says shut down (%s)", self.name, msg.reason)
            self.exit_reason = f"shutdown: {msg.reason}"
            assert self._stop is not None
            self._stop.set()
            return
        self.bad_messages += 1

    # ---- serving --------------------------------------------------------------------------------

    async def _start_serving(self, a: AssignLayers) -> None:
        opts = self.opts
        spec = get_model(a.model)
        k = a.end - a.start
        self.node_id = a.node_id
        self.tp.rename(a.node_id, str(a.node_id))
        profiles = load_profiles(spec)
        limits, kv_cap = node_limits(profiles, opts.gpu, k)
        if kv_cap < 0:  # more layers than the settings list: the largest listed count's capacity
            ns = profiles.node_settings(opts.gpu)
            kv_cap = ns.kv(ns.max_layers)
        entry = self.entry
        ctx = ExecutorContext(self.clock, spec, (a.start, a.end), opts.values(),
                              profiles.profile(opts.gpu) if entry.needs_profile else None)
        try:
            if entry.blocking:
                # loading may take a while: off the loop, which keeps answering heartbeats meanwhile
                self.executor = await asyncio.get_running_loop().run_in_executor(None, entry.build, ctx)
            else:
                self.executor = entry.build(ctx)
        except ExecutorLoadError as e:
            code, what = (ErrorCode.OUT_OF_MEMORY, "out of memory") if e.out_of_memory else (ErrorCode.LOAD_FAILED,
                                                                                              "model load failed")
            self.tp.send(SINK, Error(request_id=-1, code=int(code), text=f"node {a.node_id}: {what}: {e}"))
            raise WorkerExit(str(e)) from None
        if self._reassigned is not None:
            a = self._reassigned
        out: list[NodeRef] = [SINK] if a.end == spec.num_layers else []
        self._prev = frozenset(a.prev_nodes) | ({SOURCE} if a.start == 0 else frozenset())
        self._next = frozenset(n for n, _, _, _ in a.next_hops)
        for node, address, _s, _e in a.next_hops:
            try:
                self.tp.connect(node, address)
            except TransportError as e:  # the host named a hop this worker cannot dial
                self.tp.send(SINK, Error(request_id=-1, code=int(ErrorCode.INTERNAL),
                                         text=f"node {a.node_id}: next hop {node}: {e}"))
                raise WorkerExit(f"next hop {node}: {e}") from None
            out.append(node)
        transport: Any = self.tp
        if entry.emulates and (self.links is not None or opts.plan):
            from ..transport.emulated import EmulatedLinks, links_from

            links = self.links
            if links is None:
                from ..placement.io import read_placement

                links = links_from(read_placement(opts.plan).cluster, a.node_id)
            transport = EmulatedLinks(self.tp, self.clock, links, opts.time_scale)
        settings = WorkerSettings(
            layers=(a.start, a.end),
            num_layers=spec.num_layers,
            limits=limits,
            kv_capacity=kv_cap,
            activation_bytes=spec.activation_size,
            token_bytes=spec.token_size,
            out_links=tuple(out),
            next_layers={n: (s, e) for n, _, s, e in a.next_hops if n >= 0},
            gather=opts.gather,
            kv_token_bytes=spec.kv_bytes_per_token_per_layer,
        )
        w = Worker(a.node_id, self.clock, transport, self.executor, settings)
        self.worker = w
        # the worker's handler is our dispatcher (control messages too): not w.start()
        self._register(ready=True)
        self._tasks.append(asyncio.get_running_loop().create_task(self._report_stats(), name="node-stats"))
        log.info("worker %s is node %d: layers [%d, %d) of %s, %s executor, ready", self.name, a.node_id, a.start,
                 a.end, spec.name, opts.executor)
        if self.tp.curve is None:
            from ..transport.curve import warn_plaintext

            warn_plaintext(f"worker {a.node_id}")

    async def _report_stats(self) -> None:
        """A ``NodeStats`` to the host every ``stats_every_s`` (its metrics: KV, queue, link bytes)."""
        while not self.tp.closed:
            await self.clock.sleep(self.stats_every_s)
            w = self.worker
            if w is None or self.tp.closed:
                return
            used, cap = w.kv_snapshot()
            health = self.tp.link_health()
            peers: list[int] = []
            counts: list[int] = []
            retried: list[int] = []
            rtt_us: list[int] = []
            for p, h in health.items():
                if isinstance(p, int) or p in (SINK, SOURCE):
                    peers.append(p if isinstance(p, int) else -1)
                    counts.append(h.bytes_sent)
                    retried.append(h.retries)
                    rtt_us.append(round(h.rtt * 1e6))
            ts = self.tp.stats
            bad = (ts.bad_frames + self.tp.drops.total + ts.out_of_order + ts.duplicates + ts.handler_errors
                   + self.bad_messages + w.stats.bad_messages)
            self.tp.send(SINK, NodeStats(node_id=self.node_id, now=self.clock.now(), kv_used=max(0, int(used)),
                                         kv_capacity=max(0, int(cap)), queued=w.queued, peers=tuple(peers), bytes_out=tuple(counts),
                                         bad_frames=bad, retried=tuple(retried), rtt_us=tuple(rtt_us),
                                         batches=w.stats.batches, busy_s=max(0.0, w.stats.busy_time)))


def run_worker(opts: WorkerOptions) -> int:
    """Run a worker process to its end; returns the exit status."""
    return run(WorkerServer(opts).run())

