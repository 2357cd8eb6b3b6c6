"""The front door under load: ``bench-serve`` against (a) the tiny model and (b) the single24 emulation,
(b) beside the simulator's prediction, and the HTTP API's own cost per request.

Run: ``python bench/bench_serve.py [--quick] [--part a,b,overhead]``.

(a) ``python -m helix_async serve`` (3 torch worker processes, the tiny model, dummy weights) and
    ``python -m helix_async bench-serve`` at ``--rate-a`` requests/s of azure-conv lengths for
    ``--seconds`` s.
(b) The cost-model emulation of the single24 shipped ILP plan (LLaMA-2-70B): the host with the HTTP
    API and 24 cost-model workers as tasks of one process (2 cores do not fit 25 busy processes),
    every batch priced from the profiles and every message held back by its link's modelled time;
    ``bench-serve`` (another process) sends Poisson azure-conv load at ``--rate-b`` requests/s and
    saves the trace it sent; the simulator (default mode) replays that trace on the same plan.  Both
    sides' figures use the same definitions: per request TTFT (arrival to first token) and TPOT
    ((last - first token) / (tokens - 1)); output tokens/s over the run.
(overhead) A null-executor cluster (3 worker processes): 200 sequential requests of 8 tokens each
    through the host's Python client (``HostServer.complete``, in the host's process) and through the
    HTTP API (non-streaming and streaming, from a client process), in 5 interleaved rounds; the
    HTTP overhead is the difference of the medians (and of the p99s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.placement.io import load_shipped_layout  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.settings import KV_ONLINE, HostSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HELIX_LOG_LEVEL="WARNING")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def bench_serve_cli(url: str, out: Path, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "helix_async", "bench-serve", "--url", url, "--json", str(out), *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise RuntimeError(p.stderr)
    print("\n".join("    " + ln for ln in p.stdout.splitlines()))
    return dict(json.loads(out.read_text()))


def part_a(tmp: Path, rate: float, seconds: float) -> dict[str, Any]:
    url_file = tmp / "url_a"
    serve = subprocess.Popen([sys.executable, "-m", "helix_async", "serve", "--workers", "3", "--http", "127.0.0.1:0",
                              "--url-file", str(url_file), "--log-dir", str(tmp / "serve_a")], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (url_file.exists() and url_file.read_text().strip()):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start")
            time.sleep(0.2)
        print(f"(a) tiny-llama, 3 torch workers, azure-conv at {rate:g} req/s for {seconds:g} s")
        return bench_serve_cli(url_file.read_text().strip(), tmp / "a.json", "--rate", str(rate), "--duration",
                               str(seconds))
    finally:
        serve.send_signal(2)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()


def sim_figures(placement: Placement, trace_csv: Path) -> dict[str, float]:
    from helix_async.workloads import TraceEntry, read_trace_csv
    from sim.runner import Workload, run
    from sim.simulation import SimulationSetup, load_start_time

    t0 = load_start_time(placement)
    trace = [TraceEntry(t + t0, n, m) for t, n, m in read_trace_csv(trace_csv)]
    res = run(SimulationSetup(placement, kv=KV_ONLINE), Workload(mode="trace", trace=trace, warmup=0.0, duration=1e9))
    recs = res.sim.host.query_records  # (qid, arrived, first token, finished, input, output)
    ttft = [f - a for _, a, f, _, _, _ in recs]
    tpot = [(e - f) / (m - 1) for _, _, f, e, _, m in recs if m > 1]
    span = max(e for _, _, _, e, _, _ in recs) - t0
    return {"completed": len(recs), "output tok/s": sum(r[5] for r in recs) / span,
            "TTFT mean": sum(ttft) / len(ttft), "TTFT p50": pct(ttft, 0.5),
            "TPOT mean": sum(tpot) / len(tpot), "TPOT p50": pct(tpot, 0.5)}


def served_figures(s: dict[str, Any]) -> dict[str, float]:
    return {"completed": s["completed"], "output tok/s": s["output_token_throughput"],
            "TTFT mean": s["mean_ttft_s"], "TTFT p50": s["p50_ttft_s"], "TPOT mean": s["mean_tpot_s"], "TPOT p50": s["p50_tpot_s"]}


def part_b(tmp: Path, rate: float, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    from helix_async.frontend.metrics import Metrics
    from helix_async.frontend.openai_api import OpenAIServer
    from helix_async.runtime.worker_main import WorkerOptions, WorkerServer
    from helix_async.transport.emulated import links_from

    placement = load_shipped_layout("ilp")
    result: dict[str, Any] = {}

    async def main() -> None:
        server = HostServer(placement, settings=HostSettings(emulate_time_scale=1.0))
        address = await server.start()
        workers = [WorkerServer(WorkerOptions(connect=address, node_id=i, executor="cost-model",
                                              machine_type=placement.cluster.machine(i).gpu),
                                links=links_from(placement.cluster, i)) for i in placement.used_nodes()]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        api = OpenAIServer(server, "llama2-70b", None, max_model_len=4096, metrics=Metrics(server))
        url = await api.start("127.0.0.1", 0)
        try:
            await server.wait_ready(120)
            print(f"(b) single24 ILP emulation (24 cost-model workers), azure-conv at {rate:g} req/s for {seconds:g} s")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "helix_async", "bench-serve", "--url", url, "--json", str(tmp / "b.json"),
                "--rate", str(rate), "--duration", str(seconds), "--save-trace", str(tmp / "b_trace.csv"),
                cwd=ROOT, env=ENV, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            print("\n".join("    " + ln for ln in out.decode().splitlines()))
            result["b"] = json.loads((tmp / "b.json").read_text())
        finally:
            await server.shutdown("bench done", grace=0.0)
            await api.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    import uvloop

    uvloop.run(main())
    return served_figures(result["b"]), sim_figures(placement, tmp / "b_trace.csv")


_CLIENT = r"""
import asyncio, json, sys, time
import aiohttp
async def main(url, n, stream):
    lat = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 2):
            body = {"prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": stream}
            t = time.perf_counter()
            async with s.post(url + "/v1/completions", json=body) as r:
                await r.read()
            if i >= 2:
                lat.append(time.perf_counter() - t)
    print(json.dumps(lat))
asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"))
"""


def part_overhead(n: int) -> dict[str, float]:
    from helix_async.frontend.openai_api import OpenAIServer

    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    out: dict[str, float] = {}

    async def main() -> None:
        server = HostServer(placement)
        address = await server.start()
        procs = [subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--insecure", "--connect", address,
                                   "--node-id", str(i), "--executor", "null"], cwd=ROOT, env=ENV) for i in range(3)]
        api = OpenAIServer(server, "tiny-llama", None, max_model_len=2048)
        url = await api.start("127.0.0.1", 0)
        try:
            await server.wait_ready(120)
            # interleaved rounds, so that the machine's drift hits every path alike
            lat: dict[str, list[float]] = {"direct": [], "http plain": [], "http stream": []}
            rounds = 5
            for _ in range(rounds):
                for i in range(n // rounds + 2):
                    t = time.perf_counter()
                    await server.complete([5, 6, 7, 8], 8)
                    if i >= 2:
                        lat["direct"].append(time.perf_counter() - t)
                for stream in (False, True):
                    p = await asyncio.create_subprocess_exec(sys.executable, "-c", _CLIENT, url, str(n // rounds),
                                                             "1" if stream else "0", stdout=asyncio.subprocess.PIPE)
                    raw, _ = await p.communicate()
                    lat["http stream" if stream else "http plain"] += json.loads(raw)
            for key, xs in lat.items():
                out[f"{key} p50"] = pct(xs, 0.5)
                out[f"{key} p99"] = pct(xs, 0.99)
        finally:
            await server.shutdown("bench done", grace=0.0)
            await api.stop()
            for pr in procs:
                pr.wait(timeout=30)

    import uvloop

    uvloop.run(main())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs")
    ap.add_argument("--part", default="a,b,overhead", help="which parts (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of arrivals (a), (b)")
    ap.add_argument("--rate-a", type=float, default=1.0, help="(a) requests/s")
    ap.add_argument("--rate-b", type=float, default=0.7, help="(b) requests/s")
    args = ap.parse_args()
    parts = set(args.part.split(","))
    seconds = 20.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "a" in parts:
            part_a(tmp, args.rate_a, seconds)
            print()
        if "b" in parts:
            served, sim = part_b(tmp, args.rate_b, seconds)
            print("  (b) served (HTTP, emulation) against the simulator on the trace bench-serve sent")
            print(f"  {'figure':14s} {'simulator':>10s} {'served':>10s} {'drift':>8s}")
            for k in sim:
                dr = (served[k] - sim[k]) / sim[k] * 100 if sim[k] else float("nan")
                print(f"  {k:14s} {sim[k]:10.3f} {served[k]:10.3f} {dr:+7.1f}%")
            print()
        if "overhead" in parts:
            o = part_overhead(50 if args.quick else 200)
            print("HTTP overhead per request (null executor, 3 workers, 8 tokens, sequential)")
            print(f"  {'path':30s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50 over direct':>16s}")
            for key, label in (("direct", "host Python client (direct)"), ("http plain", "HTTP, non-streaming"),
                               ("http stream", "HTTP, streaming (SSE)")):
                p50, p99 = o[f"{key} p50"], o[f"{key} p99"]
                print(f"  {label:30s} {1000 * p50:8.2f} {1000 * p99:8.2f} {1000 * (p50 - o['direct p50']):+15.2f}")


if __name__ == "__main__":
    main()
