"""Simulated vs served: the same plan, trace and seed through the simulator and through the runtime.

Run: ``python bench/bench_drift.py [--quick] [--scale K] [--seconds S]``.

1. **Cost-model emulation of single24** (the shipped ILP plan, LLaMA-2-70B): the host and 24
   cost-model workers run as tasks of this one process (2 cores do not fit 25 busy processes),
   each worker with its own ZeroMQ sockets on loopback, every batch priced from the profiles and
   every message held back by its link's modelled time, all slowed by ``--scale`` K; latencies are
   divided back by K.  The simulator runs the same trace (azure-conv, ``--rate`` tokens/s for
   ``--seconds`` s, seed 0) on the same plan in default mode.
2. **The tiny model for real**: 3 torch worker processes (layers [0, 3), [3, 6), [6, 8)) serve a
   short trace; the simulator runs that trace on the same plan with the CPU profile measured by
   ``python -m helix_async profile`` (shipped in ``helix_async/data/profiles/tiny_llama``).

Both sides compute their figures from the same ``Host`` arrays (so with the same definitions):
decode tokens/s over the run (decode iterations / (last - first decode)), TTFT (prompt latency,
admission wait included) and per-token latency (decode iterations), mean and p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.placement.flow import max_flow  # noqa: E402
from helix_async.placement.io import load_shipped_layout  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.runtime.worker_main import WorkerOptions, WorkerServer  # noqa: E402
from helix_async.settings import KV_ONLINE, HostSettings  # noqa: E402
from helix_async.transport.emulated import links_from  # noqa: E402
from helix_async.workloads import TraceEntry, generate_online_trace  # noqa: E402
from sim.runner import Workload, run  # noqa: E402
from sim.simulation import SimulationSetup, load_start_time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def figures(host: Any, scale: float = 1.0) -> dict[str, float]:
    pl = sorted(x / scale for x in host.prompt_latency)
    dl = sorted(x / scale for x in host.decode_latency)
    dd = list(host.decode_done)
    thr = len(dd) / ((max(dd) - min(dd)) / scale) if len(dd) > 1 else 0.0
    return {
        "decode tok/s": thr,
        "TTFT mean": sum(pl) / len(pl),
        "TTFT p50": pl[len(pl) // 2],
        "TPOT mean": sum(dl) / len(dl),
        "TPOT p50": dl[len(dl) // 2],
        "queries": float(host.stats.finished),
    }


def simulate(placement: Placement, trace: list[TraceEntry]) -> dict[str, float]:
    # the simulator's clock starts with the models loading: arrivals count from t0, as served ones
    # count from the moment the cluster is ready
    t0 = load_start_time(placement)
    shifted = [TraceEntry(t + t0, n, m) for t, n, m in trace]
    res = run(SimulationSetup(placement, kv=KV_ONLINE), Workload(mode="trace", trace=shifted, warmup=0.0, duration=1e9))
    return figures(res.sim.host)


async def emulate(placement: Placement, trace: list[TraceEntry], scale: float) -> dict[str, float]:
    server = HostServer(placement, settings=HostSettings(emulate_time_scale=scale))
    address = await server.start()
    workers = []
    for i in placement.used_nodes():
        gpu = placement.cluster.machine(i).gpu
        opts = WorkerOptions(connect=address, node_id=i, executor="cost-model", machine_type=gpu, time_scale=scale)
        workers.append(WorkerServer(opts, links=links_from(placement.cluster, i)))
    tasks = [asyncio.create_task(w.run()) for w in workers]
    await server.wait_ready(120)
    host = server.host
    assert host is not None
    clock = server.clock
    t0 = clock.now()
    done = asyncio.Event()
    finished = 0

    def on_done(q: Any) -> None:
        nonlocal finished
        finished += 1
        if finished + host.stats.rejected >= len(trace):
            done.set()

    host.on_query_done = on_done

    async def submit_all() -> None:
        for qid, (t, n, m) in enumerate(trace):
            await clock.sleep_until(t0 + t * scale)
            host.submit(qid, n, m)  # no token ids: modelled payloads, as in the simulator

    await asyncio.gather(submit_all(), done.wait())
    out = figures(host, scale)
    await server.shutdown("bench done", grace=0.0)
    await asyncio.gather(*tasks, return_exceptions=True)
    return out


def tiny_real(trace_rows: list[tuple[float, int, int]], out: Path) -> tuple[dict[str, float], Placement]:
    from helix_async.placement.io import write_placement
    from helix_async.workloads import write_trace_csv

    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    out.mkdir(parents=True, exist_ok=True)
    write_placement(placement, out / "plan.toml", flow=max_flow(placement))
    trace = write_trace_csv(out / "trace.csv", trace_rows)

    async def main() -> dict[str, float]:
        server = HostServer(placement)
        address = await server.start()
        env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
        procs = [subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--connect", address,
                                   "--node-id", str(i), "--threads", "1"], cwd=ROOT, env=env) for i in range(3)]
        try:
            await server.wait_ready(120)
            from helix_async.runtime.commands import replay_trace
            from helix_async.workloads import read_trace_csv

            await replay_trace(server, read_trace_csv(trace))
            return figures(server.host)
        finally:
            await server.shutdown("bench done", grace=0.0)
            for p in procs:
                p.wait(timeout=30)

    import uvloop

    return uvloop.run(main()), placement


def show(title: str, sim: dict[str, float], real: dict[str, float], label: str) -> None:
    print(title)
    print(f"  {'figure':14s} {'simulator':>10s} {label:>12s} {'drift':>8s}")
    for k in sim:
        d = (real[k] - sim[k]) / sim[k] * 100 if sim[k] else float("nan")
        print(f"  {k:14s} {sim[k]:10.3f} {real[k]:12.3f} {d:+7.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0, help="time scale K of the emulation (slower: K > 1)")
    ap.add_argument("--seconds", type=int, default=120, help="seconds of arrivals (a multiple of 3)")
    ap.add_argument("--rate", type=float, default=700.0, help="tokens/s of the trace")
    args = ap.parse_args()
    seconds = 30 if args.quick else args.seconds
    placement = load_shipped_layout("ilp")
    trace = generate_online_trace("azure-conv", "azure-conv", args.rate, start=0.0, duration=seconds, seed=0)
    sim = simulate(placement, [TraceEntry(t, n, m) for t, n, m in trace])
    import uvloop

    t = time.perf_counter()
    real = uvloop.run(emulate(placement, list(trace), args.scale))
    wall = time.perf_counter() - t
    show(f"single24 ILP, LLaMA-2-70B, {len(trace)} queries ({args.rate:g} tok/s for {seconds} s): simulator vs "
         f"cost-model emulation on loopback (24 workers, K={args.scale:g}, {wall:.0f} s wall)", sim, real, "emulation")
    print()
    import random

    rng = random.Random(0)
    rows, t_arr = [], 0.0
    for _ in range(12 if args.quick else 40):
        t_arr += rng.expovariate(4.0)
        rows.append((round(t_arr, 4), rng.randint(8, 64), rng.randint(8, 32)))
    real_t, tiny_plan = tiny_real(rows, Path("out/bench_drift/tiny"))
    sim_t = simulate(tiny_plan, [TraceEntry(*r) for r in rows])
    show(f"tiny-llama, 3 torch worker processes on 2 cores vs the simulator with the measured CPU profile "
         f"({len(rows)} queries)", sim_t, real_t, "served")


if __name__ == "__main__":
    main()
