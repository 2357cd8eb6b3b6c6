"""The last stage's sampler (helix_async/executors/sampling.py) and the sampling fields end to end.

* the arithmetic against transformers' logits processors, the independent oracle: the repetition
  penalty (``RepetitionPenaltyLogitsProcessor``), ``min_tokens`` (``MinNewTokensLengthLogitsProcessor``),
  temperature, ``top_k``, ``top_p`` and ``min_p`` (their warpers, chained in that order); the
  presence and frequency penalties against OpenAI's formula written out in float64; the
  log-probabilities against a float64 log-softmax; the draws against the truncated distribution;
* a seeded request repeats exactly whatever it is batched with, and after a migration it goes on
  with the tokens it would have drawn;
* through three in-memory workers (virtual time) computing a tiny LLaMA made by transformers, or
  the real model (SmolLM2, where it is installed), and through two worker processes over ZeroMQ
  (``HostServer.generate``): the penalties, the ban and the logprobs reach the last stage and
  give transformers' ``generate`` tokens.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_oracle import hf_greedy, make_checkpoint  # noqa: E402
from polling import wait_until  # noqa: E402
from real_model import SMOLLM2_GGUF, needs_real_model  # noqa: E402
from transformers import (  # noqa: E402
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from helix_async.clock import LoopClock  # noqa: E402
from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES  # noqa: E402
from helix_async.cluster.spec import ClusterSpec, Link, Node  # noqa: E402
from helix_async.codec import decode, encode  # noqa: E402
from helix_async.executors.llama import load_stage  # noqa: E402
from helix_async.executors.sampling import RequestSampler, sample, sampler_for, step_seed  # noqa: E402
from helix_async.executors.torch import TorchExecutor  # noqa: E402
from helix_async.host import Host  # noqa: E402
from helix_async.ids import SINK, SOURCE, NodeRef  # noqa: E402
from helix_async.messages import PromptWork, TokenResult, sampling_fields  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.routing import FlowRouter, KVTracker  # noqa: E402
from helix_async.sampling import SampledToken, SamplingParams  # noqa: E402
from helix_async.settings import WorkerSettings  # noqa: E402
from helix_async.transport import HOST  # noqa: E402
from helix_async.transport.memory import MemoryNetwork  # noqa: E402
from helix_async.vloop import VirtualTimeLoop  # noqa: E402
from helix_async.worker import BatchLimits, Worker  # noqa: E402

V = 1000  # vocabulary of the unit tests


def logits_row(seed: int, vocab: int = V) -> torch.Tensor:
    """Seeded logits (vocab,) spread like a model's (a few stand out)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 2.5


def history(seed: int, n: int, vocab: int = V) -> list[int]:
    """``n`` seeded token ids, with repeats (ids from a small range)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, vocab // 10, size=n)]


# --- the arithmetic against transformers' processors -------------------------------------------------


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_transformers(penalty: float) -> None:
    row = logits_row(1)
    row[5] = 0.0  # a zero logit stays zero
    ctx = [5, *history(2, 40)]
    s = RequestSampler(SamplingParams(repetition_penalty=penalty), V, context=ctx, generated=10)
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ctx]), row[None].clone())[0]
    assert torch.equal(s.penalised(row), want)
    assert not torch.equal(want, row)  # (the penalty changed something)


def test_presence_and_frequency_penalties_follow_openais_formula() -> None:
    row = logits_row(3)
    prompt, out = history(4, 30), history(5, 25)
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4)
    s = RequestSampler(p, V, context=prompt + out, generated=len(out))
    # mu[j] - count[j] * frequency - [count[j] > 0] * presence, over the output tokens only
    counts = Counter(out)
    want = row.double().numpy().copy()
    for tok, c in counts.items():
        want[tok] -= c * p.frequency_penalty + p.presence_penalty
    got = s.penalised(row).double().numpy()
    assert np.allclose(got, want, atol=1e-5, rtol=0)
    only_prompt = sorted(set(prompt) - set(out))
    assert only_prompt and np.array_equal(got[only_prompt], row.double().numpy()[only_prompt])


CHAINS = [
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2, min_tokens=5,
                   stop_token_ids=(3, 7)),
    SamplingParams(temperature=1.5, top_k=3),
    SamplingParams(temperature=0.6, top_p=0.5),
    SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=0.8),
    SamplingParams(temperature=2.0, top_k=400, top_p=0.99, min_p=0.01),
]


@pytest.mark.parametrize("params", CHAINS)
@pytest.mark.parametrize("seed", [11, 12])
def test_penalties_ban_temperature_and_truncation_are_transformers_chain(
    params: SamplingParams, seed: int
) -> None:
    row = logits_row(seed)
    row[3] = row[7] = float(row.max()) + 1.0  # the stop ids would win if not banned
    prompt, out = history(seed, 20), history(seed + 1, 2)
    s = RequestSampler(params, V, context=prompt + out, generated=len(out))
    chain = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.min_tokens:
        stops = list(params.stop_token_ids)
        chain.append(MinNewTokensLengthLogitsProcessor(len(prompt), params.min_tokens, stops))
    chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        chain.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        chain.append(MinPLogitsWarper(params.min_p))
    want = chain(torch.tensor([prompt + out]), row[None].clone())[0]
    got = s.truncated(s.ban(s.penalised(row)))
    kept = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), kept) and 1 <= int(kept.sum()) < V
    assert torch.allclose(got[kept], want[kept], rtol=1e-6, atol=0)
    if params.min_tokens:
        assert not kept[3] and not kept[7]


def test_greedy_takes_the_arg_max_of_the_penalised_and_banned_logits() -> None:
    row = logits_row(21)
    top = int(torch.argmax(row))
    s = RequestSampler(SamplingParams(repetition_penalty=50.0), V, context=[top])
    assert s.choose(row) != top  # the penalty moved it
    want = RepetitionPenaltyLogitsProcessor(50.0)(torch.tensor([[top]]), row[None].clone())[0]
    assert s.generated == 1 and int(torch.argmax(want)) != top
    banned = RequestSampler(SamplingParams(min_tokens=2, stop_token_ids=(top,)), V)
    second = int(torch.topk(row, 2).indices[1])
    assert [banned.choose(row) for _ in range(3)] == [second, second, top]


def test_logprobs_are_the_log_softmax_of_the_penalised_logits() -> None:
    row = logits_row(31)
    prompt = history(32, 30)
    p = SamplingParams(temperature=0.9, repetition_penalty=1.4, frequency_penalty=0.3, logprobs=5, seed=3)
    s = RequestSampler(p, V, context=prompt)
    tok = s.choose(row)
    assert isinstance(tok, SampledToken)
    x = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([prompt]), row[None].clone())[0].double().numpy()
    lse = np.log(np.exp(x - x.max()).sum()) + x.max()
    ref = x - lse
    assert abs(tok.logprob - ref[tok.token_id]) < 1e-5
    order = np.argsort(-ref)[:5]
    assert [t for t, _ in tok.top] == [int(i) for i in order]
    assert all(abs(lp - ref[t]) < 1e-5 for t, lp in tok.top)
    assert all(type(lp) is float and lp <= 0 for _, lp in (tok[:2], *tok.top))
    # the next token's: the repetition penalty counts the first token now, the frequency penalty too
    tok2 = s.choose(row)
    assert isinstance(tok2, SampledToken)
    seq = torch.tensor([[*prompt, tok.token_id]])
    x2 = RepetitionPenaltyLogitsProcessor(1.4)(seq, row[None].clone())[0].double().numpy()
    x2[tok.token_id] -= 0.3
    assert abs(tok2.logprob - (x2[tok2.token_id] - (np.log(np.exp(x2 - x2.max()).sum()) + x2.max()))) < 1e-5
    # logprobs=0: the chosen token's only; a stop id held back is still reported in the distribution
    zero = RequestSampler(SamplingParams(logprobs=0), V).choose(row)
    assert isinstance(zero, SampledToken) and zero.top == () and zero.token_id == int(torch.argmax(row))


def test_logprobs_stay_finite_for_the_wire() -> None:
    row = torch.full((8,), -math.inf)
    row[2], row[5] = 1.0, 0.5
    tok = RequestSampler(SamplingParams(logprobs=4), 8).choose(row)
    assert isinstance(tok, SampledToken) and tok.token_id == 2
    assert all(math.isfinite(lp) and lp <= 0 for _, lp in tok.top)
    msg = TokenResult(request_id=1, token_id=tok.token_id, context_len=3, finished=False, sent_at=0.0,
                      logprobs=((tok.token_id, tok.logprob), *tok.top))
    assert decode([bytes(f) for f in encode(msg)]) == msg


def test_draws_follow_the_truncated_distribution() -> None:
    row = logits_row(41, vocab=64)
    p = SamplingParams(temperature=0.7, top_k=8, top_p=0.95, seed=5)
    want = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.95)])(
        torch.zeros(1, 1, dtype=torch.long), row[None].clone())[0]
    probs = torch.softmax(want.double(), dim=-1).numpy()
    s = RequestSampler(p, 64)
    n = 4000
    counts = np.bincount([int(s.choose(row)) for _ in range(n)], minlength=64)
    assert counts[probs == 0].sum() == 0  # nothing outside the kept tokens
    freq = counts / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-3), (freq, probs)


# --- seeded draws: batch-independent, repeatable, migration-proof ---------------------------------------

SEEDED = SamplingParams(temperature=1.2, top_k=100, top_p=0.97, presence_penalty=0.5, frequency_penalty=0.2,
                        repetition_penalty=1.1, seed=1234)


def test_a_seeded_request_draws_the_same_tokens_whatever_its_batch() -> None:
    rows = torch.stack([logits_row(50 + j) for j in range(4)])
    prompt = history(55, 12)
    alone = RequestSampler(SEEDED, V, context=prompt)
    batched = RequestSampler(SEEDED, V, context=prompt)
    other = RequestSampler(SamplingParams(temperature=0.9, seed=77), V)
    other_seed = RequestSampler(SamplingParams(**{**sampling_kw(SEEDED), "seed": 1235}), V, context=prompt)
    a, b, c = [], [], []
    for step in range(30):
        step_rows = rows + 0.1 * step  # the logits move from step to step
        a.append(sample(step_rows[:1], [alone])[0])
        got = sample(step_rows[[1, 0, 2, 0]], [None, batched, other, other_seed])
        assert got[0] == int(torch.argmax(step_rows[1]))  # the plain rows: their arg-max
        b.append(got[1])
        c.append(got[3])
    assert a == b and a != c and len(set(a)) > 5


def sampling_kw(p: SamplingParams) -> dict[str, Any]:
    return {f: getattr(p, f) for f in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                                       "frequency_penalty", "repetition_penalty", "min_tokens", "stop_token_ids",
                                       "logprobs")}


def test_after_a_migration_a_request_draws_on_as_it_would_have() -> None:
    prompt = history(60, 15)
    rows = [logits_row(70 + i) for i in range(12)]
    first = RequestSampler(SEEDED, V, context=prompt)
    tokens = [int(first.choose(r)) for r in rows]
    # moved after 5 tokens: its new last stage gets the prompt plus those 5, 5 of them generated
    moved = RequestSampler(SEEDED, V, context=prompt + tokens[:5], generated=5)
    assert [int(moved.choose(r)) for r in rows[5:]] == tokens[5:]
    assert step_seed(1234, 0) != step_seed(1234, 1) != step_seed(1235, 0)
    assert all(0 <= step_seed(s, i) < 2**63 for s in (0, 2**63 - 1) for i in (0, 10**9))


def test_only_requests_that_need_it_get_a_sampler() -> None:
    base = PromptWork(request_id=1, query_id=1, route=((0, 0, 2),), stage=0, num_tokens=2, token_ids=(4, 4),
                      max_tokens=3, sent_at=0.0)
    assert sampler_for(base, V) is None
    assert sampler_for(PromptWork(**{**_fields(base), "min_tokens": 3}), V) is None  # no stop id to ban
    assert sampler_for(PromptWork(**{**_fields(base), "top_p": 0.5, "top_k": 3}), V) is None  # greedy anyway
    for change in ({"temperature": 0.5}, {"repetition_penalty": 1.1}, {"presence_penalty": 0.1},
                   {"frequency_penalty": -0.1}, {"min_tokens": 1, "stop_token_ids": (2,)}, {"logprobs": 0}):
        s = sampler_for(PromptWork(**{**_fields(base), **change}), V)
        assert s is not None, change
    s = sampler_for(PromptWork(**{**_fields(base), "repetition_penalty": 1.5}), V)
    assert s is not None and s.seen is not None and s.seen.nonzero().flatten().tolist() == [4]


def _fields(m: PromptWork) -> dict[str, Any]:
    return {f: getattr(m, f) for f in PromptWork.FIELDS}


# --- through three in-memory workers computing a transformers checkpoint ----------------------------------

LAYERS = 6
STAGES = [(0, 2), (2, 4), (4, 6)]
VOCAB = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    d = tmp_path_factory.mktemp("tiny-llama-sampling")
    model = make_checkpoint(d, 4321, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    yield d, model


class Spied:
    """A transport whose received prompts are also appended to ``seen``."""

    def __init__(self, inner: Any, seen: list[PromptWork]) -> None:
        self._inner = inner
        self._seen = seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def set_handler(self, handler: Any) -> None:
        def spy(sender: NodeRef, msg: Any) -> None:
            if isinstance(msg, PromptWork):
                self._seen.append(msg)
            handler(sender, msg)

        self._inner.set_handler(spy)


@pytest.fixture
def loops() -> Iterator[list[VirtualTimeLoop]]:
    """The virtual loops a test makes, closed at its end."""
    made: list[VirtualTimeLoop] = []
    yield made
    for lp in made:
        lp.close()


def chain(
    ckpt: Path, loops: list[VirtualTimeLoop], stages: list[tuple[int, int]] = STAGES
) -> tuple[VirtualTimeLoop, Host, list[PromptWork]]:
    """Host and three torch workers computing ``stages`` of ``ckpt`` on a new virtual loop (added to
    ``loops``); the list collects the prompts the last stage received."""
    layers = stages[-1][1]
    loop = VirtualTimeLoop()
    loops.append(loop)
    clock = LoopClock(loop)
    t = DEFAULT_MACHINE_TYPES["A100"]
    arcs: list[tuple[NodeRef, NodeRef]] = [(SOURCE, 0), (0, 1), (1, 2), (2, SINK)]
    spec = ClusterSpec("tiny", {"A100": t}, tuple(Node(i, "A100") for i in range(3)),
                       tuple(Link(a, b, 1e9, 0.002, False) for a, b in arcs))
    net = MemoryNetwork(clock, spec, arcs, lambda s, d, m: 0.0)
    ranges = dict(enumerate(stages))
    kv = KVTracker({i: 10**6 for i in ranges}, ranges, kv_fill_limit=1.0, output_ratio=0.0, avg_output_len=0,
                   num_layers=layers)
    links: dict[NodeRef, list[tuple[NodeRef, float]]] = {
        SOURCE: [(0, 1.0)], 0: [(1, 1.0)], 1: [(2, 1.0)], 2: [(SINK, 1.0)]
    }
    router = FlowRouter(ranges, links, {i: 2048 for i in ranges}, kv, layers)
    last_prompts: list[PromptWork] = []
    for i, (a, b) in ranges.items():
        ex = TorchExecutor(clock, load_stage(ckpt, a, b), threaded=False)
        ep: Any = net.endpoint(i) if i < 2 else Spied(net.endpoint(i), last_prompts)
        w = Worker(i, clock, ep, ex,
                   WorkerSettings(layers=(a, b), num_layers=layers, limits=BatchLimits(8, 2048, 16, 10**6),
                                  kv_capacity=10**7, activation_bytes=128))
        w.start()
    host = Host(clock, net.endpoint(HOST), router=router)
    host.start()
    return loop, host, last_prompts


def hf_generate(model: Any, prompt: list[int], n: int, **kw: Any) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy ``generate`` with ``kw`` (its processors): the new tokens and the raw
    logits of each step."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, **kw)
    return [int(t) for t in out.sequences[0, len(prompt):]], [x[0] for x in out.logits]


PROMPT = [5, 9, 5, 9, 5, 9, 17, 5, 9, 33]


def test_penalty_ban_and_logprobs_reach_the_last_stage_and_give_transformers_tokens(
    checkpoint: tuple[Path, Any], loops: list[VirtualTimeLoop]
) -> None:
    ckpt, model = checkpoint
    plain = hf_greedy(model, PROMPT, 12)
    stop = plain[1]  # the model's second token, held back for 4 tokens
    p = SamplingParams(repetition_penalty=1.6, min_tokens=4, stop_token_ids=(stop,), logprobs=3)
    want, raw = hf_generate(model, PROMPT, 12, repetition_penalty=1.6, min_new_tokens=4, eos_token_id=stop)
    loop, host, last = chain(ckpt, loops)
    got: list[Any] = []
    host.on_token = lambda q, tok, end: got.append(tok)
    assert host.submit(0, len(PROMPT), 12, tuple(PROMPT), p) is not None
    loop.run_until(60.0)
    assert len(got) == 12 and all(isinstance(t, SampledToken) for t in got)
    ids = [t.token_id for t in got]
    # transformers stops at its end-of-text (the stop id): the tokens up to it are ours
    assert ids[: len(want)] == want and stop not in ids[:4] and ids != plain
    # the last stage got the prompt's ids (the penalty counts them), the first stage forwarded them
    assert [m.context_ids for m in last] == [tuple(PROMPT)] and last[0].repetition_penalty == 1.6
    # logprobs: log-softmax of the raw logits with transformers' repetition penalty, not the ban
    seq = list(PROMPT)
    for k, tok in enumerate(got[: len(want)]):
        x = RepetitionPenaltyLogitsProcessor(1.6)(torch.tensor([seq]), raw[k][None].clone())[0].double()
        ref = torch.log_softmax(x, dim=-1)
        assert abs(tok.logprob - float(ref[tok.token_id])) < 1e-4
        assert [t for t, _ in tok.top] == torch.topk(ref, 3).indices.tolist()
        seq.append(tok.token_id)


def test_presence_and_frequency_penalties_through_the_pipeline(
    checkpoint: tuple[Path, Any], loops: list[VirtualTimeLoop]
) -> None:
    ckpt, model = checkpoint
    p = SamplingParams(presence_penalty=1.0, frequency_penalty=0.8)
    # the oracle: transformers' logits, OpenAI's formula in float64, the arg-max, step by step
    seq, want, counts = list(PROMPT), [], Counter[int]()
    with torch.no_grad():
        for _ in range(10):
            x = model(torch.tensor([seq])).logits[0, -1].double().numpy()
            for tok, c in counts.items():
                x[tok] -= c * 0.8 + 1.0
            t = int(np.argmax(x))
            want.append(t)
            counts[t] += 1
            seq.append(t)
    loop, host, _ = chain(ckpt, loops)
    got: list[int] = []
    host.on_token = lambda q, tok, end: got.append(tok)
    host.submit(0, len(PROMPT), 10, tuple(PROMPT), p)
    loop.run_until(60.0)
    assert got == want and got != hf_greedy(model, PROMPT, 10)


def test_a_seeded_sampled_request_repeats_whatever_runs_beside_it(
    checkpoint: tuple[Path, Any], loops: list[VirtualTimeLoop]
) -> None:
    ckpt, _ = checkpoint
    p = SamplingParams(temperature=1.3, top_k=40, top_p=0.95, min_p=0.02, frequency_penalty=0.5, seed=99)
    runs = []
    for others in (0, 3):
        loop, host, _ = chain(ckpt, loops)
        got: dict[int, list[int]] = {}
        host.on_token = lambda q, tok, end, got=got: got.setdefault(q.qid, []).append(tok)
        for j in range(others):  # other requests in the same batches, greedy and sampled
            host.submit(10 + j, 3 + j, 16, tuple(range(1, 4 + j)), SamplingParams(temperature=0.7 * j, seed=j))
        host.submit(0, len(PROMPT), 16, tuple(PROMPT), p)
        loop.run_until(60.0)
        runs.append(got[0])
    assert runs[0] == runs[1] and len(runs[0]) == 16
    loop, host, _ = chain(ckpt, loops)
    other: list[int] = []
    host.on_token = lambda q, tok, end: other.append(tok)
    host.submit(0, len(PROMPT), 16, tuple(PROMPT), SamplingParams(**{**sampling_kw(p), "seed": 100}))
    loop.run_until(60.0)
    assert other != runs[0]


@needs_real_model
@pytest.mark.slow
def test_the_real_models_penalised_tokens_and_logprobs_are_transformers(
    loops: list[VirtualTimeLoop],
) -> None:
    """SmolLM2 (the packaged GGUF, de-quantised to float32 by both sides) through three workers:
    a repetition penalty, the end-of-text id held back by min_tokens, and top-3 logprobs."""
    path = SMOLLM2_GGUF
    assert path is not None
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    chat = tok.apply_chat_template([{"role": "user", "content": "List three fruits, then three fruits again."}],
                                   add_generation_prompt=True)
    prompt = [int(t) for t in (chat["input_ids"] if hasattr(chat, "keys") else chat)]
    eos = 2  # <|im_end|>
    plain = hf_greedy(model, prompt, 16)
    want, raw = hf_generate(model, prompt, 16, repetition_penalty=1.3, min_new_tokens=8, eos_token_id=eos)
    loop, host, _ = chain(path, loops, [(0, 10), (10, 20), (20, 30)])
    got: list[Any] = []
    host.on_token = lambda q, t, end: got.append(t)
    p = SamplingParams(repetition_penalty=1.3, min_tokens=8, stop_token_ids=(eos,), logprobs=3)
    host.submit(0, len(prompt), 16, tuple(prompt), p)
    loop.run_until(600.0)
    ids = [t.token_id for t in got]
    assert ids[: len(want)] == want and ids != plain
    seq = list(prompt)
    for k, t in enumerate(got[: len(want)]):
        x = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seq]), raw[k][None].clone())[0]
        ref = torch.log_softmax(x.double(), dim=-1)
        assert abs(t.logprob - float(ref[t.token_id])) < 1e-3
        assert [i for i, _ in t.top] == torch.topk(ref, 3).indices.tolist()
        seq.append(t.token_id)


# --- through worker processes over ZeroMQ: HostServer.generate ---------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_generate_takes_sampling_params_and_yields_sampled_tokens(tmp_path: Path) -> None:
    from helix_async.model import get_model
    from helix_async.runtime.host_main import HostServer

    spec = get_model("tiny-llama")
    model = make_checkpoint(tmp_path, 77, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                            num_attention_heads=spec.num_attention_heads,
                            num_key_value_heads=spec.num_key_value_heads)
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 4), 1: (4, spec.num_layers)})
    prompt = [11, 12, 11, 12, 11, 40, 12, 11]
    plain = hf_greedy(model, prompt, 8)
    stop = plain[0]
    want, _ = hf_generate(model, prompt, 8, repetition_penalty=1.5, min_new_tokens=3, eos_token_id=stop)
    p = SamplingParams(repetition_penalty=1.5, min_tokens=3, stop_token_ids=(stop,), logprobs=2)
    seeded = SamplingParams(temperature=1.1, top_k=50, presence_penalty=0.4, seed=5)
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    procs: list[subprocess.Popen[bytes]] = []

    async def main() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        server = HostServer(placement)
        address = await server.start()
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "helix_async", "worker", "--insecure", "--connect", address,
                                           "--checkpoint", str(tmp_path)], cwd=ROOT, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await server.wait_ready(180)
        with pytest.raises(ValueError, match="not both"):
            await server.complete(prompt, 2, sampling=p, temperature=0.5)
        with pytest.raises(ValueError, match="stop_token_ids"):
            await server.complete(prompt, 2, sampling=SamplingParams(stop_token_ids=(spec.vocab_size,)))
        penalised, a, b, old = await asyncio.gather(
            server.complete(prompt, 8, sampling=p),
            server.complete(prompt, 8, sampling=seeded),
            server.complete(prompt[:5], 6),
            server.complete(prompt, 6, temperature=1.1, seed=5),  # the older keywords: ints
        )
        again = await server.complete(prompt, 8, sampling=seeded)
        await server.shutdown("test done")
        return penalised, a, again, old

    try:
        penalised, a, again, old = asyncio.run(asyncio.wait_for(main(), 600))
        wait_until(lambda: all(pr.poll() is not None for pr in procs), timeout=60, what="the workers exit")
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    assert all(isinstance(t, SampledToken) and len(t.top) == 2 for t in penalised)
    assert [t.token_id for t in penalised][: len(want)] == want and stop not in [t.token_id for t in penalised][:3]
    assert a == again and all(type(t) is int for t in a + old) and len(old) == 6


def test_the_wire_carries_every_sampling_field() -> None:
    p = SamplingParams(temperature=0.5, top_p=0.8, top_k=7, min_p=0.1, seed=3, presence_penalty=0.2,
                       frequency_penalty=-0.3, repetition_penalty=1.25, min_tokens=2, stop_token_ids=(1, 2),
                       logprobs=4)
    m = PromptWork(request_id=1, query_id=1, route=((0, 0, 2),), stage=0, num_tokens=2, token_ids=(4, 5),
                   max_tokens=3, sent_at=0.0, **sampling_fields(p))
    back = decode([bytes(f) for f in encode(m)])
    assert isinstance(back, PromptWork) and back.sampling() == p and back.needs_context
