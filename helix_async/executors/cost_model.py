"""The cost-model executor: a batch takes its profiled time (docs/original.md §8.4).

One layer's time is ``f_prompt(prompt tokens) + f_decode(decode sequences)`` from the node's GPU
type profile (linear interpolation of measured points); a batch with exactly one decode is charged
the profile's time for two (the profile has no point below two sequences, and the straight line
from the origin is not a measurement; the original doubles ``f_decode(1)``, the same number on
these grids).  When activations were copied from the host before the step, the copy is charged as
``tokens * activation_bytes * (1/4e9 + 1/5e9)`` seconds (the original's concat + host-to-GPU copy
rates).  ``run`` sleeps once per batch: one timer, no coroutine.

A run of ``L`` layers (``Batch.layers``) is priced layer by layer as the node would run it: the
first layer with the host copy, the others without, each layer's end the previous end plus its
time (the same float sums as ``L`` one-layer batches), and one timer at the last end.
``shorten`` moves that timer to an earlier layer's end.

Two rules of our own, for profiles measured by ``python -m helix_async profile`` (docs/profiles.md;
neither changes a price on the original's profiles, and the simulator's compat mode uses neither):

* ``measured_single``: a lone decode is charged the profile's own time for one sequence when the
  decode table has a point at 1 (it was measured, so nothing needs doubling);
* ``last_layer``: on the node holding the model's last layer, a batch whose run ends there also
  pays the profile's head time (``GpuProfile.head``: final norm, LM head and token choice) for its
  sequences, prompts and decodes, once per batch, as the torch executor computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..clock import Clock
from ..model import GpuProfile
from .base import Batch

if TYPE_CHECKING:
    from .registry import ExecutorContext

__all__ = ["HOST_COPY_S_PER_BYTE", "CostModelExecutor", "from_context"]

#: Seconds per byte of host-side concat (4e9 B/s) plus host-to-GPU copy (5e9 B/s), docs/original.md §8.4.
HOST_COPY_S_PER_BYTE = 1.0 / 4e9 + 1.0 / 5e9


class CostModelExecutor:
    """Prices batches from ``profile`` and completes them after that much loop time.

    profile: the node's GPU profile. activation_bytes: bytes of one token's hidden state
    (``2 * hidden``). time_scale: multiply every duration (1.0 in simulation; a real-time
    emulation may slow the cluster down or speed it up). measured_single: charge a lone decode the
    profile's point at one sequence when it has one (else ``2 x f_decode(1)``, the original's rule).
    last_layer: the model's layer count when this node holds its last layer (a batch whose run
    ends there pays the profile's head time), else 0.  See the module doc.
    """

    # (_first.._done: the run of layers now running, for shorten)
    __slots__ = ("_clock", "_at", "_timer", "_act", "_scale", "busy_time", "batches", "_handle", "_first",
                 "_rest", "_done", "_single", "_last", "_head")

    def __init__(self, clock: Clock, profile: GpuProfile, activation_bytes: int, time_scale: float = 1.0, *,
                 measured_single: bool = False, last_layer: int = 0) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        self._clock = clock
        self._at = clock.call_at
        self._timer = profile.timer
        self._act = float(activation_bytes) * HOST_COPY_S_PER_BYTE
        self._scale = float(time_scale)
        self.busy_time = 0.0
        self.batches = 0  # layer steps priced
        self._handle: object = None
        self._first = 0.0
        self._rest = 0.0
        self._done: Callable[[Batch], None] | None = None
        # a lone decode's measured time, or -1.0: the timer's doubling applies
        self._single = profile.decode(1.0) if measured_single and 1.0 in profile.decode_x else -1.0
        self._last = int(last_layer) if profile.head_x else 0
        self._head = profile.head

    def layer_times(self, batch: Batch) -> tuple[float, float]:
        """(first layer's time with the host copy, each later layer's time) of ``batch``, seconds."""
        if batch.decode_seqs == 1 and self._single >= 0.0:
            base = self._timer.batch_time(batch.prompt_tokens, 0) + self._single
        else:
            base = self._timer.batch_time(batch.prompt_tokens, batch.decode_seqs)
        t = base
        if batch.host_tokens:
            t += batch.host_tokens * self._act
        return t * self._scale, base * self._scale

    def head_time(self, batch: Batch, layers: int) -> float:
        """Seconds of the head when a run of ``layers`` layers of ``batch`` ends at the model's last
        layer (0.0 otherwise, or without a head table)."""
        if self._last and batch.layer + layers == self._last:
            return self._head(batch.prompt_requests + batch.decode_seqs) * self._scale
        return 0.0

    def duration(self, batch: Batch) -> float:
        t, rest = self.layer_times(batch)
        for _ in range(batch.layers - 1):
            t += rest
        if self._last:
            t += self.head_time(batch, batch.layers)
        return t

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        t, rest = self.layer_times(batch)
        now = self._clock.now()
        end = now + t
        n = batch.layers
        if n > 1:
            for _ in range(n - 1):
                end += rest
            self._first = t
            self._rest = rest
            self._done = done
        if self._last:
            end += self.head_time(batch, n)
        self.busy_time += end - now
        self.batches += n
        self._handle = self._at(end, done, batch)

    def shorten(self, batch: Batch, layers: int) -> int:
        """Stop the running ``batch`` after ``max(layers, the layer running now)`` layers; returns
        that count (``batch.layers`` unchanged when it is not below it)."""
        n = batch.layers
        if layers >= n or self._done is None:
            return n
        now = self._clock.now()
        end = batch.started + self._first
        j = 1
        while j < layers or end < now:
            end += self._rest
            j += 1
        if j >= n:
            return n
        self._handle.cancel()  # type: ignore[attr-defined]
        # the run no longer ends at the model's last layer: nor does it pay the head
        self.busy_time -= self._rest * (n - j) + (self.head_time(batch, n) if self._last else 0.0)
        self.batches -= n - j
        batch.layers = j
        self._handle = self._at(end, self._done, batch)
        return j


def from_context(ctx: ExecutorContext) -> CostModelExecutor:
    """The registry's factory (``executors.registry``): priced by the profile of the machine type
    the worker emulates, slowed by its ``time_scale``, with the simulator's default-mode rules (a
    lone decode's measured time, the head on the last stage)."""
    if ctx.profile is None:
        raise ValueError("the cost-model executor needs the machine type's profile")
    last = ctx.model.num_layers if ctx.layers[1] == ctx.model.num_layers else 0
    return CostModelExecutor(ctx.clock, ctx.profile, ctx.model.activation_size, float(ctx.options["time_scale"]),
                             measured_single=True, last_layer=last)
