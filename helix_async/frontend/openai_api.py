"""The OpenAI-compatible HTTP API on the host (aiohttp, on the host's own event loop).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, vLLM's
``POST /tokenize``, ``POST /detokenize`` and ``GET /version``, ``GET /health`` and, when metrics
are on, ``GET /metrics`` (Prometheus text format).  The request fields, what is applied and what
is refused are in docs/api.md; in short, OpenAI's fields (``model``, ``prompt`` or ``messages``,
``max_tokens``/``max_completion_tokens``, ``temperature`` (default 1), ``top_p``, ``seed``,
``stop``, ``n``, ``presence_penalty``, ``frequency_penalty``, ``logprobs``/``top_logprobs``,
``stream``, ``stream_options.include_usage``) and vLLM's sampling extensions (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``) are applied
(a :class:`~helix_async.sampling.SamplingParams` handed to the host); a field this server does not
apply is refused with a 400 naming it unless it is at its no-op value.  Responses carry ``usage``
(prompt, completion and total tokens).

The server talks to its host only through the serving-host protocol
(:class:`~helix_async.frontend.host_protocol.ServingHost`), so it runs as well in front of the
runtime's coordinator as in front of a test's in-memory host.  Each choice of a request is one
:meth:`ServingHost.generate` call (``n`` choices: ``n`` calls, seeds ``seed + i`` as vLLM derives
them); its tokens are turned into text as they come
(:class:`~helix_async.frontend.tokenizer.IncrementalDetokenizer`) and, when streaming, sent as
server-sent events, one per token (a token whose text is not complete yet sends an empty text, so
a client's time to first token and inter-token latencies are the tokens'), from the loop that
received the token (no thread in between).  A choice ends at ``max_tokens``, at an end-of-sequence
or ``stop_token_ids`` id (unless ``ignore_eos`` for the former) or at a stop string (not included
in the text), none of them before ``min_tokens``; its ``finish_reason`` comes with the chunk of
the token that ended it.  Closing the token stream then cancels it on the host, which frees its
KV.  A client that disconnects cancels its request the same way.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
JSON, a bad or unsupported field, a prompt longer than the context; 404 for an unknown model; 408,
413 and 415 for a body too slow, too large, or not UTF-8 JSON; 429 with ``Retry-After`` when the
admission queue is full (a request is never queued without bound), and for too many connections
or large bodies at once (:class:`HttpLimits`); 503 with ``Retry-After`` while the cluster is
starting or shutting down (overload is never a 500); 500 when the cluster failed the request (a
lost worker), and, as the last resort, for a fault of this server's own (counted in
:attr:`OpenAIServer.faults`).  Bad input never gets a 5xx: every value is checked at the door
against what the sampler, the tokenizer and the wire take (docs/api.md §Limits).  Bodies are
parsed, chat templates rendered and prompts tokenized in a small thread pool, off the event loop.
A streaming response's headers go out with its first token, so a request refused before then gets
its status as a non-streaming one would; a failure after that arrives as a last event
``{"error": ...}`` before ``[DONE]``.  One request's failure ends that request alone.

Without a tokenizer (``tokenizer=None``: the cost-model emulation) prompts must be token ids and
the text of each token is its id after a space.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import http_exceptions, web

from .. import __version__
from ..errors import RequestFailed
from ..sampling import MAX_LOGPROBS, SampledToken, SamplingParams
from .connections import ConnectionLimiter, GuardedProtocol, parser_logger
from .host_protocol import ServingHost
from .tokenizer import ChatTemplateError, IncrementalDetokenizer, TextTokenizer, find_stop

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["ApiError", "HttpLimits", "OpenAIServer", "parse_http_address"]

log = logging.getLogger("helix_async.http")

MAX_STOPS = 4
#: most choices one request may ask for (OpenAI's limit of ``n``)
MAX_N = 128
#: the priorities a request may take (vLLM's 'priority': lower is served first), an int32
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
#: a log-probability of minus infinity as JSON has it (JSON has no infinity; vLLM's clamp)
LOGPROB_FLOOR = -9999.0
_SEED_MASK = (1 << 63) - 1
#: deepest nesting of arrays and objects a request body may have (OpenAI's requests need < 10)
MAX_JSON_DEPTH = 64
#: the longest stop string, characters
MAX_STOP_CHARS = 4096
#: the lowest temperature above 0: a lower one is raised to it (vLLM's rule), since dividing
#: float32 logits by less overflows them (and it samples the arg-max all but always anyway)
MIN_TEMPERATURE = 1e-2
#: the repetition penalty's range: beyond it float32 logits divided or multiplied by it overflow
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
#: the charsets a JSON body may declare (RFC 8259: JSON is UTF-8; ASCII is a subset)
_CHARSETS = ("utf-8", "ascii")
#: bodies up to this many bytes are parsed on the loop; larger ones in the thread pool
_INLINE_BODY = 64 << 10
_I32 = (1 << 31) - 1


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the HTTP door (docs/api.md §Limits).

    client_max_size: largest request body, bytes (413 beyond). max_line_size, max_field_size:
    longest request line and header field, bytes; max_headers: most header fields (400 beyond).
    keepalive_timeout: seconds a connection may sit idle, before its first request's headers are
    complete or between requests, before it is closed. body_timeout: seconds a request's body
    may take to arrive (408 after). lingering_time: seconds the rest of a body not read (a
    refused request's) is read and dropped after the answer, before the connection is closed
    (so the client reads the answer rather than a reset). bodies_in_flight: bytes of large
    request bodies (over 64 KiB) being read, parsed and tokenized at once, counted by their
    Content-Length (or ``client_max_size`` when chunked); one more beyond it is refused with a 429
    (a parsed body takes several times its bytes: this bounds the memory big requests hold).
    per_client: most connections one client address holds open
    at once (429 beyond; 0: no limit). threads: the thread pool that tokenizes, renders chat
    templates, detokenizes whole texts and parses large bodies off the event loop.
    """

    client_max_size: int = 16 << 20
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 128
    keepalive_timeout: float = 15.0
    body_timeout: float = 60.0
    lingering_time: float = 2.0
    bodies_in_flight: int = 48 << 20
    per_client: int = 256
    threads: int = 2

    def runner_kwargs(self) -> dict[str, Any]:
        """aiohttp's own knobs for these limits (``web.AppRunner``'s or ``TestServer``'s keywords)."""
        # auto_decompress off: a compressed request body is refused (415), never inflated
        return {"max_line_size": self.max_line_size, "max_field_size": self.max_field_size,
                "max_headers": self.max_headers, "keepalive_timeout": self.keepalive_timeout,
                "lingering_time": self.lingering_time, "auto_decompress": False, "logger": parser_logger()}


def _bearer_is(request: web.Request, expected: bytes) -> bool:
    """The request's Authorization header is ``expected`` (compared in constant time)."""
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, expected)


def _short(v: Any, limit: int = 60) -> str:
    """A value of the request as an error message quotes it: JSON, cut at ``limit`` characters."""
    try:
        text = json.dumps(v)
    except (ValueError, TypeError, RecursionError):
        text = type(v).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit`` in ``value`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        items = v.values() if isinstance(v, dict) else v
        if depth > limit:
            return True
        for x in items:
            if isinstance(x, (dict, list)):
                stack.append((x, depth + 1))
    return False


def _parse_json(text: str) -> Any:
    """The request body's JSON value, or an ApiError (400) saying why not."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ApiError(400, f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as e:  # not JSON, or an integer of more digits than Python converts
        raise ApiError(400, f"the request body is not valid JSON: {_first_line(str(e))}") from None
    if isinstance(value, (dict, list)) and _too_deep(value, MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH}")
    return value


def _parse_body(raw: bytes, charset: str | None) -> Any:
    """A body's JSON value: :func:`_decode_body`, then :func:`_parse_json`."""
    return _parse_json(_decode_body(raw, charset))


def _first_line(text: str, limit: int = 160) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _decode_body(raw: bytes, charset: str | None) -> str:
    """The body as text: UTF-8 (or ASCII) whatever else it declares is refused (415)."""
    if charset:
        try:
            name = codecs.lookup(charset).name
        except LookupError:
            name = ""
        if name not in _CHARSETS:
            raise ApiError(415, f"charset {_short(charset, 40)} is not supported: send JSON as UTF-8",
                           code="unsupported_charset")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (at byte {e.start})") from None


def _unicode(text: str, param: str) -> bytes:
    """``text`` as UTF-8, or a 400 naming ``param`` when it holds a lone surrogate (JSON's
    ``\ud800`` escapes decode to one; no tokenizer takes it)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{param}' holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
                       "which is not text", param=param) from None


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, close: bool = False) -> None:
        super().__init__(message)
        #: the connection is closed after the answer (its request was not read whole)
        self.close = close or status in (408, 413)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        special = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable"}
        if self.status in special:
            return special[self.status]
        return "invalid_request_error" if 400 <= self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``PORT`` 0: any free port) for ``--http``."""
    host, sep, port = text.rpartition(":")
    # ASCII digits, at most 5 of them, before int() (a 5,000-digit port is refused, not converted)
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:8000, got {text!r}")
    return host.strip("[]"), int(port)


# ---- what a request asks for -------------------------------------------------------------------

#: Fields of OpenAI's and vLLM's requests that this server does not apply: each is refused (400
#: naming it) unless absent or at one of the values listed, which do nothing (docs/api.md).
#: ``None`` marks "only absent or null".
_NOOP: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "suffix": ("",),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),  # with no tools, neither calls one
    "function_call": ("none", "auto"),
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "prompt_logprobs": (),
    "allowed_token_ids": (),
    "bad_words": ([],),
    "truncate_prompt_tokens": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "guided_decoding_backend": (),
    "guided_whitespace_pattern": (),
    "structured_outputs": (),
    "logits_processors": ([],),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "documents": ([],),
    "mm_processor_kwargs": ({},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "vllm_xargs": ({},),
    "kv_transfer_params": (),
}


def _same(v: Any, noop: Any) -> bool:
    """``v == noop`` where booleans are not numbers (``True == 1`` must not pass for 1.0)."""
    if isinstance(v, bool) or isinstance(noop, bool):
        return type(v) is type(noop) and v == noop
    return bool(v == noop)


def _refuse_unsupported(body: dict[str, Any], *, chat: bool, n: int) -> None:
    for name, noops in _NOOP.items():
        v = body.get(name)
        if v is not None and not any(_same(v, x) for x in noops):
            raise ApiError(400, f"'{name}' is not supported by this server (only {_noop_text(noops)})", param=name)
    v = body.get("add_special_tokens")
    if v is not None and not _same(v, not chat):  # chat templates write their own marks
        raise ApiError(400, f"'add_special_tokens' is not supported by this server (only {not chat})",
                       param="add_special_tokens")
    v = body.get("best_of")
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v == n):
        raise ApiError(400, "'best_of' is not supported by this server (only equal to n)", param="best_of")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise ApiError(400, "'response_format' is not supported by this server (only {\"type\": \"text\"})",
                       param="response_format")


def _noop_text(noops: tuple[Any, ...]) -> str:
    return "absent or " + (" or ".join(json.dumps(x) for x in noops) if noops else "null")


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got a boolean", param=name)
    if not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got {type(v).__name__}", param=name)
    return v


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    raw = _field(body, name, (int, float), default)
    try:
        v = float(raw) + 0.0  # (+ 0.0: a negative zero is zero)
    except OverflowError:  # an integer beyond any float
        v = math.inf if raw > 0 else -math.inf
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]" if math.isfinite(hi) else f"{'>' if lo_open else '>='} {lo:g}"
        raise ApiError(400, f"'{name}' must be {'in ' if math.isfinite(hi) else ''}{rng}, got {v:g}", param=name)
    return v


@dataclass
class _Params:
    """One request, checked: its prompt, the sampling each choice gets (its seed the request's),
    ``n`` choices, the texts and ids that end a choice, and how to answer."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    n: int
    stops: list[str]
    stop_ids: frozenset[int]
    stream: bool
    include_usage: bool
    chat: bool
    priority: int = 0

    def choice_sampling(self, index: int) -> SamplingParams:
        """Choice ``index``'s sampling: the request's, seeded ``seed + index`` (as vLLM seeds the
        children of a request with ``n`` > 1)."""
        if index == 0:
            return self.sampling
        return dataclasses.replace(self.sampling, seed=(self.sampling.seed + index) & _SEED_MASK)


@dataclass
class _Delta:
    """What one token adds to a choice: its text (possibly empty), the finish reason when it is
    the choice's last, and its log-probabilities when asked for."""

    text: str
    finish: str | None = None
    logprobs: SampledToken | None = None


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)


class OpenAIServer:
    """The HTTP front door of one serving host (see the module doc).

    server: the host (anything with the :class:`ServingHost` protocol). model_name: the id clients
    give as ``model`` (others are 404) and ``/v1/models`` lists. tokenizer: text in and out (None:
    token ids only). max_model_len: prompt plus output tokens at most. seed: seeds the sampling
    seed of requests that give none. metrics: a ``Metrics`` to update (or None). api_key: the
    bearer token ``/v1/`` requires (None: none). model_root: what the model was loaded from
    (``/v1/models``' ``root``; default: ``model_name``). limits: the door's :class:`HttpLimits`.
    admin_key: the bearer token of the operator's ``/admin/`` endpoints (None: they are not
    served): ``GET /admin/nodes`` and ``POST /admin/retire``.
    """

    def __init__(
        self,
        server: ServingHost,
        model_name: str,
        tokenizer: TextTokenizer | None,
        *,
        max_model_len: int,
        seed: int = 0,
        metrics: Metrics | None = None,
        api_key: str | None = None,
        model_root: str | None = None,
        limits: HttpLimits | None = None,
        admin_key: str | None = None,
    ) -> None:
        self.server = server
        self.model_name = model_name
        self.model_root = model_root or model_name
        self.tokenizer = tokenizer
        if tokenizer is not None:
            _ = tokenizer.max_token_bytes  # worked out once, now, not in a request's time
        self.max_model_len = int(max_model_len)
        self.metrics = metrics
        self.api_key = api_key
        self._key = None if api_key is None else f"Bearer {api_key}".encode("utf-8", "surrogateescape")
        self.limits = limits or HttpLimits()
        self.connections = ConnectionLimiter(self.limits.per_client)
        #: requests that ended in a fault of this server's own (a 500 that is not the cluster's)
        self.faults = 0
        self._rng = random.Random(seed)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: bytes of large bodies being read and checked now (HttpLimits.bodies_in_flight)
        self.body_bytes = 0
        self._reserved: dict[int, int] = {}  # id(request): its bytes in body_bytes, until it is released
        self.url = ""
        self.app = web.Application(client_max_size=self.limits.client_max_size, middlewares=[self._errors])
        self.app.on_cleanup.append(self._close_pool)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/tokenize", self._tokenize)
        self.app.router.add_post("/detokenize", self._detokenize)
        self.app.router.add_get("/version", self._version)
        self.app.router.add_get("/health", self._health)
        if metrics is not None:
            self.app.router.add_get("/metrics", self._metrics)
        self._admin = None if admin_key is None else f"Bearer {admin_key}".encode("utf-8", "surrogateescape")
        #: requests to /admin/ refused for a missing or wrong key
        self.admin_refused = 0
        if admin_key is not None:
            if not admin_key or not all(hasattr(server, a) for a in ("retire", "node_states")):
                raise ValueError("admin_key: needs a non-empty key and a host that can retire nodes")
            self.app.router.add_get("/admin/nodes", self._admin_nodes)
            self.app.router.add_post("/admin/retire", self._admin_retire)

    # ---- life -----------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (port 0: a free one); returns the base URL."""
        # handler_cancellation: a client that goes away cancels its handler, and so its request
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     **self.limits.runner_kwargs())
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        # each connection is counted per client address before aiohttp parses it (connections.py)
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(lambda: GuardedProtocol(server(), self.connections), host, port,
                                                      reuse_address=True)
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        socks = self._listener.sockets
        bound = int(socks[-1].getsockname()[1]) if socks else port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _off_loop(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` in the door's thread pool (tokenizers release the GIL while they work)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.limits.threads), thread_name_prefix="helix-http")
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _close_pool(self, app: web.Application) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if self._admin is not None and request.path.startswith("/admin/"):
            if not _bearer_is(request, self._admin):
                self.admin_refused += 1
                # the first and then every power of two: a stream of guesses does not flood the log
                if self.admin_refused & (self.admin_refused - 1) == 0:
                    log.warning("%s %s from %s refused: missing or wrong admin key (refused so far: %d)",
                                _short(request.method, 16), _short(request.raw_path, 80), _short(request.remote or "?", 60),
                                self.admin_refused)
                return ApiError(401, "missing or wrong admin key (Authorization: Bearer ...)",
                                code="invalid_admin_key").response()
        if self._key is not None and request.path.startswith("/v1/"):
            if not _bearer_is(request, self._key):
                if self.metrics is not None:
                    self.metrics.request_done("unauthorized")
                return ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key").response()
        try:
            return await handler(request)
        except ApiError as e:
            if self.metrics is not None and request.path.startswith("/v1/") and request.method == "POST":
                self.metrics.request_done({429: "overloaded", 503: "unavailable"}.get(e.status, "error" if e.status >= 500 else "invalid"))
            resp = e.response()
            if e.close:  # the body was not read whole: the connection cannot go on
                resp.force_close()
            return resp
        except web.HTTPException as e:
            if e.status >= 400:
                if self.metrics is not None and request.path.startswith("/v1/") and request.method == "POST":
                    self.metrics.request_done("invalid")
                resp = ApiError(e.status, e.reason or "error", code=str(e.status)).response()
                if e.status == 413:
                    resp.force_close()
                return resp
            raise
        except Exception as e:  # the last resort, for a fault of this server's own: counted, logged
            self.faults += 1
            # a traceback for the first and then every power of two: a repeated fault does not flood
            if self.faults & (self.faults - 1) == 0:
                log.exception("%s %s failed (faults so far: %d)", request.method, request.path, self.faults)
            if self.metrics is not None and request.path.startswith("/v1/") and request.method == "POST":
                self.metrics.request_done("error")
            return ApiError(500, f"internal error: {type(e).__name__}", code="internal_error").response()
        finally:
            self._release(request)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object: read within ``body_timeout`` (408) and ``client_max_size``
        (413), UTF-8 (415 for another charset), JSON nested at most ``MAX_JSON_DEPTH`` deep (400);
        a large one is parsed off the loop."""
        enc = request.headers.get("Content-Encoding", "").strip().lower()
        if enc not in ("", "identity"):
            raise ApiError(415, f"Content-Encoding {_short(enc, 40)} is not supported: send the body as it is",
                           code="unsupported_content_encoding", close=True)
        size = request.content_length
        need = min(self.limits.client_max_size, size if size is not None else self.limits.client_max_size)
        if need > _INLINE_BODY:
            if self.body_bytes and self.body_bytes + need > self.limits.bodies_in_flight:
                raise ApiError(429, f"too many large request bodies at once ({self.body_bytes} bytes being read); "
                               "retry later", retry_after=1, close=True)
            self._reserved[id(request)] = need
            self.body_bytes += need
        try:
            raw = await asyncio.wait_for(request.read(), self.limits.body_timeout)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s") from None
        except (web.RequestPayloadError, http_exceptions.HttpProcessingError) as e:
            # a body its Content-Encoding or chunked framing does not decode
            raise ApiError(400, f"the request body could not be read: {_first_line(str(e))}", close=True) from None
        charset = request.charset
        if len(raw) > _INLINE_BODY:
            body = await self._off_loop(_parse_body, raw, charset)
        else:
            body = _parse_body(raw, charset)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if request.path.startswith("/admin/"):  # (no model there)
            return body
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{_short(model)[1:-1]}` does not exist (this server serves "
                           f"`{self.model_name}`).", param="model", code="model_not_found")
        return body

    def _check_serving(self) -> None:
        s = self.server
        if s.closing:
            raise ApiError(503, "the server is shutting down", retry_after=5)
        if not s.ready:
            raise ApiError(503, "the cluster is starting: not every worker is ready yet", retry_after=2)
        if s.admission_stopped:
            raise ApiError(503, f"admission is stopped: {s.admission_stopped}", retry_after=5)
        if s.overloaded:
            raise ApiError(429, f"the admission queue is full ({s.admission_capacity} requests waiting); retry later",
                           retry_after=1)

    async def _checked(self, request: web.Request, *, chat: bool) -> _Params:
        """The request, read and checked: its prompt tokenized (chat: rendered first) and every
        field checked, off the event loop (the thread pool)."""
        body = await self._body(request)
        # the sampling seed of an unseeded request is drawn here, on the loop, in arrival order
        seed = self._rng.randrange(1 << 63) if body.get("seed") is None else None
        p: _Params = await self._off_loop(self._params_of, body, chat, seed)
        self._release(request)
        return p

    def _release(self, request: web.Request) -> None:
        """Give back what the request's body counted in ``body_bytes`` (once)."""
        self.body_bytes -= self._reserved.pop(id(request), 0)

    def _params_of(self, body: dict[str, Any], chat: bool, seed: int | None) -> _Params:
        prompt = self._chat_ids(body) if chat else self._prompt_ids(body)
        return self._params(body, prompt, chat=chat, seed=seed)

    def _too_long(self, what: str, param: str) -> ApiError:
        return ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, {what}. "
                        "Please reduce the prompt.", param=param, code="context_length_exceeded")

    def _params(self, body: dict[str, Any], prompt: list[int], *, chat: bool, seed: int | None = None) -> _Params:
        where = "messages" if chat else "prompt"
        if not prompt:
            raise ApiError(400, "the prompt is empty", param=where)
        if len(prompt) >= self.max_model_len:  # no room for one token
            raise self._too_long(f"the prompt has {len(prompt)} tokens", where)
        vocab = self.server.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        room = self.max_model_len - len(prompt)
        name = "max_tokens"
        max_tokens = _field(body, "max_tokens", (int,), None)
        if chat and max_tokens is None:
            max_tokens = _field(body, "max_completion_tokens", (int,), None)
            name = "max_completion_tokens"
        if max_tokens is None:
            max_tokens = 16 if not chat else room
        if max_tokens <= 0:
            raise ApiError(400, f"'{name}' must be at least 1, got {_short(max_tokens)}", param=name)
        if room <= 0 or max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or the completion length.",
                param=name, code="context_length_exceeded",
            )
        n = _field(body, "n", (int,), 1)
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"'n' must be in [1, {MAX_N}], got {_short(n)}", param="n")
        _refuse_unsupported(body, chat=chat, n=n)
        given = _field(body, "seed", (int,), None)
        if given is not None:
            seed = given
        elif seed is None:
            seed = self._rng.randrange(1 << 63)
        seed &= _SEED_MASK  # OpenAI takes any 64-bit integer; the sampler wants a non-negative one
        top_k = _field(body, "top_k", (int,), 0)
        if top_k < -1:
            raise ApiError(400, f"'top_k' must be -1 or 0 (all tokens) or at least 1, got {_short(top_k)}", param="top_k")
        if top_k >= vocab:  # as many as the vocabulary or more: all tokens (and the wire's int32 holds it)
            top_k = 0
        min_tokens = _field(body, "min_tokens", (int,), 0)
        if not 0 <= min_tokens <= max_tokens:
            raise ApiError(400, f"'min_tokens' must be in [0, {name}={max_tokens}], got {_short(min_tokens)}",
                           param="min_tokens")
        stop_token_ids = _field(body, "stop_token_ids", (list,), [])
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_token_ids):
            raise ApiError(400, f"'stop_token_ids' must be a list of token ids in [0, {vocab})", param="stop_token_ids")
        ignore_eos = bool(_field(body, "ignore_eos", (bool,), False))
        eos = () if (ignore_eos or self.tokenizer is None) else self.tokenizer.eos_ids
        # the ids that end a choice; min_tokens bans them all (vLLM's all_stop_token_ids)
        stop_ids = tuple(dict.fromkeys([*eos, *stop_token_ids]))
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        if 0 < temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
        sampling = SamplingParams(
            temperature=temperature,
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=max(0, top_k),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            seed=seed,
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, *REPETITION_PENALTY_RANGE),
            min_tokens=min_tokens,
            stop_token_ids=stop_ids,
            logprobs=self._logprobs(body, chat=chat),
        )
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
            stops = list(stop)
        else:
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
        for s in stops:
            if len(s) > MAX_STOP_CHARS:
                raise ApiError(400, f"a stop string must be at most {MAX_STOP_CHARS} characters, got {len(s)}", param="stop")
            _unicode(s, "stop")
        stops = [s for s in stops if s]
        if stops and self.tokenizer is None:
            raise ApiError(400, "'stop' needs a tokenizer; this server has none", param="stop")
        stream = bool(_field(body, "stream", (bool,), False))
        opts = _field(body, "stream_options", (dict,), {})
        if opts and not stream:  # as vLLM: stream options belong to a streamed request
            raise ApiError(400, "'stream_options' can only be given when 'stream' is true", param="stream_options")
        if opts.get("continuous_usage_stats") not in (None, False):
            raise ApiError(400, "'stream_options.continuous_usage_stats' is not supported by this server "
                           "(usage comes once, at the end, with include_usage)", param="stream_options.continuous_usage_stats")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(400, "'stream_options.include_usage' must be bool", param="stream_options.include_usage")
        priority = _field(body, "priority", (int,), 0)
        if not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
            raise ApiError(400, f"'priority' must be an integer in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}] (lower is "
                           f"served first), got {_short(priority)}", param="priority")
        return _Params(prompt, int(max_tokens), sampling, n, stops, frozenset(stop_ids), stream, include_usage, chat,
                       priority)

    def _logprobs(self, body: dict[str, Any], *, chat: bool) -> int | None:
        """How many top log-probabilities each token reports (None: none), from completions'
        ``logprobs`` (an int) or chat's ``logprobs`` (a bool) and ``top_logprobs`` (an int)."""
        if not chat:
            v = body.get("logprobs")
            if v is None or v is False:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS:
                raise ApiError(400, f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {json.dumps(v)}",
                               param="logprobs")
            return int(v)
        on = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), None)
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
        if top and not on:
            raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
        return int(top or 0) if on else None

    def _encode(self, text: str, param: str, *, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids (in the thread pool: tokenizers release the GIL).  Refused first,
        400 naming ``param``: a lone surrogate, and a text of more UTF-8 bytes than the context's
        tokens can cover (a byte-level tokenizer's token stands for at most ``max_token_bytes``
        bytes), so a huge prompt is answered without tokenizing it."""
        tok = self._need_tokenizer()
        data = _unicode(text, param)
        most = tok.max_token_bytes
        if most and len(data) > self.max_model_len * most:
            least = -(-len(data) // most)
            raise self._too_long(f"the {param} is {len(data)} bytes: at least {least} tokens of at most {most} bytes",
                                 param)
        return tok.encode(text, add_special_tokens=add_special_tokens)

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if self.tokenizer is None:
                raise ApiError(400, "this server has no tokenizer: give the prompt as a list of token ids", param="prompt")
            return self._encode(p, "prompt")
        if isinstance(p, list) and len(p) > 1 and isinstance(p[0], (str, list)):
            raise ApiError(400, "only one prompt per request is supported", param="prompt")
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if len(p) >= self.max_model_len:
                raise self._too_long(f"the prompt has {len(p)} tokens", "prompt")
            return [int(t) for t in p]
        if isinstance(p, list) and len(p) > 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt")
        raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")

    def _messages(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat's messages as a template reads them, as vLLM parses them: text content parts
        joined by newlines, a null content as "", an assistant's ``tool_calls`` kept (their
        ``arguments`` as objects when they are JSON text), a tool's ``tool_call_id`` and a
        message's ``name`` kept."""
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text ones
                texts = []
                for c in content:
                    if isinstance(c, str):
                        texts.append(c)
                    elif isinstance(c, dict) and c.get("type") in ("text", "input_text", "output_text", "refusal"):
                        t = c.get("refusal" if c.get("type") == "refusal" else "text")
                        if t is not None:
                            texts.append(str(t))
                    else:
                        raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                content = "\n".join(texts)
            elif content is None:
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
            msg: dict[str, Any] = {"role": m["role"], "content": content}
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
            calls = m.get("tool_calls")
            if m["role"] == "assistant" and calls is not None:
                if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                    raise ApiError(400, f"messages[{i}].tool_calls must be a list of objects", param="messages")
                msg["tool_calls"] = [_tool_call_for_template(c) for c in calls]
            if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
                msg["tool_call_id"] = m["tool_call_id"]
            clean.append(msg)
        return clean

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        clean = self._messages(body)
        if self.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: chat is not available", param="messages")
        if not self.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        add_gen = _field(body, "add_generation_prompt", (bool,), True)
        text = self._render(clean, add_gen)
        return self._encode(text, "messages", add_special_tokens=False)  # (the template writes its own marks)

    def _render(self, clean: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        tok = self._need_tokenizer()
        try:
            return tok.apply_chat_template(clean, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            raise ApiError(400, _first_line(str(e), 400), param="messages") from None
        except RecursionError:  # (a template recursing over what the messages hold)
            raise ApiError(400, "the chat template recursed too deeply on these messages", param="messages") from None

    # ---- generation -----------------------------------------------------------------------------

    async def _run(self, p: _Params, index: int, out: _Choice) -> AsyncGenerator[_Delta, None]:
        """Choice ``index``: one :class:`_Delta` per token (its finish reason set on the last);
        fills ``out`` as it goes.

        Per token, the work is bounded by the token, not by the text so far: the detokenizer
        decodes a window of recent tokens, and stop strings are looked for in ``pending`` (the
        text held back, at most the longest stop string less one character: it may begin a stop
        string) plus the token's new text; the text sent is kept as pieces, joined at the end."""
        tok = self.tokenizer
        detok = IncrementalDetokenizer(tok) if tok is not None else None
        hold = max((len(s) for s in p.stops), default=1) - 1  # text that may still start a stop string
        pending = ""  # final text not sent yet: it may begin a stop string
        sent: list[str] = []  # the text sent, in pieces
        min_tokens = p.sampling.min_tokens
        want_lp = p.sampling.logprobs is not None
        t0 = self.server.now()
        last = t0
        m = self.metrics

        def step(new: str, checking: bool, final: bool) -> tuple[str, bool]:
            """The text to send for a token that added ``new`` (and whether a stop string ended it)."""
            nonlocal pending
            window = pending + new
            if checking and p.stops:
                cut = find_stop(window, p.stops)
                if cut >= 0:
                    pending = ""
                    sent.append(window[:cut])
                    return window[:cut], True
            keep = 0 if final or not p.stops else min(hold, len(window))
            piece, pending = window[: len(window) - keep], window[len(window) - keep :]
            sent.append(piece)
            return piece, False

        gen = self.server.generate(p.prompt, p.max_tokens, sampling=p.choice_sampling(index), priority=p.priority)
        try:
            async for item in gen:
                now = self.server.now()
                if m is not None:
                    m.token(now - t0 if out.tokens == 0 else now - last, first=out.tokens == 0)
                last = now
                if isinstance(item, SampledToken):
                    token, lp = int(item.token_id), item
                else:
                    token, lp = int(item), None
                if want_lp and lp is not None:
                    out.logprobs.append(lp)
                lp = lp if want_lp else None
                out.tokens += 1
                final = out.tokens >= p.max_tokens
                checking = out.tokens >= min_tokens  # no stop before min_tokens (vLLM's rule)
                if checking and token in p.stop_ids:
                    out.finish_reason = "stop"
                    if detok is None:
                        yield _Delta("", "stop", lp)
                        return
                    piece, _ = step(detok.flush(), checking, True)
                    out.text = "".join(sent)
                    yield _Delta(piece, "stop", lp)
                    return
                out.token_ids.append(token)
                if detok is None:
                    piece = f" {token}"
                    sent.append(piece)
                    if final:
                        out.text = "".join(sent)
                    yield _Delta(piece, "length" if final else None, lp)
                    if final:
                        return
                    continue
                new = detok.add(token)
                if final:
                    new += detok.flush()
                piece, stopped = step(new, checking, final)
                if stopped:
                    out.text = "".join(sent)
                    out.finish_reason = "stop"
                    yield _Delta(piece, "stop", lp)
                    return
                if final:
                    out.text = "".join(sent)
                yield _Delta(piece, "length" if final else None, lp)
                if final:
                    return
            # the host ended the stream before max_tokens (it does not, but a client must still
            # get a finish reason and the text held back)
            rest = ""
            if detok is not None:
                rest, stopped = step(detok.flush(), out.tokens >= min_tokens, True)
                if stopped:
                    out.finish_reason = "stop"
            out.text = "".join(sent)
            yield _Delta(rest, out.finish_reason)
        finally:
            await gen.aclose()  # ends the request on the cluster (and frees its KV) if it is still running
            if m is not None:
                m.request_tokens(len(p.prompt) if index == 0 else 0, out.tokens, self.server.now() - t0)

    async def _choices(self, p: _Params, outs: list[_Choice]) -> AsyncGenerator[tuple[int, _Delta], None]:
        """Every choice's deltas as ``(index, delta)``, in the order they come."""
        if p.n == 1:
            async with contextlib.aclosing(self._run(p, 0, outs[0])) as run:
                async for d in run:
                    yield 0, d
            return
        queue: asyncio.Queue[tuple[int, _Delta | BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async with contextlib.aclosing(self._run(p, i, outs[i])) as run:
                    async for d in run:
                        queue.put_nowait((i, d))
            except Exception as e:  # handed to the reader, who raises it
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(p.n)]
        try:
            ended = 0
            while ended < p.n:
                i, item = await queue.get()
                if item is None:
                    ended += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each closes its request on the host

    def _usage(self, p: _Params, outs: list[_Choice]) -> dict[str, int]:
        done = sum(o.tokens for o in outs)
        return {"prompt_tokens": len(p.prompt), "completion_tokens": done, "total_tokens": len(p.prompt) + done}

    # ---- log-probabilities in OpenAI's shapes ---------------------------------------------------

    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token) if self.tokenizer is not None else f" {token}"

    def _chat_logprobs(self, lps: Sequence[SampledToken], top: int) -> dict[str, Any]:
        """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``, the
        ``top`` most likely tokens of each step listed."""
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token)
            return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}

        content = [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top[:top]])
                   for lp in lps]
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, lps: Sequence[SampledToken], top: int, offset: int = 0) -> dict[str, Any]:
        """Completions' ``logprobs``: parallel lists ``tokens``, ``token_logprobs``,
        ``top_logprobs`` (the ``top`` most likely, and the chosen one: up to ``top`` + 1, as
        OpenAI documents) and ``text_offset`` (where each token's text begins, counted over the
        tokens' texts as vLLM counts it), from character ``offset``."""
        tokens, values, tops, offsets = [], [], [], []
        at = offset
        for lp in lps:
            text = self._token_text(lp.token_id)
            tokens.append(text)
            values.append(max(lp.logprob, LOGPROB_FLOOR))
            d = {self._token_text(t): max(v, LOGPROB_FLOOR) for t, v in lp.top[:top]}
            d.setdefault(text, max(lp.logprob, LOGPROB_FLOOR))
            tops.append(d)
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    # ---- answers ---------------------------------------------------------------------------------

    async def _respond(self, request: web.Request, p: _Params) -> web.StreamResponse:
        rid = ("chatcmpl-" if p.chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        m = self.metrics
        outs = [_Choice() for _ in range(p.n)]
        # aclosing: however the response ends (done, failed, the client gone), the token streams
        # are closed now, and with them the requests on the host
        async with contextlib.aclosing(self._choices(p, outs)) as deltas:
            if not p.stream:
                try:
                    async for _ in deltas:
                        pass
                except RequestFailed as e:
                    raise self._failed(e) from None
                except ValueError as e:
                    raise self._refused(e) from None
                if m is not None:
                    m.request_done(outs[0].finish_reason)
                top = p.sampling.logprobs
                choices: list[dict[str, Any]] = []
                for i, o in enumerate(outs):
                    if p.chat:
                        lp = self._chat_logprobs(o.logprobs, top) if top is not None else None
                        choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                                        "logprobs": lp, "finish_reason": o.finish_reason})
                    else:
                        lp = self._completion_logprobs(o.logprobs, top) if top is not None else None
                        choices.append({"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason})
                return web.json_response({"id": rid, "object": "chat.completion" if p.chat else "text_completion",
                                          "created": created, "model": self.model_name, "choices": choices,
                                          "usage": self._usage(p, outs)})
            # the headers go out with the first token: a request the host refuses before its first
            # token is answered with its status (429, 503), not with a 200 and an error event
            try:
                first = await anext(deltas, None)
            except RequestFailed as e:
                raise self._failed(e) from None
            except ValueError as e:
                raise self._refused(e) from None
            return await self._stream(request, p, outs, deltas, first, rid, created)

    async def _stream(self, request: web.Request, p: _Params, outs: list[_Choice],
                      deltas: AsyncIterator[tuple[int, _Delta]], first: tuple[int, _Delta] | None,
                      rid: str, created: int) -> web.StreamResponse:
        """The server-sent events of a streaming request whose first token (None: it ended with
        none) has come: one chunk per token, its finish reason on the last."""
        m = self.metrics
        obj = "chat.completion.chunk" if p.chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": self.model_name}
        top = p.sampling.logprobs
        offsets = [0] * p.n  # completions' text_offset, per choice

        def event(body: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        def chunk(i: int, d: _Delta) -> bytes:
            lp: dict[str, Any] | None = None
            if p.chat:
                if top is not None and d.logprobs is not None:
                    lp = self._chat_logprobs([d.logprobs], top)
                c: dict[str, Any] = {"index": i, "delta": {"content": d.text}, "logprobs": lp, "finish_reason": d.finish}
            else:
                if top is not None and d.logprobs is not None:
                    lp = self._completion_logprobs([d.logprobs], top, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                c = {"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish}
            body = dict(head, choices=[c])
            if p.include_usage:
                body["usage"] = None
            return event(body)

        def role(i: int) -> bytes:
            body = dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}])
            if p.include_usage:
                body["usage"] = None
            return event(body)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            if p.chat:
                for i in range(p.n):
                    await resp.write(role(i))
            if first is not None:
                await resp.write(chunk(*first))
                async for i, d in deltas:
                    await resp.write(chunk(i, d))
            if p.include_usage:
                await resp.write(event(dict(head, choices=[], usage=self._usage(p, outs))))
            if m is not None:
                m.request_done(outs[0].finish_reason)
        except RequestFailed as e:
            err = self._failed(e)
            if m is not None:
                m.request_done({429: "overloaded", 503: "unavailable"}.get(err.status, "error"))
            try:
                await resp.write(event(err.body()))
            except ConnectionResetError:
                return resp
        except ConnectionResetError:  # the client went away mid-stream: the caller closes its request
            if m is not None:
                m.request_done("abort")
            return resp
        except Exception as e:  # a fault of ours mid-stream: the client is told, the server goes on
            log.exception("request %s failed mid-stream", rid)
            if m is not None:
                m.request_done("error")
            err = ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
            try:
                await resp.write(event(err.body()))
            except ConnectionResetError:
                return resp
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _failed(self, e: RequestFailed) -> ApiError:
        if e.kind == "overloaded":
            return ApiError(429, str(e), retry_after=1)
        if e.kind in ("unavailable", "cancelled"):
            return ApiError(503, str(e), retry_after=5)
        return ApiError(500, f"the cluster failed the request: {e}", code="request_failed")

    def _refused(self, e: ValueError) -> ApiError:
        # the host's own check of a request this server passed (see ServingHost.generate)
        return ApiError(400, f"the host refused the request: {e}")

    # ---- routes ---------------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        p = await self._checked(request, chat=False)
        self._check_serving()
        return await self._respond_counted(request, p)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        p = await self._checked(request, chat=True)
        self._check_serving()
        return await self._respond_counted(request, p)

    async def _respond_counted(self, request: web.Request, p: _Params) -> web.StreamResponse:
        m = self.metrics
        if m is None:
            return await self._respond(request, p)
        m.running(+1)
        try:
            resp = await self._respond(request, p)
        except asyncio.CancelledError:
            m.request_done("abort")
            raise
        finally:
            m.running(-1)
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self._created, "owned_by": "helix_async",
             "root": self.model_root, "parent": None, "max_model_len": self.max_model_len}]})

    def _need_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer (it serves token ids only)")
        return self.tokenizer

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: ``prompt`` (text; ``add_special_tokens`` default true) or
        ``messages`` (rendered by the chat template; ``add_generation_prompt`` default true) to
        ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` with
        ``return_token_strs``)."""
        body = await self._body(request)
        self._need_tokenizer()
        return web.json_response(await self._off_loop(self._tokenized, body))

    def _tokenized(self, body: dict[str, Any]) -> dict[str, Any]:
        tok = self._need_tokenizer()
        strs = _field(body, "return_token_strs", (bool,), False)
        if "messages" in body:
            if not tok.chat_template:
                raise ApiError(400, "this model has no chat template", param="messages")
            clean = self._messages(body)
            add_gen = _field(body, "add_generation_prompt", (bool,), True)
            text = self._render(clean, add_gen)
            ids = self._encode(text, "messages", add_special_tokens=_field(body, "add_special_tokens", (bool,), False))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string (or give 'messages')", param="prompt")
            ids = self._encode(prompt, "prompt", add_special_tokens=_field(body, "add_special_tokens", (bool,), True))
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": tok.token_strs(ids) if strs else None}

    async def _detokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/detokenize``: ``tokens`` (ids) to ``{"prompt": text}`` (special tokens kept)."""
        body = await self._body(request)
        self._need_tokenizer()
        return web.json_response({"prompt": await self._off_loop(self._detokenized, body)})

    def _detokenized(self, body: dict[str, Any]) -> str:
        tok = self._need_tokenizer()
        ids = body.get("tokens")
        vocab = tok.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return tok.decode_long(ids, skip_special_tokens=False)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def _health(self, request: web.Request) -> web.Response:
        s = self.server
        if s.ready and not s.closing:
            return web.json_response({"status": "ok", "workers": s.workers})
        return web.json_response({"status": "shutting down" if s.closing else "starting"}, status=503)

    async def _admin_nodes(self, request: web.Request) -> web.Response:
        """``GET /admin/nodes``: every node of the plan and its state."""
        return web.json_response({"nodes": self.server.node_states()})  # type: ignore[attr-defined]

    async def _admin_retire(self, request: web.Request) -> web.Response:
        """``POST /admin/retire`` ``{"node": N}``: node N starts draining (its requests move away,
        by live migration where the host migrates) and stops once drained. 202 at once, while it
        drains; 404 for a node not in the plan; 409 when it cannot leave now (not serving, already
        draining, or the last live node holding some of its layers); 503 while the host is
        starting or shutting down; 400 for another body."""
        body = await self._body(request)
        node = body.get("node")
        if set(body) != {"node"} or not isinstance(node, int) or isinstance(node, bool):
            raise ApiError(400, 'expected {"node": N}, N a node id of the plan', param="node")
        status, what = self.server.retire(node)  # type: ignore[attr-defined]
        if status != 202:
            code = {404: "unknown_node", 409: "cannot_retire"}.get(status, "unavailable")
            raise ApiError(status, what, param="node", code=code, retry_after=5 if status == 503 else None)
        return web.json_response({"node": node, "state": what}, status=202)

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        data, ctype = self.metrics.render()
        return web.Response(body=data, headers={"Content-Type": ctype})


def _tool_call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as chat templates read it: the function's ``arguments`` as an object when they
    are JSON text of one (templates iterate them; vLLM hands them over so too)."""
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except (ValueError, RecursionError):  # not JSON (or nested past the parser, or a 5,000-digit number)
            return call
        if isinstance(args, dict) and not _too_deep(args, MAX_JSON_DEPTH):
            return dict(call, function=dict(fn, arguments=args))
    return call
