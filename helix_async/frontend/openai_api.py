"""The OpenAI-compatible HTTP API on the host (aiohttp, on the host's own event loop).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET
/health`` and, when metrics are on, ``GET /metrics`` (Prometheus text format).  Request fields
follow OpenAI's: ``model``, ``prompt`` (text, or a list of token ids) or ``messages``,
``max_tokens`` (``max_completion_tokens`` for chat), ``temperature`` (default 1), ``top_p``,
``seed``, ``stop`` (a string or up to 4), ``n`` (1 only), ``stream`` with ``stream_options:
{"include_usage": true}``; and, as vLLM has them, ``ignore_eos``, ``min_tokens`` is not taken.
Responses carry ``usage`` (prompt, completion and total tokens).

The server talks to its host only through the serving-host protocol
(:class:`~helix_async.frontend.host_protocol.ServingHost`), so it runs as well in front of the
runtime's coordinator as in front of a test's in-memory host.  Each request is one
:meth:`ServingHost.generate` call; its tokens are turned into text as they
come (:class:`~helix_async.frontend.tokenizer.IncrementalDetokenizer`) and, when streaming, sent as
server-sent events, one per token, from the loop that received the token (no thread in between).
A request ends at ``max_tokens``, at the end-of-text token (unless ``ignore_eos``) or at a stop
string (not included in the text); closing the token stream then cancels it on the host, which
frees its KV.  A client that disconnects cancels its request the same way.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
JSON, a bad field, a prompt longer than the context; 404 for an unknown model; 429 with
``Retry-After`` when the admission queue is full (a request is never queued without bound); 503
with ``Retry-After`` while the cluster is starting or shutting down (overload is never a 500);
500 when the cluster failed the request (a lost worker), and for a fault of this server's own.
A streaming response's headers go out with its first text, so a request refused before then gets
its status as a non-streaming one would; a failure after that arrives as a last event
``{"error": ...}`` before ``[DONE]``.  One request's failure ends that request alone.

Without a tokenizer (``tokenizer=None``: the cost-model emulation) prompts must be token ids and
the text of each token is its id after a space.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..errors import RequestFailed
from .host_protocol import ServingHost
from .tokenizer import IncrementalDetokenizer, TextTokenizer, find_stop

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["ApiError", "OpenAIServer", "parse_http_address"]

log = logging.getLogger("helix_async.http")

MAX_STOPS = 4


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``PORT`` 0: any free port) for ``--http``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:8000, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass
class _Params:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stops: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    chat: bool


@dataclass
class _Outcome:
    text: str = ""
    tokens: int = 0
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got a boolean", param=name)
    if not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got {type(v).__name__}", param=name)
    return v


class OpenAIServer:
    """The HTTP front door of one serving host (see the module doc).

    server: the host (anything with the :class:`ServingHost` protocol). model_name: the id clients give as ``model`` (others are 404). tokenizer: text in and out
    (None: token ids only). max_model_len: prompt plus output tokens at most. seed: seeds the
    sampling seed of requests that give none. metrics: a ``Metrics`` to update (or None).
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
    ) -> None:
        self.server = server
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len)
        self.metrics = metrics
        self.api_key = api_key
        self._rng = random.Random(seed)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.app = web.Application(client_max_size=16 << 20, middlewares=[self._errors])
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/health", self._health)
        if metrics is not None:
            self.app.router.add_get("/metrics", self._metrics)

    # ---- life -----------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (port 0: a free one); returns the base URL."""
        # handler_cancellation: a client that goes away cancels its handler, and so its request
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        addrs = self._runner.addresses
        bound = int(addrs[-1][1]) if addrs else port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if self.api_key is not None and request.path.startswith("/v1/"):
            if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                if self.metrics is not None:
                    self.metrics.request_done("unauthorized")
                return ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key").response()
        try:
            return await handler(request)
        except ApiError as e:
            if self.metrics is not None and request.path.startswith("/v1/") and request.method == "POST":
                self.metrics.request_done({429: "overloaded", 503: "unavailable"}.get(e.status, "error" if e.status >= 500 else "invalid"))
            return e.response()
        except web.HTTPException as e:
            if e.status >= 400:
                return ApiError(e.status, e.reason or "error", code=str(e.status)).response()
            raise
        except Exception as e:  # a fault of ours: OpenAI's error shape still, and the server goes on
            log.exception("%s %s failed", request.method, request.path)
            if self.metrics is not None and request.path.startswith("/v1/") and request.method == "POST":
                self.metrics.request_done("error")
            return ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                           param="model", code="model_not_found")
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

    def _params(self, body: dict[str, Any], prompt: list[int], *, chat: bool) -> _Params:
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt")
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
            raise ApiError(400, f"'{name}' must be at least 1, got {max_tokens}", param=name)
        if room <= 0 or max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or the completion length.",
                param=name, code="context_length_exceeded",
            )
        temperature = float(_field(body, "temperature", (int, float), 1.0))
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
        top_p = float(_field(body, "top_p", (int, float), 1.0))
        if not 0 < top_p <= 1:
            raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
        seed = _field(body, "seed", (int,), None)
        if seed is None:
            seed = self._rng.randrange(1 << 63)
        elif seed < 0:
            seed &= (1 << 63) - 1  # OpenAI takes any 64-bit integer; the sampler wants a non-negative one
        n = _field(body, "n", (int,), 1)
        if n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        # what this server does not do: refused unless absent or set to its no-op value
        for unsupported, noop in (("logprobs", (None, False)), ("echo", (None, False)), ("best_of", (None, 1)),
                                  ("suffix", (None, "")), ("tools", (None, [])), ("functions", (None, [])),
                                  ("logit_bias", (None, {}))):
            if body.get(unsupported) not in noop:
                raise ApiError(400, f"'{unsupported}' is not supported by this server", param=unsupported)
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
            stops = list(stop)
        else:
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
        stops = [s for s in stops if s]
        if stops and self.tokenizer is None:
            raise ApiError(400, "'stop' needs a tokenizer; this server has none", param="stop")
        stream = bool(_field(body, "stream", (bool,), False))
        opts = _field(body, "stream_options", (dict,), {})
        return _Params(prompt, int(max_tokens), temperature, top_p, int(seed), stops, stream,
                       bool(opts.get("include_usage", False)), bool(_field(body, "ignore_eos", (bool,), False)), chat)

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if self.tokenizer is None:
                raise ApiError(400, "this server has no tokenizer: give the prompt as a list of token ids", param="prompt")
            return self.tokenizer.encode(p)
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return [int(t) for t in p]
        if isinstance(p, list) and len(p) > 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt")
        raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text ones
                if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                content = "".join(str(c.get("text", "")) for c in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
            clean.append({"role": m["role"], "content": content})
        if self.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: chat is not available", param="messages")
        if not self.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        return self.tokenizer.encode_chat(clean)

    # ---- generation -----------------------------------------------------------------------------

    async def _run(self, p: _Params, out: _Outcome) -> AsyncGenerator[str, None]:
        """Yields the new text as tokens come; fills ``out`` (its finish_reason is final at the
        end)."""
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        eos = None if (p.ignore_eos or self.tokenizer is None) else self.tokenizer.eos_id
        hold = max((len(s) for s in p.stops), default=1) - 1  # text that may still start a stop string
        emitted = 0
        t0 = self.server.now()
        last = t0
        m = self.metrics
        gen = self.server.generate(p.prompt, p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed)
        try:
            async for tok in gen:
                now = self.server.now()
                if m is not None:
                    m.token(now - t0 if out.tokens == 0 else now - last, first=out.tokens == 0)
                last = now
                out.tokens += 1
                if eos is not None and tok == eos:
                    out.finish_reason = "stop"
                    break
                out.token_ids.append(tok)
                if detok is None:
                    piece = f" {tok}"
                    out.text += piece
                    yield piece
                    continue
                detok.add(tok)
                text = detok.text
                if p.stops:
                    cut = find_stop(text, p.stops, max(0, emitted - hold))
                    if cut >= 0:
                        out.text = text[:cut]
                        out.finish_reason = "stop"
                        if cut > emitted:
                            yield text[emitted:cut]
                        return
                safe = len(text) - hold if p.stops else len(text)
                if safe > emitted:
                    piece = text[emitted:safe]
                    emitted = safe
                    out.text = text[:emitted]
                    yield piece
            if detok is not None:
                detok.flush()
                text = detok.text
                if p.stops:
                    cut = find_stop(text, p.stops, max(0, emitted - hold))
                    if cut >= 0:
                        text = text[:cut]
                        out.finish_reason = "stop"
                out.text = text
                if len(text) > emitted:
                    yield text[emitted:]
        finally:
            await gen.aclose()  # ends the request on the cluster (and frees its KV) if it is still running
            if m is not None:
                m.request_tokens(len(p.prompt), out.tokens, self.server.now() - t0)

    def _usage(self, p: _Params, out: _Outcome) -> dict[str, int]:
        return {"prompt_tokens": len(p.prompt), "completion_tokens": out.tokens, "total_tokens": len(p.prompt) + out.tokens}

    async def _respond(self, request: web.Request, p: _Params) -> web.StreamResponse:
        rid = ("chatcmpl-" if p.chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        m = self.metrics
        out = _Outcome()
        # aclosing: however the response ends (done, failed, the client gone), the token stream is
        # closed now, and with it the request on the host
        async with contextlib.aclosing(self._run(p, out)) as pieces:
            if not p.stream:
                try:
                    async for _ in pieces:
                        pass
                except RequestFailed as e:
                    raise self._failed(e) from None
                except ValueError as e:
                    raise self._refused(e) from None
                if m is not None:
                    m.request_done(out.finish_reason)
                if p.chat:
                    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out.text},
                                              "logprobs": None, "finish_reason": out.finish_reason}
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
                    obj = "text_completion"
                return web.json_response({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                          "choices": [choice], "usage": self._usage(p, out)})
            # the headers go out with the first text: a request the host refuses before its first
            # token is answered with its status (429, 503), not with a 200 and an error event
            try:
                first = await anext(pieces, None)
            except RequestFailed as e:
                raise self._failed(e) from None
            except ValueError as e:
                raise self._refused(e) from None
            return await self._stream(request, p, out, pieces, first, rid, created)

    async def _stream(self, request: web.Request, p: _Params, out: _Outcome, pieces: AsyncIterator[str],
                      first: str | None, rid: str, created: int) -> web.StreamResponse:
        """The server-sent events of a streaming request whose first text (None: it ended with
        none) has come."""
        m = self.metrics
        obj = "chat.completion.chunk" if p.chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": self.model_name}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if p.chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = dict(head, choices=[c])
            if p.include_usage:
                body["usage"] = None
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            if p.chat:
                await resp.write(chunk(None, None, role=True))
            if first is not None:
                await resp.write(chunk(first, None))
                async for piece in pieces:
                    await resp.write(chunk(piece, None))
            await resp.write(chunk(None if p.chat else "", out.finish_reason))
            if p.include_usage:
                body = dict(head, choices=[], usage=self._usage(p, out))
                await resp.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
            if m is not None:
                m.request_done(out.finish_reason)
        except RequestFailed as e:
            err = self._failed(e)
            if m is not None:
                m.request_done({429: "overloaded", 503: "unavailable"}.get(err.status, "error"))
            try:
                await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
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
                await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
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
        body = await self._body(request)
        p = self._params(body, self._prompt_ids(body), chat=False)
        self._check_serving()
        return await self._respond_counted(request, p)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        p = self._params(body, self._chat_ids(body), chat=True)
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
             "root": self.model_name, "max_model_len": self.max_model_len}]})

    async def _health(self, request: web.Request) -> web.Response:
        s = self.server
        if s.ready and not s.closing:
            return web.json_response({"status": "ok", "workers": s.workers})
        return web.json_response({"status": "shutting down" if s.closing else "starting"}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        data, ctype = self.metrics.render()
        return web.Response(body=data, headers={"Content-Type": ctype})
