"""Tiny timing harness shared by the microbenchmarks: best-of-N ns per operation."""

from __future__ import annotations

import time
from collections.abc import Callable


def ns_per_op(fn: Callable[[], object], ops_per_call: int, *, repeat: int = 5, min_time: float = 0.2) -> float:
    """Best observed nanoseconds per operation of ``fn`` (which performs ``ops_per_call`` operations).

    Calls ``fn`` enough times to run at least ``min_time`` seconds per round, ``repeat`` rounds,
    and keeps the fastest round (the least disturbed by other load on the machine).
    """
    fn()  # warm up
    loops = 1
    while True:
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        dt = time.perf_counter_ns() - t0
        if dt >= min_time * 1e9 or loops >= 1 << 24:
            break
        loops *= 2
    best = dt
    for _ in range(repeat - 1):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        best = min(best, time.perf_counter_ns() - t0)
    return best / (loops * ops_per_call)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(out)
