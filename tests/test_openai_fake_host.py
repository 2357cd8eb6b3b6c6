"""The OpenAI-compatible HTTP API in front of an in-memory host: no torch, no worker process.

:class:`FakeHost` implements the serving-host protocol (``helix_async.frontend.host_protocol``):
its tokens are a fixed script (ids of a known text in the shipped tiny tokenizer), its counters a
fixed snapshot, and a request's first prompt id picks a behaviour (fail after two tokens, refuse
as overloaded, hold until cancelled, ...).  The API runs on a real loopback socket
(``OpenAIServer.start("127.0.0.1", 0)``) inside ``asyncio.run`` and is spoken to with aiohttp's
client, so what is checked is what a client sees: bodies, statuses, server-sent events, headers.
The end-to-end tests against real workers are in ``test_openai_api.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("tokenizers")

from helix_async.errors import RequestFailed  # noqa: E402
from helix_async.frontend.host_protocol import HostSnapshot, LinkReport, NodeReport, ServingHost  # noqa: E402
from helix_async.frontend.metrics import Metrics  # noqa: E402
from helix_async.frontend.openai_api import HttpLimits, OpenAIServer  # noqa: E402
from helix_async.frontend.tokenizer import TextTokenizer, load_tokenizer  # noqa: E402
from helix_async.sampling import SampledToken, SamplingParams  # noqa: E402

TOK = load_tokenizer("tiny-llama")
TEXT = " Max flow gives each link its share of the traffic, and the planner places layers."
SCRIPT = [t for t in TOK.encode(TEXT) if t != TOK.bos_id]
MODEL = "tiny-llama"

# a request's first prompt id picks what the fake host does with it
FAIL = 1999  # two tokens, then the cluster fails it (a lost worker)
OVERLOADED = 1998  # refused at submission: the admission queue filled up after the server's check
UNAVAILABLE = 1997  # refused at submission: the host started shutting down
REFUSED = 1996  # the host's own check says no (ValueError)
BROKEN = 1995  # the host raises something it should not (a bug)
HOLD = 1994  # two tokens, then nothing until the request is cancelled
EOS = 1993  # three tokens, then the end-of-text token
VARY = 1992  # the script starts at the sampling seed (mod its length): seeds tell choices apart
ECHO = 1990  # the tokens are the rest of the prompt, in turn
EOS_ID = 2  # the tiny tokenizer's end of text


def fake_logprob(i: int) -> float:
    """The log-probability the fake host reports for its i-th token."""
    return -0.25 * (i + 1)


def fake_top(i: int, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely tokens the fake host reports at its i-th step (best first)."""
    return tuple((SCRIPT[(i + j + 1) % len(SCRIPT)], -0.1 * (j + 1)) for j in range(k))


class FakeHost:
    """An in-memory serving host (see the module doc).  ``closed`` lists the requests whose token
    stream was closed (served, failed or cancelled), in order; ``produced`` the tokens each got."""

    def __init__(self) -> None:
        self.t = 0.0
        self.is_ready = True
        self.is_closing = False
        self.stopped = ""
        self.full = False
        self.requests: list[dict[str, Any]] = []
        self.priorities: list[int] = []  # each request's priority, in order
        self.produced: dict[int, int] = {}
        self.closed: list[int] = []

    @property
    def vocab_size(self) -> int:
        return 2048

    @property
    def workers(self) -> int:
        return 3

    @property
    def ready(self) -> bool:
        return self.is_ready

    @property
    def closing(self) -> bool:
        return self.is_closing

    @property
    def admission_stopped(self) -> str:
        return self.stopped

    @property
    def overloaded(self) -> bool:
        return self.full

    @property
    def admission_capacity(self) -> int:
        return 7

    def now(self) -> float:
        return self.t

    async def generate(self, prompt: Sequence[int], max_tokens: int, *, sampling: SamplingParams | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       seed: int | None = None, priority: int = 0) -> AsyncGenerator[int | SampledToken, None]:
        if sampling is not None and (temperature, top_p, seed) != (None, None, None):
            raise ValueError("give sampling or temperature/top_p/seed, not both")
        sp = sampling if sampling is not None else SamplingParams(
            temperature=temperature or 0.0, top_p=1.0 if top_p is None else top_p, seed=seed or 0)
        rid = len(self.requests)
        self.requests.append({"prompt": list(prompt), "max_tokens": max_tokens, "sampling": sp})
        self.priorities.append(priority)
        self.produced[rid] = 0
        kind = prompt[0]
        start = sp.seed % len(SCRIPT) if kind == VARY else 0
        script = list(prompt[1:]) if kind == ECHO and len(prompt) > 1 else SCRIPT
        try:
            if kind == OVERLOADED:
                raise RequestFailed("rejected: the admission queue is full", "overloaded")
            if kind == UNAVAILABLE:
                raise RequestFailed("the host is not serving (shutting down)", "unavailable")
            if kind == REFUSED:
                raise ValueError("token ids must be in [0, 2048)")
            if kind == BROKEN:
                raise KeyError("a bug")
            for i in range(max_tokens):
                if kind == FAIL and i == 2:
                    raise RequestFailed("worker 1 is lost", "failed")
                if kind == HOLD and i == 2:
                    await asyncio.Event().wait()  # until cancelled
                tok = script[(start + i) % len(script)]
                # an end-of-text token at the fourth step, unless min_tokens bans it (as a sampler does)
                if kind == EOS and i == 3 and not (i < sp.min_tokens and EOS_ID in sp.stop_token_ids):
                    tok = EOS_ID
                await asyncio.sleep(0)  # other requests' tokens interleave with this one's
                self.t += 0.01
                self.produced[rid] += 1
                if sp.logprobs is None:
                    yield tok
                else:  # a made-up distribution with a known rule (see fake_logprob, fake_top)
                    yield SampledToken(tok, fake_logprob(i), fake_top(i, sp.logprobs))
        finally:
            self.closed.append(rid)

    def snapshot(self) -> HostSnapshot:
        return HostSnapshot(
            waiting=2, active=5, dropped=3, bytes_out={"0": 1000},
            nodes=(NodeReport(0, True, report_age=0.5, kv_use=0.25, queued=4, dropped=1, bytes_out={"1": 300, "2": 100},
                              batches=12, busy_s=0.75),
                   NodeReport(1, False)),
            links=(LinkReport("0", "1", rtt=0.002, retries=5, degraded=True),),
            plan_flows={("host", "0"): 10.0, ("0", "1"): 6.0, ("0", "2"): 2.0},
            admission_stopped=True, workers_lost=1, workers_rejoined=2, workers_drained=3, requests_migrated=4,
            requests_unrecovered=5,
        )


def _typed(host: FakeHost) -> ServingHost:
    return host  # mypy checks here that FakeHost has the protocol


Client = Any  # an aiohttp.ClientSession bound to the API's URL


def serve(body: Callable[[FakeHost, Client, str], Awaitable[Any]], *, tokenizer: TextTokenizer | None = TOK,
          host: FakeHost | None = None, api_key: str | None = None, limits: HttpLimits | None = None) -> Any:
    """Run ``body(host, session, url)`` against an API on a free loopback port; returns its result."""
    fake = host if host is not None else FakeHost()

    async def main() -> Any:
        api = OpenAIServer(_typed(fake), MODEL, tokenizer, max_model_len=256, seed=5, metrics=Metrics(fake),
                           api_key=api_key, limits=limits)
        url = await api.start("127.0.0.1", 0)
        try:
            # the timeout turns a hang into a failure; nothing here measures speed
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                return await body(fake, session, url)
        finally:
            await api.stop()

    return asyncio.run(main())


async def post(session: Client, url: str, body: Any) -> tuple[int, Any, Any]:
    """(status, JSON body, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(), r.headers


async def events(session: Client, url: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    """(status, the server-sent events' data: decoded JSON, or the string ``[DONE]``)."""
    async with session.post(url, json=body) as r:
        if r.status != 200:
            return r.status, [await r.json()]
        assert r.headers["Content-Type"].startswith("text/event-stream")
        out: list[Any] = []
        async for raw in r.content:
            line = raw.strip()
            if line:
                assert line.startswith(b"data: "), line
                data = line[6:]
                out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
        return r.status, out


async def wait_for(cond: Callable[[], bool], what: str) -> None:
    """Let the server's loop run until ``cond()`` holds (bounded: a hang fails the test)."""
    for _ in range(20_000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


class Scrape:
    """One ``/metrics`` body: ``m["name"]`` or ``m["name", {"label": "value"}]`` (0 when absent)."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                name, _, labels = key.partition("{")
                pairs = (kv.split("=", 1) for kv in labels.rstrip("}").split(",") if kv)
                self.values[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)

    def __getitem__(self, key: str | tuple[str, dict[str, str]]) -> float:
        name, labels = (key, {}) if isinstance(key, str) else key
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def __contains__(self, key: tuple[str, dict[str, str]]) -> bool:
        return (key[0], frozenset(key[1].items())) in self.values


async def metrics(session: Client, url: str) -> Scrape:
    async with session.get(url + "/metrics") as r:
        assert r.status == 200
        return Scrape(await r.text())


def expected(n: int) -> str:
    return TOK.decode([SCRIPT[i % len(SCRIPT)] for i in range(n)])


# ---- completions and chat ------------------------------------------------------------------------


def test_completion_text_usage_and_sampling_reach_the_host() -> None:
    prompt = "The planner"

    async def body(host: FakeHost, s: Client, url: str) -> None:
        status, r, _ = await post(s, url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 9,
                                                               "temperature": 0.5, "top_p": 0.9, "seed": 42})
        assert status == 200, r
        ids = TOK.encode(prompt)
        assert r["object"] == "text_completion" and r["model"] == MODEL and r["id"].startswith("cmpl-")
        assert r["choices"][0]["text"] == expected(9) and r["choices"][0]["finish_reason"] == "length"
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 9, "total_tokens": len(ids) + 9}
        assert host.requests == [{"prompt": ids, "max_tokens": 9, "sampling": SamplingParams(
            temperature=0.5, top_p=0.9, seed=42, stop_token_ids=(EOS_ID,))}]
        assert host.closed == [0]

    serve(body)


def test_completion_ends_at_end_of_text_unless_ignore_eos() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        _, r, _ = await post(s, url + "/v1/completions", {"prompt": [EOS, 5], "max_tokens": 8})
        assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == expected(3)
        _, r, _ = await post(s, url + "/v1/completions", {"prompt": [EOS, 5], "max_tokens": 8, "ignore_eos": True})
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 8

    serve(body)


def test_a_stop_string_ends_the_text_and_the_request_on_the_host() -> None:
    full = expected(len(SCRIPT))
    stop = "each"
    assert stop in full

    async def body(host: FakeHost, s: Client, url: str) -> None:
        _, r, _ = await post(s, url + "/v1/completions", {"prompt": "x", "max_tokens": 200, "stop": [stop]})
        assert r["choices"][0]["text"] == full[: full.index(stop)] and r["choices"][0]["finish_reason"] == "stop"
        assert host.closed == [0] and host.produced[0] < 200  # the host stopped making tokens

    serve(body)


def test_completion_stream_is_server_sent_events_ending_in_done() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        status, ev = await events(s, url + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 12, "stream": True,
                                                               "stream_options": {"include_usage": True}})
        assert status == 200 and ev[-1] == "[DONE]"
        chunks = ev[:-1]
        assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == expected(12)
        finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finals == ["length"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
        assert chunks[-1]["usage"]["prompt_tokens"] == 3
        assert host.closed == [0]

    serve(body)


def test_chat_completion_plain_and_streamed() -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    flat = [messages[0], {"role": "user", "content": "Hi"}]

    async def body(host: FakeHost, s: Client, url: str) -> None:
        status, r, _ = await post(s, url + "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                                    "max_completion_tokens": 6})
        assert status == 200, r
        assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
        assert r["choices"][0]["message"] == {"role": "assistant", "content": expected(6)}
        assert host.requests[0]["prompt"] == TOK.encode_chat(flat)
        assert r["usage"]["prompt_tokens"] == len(TOK.encode_chat(flat))
        status, ev = await events(s, url + "/v1/chat/completions", {"messages": flat, "max_tokens": 6, "stream": True})
        assert status == 200 and ev[-1] == "[DONE]"
        chunks = ev[:-1]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected(6)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)

    serve(body)


def test_without_a_tokenizer_prompts_are_token_ids_and_text_is_ids() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        _, r, _ = await post(s, url + "/v1/completions", {"prompt": [5, 6], "max_tokens": 3})
        assert r["choices"][0]["text"] == "".join(f" {t}" for t in SCRIPT[:3])
        status, r, _ = await post(s, url + "/v1/completions", {"prompt": "text", "max_tokens": 3})
        assert status == 400 and r["error"]["param"] == "prompt" and "no tokenizer" in r["error"]["message"]
        status, r, _ = await post(s, url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 400 and r["error"]["param"] == "messages"

    serve(body, tokenizer=None)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "request_body", "status", "param", "message"),
    [
        ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "'max_tokens' must be at least 1"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "'max_tokens' must be int"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 300}, 400, "max_tokens", "maximum context length is 256"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "'temperature' must be"),
        ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "in [0, 2]"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "'top_p' must be in (0, 1]"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "'n' must be in [1, 128]"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "'stream' must be bool"),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop", "'stop' must be"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "'logprobs' must be an integer in [0, 20]"),
        ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "'echo' is not supported"),
        ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt", "token ids must be in [0, 2048)"),
        ("/v1/completions", {"prompt": []}, 400, "prompt", "the prompt is empty"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt", "'prompt' must be"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "only one prompt"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "'messages' must be a non-empty list"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages", "messages[0] must be an object"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages", "messages[0].content"),
        # what JSON holds but Python, the codec or the sampler cannot
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None, "not valid JSON"),
        ("/v1/completions", {"prompt": "x", "temperature": 10**400}, 400, "temperature", "'temperature' must be"),
        ("/v1/completions", b'{"prompt": "x", "top_p": NaN}', 400, "top_p", "'top_p' must be in (0, 1]"),
        ("/v1/completions", b'{"prompt": "x", "presence_penalty": -1e400}', 400, "presence_penalty", "in [-2, 2]"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e-300}, 400, "repetition_penalty", "in [0.01, 100]"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -(10**300)}, 400, "max_tokens", "must be at least 1"),
        ("/v1/completions", {"prompt": "x", "n": 2**64}, 400, "n", "'n' must be in [1, 128]"),
        ("/v1/completions", {"prompt": [5, 2**64]}, 400, "prompt", "token ids must be in [0, 2048)"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [2**32]}, 400, "stop_token_ids", "token ids in [0, 2048)"),
        ("/v1/completions", {"prompt": "x", "priority": 2**70}, 400, "priority", "'priority' must be an integer in"),
        ("/v1/completions", {"prompt": "x", "priority": "high"}, 400, "priority", "'priority' must be int"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "priority": True}, 400, "priority",
         "'priority' must be int, got a boolean"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999999999999999": 5}}, 400, "logit_bias", "not supported"),
        ("/v1/completions", b'{"prompt": "x", "seed": 1e400}', 400, "seed", "'seed' must be int"),
        # nesting, strings no tokenizer takes, sizes
        ("/v1/completions", b'{"prompt": "x", "user": ' + b"[" * 100 + b"]" * 100 + b"}", 400, None, "deeper than 64"),
        ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, "deeper than 64"),
        ("/v1/completions", {"prompt": "ok \ud800 then"}, 400, "prompt", "lone surrogate (U+D800 at character 3)"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, 400, "messages", "lone surrogate"),
        ("/v1/chat/completions", {"messages": [{"role": "\ud800", "content": "x"}]}, 400, "messages", "lone surrogate"),
        ("/v1/completions", {"prompt": "x", "stop": ["\udc80"]}, 400, "stop", "lone surrogate"),
        ("/v1/completions", {"prompt": "x", "stop": "s" * 5000}, 400, "stop", "at most 4096 characters"),
        ("/v1/completions", {"model": ["tiny-llama"], "prompt": "x"}, 400, "model", "'model' must be a string"),
        ("/v1/completions", {"prompt": [5] * 256}, 400, "prompt", "the prompt has 256 tokens"),
        # more bytes than 256 tokens of the tiny tokenizer cover: refused before tokenizing
        ("/v1/completions", {"prompt": "ab " * 6000}, 400, "prompt", "the prompt is 18000 bytes: at least"),
    ],
)
def test_bad_input_gets_openais_error_shape_naming_the_field(path: str, request_body: Any, status: int,
                                                             param: str | None, message: str) -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        got, r, _ = await post(s, url + path, request_body)
        assert got == status, r
        err = r["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert message in err["message"] and err["param"] == param
        assert err["type"] == "invalid_request_error"
        assert host.requests == []  # refused before the host saw it
        m = await metrics(s, url)
        assert m["helix_requests_total", {"outcome": "invalid"}] == 1
        # and the server goes on serving
        ok, r, _ = await post(s, url + "/v1/completions", {"prompt": [5], "max_tokens": 2})
        assert ok == 200 and r["usage"]["completion_tokens"] == 2

    serve(body)


@pytest.mark.parametrize(("content_type", "status"), [
    ("application/json; charset=utf-8", 200), ("application/json; charset=UTF8", 200),
    ("application/json; charset=us-ascii", 200), ("text/plain", 200), ("application/json; charset=utf-16", 415),
    ("application/json; charset=klingon", 415), ("application/json; charset=rot13", 415),
    ("application/json; charset=punycode", 415), ("application/json; charset=", 200),
])
def test_a_body_is_utf8_whatever_charset_else_415(content_type: str, status: int) -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        async with s.post(url + "/v1/completions", data=b'{"prompt": [5], "max_tokens": 2}',
                          headers={"Content-Type": content_type}) as r:
            got = await r.json()
            assert r.status == status, got
            if status != 200:
                assert got["error"]["code"] == "unsupported_charset" and "UTF-8" in got["error"]["message"]
        async with s.post(url + "/v1/completions", data=b'{"prompt": "\xff"}') as r:  # not UTF-8
            assert r.status == 400 and "not valid UTF-8 (at byte 12)" in (await r.json())["error"]["message"]

    serve(body)


def test_values_the_sampler_cannot_take_are_brought_to_what_it_can() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        cases = [({"temperature": 1e-300}, "temperature", 0.01), ({"temperature": -0.0}, "temperature", 0.0),
                 ({"top_k": 10**40}, "top_k", 0), ({"top_k": 2048}, "top_k", 0), ({"top_k": 2047}, "top_k", 2047),
                 ({"seed": -1}, "seed", 2**63 - 1), ({"seed": 2**64 + 3}, "seed", 3),
                 ({"presence_penalty": -0.0}, "presence_penalty", 0.0)]
        for extra, name, want in cases:
            status, r, _ = await post(s, url + "/v1/completions", {"prompt": [5], "max_tokens": 2, **extra})
            assert status == 200, r
            got = getattr(host.requests[-1]["sampling"], name)
            assert got == want and str(got) == str(want), (extra, got)  # (str: -0.0 is not 0.0)

    serve(body)


def test_priority_reaches_the_host_for_every_choice() -> None:
    """vLLM's ``priority``: any int32, 0 when absent, given to the host with each choice."""
    async def body(host: FakeHost, s: Client, url: str) -> None:
        for extra, want in (({}, [0]), ({"priority": -7}, [-7]), ({"priority": 3, "n": 2}, [3, 3])):
            before = len(host.requests)
            status, r, _ = await post(s, url + "/v1/completions", {"prompt": [5], "max_tokens": 2, **extra})
            assert status == 200, r
            assert host.priorities[before:] == want
        status, r, _ = await post(s, url + "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": -1})
        assert status == 200 and host.priorities[-1] == -1, r

    serve(body)


def test_tool_call_arguments_json_cannot_parse_are_kept_as_text() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        for args in ("[" * 5000 + "]" * 5000, '{"a": 1' + "0" * 5000 + "}", '{"a": ' + "[" * 100 + "]" * 100 + "}",
                     "not json", '{"a": "\\ud800"}'):
            msgs = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "ok"}]
            status, r, _ = await post(s, url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
            assert status == 200, (args[:20], r)

    serve(body)


def test_the_api_key_is_required_on_v1_only() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        status, r, _ = await post(s, url + "/v1/completions", {"prompt": [5], "max_tokens": 2})
        assert status == 401 and r["error"]["type"] == "authentication_error" and r["error"]["code"] == "invalid_api_key"
        async with s.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 2},
                          headers={"Authorization": "Bearer sesame"}) as resp:
            assert resp.status == 200
        # near misses, and keys no str comparison of ASCII takes (compared as bytes): 401, never 500
        for wrong in ("Bearer sesam", "Bearer sesame2", "bearer sesame", "Bearer s\u00e9same", "Bearer \u2603"):
            async with s.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 2},
                              headers={"Authorization": wrong}) as resp:
                assert resp.status == 401, wrong
        async with s.get(url + "/health") as resp:
            assert resp.status == 200

    serve(body, api_key="sesame")


# ---- the door's limits ------------------------------------------------------------------------------


async def _raw(url: str, data: bytes, *, wait: float = 30.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (bounded by ``wait``
    seconds: a connection the server never closes fails the test)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


def test_connections_per_client_beyond_the_limit_get_429() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        h, port = url.removeprefix("http://").rsplit(":", 1)
        held = [await asyncio.open_connection(h, int(port)) for _ in range(3)]
        try:
            answer = await _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in head
            assert json.loads(rest)["error"]["code"] == "too_many_connections"
        finally:
            for _, w in held:
                w.close()
        # the held connections closed, a new one is served (polled: the server sees the closes soon)
        for _ in range(2000):
            answer = await _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.005)
        assert answer.startswith(b"HTTP/1.1 200")

    serve(body, limits=HttpLimits(per_client=3))


def test_idle_and_slow_connections_are_closed_and_a_slow_body_is_408() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        # no request at all, and headers that never end: closed with no answer
        assert await _raw(url, b"") == b""
        assert await _raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ") == b""
        # a body that never completes: 408 in OpenAI's shape, and the connection closed
        answer = await _raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"pro")
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and "did not arrive within 0.3 s" in json.loads(rest)["error"]["message"]
        # after a request, a kept-alive connection left idle is closed too
        answer = await _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")

    serve(body, limits=HttpLimits(keepalive_timeout=0.3, body_timeout=0.3, lingering_time=0.3))


def test_large_bodies_at_once_beyond_the_budget_get_429_until_one_ends() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        big = json.dumps({"prompt": [5], "max_tokens": 2, "user": "u" * 80_000}).encode()
        h, port = url.removeprefix("http://").rsplit(":", 1)
        # one large body that is slow to come: it holds 80 kB of the 100 kB budget while it is read
        reader, writer = await asyncio.open_connection(h, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big[:1000])
        try:
            for _ in range(2000):  # until the slow one is being read (bounded)
                status, r, headers = await post(s, url + "/v1/completions", big)
                if status == 429:
                    break
                await asyncio.sleep(0.005)
            assert status == 429 and "too many large request bodies" in r["error"]["message"]
            assert headers["Retry-After"] == "1"
            status, r, _ = await post(s, url + "/v1/completions", {"prompt": [5], "max_tokens": 2})  # small: served
            assert status == 200
        finally:
            writer.close()
        for _ in range(2000):  # the slow one gone, its bytes are given back
            status, r, _ = await post(s, url + "/v1/completions", big)
            if status == 200:
                break
            await asyncio.sleep(0.005)
        assert status == 200 and r["choices"][0]["text"] == expected(2)

    serve(body, limits=HttpLimits(bodies_in_flight=100_000))


def test_sizes_beyond_the_limits_are_4xx() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        status, r, _ = await post(s, url + "/v1/completions", {"prompt": "x" * 3000})
        assert status == 413 and r["error"]["type"] == "invalid_request_error"
        async with s.post(url + "/v1/completions", json={"prompt": [5]}, headers={"X-Big": "y" * 300}) as resp:
            assert resp.status == 400  # aiohttp's own refusal of a header field over max_field_size
        async with s.post(url + "/v1/completions", data=b"{}", headers={"Content-Encoding": "gzip"}) as resp:
            assert resp.status == 415 and (await resp.json())["error"]["code"] == "unsupported_content_encoding"
        status, r, _ = await post(s, url + "/v1/completions", {"prompt": [5], "max_tokens": 2})
        assert status == 200

    serve(body, limits=HttpLimits(client_max_size=2000, max_field_size=200))


# ---- failures and overload ------------------------------------------------------------------------


def test_a_failing_request_fails_alone() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        ok = {"prompt": [5], "max_tokens": 20}
        bad = {"prompt": [FAIL], "max_tokens": 20}
        (s1, r1, _), (s2, r2, _), (s3, ev3), (s4, ev4) = await asyncio.gather(
            post(s, url + "/v1/completions", ok), post(s, url + "/v1/completions", bad),
            events(s, url + "/v1/completions", dict(bad, stream=True)), events(s, url + "/v1/completions", dict(ok, stream=True)))
        assert s1 == 200 and r1["choices"][0]["text"] == expected(20)
        assert s2 == 500 and r2["error"]["code"] == "request_failed" and "worker 1 is lost" in r2["error"]["message"]
        assert r2["error"]["type"] == "server_error"
        # a stream that had begun: its text so far, then the error as the last event before [DONE]
        assert s3 == 200 and ev3[-1] == "[DONE]" and "worker 1 is lost" in ev3[-2]["error"]["message"]
        assert "".join(c["choices"][0]["text"] for c in ev3[:-2]) == expected(2)
        assert s4 == 200 and "".join(c["choices"][0]["text"] for c in ev4[:-1] if c["choices"]) == expected(20)
        assert sorted(host.closed) == [0, 1, 2, 3]
        m = await metrics(s, url)
        assert m["helix_requests_total", {"outcome": "error"}] == 2 and m["helix_requests_total", {"outcome": "length"}] == 2

    serve(body)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_overload_and_unavailability_are_429_and_503_never_500(stream: bool) -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        async def ask(prompt: list[int]) -> tuple[int, dict[str, Any], Any]:
            req = {"prompt": prompt, "max_tokens": 4, "stream": stream}
            async with s.post(url + "/v1/completions", json=req) as r:
                return r.status, await r.json(), r.headers

        # the server's own check: the host says it is full, starting, stopped or closing
        host.full = True
        status, r, headers = await ask([5])
        assert status == 429 and headers["Retry-After"] == "1" and r["error"]["type"] == "rate_limit_error"
        assert "queue is full (7 requests waiting)" in r["error"]["message"]
        host.full = False
        for attr, value, message in (("stopped", "layers [4, 8) have no live worker", "admission is stopped"),
                                     ("is_ready", False, "starting"), ("is_closing", True, "shutting down")):
            old = getattr(host, attr)
            setattr(host, attr, value)
            status, r, headers = await ask([5])
            assert status == 503 and "Retry-After" in headers and message in r["error"]["message"], r
            assert r["error"]["type"] == "service_unavailable"
            setattr(host, attr, old)
        assert host.requests == []
        # the host refuses after the check passed (the queue filled meanwhile): the same answers
        status, r, headers = await ask([OVERLOADED])
        assert status == 429 and headers["Retry-After"] == "1" and "queue is full" in r["error"]["message"]
        status, r, headers = await ask([UNAVAILABLE])
        assert status == 503 and "Retry-After" in headers
        m = await metrics(s, url)
        assert m["helix_requests_total", {"outcome": "overloaded"}] == 2
        assert m["helix_requests_total", {"outcome": "unavailable"}] == 4
        assert host.closed == [0, 1]

    serve(body)


def test_the_hosts_refusal_is_400_and_its_bug_is_a_500_in_openais_shape() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        status, r, _ = await post(s, url + "/v1/completions", {"prompt": [REFUSED], "max_tokens": 2})
        assert status == 400 and "the host refused the request: token ids must be" in r["error"]["message"]
        status, r, _ = await post(s, url + "/v1/completions", {"prompt": [BROKEN], "max_tokens": 2})
        assert status == 500 and r["error"]["code"] == "internal_error" and "KeyError" in r["error"]["message"]
        status, r, _ = await post(s, url + "/v1/completions", {"prompt": [5], "max_tokens": 2})
        assert status == 200

    serve(body)


def test_a_client_that_disconnects_cancels_its_request_on_the_host() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        r = await s.post(url + "/v1/completions", json={"prompt": [HOLD], "max_tokens": 50, "stream": True})
        assert r.status == 200
        got = 0
        while got < 2:  # the two tokens it has before the host holds it
            line = (await r.content.readline()).strip()
            got += line.startswith(b"data: ")
        assert host.closed == []
        r.close()  # the client goes away mid-stream
        await wait_for(lambda: host.closed == [0], "the host's stream closed")
        assert host.produced[0] == 2
        for _ in range(1000):  # the handler's last steps after the host's stream closed
            m = await metrics(s, url)
            if m["helix_num_requests_running"] == 0:
                break
        assert m["helix_requests_total", {"outcome": "abort"}] == 1
        assert m["helix_num_requests_running"] == 0

    serve(body)


# ---- metrics, health, models ---------------------------------------------------------------------


def test_metrics_count_requests_and_show_the_hosts_snapshot() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        await post(s, url + "/v1/completions", {"prompt": [5, 6], "max_tokens": 5})
        m = await metrics(s, url)
        assert m["helix_requests_total", {"outcome": "length"}] == 1
        assert m["helix_generation_tokens_total"] == 5 and m["helix_prompt_tokens_total"] == 2
        assert m["helix_time_to_first_token_seconds_count"] == 1 and m["helix_time_per_output_token_seconds_count"] == 4
        assert m["helix_e2e_request_latency_seconds_count"] == 1
        # the host's snapshot, as it gave it
        assert m["helix_num_requests_waiting"] == 2 and m["helix_num_queries_active"] == 5
        assert m["helix_worker_up", {"node": "0"}] == 1 and m["helix_worker_up", {"node": "1"}] == 0
        assert m["helix_kv_cache_usage_perc", {"node": "0"}] == 0.25 and m["helix_node_queued_work", {"node": "0"}] == 4
        assert m["helix_worker_report_age_seconds", {"node": "0"}] == 0.5
        assert m["helix_node_batches_total", {"node": "0"}] == 12 and m["helix_node_busy_seconds_total", {"node": "0"}] == 0.75
        assert ("helix_kv_cache_usage_perc", {"node": "1"}) not in m  # it has not reported
        assert m["helix_dropped_frames_total", {"node": "host"}] == 3 and m["helix_dropped_frames_total", {"node": "0"}] == 1
        assert m["helix_link_bytes_total", {"dst": "0", "src": "host"}] == 1000
        assert m["helix_link_bytes_total", {"dst": "1", "src": "0"}] == 300
        assert m["helix_link_flow_share", {"dst": "1", "kind": "observed", "src": "0"}] == 0.75
        assert m["helix_link_flow_share", {"dst": "1", "kind": "plan", "src": "0"}] == 0.75
        assert m["helix_link_flow_share", {"dst": "0", "kind": "plan", "src": "host"}] == 1.0
        assert m["helix_link_rtt_seconds", {"dst": "1", "src": "0"}] == 0.002
        assert m["helix_link_retries_total", {"dst": "1", "src": "0"}] == 5 and m["helix_link_degraded", {"dst": "1", "src": "0"}] == 1
        assert m["helix_admission_stopped"] == 1
        assert (m["helix_workers_lost_total"], m["helix_workers_rejoined_total"], m["helix_workers_drained_total"],
                m["helix_requests_migrated_total"], m["helix_requests_failed_unrecovered_total"]) == (1, 2, 3, 4, 5)

    serve(body)


def test_health_and_models() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        async with s.get(url + "/health") as r:
            assert r.status == 200 and await r.json() == {"status": "ok", "workers": 3}
        host.is_ready = False
        async with s.get(url + "/health") as r:
            assert r.status == 503 and (await r.json())["status"] == "starting"
        host.is_ready, host.is_closing = True, True
        async with s.get(url + "/health") as r:
            assert r.status == 503 and (await r.json())["status"] == "shutting down"
        async with s.get(url + "/v1/models") as r:
            data = (await r.json())["data"]
        assert [(d["id"], d["max_model_len"]) for d in data] == [(MODEL, 256)]

    serve(body)


# ---- layering --------------------------------------------------------------------------------------


def test_the_front_door_imports_without_the_runtime_or_torch() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import helix_async.frontend.bench_serve, helix_async.frontend.host_protocol
        import helix_async.frontend.metrics, helix_async.frontend.openai_api
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("helix_async.runtime") or m == "zmq")))
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
