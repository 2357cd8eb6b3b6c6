"""What the simulator prices beyond the layers, as the runtime computes it (executors.cost_model):

* a lone decode at the profile's own point for one sequence when the decode table has one (the
  original doubles ``f_decode(1)``, docs/original.md §3.2: on its grids, which start at 2, that is
  ``f_decode(2)``);
* the model's head (final norm, LM head, token choice) once per batch whose run ends at the model's
  last layer, from the profile's ``<gpu>_head.csv`` (docs/profiles.md);
* neither in compat mode, nor with ``SimulationSetup.runtime_costs`` off;
* nodes that share a machine's cores (``sim.cores``): processor sharing, as a fair scheduler shares
  them, of the cores the machine gives them (all of them, or as measured).

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
from sim.cores import SharedCoreExecutor, SharedCores
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


# ---- nodes sharing the cores of one machine (sim.cores) -------------------------------------------

PX1, PS1 = (0.0, 1024.0), (0.0, 1.0)  # 1 s of work per 1,024 prompt tokens


def shared(clock: LoopClock, cores: SharedCores) -> SharedCoreExecutor:
    return SharedCoreExecutor(clock, CostModelExecutor(clock, GpuProfile("X", PX1, PS1, DX2, DS2,
                                                                         BatchTimer(PX1, PS1, DX2, DS2)), 0), cores)


def _ends(starts: list[tuple[float, int, int]], cores: float, available: tuple[float, ...] = ()) -> list[float]:
    """End times of batches (start s, prompt tokens, layers), one executor each, on shared cores."""
    loop = VirtualTimeLoop()
    clock = LoopClock(loop)
    machine = SharedCores(clock, cores, available)
    ends = [0.0] * len(starts)
    for i, (t, tokens, layers) in enumerate(starts):
        ex = shared(clock, machine)

        def go(ex: SharedCoreExecutor = ex, i: int = i, tokens: int = tokens, layers: int = layers) -> None:
            b = batch(0, 1, tokens, 0, layers)
            b.started = clock.now()
            ex.run(b, lambda _b, i=i: ends.__setitem__(i, clock.now()))

        loop.call_at(t, go)
    loop.run_until(100.0)
    loop.close()
    return ends


def test_processor_sharing() -> None:
    assert _ends([(0.0, 1024, 1)], 1.0) == [1.0]
    assert _ends([(0.0, 1024, 1), (0.0, 1024, 1)], 1.0) == [2.0, 2.0]
    # three at once on two cores: 2/3 of a core each
    assert _ends([(0.0, 1024, 1)] * 3, 2.0) == [pytest.approx(1.5)] * 3
    # two on two cores: a core each
    assert _ends([(0.0, 1024, 1)] * 2, 2.0) == [1.0, 1.0]
    # staggered on one core: alone for 0.5 s, then half a core each until the first is done at 1.5,
    # when the second has 0.5 s of work left, done alone
    assert _ends([(0.0, 1024, 1), (0.5, 1024, 1)], 1.0) == [1.5, 2.0]
    # the machine gives one busy process half a core, two of them 0.75 cores in all
    assert _ends([(0.0, 1024, 1)], 1.0, available=(0.5, 0.75)) == [2.0]
    assert _ends([(0.0, 1024, 1)] * 2, 1.0, available=(0.5, 0.75)) == [pytest.approx(8 / 3)] * 2
    # three: the last measured entry (0.75 cores for three), a quarter each
    assert _ends([(0.0, 1024, 1)] * 3, 1.0, available=(0.5, 0.75)) == [pytest.approx(4.0)] * 3
    # a run of 4 layers of 0.25 s of work each
    assert _ends([(0.0, 256, 4)], 1.0, available=(0.5,)) == [2.0]


def test_a_shared_run_of_layers_is_shortened_at_a_layer_end(loop: VirtualTimeLoop) -> None:
    clock = LoopClock(loop)
    machine = SharedCores(clock, 1.0, available=(0.5,))  # half a core: 0.5 s per layer of 0.25 s of work
    ex = shared(clock, machine)
    ends: list[tuple[float, int]] = []
    b = batch(0, 1, 256, 0, layers=4)
    ex.run(b, lambda bb: ends.append((clock.now(), bb.layers)))
    loop.run_until(0.6)  # the second layer is running
    assert ex.shorten(b, 1) == 2
    loop.run_until(10.0)
    assert ends == [(1.0, 2)]
    with pytest.raises(ValueError, match="cores must be > 0"):
        SharedCores(clock, 0.0)
    with pytest.raises(ValueError, match="available cores must be in"):
        SharedCores(clock, 2.0, available=(1.0, 2.5))


def _lone_ttft(cores: float, available: tuple[float, ...], compat: bool = False) -> float:
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    t0 = load_start_time(placement)
    setup = SimulationSetup(placement, kv=KV_ONLINE, compat=compat, cores=cores, available=available)
    res = run(setup, Workload(mode="trace", trace=[TraceEntry(t0 + 1.0, 64, 2)], warmup=0.0, duration=1e9))
    return res.sim.host.prompt_latency[0]


def test_the_simulator_shares_the_cores_in_default_mode_only() -> None:
    # a lone prompt computes on one node at a time: 3 cores or none shared is the same; given a
    # whole core, half of one or a quarter, its compute takes 1, 2 and 4 times as long (the
    # network's share stays)
    alone = _lone_ttft(0.0, ())
    assert _lone_ttft(3.0, ()) == pytest.approx(alone, abs=1e-12)
    t1, t2, t4 = _lone_ttft(1.0, ()), _lone_ttft(1.0, (0.5,)), _lone_ttft(1.0, (0.25,))
    assert t1 == pytest.approx(alone, abs=1e-12)
    assert t4 - t2 == pytest.approx(2 * (t2 - t1), rel=1e-9)
    assert t2 > t1
    assert _lone_ttft(1.0, (0.25,), compat=True) == _lone_ttft(0.0, (), compat=True)


def test_cli_shared_cores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helix_async.placement.io import write_placement
    from sim.cli import main as sim_main

    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    plan = tmp_path / "plan.toml"
    write_placement(placement, plan)
    trace = tmp_path / "trace.csv"
    trace.write_text("arrive_time_s,input_tokens,output_tokens\n0.0,64,4\n0.1,64,4\n")
    base = ["run", "--plan", str(plan), "--trace", str(trace)]
    assert sim_main([*base, "--shared-cores", "2", "--compat", "helix"]) == 2
    assert "--shared-cores" in capsys.readouterr().err
    assert sim_main([*base, "--cores-available", "1"]) == 2
    assert "needs --shared-cores" in capsys.readouterr().err
    assert sim_main([*base, "--shared-cores", "2", "--cores-available", "1,2.5"]) == 2
    assert "more than the 2 shared cores" in capsys.readouterr().err
    out = tmp_path / "rep"
    assert sim_main([*base, "--shared-cores", "2", "--cores-available", "0.9,1.2", "--report", str(out)]) == 0
    import json

    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["shared_cores"], config["cores_available"]) == (2.0, [0.9, 1.2])


def test_cli_gather(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sim run --gather K`` runs the workers with ``worker --gather K``: 0 turns decode gathering off,
    the default gathers the decodes of a batch that come back one by one (docs/runtime.md)."""
    import json

    from helix_async.placement.io import write_placement
    from sim.cli import main as sim_main

    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})
    plan = tmp_path / "plan.toml"
    write_placement(placement, plan)
    trace = tmp_path / "trace.csv"
    trace.write_text("arrive_time_s,input_tokens,output_tokens\n" + "".join(f"0.0,{16 + i},24\n" for i in range(8)))
    base = ["run", "--plan", str(plan), "--trace", str(trace)]
    assert sim_main([*base, "--gather", "0.5", "--compat", "helix"]) == 2
    assert "--gather" in capsys.readouterr().err
    assert sim_main([*base, "--gather", "11"]) == 2
    assert "--gather" in capsys.readouterr().err
    reports = {}
    for name, flags in (("off", ["--gather", "0"]), ("default", []), ("half", ["--gather", "0.5"])):
        assert sim_main([*base, *flags, "--report", str(tmp_path / name)]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert [n["gathers"] for n in reports["off"]["nodes"]] == [0, 0, 0]
    assert reports["off"]["config"]["gather"] == 0.0 and "gather" not in reports["default"]["config"]
    for name in ("default", "half"):
        nodes = reports[name]["nodes"]
        assert all(n["gathers"] > 0 and n["gather_wait_s"] > 0 for n in nodes)
        # gathered decodes run in fewer, larger batches
        assert sum(n["batches"] for n in nodes) < sum(n["batches"] for n in reports["off"]["nodes"])
    assert sum(n["gather_wait_s"] for n in reports["half"]["nodes"]) > sum(n["gather_wait_s"] for n in reports["default"]["nodes"])
