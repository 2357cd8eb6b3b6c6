"""The simulator's two fast paths change how fast, never what.

* Runs of layers: a worker on the cost model runs a batch through its consecutive layers in one
  executor call (``fuse=True``, the default), shortened when a request arrives at one of those
  layers.  Checked against ``fuse=False`` (one call per layer, the plain reading of docs/original.md
  §8.5) on a seeded closed-loop workload with mid-node entries, stages ending mid-node, batch
  limits that skip, KV waits and preemption (default) or overflows (compat), and cancels: the same
  messages at the same float times and the same counters.
* Compiled builds: ``helix_async._ext._worker`` and ``._memory`` are helix_async/worker.py and
  helix_async/transport/memory.py compiled as they are, and ``._vloop`` is the compiled twin of the
  loop's bare-callback path; whole simulations with the compiled and the pure-Python code give
  byte-identical reports.
"""

from __future__ import annotations

import random
from dataclasses import fields
from typing import Any

import pytest

import helix_async.vloop as vloop
import sim.simulation as simulation
from helix_async.clock import LoopClock
from helix_async.executors.cost_model import CostModelExecutor
from helix_async.ids import SINK, SOURCE, NodeRef, Route
from helix_async.interp import BatchTimer
from helix_async.messages import Cancel, DecodeWork, PromptWork, TokenResult
from helix_async.model import GpuProfile
from helix_async.placement.io import load_shipped_layout
from helix_async.settings import WorkerSettings
from helix_async.transport.memory import MemoryNetwork, MemoryNetworkPy
from helix_async.vloop import VirtualTimeLoop
from helix_async.worker import BatchLimits, Worker, WorkerPy
from sim.report import report_json
from sim.runner import Workload, run
from sim.simulation import SimulationSetup

# One layer: prompt(P) = P / 2048 s, decode(D) = D / 8 s (exact binary fractions); arrival times
# below are drawn off that grid, so no arrival coincides with a layer boundary.
PX, PS, DX, DS = (0.0, 8192.0), (0.0, 4.0), (0.0, 2.0, 8.0), (0.0, 0.25, 1.0)
LIMITS = BatchLimits(prompt_requests=3, prompt_tokens=600, decode_seqs=5, decode_context=4000)

FULL: Route = ((0, 0, 8),)  # the whole 8-layer model here
LATE: Route = ((7, 0, 4), (0, 4, 8))  # enters this node at layer 4, mid-run of its batches
EARLY: Route = ((0, 0, 5), (1, 5, 8))  # leaves this node after layer 5 of its 8


class LoopBack:
    """The worker's transport and the rest of the cluster: what leaves the node comes back as the
    request's next decode after a seeded delay, until its tokens are done; records every send."""

    def __init__(self, loop: VirtualTimeLoop, clock: LoopClock, rng: random.Random) -> None:
        self.loop, self.clock, self.rng = loop, clock, rng
        self.sent: list[tuple[float, NodeRef, str, int, int]] = []
        self.handler: Any = None
        self.left: dict[int, int] = {}  # decodes still to come per request

    def set_handler(self, handler: Any) -> None:
        self.handler = handler

    def set_idle_handler(self, handler: Any) -> None:
        raise AssertionError("not a free-link policy")

    def link_idle(self, dest: NodeRef) -> bool:
        return True

    async def close(self) -> None:
        pass

    def send(self, dest: NodeRef, msg: Any) -> None:
        ctx = msg.context_len if isinstance(msg, (DecodeWork, TokenResult)) else msg.num_tokens
        self.sent.append((self.clock.now(), dest, type(msg).__name__, msg.request_id, ctx))
        rid = msg.request_id
        if self.left.get(rid, 0) <= 0:
            return
        self.left[rid] -= 1
        route = msg.route[: len(msg.route)] if dest == SINK else msg.route
        stage = 0 if route[0][0] == 0 else 1
        nxt = DecodeWork(
            request_id=rid,
            route=route,
            stage=stage,
            context_len=ctx + 1,
            token_id=-1,
            sent_at=0.0,
            payload_bytes=4,
        )
        self.loop.call_at(self.clock.now() + self.rng.uniform(0.01, 0.9), self.handler, SOURCE, nxt)


def drive(cls: type, *, fuse: bool, compat: bool, seed: int) -> tuple[list[Any], dict[str, Any], int, int]:
    loop = VirtualTimeLoop()
    try:
        clock = LoopClock(loop)
        rng = random.Random(seed)
        tp = LoopBack(loop, clock, rng)
        ex = CostModelExecutor(
            clock, GpuProfile("X", PX, PS, DX, DS, BatchTimer(PX, PS, DX, DS)), activation_bytes=64
        )
        w = cls(
            0,
            clock,
            tp,
            ex,
            WorkerSettings(
                layers=(0, 8), num_layers=8, limits=LIMITS, kv_capacity=9_000, activation_bytes=64, compat=compat, fuse=fuse
            ),
        )
        w.start()
        t = 0.0
        for rid in range(60):
            t += rng.expovariate(4.0)
            route = rng.choice((FULL, FULL, LATE, EARLY))
            n = rng.randint(5, 400)
            m = rng.randint(1, 12)
            tp.left[rid] = m - 1
            stage = 1 if route is LATE else 0
            msg = PromptWork(request_id=rid, query_id=rid, route=route, stage=stage, num_tokens=n,
                             token_ids=(), max_tokens=m, sent_at=t, payload_bytes=4 * n)
            loop.call_at(t, w.on_message, SOURCE, msg)
            if rid % 9 == 4:  # a cancel some time later, maybe while it runs
                loop.call_at(t + rng.uniform(0.0, 3.0), w.on_message, SOURCE, Cancel(request_id=rid))
        loop.run_until(400.0)
        st = {f.name: getattr(w.stats, f.name) for f in fields(w.stats)}
        return tp.sent, st, w.kv_used, loop.callbacks_run
    finally:
        loop.close()


TWINS = [WorkerPy] if Worker is WorkerPy else [WorkerPy, Worker]


@pytest.mark.parametrize("cls", TWINS, ids=lambda c: c.__module__)
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runs_of_layers_are_the_layer_by_layer_schedule(cls: type, compat: bool, seed: int) -> None:
    sent_f, st_f, kv_f, ev_f = drive(cls, fuse=True, compat=compat, seed=seed)
    sent_u, st_u, kv_u, ev_u = drive(cls, fuse=False, compat=compat, seed=seed)
    assert len(sent_u) > 300  # the workload ran: prompts, decodes, forwards to node 1, tokens
    assert {d for _, d, *_ in sent_u} == {SINK, 1}
    assert sent_f == sent_u  # same messages, same float times
    busy_f, busy_u = st_f.pop("busy_time"), st_u.pop("busy_time")
    assert busy_f == pytest.approx(busy_u, rel=1e-12)  # summed per run instead of per layer
    for k in ("prompt_residence", "decode_residence"):
        assert st_f.pop(k) == pytest.approx(st_u.pop(k), rel=1e-12)
    assert st_f == st_u
    assert kv_f == kv_u
    if compat:
        assert st_u["kv_overflows"] > 0
    else:
        assert st_u["kv_waits"] > 0 and (seed != 0 or st_u["kv_preemptions"] > 0)
    assert ev_f < 0.75 * ev_u  # and it is the point: fewer events (this workload shortens runs often)


@pytest.mark.skipif(Worker is WorkerPy, reason="compiled build not present (HELIX_NO_EXTENSIONS)")
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_compiled_worker_agrees_with_the_pure_one(compat: bool) -> None:
    for seed in (3, 4):
        a = drive(WorkerPy, fuse=True, compat=compat, seed=seed)
        b = drive(Worker, fuse=True, compat=compat, seed=seed)
        assert a[0] == b[0] and a[1] == b[1] and a[2:] == b[2:]


@pytest.fixture(scope="module")
def ilp():
    return load_shipped_layout("ilp")


def _report(monkeypatch: pytest.MonkeyPatch, pure: bool, setup: SimulationSetup, wl: Workload) -> str:
    with monkeypatch.context() as m:
        if pure:
            m.setattr(simulation, "Worker", WorkerPy)
            m.setattr(simulation, "MemoryNetwork", MemoryNetworkPy)
            m.setattr(vloop, "_Plain", vloop._PlainPy)
            m.setattr(vloop, "_run_plain", None)
            m.setattr(vloop, "_call_at_plain", None)
        return report_json(run(setup, wl).report)


@pytest.mark.skipif(
    Worker is WorkerPy or MemoryNetwork is MemoryNetworkPy or vloop._Plain is vloop._PlainPy,
    reason="compiled build not present (HELIX_NO_EXTENSIONS)",
)
@pytest.mark.parametrize(
    ("scheduler", "compat", "mode"),
    [
        ("maxflow", True, "offline"),
        ("maxflow", False, "online"),
        ("swarm", True, "offline"),
        ("random", False, "offline"),
        ("shortest-queue", True, "offline"),
    ],
)
def test_compiled_simulation_reports_equal_the_pure_ones(monkeypatch, ilp, scheduler, compat, mode) -> None:
    setup = SimulationSetup(
        ilp, scheduler=scheduler, compat=compat, drop_rejected=compat and scheduler == "maxflow"
    )
    if mode == "online":
        wl = Workload(mode="online", rate=600.0, duration=30, warmup=0.0, seed=0)
    else:
        wl = Workload(
            mode="offline", initial=40 if scheduler == "maxflow" else 120, warmup=5, duration=25, seed=0
        )
    compiled = _report(monkeypatch, False, setup, wl)
    pure = _report(monkeypatch, True, setup, wl)
    assert compiled == pure


@pytest.mark.parametrize("cls", TWINS, ids=lambda c: c.__module__)
def test_compat_kv_checks_before_a_fall_during_a_run(cls: type) -> None:
    # A finished request's KV is freed (by a cancel) while a 100-token prompt runs through the
    # node's two layers: layer by layer, the first layer's check saw the use above capacity
    # before the fall; the run of layers must count that overflow and that peak too.
    out = {}
    for fuse in (True, False):
        loop = VirtualTimeLoop()
        try:
            clock = LoopClock(loop)
            tp = LoopBack(loop, clock, random.Random(0))
            profile = GpuProfile("X", PX, PS, DX, DS, BatchTimer(PX, PS, DX, DS))
            ex = CostModelExecutor(clock, profile, activation_bytes=64)
            w = cls(0, clock, tp, ex, WorkerSettings(layers=(0, 2), num_layers=2, limits=LIMITS, kv_capacity=2050,
                                                     activation_bytes=64, compat=True, fuse=fuse))
            w.start()
            big = PromptWork(request_id=1, query_id=1, route=((0, 0, 2),), stage=0, num_tokens=1000,
                             token_ids=(), max_tokens=5, sent_at=0.0, payload_bytes=0)
            small = PromptWork(request_id=2, query_id=2, route=((0, 0, 2),), stage=0, num_tokens=100,
                               token_ids=(), max_tokens=5, sent_at=2.0, payload_bytes=0)
            loop.call_at(0.0, w.on_message, SOURCE, big)
            loop.call_at(2.0, w.on_message, SOURCE, small)
            loop.call_at(2.07, w.on_message, SOURCE, Cancel(request_id=1))  # between the layers
            loop.run_until(10.0)
            out[fuse] = (w.stats.kv_peak, w.stats.kv_overflows, w.kv_used, tp.sent)
        finally:
            loop.close()
    assert out[False][:3] == (2100, 1, 200)  # 2000 held by request 1, then 100 per layer of request 2
    assert out[True] == out[False]
