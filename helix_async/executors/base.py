"""The executor interface: run one layer (or a run of layers) of the model on a batch.

The worker decides *what* runs (which layer, which requests: HELIX_SPEC §8.5); the executor
decides *how* and how long it takes.  The call is split so that a cost model and a GPU fit the
same shape: ``run(batch, done)`` starts the work and returns at once; the executor calls
``done(batch)`` on the event loop when the work has finished (a cost model after the batch's
priced duration of loop time, a real executor when its kernels have completed).  One callback per
batch, never one per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Batch", "Executor"]


class Batch:
    """One executor step: ``layer`` (a model layer index) run on ``items``.

    items: the worker's per-request entries (each has ``prompt`` (bool), ``tokens`` (tokens this
    step processes: the prompt length, or 1 for a decode), ``ctx`` (tokens already in the KV cache)
    and ``msg`` (the work message, whose tensors a real executor reads)).
    prompt_requests, prompt_tokens, decode_seqs, ctx_tokens: totals over items. host_tokens: tokens whose activations were
    copied from host to GPU before this step (priced by the cost model, HELIX_SPEC §8.4).
    outputs: filled by a real executor (per-item output tensors), unused by the cost model.
    """

    __slots__ = (
        "layer",
        "items",
        "prompt_requests",
        "prompt_tokens",
        "decode_seqs",
        "ctx_tokens",
        "host_tokens",
        "outputs",
        "started",
    )

    def __init__(
        self,
        layer: int,
        items: list[Any],
        prompt_requests: int,
        prompt_tokens: int,
        decode_seqs: int,
        ctx_tokens: int,
        host_tokens: int,
    ) -> None:
        self.layer = layer
        self.items = items
        self.prompt_requests = prompt_requests
        self.prompt_tokens = prompt_tokens
        self.decode_seqs = decode_seqs
        self.ctx_tokens = ctx_tokens
        self.host_tokens = host_tokens
        self.outputs: list[Any] | None = None
        self.started = 0.0


@runtime_checkable
class Executor(Protocol):
    """Runs batches for one worker (see the module doc)."""

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        """Start ``batch``; call ``done(batch)`` on the loop when it has finished."""
        ...

    def duration(self, batch: Batch) -> float:
        """Seconds ``batch`` is expected to take (exact for the cost model; an estimate for a
        real executor, used for statistics only)."""
        ...
