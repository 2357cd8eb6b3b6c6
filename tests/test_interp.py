"""The compiled batch-time interpolation must agree bit for bit with its pure-Python specification."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helix_async import envs
from helix_async.interp import BatchTimer, BatchTimerC, BatchTimerPy
from helix_async.model import load_profiles

IMPLS = [pytest.param(BatchTimerPy, id="py")]
if BatchTimerC is not None:
    IMPLS.append(pytest.param(BatchTimerC, id="c"))

needs_c = pytest.mark.skipif(BatchTimerC is None, reason="pure-Python build (HELIX_NO_EXTENSIONS=1)")


def test_import_site_picks_compiled_unless_disabled() -> None:
    if envs.HELIX_NO_EXTENSIONS:
        assert BatchTimer is BatchTimerPy
    else:
        assert BatchTimerC is not None and BatchTimer is BatchTimerC


@pytest.mark.parametrize("impl", IMPLS)
def test_grid_points_and_linear_between(impl) -> None:
    t = impl([0, 250, 500], [0.0, 2e-3, 4.5e-3], [0, 2, 4], [0.0, 1.4e-3, 1.5e-3])
    assert t.prompt(250) == 2e-3
    assert t.prompt(500) == 4.5e-3
    assert t.prompt(375) == pytest.approx(3.25e-3, rel=1e-15)
    assert t.decode(3) == pytest.approx(1.45e-3, rel=1e-15)
    assert t.prompt_max == 500.0 and t.decode_max == 4.0


@pytest.mark.parametrize("impl", IMPLS)
def test_single_decode_is_charged_twice(impl) -> None:
    t = impl([0, 250], [0.0, 2e-3], [0, 2], [0.0, 1.4e-3])
    # f_d(1) = 0.7 ms by interpolation from 0; a batch with one decode pays 2 * 0.7 ms
    assert t.batch_time(0, 1) == 2 * t.decode(1)
    assert t.batch_time(125, 2) == t.prompt(125) + t.decode(2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x", [-1, 501, math.inf, math.nan])
def test_out_of_grid_is_an_error(impl, x) -> None:
    t = impl([0, 250, 500], [0.0, 2e-3, 4e-3], [0, 2], [0.0, 1.4e-3])
    with pytest.raises(ValueError, match="outside the profiled range"):
        t.prompt(x)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_grid_rejected(impl) -> None:
    with pytest.raises(ValueError, match="increase strictly"):
        impl([0, 250, 250], [0, 1, 2], [0, 2], [0, 1])
    with pytest.raises(ValueError, match="grid points"):
        impl([0, 250], [0, 1, 2], [0, 2], [0, 1])


@st.composite
def grids(draw):
    n = draw(st.integers(2, 40))
    steps = draw(st.lists(st.floats(1e-3, 1e4, allow_nan=False), min_size=n - 1, max_size=n - 1))
    x0 = draw(st.floats(0, 100, allow_nan=False))
    xs = [x0]
    for s in steps:
        nxt = xs[-1] + s
        if nxt <= xs[-1]:
            nxt = math.nextafter(xs[-1], math.inf)
        xs.append(nxt)
    ys = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n))
    return xs, ys


@needs_c
@settings(max_examples=300, deadline=None)
@given(grids(), grids(), st.data())
def test_compiled_equals_python_on_random_tables(pg, dg, data) -> None:
    c = BatchTimerC(pg[0], pg[1], dg[0], dg[1])
    p = BatchTimerPy(pg[0], pg[1], dg[0], dg[1])
    for _ in range(20):
        xp = data.draw(st.one_of(st.floats(pg[0][0], pg[0][-1]), st.sampled_from(pg[0])))
        xd = data.draw(st.one_of(st.floats(dg[0][0], dg[0][-1]), st.sampled_from(dg[0])))
        assert c.prompt(xp) == p.prompt(xp)
        assert c.decode(xd) == p.decode(xd)
        assert c.batch_time(xp, xd) == p.batch_time(xp, xd)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["A100", "V100", "L4", "L4x2", "T4", "T4x2", "T4x4"]), st.data())
def test_compiled_equals_python_on_shipped_profiles(gpu, data) -> None:
    prof = load_profiles("llama2-70b").profile(gpu)
    c = BatchTimerC(prof.prompt_x, prof.prompt_s, prof.decode_x, prof.decode_s)
    p = BatchTimerPy(prof.prompt_x, prof.prompt_s, prof.decode_x, prof.decode_s)
    for _ in range(50):
        tokens = data.draw(st.integers(0, int(prof.prompt_x[-1])))
        seqs = data.draw(st.integers(0, int(prof.decode_x[-1])))
        assert c.batch_time(tokens, seqs) == p.batch_time(tokens, seqs)
