"""The null executor: every batch finishes on the next loop turn, at no cost.

What remains of a served request's latency with it is the runtime's own overhead (transport,
codec, batching, scheduling): ``bench/bench_runtime.py`` measures the per-hop cost that way.
Messages carry modelled payloads, as under the cost model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..clock import Clock
from .base import Batch

if TYPE_CHECKING:
    from .registry import ExecutorContext

__all__ = ["NullExecutor", "from_context"]


class NullExecutor:
    """Completes each batch on the next loop turn (see the module doc)."""

    def __init__(self, clock: Clock) -> None:
        self._soon = clock.call_soon
        self.batches = 0

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        self.batches += 1
        self._soon(done, batch)

    def duration(self, batch: Batch) -> float:
        return 0.0


def from_context(ctx: ExecutorContext) -> NullExecutor:
    """The registry's factory (``executors.registry``)."""
    return NullExecutor(ctx.clock)
