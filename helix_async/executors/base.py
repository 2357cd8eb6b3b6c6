"""The executor interface: run one layer (or a run of layers) of the model on a batch.

The worker decides *what* runs (which layer, which requests: docs/original.md §8.5); the executor
decides *how* and how long it takes.  The call is split so that a cost model and a GPU fit the
same shape: ``run(batch, done)`` starts the work and returns at once; the executor calls
``done(batch)`` on the event loop when the work has finished (a cost model after the batch's
priced duration of loop time, a real executor when its kernels have completed).  One callback per
batch, never one per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Batch", "ExecFailure", "Executor"]


class Batch:
    """One executor step: layers ``layer .. layer + layers - 1`` (a contiguous run of model layers,
    usually one) run on ``items``.

    items: the worker's per-request entries (each has ``prompt`` (bool), ``tokens`` (tokens this
    step processes: the prompt length, or 1 for a decode), ``ctx`` (tokens already in the KV cache)
    and ``msg`` (the work message, whose tensors a real executor reads)).
    prompt_requests, prompt_tokens, decode_seqs, ctx_tokens: totals over items. host_tokens: tokens whose activations were
    copied from host to GPU before this step (priced by the cost model, docs/original.md §8.4).
    outputs: unused (a computing executor keeps each request's results on its item's ``data``:
    hidden states between layers, the chosen token id after the model's last layer, or an
    :class:`ExecFailure`; the worker sends them on).
    started: loop time the worker started the batch.  layers: how many consecutive layers the
    batch runs (the worker sets it before ``run``; an executor that can shorten a running batch
    lowers it, see :class:`Executor`).
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
        "layers",
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
        self.layers = 1


class ExecFailure:
    """Why an executor could not compute one request (it sets the request's item ``data`` to
    this; the worker then reports the request failed to the host and frees it)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"ExecFailure({self.reason!r})"


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


# A worker hands an executor a run of several layers (``Batch.layers > 1``) only when the executor
# also has ``shorten(batch, layers) -> int``: stop the running ``batch`` after its first ``layers``
# layers, or after the layer running now if that one is later; ``done`` then fires at that layer's
# end with ``batch.layers`` lowered to the count actually run, which is returned.  With it a run of
# layers is exactly the node's layer-by-layer schedule (docs/original.md §8.5) in one event: the worker
# shortens the run when a request arrives at one of its later layers, as that request would have
# joined the batch there.  It is not part of the Protocol: executors without it run one layer a call.
