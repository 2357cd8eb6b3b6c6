"""The wire decoder stays total on live processes: a seeded stream of truncated, mutated and random
frames goes to a serving host and to a serving worker's inbox; both keep serving, and every frame
that cannot be a valid message is counted as dropped.

Frames sent (per target, from a DEALER of its own, so with its own sequence numbers):
* random multipart garbage whose first frame is not a link header (wrong kind byte or < 17 bytes);
* link headers with a random kind byte;
* data headers in sequence followed by random bytes, or by a real message truncated or with bytes
  flipped;
* data headers out of sequence.
Nothing here can be a valid message except, rarely, a mutated real one: the test counts those
apart and requires every other frame to be dropped and counted.  It waits for those counts (the
worker's come in its reports, about once a second), bounded only to fail instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from polling import wait_until_async

from helix_async.cluster import load_cluster
from helix_async.codec import encode
from helix_async.messages import Cancel, DecodeWork, PromptWork, TokenResult
from helix_async.placement import Placement
from helix_async.runtime.host_main import HostServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HEADER = struct.Struct("<c8sQ")


def fuzz_frames(rng: random.Random, n: int) -> tuple[list[list[bytes]], int]:
    """``n`` fuzz messages and how many of them are certainly invalid."""
    samples = [
        PromptWork(request_id=3, query_id=3, route=((0, 0, 4), (1, 4, 8)), stage=0, num_tokens=3, token_ids=(1, 2, 3),
                   max_tokens=4, sent_at=1.0),
        DecodeWork(request_id=3, route=((0, 0, 4), (1, 4, 8)), stage=1, context_len=5, token_id=9, sent_at=2.0),
        TokenResult(request_id=3, token_id=7, context_len=4, finished=False, sent_at=3.0),
        # the sampling fields: penalties, stop ids, logprobs, the context ids a later last stage needs
        PromptWork(request_id=4, query_id=4, route=((0, 0, 4), (1, 4, 8)), stage=1, num_tokens=3, token_ids=(),
                   max_tokens=4, sent_at=1.0, payload_bytes=12, temperature=0.7, top_k=40, min_p=0.05,
                   presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, min_tokens=2,
                   stop_token_ids=(2, 7), logprobs=3, context_ids=(5, 6, 7), generated=1),
        TokenResult(request_id=4, token_id=7, context_len=4, finished=False, sent_at=3.0,
                    logprobs=((7, -0.5), (7, -0.5), (2, -1.5), (9, -3.25))),
        Cancel(request_id=3, reason="fuzz"),
    ]
    epoch = rng.randbytes(8)
    seq = 0
    out: list[list[bytes]] = []
    certain = 0
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:  # garbage, too short for a header
            out.append([rng.randbytes(rng.randrange(0, 17)) for _ in range(rng.randint(1, 3))])
            certain += 1
        elif kind == 1:  # a header of an unknown kind
            out.append([bytes([rng.choice(b"BCEFGXYZ\x00\xff")]) + rng.randbytes(16)])
            certain += 1
        elif kind == 2:  # in sequence, random body
            out.append([HEADER.pack(b"D", epoch, seq) + rng.randbytes(rng.randint(0, 64))])
            seq += 1
            certain += 1
        elif kind == 3:  # in sequence, a real message truncated
            frames = encode(rng.choice(samples))
            body = bytes(frames[0]) + bytes(frames[1])
            out.append([HEADER.pack(b"D", epoch, seq) + body[: rng.randrange(0, len(body) - 1)]])
            seq += 1
            certain += 1
        elif kind == 4:  # in sequence, a real message with bytes flipped (may still decode)
            frames = encode(rng.choice(samples))
            body = bytearray(bytes(frames[0]) + bytes(frames[1]))
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
            out.append([HEADER.pack(b"D", epoch, seq) + bytes(body)])
            seq += 1
        else:  # out of sequence (a gap)
            out.append([HEADER.pack(b"D", epoch, seq + rng.randint(2, 1000)) + rng.randbytes(8)])
            certain += 1
    return out, certain


def drops(tp: Any) -> int:
    st = tp.stats
    return st.bad_frames + tp.drops.total + st.out_of_order + st.duplicates + st.handler_errors


def test_fuzzed_frames_are_dropped_and_counted_while_the_cluster_serves(tmp_path: Path) -> None:
    rng = random.Random(1234)
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 4), 1: (4, 8)})
    env = dict(os.environ, HELIX_LOG_LEVEL="ERROR")
    procs: list[subprocess.Popen[bytes]] = []

    async def main() -> dict[str, Any]:
        server = HostServer(placement)
        address = await server.start()
        for i in (0, 1):
            procs.append(subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--insecure", "--connect", address,
                                           "--node-id", str(i), "--executor", "null"], cwd=ROOT, env=env))
        await server.wait_ready(180)
        before = await server.complete([1, 2, 3], 6)
        host_drops0 = drops(server.tp)
        host = server.host
        assert host is not None
        host_bad0 = server.counters.bad_messages + host.stats.bad_messages

        def host_counted() -> tuple[int, int]:
            return drops(server.tp) - host_drops0, server.counters.bad_messages + host.stats.bad_messages - host_bad0

        def worker_counted() -> int:
            st = server.nodes[0].stats  # (its last report)
            return st.bad_frames if st is not None else 0

        def all_counted(target: str) -> Callable[[], bool]:
            return lambda: counted[target]() >= certain[target]

        ctx = zmq.Context()
        sent = {"host": 0, "worker": 0}
        certain = {"host": 0, "worker": 0}
        counted = {"host": lambda: sum(host_counted()), "worker": worker_counted}
        try:
            for target, addr in (("host", address), ("worker", server.nodes[0].address)):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IDENTITY, f"fuzz-{target}".encode())
                sock.connect(addr)
                frames, sure = fuzz_frames(rng, 3000)
                for msg in frames:
                    sock.send_multipart(msg)
                sent[target] = len(frames)
                certain[target] = sure
                # the socket stays open (LINGER 0 would drop what it still holds) until the target
                # has counted every frame that cannot be a message
                await wait_until_async(all_counted(target), what=f"{target} counts its drops")
                sock.close(0)
            # both go on serving, with the same answers
            after = await server.complete([1, 2, 3], 6)
            host_drops, host_bad = host_counted()
            return {
                "before": before, "after": after, "sent": sent, "certain": certain,
                "host_drops": host_drops, "host_bad": host_bad, "worker_drops": worker_counted(),
                "alive": [p.poll() is None for p in procs],
            }
        finally:
            ctx.term()
            await server.shutdown("test done", grace=0.5)

    try:
        r = asyncio.run(asyncio.wait_for(main(), 600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    assert r["alive"] == [True, True] and r["after"] == r["before"]
    # every frame that cannot be a message was dropped and counted; mutated real ones either were too,
    # or decoded and were refused as unexpected (counted as bad messages)
    assert r["certain"]["host"] <= r["host_drops"] <= r["sent"]["host"]
    assert r["host_drops"] + r["host_bad"] >= r["certain"]["host"]
    assert r["worker_drops"] >= r["certain"]["worker"]
    print(f"fuzz: host {r['sent']['host']} frames sent, {r['host_drops']} dropped, {r['host_bad']} refused as "
          f"unexpected; worker {r['sent']['worker']} sent, {r['worker_drops']} dropped or refused")
