"""The serving runtime on loopback: worker processes (``python -m helix_async worker``) around a host.

* the oracle: a tiny LLaMA made by ``transformers`` (random init, ``save_pretrained``) with the
  shape of our ``tiny-llama`` model, served by 3 torch worker processes loading their layers from
  that checkpoint, gives exactly ``generate``'s greedy tokens for prompts of 1-64 tokens, with
  several requests in flight at once;
* start order: workers may start before the host;
* a worker killed mid-run: its requests move to a live route and give the fault-free tokens;
* bad input (plan, executor, port in use, a model that does not fit): exit 2 with one line.

Every process started is killed at the end; every wait is for a state (a process's line or exit,
a node ready, a token come), bounded only to fail instead of hanging.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_oracle import hf_greedy, make_checkpoint  # noqa: E402
from polling import read_line, wait_until_async  # noqa: E402
from procwait import wait_for_file  # noqa: E402

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.errors import RequestFailed  # noqa: E402
from helix_async.model import get_model  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.placement.flow import max_flow  # noqa: E402
from helix_async.placement.io import write_placement  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(coro: Any, timeout: float = 600.0) -> Any:
    import uvloop

    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(main())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    spec = get_model("tiny-llama")  # the plan's model: the checkpoint has its shape
    d = tmp_path_factory.mktemp("tiny-llama-ckpt")
    model = make_checkpoint(d, 99, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                            num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads)
    return d, model


def plan_file(tmp: Path, layers: dict[int, tuple[int, int]]) -> tuple[Path, Placement]:
    p = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", layers)
    f = tmp / "plan.toml"
    write_placement(p, f, flow=max_flow(p))
    return f, p


class Procs:
    """Processes started by a test, all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
        if args[:1] in (("host",), ("worker",)):  # plaintext links take an explicit --insecure, even on loopback
            args = (args[0], "--insecure", *args[1:])
        p = subprocess.Popen([sys.executable, "-m", "helix_async", *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def worker(self, address: str, *extra: str) -> subprocess.Popen[str]:
        return self.start("worker", "--connect", address, *extra)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    try:
        yield ps
    finally:
        ps.close()


def test_three_worker_processes_give_hf_greedy_tokens(tmp_path: Path, checkpoint: tuple[Path, Any], procs: Procs) -> None:
    ckpt, model = checkpoint
    _, placement = plan_file(tmp_path, {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    lengths = [1, 2, 7, 16, 31, 64]
    prompts = [[(37 * i + 11 * j + 5) % 2048 for j in range(n)] for i, n in enumerate(lengths)]
    outs = [5 + 3 * (i % 3) for i in range(len(prompts))]

    async def main() -> tuple[list[list[int]], list[int]]:
        server = HostServer(placement)
        address = await server.start()
        workers = [procs.worker(address, "--checkpoint", str(ckpt)) for _ in range(3)]
        await server.wait_ready(180)
        decoding = [asyncio.Event() for _ in prompts]

        async def one(i: int) -> list[int]:
            # staggered: each prompt starts once the request before it has its first token, so
            # prompts meet other requests' decodes
            if i:
                await decoding[i - 1].wait()
            out: list[int] = []
            try:
                async for t in server.generate(prompts[i], outs[i]):
                    out.append(t)
                    decoding[i].set()
            finally:
                decoding[i].set()
            return out

        got = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        await server.shutdown("test done")
        codes = []
        for w in workers:
            codes.append(await asyncio.get_running_loop().run_in_executor(None, w.wait, 30))
        return list(got), codes

    got, codes = run(main())
    for i, p in enumerate(prompts):
        assert got[i] == hf_greedy(model, p, outs[i]), f"prompt of {len(p)} tokens"
    assert codes == [0, 0, 0]


def test_workers_may_start_before_the_host(tmp_path: Path, procs: Procs) -> None:
    plan, _ = plan_file(tmp_path, {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    # a plain socket holds the host's port until all three workers have dialled it: then they are
    # running and trying to reach a host that is not there yet (it is closed before the host binds)
    with socket.socket() as stand_in:
        # (SO_REUSEADDR here too: the host may bind the port while these connections linger)
        stand_in.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stand_in.bind(("127.0.0.1", 0))
        stand_in.listen()
        stand_in.settimeout(120)
        address = f"tcp://127.0.0.1:{stand_in.getsockname()[1]}"
        workers = [procs.worker(address, "--node-id", str(i)) for i in (2, 0, 1)]
        dialled = [stand_in.accept()[0] for _ in workers]
        for conn in dialled:
            conn.close()
    assert all(w.poll() is None for w in workers)
    trace = tmp_path / "trace.csv"
    trace.write_text("arrive_time_s,input_tokens,output_tokens\n0.0,4,3\n0.01,9,2\n")
    host = procs.start("host", "--plan", str(plan), "--listen", address, "--trace", str(trace))
    out, err = host.communicate(timeout=300)
    assert host.returncode == 0, err
    assert "served 2 requests on 3 workers" in out.splitlines()[-1]
    assert [w.wait(timeout=30) for w in workers] == [0, 0, 0]


def test_a_killed_workers_requests_migrate_and_give_the_fault_free_tokens(tmp_path: Path, procs: Procs) -> None:
    # node 0 holds the whole model; nodes 1 and 2 make a second pipeline; node 2 is killed mid-run:
    # its requests move to node 0 (their context re-run there) and finish with the tokens a
    # fault-free run gives
    _, placement = plan_file(tmp_path, {0: (0, 8), 1: (0, 4), 2: (4, 8)})
    prompts = [[1 + i, 2, 3, 5 + i % 4] for i in range(16)]

    async def main() -> tuple[list[list[int] | str], list[list[int]], Any, Any]:
        server = HostServer(placement)
        address = await server.start()
        ws = {i: procs.worker(address, "--node-id", str(i)) for i in range(3)}
        await server.wait_ready(180)
        results: list[list[int] | str] = [[] for _ in prompts]
        decoding = [asyncio.Event() for _ in prompts]

        async def one(i: int) -> None:
            if i:  # staggered: each starts once the one before has its first token
                await decoding[i - 1].wait()
            out: list[int] = []
            try:
                async for t in server.generate(prompts[i], 40):
                    out.append(t)
                    decoding[i].set()
                results[i] = out
            except RequestFailed as e:
                results[i] = f"failed {e}"
            finally:
                decoding[i].set()

        def decoding_on_node_2() -> bool:
            host = server.host
            assert host is not None
            return any(q.route is not None and any(stage[0] == 2 for stage in q.route) and q.iterations >= 1
                       and q.decodes_left >= 2 for q in host.active_queries())

        async def killer() -> None:
            # mid-run: a request decodes through node 2 (it can only finish by moving)
            await wait_until_async(decoding_on_node_2, what="a request decoding through node 2")
            ws[2].send_signal(signal.SIGKILL)

        await asyncio.gather(killer(), *(one(i) for i in range(16)))
        # the reference: the same prompts, one at a time, on what is left (node 0)
        reference = [await server.complete(p, 40) for p in prompts]
        host = server.host
        assert host is not None
        # the counts of the run, before the shutdown (workers told to stop go quiet then)
        counts = copy.copy(server.counters), copy.copy(host.stats)
        await server.shutdown("test done", grace=1.0)
        return results, reference, *counts

    results, reference, counters, stats = run(main())
    assert counters.workers_lost == 1 and counters.failed_on_lost_worker == 0
    assert counters.migrated > 0 and stats.migrated == counters.migrated and stats.failed == 0
    assert results == reference
def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, procs: Procs) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("this is not = a plan\n")
    p = procs.start("host", "--plan", str(bad))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1 and "bad.toml" in err
    p = procs.start("worker", "--connect", "tcp://127.0.0.1:1", "--executor", "vllm-next")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "unknown executor 'vllm-next'" in err and len(err.strip().splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        plan, _ = plan_file(tmp_path, {0: (0, 3), 1: (3, 6), 2: (6, 8)})
        p = procs.start("host", "--plan", str(plan), "--listen", f"tcp://127.0.0.1:{port}")
        out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "cannot bind" in err and len(err.strip().splitlines()) == 1

    # a worker whose layers do not fit its device: refused before it serves, the host not ready
    async def main() -> tuple[int, str, bool]:
        _, placement = plan_file(tmp_path, {0: (0, 3), 1: (3, 6), 2: (6, 8)})
        server = HostServer(placement)
        address = await server.start()
        small = procs.worker(address, "--node-id", "0", "--memory-bytes", "1000")
        others = [procs.worker(address, "--node-id", str(i)) for i in (1, 2)]
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, small.wait, 120)
        _, err = small.communicate()
        # the other two have loaded their layers and said so: only the refused one is missing
        await wait_until_async(lambda: all(server.nodes[i].ready for i in (1, 2)), what="nodes 1 and 2 ready")
        ready = server.ready
        await server.shutdown("test done", grace=0.0)
        for o in others:
            await loop.run_in_executor(None, o.wait, 30)
        return code, err, ready

    code, err, ready = run(main())
    assert code == 2 and "need" in err and "the device holds 1000" in err
    assert len(err.strip().splitlines()) == 1
    assert not ready


def test_sigterm_stops_the_cluster_cleanly(tmp_path: Path, procs: Procs) -> None:
    """SIGTERM to a busy host: in-flight requests finish or are cancelled, the workers are told to
    stop, the logs are written, and every process exits 0."""
    pytest.importorskip("aiohttp")  # the HTTP API (the test's own request goes through it)
    plan, _ = plan_file(tmp_path, {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    addr = tmp_path / "addr"
    url_file = tmp_path / "url"
    logs = tmp_path / "logs"
    host = procs.start("host", "--plan", str(plan), "--address-file", str(addr), "--mode", "offline",
                       "--initial", "3", "--duration", "600", "--lengths", "alpaca", "--log-dir", str(logs),
                       "--grace", "0.5", "--http", "127.0.0.1:0", "--url-file", str(url_file))
    workers = [procs.worker(wait_for_file(addr, host, 120)) for _ in range(3)]
    url = wait_for_file(url_file, host, 120)
    assert "listening" in read_line(host)
    assert "OpenAI-compatible API" in read_line(host)
    assert "ready" in read_line(host)  # all 3 workers ready: the offline requests are flowing
    # requests are flowing: one of our own is served beside them (6 tokens: > 10 events logged)
    body = json.dumps({"model": "tiny-llama", "prompt": "hello", "max_tokens": 6, "ignore_eos": True}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        assert json.load(r)["usage"]["completion_tokens"] == 6
    host.send_signal(signal.SIGTERM)
    out, err = host.communicate(timeout=120)
    assert host.returncode == 0, err
    assert "stopping" in out and "served" in out.splitlines()[-1]
    assert [w.wait(timeout=60) for w in workers] == [0, 0, 0]
    events = (logs / "events.txt").read_text().splitlines()
    assert len(events) > 10 and (logs / "requests.jsonl").exists()
