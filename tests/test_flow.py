"""Max-flow graph, FlowPlan, fast evaluator and plot against the original Helix code's outputs.

Oracles: helix_async/data/derived/layout_summary.csv and derived/flow_graphs/*.csv were produced by
running the unmodified Helix code on the shipped single24 LLaMA-2-70B layouts (docs/original.md §6, §11.1).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import random
import tomllib
from importlib import resources

import networkx as nx
import pytest
import tomli_w

from helix_async.cluster import SINK, SOURCE, ClusterSpec, load_cluster
from helix_async.flowplan import FlowPlan
from helix_async.ids import link_key, parse_link_key
from helix_async.model import ThroughputModel
from helix_async.placement import Placement, placement_arcs
from helix_async.placement.flow import (
    FlowEvaluator,
    build_flow_graph,
    max_flow,
    max_flow_value,
    original_vertex_name,
    to_original_names,
)
from helix_async.placement.io import load_shipped_layout
from helix_async.plots import plot_placement

DERIVED = resources.files("helix_async") / "data" / "derived"
MODEL = "llama2-70b"


def _csv(name: str) -> list[dict[str, str]]:
    with (DERIVED / name).open() as fh:
        return list(csv.DictReader(fh))


@functools.cache
def _layout(name: str) -> Placement:
    return load_shipped_layout(name)


@functools.cache
def _plan(name: str) -> FlowPlan:
    return max_flow(_layout(name))


SUMMARY = {r["layout"].split("/")[1]: r for r in _csv("layout_summary.csv")}


# --------------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ilp", "petals", "swarm", "homogeneous", "ilp_artifact"])
def test_shipped_layouts_max_flow_matches_original(name: str) -> None:
    row = SUMMARY[name]
    plan = _plan(name)
    assert plan.value == pytest.approx(float(row["max_flow_tok_per_s"]), rel=1e-9)
    assert plan.max_compute_throughput == pytest.approx(
        float(row["max_compute_throughput_tok_per_s"]), rel=1e-9
    )
    assert max_flow_value(_layout(name)) == pytest.approx(plan.value, rel=1e-12)
    assert len(_layout(name).links) == int(row["num_directed_links"])


def test_headline_numbers() -> None:
    # docs/original.md §11.1
    assert _plan("ilp").value == pytest.approx(1289.5557702751, rel=1e-9)
    for name, value in (("petals", 952.107), ("swarm", 757.853), ("homogeneous", 531.703)):
        assert _plan(name).value == pytest.approx(value, abs=1e-3)
    assert _plan("ilp").max_compute_throughput == pytest.approx(2803.86, abs=5e-3)


@pytest.mark.parametrize("name", ["ilp", "petals", "swarm"])
def test_flow_graph_equals_original_edge_list(name: str) -> None:
    rows = _csv(f"flow_graphs/single24_llama70b__{name}.csv")
    ref = {(r["u"], r["v"]): float(r["capacity_tok_per_s"]) for r in rows}
    g = to_original_names(build_flow_graph(_layout(name)))
    mine = {(u, v): float(d["capacity"]) for u, v, d in g.edges(data=True)}
    assert set(mine) == set(ref)
    assert set(g.nodes) == {x for edge in ref for x in edge}
    for edge, cap in ref.items():
        assert mine[edge] == pytest.approx(cap, rel=1e-9), edge
    total = next(float(r["flow_tok_per_s"]) for r in rows if (r["u"], r["v"]) == ("1_in", "sink"))
    assert _plan(name).value == pytest.approx(total, rel=1e-9)


def test_vertex_names() -> None:
    assert original_vertex_name("source") == "source"
    assert original_vertex_name("sink") == "sink"
    assert original_vertex_name("source_out") == "0_out"
    assert original_vertex_name("sink_in") == "1_in"
    assert original_vertex_name("0_in") == "2_in"
    assert original_vertex_name("21_start") == "23_start"
    assert link_key(SOURCE, 3) == "source->3" and parse_link_key("source->3") == (SOURCE, 3)
    assert parse_link_key(link_key(7, SINK)) == (7, SINK)
    with pytest.raises(ValueError):
        parse_link_key("3-4")


# --------------------------------------------------------------------------------------------------
# FlowPlan
# --------------------------------------------------------------------------------------------------


def _check_valid_flow(p: Placement, plan: FlowPlan) -> None:
    g = build_flow_graph(p)
    tol = 1e-9 * max(plan.value, 1.0)
    assert set(plan.link_flows) == set(p.links)
    for (u, v), f in plan.link_flows.items():
        assert -tol <= f <= plan.link_capacity[(u, v)] + tol
        out_name = "source_out" if u == SOURCE else f"{u}_out"
        in_name = "sink_in" if v == SINK else f"{v}_in"
        assert plan.link_capacity[(u, v)] == g[out_name][in_name]["capacity"]
    for node, f in plan.node_flows.items():
        assert -tol <= f <= plan.node_capacity[node] + tol
        assert f <= g[f"{node}_in"][f"{node}_start"]["capacity"] + tol
        assert f <= g[f"{node}_end"][f"{node}_out"]["capacity"] + tol
        inflow = sum(fl for _, fl in plan.in_weights(node))
        outflow = sum(fl for _, fl in plan.weights(node))
        assert inflow == pytest.approx(f, abs=tol)
        assert outflow == pytest.approx(f, abs=tol)
    assert sum(f for _, f in plan.weights(SOURCE)) == pytest.approx(plan.value, rel=1e-9)
    assert sum(f for _, f in plan.in_weights(SINK)) == pytest.approx(plan.value, rel=1e-9)


@pytest.mark.parametrize("name", ["ilp", "petals", "swarm", "homogeneous"])
def test_flow_plan_is_a_valid_flow(name: str) -> None:
    p, plan = _layout(name), _plan(name)
    _check_valid_flow(p, plan)
    for u in [SOURCE, *p.used_nodes()]:
        w = plan.weights(u)
        assert all(f >= 0.0 for _, f in w)
        assert [v for v, _ in w] == sorted(p.out_links(u), key=lambda v: (v == SINK, v if v != SINK else 0))
    for node in plan.node_flows:
        assert 0.0 <= plan.utilisation(node) <= 1.0 + 1e-12
    assert plan.efficiency == pytest.approx(plan.value / plan.max_compute_throughput)


def test_unreached_node_is_in_the_graph_without_flow() -> None:
    # The shipped ILP layout gives node 20 (compute_node_22) layers but no link (docs/original.md §4.7).
    p, plan = _layout("ilp"), _plan("ilp")
    assert p.layers[20] == (76, 77) and 20 not in p.used_nodes()
    assert plan.node_flows[20] == 0.0 and plan.utilisation(20) == 0.0
    assert plan.weights(20) == []


def test_flow_plan_dict_round_trip() -> None:
    plan = _plan("petals")
    d = plan.to_dict()
    assert d["link_flows"]["source->14"] == plan.link_flows[(SOURCE, 14)]
    assert all(isinstance(k, str) for k in d["node_flows"])
    assert FlowPlan.from_dict(tomllib.loads(tomli_w.dumps(d))) == plan
    assert FlowPlan.from_dict(json.loads(json.dumps(d))) == plan


def test_fallback_when_preflow_push_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_flow, real_value = nx.maximum_flow, nx.maximum_flow_value

    def failing(real):  # type: ignore[no-untyped-def]
        def fn(g, s, t, flow_func=None, **kw):  # type: ignore[no-untyped-def]
            if flow_func is None:
                raise IndexError("list index out of range")
            return real(g, s, t, flow_func=flow_func, **kw)

        return fn

    monkeypatch.setattr(nx, "maximum_flow", failing(real_flow))
    monkeypatch.setattr(nx, "maximum_flow_value", failing(real_value))
    p = _layout("swarm")
    with caplog.at_level(logging.WARNING, logger="helix_async.placement.flow"):
        plan = max_flow(p)
        value = max_flow_value(p)
    assert plan.value == pytest.approx(float(SUMMARY["swarm"]["max_flow_tok_per_s"]), rel=1e-9)
    assert value == pytest.approx(plan.value, rel=1e-12)
    assert "edmonds_karp" in caplog.text
    _check_valid_flow(p, plan)


# --------------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ilp", "petals", "swarm", "homogeneous", "separate_l4", "separate_t4"])
def test_evaluator_matches_max_flow_on_shipped_layouts(name: str) -> None:
    p = _layout(name)
    ev = FlowEvaluator(p.cluster, MODEL, exceed_profiled_max=p.exceed_profiled_max)
    ref = Placement.from_layers(p.cluster, MODEL, p.layers, partial=p.partial, exceed_profiled_max=p.exceed_profiled_max)
    assert set(ev.links(p.layers, p.partial)) == set(ref.links)
    value = ev.value(p.layers, p.partial)
    assert value == pytest.approx(max_flow(ref).value, rel=1e-9)
    # every shipped plan's own links are a subset of all usable links
    assert value >= max_flow(p).value * (1 - 1e-9)


def _random_layers(rng: random.Random, cluster: ClusterSpec, tm: ThroughputModel, partial: bool) -> dict:
    """Random pipelines that often, not always, cover all layers (some branch, some stop short)."""
    L = tm.model.num_layers
    bounds, layers, pos = [0], {}, 0
    for i in rng.sample(range(cluster.num_nodes), cluster.num_nodes):
        if rng.random() < 0.1:
            layers[i] = None
            continue
        kmax = tm.max_layers(cluster.machine(i))
        s = max(0, pos - rng.randint(0, 3)) if partial and rng.random() < 0.3 else pos
        e = min(s + rng.randint(max(1, kmax // 2), kmax), L)
        layers[i] = (s, e)
        bounds.append(e)
        pos = e
        if pos == L or rng.random() < 0.05:
            pos = rng.choice([b for b in bounds if b < L])
    return layers


@pytest.mark.parametrize("cluster_name", ["single24", "3cluster24"])
def test_evaluator_matches_max_flow_on_random_placements(cluster_name: str) -> None:
    cluster = load_cluster(cluster_name)
    tm = ThroughputModel.for_cluster(MODEL, cluster)
    ev = FlowEvaluator(cluster, MODEL, tm)
    rng = random.Random(20240617)
    positive = 0
    for n in range(60):
        partial = n % 2 == 1
        layers = _random_layers(rng, cluster, tm, partial)
        p = Placement.from_layers(cluster, MODEL, layers, partial=partial)
        assert set(ev.links(layers, partial)) == set(placement_arcs(cluster, p.layers, 80, partial))
        ref = max_flow_value(p, tm)
        got = ev.value(layers, partial)
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)
        value, flows = ev.node_flows(layers, partial)
        assert value == got
        tol = 1e-9 * max(value, 1.0)
        for u, f in flows.items():
            s, e = p.layers[u]
            assert -tol <= f <= ev.throughput(u, e - s) + tol
        assert sum(f for u, f in flows.items() if p.layers[u][1] == 80) == pytest.approx(value, abs=tol)
        positive += ref > 0
        if ref > 0 and n % 10 == 1:
            _check_valid_flow(p, max_flow(p, tm))
    assert positive >= 20


def test_evaluator_memo_and_sequences() -> None:
    p = _layout("swarm")
    ev = FlowEvaluator(p.cluster, MODEL, cache_size=2)
    v = ev.value(p.layers)
    as_list = [p.layers[i] for i in range(p.cluster.num_nodes)]
    assert ev.value(as_list) == v and ev.hits == 1 and ev.evaluations == 1
    ev.value({**p.layers, 0: None})
    ev.value({**p.layers, 1: None})
    assert len(ev._memo) == 2
    assert ev.value(p.layers) == v and ev.evaluations == 4
    with pytest.raises(ValueError, match="bad layer range"):
        ev.value({0: (5, 5)})
    plan_p, plan = ev.plan(p.layers)
    assert plan.value == pytest.approx(v, rel=1e-9) and plan_p.same_plan(
        Placement.from_layers(p.cluster, MODEL, p.layers)
    )


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def test_plot_placement_writes_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = plot_placement(_layout("petals"), _plan("petals"), tmp_path / "petals.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
