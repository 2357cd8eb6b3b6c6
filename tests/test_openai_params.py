"""The API a real model needs, spoken to with the official ``openai`` client (async) against the
in-memory host of ``test_openai_fake_host.py``: the sampling parameters reach the host as a
``SamplingParams``, ``min_tokens`` and the end-of-text ids, log-probabilities in OpenAI's shapes,
``n`` > 1, the fields refused (a 400 naming them) and those accepted at their no-op values, the
streaming rules (one chunk per token, the finish reason on the last), ``stream_options`` without
``stream``, an assistant turn with tool calls and no content, a 405's type, vLLM's
``/tokenize``, ``/detokenize`` and ``/version``, and ``/v1/models``.

Expected values come from the fake host's known rules (its script, its made-up log-probabilities)
and from ``tokenizers`` itself, never from the API.
"""

from __future__ import annotations

from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")
pytest.importorskip("tokenizers")

from test_openai_fake_host import (  # noqa: E402
    ECHO,
    EOS,
    EOS_ID,
    MODEL,
    SCRIPT,
    TOK,
    VARY,
    Client,
    FakeHost,
    fake_logprob,
    fake_top,
    serve,
)

from helix_async import __version__  # noqa: E402
from helix_async.sampling import SamplingParams  # noqa: E402


def client(url: str, *, v1: bool = True) -> Any:
    return openai.AsyncOpenAI(base_url=url + ("/v1" if v1 else ""), api_key="unused", max_retries=0, timeout=60)


def text_of(ids: list[int]) -> str:
    """What ``tokenizers`` itself decodes ``ids`` to (special tokens skipped)."""
    return str(TOK.tok.decode(ids, skip_special_tokens=True))


def token_text(i: int) -> str:
    return str(TOK.tok.decode([i], skip_special_tokens=False))


def script(n: int, start: int = 0) -> list[int]:
    return [SCRIPT[(start + i) % len(SCRIPT)] for i in range(n)]


def sampling(host: FakeHost, i: int = -1) -> SamplingParams:
    sp = host.requests[i]["sampling"]
    assert isinstance(sp, SamplingParams)
    return sp


# ---- sampling parameters ----------------------------------------------------------------------


def test_penalties_top_k_and_min_p_reach_the_host() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        extra = {"top_k": 7, "min_p": 0.05, "repetition_penalty": 1.3}
        r = await c.completions.create(model=MODEL, prompt="The planner", max_tokens=3, temperature=0.7, seed=11,
                                       frequency_penalty=0.5, presence_penalty=-0.25, extra_body=extra)
        assert r.choices[0].text == text_of(script(3))
        assert sampling(host) == SamplingParams(temperature=0.7, top_k=7, min_p=0.05, seed=11, presence_penalty=-0.25,
                                                frequency_penalty=0.5, repetition_penalty=1.3, stop_token_ids=(EOS_ID,))
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         temperature=0, frequency_penalty=2, extra_body={"top_k": -1, "min_p": 0})
        sp = sampling(host)
        assert (sp.temperature, sp.top_k, sp.min_p, sp.frequency_penalty) == (0.0, 0, 0.0, 2.0)  # top_k -1: all
        for bad, param in (({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                           ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty")):
            with pytest.raises(openai.BadRequestError) as e:
                await c.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=bad)
            assert e.value.param == param and param in e.value.message
        assert len(host.requests) == 2
        await c.close()

    serve(body)


def test_min_tokens_bans_the_end_of_text_ids_and_ignore_eos_drops_them() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        r = await c.completions.create(model=MODEL, prompt=[EOS, 5], max_tokens=8)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4  # the EOS counts
        r = await c.completions.create(model=MODEL, prompt=[EOS, 5], max_tokens=8, extra_body={"min_tokens": 5})
        assert sampling(host).min_tokens == 5 and EOS_ID in sampling(host).stop_token_ids
        assert r.choices[0].finish_reason == "length" and r.choices[0].text == text_of(script(8))
        await c.completions.create(model=MODEL, prompt=[EOS, 5], max_tokens=8,
                                   extra_body={"min_tokens": 5, "ignore_eos": True, "stop_token_ids": [SCRIPT[6]]})
        assert sampling(host).stop_token_ids == (SCRIPT[6],)
        # a stop_token_ids id ends the choice ("stop"), after min_tokens; its text is not shown
        r = await c.completions.create(model=MODEL, prompt=[5], max_tokens=12, extra_body={"stop_token_ids": [SCRIPT[6]]})
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 7
        assert r.choices[0].text == text_of(script(6))
        # a stop string is looked for from the min_tokens-th token on, and only in new text
        full = text_of(script(len(SCRIPT)))
        k = next(i for i in range(1, len(SCRIPT) + 1) if "each" in text_of(script(i)))
        r = await c.completions.create(model=MODEL, prompt=[5], max_tokens=len(SCRIPT), stop="each",
                                       extra_body={"min_tokens": k})
        assert (r.choices[0].text, r.choices[0].finish_reason) == (full[: full.index("each")], "stop")
        r = await c.completions.create(model=MODEL, prompt=[5], max_tokens=len(SCRIPT), stop="each",
                                       extra_body={"min_tokens": k + 1})
        assert (r.choices[0].text, r.choices[0].finish_reason) == (full, "length")
        with pytest.raises(openai.BadRequestError, match="min_tokens"):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"min_tokens": 5})
        await c.close()

    serve(body)


# ---- log-probabilities --------------------------------------------------------------------------


def test_completion_logprobs_in_openais_shape_plain_and_streamed() -> None:
    k, n = 2, 5

    def expect_top(i: int) -> dict[str, float]:
        d = {token_text(t): v for t, v in fake_top(i, k)}
        d.setdefault(token_text(SCRIPT[i]), fake_logprob(i))  # the chosen token too (OpenAI: up to k + 1)
        return d

    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        r = await c.completions.create(model=MODEL, prompt=[5], max_tokens=n, logprobs=k)
        assert sampling(host).logprobs == k
        lp = r.choices[0].logprobs
        tokens = [token_text(t) for t in script(n)]
        assert lp.tokens == tokens
        assert lp.token_logprobs == [fake_logprob(i) for i in range(n)]
        assert lp.top_logprobs == [expect_top(i) for i in range(n)]
        assert lp.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(n)]
        stream = await c.completions.create(model=MODEL, prompt=[5], max_tokens=n, logprobs=k, stream=True)
        chunks = [ch async for ch in stream]
        assert len(chunks) == n  # one per token, each with that token's log-probabilities
        assert [ch.choices[0].logprobs.tokens for ch in chunks] == [[t] for t in tokens]
        assert [ch.choices[0].logprobs.text_offset for ch in chunks] == [[o] for o in lp.text_offset]
        r = await c.completions.create(model=MODEL, prompt=[5], max_tokens=2)
        assert r.choices[0].logprobs is None and sampling(host).logprobs is None
        await c.close()

    serve(body)


def test_chat_logprobs_and_top_logprobs_in_openais_shape() -> None:
    k, n = 3, 4
    msgs = [{"role": "user", "content": "hi"}]

    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        r = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=n, logprobs=True, top_logprobs=k)
        content = r.choices[0].logprobs.content
        assert [e.token for e in content] == [token_text(t) for t in script(n)]
        assert [e.logprob for e in content] == [fake_logprob(i) for i in range(n)]
        assert [e.bytes for e in content] == [list(token_text(t).encode()) for t in script(n)]
        assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in content] == \
            [[(token_text(t), v) for t, v in fake_top(i, k)] for i in range(n)]
        r = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=n, logprobs=True)
        assert sampling(host).logprobs == 0 and all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
        stream = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=n, logprobs=True,
                                                 top_logprobs=1, stream=True)
        chunks = [ch async for ch in stream][1:]  # after the role chunk: one per token
        assert [ch.choices[0].logprobs.content[0].token for ch in chunks] == [token_text(t) for t in script(n)]
        with pytest.raises(openai.BadRequestError, match="'top_logprobs' needs 'logprobs'") as e:
            await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, top_logprobs=2)
        assert e.value.param == "top_logprobs"
        await c.close()

    serve(body)


# ---- n > 1 --------------------------------------------------------------------------------------


def test_n_choices_are_independent_generations_seeded_from_the_requests_seed() -> None:
    n, seed, length = 3, 40, 5

    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        r = await c.completions.create(model=MODEL, prompt=[VARY], max_tokens=length, n=n, seed=seed)
        assert [ch.index for ch in r.choices] == list(range(n))
        assert [ch.text for ch in r.choices] == [text_of(script(length, seed + i)) for i in range(n)]
        assert sorted(sampling(host, i).seed for i in range(n)) == [seed, seed + 1, seed + 2]
        assert r.usage.completion_tokens == n * length and r.usage.prompt_tokens == 1
        stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=length, n=n, seed=seed, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        texts = {i: "" for i in range(n)}
        finals = {}
        for ch in chunks[:-1]:
            (choice,) = ch.choices
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finals[choice.index] = choice.finish_reason
        assert texts == {i: text_of(script(length, 0)) for i in range(n)}  # the chat prompt is not VARY
        assert finals == {i: "length" for i in range(n)}
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n * length
        assert sorted(host.closed) == list(range(2 * n))
        await c.close()

    serve(body)


# ---- refused fields, and their no-op values -------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "bad", "noop"),
    [
        ("response_format", {"type": "json_object"}, {"type": "text"}),
        ("echo", True, False),
        ("logit_bias", {"5": 10}, {}),
        ("best_of", 3, 1),
        ("suffix", "end", ""),
        ("tools", [{"type": "function", "function": {"name": "f"}}], []),
        ("tool_choice", "required", "none"),
        ("use_beam_search", True, False),
        ("include_stop_str_in_output", True, False),
        ("skip_special_tokens", False, True),
        ("guided_json", {"type": "object"}, None),
        ("prompt_logprobs", 1, None),
        ("length_penalty", 0.5, 1.0),
    ],
)
def test_unsupported_fields_are_refused_naming_them_unless_at_their_no_op_value(field: str, bad: Any, noop: Any) -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                            extra_body={field: bad})
        assert e.value.param == field and f"'{field}' is not supported" in e.value.message
        assert e.value.type == "invalid_request_error" and host.requests == []
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                            extra_body={field: noop})
        assert r.choices[0].message.content == text_of(script(2))
        await c.close()

    serve(body)


def test_continuous_usage_stats_is_refused_and_stream_options_needs_stream() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        with pytest.raises(openai.BadRequestError) as e:
            await c.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True})
        assert e.value.param == "stream_options.continuous_usage_stats"
        stream = await c.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True,
                                            stream_options={"continuous_usage_stats": False})
        assert "".join([ch.choices[0].text async for ch in stream]) == text_of(script(2))
        with pytest.raises(openai.BadRequestError) as e:
            await c.completions.create(model=MODEL, prompt="x", max_tokens=2, stream_options={"include_usage": True})
        assert e.value.param == "stream_options" and "'stream' is true" in e.value.message
        assert len(host.requests) == 1
        await c.close()

    serve(body)


# ---- streaming ------------------------------------------------------------------------------------


def test_a_token_inside_a_character_still_sends_a_chunk() -> None:
    # "é" is the bytes C3 A9; byte-level BPE spells those bytes as the characters U+00C3 and U+00A9
    first, second = TOK.tok.token_to_id("\u00c3"), TOK.tok.token_to_id("\u00a9")
    word = TOK.tok.encode(" planner", add_special_tokens=False).ids
    assert first is not None and second is not None
    tokens = [first, second, *word]

    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        stream = await c.completions.create(model=MODEL, prompt=[ECHO, *tokens], max_tokens=len(tokens), stream=True)
        texts = [ch.choices[0].text async for ch in stream]
        assert texts[:2] == ["", "é"] and len(texts) == len(tokens)  # one chunk per token, the first empty
        assert "".join(texts) == "é planner"
        stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=len(tokens), stream=True)
        assert len([ch async for ch in stream]) == 1 + len(tokens)  # the role chunk, then one per token
        await c.close()

    serve(body)


def test_the_finish_reason_comes_with_the_last_tokens_chunk() -> None:
    full = text_of(script(len(SCRIPT)))
    stop = "each"
    cut = full.index(stop)

    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        cases = [({"prompt": [5], "max_tokens": 6}, "length", 6), ({"prompt": [EOS, 5], "max_tokens": 8}, "stop", 4),
                 ({"prompt": [5], "max_tokens": 100, "stop": stop}, "stop", None)]
        for req, reason, count in cases:
            stream = await c.completions.create(model=MODEL, stream=True, **req)
            chunks = [ch async for ch in stream]
            finals = [i for i, ch in enumerate(chunks) if ch.choices[0].finish_reason]
            assert finals == [len(chunks) - 1] and chunks[-1].choices[0].finish_reason == reason
            assert len(chunks) == host.produced[len(host.requests) - 1]  # no extra, empty chunk
            if count is not None:
                assert len(chunks) == count
            text = "".join(ch.choices[0].text for ch in chunks)
            assert text == (full[:cut] if req.get("stop") else text_of(script(3 if reason == "stop" else 6)))
        # the last chunk of a max_tokens run carries the last token's text
        stream = await c.completions.create(model=MODEL, prompt=[ECHO, *SCRIPT[:3]], max_tokens=3, stream=True)
        chunks = [ch async for ch in stream]
        assert chunks[-1].choices[0].text == text_of(SCRIPT[:3])[len(text_of(SCRIPT[:2])):]
        await c.close()

    serve(body)


# ---- chat messages --------------------------------------------------------------------------------


def test_an_assistant_turn_with_tool_calls_and_null_content_is_accepted() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}, {"role": "user", "content": "thanks"}]
    # the tiny template renders a role line, the content ("" for none) and </s> per message
    rendered = ("<s><|user|>\nadd 1 and 2</s>\n<|assistant|>\n</s>\n<|tool|>\n3</s>\n<|user|>\nthanks</s>\n"
                "<|assistant|>\n")

    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        r = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
        assert r.choices[0].message.content == text_of(script(3))
        assert host.requests[0]["prompt"] == TOK.tok.encode(rendered, add_special_tokens=False).ids
        await c.close()

    serve(body)


# ---- routes -----------------------------------------------------------------------------------------


def test_a_wrong_method_is_a_405_typed_invalid_request_error() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        with pytest.raises(openai.APIStatusError) as e:
            await c.get("/completions", cast_to=object)
        assert e.value.status_code == 405 and e.value.type == "invalid_request_error"
        await c.close()

    serve(body)


def test_tokenize_detokenize_and_version_as_vllm_has_them() -> None:
    text = "The planner places layers"
    ids = TOK.tok.encode(text).ids  # with <s>, as the tokenizer adds it

    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url, v1=False)
        r = await c.post("/tokenize", body={"model": MODEL, "prompt": text, "return_token_strs": True}, cast_to=object)
        assert r == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                     "token_strs": [TOK.tok.id_to_token(i) for i in ids]}
        r = await c.post("/tokenize", body={"prompt": text, "add_special_tokens": False}, cast_to=object)
        assert r["tokens"] == ids[1:] and r["token_strs"] is None
        r = await c.post("/tokenize", body={"messages": [{"role": "user", "content": "hi"}]}, cast_to=object)
        assert r["tokens"] == TOK.tok.encode("<s><|user|>\nhi</s>\n<|assistant|>\n", add_special_tokens=False).ids
        r = await c.post("/detokenize", body={"tokens": ids}, cast_to=object)
        assert r == {"prompt": TOK.tok.decode(ids, skip_special_tokens=False)}
        with pytest.raises(openai.BadRequestError) as e:
            await c.post("/detokenize", body={"tokens": [99999]}, cast_to=object)
        assert e.value.param == "tokens"
        assert await c.get("/version", cast_to=object) == {"version": __version__}
        await c.close()

    serve(body)


def test_models_names_the_served_model() -> None:
    async def body(host: FakeHost, s: Client, url: str) -> None:
        c = client(url)
        models = await c.models.list()
        assert [(m.id, m.object, m.owned_by) for m in models.data] == [(MODEL, "model", "helix_async")]
        await c.close()

    serve(body)


def test_bench_serve_counts_one_chunk_per_token_the_last_included() -> None:
    from helix_async.frontend.bench_serve import run_bench

    reqs = [(0.0, 3, 4), (0.0, 5, 1), (0.01, 2, 6)]

    async def body(host: FakeHost, s: Client, url: str) -> None:
        results, _, facts = await run_bench(url, reqs, seed=0)
        assert facts["model"] == MODEL and facts["max_model_len"] == 256
        assert [r.ok for r in results] == [True] * 3 and [r.tokens for r in results] == [4, 1, 6]
        assert [len(r.itl) for r in results] == [3, 0, 5]  # a gap between each two of a request's chunks
        assert all(r.ttft <= r.latency for r in results)

    serve(body)
