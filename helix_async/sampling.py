"""How a request's tokens are chosen: the sampling parameters the front door takes, the host
carries and the last stage applies (torch-free; the arithmetic is in ``executors/sampling.py``).

The parameters and their order of application follow vLLM's sampler (docs/api.md §Sampling):
penalties on the logits, ``min_tokens`` (the stop ids are banned until that many tokens came),
temperature, then ``top_k``, ``top_p`` and ``min_p`` truncation, then a draw from a generator
seeded by ``seed`` (or the arg-max at temperature 0).  ``logprobs``: None for none, else the
chosen token's log-probability plus the ``logprobs`` most likely ones (of the model's
distribution after the penalties, before temperature and truncation, as vLLM reports them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["GREEDY", "SampledToken", "SamplingParams", "MAX_LOGPROBS"]

#: most top log-probabilities a request may ask for (OpenAI allows 20 for chat, 5 for completions)
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """One request's sampling (see the module doc).

    temperature >= 0 (0: greedy). top_p in (0, 1]. top_k: 0 for all tokens, else the k most
    likely. min_p in [0, 1]: drop tokens below ``min_p`` x the top probability. seed: the
    generator's seed (>= 0). presence_penalty, frequency_penalty in [-2, 2]: subtracted from the
    logits of tokens already generated (once, and per occurrence). repetition_penalty > 0:
    divides positive (multiplies negative) logits of tokens in the prompt or the output.
    min_tokens: the ids of ``stop_token_ids`` are banned until this many tokens were generated.
    logprobs: None, or how many top log-probabilities to report per token (0: the chosen one only).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", ">= 0 (0: off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.seed < 0:
            raise bad("seed", ">= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "> 0")
        if self.min_tokens < 0:
            raise bad("min_tokens", ">= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """The last stage needs the prompt's token ids (the repetition penalty counts them)."""
        return self.repetition_penalty != 1.0

    @property
    def plain(self) -> bool:
        """Only temperature, top_p and seed are set: what the wire carried before these fields."""
        return (self.top_k == 0 and self.min_p == 0 and self.presence_penalty == 0 and self.frequency_penalty == 0
                and self.repetition_penalty == 1 and self.min_tokens == 0 and self.logprobs is None)


GREEDY = SamplingParams()


class SampledToken(NamedTuple):
    """A generated token with its log-probabilities (what a host yields when ``logprobs`` is set).

    logprob: of the chosen token. top: ``(token id, logprob)`` of the most likely tokens, best
    first (``logprobs`` of them)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
