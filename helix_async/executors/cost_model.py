"""The cost-model executor: a batch takes its profiled time (HELIX_SPEC §8.4).

One layer's time is ``f_prompt(prompt tokens) + f_decode(decode sequences)`` from the node's GPU
type profile (linear interpolation of measured points); a batch with exactly one decode is charged
the profile's time for two (the profile has no point below two sequences, and the straight line
from the origin is not a measurement; the original doubles ``f_decode(1)``, the same number on
these grids).  When activations were copied from the host before the step, the copy is charged as
``tokens * activation_bytes * (1/4e9 + 1/5e9)`` seconds (the original's concat + host-to-GPU copy
rates).  ``run`` sleeps once per batch: one timer, no coroutine.
"""

from __future__ import annotations

from collections.abc import Callable

from ..clock import Clock
from ..model import GpuProfile
from .base import Batch

__all__ = ["HOST_COPY_S_PER_BYTE", "CostModelExecutor"]

#: Seconds per byte of host-side concat (4e9 B/s) plus host-to-GPU copy (5e9 B/s), HELIX_SPEC §8.4.
HOST_COPY_S_PER_BYTE = 1.0 / 4e9 + 1.0 / 5e9


class CostModelExecutor:
    """Prices batches from ``profile`` and completes them after that much loop time.

    profile: the node's GPU profile. activation_bytes: bytes of one token's hidden state
    (``2 * hidden``). time_scale: multiply every duration (1.0 in simulation; a real-time
    emulation may slow the cluster down or speed it up).
    """

    __slots__ = ("_clock", "_at", "_timer", "_act", "_scale", "busy_time", "batches")

    def __init__(self, clock: Clock, profile: GpuProfile, activation_bytes: int, time_scale: float = 1.0) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        self._clock = clock
        self._at = clock.call_at
        self._timer = profile.timer
        self._act = float(activation_bytes) * HOST_COPY_S_PER_BYTE
        self._scale = float(time_scale)
        self.busy_time = 0.0
        self.batches = 0

    def duration(self, batch: Batch) -> float:
        t = self._timer.batch_time(batch.prompt_tokens, batch.decode_seqs)
        if batch.host_tokens:
            t += batch.host_tokens * self._act
        return t * self._scale

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        t = self._timer.batch_time(batch.prompt_tokens, batch.decode_seqs)
        if batch.host_tokens:
            t += batch.host_tokens * self._act
        t *= self._scale
        self.busy_time += t
        self.batches += 1
        self._at(self._clock.now() + t, done, batch)
