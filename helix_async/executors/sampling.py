"""The last stage's sampler: how a request's next token is chosen from the model's logits (torch).

Every :class:`~helix_async.sampling.SamplingParams` field is applied, in vLLM's order
(docs/sampling.md), to one request's logits row (vocab,), in float32:

1. penalties: the repetition penalty over the request's prompt and output ids (a positive logit
   divided by it, a negative one multiplied, as transformers' ``RepetitionPenaltyLogitsProcessor``
   does), then the frequency penalty times each output id's count and the presence penalty once
   per output id present, subtracted (OpenAI's rule);
2. the log-probabilities, when asked for: log-softmax of these penalised logits, for the chosen
   token and the ``logprobs`` most likely ones;
3. ``min_tokens``: the ``stop_token_ids`` are banned (-inf) while fewer tokens were generated;
4. greedy at temperature 0 (the arg-max; the first of equal maxima); else the logits divided by
   the temperature, then ``top_k`` (all tokens below the k-th largest logit dropped), ``top_p``
   (a token dropped when the tokens more likely than it hold ``top_p`` of the probability
   already; the most likely always kept), ``min_p`` (tokens whose probability is below ``min_p``
   times the top one dropped), and one draw from the softmax of what is left (the inverse of its
   cumulative distribution at one uniform number).

The draw of a request's ``i``-th generated token (counted from 0 over the whole request, also
across a migration) comes from the request's own ``torch.Generator``, seeded for that token by
``seed`` and ``i``: so a seeded request gives the same tokens whatever it is batched with, run
after run, and after a migration too.

:class:`RequestSampler` keeps a request's state at the last stage (the ids its penalties count,
its generator, its count of generated tokens); :func:`sample` chooses the tokens of a batch's
rows, each request with its own sampler, or greedily (one arg-max over the batch) for requests
that need none (:func:`sampler_for` returns None for them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..messages import PromptWork
from ..sampling import SampledToken, SamplingParams

__all__ = ["RequestSampler", "sample", "sampler_for", "step_seed"]

_M64 = (1 << 64) - 1
#: how many of the most likely tokens top_p looks at first (then 8 times more, until they hold top_p)
_TOP_P_CANDIDATES = 256
#: the lowest log-probability reported (the wire carries finite values only): float32's lowest
_LOGPROB_FLOOR = float(torch.finfo(torch.float32).min)


def step_seed(seed: int, step: int) -> int:
    """The generator seed of a request's token ``step`` (0-based) under its ``seed``: both mixed by
    SplitMix64's finaliser (Steele, Lea and Flood, OOPSLA 2014), so nearby seeds and steps give
    unrelated streams. A non-negative 63-bit int."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


def _finite_logprob(v: float) -> float:
    return v if v >= _LOGPROB_FLOOR else _LOGPROB_FLOOR  # (NaN and -inf go to the floor)


class RequestSampler:
    """One request's sampling state at the last stage.

    params: its sampling. vocab: the model's vocabulary size. device: where its logits are.
    context: the request's token ids so far (its prompt, and after a migration the tokens it had
    generated after it); only read when a penalty counts them (ids outside the vocabulary are
    ignored). generated: how many of the last ids of ``context`` it had generated (0 but after a
    migration): the penalties count them as output, ``min_tokens`` counts them, and the draws go
    on from there.
    """

    __slots__ = ("params", "vocab", "generated", "seen", "counts", "stops", "gen")

    def __init__(
        self,
        params: SamplingParams,
        vocab: int,
        device: torch.device | str = "cpu",
        context: Sequence[int] = (),
        generated: int = 0,
    ) -> None:
        self.params = params
        self.vocab = vocab
        self.generated = int(generated)
        dev = torch.device(device)
        ids = torch.tensor([t for t in context if 0 <= t < vocab], dtype=torch.long)
        out = ids[len(ids) - self.generated :] if 0 < self.generated <= len(ids) else ids[:0]
        #: prompt and output ids (bool, vocab): what the repetition penalty counts
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            self.seen[ids] = True
            self.seen = self.seen.to(dev)
        #: how often each id was generated (float32, vocab): what the frequency and presence penalties count
        self.counts: torch.Tensor | None = None
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts = torch.bincount(out, minlength=vocab).to(dtype=torch.float32, device=dev)
        #: the stop ids min_tokens holds back, within the vocabulary
        self.stops: torch.Tensor | None = None
        stops = sorted({t for t in params.stop_token_ids if 0 <= t < vocab})
        if params.min_tokens > self.generated and stops:
            self.stops = torch.tensor(stops, dtype=torch.long, device=dev)
        self.gen = torch.Generator(device=dev) if params.temperature > 0 else None

    def penalised(self, row: torch.Tensor) -> torch.Tensor:
        """``row`` (vocab,) with the penalties applied: a new float32 tensor."""
        p = self.params
        x = row.to(torch.float32, copy=True)
        if self.seen is not None:
            r = p.repetition_penalty
            x = torch.where(self.seen, torch.where(x > 0, x / r, x * r), x)
        counts = self.counts
        if counts is not None:
            if p.frequency_penalty != 0.0:
                x -= p.frequency_penalty * counts
            if p.presence_penalty != 0.0:
                x -= p.presence_penalty * (counts > 0).to(torch.float32)
        return x

    def ban(self, x: torch.Tensor) -> torch.Tensor:
        """Penalised logits ``x`` with the stop ids at -inf while fewer than ``min_tokens`` tokens
        were generated (``x`` is modified and returned)."""
        if self.stops is not None:
            if self.generated < self.params.min_tokens:
                x[self.stops] = -math.inf
            else:
                self.stops = None  # (for good)
        return x

    def truncated(self, x: torch.Tensor) -> torch.Tensor:
        """Penalised (and banned) logits ``x`` at the temperature, with top_k, top_p and min_p
        applied (dropped tokens at -inf): what the draw takes the softmax of. ``x`` is modified."""
        p = self.params
        x /= p.temperature
        n = x.shape[-1]
        if 0 < p.top_k < n:
            kth = torch.topk(x, p.top_k).values[-1]
            x.masked_fill_(x < kth, -math.inf)
        if p.top_p < 1.0:
            self._top_p(x)
        if p.min_p > 0.0:
            probs = torch.softmax(x, dim=-1)
            x.masked_fill_(probs < p.min_p * probs.max(), -math.inf)
        return x

    def _top_p(self, x: torch.Tensor) -> None:
        """Drop (in ``x``) every token that the tokens more likely than it already give ``top_p`` of
        the probability (the most likely always stays). Only the most likely tokens are sorted: the
        fewest of 256, 2048, ... that hold ``top_p`` between them, so the cut lies among them."""
        top_p = self.params.top_p
        n = x.shape[-1]
        lse = torch.logsumexp(x.double(), dim=-1)
        m = _TOP_P_CANDIDATES
        while True:
            m = min(m, n)
            vals, idx = torch.topk(x, m)  # descending
            probs = torch.exp(vals.double() - lse)
            mass = probs.cumsum(dim=-1)
            if m == n or float(mass[-1]) >= top_p:
                break
            m *= 8
        keep = idx[mass - probs < top_p]  # the mass before a token (more likely ones') below top_p
        drop = torch.ones(n, dtype=torch.bool, device=x.device)
        drop[keep] = False
        x.masked_fill_(drop, -math.inf)

    def _draw(self, probs: torch.Tensor) -> int:
        """One token from ``probs`` (float64, vocab; zeros never drawn) by the inverse of its
        cumulative distribution at one uniform number from the request's generator."""
        cdf = probs.cumsum(dim=-1)
        u = torch.rand(1, dtype=torch.float64, generator=self.gen, device=probs.device) * cdf[-1]
        tok = int(torch.searchsorted(cdf, u, right=True))
        if tok >= probs.shape[-1]:  # u rounded up to the total: the last token with a probability
            tok = int(torch.nonzero(probs)[-1])
        return tok

    def choose(self, row: torch.Tensor) -> int | SampledToken:
        """The next token from the request's logits ``row`` (vocab,); a :class:`SampledToken` with
        its log-probabilities when the request asks for them, else its id. Advances the state."""
        p = self.params
        x = self.penalised(row)
        lp = torch.log_softmax(x, dim=-1) if p.logprobs is not None else None
        self.ban(x)
        if self.gen is None:
            tok = int(torch.argmax(x))
        else:
            self.gen.manual_seed(step_seed(p.seed, self.generated))
            tok = self._draw(torch.softmax(self.truncated(x).double(), dim=-1))
        self.generated += 1
        if self.seen is not None:
            self.seen[tok] = True
        if self.counts is not None:
            self.counts[tok] += 1.0
        if lp is None:
            return tok
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs:
            vals, idx = torch.topk(lp, min(p.logprobs, self.vocab))
            top = tuple((i, _finite_logprob(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True))
        return SampledToken(tok, _finite_logprob(float(lp[tok])), top)


def sampler_for(msg: PromptWork, vocab: int, device: torch.device | str = "cpu") -> RequestSampler | None:
    """The sampler of the request whose prompt ``msg`` reached the last stage, or None when plain
    arg-max on the raw logits chooses its tokens (greedy, no penalty, no ban, no logprobs)."""
    if (
        msg.temperature == 0.0
        and msg.repetition_penalty == 1.0
        and msg.presence_penalty == 0.0
        and msg.frequency_penalty == 0.0
        and (msg.min_tokens <= msg.generated or not msg.stop_token_ids)
        and msg.logprobs < 0
    ):
        return None
    params = msg.sampling()
    context = msg.token_ids or msg.context_ids
    return RequestSampler(params, vocab, device, context if msg.needs_context else (), msg.generated)


def sample(logits: torch.Tensor, samplers: Sequence[RequestSampler | None]) -> list[Any]:
    """The next token of each row of ``logits`` (rows, vocab): row ``j`` by ``samplers[j]`` (an int
    or a SampledToken), or its arg-max where that is None (one arg-max for all those rows)."""
    out: list[Any] = [None] * len(samplers)
    plain = [j for j, s in enumerate(samplers) if s is None]
    if plain:
        rows = logits if len(plain) == len(samplers) else logits[plain]
        for j, tok in zip(plain, torch.argmax(rows, dim=-1).tolist(), strict=True):
            out[j] = tok
    for j, s in enumerate(samplers):
        if s is not None:
            out[j] = s.choose(logits[j])
    return out

