"""Per-layer batch-time interpolation: the pure-Python specification.

``ext/_interp.pyx`` is its compiled twin; both expose ``BatchTimer`` with the same methods and
must return bit-identical floats (same operation order; checked by a hypothesis test).
``helix_async.interp`` is the one import site that picks an implementation.

Semantics (docs/original.md §3.2, from the Helix simulator's profile lookup): the table is a sorted grid
of batch sizes with the measured time of ONE transformer layer. A value at a grid point is returned
as is; between two grid points it is interpolated linearly; outside the grid it is an error (no
extrapolation). A mixed batch of P prompt tokens and D decode sequences costs
``prompt(P) + decode(D)`` on one layer, except that a decode batch of exactly one sequence is
charged twice ``decode(1)`` (the Helix simulator's rule, kept for fidelity).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence


def _check_grid(xs: Sequence[float], ys: Sequence[float], what: str) -> tuple[list[float], list[float]]:
    fx = [float(x) for x in xs]
    fy = [float(y) for y in ys]
    if len(fx) != len(fy):
        raise ValueError(f"{what}: {len(fx)} grid points but {len(fy)} values")
    if len(fx) < 2:
        raise ValueError(f"{what}: a profile needs at least 2 grid points, got {len(fx)}")
    for i in range(1, len(fx)):
        if not fx[i] > fx[i - 1]:
            raise ValueError(f"{what}: grid must increase strictly, got {fx[i - 1]} then {fx[i]} at row {i}")
    return fx, fy


def _interp(xs: list[float], ys: list[float], x: float, what: str) -> float:
    if not (xs[0] <= x <= xs[-1]):
        raise ValueError(f"{what} batch size {x} outside the profiled range [{xs[0]}, {xs[-1]}]")
    i = bisect_right(xs, x) - 1
    if xs[i] == x:
        return ys[i]
    x0 = xs[i]
    x1 = xs[i + 1]
    y0 = ys[i]
    y1 = ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class BatchTimer:
    """Time of one layer for a batch, from a prompt table and a decode table.

    prompt_x: total prompt tokens per grid point; decode_x: decode sequences per grid point;
    *_s: seconds per layer at those points (strictly increasing x, same lengths).
    """

    __slots__ = ("_px", "_py", "_dx", "_dy")

    def __init__(
        self,
        prompt_x: Sequence[float],
        prompt_s: Sequence[float],
        decode_x: Sequence[float],
        decode_s: Sequence[float],
    ) -> None:
        self._px, self._py = _check_grid(prompt_x, prompt_s, "prompt")
        self._dx, self._dy = _check_grid(decode_x, decode_s, "decode")

    @property
    def prompt_max(self) -> float:
        """Largest profiled prompt batch (tokens)."""
        return self._px[-1]

    @property
    def decode_max(self) -> float:
        """Largest profiled decode batch (sequences)."""
        return self._dx[-1]

    def prompt(self, tokens: float) -> float:
        """Seconds for one layer to run a prompt batch of ``tokens`` total tokens."""
        return _interp(self._px, self._py, tokens, "prompt")

    def decode(self, seqs: float) -> float:
        """Seconds for one layer to run one decode step of ``seqs`` sequences."""
        return _interp(self._dx, self._dy, seqs, "decode")

    def batch_time(self, prompt_tokens: int, decode_seqs: int) -> float:
        """Seconds for one layer to run a mixed batch (decode part doubled when decode_seqs == 1)."""
        t_p = _interp(self._px, self._py, prompt_tokens, "prompt")
        t_d = _interp(self._dx, self._dy, decode_seqs, "decode")
        if decode_seqs == 1:
            t_d = 2.0 * t_d
        return t_p + t_d
