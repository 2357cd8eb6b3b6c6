"""Interleaved weighted round robin (IWRR) by virtual finish time: the pure-Python specification.

``ext/_routing.pyx`` holds the compiled twin (``IWRR``); both must give bit-identical loads and
choices (same operation order; checked by a hypothesis test). ``helix_async.routing`` is the one
import site that picks an implementation.

Semantics (docs/original.md §7.1 step 3). One instance per scheduling node; candidate ``j`` is one of its
next hops, with weight ``w_j`` (its link flow, tokens/s, > 0) and a virtual load ``load_j``
(seconds of work queued on that hop, initially 0):

* ``choose(work)`` picks ``argmin_j load_j + work / w_j`` over the unmasked candidates, with a
  strict ``<`` so the lowest index wins a tie, then charges it: ``load_j += work / w_j``.
  Returns -1 (and charges nothing) when every candidate is masked; it never raises for that, so a
  caller tests one integer instead of catching an exception on the hot path.
* ``add(j, work)`` charges ``work / w_j`` without choosing (a decode iteration: ``work = 1``).
* ``undo(j, work)`` subtracts ``work / w_j``: the inverse of one charge as the original's
  ``restore_one`` computes it. In floating point ``(a + x) - x`` can differ from ``a`` in the last
  bit, so it is exact only when the charge was (for example from a zero load, or with power-of-two
  weights). ``restore(j, load)`` puts back a saved load bit for bit; the router uses that to roll
  back a failed route.

The mask is a sequence of truth values, one per candidate, where a true value means *masked out*
(not eligible). ``choose``/``argmin`` use the mask given in the call, or when it is None the preset
mask of :meth:`set_mask` (initially nothing masked) -- the compiled twin's fast path.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence


def _check_weights(weights: Sequence[float]) -> list[float]:
    out = [float(w) for w in weights]
    for j, w in enumerate(out):
        if not (w > 0.0 and math.isfinite(w)):
            raise ValueError(f"IWRR weight {j} must be a finite float > 0 (tokens/s), got {w!r}")
    return out


def _check_work(work: float) -> float:
    work = float(work)
    if not (work >= 0.0 and math.isfinite(work)):
        raise ValueError(f"IWRR work must be a finite float >= 0 (tokens), got {work!r}")
    return work


class IWRR:
    """Weighted round robin over ``len(weights)`` candidates.

    weights: tokens/s per candidate (finite, > 0); loads are in seconds (tokens / (tokens/s)).
    """

    __slots__ = ("_w", "_load", "_mask")

    def __init__(self, weights: Sequence[float]) -> None:
        self._w = _check_weights(weights)
        self._load = [0.0] * len(self._w)
        self._mask = [False] * len(self._w)

    def __len__(self) -> int:
        return len(self._w)

    @property
    def weights(self) -> tuple[float, ...]:
        """The candidates' weights (tokens/s)."""
        return tuple(self._w)

    @property
    def loads(self) -> tuple[float, ...]:
        """A snapshot of the virtual loads (seconds), one per candidate."""
        return tuple(self._load)

    @property
    def mask(self) -> tuple[bool, ...]:
        """The preset mask (True = masked out)."""
        return tuple(self._mask)

    def load(self, j: int) -> float:
        """Candidate ``j``'s virtual load (seconds)."""
        return self._load[self._index(j)]

    def _index(self, j: int) -> int:
        j = operator.index(j)
        if not 0 <= j < len(self._w):
            raise IndexError(f"IWRR candidate {j} out of range 0..{len(self._w) - 1}")
        return j

    def _check_mask(self, mask: Sequence[object]) -> list[bool]:
        if len(mask) != len(self._w):
            raise ValueError(f"IWRR mask has {len(mask)} entries for {len(self._w)} candidates")
        return [bool(m) for m in mask]

    def set_mask(self, mask: Sequence[object] | None) -> None:
        """Preset the mask used when ``choose``/``argmin`` get none (None = nothing masked)."""
        self._mask = [False] * len(self._w) if mask is None else self._check_mask(mask)

    def argmin(self, work: float, mask: Sequence[object] | None = None) -> int:
        """The candidate ``choose`` would pick for ``work`` tokens, without charging it (-1: none)."""
        work = _check_work(work)
        m = self._mask if mask is None else self._check_mask(mask)
        w = self._w
        load = self._load
        best = -1
        best_cost = 0.0
        for j in range(len(w)):
            if m[j]:
                continue
            cost = load[j] + work / w[j]
            # strict < keeps the lowest index on a tie
            if best < 0 or cost < best_cost:
                best = j
                best_cost = cost
        return best

    def choose(self, work: float, mask: Sequence[object] | None = None) -> int:
        """Pick the unmasked candidate with the least ``load + work / weight`` and charge it.

        work: tokens (the prompt length at admission). Returns the index, or -1 when all are masked.
        """
        work = _check_work(work)
        j = self.argmin(work, mask)
        if j >= 0:
            self._load[j] = self._load[j] + work / self._w[j]
        return j

    def add(self, j: int, work: float = 1.0) -> None:
        """Charge candidate ``j`` with ``work`` tokens (one decode iteration: work = 1)."""
        j = self._index(j)
        work = _check_work(work)
        self._load[j] = self._load[j] + work / self._w[j]

    def undo(self, j: int, work: float) -> None:
        """Subtract one charge of ``work`` tokens from ``j`` (see the module doc on exactness)."""
        j = self._index(j)
        work = _check_work(work)
        self._load[j] = self._load[j] - work / self._w[j]

    def restore(self, j: int, load: float) -> None:
        """Set candidate ``j``'s load back to a saved value (seconds), bit for bit."""
        j = self._index(j)
        self._load[j] = float(load)

    def reset(self) -> None:
        """All loads back to 0 (the mask is kept)."""
        self._load = [0.0] * len(self._w)

    def __repr__(self) -> str:
        return f"IWRR(weights={self._w!r}, loads={self._load!r})"
