"""What CURVE (the default of ``serve``, ``demo`` and ``launch``) costs on loopback, beside plaintext.

Run: ``python bench/bench_curve.py [--rounds N] [--steps S]``.  The host in this process and worker
processes on loopback, as ``serve`` runs them, once with keys made for the run (``curve.run_keys``)
and once ``--insecure``, alternated ``rounds`` times so that a busy machine slows both alike:

1. **Per-hop latency**: a 4-stage chain of ``null``-executor workers (no compute); one request at a
   time generates ``steps`` tokens; a decode step crosses 5 links, so its latency / 5 is one hop.
2. **Tiny model tokens/s**: 2 torch workers (tiny-llama, seeded dummy weights, one thread each),
   8 requests of 32 prompt tokens and ``steps`` output tokens at once.
3. **The transport alone**, in this process: two endpoints ping-ponging a small message (round
   trips/s) and one streaming 1 MiB tensors to the other (MiB/s): what encryption and the
   authenticated sender lookup cost per message and per byte, without processes or models.

Prints the medians over the rounds and the CURVE / plaintext ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_async.cluster import generate_single_region  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.runtime.serve import even_stages  # noqa: E402
from helix_async.transport.curve import load_keys, run_keys  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


async def _cluster(n: int, executor: str, keys: str, steps: int, batch: int) -> float:
    """Seconds per decode step (batch 1) or tokens/s (batch > 1) of one run."""
    cluster = generate_single_region(n, max(0, min(3, n - 1)), {"CPU": 1.0}, bandwidth=(1e9, 0.0), latency=(1e-4, 0.0),
                                     seed=0, name=f"local{n}")
    placement = Placement.from_layers(cluster, "tiny-llama", even_stages(8, n), method="even stages")
    server = HostServer(placement, curve=load_keys(keys, "host") if keys else None)
    address = await server.start()
    env = dict(os.environ, HELIX_LOG_LEVEL="ERROR")
    procs = [subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--connect", address, "--node-id", str(i),
                               "--executor", executor, "--threads", "1", *(["--keys", keys] if keys else ["--insecure"])],
                              cwd=ROOT, env=env) for i in range(n)]
    try:
        await server.wait_ready(300)
        prompt = list(range(1, 33))
        await server.complete(prompt, 4)  # warm-up
        if batch == 1:
            t = time.perf_counter()
            await server.complete(prompt, steps)
            return (time.perf_counter() - t) / steps
        t = time.perf_counter()
        await asyncio.gather(*(server.complete([p + i for p in prompt], steps) for i in range(batch)))
        return batch * steps / (time.perf_counter() - t)
    finally:
        await server.shutdown(grace=0)
        for p in procs:
            p.wait(timeout=60)


async def _transport(keys: str, rounds: int, tensors: int) -> tuple[float, float]:
    """(round trips/s of a small message, MiB/s of 1 MiB tensors) between two endpoints."""
    import numpy as np

    from helix_async.clock import LoopClock
    from helix_async.ids import SOURCE
    from helix_async.messages import Cancel, make_decode_work
    from helix_async.transport.zmq import ZmqTransport

    clock = LoopClock()
    a = ZmqTransport(SOURCE, clock, curve=load_keys(keys, "host") if keys else None)
    b = ZmqTransport(0, clock, curve=load_keys(keys, "worker-0") if keys else None)
    await a.start()
    await b.start()
    a.connect(0, b.address)
    b.connect(SOURCE, a.address)
    done = asyncio.get_running_loop().create_future()
    count = [0]

    def pong(sender: Any, msg: Any) -> None:
        b.send(SOURCE, msg)

    def ping(sender: Any, msg: Any) -> None:
        count[0] += 1
        if count[0] == rounds:
            done.set_result(None)
        else:
            a.send(0, msg)

    b.set_handler(pong)
    a.set_handler(ping)
    a.send(0, Cancel(request_id=0, reason="warm-up"))
    while count[0] == 0:
        await asyncio.sleep(0.01)
    count[0] = 0
    t = time.perf_counter()
    a.send(0, Cancel(request_id=1, reason="ping"))
    await done
    rtt = rounds / (time.perf_counter() - t)
    got = [0]
    b.set_handler(lambda s, m: got.__setitem__(0, got[0] + 1))
    x = np.ones((1 << 18,), dtype=np.float32)  # 1 MiB
    t = time.perf_counter()
    for i in range(tensors):
        a.send(0, make_decode_work(i, ((0, 0, 8),), 0, 1, -1, 0.0, (x,), 0))
    while got[0] < tensors:
        await asyncio.sleep(0.001)
    mib = tensors / (time.perf_counter() - t)
    await a.close()
    await b.close()
    return rtt, mib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--transport-only", action="store_true", help="only part 3")
    args = ap.parse_args(argv)
    hop: dict[str, list[float]] = {"plaintext": [], "curve": []}
    tps: dict[str, list[float]] = {"plaintext": [], "curve": []}
    for _ in range(0 if args.transport_only else args.rounds):
        for mode in ("plaintext", "curve"):
            if mode == "curve":
                with run_keys(4) as keys:
                    hop[mode].append(asyncio.run(_cluster(4, "null", keys, args.steps, 1)) / 5)
                    tps[mode].append(asyncio.run(_cluster(2, "torch", keys, args.steps // 4, 8)))
            else:
                hop[mode].append(asyncio.run(_cluster(4, "null", "", args.steps, 1)) / 5)
                tps[mode].append(asyncio.run(_cluster(2, "torch", "", args.steps // 4, 8)))
    tp: dict[str, list[tuple[float, float]]] = {"plaintext": [], "curve": []}
    for _ in range(args.rounds):
        tp["plaintext"].append(asyncio.run(_transport("", 5000, 200)))
        with run_keys(1) as keys:
            tp["curve"].append(asyncio.run(_transport(keys, 5000, 200)))
    if args.transport_only:
        hop = {m: [float("nan")] for m in hop}
        tps = {m: [float("nan")] for m in tps}
    med: dict[str, Any] = {m: (statistics.median(hop[m]) * 1e6, statistics.median(tps[m]),
                               statistics.median(r for r, _ in tp[m]), statistics.median(b for _, b in tp[m])) for m in hop}
    print(f"{'links':<10} {'per hop (us)':>13} {'tiny tokens/s':>14} {'round trips/s':>14} {'1 MiB tensors, MiB/s':>21}"
          f"   (medians of {args.rounds} rounds)")
    for m, (h, t, r, b) in med.items():
        print(f"{m:<10} {h:>13.0f} {t:>14.1f} {r:>14.0f} {b:>21.0f}")
    c, p = med["curve"], med["plaintext"]
    print(f"{'ratio':<10} {c[0] / p[0]:>13.2f} {c[1] / p[1]:>14.2f} {c[2] / p[2]:>14.2f} {c[3] / p[3]:>21.2f}"
          "   (CURVE / plaintext)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
