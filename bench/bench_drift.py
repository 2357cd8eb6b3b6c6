"""Simulated vs served: the same plan, trace and seed through the simulator and through the runtime.

Run: ``python bench/bench_drift.py [--quick] [--only single24|tiny|smollm2 ...] [--scale K] [--seconds S]
[--rounds R] [--gather K]``.

1. **Cost-model emulation of single24** (the shipped ILP plan, LLaMA-2-70B): the host and 24
   cost-model workers run as tasks of this one process (2 cores do not fit 25 busy processes),
   each worker with its own ZeroMQ sockets on loopback, every batch priced from the profiles and
   every message held back by its link's modelled time, all slowed by ``--scale`` K; latencies are
   divided back by K.  The simulator runs the same trace (azure-conv, ``--rate`` tokens/s for
   ``--seconds`` s, seed 0) on the same plan in default mode.
2. **The tiny model for real**: 3 torch worker processes (layers [0, 3), [3, 6), [6, 8)) serve a
   short trace; the simulator runs that trace on the same plan with the CPU profile measured by
   ``python -m helix_async profile`` (shipped in ``helix_async/data/profiles/tiny_llama``).
3. **The real model** (SmolLM2-135M-Instruct, the packaged GGUF) in 3 even stages [0, 10), [10, 20),
   [20, 30) on ``tiny3``: each round profiles it here (``profile --concurrent 3 --clock cpu --layers
   10``, prompts and contexts of the trace's means), serves a seeded trace (``--queries`` at
   ``--qps``, prompts of 16-128 tokens, 8-32 output tokens) through 3 ``python -m helix_async
   worker`` processes with 1 torch thread each, and simulates the same trace and plan, one column
   per modelling step: the original's prices; + the head and a lone decode's measured time; + the
   machine's cores shared by the workers (``--shared-cores``); + the cores measured available to
   1..3 busy processes just before serving (``--cores-available``: the machine's other load), then
   just after.  It also prints how long a sleeping process takes to be woken by another, before
   and after (what every hop pays the scheduler).

All compute their figures from the same ``Host`` arrays (so with the same definitions):
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
#: the real model (the packaged GGUF)
MODEL = "smollm2-135m-instruct"


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


def batch_ms(batches: dict[int, tuple[int, float]]) -> dict[str, float]:
    """Each node's seconds running batches, and its mean time per layer of a batch (ms), from its
    (layers of batches run, busy seconds)."""
    out = {f"busy s n{i}": busy for i, (_, busy) in sorted(batches.items())}
    return out | {f"layer ms n{i}": busy / n * 1e3 if n else float("nan") for i, (n, busy) in sorted(batches.items())}


def simulate(placement: Placement, trace: list[TraceEntry], runtime_costs: bool = True, cores: float = 0.0,
             available: tuple[float, ...] = (), gather: float | None = None, nodes: bool = False) -> dict[str, float]:
    # the simulator's clock starts with the models loading: arrivals count from t0, as served ones
    # count from the moment the cluster is ready
    t0 = load_start_time(placement)
    shifted = [TraceEntry(t + t0, n, m) for t, n, m in trace]
    setup = SimulationSetup(placement, kv=KV_ONLINE, runtime_costs=runtime_costs, cores=cores, available=available,
                            gather=gather)
    res = run(setup, Workload(mode="trace", trace=shifted, warmup=0.0, duration=1e9))
    if nodes:
        return figures(res.sim.host) | batch_ms({i: (w.stats.batches, w.stats.busy_time) for i, w in res.sim.workers.items()})
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


def _stat_cpu(stat: str) -> float:
    """User plus system CPU seconds in the text of a /proc ``stat`` file (a process's or a thread's)."""
    x = stat[stat.rindex(")") + 2 :].split()
    return (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (/proc, Linux)."""
    return _stat_cpu(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of process ``pid``: its name and CPU seconds so far (/proc, Linux)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (name, _stat_cpu(f))
    return out


def thread_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> str:
    """The CPU seconds each thread took between two readings, largest first."""
    took = sorted(((c - before.get(t, (n, 0.0))[1], n) for t, (n, c) in after.items()), reverse=True)
    return " + ".join(f"{c:.2f} {n}" for c, n in took if c >= 0.01)


def probe_cores(k: int, seconds: float) -> float:
    """The cores ``k`` busy processes started from here get, measured: their CPU time (/proc, Linux)
    over ``seconds`` of wall time.  A reading of the machine (its other load), taken while nothing of
    ours computes."""
    ps = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]

    try:
        time.sleep(0.3)
        c0, t0 = [cpu_seconds(p.pid) for p in ps], time.monotonic()
        time.sleep(seconds)
        c1, t1 = [cpu_seconds(p.pid) for p in ps], time.monotonic()
    finally:
        for p in ps:
            p.kill()
            p.wait()
    return sum(b - a for a, b in zip(c0, c1, strict=True)) / (t1 - t0)


WAKE_CHILD = """
import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
while True:
    b = os.read(r, 1)
    if not b:
        break
    os.write(w, b)
"""


def probe_wakeup(rounds: int = 400) -> tuple[float, float]:
    """(median, mean) seconds of a one-way hand-off between two processes that sleep until woken
    (half a round trip through two pipes): what every message hop and every executor hand-off pays
    to the scheduler at the machine's present load, before any work of its own."""
    import statistics

    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", WAKE_CHILD, str(a_r), str(b_w)], pass_fds=(a_r, b_w))
    os.close(a_r)
    os.close(b_w)
    samples = []
    try:
        for i in range(rounds + 20):
            t0 = time.perf_counter()
            os.write(a_w, b"x")
            os.read(b_r, 1)
            if i >= 20:
                samples.append((time.perf_counter() - t0) / 2)
            time.sleep(0.002)  # both sides asleep before the next one, as between tokens
    finally:
        os.close(a_w)
        child.wait()
        os.close(b_r)
    return statistics.median(samples), statistics.fmean(samples)


def probe_available(n: int, seconds: float = 3.0) -> tuple[float, ...]:
    """Cores available to 1..n busy processes (``probe_cores``), each at most the machine's."""
    cores = float(len(os.sched_getaffinity(0)))
    return tuple(min(cores, max(0.01, probe_cores(k, seconds))) for k in range(1, n + 1))


def served(placement: Placement, rows: list[tuple[float, int, int]], out: Path,
           env: dict[str, str] | None = None,
           available: dict[str, tuple[float, ...]] | None = None, gather: float | None = None,
           nodes: bool = False) -> dict[str, float]:
    """Serve ``rows`` (arrival s, prompt tokens, output tokens) on ``placement`` through one
    ``python -m helix_async worker`` process per node (torch executor, 1 torch thread each, ``--gather
    gather`` unless None), with
    seeded random prompt ids; the host's figures.  ``available``: filled with the cores 1..nodes
    busy processes get (``probe_available``) with the workers ready and idle, ``before`` and
    ``after`` the trace. ``nodes``: add each node's mean batch time, from the workers' reports
    (``NodeStats.batches``, ``busy_s``), taken after the trace's last token."""
    from helix_async.placement.io import write_placement
    from helix_async.workloads import write_trace_csv

    out.mkdir(parents=True, exist_ok=True)
    write_placement(placement, out / "plan.toml", flow=max_flow(placement))
    trace = write_trace_csv(out / "trace.csv", rows)
    nodes_list = sorted(placement.used_nodes())

    async def main() -> dict[str, float]:
        server = HostServer(placement)
        address = await server.start()
        penv = dict(os.environ, HELIX_LOG_LEVEL="WARNING", **(env or {}))
        procs = [subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--insecure", "--connect", address,
                                   "--node-id", str(i), "--threads", "1",
                                   *(["--gather", str(gather)] if gather is not None else [])], cwd=ROOT, env=penv)
                 for i in nodes_list]
        try:
            await server.wait_ready(300)
            from helix_async.runtime.commands import replay_trace
            from helix_async.workloads import read_trace_csv

            loop = asyncio.get_running_loop()
            if available is not None:  # off the loop: the host keeps answering heartbeats
                available["before"] = await loop.run_in_executor(None, probe_available, len(nodes_list))
                available["wake before"] = await loop.run_in_executor(None, probe_wakeup)
            cpu0 = [cpu_seconds(p.pid) for p in procs] + [cpu_seconds(os.getpid())]
            threads0 = [thread_cpu_seconds(p.pid) for p in procs]
            await replay_trace(server, read_trace_csv(trace))
            if nodes:
                for i, (p, t0) in enumerate(zip(procs, threads0, strict=True)):
                    print(f"  CPU seconds by thread over the trace, worker {nodes_list[i]}: "
                          + thread_split(t0, thread_cpu_seconds(p.pid)))
            if available is not None:
                available["cpu"] = tuple(b - a for a, b in zip(cpu0, [cpu_seconds(p.pid) for p in procs]
                                                                + [cpu_seconds(os.getpid())], strict=True))
            done_at = server.clock.now()
            per_node: dict[int, tuple[int, float]] = {}
            for _ in range(100):  # the workers report about once a second: wait for reports sent after the end
                fresh = {i: st.stats for i, st in server.nodes.items() if st.stats is not None and st.stats_at > done_at}
                if not nodes or len(fresh) == len(server.nodes):
                    per_node = {i: (s.batches, s.busy_s) for i, s in fresh.items()}
                    break
                await asyncio.sleep(0.05)
            if available is not None:
                available["after"] = await loop.run_in_executor(None, probe_available, len(nodes_list))
                available["wake after"] = await loop.run_in_executor(None, probe_wakeup)
            return figures(server.host) | (batch_ms(per_node) if nodes else {})
        finally:
            await server.shutdown("bench done", grace=0.0)
            for p in procs:
                p.wait(timeout=30)

    import uvloop

    return uvloop.run(main())


def tiny_real(trace_rows: list[tuple[float, int, int]], out: Path) -> tuple[dict[str, float], Placement]:
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    return served(placement, trace_rows, out), placement


def smollm2_trace(n: int, rate: float, seed: int = 0) -> list[tuple[float, int, int]]:
    """``n`` queries of the real-model scenario: Poisson arrivals at ``rate`` per second, prompts of
    16-128 tokens, 8-32 output tokens (seeded)."""
    import random

    rng = random.Random(seed)
    rows, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        rows.append((round(t, 4), rng.randint(16, 128), rng.randint(8, 32)))
    return rows


def measure_profile(model: str, rows: list[tuple[float, int, int]], profile_dir: Path, concurrent: int,
                    layers: int, clock: str) -> Path:
    """``python -m helix_async profile`` of ``model`` on this machine's CPU into
    ``profile_dir/<model key>``: ``concurrent`` processes with 1 torch thread each (as the workers
    run), batches through ``layers`` layers (a stage's), timed by ``clock``, prompt batches of the
    trace's mean prompt length, decodes with its mean context (the prompt plus half the output)."""
    from helix_async.model import get_model

    mean_in = round(sum(r[1] for r in rows) / len(rows))
    mean_out = round(sum(r[2] for r in rows) / len(rows))
    out = profile_dir / get_model(model).key
    cmd = [sys.executable, "-m", "helix_async", "profile", "--model", model, "--device", "cpu", "--threads", "1",
           "--concurrent", str(concurrent), "--layers", str(layers), "--clock", clock, "--prompt-len", str(mean_in),
           "--decode-context",
           str(mean_in + mean_out // 2), "--out", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, HELIX_LOG_LEVEL="WARNING"))
    return out


def smollm2_real(rows: list[tuple[float, int, int]], out: Path, profile_dir: Path | None,
                 available: dict[str, tuple[float, ...]], gather: float | None = None) -> tuple[dict[str, float], Placement]:
    """The real model in 3 even stages on tiny3, served; ``profile_dir``: where its measured CPU
    profile is (None: the shipped one); ``available``: the cores probed (see ``served``)."""
    from helix_async import envs

    if profile_dir is not None:
        envs.HELIX_PROFILE_DIR = str(profile_dir)  # the host and the simulator in this process
    placement = Placement.from_layers(load_cluster("tiny3"), MODEL, {0: (0, 10), 1: (10, 20), 2: (20, 30)})
    env = {"HELIX_PROFILE_DIR": str(profile_dir)} if profile_dir is not None else None
    return served(placement, rows, out, env, available, gather, nodes=True), placement


def drift(sim: dict[str, float], real: dict[str, float]) -> dict[str, float]:
    """(served - simulated) / simulated, in percent, per figure."""
    return {k: (real[k] - sim[k]) / sim[k] * 100 if sim[k] else float("nan") for k in sim}


def show(title: str, sim: dict[str, float], real: dict[str, float], label: str) -> None:
    print(title)
    print(f"  {'figure':14s} {'simulator':>10s} {label:>12s} {'drift':>8s}")
    d = drift(sim, real)
    for k in sim:
        print(f"  {k:14s} {sim[k]:10.3f} {real[k]:12.3f} {d[k]:+7.1f}%")


def show_steps(title: str, steps: list[tuple[str, dict[str, float]]], real: dict[str, float]) -> None:
    """Simulated figures after each modelling step (columns), the served ones, and the drift of the
    served run against each step."""
    print(title)
    w = 12
    print("  " + " " * 14 + "".join(f"{'(' + str(i + 1) + ')':>{w}s}" for i in range(len(steps))) + f"{'served':>{w}s}")
    for k in real:
        print(f"  {k:14s}" + "".join(f"{f[k]:{w}.3f}" for _, f in steps) + f"{real[k]:{w}.3f}")
    print("  drift")
    for k in real:
        if k != "queries":
            print(f"  {k:14s}" + "".join(f"{drift(f, real)[k]:+{w - 1}.1f}%" for _, f in steps))
    for i, (label, _) in enumerate(steps):
        print(f"  ({i + 1}) {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["single24", "tiny", "smollm2"], action="append",
                    help="run only this scenario (repeatable; default: all three)")
    ap.add_argument("--scale", type=float, default=1.0, help="time scale K of the emulation (slower: K > 1)")
    ap.add_argument("--seconds", type=int, default=120, help="seconds of arrivals (a multiple of 3)")
    ap.add_argument("--rate", type=float, default=700.0, help="tokens/s of the trace")
    ap.add_argument("--queries", type=int, default=30, help="queries of the real-model trace")
    ap.add_argument("--qps", type=float, default=0.5, help="queries per second of the real-model trace")
    ap.add_argument("--profile-dir", default=None,
                    help="real model: a profile directory (HELIX_PROFILE_DIR layout) to use instead of measuring one "
                         "('shipped': the packaged profile)")
    ap.add_argument("--concurrent", type=int, default=3,
                    help="real model: processes measuring the profile at once (default 3, as the 3 workers run)")
    ap.add_argument("--profile-clock", choices=["wall", "cpu"], default="cpu",
                    help="real model: the profile's clock (default cpu: seconds of one core, shared in the simulator)")
    ap.add_argument("--profile-layers", type=int, default=10,
                    help="real model: layers a profiled batch runs through (default 10, a stage's)")
    ap.add_argument("--gather", type=float, default=None,
                    help="real model: the workers' --gather, served and simulated alike (default: theirs)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="real model: profile, serve and simulate this many times (the spread of the drift)")
    args = ap.parse_args()
    only = set(args.only or ["single24", "tiny", "smollm2"])
    seconds = 30 if args.quick else args.seconds
    import random

    import uvloop

    if "single24" in only:
        placement = load_shipped_layout("ilp")
        trace = generate_online_trace("azure-conv", "azure-conv", args.rate, start=0.0, duration=seconds, seed=0)
        sim = simulate(placement, [TraceEntry(t, n, m) for t, n, m in trace])
        t = time.perf_counter()
        real = uvloop.run(emulate(placement, list(trace), args.scale))
        wall = time.perf_counter() - t
        show(f"single24 ILP, LLaMA-2-70B, {len(trace)} queries ({args.rate:g} tok/s for {seconds} s): simulator vs "
             f"cost-model emulation on loopback (24 workers, K={args.scale:g}, {wall:.0f} s wall)", sim, real,
             "emulation")
        print()
    if "tiny" in only:
        rng = random.Random(0)
        rows, t_arr = [], 0.0
        for _ in range(12 if args.quick else 40):
            t_arr += rng.expovariate(4.0)
            rows.append((round(t_arr, 4), rng.randint(8, 64), rng.randint(8, 32)))
        real_t, tiny_plan = tiny_real(rows, Path("out/bench_drift/tiny"))
        sim_t = simulate(tiny_plan, [TraceEntry(*r) for r in rows])
        show(f"tiny-llama, 3 torch worker processes on 2 cores vs the simulator with the measured CPU profile "
             f"({len(rows)} queries)", sim_t, real_t, "served")
        print()
    if "smollm2" in only:
        rows = smollm2_trace(10 if args.quick else args.queries, args.qps)
        out = Path("out/bench_drift/smollm2")
        drifts: list[dict[str, float]] = []
        for r in range(args.rounds):
            if args.profile_dir == "shipped":
                prof: Path | None = None
            elif args.profile_dir:
                prof = Path(args.profile_dir).resolve()
            else:
                prof = (out / "profiles").resolve()
                measure_profile(MODEL, rows, prof, args.concurrent, args.profile_layers, args.profile_clock)
            avail: dict[str, tuple[float, ...]] = {}
            real_r, plan_r = smollm2_real(rows, out, prof, avail, args.gather)
            trace_r = [TraceEntry(*row) for row in rows]
            cores = float(len(os.sched_getaffinity(0)))
            g = args.gather
            steps = [
                ("the original's prices, a device per node", simulate(plan_r, trace_r, runtime_costs=False, gather=g, nodes=True)),
                ("+ the head on the last stage, a lone decode at its measured time", simulate(plan_r, trace_r, gather=g, nodes=True)),
                (f"+ the {cores:g} cores shared by the workers computing", simulate(plan_r, trace_r, cores=cores, gather=g, nodes=True)),
                ("+ the cores 1, 2, 3 busy processes got, probed before serving: "
                 + ", ".join(f"{a:.2f}" for a in avail["before"]),
                 simulate(plan_r, trace_r, cores=cores, available=avail["before"], gather=g, nodes=True)),
                ("+ ... probed after serving: " + ", ".join(f"{a:.2f}" for a in avail["after"]),
                 simulate(plan_r, trace_r, cores=cores, available=avail["after"], gather=g, nodes=True)),
            ]
            drifts.append(drift(steps[3][1], real_r))
            show_steps(f"{MODEL}, 3 even stages on tiny3, 3 torch worker processes (1 thread each) on {cores:g} cores "
                       f"vs the simulator with the CPU profile {'shipped' if prof is None else 'in ' + str(prof)} "
                       f"({len(rows)} queries at {args.qps:g}/s; round {r + 1} of {args.rounds})", steps, real_r)
            print("  CPU seconds over the trace, served: " + ", ".join(f"n{i} {c:.2f}" for i, c in enumerate(avail["cpu"][:-1]))
                  + f", the host (and this bench) {avail['cpu'][-1]:.2f}")
            wb, wa = avail["wake before"], avail["wake after"]
            print(f"  a process woken by another (one-way, median / mean): {wb[0] * 1e3:.3f} / {wb[1] * 1e3:.3f} ms "
                  f"before serving, {wa[0] * 1e3:.3f} / {wa[1] * 1e3:.3f} ms after")
            print(flush=True)
        if args.rounds > 1:
            print(f"drift of (4) over {args.rounds} rounds, median [min, max]:")
            for k in drifts[0]:
                v = sorted(d[k] for d in drifts)
                print(f"  {k:14s} {v[len(v) // 2]:+7.1f}%  [{v[0]:+.1f}%, {v[-1]:+.1f}%]")


if __name__ == "__main__":
    main()
