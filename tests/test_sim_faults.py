"""Faults in the simulator: nodes killed and revived in virtual time, recovered by the host's own
re-plan and migration (``sim.faults``), on a 4-node diamond of T4x4 machines serving LLaMA-1 30B
(nodes 0 and 2 hold layers [0, 30), nodes 1 and 3 layers [30, 60))."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES
from helix_async.cluster.spec import ClusterSpec, Link, Node
from helix_async.errors import ConfigError
from helix_async.ids import SINK, SOURCE
from helix_async.placement import Placement
from sim.faults import Fault, parse_faults
from sim.report import report_json, summary_lines
from sim.runner import Workload, run
from sim.simulation import SimulationSetup, load_start_time
from sim.workloads import TraceEntry


def diamond() -> Placement:
    t4x4 = DEFAULT_MACHINE_TYPES["T4x4"]
    links = [Link(SOURCE, 0, 1e9, 0.001, False), Link(SOURCE, 2, 1e9, 0.001, False)]
    links += [Link(a, b, 1e9, 0.001, False) for a in (0, 2) for b in (1, 3)]
    links += [Link(1, SINK, 1e9, 0.001, False), Link(3, SINK, 1e9, 0.001, False)]
    spec = ClusterSpec("diamond4", {"T4x4": t4x4}, tuple(Node(i, "T4x4") for i in range(4)), tuple(links))
    return Placement.from_layers(spec, "llama1-30b", {0: (0, 30), 1: (30, 60), 2: (0, 30), 3: (30, 60)})


TRACE = [TraceEntry(0.5 * i, 200 + 10 * (i % 30), 20 + i % 7) for i in range(60)]  # 30 s of arrivals


def simulate(faults: list[Fault], seed: int = 0) -> Any:
    t0 = load_start_time(diamond())  # arrivals from the moment the models are loaded, as fault times
    wl = Workload(mode="trace", trace=[TraceEntry(t0 + t, n, m) for t, n, m in TRACE], warmup=0.0, duration=1e9)
    return run(SimulationSetup(diamond(), kv=(0.9, 0.6), seed=seed), wl, faults=faults)


def test_parse_faults() -> None:
    assert parse_faults("node=7@t=120s, node=3@t=300s+60s") == [Fault(7, 120.0), Fault(3, 300.0, 60.0)]
    assert parse_faults("node=1@t=2.5+1") == [Fault(1, 2.5, 1.0)]
    for bad, msg in [("node=x@t=1s", "bad fault"), ("node=9@t=1s", "node 9 holds no layers"), ("", "no fault"),
                     ("node=1@t=1s+0s", "down time must be > 0"), ("node=1@t=1s,node=1@t=5s", "overlap")]:
        with pytest.raises(ConfigError, match=msg):
            parse_faults(bad, [0, 1, 2, 3])


def test_a_killed_node_loses_no_query_and_a_revived_one_takes_work_again() -> None:
    res = simulate([Fault(1, 6.0, 3.0)])
    host = res.sim.host
    # every query finishes with all its tokens, though those routed over node 1 lost their KV
    assert host.stats.finished == len(TRACE) and host.stats.failed == 0 and host.active == 0
    tokens = {qid: m for qid, _, _, _, _, m in host.query_records}
    assert tokens == {i: e[2] for i, e in enumerate(TRACE)}
    f = res.report["faults"][0]
    assert f["node"] == 1 and f["migrated_queries"] > 0 and f["resumed_queries"] == f["migrated_queries"]
    assert f["detected_at_s"] == pytest.approx(f["killed_at_s"] + 1.5)
    assert f["first_resumed_s"] >= 1.5 and f["recovery_s"] >= f["first_resumed_s"]
    assert host.stats.migrated == f["migrated_queries"] and host.stats.replans == 2
    # the revived node serves again: work reached the fresh worker after the revival
    assert res.sim.workers[1].stats.batches > 0
    assert any("Fault: node 1 killed" in ln for ln in summary_lines(res.report))


def test_losing_every_copy_of_a_layer_stops_admission_until_one_returns() -> None:
    res = simulate([Fault(1, 6.0, 10.0), Fault(3, 6.0)])
    host = res.sim.host
    assert host.stats.finished == len(TRACE) and host.stats.failed == 0
    stops = [f["admission_stopped"] for f in res.report["faults"]]
    assert any("layers [30, 60) have no live node" in s for s in stops)
    assert res.sim.workers[3].stopped  # never revived
    # while no node held layers [30, 60) nothing was decoded
    done = [t for t in host.decode_done]
    killed = res.report["faults"][0]["killed_at_s"]
    assert not [t for t in done if killed + 2.0 < t < killed + 10.0]


def test_faults_are_deterministic() -> None:
    a = report_json(simulate([Fault(3, 4.0, 5.0)], seed=3).report)
    b = report_json(simulate([Fault(3, 4.0, 5.0)], seed=3).report)
    assert a == b and json.loads(a)["faults"][0]["migrated_queries"] > 0
