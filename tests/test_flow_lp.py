"""networkx's max flow against an LP written from docs/original.md §6 without the flow module's graph.

The LP (tests/lp_maxflow.py) builds its constraints from the placement itself, so the comparison
checks :func:`~helix_async.placement.flow.build_flow_graph` too: a wrong capacity or NIC rule there
makes the two disagree (``test_lp_catches_a_wrong_link_capacity``), and on tiny placements both are
held to values worked out by hand.

Oracle figures: the max flow of each shipped single24 / LLaMA-2-70B layout from
``helix_async/data/derived/layout_summary.csv`` (column ``max_flow_tok_per_s``), computed by running
the unmodified original Helix code on the shipped layouts (data/PROVENANCE.md).
"""

from __future__ import annotations

import ast
import csv
import random
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest
from lp_maxflow import max_flow_lp

import helix_async
import helix_async.placement.flow as flow_module
from helix_async.cluster import (
    DEFAULT_MACHINE_TYPES,
    SINK,
    SOURCE,
    ClusterSpec,
    DirectedLink,
    Link,
    Node,
    load_cluster,
)
from helix_async.model import ModelSpec, ThroughputModel, get_model
from helix_async.placement import Placement
from helix_async.placement.flow import max_flow, max_flow_value
from helix_async.placement.heuristics import homogeneous, petals, separate_pipelines, swarm
from helix_async.placement.io import load_shipped_layout

M70 = "llama2-70b"

# derived/layout_summary.csv, max_flow_tok_per_s (the original code's figures)
ORIGINAL_MAX_FLOW = {
    "ilp": 1289.5557702751464,
    "petals": 952.1073984850639,
    "swarm": 757.8531857227841,
    "homogeneous": 531.7025845523623,
    "ilp_artifact": 1289.5557702751464,
}


def test_pinned_figures_are_the_ones_in_derived() -> None:
    # guards the literals above against a typo: they must be the shipped file's numbers
    path = resources.files("helix_async") / "data" / "derived" / "layout_summary.csv"
    with path.open() as fh:
        rows = {r["layout"]: float(r["max_flow_tok_per_s"]) for r in csv.DictReader(fh)}
    assert {f"single24_llama70b/{k}": v for k, v in ORIGINAL_MAX_FLOW.items()} == rows


@pytest.mark.parametrize("name", sorted(ORIGINAL_MAX_FLOW))
def test_lp_and_networkx_give_the_originals_max_flow_on_shipped_layouts(name: str) -> None:
    p = load_shipped_layout(name)
    want = ORIGINAL_MAX_FLOW[name]
    assert max_flow_lp(p) == pytest.approx(want, rel=1e-6)
    assert max_flow(p).value == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("name", ["separate_a100", "separate_l4", "separate_t4"])
def test_lp_matches_networkx_on_shipped_separate_pipelines(name: str) -> None:
    # no original figure ships for these (derived/ covers the single24 layouts only)
    p = load_shipped_layout(name)
    assert p.exceed_profiled_max
    assert max_flow_lp(p) == pytest.approx(max_flow_value(p), rel=1e-6)


@pytest.mark.parametrize("name", ["single24", "3cluster24", "cluster42"])
def test_lp_matches_networkx_on_heuristic_plans(name: str) -> None:
    cl = load_cluster(name)
    tm = ThroughputModel.for_cluster(M70, cl)
    plans = [
        petals(cl, M70, seed=0, tm=tm),
        petals(cl, M70, seed=0, tm=tm, max_out_links=2),
        swarm(cl, M70, seed=0, tm=tm),
        swarm(cl, M70, seed=1, tm=tm, max_out_links=1),
        homogeneous(cl, M70, seed=0, tm=tm),
        separate_pipelines(cl, M70, tm=tm),
    ]
    for p in plans:
        assert max_flow_lp(p, tm) == pytest.approx(max_flow_value(p, tm), rel=1e-6), p.method


def test_lp_matches_networkx_on_random_geo_placements() -> None:
    cl = load_cluster("3cluster24")
    model = get_model(M70)
    tm = ThroughputModel.for_cluster(model, cl)
    rng = random.Random(7)
    checked = 0
    for _ in range(12):
        # random chains: nodes in random order take consecutive ranges of random length
        order = [n.id for n in cl.nodes]
        rng.shuffle(order)
        layers = {}
        pos = 0
        for i in order:
            k = rng.randint(1, tm.max_layers(cl.machine(i)))
            start = pos if rng.random() < 0.8 else max(0, pos - rng.randint(1, 3))  # some overlaps
            layers[i] = (start, min(80, start + k))
            pos = 0 if start + k >= 80 else start + k
        p = Placement.from_layers(cl, model, layers, partial=True)
        if not p.links:
            continue
        checked += 1
        assert max_flow_lp(p, tm) == pytest.approx(max_flow_value(p, tm), rel=1e-6, abs=1e-6)
    assert checked > 0


# ------------------------------------------------------------------------------------------------
# Hand-computed tiny placements
# ------------------------------------------------------------------------------------------------

TAU = 2  # bytes of a token id (docs/original.md §3.1)
HOP = 2 + 16384  # a token id plus its activation, 2 bytes x hidden 8192 (LLaMA-2-70B)


class FixedThroughput:
    """A throughput table by GPU name (tokens/s), so that the hand computation needs no profile."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def throughput(self, gpu: str, k: int, *, exceed_profiled_max: bool = False) -> float:
        assert k == 40
        return self.table[gpu]


TINY_TP = FixedThroughput({"g0": 10_000.0, "g1": 300.0, "g2": 5_000.0})


def tiny(
    *, nic0_in: float = TAU * 1300, nic2_in: float = 1e10, coordinator_in: float = 1e10
) -> Placement:
    """Node 0 holds layers [0, 40) and feeds nodes 1 and 2, which both hold [40, 80).

    Capacities in tokens/s with the defaults: node 0 in-NIC 1300 (source its only inbound
    neighbour: / tau), compute 10000, out-NIC 1400 (two outbound nodes: / (tau + alpha)); link
    0->1 61027; link 0->2 1000; node 1 compute 300, out-NIC 250 (sink only: / tau); node 2 compute
    5000; everything else ~1e8 or more. Max flow = min(1300, 1400, min(300, 250) + min(1000, 5000))
    = 1250.
    """
    base = DEFAULT_MACHINE_TYPES["A100"]
    types = {
        "N0": replace(base, name="N0", gpu="g0", nic_in=nic0_in, nic_out=HOP * 1400),
        "N1": replace(base, name="N1", gpu="g1", nic_in=1e10, nic_out=TAU * 250),
        "N2": replace(base, name="N2", gpu="g2", nic_in=nic2_in, nic_out=1e10),
    }
    cl = ClusterSpec(
        name="tiny3",
        machine_types=types,
        nodes=(Node(0, "N0"), Node(1, "N1"), Node(2, "N2")),
        links=(
            Link(SOURCE, 0, 1e9, 0.0, False),
            Link(0, 1, 1e9, 0.0, False),
            Link(0, 2, HOP * 1000, 0.0, False),
            Link(1, SINK, 1e9, 0.0, False),
            Link(2, SINK, 1e9, 0.0, False),
        ),
        coordinator_nic_in=coordinator_in,
    )
    cl.validate()
    p = Placement.from_layers(cl, M70, {0: (0, 40), 1: (40, 80), 2: (40, 80)})
    assert set(p.links) == {(SOURCE, 0), (0, 1), (0, 2), (1, SINK), (2, SINK)}
    return p


@pytest.mark.parametrize(
    ("overrides", "want"),
    [
        ({}, 1250.0),  # node 1's out-NIC to the sink (/ tau) plus link 0->2 (/ (tau + alpha))
        ({"coordinator_in": TAU * 900}, 900.0),  # the coordinator's in-NIC (/ tau)
        ({"nic2_in": HOP * 600}, 850.0),  # node 2's in-NIC, fed by node 0 (/ (tau + alpha)): 250 + 600
        ({"nic0_in": TAU * 1100}, 1100.0),  # node 0's in-NIC, fed by the source only (/ tau)
    ],
)
def test_lp_and_networkx_give_the_hand_computed_value(overrides: dict[str, float], want: float) -> None:
    spec = get_model(M70)
    assert (spec.token_size, spec.token_size + spec.activation_size) == (TAU, HOP)
    p = tiny(**overrides)
    assert max_flow_lp(p, TINY_TP) == pytest.approx(want, rel=1e-7)
    assert max_flow_value(p, TINY_TP) == pytest.approx(want, rel=1e-12)


def test_lp_catches_a_wrong_link_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    # A deliberate bug in the flow module, for this test only: every link carries token ids alone
    # (the activation forgotten), so link 0->2 no longer binds and networkx reports 1300.
    def token_only(arc: DirectedLink, model: ModelSpec) -> float:
        return arc.bandwidth / model.token_size

    p = tiny()
    monkeypatch.setattr(flow_module, "arc_capacity", token_only)
    wrong = max_flow_value(p, TINY_TP)
    assert wrong == pytest.approx(1300.0, rel=1e-12)
    lp = max_flow_lp(p, TINY_TP)
    assert lp == pytest.approx(1250.0, rel=1e-7)
    assert lp != pytest.approx(wrong, rel=1e-6)  # the cross-check fails on the bug
    monkeypatch.undo()
    assert max_flow_value(p, TINY_TP) == pytest.approx(lp, rel=1e-6)


def test_lp_of_an_empty_placement_is_zero() -> None:
    cl = load_cluster("single24")
    p = Placement.from_layers(cl, M70, {0: (0, 4)})  # no chain reaches the sink: no links
    assert p.links == () and max_flow_lp(p) == 0.0 == max_flow_value(p)


def test_the_package_never_imports_cvxpy() -> None:
    root = Path(helix_async.__file__).parent
    importers = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Call):  # importlib.import_module("cvxpy"), extras.require("cvxpy", ...)
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if any(n == "cvxpy" or n.startswith("cvxpy.") for n in names):
                importers.append(str(path.relative_to(root)))
    assert importers == []

