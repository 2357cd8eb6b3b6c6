"""networkx's max flow agrees with an independent LP formulation solved by HiGHS through cvxpy."""

from __future__ import annotations

import random

import pytest

from helix_async.cluster import load_cluster
from helix_async.model import ThroughputModel, get_model
from helix_async.placement import Placement
from helix_async.placement.flow import max_flow
from helix_async.placement.flow_lp import max_flow_lp
from helix_async.placement.io import load_shipped_layout


@pytest.mark.parametrize("name", ["ilp", "petals", "swarm", "homogeneous"])
def test_lp_backend_matches_networkx_on_shipped_layouts(name: str) -> None:
    p = load_shipped_layout(name)
    assert max_flow_lp(p) == pytest.approx(max_flow(p).value, rel=1e-7)


def test_lp_backend_matches_networkx_on_random_geo_placements() -> None:
    cl = load_cluster("3cluster24")
    model = get_model("llama2-70b")
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
        assert max_flow_lp(p, tm) == pytest.approx(max_flow(p, tm).value, rel=1e-6, abs=1e-6)
    assert checked > 0
