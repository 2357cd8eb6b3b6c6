"""Heuristic placements (docs/original.md §5): shapes of the shipped layouts, verification, determinism.

Oracles: the max flow of the original's Petals, Swarm and Homogeneous layouts of single24 /
LLaMA-2-70B, pinned below from ``helix_async/data/derived/layout_summary.csv`` (column
``max_flow_tok_per_s``; computed by running the unmodified original code, data/PROVENANCE.md);
the shipped Homogeneous layout (docs/original.md §5.3) and the hand-made separate-pipeline layouts
``layouts/single24_llama70b/separate_*`` (docs/original.md §5.4). Petals and Swarm shuffle with a
private RNG, so their exact shipped layouts are not expected; their max flow on single24 is set by
the slowest node a layer depends on alone, which the layout's shape fixes, so it is.
"""
from __future__ import annotations

import csv
from collections import Counter
from functools import cache
from importlib import resources

import pytest

from helix_async.cluster import SINK, SOURCE, ClusterSpec, load_cluster
from helix_async.errors import ConfigError
from helix_async.model import ThroughputModel
from helix_async.placement import Placement, PlanningError, verify
from helix_async.placement.flow import max_flow_value
from helix_async.placement.heuristics import (
    HEURISTICS,
    OVER_MAX_HEURISTICS,
    best_heuristic,
    default_num_stages,
    homogeneous,
    over_max_layers,
    petals,
    separate_pipeline_subclusters,
    separate_pipelines,
    separate_pipelines_plus,
    swarm,
)
from helix_async.placement.io import load_shipped_layout

M70 = "llama2-70b"
M30 = "llama1-30b"
CLUSTERS = ("single24", "3cluster24", "cluster42")

# derived/layout_summary.csv, max_flow_tok_per_s of the original's single24 / LLaMA-2-70B layouts
# (the same numbers are the typical throughput of the bottleneck node in derived/typical_throughput.csv:
# Petals an A100 with 12 layers, Swarm a T4 with 4, Homogeneous an L4 with 7)
ORIGINAL_PETALS = 952.1073984850639
ORIGINAL_SWARM = 757.8531857227841
ORIGINAL_HOMOGENEOUS = 531.7025845523623


@cache
def cl(name: str) -> ClusterSpec:
    return load_cluster(name)


@cache
def tmodel(name: str, model: str) -> ThroughputModel:
    return ThroughputModel.for_cluster(model, cl(name))


def type_ranges(p: Placement) -> Counter[tuple[str, int, int]]:
    return Counter((p.cluster.machine(i).name, r[0], r[1]) for i, r in p.layers.items() if r is not None)


def pipeline_counts(p: Placement) -> dict[str, list[int]]:
    """Machine-type label of each pipeline -> its nodes' layer counts in chain order (contiguity checked)."""
    out: dict[str, list[int]] = {}
    for chain in p.meta["pipelines"]:
        pos = 0
        for i in chain:
            r = p.layers[i]
            assert r is not None and r[0] == pos
            pos = r[1]
        assert pos == p.num_layers
        label = "+".join(sorted({p.cluster.machine(i).name for i in chain}))
        out[label] = [p.layer_count(i) for i in chain]
    return out


def chain_links(chains: list[list[int]]) -> set[tuple[object, object]]:
    out: set[tuple[object, object]] = set()
    for chain in chains:
        hops = [SOURCE, *chain, SINK]
        out |= set(zip(hops, hops[1:], strict=False))
    return out


# ------------------------------------------------------------------------------------------------
# Homogeneous
# ------------------------------------------------------------------------------------------------


def test_homogeneous_single24_reproduces_shipped_layout() -> None:
    p = homogeneous(cl("single24"), M70, seed=0, tm=tmodel("single24", M70))
    want = Counter(
        [("A100", 0, 12), ("A100", 12, 24), ("A100", 24, 36), ("A100", 36, 48)]
        + [("L4", 48, 55), ("L4", 55, 62), ("L4", 62, 69), ("L4", 69, 76), ("L4", 76, 80)]
    )
    assert type_ranges(p) == want
    assert sum(r is None for r in p.layers.values()) == 15
    assert len(p.meta["pipelines"]) == 1 and len(p.meta["pipelines"][0]) == 9
    assert set(p.links) == chain_links(p.meta["pipelines"])
    assert max_flow_value(p) == pytest.approx(ORIGINAL_HOMOGENEOUS, rel=1e-12)


def test_homogeneous_shuffle_is_per_seed() -> None:
    a = homogeneous(cl("single24"), M70, seed=3)
    assert a.same_plan(homogeneous(cl("single24"), M70, seed=3))
    assert type_ranges(a) == type_ranges(homogeneous(cl("single24"), M70, seed=0))
    assert any(not a.same_plan(homogeneous(cl("single24"), M70, seed=s)) for s in range(4, 8))


# ------------------------------------------------------------------------------------------------
# Separate pipelines (SP) and SP+
# ------------------------------------------------------------------------------------------------


def test_separate_single24_70b_splits() -> None:
    p = separate_pipelines(cl("single24"), M70, tm=tmodel("single24", M70))
    assert p.exceed_profiled_max and p.method == "separate"
    assert pipeline_counts(p) == {"A100": [20] * 4, "L4": [10] * 8, "T4": [6] * 4 + [7] * 8}
    assert set(p.links) == chain_links(p.meta["pipelines"])
    # the T4 chain follows node ids, the first four taking the smaller share
    t4 = next(c for c in p.meta["pipelines"] if p.cluster.machine(c[0]).name == "T4")
    assert t4 == sorted(t4)


def test_separate_single24_30b_splits() -> None:
    p = separate_pipelines(cl("single24"), M30)
    assert pipeline_counts(p) == {"A100": [15] * 4, "L4": [7] * 4 + [8] * 4, "T4": [5] * 12}


def test_separate_subclusters_each_verify() -> None:
    pairs = separate_pipeline_subclusters(cl("single24"), M70)
    assert sorted(sub.num_nodes for sub, _ in pairs) == [4, 8, 12]
    for sub, p in pairs:
        assert p.cluster is sub and p.exceed_profiled_max
        verify(p, ThroughputModel.for_cluster(M70, sub))
        assert [p.layers[i] for i in range(sub.num_nodes)][0] == (0, p.layer_count(0))
        assert len(p.used_nodes()) == sub.num_nodes


def test_separate_subclusters_are_the_shipped_hand_made_layouts() -> None:
    # layouts/single24_llama70b/separate_{a100,l4,t4}: the authors' hand-made pipelines (docs/original.md §5.4)
    for sub, p in separate_pipeline_subclusters(cl("single24"), M70):
        shipped = load_shipped_layout("separate_" + sub.machine(0).name.lower())
        assert dict(p.layers) == dict(shipped.layers)
        assert set(p.links) == set(shipped.links)


def test_separate_cluster42_and_plus() -> None:
    c = cl("cluster42")
    sp = separate_pipelines(c, M70)
    assert pipeline_counts(sp) == {
        "A100": [20] * 4,
        "L4": [10] * 8,
        "L4x2": [20] * 4,
        "T4x4": [20] * 4,
        "T4x2": [13] * 4 + [14] * 2,
    }
    # 10 T4 (7 layers each with the VRAM reserve) and 6 V100 cannot hold 80 layers alone
    assert over_max_layers(c.machine_types["T4"], M70) == 7
    plus = separate_pipelines_plus(c, M70)
    counts = pipeline_counts(plus)
    assert counts["T4+V100"] == [5] * 16
    assert {k: v for k, v in counts.items() if k != "T4+V100"} == pipeline_counts(sp)
    assert set(plus.links) == chain_links(plus.meta["pipelines"])
    explicit = separate_pipelines_plus(c, M70, groups=[["A100"], ["V100", "T4"]])
    assert sorted(pipeline_counts(explicit)) == ["A100", "T4+V100"]
    with pytest.raises(ConfigError, match="H100"):
        separate_pipelines_plus(c, M70, groups=[["H100"]])


def test_separate_plus_equals_sp_when_every_type_forms_a_pipeline() -> None:
    sp = separate_pipelines(cl("single24"), M70)
    assert separate_pipelines_plus(cl("single24"), M70).same_plan(sp)


# ------------------------------------------------------------------------------------------------
# Swarm
# ------------------------------------------------------------------------------------------------


def test_swarm_single24_stages() -> None:
    c, tm = cl("single24"), tmodel("single24", M70)
    p = swarm(c, M70, seed=0, tm=tm)
    assert p.meta["num_stages"] == 20 and p.meta["stage_layers"] == 4
    assert all(p.layer_count(i) == 4 for i in p.layers)
    assert sorted(p.used_nodes()) == list(range(24))
    for q, members in enumerate(p.meta["stages"]):
        assert all(p.layers[i] == (4 * q, 4 * q + 4) for i in members)
    # 24 nodes over 20 stages: the 4 spare nodes (T4, the slowest) double up the weakest stages
    assert sorted(len(s) for s in p.meta["stages"]) == [1] * 16 + [2] * 4
    assert all(c.machine(i).name == "T4" for s in p.meta["stages"] if len(s) == 2 for i in s)
    assert max_flow_value(p) == pytest.approx(min(p.meta["stage_capacity"]), rel=1e-9)
    assert max_flow_value(p) == pytest.approx(ORIGINAL_SWARM, rel=1e-12)


@pytest.mark.parametrize("name", CLUSTERS)
def test_swarm_stages_balanced(name: str) -> None:
    c, tm = cl(name), tmodel(name, M70)
    p = swarm(c, M70, tm=tm)
    caps = [[tm.node_capacity(c.machine(i), 4) for i in s] for s in p.meta["stages"]]
    sums = [sum(x) for x in caps]
    assert sums == pytest.approx(p.meta["stage_capacity"])
    # greedy balance: a stage's last (smallest) node joined it while it was the weakest stage
    assert all(sum(x) - min(x) <= min(sums) + 1e-9 for x in caps)
    assert sorted(p.used_nodes()) == list(range(c.num_nodes))


def test_swarm_default_stages() -> None:
    for name in CLUSTERS:
        assert default_num_stages(cl(name), M70) == 20
        assert default_num_stages(cl(name), M30) == 10


def test_swarm_links_per_seed() -> None:
    c = cl("cluster42")  # stages of 1-4 nodes, so a quota of 2 samples
    a = swarm(c, M70, seed=1, max_out_links=2)
    assert a.same_plan(swarm(c, M70, seed=1, max_out_links=2))
    assert all(len(a.out_links(i)) <= 2 for i in a.layers)
    assert any(set(a.links) != set(swarm(c, M70, seed=s, max_out_links=2).links) for s in (2, 3, 4))
    # without a quota every stage-q node links to all of stage q+1: the seed does not matter
    assert swarm(c, M70, seed=1).same_plan(swarm(c, M70, seed=2))


def test_swarm_rejects_bad_stage_counts() -> None:
    c = cl("single24")
    with pytest.raises(PlanningError, match="divisor of 80"):
        swarm(c, M70, num_stages=3)
    with pytest.raises(PlanningError, match="stage size 8"):
        swarm(c, M70, num_stages=10)


# ------------------------------------------------------------------------------------------------
# Petals
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTERS)
def test_petals_max_layers_and_verifies(name: str) -> None:
    c, tm = cl(name), tmodel(name, M70)
    p = petals(c, M70, seed=0, tm=tm)
    verify(p, tm)
    assert p.partial
    assert all(p.layer_count(i) == tm.max_layers(c.machine(i)) for i in p.layers)
    assert p.same_plan(petals(c, M70, seed=0, tm=tm))


def test_petals_seeds_differ_and_values() -> None:
    c = cl("cluster42")
    assert not petals(c, M70, seed=0).same_plan(petals(c, M70, seed=1))
    # every seed's layout has an A100 holding 12 layers alone: the original's figure
    for seed in (0, 1, 2):
        assert max_flow_value(petals(cl("single24"), M70, seed=seed)) == pytest.approx(ORIGINAL_PETALS, rel=1e-12)


def test_petals_full_links_only() -> None:
    p = petals(cl("single24"), M70, seed=0, partial=False)
    assert not p.partial and max_flow_value(p) > 0
    with pytest.raises(PlanningError, match="no source->sink chain"):
        petals(cl("3cluster24"), M70, seed=0, partial=False)


def test_petals_quota_keeps_fastest_links() -> None:
    c = cl("3cluster24")  # in-region and cross-region links have different bandwidths
    free = petals(c, M70, seed=0)
    one = petals(c, M70, seed=0, max_out_links=1)
    assert set(one.links) <= set(free.links)
    for u in c.nodes:
        kept = [v for v in one.out_links(u.id) if v != SINK]
        assert len(kept) <= 1
        if not kept:
            continue
        e_u = one.layers[u.id][1]  # type: ignore[index]
        cands = [v for v in free.out_links(u.id) if v != SINK]
        full = [v for v in cands if one.layers[v][0] == e_u]  # type: ignore[index]
        pool = full or cands
        assert kept[0] in pool
        bw = c.arc(u.id, kept[0]).bandwidth  # type: ignore[union-attr]
        assert bw == max(c.arc(u.id, v).bandwidth for v in pool)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------
# All heuristics, best-of, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [M70, M30])
@pytest.mark.parametrize("name", CLUSTERS)
def test_every_heuristic_verifies_and_fits(name: str, model: str) -> None:
    c, tm = cl(name), tmodel(name, model)
    for hname, fn in HEURISTICS.items():
        p = fn(c, model, tm=tm)
        verify(p, tm)
        assert p.method == hname and p.exceed_profiled_max == (hname in OVER_MAX_HEURISTICS)
        for i, r in p.layers.items():
            if r is None:
                continue
            m = c.machine(i)
            limit = over_max_layers(m, model) if p.exceed_profiled_max else tm.max_layers(m)
            assert 1 <= r[1] - r[0] <= limit


def test_best_heuristic_picks_max() -> None:
    c, tm = cl("single24"), tmodel("single24", M70)
    def flow(q: Placement) -> float:
        return max_flow_value(q, tm)

    # the original's figures: Petals 952.11 > Swarm 757.85 > Homogeneous 531.70
    name, p, value = best_heuristic(c, M70, seed=0, evaluate=flow, tm=tm)
    assert name == "petals" and value == pytest.approx(ORIGINAL_PETALS, rel=1e-12)
    assert p.method == "petals" and max_flow_value(p, tm) == value
    # the best is kept wherever it comes in the order
    for names in (("homogeneous", "swarm"), ("swarm", "homogeneous")):
        name, p, value = best_heuristic(c, M70, seed=0, evaluate=flow, names=names, tm=tm)
        assert name == "swarm" and value == pytest.approx(ORIGINAL_SWARM, rel=1e-12)
        assert p.method == "swarm"
    # any evaluator: the fewest unused nodes wins -> a plan that uses every node
    name2, p2, v2 = best_heuristic(c, M70, evaluate=lambda q: -sum(r is None for r in q.layers.values()))
    assert v2 == 0 and name2 == "petals"
    name3, _, _ = best_heuristic(c, M70, evaluate=lambda q: float(q.exceed_profiled_max), include_over_max=True, tm=tm)
    assert name3 == "separate"


def test_best_heuristic_skips_inapplicable() -> None:
    c = cl("single_t4")  # 12 T4: 48 layers at the profiled maximum, 84 forced
    name, p, _ = best_heuristic(c, M70, evaluate=max_flow_value, include_over_max=True)
    assert name == "separate" and pipeline_counts(p) == {"T4": [6] * 4 + [7] * 8}
    with pytest.raises(PlanningError, match="needs 80 layers but the 12 nodes of single_t4 hold at most 48"):
        best_heuristic(c, M70, evaluate=max_flow_value)


@pytest.mark.parametrize("hname", sorted(HEURISTICS))
def test_too_small_cluster_names_layers(hname: str) -> None:
    c = cl("single24").subcluster([1, 2], name="tiny")  # two T4: 8 layers (14 forced)
    with pytest.raises(PlanningError, match=r"needs 80 layers but the 2 nodes of tiny hold at most (8|14)\b"):
        HEURISTICS[hname](c, M70)


def test_flow_values_match_the_original_single24() -> None:
    c, tm = cl("single24"), tmodel("single24", M70)
    assert max_flow_value(swarm(c, M70, tm=tm), tm) == pytest.approx(ORIGINAL_SWARM, rel=1e-12)
    assert max_flow_value(petals(c, M70, tm=tm), tm) == pytest.approx(ORIGINAL_PETALS, rel=1e-12)
    assert max_flow_value(homogeneous(c, M70, tm=tm), tm) == pytest.approx(ORIGINAL_HOMOGENEOUS, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "want"),
    [("petals", ORIGINAL_PETALS), ("swarm", ORIGINAL_SWARM), ("homogeneous", ORIGINAL_HOMOGENEOUS)],
)
def test_shipped_heuristic_layouts_have_the_originals_max_flow(name: str, want: float) -> None:
    p = load_shipped_layout(name)
    assert p.method == name
    assert max_flow_value(p) == pytest.approx(want, rel=1e-12)


def test_pinned_figures_are_the_ones_in_derived() -> None:
    path = resources.files("helix_async") / "data" / "derived" / "layout_summary.csv"
    with path.open() as fh:
        rows = {r["layout"]: float(r["max_flow_tok_per_s"]) for r in csv.DictReader(fh)}
    assert rows["single24_llama70b/petals"] == ORIGINAL_PETALS
    assert rows["single24_llama70b/swarm"] == ORIGINAL_SWARM
    assert rows["single24_llama70b/homogeneous"] == ORIGINAL_HOMOGENEOUS
