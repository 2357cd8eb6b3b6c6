"""The OpenAI-compatible HTTP API against a loopback cluster of the tiny model.

The host (HostServer, the API, the metrics) runs on a uvloop loop in a thread of the test process;
its 3 workers are ``python -m helix_async worker`` processes (torch, seeded dummy weights).  The
expected text of every request comes from the host's own Python client (``HostServer.complete``)
on the same token ids, decoded by the shipped tokenizer: the official ``openai`` client, sync and
async, streaming and not, must see exactly that text.  Also: OpenAI's error shapes and statuses,
stop strings, ``/metrics`` counters that move, a disconnecting client freeing its KV on every
worker, and 429 with Retry-After when the admission queue is full while every accepted request
still completes.

Every process started is killed at the end; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from polling import wait_until
from procwait import wait_for_file

pytest.importorskip("torch")
pytest.importorskip("aiohttp")
openai = pytest.importorskip("openai")

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.frontend.metrics import Metrics  # noqa: E402
from helix_async.frontend.openai_api import OpenAIServer  # noqa: E402
from helix_async.frontend.tokenizer import load_tokenizer  # noqa: E402
from helix_async.model import get_model, load_profiles  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.roles import node_limits  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.settings import KV_ONLINE, HostSettings, KVExpectation  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STAGES = {0: (0, 3), 1: (3, 6), 2: (6, 8)}


class Cluster:
    """A host with the HTTP API on a loop thread, and its worker processes."""

    def __init__(self, executor: str, *, kv: KVExpectation = KV_ONLINE, admission_capacity: int = 64) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", STAGES)
        self.tok = load_tokenizer("tiny-llama")
        self.server: HostServer | None = None
        self.api: OpenAIServer | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self.url = self.call(self._start(kv, admission_capacity))
            env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
            for i in STAGES:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "helix_async", "worker", "--insecure", "--connect", self.address, "--node-id", str(i),
                     "--executor", executor], cwd=ROOT, env=env))
            assert self.server is not None
            self.call(self.server.wait_ready(), timeout=180)
        except BaseException:
            self.close()
            raise

    async def _start(self, kv: KVExpectation, capacity: int) -> str:
        self.server = HostServer(self.placement, settings=HostSettings(kv=kv, admission_capacity=capacity))
        self.address = await self.server.start()
        self.api = OpenAIServer(self.server, "tiny-llama", self.tok, max_model_len=2048, metrics=Metrics(self.server))
        return await self.api.start("127.0.0.1", 0)

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop).result(timeout + 5)

    def complete(self, ids: list[int], n: int) -> list[int]:
        """The host's Python client (greedy)."""
        assert self.server is not None
        return list(self.call(self.server.complete(ids, n, temperature=0.0)))

    def metric(self, name: str, **labels: str) -> float:
        text = _get(self.url + "/metrics")[1]
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == want or (labels and key.startswith(name + "{") and _labels(key) == labels):
                return float(value)
        return 0.0

    def close(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.shutdown("test done", grace=0.5)
            if self.api is not None:
                await self.api.stop()

        try:
            self.call(stop(), timeout=30)
        finally:
            for p in self.procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def _labels(key: str) -> dict[str, str]:
    inner = key[key.index("{") + 1 : -1]
    return dict((kv.split("=", 1)[0], kv.split("=", 1)[1].strip('"')) for kv in inner.split(",") if kv)


def _get(url: str) -> tuple[int, str]:
    u = urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        c.request("GET", u.path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def _post(url: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    u = urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c.request("POST", u.path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read()), dict(r.getheaders())
    finally:
        c.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster("torch")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Any:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


PROMPTS = ["Hello, the planner places layers", "a", "Max flow over the cluster graph gives each link its share. " * 3]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sync_completion_text_equals_the_python_clients_tokens(cluster: Cluster, client: Any, prompt: str) -> None:
    ids = cluster.tok.encode(prompt)
    expected = cluster.tok.decode(cluster.complete(ids, 12))
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    assert r.object == "text_completion" and r.model == "tiny-llama" and r.id.startswith("cmpl-")


def test_token_id_prompt_and_async_streaming(cluster: Cluster) -> None:
    ids = [1, 17, 300, 5, 2047, 64]
    expected = cluster.tok.decode(cluster.complete(ids, 16))

    async def go() -> tuple[list[Any], Any]:
        ac = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            stream = await ac.completions.create(model="tiny-llama", prompt=ids, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            plain = await ac.completions.create(model="tiny-llama", prompt=ids, max_tokens=16, temperature=0,
                                                extra_body={"ignore_eos": True})
            return chunks, plain
        finally:
            await ac.close()

    chunks, plain = asyncio.run(go())
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected == plain.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_sync_and_streaming(cluster: Cluster, client: Any) -> None:
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Where do layers go?"}]
    ids = cluster.tok.encode_chat(messages)
    expected = cluster.tok.decode(cluster.complete(ids, 10))
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_text_before_it(cluster: Cluster, client: Any) -> None:
    prompt = PROMPTS[0]
    full = cluster.tok.decode(cluster.complete(cluster.tok.encode(prompt), 24))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    want = full[: full.index(stop)]
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True,
                                  extra_body={"ignore_eos": True})
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(cluster: Cluster, client: Any) -> None:
    kw = dict(model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_logprobs_n_and_vllms_sampling_fields_through_the_cluster(cluster: Cluster, client: Any) -> None:
    messages = [{"role": "user", "content": "Where do layers go?"}]
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and r.usage.completion_tokens == 6
    for e in content:  # greedy takes the most likely token: it heads its own top list
        assert len(e.top_logprobs) == 3 and (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert e.logprob <= 0 and [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs),
                                                                                reverse=True)
    kw = dict(model="tiny-llama", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=3,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.2,
                          "frequency_penalty": 0.5, "presence_penalty": 0.5})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 24
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: repeats
    assert len({c.text for c in a.choices}) > 1  # seeds seed, seed+1, seed+2: independent draws


def test_errors_have_openais_shape_and_status(cluster: Cluster, client: Any) -> None:
    status, body, _ = _post(cluster.url + "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be at least 1"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048") as e:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=5000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=r"'n' must be in \[1, 128\]"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=2, n=0)
    status, body, _ = _post(cluster.url + "/v1/completions", {"prompt": [5, 99999], "max_tokens": 2})
    assert status == 400 and "token ids must be in [0, 2048)" in body["error"]["message"]
    status, body, _ = _post(cluster.url + "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body, _ = _post(cluster.url + "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": "hot"})
    assert status == 400 and "'temperature' must be" in body["error"]["message"]
    # the server goes on serving after all that
    assert client.completions.create(model="tiny-llama", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_models_and_health(cluster: Cluster, client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    status, text = _get(cluster.url + "/health")
    assert status == 200 and json.loads(text)["status"] == "ok"


def test_metrics_counters_move(cluster: Cluster, client: Any) -> None:
    before = (cluster.metric("helix_requests_total", outcome="length"), cluster.metric("helix_generation_tokens_total"),
              cluster.metric("helix_time_to_first_token_seconds_count"))
    client.completions.create(model="tiny-llama", prompt="metrics", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    after = (cluster.metric("helix_requests_total", outcome="length"), cluster.metric("helix_generation_tokens_total"),
             cluster.metric("helix_time_to_first_token_seconds_count"))
    assert after[0] == before[0] + 1 and after[1] == before[1] + 5 and after[2] == before[2] + 1
    for node in STAGES:
        assert cluster.metric("helix_worker_up", node=str(node)) == 1.0
    # (workers report once a second)
    wait_until(lambda: cluster.metric("helix_link_bytes_total", src="0", dst="1") > 0, what="link bytes reported")
    assert cluster.metric("helix_link_flow_share", src="0", dst="1", kind="plan") == 1.0


def test_a_disconnecting_client_frees_its_kv_everywhere(cluster: Cluster) -> None:
    assert cluster.server is not None
    aborts = cluster.metric("helix_requests_total", outcome="abort")
    u = urlparse(cluster.url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
              body=json.dumps({"prompt": PROMPTS[2], "max_tokens": 1500, "temperature": 0, "stream": True,
                               "ignore_eos": True}).encode())
    r = c.getresponse()
    assert r.status == 200
    got = 0
    while got < 5:
        line = r.fp.readline()
        got += line.startswith(b"data: ")
    # the workers hold its KV now
    wait_until(lambda: max(cluster.metric("helix_kv_cache_usage_perc", node=str(n)) for n in STAGES) > 0,
               what="KV in use reported")
    c.sock.close()  # the client goes away mid-stream
    c.close()
    def freed() -> bool:
        kv = [cluster.metric("helix_kv_cache_usage_perc", node=str(n)) for n in STAGES]
        return cluster.server is not None and cluster.server.host is not None and cluster.server.host.active == 0 \
            and max(kv) == 0

    wait_until(freed, what="the request gone and its KV freed")
    assert cluster.server.host is not None and cluster.server.host.active == 0
    assert max(cluster.metric("helix_kv_cache_usage_perc", node=str(n)) for n in STAGES) == 0
    assert cluster.metric("helix_requests_total", outcome="abort") == aborts + 1
    assert cluster.server.host.stats.cancelled >= 1


def test_overload_says_429_and_loses_no_accepted_request() -> None:
    # KV expectation sized so that one 200-token prompt fits and a second does not: the second
    # waits in the admission queue (capacity 1), a third is told 429
    n = 200
    profiles = load_profiles(get_model("tiny-llama"))
    fill = max(1.2 * n * (b - a) / node_limits(profiles, "CPU", b - a)[1] for a, b in STAGES.values())
    c = Cluster("null", kv=KVExpectation(fill, 0.0), admission_capacity=1)
    try:
        body = {"prompt": list(range(3, 3 + n)), "max_tokens": 1500, "ignore_eos": True, "temperature": 0}

        async def go() -> list[Any]:
            import aiohttp

            async with aiohttp.ClientSession() as s:
                async def one(delay: float) -> tuple[int, Any, str]:
                    await asyncio.sleep(delay)
                    async with s.post(c.url + "/v1/completions", json=body) as r:
                        return r.status, await r.json(), r.headers.get("Retry-After", "")

                return list(await asyncio.gather(one(0.0), one(0.3), one(0.6)))

        (s1, b1, _), (s2, b2, _), (s3, b3, retry) = asyncio.run(go())
        assert s3 == 429 and retry == "1" and b3["error"]["type"] == "rate_limit_error", (s3, b3)
        assert (s1, s2) == (200, 200), (b1, b2)
        assert b1["usage"]["completion_tokens"] == 1500 and b2["usage"]["completion_tokens"] == 1500
        assert c.metric("helix_requests_total", outcome="overloaded") == 1
    finally:
        c.close()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_serve_is_one_command_to_an_endpoint_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    import signal

    url_file = tmp_path / "url"
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    p = subprocess.Popen([sys.executable, "-m", "helix_async", "serve", "--model", "tiny-llama", "--workers", "2",
                          "--http", "127.0.0.1:0",
                          "--url-file", str(url_file), "--log-dir", str(tmp_path / "logs")],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(url_file, p, 180)
        url = url_file.read_text().strip()
        kids = _children(p.pid)
        assert len(kids) == 2
        status, body, _ = _post(url + "/v1/completions", {"prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "serving 'tiny-llama' on http://127.0.0.1:" in out
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{k}").exists() for k in kids)
        assert (tmp_path / "logs" / "plan.toml").is_file()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--model", "tiny-llama", "--http", "nonsense"], "--http: expected HOST:PORT"),
        (["serve", "--model", "tiny-llama", "--workers", "9"], "--workers: tiny-llama has 8 layers"),
        (["serve", "--model", "/nonexistent/dir"], "--model: '/nonexistent/dir': neither a known model"),
        (["serve", "--model", "tiny-llama", "--tokenizer", "/nonexistent/dir"], "no tokenizer.json"),
    ],
)
def test_serve_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    p = subprocess.run([sys.executable, "-m", "helix_async", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_host_http_port_in_use_exits_2(tmp_path: Path) -> None:
    import socket

    from helix_async.placement.flow import max_flow
    from helix_async.placement.io import write_placement

    pl = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", STAGES)
    plan = write_placement(pl, tmp_path / "plan.toml", flow=max_flow(pl))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
        p = subprocess.run([sys.executable, "-m", "helix_async", "host", "--insecure", "--plan", str(plan),
                            "--http", f"127.0.0.1:{port}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"--http: cannot listen on 127.0.0.1:{port}" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_bench_serve_measures_every_request(cluster: Cluster, tmp_path: Path) -> None:
    from helix_async.frontend.bench_serve import build_requests, run_bench, summarise

    trace = tmp_path / "trace.csv"
    trace.write_text("arrive_time_s,input_tokens,output_tokens\n0.0,8,4\n0.1,30,6\n0.2,5,1\n0.25,3000,5\n")
    reqs = build_requests(str(trace), 1.0, 1.0, seed=0)
    assert reqs == [(0.0, 8, 4), (0.1, 30, 6), (0.2, 5, 1), (0.25, 3000, 5)]
    results, span, facts = asyncio.run(run_bench(cluster.url, reqs, seed=0))
    assert facts["clipped_prompts"] == 1 and facts["max_model_len"] == 2048  # 3000 + 5 > 2048: shortened
    assert [r.ok for r in results] == [True] * 4 and [r.tokens for r in results] == [4, 6, 1, 5]
    assert all(r.ttft > 0 and r.latency >= r.ttft for r in results) and len(results[1].itl) <= 5
    s = summarise(results, span)
    assert s["completed"] == 4 and s["output_tokens"] == 16 and s["p50_ttft_s"] > 0
    bad, _, _ = asyncio.run(run_bench(cluster.url, reqs[:1], seed=0, model="no-such-model"))
    assert not bad[0].ok and bad[0].status == 404 and "does not exist" in bad[0].error
    # Poisson arrivals are seeded: the same seed, the same requests
    assert build_requests("sharegpt", 2.0, 10.0, seed=3) == build_requests("sharegpt", 2.0, 10.0, seed=3)
    assert build_requests("sharegpt", 2.0, 10.0, seed=3) != build_requests("sharegpt", 2.0, 10.0, seed=4)
