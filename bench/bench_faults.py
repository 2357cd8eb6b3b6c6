"""A lost GPU, simulated and served: single24 (shipped ILP plan, LLaMA-2-70B) with one A100 killed.

Run: ``python bench/bench_faults.py [--quick] [--node 9] [--kill-at 120] [--window 60]``.

The workload: an online trace (azure-conv arrivals and lengths at ``--rate`` tokens/s, seed 0),
the same for both sides, as ``bench_drift.py`` uses.  Node 9 (an A100 holding layers [37, 49), every one of which some other node also holds)
dies ``--kill-at`` s after the start and stays dead.  Decode tokens/s and the median per-token
latency are measured in the ``--window`` s before the kill, after it, and in the window after that;
plus the queries that migrated and the time from the kill to their first token on a new route.

1. The simulator (default mode): ``--faults node=9@t=120s``; the host learns of the loss 1.5 s
   later (the runtime transport's silence limit).
2. The runtime's cost-model emulation on loopback: the host and 24 cost-model workers as tasks of
   this process (K = 1), each with its own ZeroMQ sockets; at the same time the worker of node 9
   crashes (its worker stops and its sockets close), and the host finds out from its heartbeats.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_async.placement.io import load_shipped_layout  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.runtime.worker_main import WorkerOptions, WorkerServer  # noqa: E402
from helix_async.settings import KV_ONLINE, HostSettings  # noqa: E402
from helix_async.transport.emulated import links_from  # noqa: E402
from helix_async.workloads import TraceEntry, generate_online_trace  # noqa: E402
from sim.faults import Fault  # noqa: E402
from sim.runner import Workload, run  # noqa: E402
from sim.simulation import SimulationSetup, load_start_time  # noqa: E402


def windows(host: Any, kill: float, window: float, start: float) -> dict[str, dict[str, float]]:
    done = list(host.decode_done)
    lat = list(host.decode_latency)
    out = {}
    for name, (a, b) in {"before": (max(start, kill - window), kill), "after the kill": (kill, kill + window),
                         "later": (kill + window, kill + 2 * window)}.items():
        sel = [x for t, x in zip(done, lat, strict=True) if a <= t < b]
        out[name] = {"tok/s": len(sel) / (b - a), "p50 s": statistics.median(sel) if sel else float("nan")}
    return out


def resumed(host: Any, kill: float) -> dict[str, float]:
    times = sorted(t - kill for _, at, t in host.resumed if at >= kill)
    return {"migrated": float(host.stats.migrated), "resumed": float(len(times)), "first s": times[0] if times else float("nan"),
            "median s": times[len(times) // 2] if times else float("nan")}


def simulate(node: int, kill_at: float, window: float, trace: list[Any]) -> tuple[dict[str, Any], dict[str, float]]:
    placement = load_shipped_layout("ilp")
    t0 = load_start_time(placement)
    shifted = [TraceEntry(t + t0, n, m) for t, n, m in trace]
    res = run(SimulationSetup(placement, kv=KV_ONLINE), Workload(mode="trace", trace=shifted, warmup=0.0, duration=1e9),
              faults=[Fault(node, kill_at)])
    return windows(res.sim.host, t0 + kill_at, window, t0), resumed(res.sim.host, t0 + kill_at)


async def emulate(node: int, kill_at: float, window: float, trace: list[Any]) -> tuple[dict[str, Any], dict[str, float]]:
    placement = load_shipped_layout("ilp")
    server = HostServer(placement, settings=HostSettings(emulate_time_scale=1.0))
    address = await server.start()
    workers = {i: WorkerServer(WorkerOptions(connect=address, node_id=i, executor="cost-model",
                                             machine_type=placement.cluster.machine(i).gpu),
                               links=links_from(placement.cluster, i)) for i in placement.used_nodes()}
    tasks = {i: asyncio.create_task(w.run()) for i, w in workers.items()}
    await server.wait_ready(120)
    clock = server.clock
    t0 = clock.now()
    kill_time = 0.0

    async def crash() -> None:
        nonlocal kill_time
        await clock.sleep_until(t0 + kill_at)
        w = workers[node]
        kill_time = clock.now()
        assert w.worker is not None
        w.worker.kill()
        tasks[node].cancel()
        await w.tp.close()

    host = server.host
    assert host is not None

    async def submit_all() -> None:
        for qid, (t, n, m) in enumerate(trace):
            await clock.sleep_until(t0 + t)
            host.submit(qid, n, m)  # no token ids: modelled payloads, as in the simulator

    feeder = asyncio.create_task(submit_all())
    await crash()
    await clock.sleep_until(t0 + kill_at + 2 * window)
    feeder.cancel()
    out = windows(host, kill_time, window, t0), resumed(host, kill_time)
    await server.shutdown("bench done", grace=0.0)
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="kill at 40 s, 20-s windows")
    ap.add_argument("--node", type=int, default=9)
    ap.add_argument("--kill-at", type=float, default=120.0)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=700.0, help="tokens/s of the trace")
    args = ap.parse_args()
    kill_at, window = (30.0, 15.0) if args.quick else (args.kill_at, args.window)
    span = int(kill_at + 2 * window) // 3 * 3
    trace = [TraceEntry(t, n, m) for t, n, m in generate_online_trace("azure-conv", "azure-conv", args.rate, start=0.0,
                                                                   duration=span, seed=0)]
    sim_w, sim_r = simulate(args.node, kill_at, window, trace)
    import uvloop

    t = time.perf_counter()
    emu_w, emu_r = uvloop.run(emulate(args.node, kill_at, window, trace))
    wall = time.perf_counter() - t
    print(f"single24 ILP, LLaMA-2-70B, {len(trace)} queries ({args.rate:g} tok/s); node {args.node} (A100) killed at {kill_at:g} s; "
          f"windows of {window:g} s (emulation: {wall:.0f} s wall)")
    print(f"  {'window':16s} {'sim tok/s':>10s} {'emu tok/s':>10s} {'sim p50 s':>10s} {'emu p50 s':>10s}")
    for k in sim_w:
        print(f"  {k:16s} {sim_w[k]['tok/s']:10.1f} {emu_w[k]['tok/s']:10.1f} {sim_w[k]['p50 s']:10.3f} {emu_w[k]['p50 s']:10.3f}")
    print(f"  queries migrated (producing again by the end): sim {sim_r['migrated']:.0f} ({sim_r['resumed']:.0f}), "
          f"emulation {emu_r['migrated']:.0f} ({emu_r['resumed']:.0f}); kill -> first "
          f"token on a new route: sim {sim_r['first s']:.2f} s, emulation {emu_r['first s']:.2f} s; median "
          f"sim {sim_r['median s']:.2f} s, emulation {emu_r['median s']:.2f} s")


if __name__ == "__main__":
    main()
