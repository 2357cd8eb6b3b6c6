"""Workloads (the simulator's and the runtime host's): request-length samplers, the online arrival trace, trace CSV files.

Data: ``helix_async/data/traces/`` (Azure LLM inference traces, Alpaca and ShareGPT lengths as
shipped with the public Helix-ASPLOS25 repository, Apache-2.0). Algorithms: docs/original.md §9; the
offline and online feeders that use them: docs/original.md §8.8.

The generators reproduce the original ``simulator/trace_generator`` draw for draw: with the same
seed they return the very queries (arrival times equal as floats) the original code wrote to
``helix_async/data/traces/generated/``. The original seeds Python's *global* RNG; here every
sampler owns a ``random.Random`` (or shares one the caller passes in), so nothing else in the
process can shift the stream.

Units: seconds, tokens, requests/s, tokens/s.
"""

from __future__ import annotations

import bisect
import csv
import functools
import io
import math
import operator
import os
import random
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from helix_async import fileio
from helix_async.errors import ConfigError

__all__ = [
    "LENGTH_DATASETS",
    "ARRIVAL_SERIES",
    "TRACE_HEADER",
    "MAX_TOKENS_PER_QUERY",
    "ARRIVAL_INTERVAL_S",
    "TraceEntry",
    "load_lengths",
    "load_arrivals",
    "LengthSampler",
    "ArrivalRateSampler",
    "RENEWAL_ARRIVALS",
    "MIN_CV",
    "MAX_CV",
    "RateProfile",
    "check_arrivals",
    "generate_online_trace",
    "read_trace_csv",
    "write_trace_csv",
]

_TRACES = resources.files("helix_async") / "data" / "traces"

# Dataset name (as given to --lengths) -> file in helix_async/data/traces/.
LENGTH_DATASETS: Mapping[str, str] = MappingProxyType(
    {
        "azure-conv": "lengths_azure_conv.csv",
        "azure-code": "lengths_azure_code.csv",
        "alpaca": "lengths_alpaca.csv",
        "sharegpt": "lengths_sharegpt.csv",
    }
)

# Arrival series name (as given to --arrivals) -> file; requests per 3-second interval, 1 hour.
ARRIVAL_SERIES: Mapping[str, str] = MappingProxyType(
    {
        "azure-conv": "arrival_rate_azure_conv.csv",
        "azure-code": "arrival_rate_azure_code.csv",
    }
)

ARRIVAL_INTERVAL_S = 3  # width of one arrival-series interval (docs/original.md §9)
TRACE_HEADER = ("arrive_time_s", "input_tokens", "output_tokens")
MAX_TOKENS_PER_QUERY = 1_000_000  # bound on input_tokens / output_tokens read from a trace file
#: The most queries :func:`generate_online_trace` makes (token rate / average length x duration): the
#: trace is held in memory (about 100 bytes a query), and a rate of 1e15 tokens/s must be one line,
#: not an endless loop.
MAX_GENERATED_QUERIES = 10_000_000

#: arrival processes drawn from a distribution, not a series (--arrivals); ``poisson`` is ``gamma``
#: with a coefficient of variation of 1
RENEWAL_ARRIVALS = ("gamma", "poisson")
#: bounds of --cv (a Gamma shape of 1 / cv^2: from 1e4 down to 1e-4)
MIN_CV, MAX_CV = 0.01, 100.0
#: at most this many pieces in a rate profile (a diurnal profile is cut into 240 per period)
MAX_PROFILE_PIECES = 100_000

IntArray = npt.NDArray[np.int64]
Seed = int | random.Random


class TraceEntry(NamedTuple):
    """One query of a trace: arrival time (seconds) and its prompt and output lengths (tokens)."""

    arrive_time_s: float
    input_tokens: int
    output_tokens: int


# --------------------------------------------------------------------------------------------------
# Shipped data
# --------------------------------------------------------------------------------------------------


def _read_columns(name: str, columns: tuple[str, ...]) -> list[IntArray]:
    """Integer columns ``columns`` of the shipped CSV ``name``, as read-only arrays."""
    rows = list(csv.DictReader(io.StringIO((_TRACES / name).read_text(encoding="utf-8"), newline="")))
    out = []
    for col in columns:
        arr = np.array([int(r[col]) for r in rows], dtype=np.int64)
        arr.flags.writeable = False  # shared through the cache
        out.append(arr)
    return out


def _unknown(kind: str, names: Iterable[str], got: object) -> str:
    return f"unknown {kind} {fileio.short_repr(got)} (known: {', '.join(names)})"


def load_lengths(name: str) -> tuple[IntArray, IntArray]:
    """``(input_tokens, output_tokens)`` of the length dataset ``name``, paired by index.

    Arrays are read-only and cached. An unknown name is a ConfigError naming ``--lengths``.
    """
    if not isinstance(name, str) or name not in LENGTH_DATASETS:
        raise ConfigError("<argument>", "--lengths", _unknown("length dataset", LENGTH_DATASETS, name))
    return _load_lengths(name)


@functools.cache
def _load_lengths(name: str) -> tuple[IntArray, IntArray]:
    inp, out = _read_columns(LENGTH_DATASETS[name], ("input_tokens", "output_tokens"))
    return inp, out


def load_arrivals(name: str) -> IntArray:
    """Requests per 3-second interval of the arrival series ``name`` (1200 entries, read-only, cached).

    An unknown name is a ConfigError naming ``--arrivals``.
    """
    if not isinstance(name, str) or name not in ARRIVAL_SERIES:
        raise ConfigError("<argument>", "--arrivals", _unknown("arrival series", ARRIVAL_SERIES, name))
    return _load_arrivals(name)


@functools.cache
def _load_arrivals(name: str) -> IntArray:
    (counts,) = _read_columns(ARRIVAL_SERIES[name], ("requests_in_interval",))
    return counts


def _rng(seed: Seed) -> random.Random:
    if isinstance(seed, random.Random):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a random.Random, got {type(seed).__name__}")
    return random.Random(seed)


# --------------------------------------------------------------------------------------------------
# Samplers (docs/original.md §9)
# --------------------------------------------------------------------------------------------------


class LengthSampler:
    """Draws (input_tokens, output_tokens) pairs uniformly from a length dataset (docs/original.md §9).

    ``seed``: an int (a private ``random.Random(seed)``, the original's ``random.seed(seed)``) or
    a ``random.Random`` to share with other samplers (one stream, as the original's global RNG).
    Each :meth:`sample` is one ``randint(0, n - 1)`` on that stream, nothing else.
    """

    def __init__(self, dataset: str = "azure-conv", seed: Seed = 0) -> None:
        self.dataset = dataset
        inp, out = load_lengths(dataset)
        # Python ints: sample() runs once per query and np.int64 would leak into traces.
        self._input: list[int] = inp.tolist()
        self._output: list[int] = out.tolist()
        self._n = len(self._input)
        self.rng = _rng(seed)
        # Exact integer sums, one correctly rounded division each (Azure conv: 995.5277661043406).
        self.average_input = sum(self._input) / self._n
        self.average_output = sum(self._output) / self._n

    @property
    def average_length(self) -> float:
        """Mean input plus mean output length of the dataset, tokens per query."""
        return self.average_input + self.average_output

    def __len__(self) -> int:
        return self._n

    def sample(self) -> tuple[int, int]:
        """One (input_tokens, output_tokens) pair."""
        i = self.rng.randint(0, self._n - 1)
        return self._input[i], self._output[i]


class ArrivalRateSampler:
    """Draws request counts per 3-second interval from an arrival series rescaled to a target rate.

    Every entry is multiplied by ``3 * target_req_per_s / mean(series)``, so the series' mean
    becomes the target's count per interval; :meth:`sample` is the entry at ``randint(0, n - 1)``
    (a float: rounding with carry happens in :func:`generate_online_trace`). docs/original.md §9.
    """

    def __init__(self, series: str = "azure-conv", target_req_per_s: float = 1.0, seed: Seed = 0) -> None:
        self.series = series
        counts: list[int] = load_arrivals(series).tolist()
        mean = sum(counts) / len(counts)
        # The factor first, then one product per entry: this order reproduces the reference traces.
        factor = ARRIVAL_INTERVAL_S * target_req_per_s / mean
        self._scaled = [c * factor for c in counts]
        self.rng = _rng(seed)

    def sample(self) -> float:
        """Expected requests in one 3-second interval (rescaled)."""
        return self._scaled[self.rng.randint(0, len(self._scaled) - 1)]


def check_arrivals(arrivals: str, cv: float | None) -> None:
    """Refuse a ``cv`` the arrival process ``arrivals`` does not take, or ``gamma`` without one
    (a ConfigError naming ``--cv``)."""
    if cv is not None:
        c = _as_finite(cv)
        if arrivals != "gamma" and not (arrivals == "poisson" and c == 1):
            raise ConfigError("<argument>", "--cv", f"is for --arrivals gamma (poisson has a cv of 1; the others are "
                                                    f"series), got --arrivals {fileio.short_repr(arrivals)}")
        if c is None or not MIN_CV <= c <= MAX_CV:
            raise ConfigError("<argument>", "--cv", f"must be a number in [{MIN_CV:g}, {MAX_CV:g}], got "
                                                    f"{fileio.short_repr(cv)}")
    if arrivals == "gamma" and cv is None:
        raise ConfigError("<argument>", "--cv", "--arrivals gamma needs a coefficient of variation (--cv)")


class RateProfile:
    """A multiplier of the arrival rate over time: piecewise constant, ``pieces`` of (seconds
    after the trace's start, multiplier from then on), the first at 0 (docs/simulator.md,
    "Arrivals").

    Parsed from ``--rate-profile``:

    * ``step:T0=M0,T1=M1,...``: multiplier ``Mi`` from ``Ti`` s on (``T0`` must be 0);
    * ``diurnal:period=P,low=L``: ``L + (1 - L) (1 - cos(2 pi t / P)) / 2``, from ``L`` at the
      start up to 1 at half a period and back, cut into 240 constant pieces per period.
    """

    def __init__(self, pieces: list[tuple[float, float]], text: str = "") -> None:
        self.pieces = pieces
        self.text = text
        self._starts = [t for t, _ in pieces]
        # the integral of the multiplier up to each piece's start
        self._area = [0.0]
        for (t, m), (t2, _) in zip(pieces, pieces[1:], strict=False):
            self._area.append(self._area[-1] + m * (t2 - t))

    @classmethod
    def parse(cls, text: str, *, flag: str = "--rate-profile", duration: float | None = None) -> RateProfile:
        def bad(why: str) -> ConfigError:
            return ConfigError("<argument>", flag, f"{why}; expected step:0=M0,T1=M1,... or diurnal:period=P,low=L, "
                                                   f"got {fileio.short_repr(text)}")

        kind, _, rest = text.partition(":")
        fields = [f for f in rest.split(",") if f] if rest else []
        if len(fields) > MAX_PROFILE_PIECES:
            raise bad(f"more than {MAX_PROFILE_PIECES} pieces")
        pairs: list[tuple[str, str]] = []
        for f in fields:
            k, eq, v = f.partition("=")
            if not eq:
                raise bad(f"{f!r} is not KEY=VALUE")
            pairs.append((k.strip(), v.strip()))

        def num(k: str, v: str) -> float:
            x = _as_finite(_float_or_none(v))
            if x is None or x < 0:
                raise bad(f"{k}={v!r} is not a finite number >= 0")
            return x

        if kind == "step":
            pieces = [(num("time", k), num("multiplier", v)) for k, v in pairs]
            if not pieces or pieces[0][0] != 0:
                raise bad("the first step must start at 0")
            if any(b[0] <= a[0] for a, b in zip(pieces, pieces[1:], strict=False)):
                raise bad("step times must increase")
        elif kind == "diurnal":
            opts = dict(pairs)
            if set(opts) != {"period", "low"} or len(pairs) != 2:
                raise bad("diurnal takes period=P and low=L, once each")
            period, low = num("period", opts["period"]), num("low", opts["low"])
            if period <= 0 or low > 1:
                raise bad("period must be > 0 and low <= 1")
            n = 240
            span = duration if duration is not None else period
            count = math.ceil(span / period * n)
            if count > MAX_PROFILE_PIECES:
                raise bad(f"the run covers {span / period:.3g} periods, over {MAX_PROFILE_PIECES // n} periods")
            step = period / n
            # each piece takes the curve's mean over it (its exact integral), so the mean rate is exact
            pieces = []
            for i in range(max(count, 1)):
                a, b = i * step, (i + 1) * step
                w = 2 * math.pi / period
                mean_cos = (math.sin(w * b) - math.sin(w * a)) / (w * step)
                pieces.append((a, low + (1 - low) * (1 - mean_cos) / 2))
        else:
            raise bad(f"unknown profile {kind!r}")
        if not any(m > 0 for _, m in pieces):
            raise bad("the rate is 0 throughout")
        return cls(pieces, text)

    def multiplier(self, t: float) -> float:
        """The multiplier at ``t`` seconds after the start."""
        return self.pieces[max(bisect.bisect_right(self._starts, t) - 1, 0)][1]

    def area(self, t: float) -> float:
        """The integral of the multiplier over [0, t]."""
        i = max(bisect.bisect_right(self._starts, t) - 1, 0)
        return self._area[i] + self.pieces[i][1] * (t - self.pieces[i][0])

    def time_at(self, area: float) -> float:
        """The first ``t`` whose :meth:`area` reaches ``area`` (``inf`` past the last piece when its
        multiplier is 0)."""
        i = max(bisect.bisect_right(self._area, area) - 1, 0)
        # a zero piece does not advance the area: move on to the first piece that does
        while i + 1 < len(self.pieces) and self._area[i + 1] <= area:
            i += 1
        t0, m = self.pieces[i]
        if m == 0:
            return math.inf
        return t0 + (area - self._area[i]) / m


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _as_finite(value: object) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN, inf and ints past float's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        as_float = float(value)
    except OverflowError:
        return None
    return as_float if math.isfinite(as_float) else None


def generate_online_trace(
    arrivals: str = "azure-conv",
    lengths: str = "azure-conv",
    token_rate: float = 700.0,
    start: float = 0.0,
    duration: float = 1800,
    seed: Seed = 0,
    *,
    cv: float | None = None,
    profile: RateProfile | None = None,
) -> list[TraceEntry]:
    """Queries arriving over ``[start, start + duration)`` at about ``token_rate`` tokens/s.

    ``arrivals``: an arrival series (:data:`ARRIVAL_SERIES`), or ``gamma`` (inter-arrival gaps
    drawn from a Gamma distribution with coefficient of variation ``cv``, Llumnix's bursty load)
    or ``poisson`` (``gamma`` at ``cv`` 1). ``profile`` multiplies the rate over time (for a
    series: each 3-s interval's draw by the profile's mean over it). Without ``cv`` and
    ``profile`` an arrival series is drawn as below.

    ``token_rate``: target of Σ(input+output) per second; ``start``, ``duration``: seconds,
    ``duration`` a positive multiple of 3. Reproduces the original ``TraceGenerator`` (docs/original.md
    §9) exactly: with ``seed=0`` and AzureConv arrivals and lengths it returns the queries in
    ``helix_async/data/traces/generated/``. Sorted by arrival time.

    ``seed`` as in :class:`LengthSampler`; an int gives one private stream shared by the arrival
    and the length draws (the original reseeds the global RNG once per sampler it builds, and
    the last reseed wins, so both draw from one stream started at ``seed``).
    """
    rate = _as_finite(token_rate)
    if rate is None or rate <= 0:
        got = fileio.short_repr(token_rate)
        raise ConfigError("<argument>", "--token-rate", f"must be a finite number > 0 (tokens/s), got {got}")
    begin = _as_finite(start)
    if begin is None or begin < 0:
        got = fileio.short_repr(start)
        raise ConfigError("<argument>", "--start", f"must be a finite number >= 0 (seconds), got {got}")
    # 1800.0 is taken as 1800; what the loop needs is the count of 3-s intervals
    whole = _as_finite(duration)
    intervals = 0
    if whole is not None and whole.is_integer() and whole > 0 and int(whole) % ARRIVAL_INTERVAL_S == 0:
        intervals = int(whole) // ARRIVAL_INTERVAL_S
    if not intervals:
        raise ConfigError(
            "<argument>", "--duration",
            f"must be a positive multiple of {ARRIVAL_INTERVAL_S} seconds (the arrival series' interval), "
            f"got {fileio.short_repr(duration)}",
        )
    renewal = arrivals in RENEWAL_ARRIVALS
    check_arrivals(arrivals, cv)
    rng = _rng(seed)
    length_sampler = LengthSampler(lengths, rng)
    seconds = float(ARRIVAL_INTERVAL_S * intervals)
    weight = profile.area(seconds) if profile is not None else seconds
    expected = rate / length_sampler.average_length * weight
    if expected > MAX_GENERATED_QUERIES:
        raise ConfigError(
            "<argument>", "--rate",
            f"{rate:g} tokens/s for {ARRIVAL_INTERVAL_S * intervals} s is about {expected:.3g} queries, over the "
            f"limit of {MAX_GENERATED_QUERIES:g}: lower the rate or the duration",
        )
    if renewal:
        return _renewal_trace(rate / length_sampler.average_length, 1.0 if cv is None else float(cv), begin, seconds,
                              profile, rng, length_sampler)
    arrival_sampler = ArrivalRateSampler(arrivals, rate / length_sampler.average_length, rng)

    trace: list[TraceEntry] = []
    carry = 0.0
    for q in range(intervals):
        # Per interval, on the one stream: one arrival draw, k uniform times, then one length draw
        # per time in sorted order. Rounding with carry keeps the long-run count unbiased.
        raw = arrival_sampler.sample()
        if profile is not None:
            raw *= (profile.area(ARRIVAL_INTERVAL_S * (q + 1)) - profile.area(ARRIVAL_INTERVAL_S * q)) / ARRIVAL_INTERVAL_S
        k = round(raw + carry)
        carry = raw + carry - k
        # (start + 3q) + 3u, in this order, so times equal the original's to the last bit.
        base = begin + ARRIVAL_INTERVAL_S * q
        times = sorted(base + ARRIVAL_INTERVAL_S * rng.random() for _ in range(k))
        for t in times:
            inp, out = length_sampler.sample()
            trace.append(TraceEntry(t, inp, out))
    return trace


def _renewal_trace(req_per_s: float, cv: float, start: float, seconds: float, profile: RateProfile | None,
                   rng: random.Random, lengths: LengthSampler) -> list[TraceEntry]:
    """Arrivals of a renewal process, its gaps Gamma-distributed with mean 1 / ``req_per_s`` and
    coefficient of variation ``cv`` (shape 1 / cv^2), the time axis stretched by ``profile``: the
    n-th arrival is where the rate's integral reaches the n-th cumulative gap. Per arrival, on
    the one stream: one gap draw, then one length draw."""
    shape, scale = 1.0 / (cv * cv), cv * cv  # gaps of mean 1, in expected arrivals
    trace: list[TraceEntry] = []
    done = 0.0
    while True:
        done += rng.gammavariate(shape, scale)
        t = profile.time_at(done / req_per_s) if profile is not None else done / req_per_s
        if t >= seconds:
            return trace
        inp, out = lengths.sample()
        trace.append(TraceEntry(start + t, inp, out))


# --------------------------------------------------------------------------------------------------
# Trace files
# --------------------------------------------------------------------------------------------------


def _int_cell(src: str, lineno: int, column: str, text: str) -> int:
    try:
        value = int(text)  # refuses "12.5" and "1e3": a length is a whole number of tokens
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TOKENS_PER_QUERY:
        raise ConfigError(
            src, f"line {lineno}",
            f"column {column} must be an integer in [1, {MAX_TOKENS_PER_QUERY}], "
            f"got {fileio.short_repr(text)}",
        )
    return value


def read_trace_csv(path: str | os.PathLike[str]) -> list[TraceEntry]:
    """The queries of a trace file ``arrive_time_s,input_tokens,output_tokens``, in file order.

    Times are finite seconds >= 0 and must not decrease from row to row (the file is not
    re-sorted); lengths are integers in [1, 1_000_000]. Blank lines are skipped. Anything else
    (missing file, wrong header, a bad cell, no rows) is a ConfigError naming the file and line.
    """
    src = str(path)
    text = fileio.read_text(path, "trace file")
    lines = text.removeprefix("\ufeff").splitlines()
    header = tuple(cell.strip() for cell in lines[0].split(",")) if lines else ()
    if header != TRACE_HEADER:
        shown = fileio.short_repr(lines[0]) if lines else "an empty file"
        raise ConfigError(src, "line 1", f"header must be {','.join(TRACE_HEADER)}, got {shown}")

    trace: list[TraceEntry] = []
    prev_time = -math.inf
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(TRACE_HEADER):
            raise ConfigError(
                src, f"line {lineno}",
                f"expected {len(TRACE_HEADER)} columns, got {len(cells)}: {fileio.short_repr(line)}",
            )
        try:
            t = float(cells[0])
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and t >= 0):
            raise ConfigError(
                src, f"line {lineno}",
                "column arrive_time_s must be a finite number >= 0 (seconds), "
                f"got {fileio.short_repr(cells[0])}",
            )
        if t < prev_time:
            raise ConfigError(
                src, f"line {lineno}",
                f"column arrive_time_s: {cells[0]} is earlier than the previous row's {prev_time!r}; "
                "rows must be in non-decreasing time order",
            )
        prev_time = t
        inp = _int_cell(src, lineno, "input_tokens", cells[1])
        out = _int_cell(src, lineno, "output_tokens", cells[2])
        trace.append(TraceEntry(t, inp, out))
    if not trace:
        # named at the line where the first query was expected
        raise ConfigError(src, f"line {len(lines) + 1}", "the trace holds no queries (only a header)")
    return trace


def write_trace_csv(path: str | os.PathLike[str], trace: Iterable[tuple[float, int, int]]) -> Path:
    """Write ``trace`` as ``arrive_time_s,input_tokens,output_tokens`` (atomic replace).

    Times are written with ``repr`` so that :func:`read_trace_csv` gives back the same floats.
    Lines end in ``\\n`` (the original's files end in ``\\r\\n``; the reader takes both).
    Only what the reader accepts is written: ValueError for an empty trace, a time that is not
    finite, negative or smaller than the one before, or a length outside [1, 1_000_000].
    """
    buf = io.StringIO()
    buf.write(",".join(TRACE_HEADER) + "\n")
    prev = -math.inf
    count = 0
    for i, (t, inp, out) in enumerate(trace):
        t, inp, out = float(t), operator.index(inp), operator.index(out)
        if not (math.isfinite(t) and t >= prev and t >= 0):
            raise ValueError(
                f"trace[{i}]: arrival time {t!r} is not finite, negative or earlier than the one before"
            )
        if not (1 <= inp <= MAX_TOKENS_PER_QUERY and 1 <= out <= MAX_TOKENS_PER_QUERY):
            raise ValueError(f"trace[{i}]: lengths ({inp}, {out}) outside [1, {MAX_TOKENS_PER_QUERY}]")
        prev = t
        count += 1
        buf.write(f"{t!r},{inp},{out}\n")
    if not count:
        raise ValueError("empty trace: a trace file holds at least one query")
    return fileio.atomic_write_text(path, buf.getvalue(), "trace file")
