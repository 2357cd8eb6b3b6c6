"""Workload generators of the simulator against the original code's outputs (docs/original.md §9)."""

from __future__ import annotations

import csv
import io
import random
from importlib import resources
from pathlib import Path

import pytest

from helix_async.errors import ConfigError
from sim.workloads import (
    ARRIVAL_SERIES,
    LENGTH_DATASETS,
    ArrivalRateSampler,
    LengthSampler,
    RateProfile,
    TraceEntry,
    generate_online_trace,
    load_arrivals,
    load_lengths,
    read_trace_csv,
    write_trace_csv,
)

GENERATED = resources.files("helix_async") / "data" / "traces" / "generated"


def _rows(name: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO((GENERATED / name).read_text(encoding="utf-8"), newline="")))


def _reference_trace(name: str) -> list[tuple[float, int, int]]:
    header, *rows = _rows(name)
    assert header == ["arrive_time_s", "input_tokens", "output_tokens"]
    return [(float(t), int(i), int(o)) for t, i, o in rows]


# --------------------------------------------------------------------------------------------------
# Data and samplers
# --------------------------------------------------------------------------------------------------


def test_datasets_load_with_documented_sizes() -> None:
    sizes = {"azure-conv": 16657, "azure-code": 7574, "alpaca": 47379, "sharegpt": 82814}
    assert set(LENGTH_DATASETS) == set(sizes)
    for name, n in sizes.items():
        inp, out = load_lengths(name)
        assert len(inp) == len(out) == n
        assert inp.min() >= 1 and out.min() >= 1
        assert not inp.flags.writeable
    assert load_lengths("azure-conv") is load_lengths("azure-conv")  # cached
    for name in ARRIVAL_SERIES:
        assert len(load_arrivals(name)) == 1200
    assert load_arrivals("azure-conv").max() == 30
    assert load_arrivals("azure-code").max() == 112


def test_unknown_names_name_the_flag_and_the_choices() -> None:
    known = r"\(known: azure-conv, azure-code, alpaca, sharegpt\)"
    with pytest.raises(ConfigError, match=r"--lengths: unknown length dataset 'nope' " + known):
        load_lengths("nope")
    with pytest.raises(ConfigError, match=r"--arrivals.*azure-conv, azure-code"):
        load_arrivals("alpaca")
    with pytest.raises(ConfigError, match="--lengths"):
        LengthSampler("bogus", 0)
    with pytest.raises(ConfigError, match="--arrivals"):
        generate_online_trace("bogus", "azure-conv", 700, 0, 300, 0)


def test_average_length() -> None:
    s = LengthSampler("azure-conv", 0)
    assert s.average_length == pytest.approx(995.5277661043406, rel=1e-15)
    assert s.average_input == pytest.approx(763.08, abs=0.01)
    assert s.average_output == pytest.approx(232.45, abs=0.01)


def test_offline_lengths_match_the_original() -> None:
    header, *rows = _rows("offline_lengths_azureconv_seed0_first500.csv")
    assert header == ["draw_index", "input_tokens", "output_tokens"]
    expected = [(int(i), int(o)) for _, i, o in rows]
    s = LengthSampler("azure-conv", 0)
    assert [s.sample() for _ in range(500)] == expected
    assert expected[:2] == [(194, 96), (420, 124)]


def test_length_sampler_private_or_shared_stream() -> None:
    a = LengthSampler("azure-conv", 0)
    random.seed(12345)  # the global RNG is never touched
    b = LengthSampler("azure-conv", 0)
    assert [a.sample() for _ in range(20)] == [b.sample() for _ in range(20)]

    shared = random.Random(0)
    c = LengthSampler("azure-conv", shared)
    d = LengthSampler("azure-conv", shared)
    first, second = c.sample(), d.sample()
    s = LengthSampler("azure-conv", 0)
    assert [first, second] == [s.sample(), s.sample()]
    assert all(type(x) is int for x in first)


def test_arrival_sampler_rescales_to_the_target() -> None:
    s = ArrivalRateSampler("azure-code", 2.0, 0)
    # mean over the series is 3 s * 2 req/s
    assert sum(s._scaled) / len(s._scaled) == pytest.approx(6.0)


# --------------------------------------------------------------------------------------------------
# Online trace
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "start", "duration", "count"),
    [(700, 20, 1800, 1293), (400, 20, 1800, 738), (300, 0, 300, 87)],
    ids=["tput700", "tput400", "tput300"],
)
def test_online_trace_equals_the_original(rate: int, start: int, duration: int, count: int) -> None:
    expected = _reference_trace(f"online_azureconv_tput{rate}_start{start}_dur{duration}_seed0.csv")
    got = generate_online_trace("azure-conv", "azure-conv", rate, start, duration, 0)
    assert len(got) == count
    assert got == expected  # times compared with ==: the file holds repr() floats
    assert all(type(e) is TraceEntry and type(e.input_tokens) is int for e in got)


def test_online_trace_token_rate_and_bounds() -> None:
    trace = generate_online_trace("azure-conv", "azure-conv", 700, 20, 1800, 0)
    assert sum(e.input_tokens + e.output_tokens for e in trace) / 1800 == pytest.approx(688.5, abs=0.05)
    times = [e.arrive_time_s for e in trace]
    assert times == sorted(times)
    assert 20 <= times[0] and times[-1] < 1820


def test_online_trace_seeds() -> None:
    a = generate_online_trace("azure-conv", "azure-conv", 300, 0, 300, 0)
    b = generate_online_trace("azure-conv", "azure-conv", 300, 0, 300, 0)
    c = generate_online_trace("azure-conv", "azure-conv", 300, 0, 300, 1)
    assert a == b
    assert a != c
    # an int seed and a fresh Random with that seed are the same stream
    assert generate_online_trace("azure-conv", "azure-conv", 300, 0, 300, random.Random(0)) == a


def _gaps(trace: list[TraceEntry]) -> list[float]:
    return [b.arrive_time_s - a.arrive_time_s for a, b in zip(trace, trace[1:], strict=False)]


@pytest.mark.parametrize(("arrivals", "cv"), [("poisson", None), ("gamma", 0.5), ("gamma", 3.0)])
def test_renewal_arrivals_have_the_rate_and_the_coefficient_of_variation(arrivals: str, cv: float | None) -> None:
    """Gaps of mean 1 / (tokens/s over the dataset's mean query length) and the asked coefficient
    of variation (Poisson: 1), within the sampling error of about 5,000 gaps (and of the
    heavy-tailed gaps at cv 3)."""
    rate = 2000.0
    trace = generate_online_trace(arrivals, "azure-conv", rate, 0, 2700, 7, cv=cv)
    per_s = rate / LengthSampler("azure-conv").average_length
    gaps = _gaps(trace)
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    want_cv = 1.0 if cv is None else cv
    assert mean == pytest.approx(1 / per_s, rel=0.05 * max(want_cv, 1))
    assert sd / mean == pytest.approx(want_cv, rel=0.08 * max(want_cv, 1))
    assert all(g >= 0 for g in gaps) and trace[-1].arrive_time_s < 2700
    assert generate_online_trace(arrivals, "azure-conv", rate, 0, 2700, 7, cv=cv) == trace  # seeded
    assert generate_online_trace(arrivals, "azure-conv", rate, 0, 2700, 8, cv=cv) != trace


def test_rate_profiles_scale_arrivals_over_time() -> None:
    """A step profile multiplies the count in each of its pieces (the middle third at 4x the
    others); a diurnal one averages (1 + low) / 2 over a whole period, and its pieces follow the
    raised cosine; the same profile scales an arrival series' intervals."""
    step = RateProfile.parse("step:0=1,600=4,1200=1")
    assert (step.area(1800), step.multiplier(599.9), step.multiplier(600), step.time_at(1000)) == (3600, 1, 4, 700)
    for arrivals in ("poisson", "azure-conv"):
        trace = generate_online_trace(arrivals, "azure-conv", 2000, 0, 1800, 3, profile=step)
        counts = [sum(1 for e in trace if a <= e.arrive_time_s < a + 600) for a in (0, 600, 1200)]
        assert counts[1] / counts[0] == pytest.approx(4, rel=0.15), (arrivals, counts)
        assert counts[1] / counts[2] == pytest.approx(4, rel=0.15), (arrivals, counts)
    day = RateProfile.parse("diurnal:period=1800,low=0.25", duration=1800)
    assert day.area(1800) == pytest.approx(1800 * (1 + 0.25) / 2, rel=1e-12)
    assert day.multiplier(0) == pytest.approx(0.25, abs=0.001) and day.multiplier(900) == pytest.approx(1, abs=0.001)
    trace = generate_online_trace("gamma", "azure-conv", 3000, 0, 1800, 3, cv=2.0, profile=day)
    first, mid = (sum(1 for e in trace if a <= e.arrive_time_s < a + 300) for a in (0, 750))
    assert mid > 2 * first


@pytest.mark.parametrize(("kwargs", "flag", "words"), [
    ({"arrivals": "gamma"}, "--cv", "needs a coefficient"),
    ({"arrivals": "gamma", "cv": 0}, "--cv", "must be a number"),
    ({"arrivals": "gamma", "cv": float("nan")}, "--cv", "must be a number"),
    ({"arrivals": "poisson", "cv": 2}, "--cv", "poisson has a cv of 1"),
    ({"arrivals": "azure-conv", "cv": 2}, "--cv", "is for --arrivals gamma"),
    ({"arrivals": "poisson", "token_rate": 1e9}, "--rate", "over the limit"),
])
def test_bad_renewal_arrivals_name_the_flag(kwargs: dict[str, object], flag: str, words: str) -> None:
    args: dict[str, object] = {"lengths": "azure-conv", "token_rate": 700.0, "duration": 300, **kwargs}
    with pytest.raises(ConfigError, match=flag) as err:
        generate_online_trace(**args)  # type: ignore[arg-type]
    assert words in str(err.value)


@pytest.mark.parametrize(("text", "words"), [
    ("", "unknown profile"),
    ("ramp:0=1", "unknown profile"),
    ("step:", "first step must start at 0"),
    ("step:10=1", "first step must start at 0"),
    ("step:0=1,5=2,5=3", "must increase"),
    ("step:0=1,x", "is not KEY=VALUE"),
    ("step:0=-1", "not a finite number >= 0"),
    ("step:0=nan", "not a finite number >= 0"),
    ("step:0=0", "rate is 0 throughout"),
    ("diurnal:period=0,low=0.5", "period must be > 0"),
    ("diurnal:period=60,low=2", "low <= 1"),
    ("diurnal:period=60", "takes period=P and low=L"),
    ("diurnal:period=1,low=0.5", "periods"),
])
def test_bad_rate_profiles_name_the_flag(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match="--rate-profile") as err:
        RateProfile.parse(text, duration=86400)
    assert words in str(err.value)


def test_a_profile_that_stops_the_load_ends_the_trace() -> None:
    trace = generate_online_trace("poisson", "azure-conv", 2000, 0, 1800, 1, profile=RateProfile.parse("step:0=1,300=0"))
    assert trace and trace[-1].arrive_time_s < 300


def test_other_datasets_generate() -> None:
    trace = generate_online_trace("azure-code", "sharegpt", 500, 0, 600, 3)
    assert trace and all(e.input_tokens >= 1 for e in trace)


@pytest.mark.parametrize("duration", [0, -3, 301, 2.5, True, float("inf"), 10**400])
def test_duration_must_be_a_positive_multiple_of_3(duration: float) -> None:
    with pytest.raises(ValueError, match="--duration"):
        generate_online_trace("azure-conv", "azure-conv", 300, 0, duration, 0)


def test_bad_rate_and_start() -> None:
    with pytest.raises(ConfigError, match="--token-rate"):
        generate_online_trace("azure-conv", "azure-conv", 0, 0, 300, 0)
    with pytest.raises(ConfigError, match="--token-rate"):
        generate_online_trace("azure-conv", "azure-conv", float("nan"), 0, 300, 0)
    with pytest.raises(ConfigError, match="--start"):
        generate_online_trace("azure-conv", "azure-conv", 300, -1, 300, 0)
    with pytest.raises(ConfigError, match="--start"):
        generate_online_trace("azure-conv", "azure-conv", 300, 10**400, 300, 0)
    # 1800.0 is 1800
    assert generate_online_trace("azure-conv", "azure-conv", 300, 0, 300.0, 0) == generate_online_trace(
        "azure-conv", "azure-conv", 300, 0, 300, 0
    )


# --------------------------------------------------------------------------------------------------
# Trace files
# --------------------------------------------------------------------------------------------------


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    name = "online_azureconv_tput300_start0_dur300_seed0.csv"
    trace = generate_online_trace("azure-conv", "azure-conv", 300, 0, 300, 0)
    out = write_trace_csv(tmp_path / "t.csv", trace)
    assert read_trace_csv(out) == trace
    # the same text as the original's file, but for its \r\n line ends
    original = (GENERATED / name).read_bytes().decode().replace("\r\n", "\n")
    assert out.read_text() == original


def test_reader_accepts_the_reference_file_and_whitespace(tmp_path: Path) -> None:
    ref = GENERATED / "online_azureconv_tput300_start0_dur300_seed0.csv"
    with resources.as_file(ref) as p:
        assert len(read_trace_csv(p)) == 87
    f = tmp_path / "ws.csv"
    f.write_text(" arrive_time_s , input_tokens,output_tokens \n0, 5 ,6\n\n1.5,7,8\n")
    assert read_trace_csv(f) == [(0.0, 5, 6), (1.5, 7, 8)]


def test_writer_refuses_what_the_reader_would(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        write_trace_csv(tmp_path / "e.csv", [])
    with pytest.raises(ValueError, match="earlier"):
        write_trace_csv(tmp_path / "d.csv", [(2.0, 1, 1), (1.0, 1, 1)])
    with pytest.raises(ValueError, match="lengths"):
        write_trace_csv(tmp_path / "z.csv", [(0.0, 0, 1)])
    assert not list(tmp_path.iterdir())


HEADER = "arrive_time_s,input_tokens,output_tokens\n"


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ("arrive,input_tokens,output_tokens\n1,2,3\n", 1, ["header"]),
        (HEADER + "1.0,2,3\nabc,2,3\n", 3, ["arrive_time_s", "'abc'"]),
        (HEADER + "-1.0,2,3\n", 2, ["arrive_time_s", "'-1.0'"]),
        (HEADER + "inf,2,3\n", 2, ["arrive_time_s", "'inf'"]),
        (HEADER + "1.0,0,3\n", 2, ["input_tokens", "'0'"]),
        (HEADER + "1.0,12.5,3\n", 2, ["input_tokens", "'12.5'"]),
        (HEADER + "1.0,2,2000000\n", 2, ["output_tokens", "'2000000'"]),
        (HEADER + "5.0,2,3\n4.0,2,3\n", 3, ["arrive_time_s", "non-decreasing"]),
        (HEADER + "1.0,2\n", 2, ["3 columns"]),
    ],
    ids=["header", "non-numeric-time", "negative-time", "inf-time", "zero-input", "float-input",
         "huge-output", "decreasing", "short-row"],
)
def test_bad_trace_rows(tmp_path: Path, body: str, line: int, words: list[str]) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(body)
    with pytest.raises(ConfigError) as info:
        read_trace_csv(f)
    msg = str(info.value)
    assert str(f) in msg and f"line {line}" in msg
    for w in words:
        assert w in msg


def test_empty_and_missing_trace_files(tmp_path: Path) -> None:
    f = tmp_path / "empty.csv"
    f.write_text(HEADER)
    with pytest.raises(ConfigError, match="line 2: .*no queries") as info:
        read_trace_csv(f)
    assert str(f) in str(info.value)
    f.write_text("")
    with pytest.raises(ConfigError, match="line 1"):
        read_trace_csv(f)
    with pytest.raises(ConfigError, match="no such file") as info:
        read_trace_csv(tmp_path / "missing.csv")
    assert "missing.csv" in str(info.value)
    with pytest.raises(ConfigError, match="folder"):
        read_trace_csv(tmp_path)
