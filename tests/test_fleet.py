"""The simulator's elastic fleet (sim/fleet.py): spares join under load and leave when it falls.

LLaMA-2-70B on single24 with the shipped ILP plan, a short bursty online load, and thresholds low
enough that the load crosses them. What is checked: a spare joins, serves (its worker computes),
and leaves once it carries nothing; every query is served; the GPU-hours and dollars equal the
nodes' service intervals (base nodes from the plan's start, the spare from its join decision to its
leaving) times the prices, computed here from the events; a static fleet keeps its spares; the
same seed gives the same report, byte for byte; bad flags give one line naming them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helix_async.errors import ConfigError
from helix_async.placement.io import load_shipped_layout
from helix_async.settings import KV_ONLINE
from sim.fleet import DEFAULT_PRICES, FleetConfig, fleet_cost, parse_spares
from sim.report import report_json
from sim.runner import Workload, run
from sim.simulation import SimulationSetup

ROOT = Path(__file__).resolve().parents[1]
LOAD = Workload(mode="online", rate=1000, arrivals="gamma", cv=3.0, warmup=0, duration=120, seed=1)


def serve(fleet: FleetConfig, migration: bool = True) -> object:
    return run(SimulationSetup(load_shipped_layout("ilp"), kv=KV_ONLINE, migration=migration, fleet=fleet), LOAD)


def test_a_spare_joins_under_load_serves_and_leaves_when_it_falls() -> None:
    fleet = FleetConfig(spares=(("A100", 1),), up=0.02, down=0.01, window=10, period=5)
    r = serve(fleet)
    sim = r.sim  # type: ignore[attr-defined]
    rep = r.report  # type: ignore[attr-defined]
    hs = sim.host.stats
    assert hs.finished == hs.submitted > 0 and hs.failed == 0
    f = rep["fleet"]
    kinds = [e["event"] for e in f["events"]]
    # (it leaves at the first look after it carries nothing: the run may end before that look)
    assert kinds in (["out", "in", "left"], ["out", "in"])
    out, leave = f["events"][0], f["events"][1]
    node = out["node"]
    assert node not in load_shipped_layout("ilp").layers  # a new node of the grown cluster
    assert out["t"] < out["ready"] < leave["t"]
    assert sim.workers[node].stats.batches > 0  # it served while in the fleet
    gone = f["events"][2]["t"] if len(kinds) == 3 else f["end"]
    if len(kinds) == 3:
        assert sim.workers[node].stopped
        assert sim.fleet.pool == ["A100"]  # it may join again
    # the bill, from the events: every plan node from the start, the spare from its decision to leave
    t0, end = sim.t0, f["end"]
    plan = load_shipped_layout("ilp")
    hours: dict[str, float] = {}
    for i in plan.used_nodes():
        t = plan.cluster.nodes[i].machine_type
        hours[t] = hours.get(t, 0.0) + (end - t0) / 3600
    hours["A100"] += (gone - out["t"]) / 3600
    assert f["gpu_hours"] == pytest.approx(sum(hours.values()))
    assert f["dollars"] == pytest.approx(sum(h * DEFAULT_PRICES[t] for t, h in hours.items()))


def test_a_static_fleet_keeps_its_spares_and_the_report_repeats() -> None:
    fleet = FleetConfig(spares=(("A100", 1),), min_spares=1, max_spares=1)
    a, b = serve(fleet), serve(fleet)
    f = a.report["fleet"]  # type: ignore[attr-defined]
    assert [e["event"] for e in f["events"]] == ["out"] and f["events"][0]["t"] == a.sim.t0  # type: ignore[attr-defined]
    assert report_json(a.report) == report_json(b.report)  # type: ignore[attr-defined]


def test_without_migration_a_leaving_spare_lets_its_queries_finish() -> None:
    fleet = FleetConfig(spares=(("A100", 1),), up=0.02, down=0.01, window=10, period=5)
    r = serve(fleet, migration=False)
    hs = r.sim.host.stats  # type: ignore[attr-defined]
    assert hs.finished == hs.submitted and hs.failed == 0
    assert [e["event"] for e in r.report["fleet"]["events"]][:2] == ["out", "in"]  # type: ignore[attr-defined]


def test_fleet_cost_adds_intervals_times_prices() -> None:
    intervals = {0: [[0.0, float("inf")]], 1: [[0.0, 1800.0], [3600.0, float("inf")]]}
    cost = fleet_cost(intervals, {0: "T4", 1: "A100"}, {"T4": 0.5, "A100": 3.0}, end=7200.0)
    assert cost["by_type"]["T4"] == {"gpu_hours": 2.0, "dollars": 1.0}
    assert cost["by_type"]["A100"] == {"gpu_hours": 1.5, "dollars": 4.5}
    assert cost["gpu_hours"] == 3.5 and cost["dollars"] == 5.5
    with pytest.raises(ConfigError, match="--prices.*A100"):
        fleet_cost(intervals, {0: "T4", 1: "A100"}, {"T4": 0.5}, end=10.0)


def test_bad_fleet_settings_name_the_flag() -> None:
    assert parse_spares("A100:2, L4:1") == (("A100", 2), ("L4", 1))
    with pytest.raises(ConfigError, match="--autoscale"):
        FleetConfig(spares=(("A100", 1),), min_spares=2)
    with pytest.raises(ConfigError, match="--spares"):
        FleetConfig(spares=())
    with pytest.raises(ConfigError, match="out_window"):
        FleetConfig(spares=(("A100", 1),), out_window=0.0)
    with pytest.raises(ConfigError, match="--spares.*FOO"):
        serve(FleetConfig(spares=(("FOO", 1),)))
    with pytest.raises(ConfigError, match="--prices.*A100"):
        serve(FleetConfig(spares=(("A100", 1),), prices={"T4": 1.0, "L4": 1.0}))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--spares", "A100:x"], "--spares: expected TYPE:N"),
        (["--autoscale", "0:1"], "--autoscale: needs --spares"),
        (["--spares", "A100:1", "--autoscale", "0:2"], "--autoscale: MIN:MAX"),
        (["--spares", "A100:1", "--prices", "A100=x"], "--prices: expected TYPE=USD"),
        (["--spares", "A100:1", "--compat", "helix"], "--spares"),
        (["--shrink", "--compat", "helix"], "--shrink"),
        (["--shrink", "--autoscale", "0:1"], "--autoscale: needs --spares"),
        (["--shrink", "--faults", "crash:1@30"], "--faults: not with an elastic fleet"),
    ],
)
def test_sim_run_refuses_bad_fleet_flags_in_one_line(args: list[str], needle: str) -> None:
    p = subprocess.run([sys.executable, "-m", "sim", "run", "--plan", "ilp", "--mode", "online", "--duration", "30",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def _covered(placement: object) -> bool:
    p = placement
    held = set()
    for r in p.layers.values():  # type: ignore[attr-defined]
        if r is not None:
            held.update(range(r[0], r[1]))
    return held == set(range(p.model_spec.num_layers))  # type: ignore[attr-defined]


def test_shrink_lets_plan_nodes_leave_keeping_every_layer_and_bills_them_until_they_go() -> None:
    # the Petals plan holds some layers twice: while the load is light, nodes of it may leave
    plan = load_shipped_layout("petals")
    fleet = FleetConfig(spares=(), shrink=True, up=0.96, down=0.95, window=10, period=5)
    r = run(SimulationSetup(plan, kv=KV_ONLINE, migration=True, fleet=fleet),
            Workload(mode="online", rate=300, arrivals="gamma", cv=3.0, warmup=0, duration=120, seed=2))
    sim, f = r.sim, r.report["fleet"]
    hs = sim.host.stats
    assert hs.finished == hs.submitted > 0 and hs.failed == 0
    left = [e for e in f["events"] if e["event"] == "left"]
    assert left, f["events"]
    for e in left:
        assert e["node"] in plan.layers and sim.workers[e["node"]].stopped
        assert sim.placement.layers[e["node"]] is None
    assert _covered(sim.placement)
    out = {e["node"] for e in left if sim.placement.layers[e["node"]] is None}
    assert sorted(n for n, _ in sim.fleet.resting) == sorted(out)
    assert all(layers == plan.layers[n] for n, layers in sim.fleet.resting)
    # the bill: every plan node while it served (from the start, or the decision to bring it back,
    # to its leaving or the end), from the events
    end = f["end"]
    since = {i: sim.t0 for i in plan.used_nodes()}
    hours: dict[str, float] = {}

    def bill(i: int, until: float) -> None:
        t = plan.cluster.nodes[i].machine_type
        hours[t] = hours.get(t, 0.0) + (until - since.pop(i)) / 3600

    for e in f["events"]:
        if e["event"] == "left":
            bill(e["node"], e["t"])
        elif e["event"] == "out":
            since[e["node"]] = e["t"]
    for i in list(since):
        bill(i, end)
    assert f["gpu_hours"] == pytest.approx(sum(hours.values()))
    assert f["dollars"] == pytest.approx(sum(h * DEFAULT_PRICES[t] for t, h in hours.items()))


def test_a_plan_node_that_left_comes_back_with_its_layers_when_the_load_rises() -> None:
    plan = load_shipped_layout("petals")
    fleet = FleetConfig(spares=(), shrink=True, up=0.3, down=0.25, window=10, period=5)
    r = run(SimulationSetup(plan, kv=KV_ONLINE, migration=True, fleet=fleet),
            Workload(mode="online", rate=2500, arrivals="gamma", cv=3.0, warmup=0, duration=240, seed=3,
                     rate_profile="step:0=0.01,100=1"))
    sim, f = r.sim, r.report["fleet"]
    hs = sim.host.stats
    assert hs.finished == hs.submitted > 0 and hs.failed == 0
    ev = f["events"]
    back = [e for e in ev if e["event"] == "out" and e.get("plan_node")]
    assert back, ev
    for e in back:
        assert tuple(e["layers"]) == plan.layers[e["node"]]  # its own layers
        assert any(x["event"] == "left" and x["node"] == e["node"] and x["t"] < e["t"] for x in ev)
    assert sim.workers[back[0]["node"]].stats.batches > 0
