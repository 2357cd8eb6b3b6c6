"""The HTTP door under fuzz: over 10,000 requests, none answered 5xx, and the server unharmed.

The API (``OpenAIServer``) runs in process in front of the in-memory fake host of
``test_openai_fake_host.py`` (its tokens a fixed script in the shipped tiny tokenizer), on
aiohttp's test server with the door's own limits (``HttpLimits.runner_kwargs``).  Hypothesis
(seeded: the profile in conftest.py derandomizes) draws batches of requests, sent concurrently:

- bodies (each sent with three drawn methods, routes and headers): a valid request with fields replaced, added or removed, the values drawn from what
  JSON can hold (huge and negative integers, NaN, infinities, negative zero, denormals, lone
  surrogates, NUL, deep and wide arrays and objects), or raw bytes (JSON cut short, not UTF-8,
  deep nesting, a 5,000-digit number);
- headers: content types with any charset parameter, bogus ``Content-Encoding``, odd
  ``Authorization`` values;
- routes and methods: every route, unknown ones, wrong methods.

Then raw HTTP over a socket (request lines and headers aiohttp's parser must refuse).  Every
answer must be below 500; afterwards a plain request still gets the fake host's usual text, every
request the host saw was closed (none leaked), and the process's RSS grew by less than 200 MiB.
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("tokenizers")

from aiohttp.test_utils import TestServer  # noqa: E402
from test_openai_fake_host import MODEL, TOK, FakeHost, expected  # noqa: E402

from helix_async.frontend.metrics import Metrics  # noqa: E402
from helix_async.frontend.openai_api import HttpLimits, OpenAIServer  # noqa: E402

BODIES = 10  # bodies per hypothesis example, each sent 3 times (drawn methods, routes and headers), at once
SENDS = 3
EXAMPLES = 340  # x BODIES x SENDS: the fuzz's requests (10,200)
RAW_EXAMPLES = 300  # raw HTTP requests over a socket
RAW_BATCH = 30  # of them at once

# the generating routes most often: they check the most
PATHS = ["/v1/completions"] * 6 + ["/v1/chat/completions"] * 4 + [
    "/tokenize", "/tokenize", "/detokenize", "/v1/models", "/health", "/version", "/metrics", "/v1/nothing", "/",
    "/v1/completions/../models", "/v1/completions?x=%ff"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "n", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "min_tokens", "ignore_eos", "logprobs", "top_logprobs", "stream",
          "stream_options", "logit_bias", "priority", "best_of", "echo", "response_format", "tools",
          "add_generation_prompt", "add_special_tokens", "return_token_strs", "tokens", "user", "suffix"]
CONTENT_TYPES = [None, None, None, "application/json", "application/json", "application/json",
                 "application/json; charset=utf-8", "application/json; charset=UTF-16",
                 "application/json; charset=latin-1", "application/json; charset=rot13", "application/json; charset=",
                 "application/json; charset=\"utf-8\"", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=zz", "application/json; charset=idna", "garbage", ";;;=",
                 "application/json; charset=utf-8; charset=ascii"]
ENCODINGS = [None] * 24 + ["gzip", "deflate", "br", "identity", "x-nonsense", "gzip, deflate"]
METHODS = ["POST"] * 16 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]

SPECIAL_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**300,
                -(10**300), 2047, 2048, 256, 255, 128, 129, 20, 21]
SPECIAL_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1e-45, 0.5, 1.0, 2.0, 2.0000001, 1e308, float("inf"), float("-inf"),
                  float("nan"), 0.009, 1e-2, 100.0, 100.5]
ODD_TEXT = ["", "\x00", "a\x00b", "\ud800", "x\udfffy", "\ufeff", "\U0001f600", "</s>", "<s>", "<|user|>",
            "{{ 7 * 7 }}", "{% for x in y %}", "\u202e", "\r\n", "a" * 5000, "é" * 300, "\x7f\x80"]

json_leaf = st.one_of(
    st.none(), st.booleans(), st.sampled_from(SPECIAL_INTS), st.integers(-(2**70), 2**70),
    st.sampled_from(SPECIAL_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_TEXT), st.text(max_size=30),
)
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)
ARGUMENTS = ["{}", '{"a": 1}', "[" * 3000 + "]" * 3000, '{"a": 1' + "0" * 5000 + "}", "not json", '{"a": NaN}',
             '{"a": ' + "{\"b\": " * 80 + "1" + "}" * 80 + "}", '"\\ud800"']
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                           "content": st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=20), json_value)}),
    st.sampled_from([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": a}}]} for a in ARGUMENTS]),
    json_value,
)
field_value = st.one_of(json_value, st.lists(message, max_size=3), st.lists(st.sampled_from(SPECIAL_INTS), max_size=5))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A request body: a valid request made wrong in a few places, or raw bytes."""
    kind = draw(st.integers(0, 9))
    if kind <= 6:
        base: dict[str, Any] = draw(st.sampled_from([
            {"model": MODEL, "prompt": "The planner", "max_tokens": 3},
            {"prompt": [5, 6], "max_tokens": 2, "stream": True},
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
             "stream_options": {"include_usage": True}},
            {"prompt": "x", "max_tokens": 2, "n": 2, "logprobs": 2, "temperature": 0.5, "seed": 3},
            {"tokens": [1, 5, 9]},
        ]))
        body = dict(base)
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.sampled_from(FIELDS))
            if draw(st.integers(0, 4)) == 0:
                body.pop(name, None)
            else:
                body[name] = draw(field_value)
        return json.dumps(body, allow_nan=True).encode()  # (NaN and Infinity: Python's parser takes them)
    if kind == 7:
        good = json.dumps({"prompt": "The planner", "max_tokens": 2}).encode()
        cut = draw(st.integers(0, len(good)))
        junk = draw(st.binary(max_size=8))
        return good[:cut] + junk + good[cut:]
    if kind == 8:
        depth = draw(st.sampled_from([63, 64, 65, 999, 1000, 5000]))
        return b'{"prompt": "x", "user": ' + b"[" * depth + b"]" * depth + b"}"
    return draw(st.sampled_from([
        b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", b'{"prompt": "x", "seed": -1e999999}',
        b'{"prompt": "\\ud800\\udc00\\udc00"}', b"\xff\xfe{\x00}\x00", b"", b"null", b"[]", b'"x"', b"1e400",
        b'{"prompt": "x", "prompt": [1]}', b'{"prompt": "\xc3"}', b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    ]))


@st.composite
def heads(draw: st.DrawFn, data: bytes) -> tuple[str, str, bytes, dict[str, str]]:
    """A request around ``data``: its method, route and headers."""
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from(PATHS))
    headers: dict[str, str] = {}
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    if ctype is not None:
        headers["Content-Type"] = ctype
    enc = draw(st.sampled_from(ENCODINGS))
    if enc is not None:
        headers["Content-Encoding"] = enc
        if enc == "deflate" and draw(st.booleans()):
            data = zlib.compress(data)  # sometimes what it says
    if draw(st.integers(0, 5)) == 0:
        headers["Authorization"] = draw(st.sampled_from(["Bearer x", "Bearer \u00e9", "", "Basic Zm9v", "Bearer " + "k" * 4000]))
    return method, path, data, headers


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """One body, sent ``SENDS`` times (generating a body costs more than sending it)."""
    data = draw(bodies())
    return [draw(heads(data)) for _ in range(SENDS)]


def _rss() -> int:
    """This process's resident set, bytes (Linux)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Door:
    """The API on aiohttp's test server (loopback, a free port) and a client session to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fake = FakeHost()
        limits = HttpLimits()
        self.api = OpenAIServer(self.fake, MODEL, TOK, max_model_len=256, seed=5, metrics=Metrics(self.fake),
                                limits=limits)
        self.server = TestServer(self.api.app, **limits.runner_kwargs())
        loop.run_until_complete(self.server.start_server())
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"

        async def session() -> Any:
            return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))  # a hang fails, nothing is timed

        self.session = loop.run_until_complete(session())

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.run_until_complete(self.server.close())


@pytest.fixture(scope="module")
def door() -> Any:
    loop = asyncio.new_event_loop()
    d = Door(loop)
    try:
        yield d
    finally:
        d.close()
        loop.close()


async def _send(door: Door, method: str, path: str, data: bytes, headers: dict[str, str]) -> int:
    """The answer's status; 0 when the connection closed with none the client could read (aiohttp's
    parser refuses a request with a 400 and closes, maybe while the client still writes its body)."""
    try:
        async with door.session.request(method, door.url + path, data=data, headers=headers,
                                        skip_auto_headers=["Content-Type"]) as r:
            await r.read()
            return int(r.status)
    except aiohttp.ClientError:
        return 0


def test_ten_thousand_fuzzed_requests_get_no_5xx_and_leave_the_server_serving(door: Door) -> None:
    loop, fake, api = door.loop, door.fake, door.api
    seen: dict[int, int] = {}
    rss0 = _rss()
    fives: list[tuple[int, str, str, bytes, dict[str, str]]] = []

    @settings(max_examples=EXAMPLES, database=None)
    @given(st.lists(requests(), min_size=BODIES, max_size=BODIES))
    def batch(pairs: list[list[tuple[str, str, bytes, dict[str, str]]]]) -> None:
        reqs = [r for pair in pairs for r in pair]

        async def go() -> list[int]:
            return list(await asyncio.gather(*(_send(door, *r) for r in reqs)))

        for status, r in zip(loop.run_until_complete(go()), reqs, strict=True):
            seen[status] = seen.get(status, 0) + 1
            if status >= 500:
                fives.append((status, *r))

    batch()
    total = sum(seen.values())
    assert total >= 10_000, seen
    assert not fives, fives[:5]
    assert api.faults == 0
    assert seen.get(200, 0) > 500 and sum(v for k, v in seen.items() if 400 <= k < 500) > 3000, seen  # both kinds reached

    async def plain() -> tuple[int, Any]:
        async with door.session.post(door.url + "/v1/completions", json={"prompt": [5], "max_tokens": 12}) as r:
            return r.status, await r.json()

    status, body = loop.run_until_complete(plain())
    assert status == 200 and body["choices"][0]["text"] == expected(12)
    assert sorted(fake.closed) == list(range(len(fake.requests)))  # every request the host saw was closed
    assert api.body_bytes == 0  # every large body's count was given back
    assert _rss() - rss0 < 200 << 20
    print(f"{total} requests, statuses {dict(sorted(seen.items()))}, RSS +{(_rss() - rss0) / 2**20:.1f} MiB")  # with -s


RAW = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{\"a\":",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n{\"prompt\": [5]}\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\xff\xfe: \xff\r\n\r\n",
    b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json; charset=\xff\r\nContent-Length: 2\r\n\r\n{}",
]


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(RAW))
    if draw(st.booleans()):
        return base
    at = draw(st.integers(0, len(base)))
    return base[:at] + draw(st.binary(max_size=16)) + base[at + draw(st.integers(0, 8)):]


def test_raw_http_that_the_parser_refuses_gets_no_5xx(door: Door) -> None:
    loop, port, api = door.loop, door.port, door.api
    statuses: list[bytes] = []

    async def send(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            # the first line of the answer; "" when none came (a request cut short waits for the
            # rest until the door's timeouts) or the server closed without one (a refusal too)
            try:
                return await asyncio.wait_for(reader.readline(), 1.0)
            except TimeoutError:
                return b""
        finally:
            writer.close()

    @settings(max_examples=RAW_EXAMPLES // RAW_BATCH, database=None)
    @given(st.lists(raw_requests(), min_size=RAW_BATCH, max_size=RAW_BATCH))
    def batch(datas: list[bytes]) -> None:
        async def go() -> list[bytes]:
            return list(await asyncio.gather(*(send(d) for d in datas)))

        for line, data in zip(loop.run_until_complete(go()), datas, strict=True):
            statuses.append(line)
            if line:
                assert line.startswith(b"HTTP/") and not line.split()[1].startswith(b"5"), (line, data[:200])

    batch()
    assert len(statuses) == RAW_EXAMPLES
    answered = [s.split()[1] for s in statuses if s]
    assert answered.count(b"400") > 20 and answered.count(b"200") > 5, answered
    assert api.faults == 0
