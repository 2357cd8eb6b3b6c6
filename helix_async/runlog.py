"""A served run's logs and their report: the original prototype's formats (docs/original.md §2.9) plus JSON
lines, and its result parser's definitions (§10.8).

Written by the runtime's host into its log directory:

* ``events.txt``: one tuple per line ``(t, query_id, 'out'|'in', 'prompt'|'decode', context_len,
  processed)``, ``t`` in seconds since the host started serving; a prompt goes out when its query is
  submitted and comes in with the first token (``context_len`` 0, ``processed`` input + 1); decode
  ``k`` (k = 1, 2, ...) goes out when token ``k`` arrives and comes in with token ``k + 1``
  (``context_len`` input + k, the tokens processed before it; ``processed`` 1);
* ``query_route.txt``: ``(query_id, input_len, output_len, [machine ids..., 0], [start layers...,
  -1], [end layers..., -1])`` as the original's MaxFlow host wrote it (machine id ``node + 1``, the
  host ``0``);
* ``requests.jsonl``: one JSON object per request (ids, lengths, times of submission and of every
  token, route, error).

:func:`summarise` reads ``events.txt`` back as the original parser did: each ``in`` matched with its
``out`` (prompts by query id, decodes by (query id, context_len)), latencies kept when the ``in``
time lies in ``[warmup, finish]``, decode throughput = decode ``in`` events in the window over the
span from the first to the last of them (+1e-6).
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_text

__all__ = ["RequestRecord", "RunLog", "RunSummary", "read_events", "summarise"]


@dataclass
class RequestRecord:
    qid: int
    input_len: int
    output_len: int
    submitted: float
    token_times: list[float] = field(default_factory=list)
    route: tuple[tuple[int, int, int], ...] = ()
    error: str = ""


class RunLog:
    """Collects the requests of one served run (times relative to ``t0``) and writes the logs."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.records: dict[int, RequestRecord] = {}

    def submitted(self, qid: int, input_len: int, output_len: int, t: float) -> None:
        self.records[qid] = RequestRecord(qid, input_len, output_len, t - self.t0)

    def token(self, qid: int, t: float) -> None:
        r = self.records.get(qid)
        if r is not None:
            r.token_times.append(t - self.t0)

    def finished(self, qid: int, route: Any, error: str = "") -> None:
        r = self.records.get(qid)
        if r is not None:
            r.route = tuple(tuple(int(x) for x in s) for s in (route or ()))  # type: ignore[misc]
            r.error = error

    def events(self) -> list[tuple[float, int, str, str, int, int]]:
        ev: list[tuple[float, int, str, str, int, int]] = []
        for r in self.records.values():
            tt = r.token_times
            ev.append((r.submitted, r.qid, "out", "prompt", 0, r.input_len + 1))
            if tt:
                ev.append((tt[0], r.qid, "in", "prompt", 0, r.input_len + 1))
            for k in range(1, len(tt) + 1):
                ctx = r.input_len + k  # tokens processed before this decode
                if k < len(tt) or r.error:
                    ev.append((tt[k - 1], r.qid, "out", "decode", ctx, 1))
                if k < len(tt):
                    ev.append((tt[k], r.qid, "in", "decode", ctx, 1))
        ev.sort(key=lambda e: (e[0], e[1], e[2] == "out"))  # a token comes in, then the next step goes out
        return ev

    def write(self, out: str | Path) -> list[Path]:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        lines = [repr((round(t, 6), q, io, kind, c, p)) for t, q, io, kind, c, p in self.events()]
        paths = [atomic_write_text(d / "events.txt", "\n".join(lines) + ("\n" if lines else ""), "events log")]
        routes = []
        jl = []
        for r in sorted(self.records.values(), key=lambda r: r.qid):
            ids = [s[0] + 1 for s in r.route] + [0]
            starts = [s[1] for s in r.route] + [-1]
            ends = [s[2] for s in r.route] + [-1]
            routes.append(repr((r.qid, r.input_len, r.output_len, ids, starts, ends)))
            jl.append(json.dumps({"query_id": r.qid, "input_len": r.input_len, "output_len": r.output_len,
                                  "submitted": round(r.submitted, 6), "token_times": [round(t, 6) for t in r.token_times],
                                  "route": [list(s) for s in r.route], "error": r.error}))
        paths.append(atomic_write_text(d / "query_route.txt", "\n".join(routes) + ("\n" if routes else ""), "route log"))
        paths.append(atomic_write_text(d / "requests.jsonl", "\n".join(jl) + ("\n" if jl else ""), "request log"))
        return paths


def read_events(path: str | Path) -> list[tuple[float, int, str, str, int, int]]:
    """``events.txt`` as tuples; a malformed line is an error naming the file and line."""
    p = Path(path)
    out = []
    for no, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            t, q, io, kind, c, n = ast.literal_eval(line)
            ev = (float(t), int(q), str(io), str(kind), int(c), int(n))
        except (ValueError, SyntaxError, TypeError) as e:
            raise ConfigError(f"{p}:{no}", "event", f"expected (t, query_id, 'out'|'in', kind, context_len, processed): {e}") from None
        if ev[2] not in ("out", "in") or ev[3] not in ("prompt", "decode") or not math.isfinite(ev[0]):
            raise ConfigError(f"{p}:{no}", "event", "direction must be 'out' or 'in' and kind 'prompt' or 'decode'")
        out.append(ev)
    return out


@dataclass(frozen=True)
class RunSummary:
    decode_throughput: float
    prompt_latency: tuple[float, ...]
    decode_latency: tuple[float, ...]
    window: tuple[float, float]

    @staticmethod
    def _pct(xs: tuple[float, ...], p: float) -> float:
        s = sorted(xs)
        return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")

    def stats(self, key: str) -> dict[str, float]:
        xs = self.prompt_latency if key == "prompt" else self.decode_latency
        d = {"mean": sum(xs) / len(xs) if xs else float("nan")}
        for p in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
            d[f"p{round(p * 100)}"] = self._pct(xs, p)
        return d

    def lines(self) -> list[str]:
        out = [f"decode throughput: {self.decode_throughput:.2f} tokens/s (window {self.window[0]:g}-{self.window[1]:g} s)"]
        for key, name in (("prompt", "prompt latency (TTFT)"), ("decode", "decode latency (per token)")):
            st = self.stats(key)
            out.append(f"{name}: mean {st['mean']:.4f} s; " + ", ".join(f"{k} {v:.4f}" for k, v in st.items() if k != "mean")
                       + f" ({len(self.prompt_latency if key == 'prompt' else self.decode_latency)} iterations)")
        return out


def summarise(events: list[tuple[float, int, str, str, int, int]], warmup: float = 60.0, finish: float = 300.0) -> RunSummary:
    """The original parser's figures over ``[warmup, finish]`` (see the module doc)."""
    outs: dict[tuple[int, str, int], float] = {}
    for t, q, io, kind, c, _ in events:
        if io == "out":
            outs[(q, kind, c if kind == "decode" else 0)] = t
    p_lat: list[float] = []
    d_lat: list[float] = []
    d_in: list[float] = []
    for t, q, io, kind, c, _ in events:
        if io != "in" or not warmup <= t <= finish:
            continue
        o = outs.get((q, kind, c if kind == "decode" else 0))
        if o is None:
            continue
        (p_lat if kind == "prompt" else d_lat).append(t - o)
        if kind == "decode":
            d_in.append(t)
    thr = len(d_in) / (max(d_in) - min(d_in) + 1e-6) if d_in else 0.0
    return RunSummary(thr, tuple(p_lat), tuple(d_lat), (warmup, finish))
