"""What the simulator prices beyond the layers, as the runtime computes it (executors.cost_model):

* a lone decode at the profile's own point for one sequence when the decode table has one (the
  original doubles ``f_decode(1)``, docs/original.md §3.2: on its grids, which start at 2, that is
  ``f_decode(2)``);
* the model's head (final norm, LM head, token choice) once per batch whose run ends at the model's
  last layer, from the profile's ``<gpu>_head.csv`` (docs/profiles.md);
* neither in compat mode, nor with ``SimulationSetup.runtime_costs`` off.

Oracles: hand-made tables with exact binary values, and the rules above restated as arithmetic.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from helix_async import envs
from helix_async.clock import LoopClock
from helix_async.cluster import load_cluster
from helix_async.executors.base import Batch
from helix_async.executors.cost_model import CostModelExecutor
from helix_async.interp import BatchTimer
from helix_async.model import GpuProfile, get_model, load_profiles
from helix_async.placement import Placement
from helix_async.settings import KV_ONLINE
from helix_async.vloop import VirtualTimeLoop
from helix_async.workloads import TraceEntry
from sim.runner import Workload, run
from sim.simulation import SimulationSetup, load_start_time

PX, PS = (0.0, 1024.0), (0.0, 0.5)
# decode grids: one measured at a single sequence, one (the original's) starting at two
DX1, DS1 = (0.0, 1.0, 2.0, 4.0), (0.0, 0.125, 0.1875, 0.25)
DX2, DS2 = (0.0, 2.0, 4.0), (0.0, 0.1875, 0.25)
HX, HS = (0.0, 1.0, 4.0), (0.0, 0.0625, 0.25)


def profile(dx: tuple[float, ...], ds: tuple[float, ...], head: bool = False) -> GpuProfile:
    hx, hs = (HX, HS) if head else ((), ())
    return GpuProfile("X", PX, PS, dx, ds, BatchTimer(PX, PS, dx, ds), hx, hs)


def batch(layer: int, p_req: int, p_tok: int, d_seq: int, layers: int = 1) -> Batch:
    b = Batch(layer, [], p_req, p_tok, d_seq, 0, 0)
    b.layers = layers
    return b


@pytest.fixture
def loop() -> VirtualTimeLoop:
    lp = VirtualTimeLoop()
    yield lp
    lp.close()


def test_a_lone_decode_costs_its_measured_point(loop: VirtualTimeLoop) -> None:
    clock = LoopClock(loop)
    ours = CostModelExecutor(clock, profile(DX1, DS1), 0, measured_single=True)
    original = CostModelExecutor(clock, profile(DX1, DS1), 0)
    assert ours.duration(batch(0, 0, 0, 1)) == 0.125
    assert original.duration(batch(0, 0, 0, 1)) == 0.25  # 2 x f_decode(1)
    # with a prompt beside it: f_prompt(512) + f_decode(1)
    assert ours.duration(batch(0, 1, 512, 1)) == 0.25 + 0.125
    # other batch sizes are priced alike
    assert ours.duration(batch(0, 0, 0, 2)) == original.duration(batch(0, 0, 0, 2)) == 0.1875
    # no point at 1 (the original's grids): doubled either way, which is f_decode(2)
    on_original_grid = CostModelExecutor(clock, profile(DX2, DS2), 0, measured_single=True)
    assert on_original_grid.duration(batch(0, 0, 0, 1)) == 0.1875


def test_head_table_lookup() -> None:
    p = profile(DX1, DS1, head=True)
    assert p.head(0) == 0.0
    assert p.head(1) == 0.0625
    assert p.head(2) == 0.0625 + (0.25 - 0.0625) / 3
    assert p.head(4) == 0.25
    assert p.head(8) == 0.25 + (0.25 - 0.0625) / 3 * 4  # along the last segment
    assert profile(DX1, DS1).head(4) == 0.0


def test_the_head_is_paid_when_a_run_ends_at_the_last_layer(loop: VirtualTimeLoop) -> None:
    clock = LoopClock(loop)
    ex = CostModelExecutor(clock, profile(DX1, DS1, head=True), 0, measured_single=True, last_layer=8)
    layer = 0.25 + 0.1875  # f_prompt(512) + f_decode(2)
    # 1 prompt + 2 decodes leave layer 7: the head for 3 sequences
    assert ex.duration(batch(6, 1, 512, 2, layers=2)) == 2 * layer + 0.0625 + (0.25 - 0.0625) / 3 * 2
    assert ex.duration(batch(5, 1, 512, 2, layers=2)) == 2 * layer  # ends at layer 6
    no_table = CostModelExecutor(clock, profile(DX1, DS1), 0, last_layer=8)
    assert no_table.duration(batch(6, 1, 512, 2, layers=2)) == 2 * layer
    not_last = CostModelExecutor(clock, profile(DX1, DS1, head=True), 0)
    assert not_last.duration(batch(6, 1, 512, 2, layers=2)) == 2 * layer


def test_a_shortened_run_pays_no_head(loop: VirtualTimeLoop) -> None:
    clock = LoopClock(loop)
    ex = CostModelExecutor(clock, profile(DX1, DS1, head=True), 0, last_layer=4)
    ends: list[float] = []
    b = batch(1, 0, 0, 4, layers=3)  # layers 1..3, each 0.25 s, then the head (0.25 s)
    ex.run(b, lambda _b: ends.append(clock.now()))
    assert ex.busy_time == 1.0
    loop.run_until(0.1)
    assert ex.shorten(b, 2) == 2
    loop.run_until(10.0)
    assert ends == [0.5]
    assert ex.busy_time == 0.5


def _profile_dir(root: Path, *, head: bool) -> Path:
    """A tiny-llama CPU profile in ``root`` (HELIX_PROFILE_DIR layout): every layer 1 ms per
    prompt token... in round binary numbers, a lone decode measured, and maybe a head table."""
    from helix_async.executors.profiling import ProfileResult, node_settings_rows, write_profile

    spec = get_model("tiny-llama")
    prompt = tuple((n, n / 1024.0) for n in (16, 256, 2048))
    decode = ((1, 0.0078125), (2, 0.01171875), (4, 0.015625), (8, 0.0234375), (128, 0.0625))
    heads = ((1, 0.03125), (8, 0.0625), (128, 0.125)) if head else ()
    res = ProfileResult("CPU", prompt, decode, "cpu", 1, head=heads)
    rows = node_settings_rows(spec, "CPU", kv_bytes=2**26, prompt_max_requests=4, prompt_max_tokens=2048,
                              decode_max_tokens=128)
    write_profile(res, root / spec.key, rows, spec)
    return root


def test_the_profile_writes_and_the_model_reads_the_head_table(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "HELIX_PROFILE_DIR", str(_profile_dir(tmp_path, head=True)))
    with (tmp_path / "tiny_llama" / "cpu_head.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[:2] == [["sequences", "time_ms"], ["0", "0"]]
    p = load_profiles("tiny-llama").profile("CPU")
    assert p.head_x == (0.0, 1.0, 8.0, 128.0)
    assert p.head(1) == pytest.approx(0.03125, abs=1e-12)
    assert p.head(8) == pytest.approx(0.0625, abs=1e-12)


def _one_query(compat: bool, runtime_costs: bool) -> tuple[float, float]:
    """TTFT and the one TPOT of a lone query (64 prompt tokens, 2 output tokens) on tiny3 in 3 stages."""
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    t0 = load_start_time(placement)
    setup = SimulationSetup(placement, kv=KV_ONLINE, compat=compat, runtime_costs=runtime_costs)
    res = run(setup, Workload(mode="trace", trace=[TraceEntry(t0 + 1.0, 64, 2)], warmup=0.0, duration=1e9))
    host = res.sim.host
    assert host.stats.finished == 1
    return host.prompt_latency[0], host.decode_latency[0]


def test_the_simulator_prices_the_head_and_a_lone_decode_in_default_mode_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "HELIX_PROFILE_DIR", str(_profile_dir(tmp_path, head=True)))
    ttft, tpot = _one_query(False, True)
    ttft0, tpot0 = _one_query(False, False)
    # the prompt leaves the last layer as one sequence: the head for 1
    assert ttft - ttft0 == pytest.approx(0.03125, abs=1e-9)
    # the decode runs alone through 8 layers: f_decode(1) each instead of 2 x f_decode(1), plus the head
    assert tpot - tpot0 == pytest.approx(-8 * 0.0078125 + 0.03125, abs=1e-9)
    # compat prices as the original whatever the setting
    assert _one_query(True, True) == _one_query(True, False)
