"""The serving runtime on loopback: its own per-hop overhead, and the tiny model's tokens/s.

Run: ``python bench/bench_runtime.py [--quick]``.  One run prints, side by side:

1. **Per-hop overhead**: the host in this process and 4 ``null``-executor worker processes (a
   4-stage chain of tiny-llama over a 4-node CPU cluster, every batch finishing at no cost).  One
   request at a time generates ``steps`` tokens; each decode step crosses 5 links (host, 4
   workers, host), so its latency / 5 is the cost of one hop: transport (ZeroMQ on uvloop, the
   wire codec, acknowledgements), the worker's batching and the host's bookkeeping.  Against the
   original prototype's C++ path, which printed 562 us per hop (the runtime issue's figure), and
   beside the floor of this machine: the same 5 processes passing one message round a ring with
   nothing but pyzmq (blocking receives, no protocol).  Once over TCP on loopback (what spans
   machines), once over ``ipc://`` endpoints (one machine).
2. **Tiny model tokens/s** (seeded dummy weights, float32, one torch thread per process, greedy):
   ``transformers`` ``generate`` on the whole model in one process; our torch code on the whole
   model in one process (the same layer function the workers run); and a 4-stage pipeline of torch
   worker processes.  Each with ``B`` requests of 32 prompt tokens and ``steps`` output tokens at
   once.  On this 2-core machine the 4 worker processes and the host share 2 cores, so the pipeline
   cannot beat the single process; the ratio shows what the runtime costs on top of the compute.
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

from helix_async.cluster import generate_single_region  # noqa: E402
from helix_async.model import get_model  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.settings import HostSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def chain4() -> Placement:
    cluster = generate_single_region(4, 3, {"CPU": 1.0}, bandwidth=(1e9, 0.0), latency=(1e-4, 0.0), seed=0, name="cpu4")
    return Placement.from_layers(cluster, "tiny-llama", {0: (0, 2), 1: (2, 4), 2: (4, 6), 3: (6, 8)}, method="manual")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))]


async def _serve(executor: str, fn: Any, *extra: str, ipc: str = "") -> Any:
    p = chain4()
    server = HostServer(p, settings=HostSettings(listen=f"ipc://{ipc}/host") if ipc else None)
    address = await server.start()
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    procs = [
        subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--insecure", "--connect", address,
                          "--node-id", str(i), "--executor", executor, *extra, *(["--bind", f"ipc://{ipc}/w{i}"] if ipc else [])],
                         cwd=ROOT, env=env)
        for i in range(4)
    ]
    try:
        await server.wait_ready(120)
        return await fn(server)
    finally:
        await server.shutdown("bench done", grace=1.0)
        for pr in procs:
            try:
                pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pr.kill()


def per_hop(steps: int, ipc: bool = False) -> dict[str, float]:
    async def fn(server: HostServer) -> list[float]:
        lat: list[float] = []
        for _ in range(3):
            await server.complete([1, 2, 3, 4], steps)
            host = server.host
            assert host is not None
            lat = list(host.decode_latency)
        return lat[steps:]  # the last two requests (the first warms up)

    import uvloop

    if ipc:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            lat = uvloop.run(_serve("null", fn, ipc=d))
    else:
        lat = uvloop.run(_serve("null", fn))
    hops = 5
    return {"p50_us": pct(lat, 0.5) / hops * 1e6, "p99_us": pct(lat, 0.99) / hops * 1e6, "n": len(lat)}


def _ring_member(i: int, n: int, endpoint: str, inbox_q: Any, next_q: Any) -> None:
    """One process of the bare ZeroMQ ring: receive on a ROUTER, pass the payload on over a DEALER."""
    import zmq

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.ROUTER)
    inbox.bind(endpoint.format(i))
    inbox_q.put((i, inbox.getsockopt_string(zmq.LAST_ENDPOINT)))
    out = ctx.socket(zmq.DEALER)
    out.connect(next_q.get())
    while True:
        frames = inbox.recv_multipart()
        out.send(frames[1])
        if frames[1] == b"stop":
            break
    inbox.close(0)
    out.close(0)
    ctx.term()


def zmq_floor(steps: int, ipc: str = "") -> dict[str, float]:
    """The same 5-hop loop with nothing but ZeroMQ: 5 processes in a ring (DEALER to ROUTER, blocking
    receives, a 64-byte payload), one message going round at a time.  What any runtime on pyzmq
    pays on this machine before doing anything of its own."""
    import multiprocessing as mp

    import zmq

    n = 5
    endpoint = f"ipc://{ipc}/ring{{}}" if ipc else "tcp://127.0.0.1:*"
    ctx = mp.get_context("spawn")
    inbox_q = ctx.Queue()
    next_qs = [ctx.Queue() for _ in range(n)]
    procs = [ctx.Process(target=_ring_member, args=(i, n, endpoint, inbox_q, next_qs[i]), daemon=True) for i in range(1, n)]
    for pr in procs:
        pr.start()
    zctx = zmq.Context()
    inbox = zctx.socket(zmq.ROUTER)
    inbox.bind(endpoint.format(0))
    addrs = {0: inbox.getsockopt_string(zmq.LAST_ENDPOINT)}
    for _ in range(1, n):
        i, a = inbox_q.get(timeout=60)
        addrs[i] = a
    for i in range(1, n):
        next_qs[i].put(addrs[(i + 1) % n])
    out = zctx.socket(zmq.DEALER)
    out.connect(addrs[1])
    payload = b"x" * 64
    lat: list[float] = []
    try:
        for k in range(steps * 3 + 200):
            t0 = time.perf_counter()
            out.send(payload)
            inbox.recv_multipart()
            if k >= 200:  # the first round trips connect and warm up
                lat.append(time.perf_counter() - t0)
        out.send(b"stop")
        inbox.recv_multipart()
    finally:
        for pr in procs:
            pr.join(timeout=10)
            if pr.is_alive():
                pr.kill()
        inbox.close(0)
        out.close(0)
        zctx.term()
    return {"p50_us": pct(lat, 0.5) / n * 1e6, "p99_us": pct(lat, 0.99) / n * 1e6, "n": len(lat)}


def tokens_per_s_pipeline(batch: int, steps: int) -> float:
    async def fn(server: HostServer) -> float:
        prompts = [[(7 * i + j) % 2048 for j in range(32)] for i in range(batch)]
        await server.complete(prompts[0], 4)  # warm-up
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(server.complete(p, steps) for p in prompts))
        return sum(len(o) for o in outs) / (time.perf_counter() - t0)

    import uvloop

    return float(uvloop.run(_serve("torch", fn, "--threads", "1")))


def tokens_per_s_ours(batch: int, steps: int) -> float:
    import torch

    from helix_async.executors.llama import SeqCache, dummy_stage
    from helix_async.executors.profiling import llama_config

    torch.set_num_threads(1)
    cfg = llama_config(get_model("tiny-llama"))
    st = dummy_stage(cfg, 0, cfg.num_layers)
    prompts = [[(7 * i + j) % 2048 for j in range(32)] for i in range(batch)]
    with torch.inference_mode():
        t0 = time.perf_counter()
        caches = [SeqCache() for _ in prompts]
        x = torch.cat([st.embed_tokens(p) for p in prompts])
        spans = [(0, len(p)) for p in prompts]
        for i in range(cfg.num_layers):
            x = st.layer(i, x, spans, caches, [32 + steps] * batch)
        ends = [32 * (k + 1) - 1 for k in range(batch)]
        toks = st.logits(x[ends]).argmax(-1).tolist()
        made = batch
        for s in range(1, steps):
            x = st.embed_tokens(toks)
            sp = [(32 + s - 1, 1)] * batch
            for i in range(cfg.num_layers):
                x = st.layer(i, x, sp, caches, [32 + steps] * batch)
            toks = st.logits(x).argmax(-1).tolist()
            made += batch
        return made / (time.perf_counter() - t0)


def tokens_per_s_hf(batch: int, steps: int) -> float:
    import torch
    import transformers

    torch.set_num_threads(1)
    spec = get_model("tiny-llama")
    cfg = transformers.LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                   intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                                   num_attention_heads=spec.num_attention_heads,
                                   num_key_value_heads=spec.num_key_value_heads)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[(7 * i + j) % 2048 for j in range(32)] for i in range(batch)])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    return (out.shape[1] - 32) * batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    args = ap.parse_args()
    steps = 50 if args.quick else 200
    import tempfile

    floor = zmq_floor(steps)
    hop = per_hop(steps)
    with tempfile.TemporaryDirectory() as d:
        floor_ipc = zmq_floor(steps, ipc=d)
    hop_ipc = per_hop(steps, ipc=True)
    print("per-hop overhead on loopback (null executor, 4 worker processes, 5 hops per decode step)")
    print(f"  {'':<28} {'p50 us':>7} {'p99 us':>7} {'p50 / ZeroMQ alone':>19}")
    for label, h, f in (("ours, tcp", hop, floor), ("ZeroMQ alone, tcp", floor, floor),
                        ("ours, ipc", hop_ipc, floor_ipc), ("ZeroMQ alone, ipc", floor_ipc, floor_ipc)):
        print(f"  {label:<28} {h['p50_us']:>7.0f} {h['p99_us']:>7.0f} {h['p50_us'] / f['p50_us']:>18.2f}x")
    print(f"  the original's C++ path: 562 us  -> ours (tcp) / original p50 {hop['p50_us'] / 562:.2f}x")
    print()
    print("tiny-llama tokens/s (dummy weights, float32, 1 torch thread per process, greedy)")
    print(f"  {'batch':>5}  {'transformers':>12}  {'ours whole':>10}  {'4-stage pipeline':>16}  {'pipeline/ours':>13}")
    for b in (1, 8):
        n = steps // 2 if b > 1 else steps
        hf = tokens_per_s_hf(b, n)
        ours = tokens_per_s_ours(b, n)
        pipe = tokens_per_s_pipeline(b, n)
        print(f"  {b:>5}  {hf:>12.1f}  {ours:>10.1f}  {pipe:>16.1f}  {pipe / ours:>12.2f}x")


if __name__ == "__main__":
    main()
