"""``replan``: a plan without some nodes, from the plan in force, moving at most K others
(helix_async/placement/replan.py; docs/planner.md, "Re-planning from a plan")."""

from __future__ import annotations

from pathlib import Path

import pytest

from helix_async.cli import main
from helix_async.cluster import load_cluster
from helix_async.errors import ConfigError
from helix_async.placement import Placement
from helix_async.placement.core import verify
from helix_async.placement.flow import max_flow
from helix_async.placement.io import load_shipped_layout, read_placement, write_placement
from helix_async.placement.replan import replan

pytest.importorskip("pyscipopt")


def tiny3() -> Placement:
    return Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 3), 1: (3, 6), 2: (6, 8)})


def covered(p: Placement) -> set[int]:
    return {ell for r in p.layers.values() if r is not None for ell in range(*r)}


def test_losing_a_middle_stage_is_repaired_by_moving_one_neighbour() -> None:
    p = tiny3()
    res = replan(p, [1], max_moves=1, tries=2, node_limit=200)
    new = res.placement
    verify(new)
    assert new.layers[1] is None and covered(new) == set(range(8))
    assert res.without == 0.0 and res.after > 0 and res.after == pytest.approx(max_flow(new).value)
    assert len(res.moved) == 1  # one node took the lost layers, the other kept its own
    (i, (old, now)), = res.moved.items()
    assert old == p.layers[i] and now != old
    assert all(new.layers[j] == p.layers[j] for j in (0, 2) if j != i)


def test_moves_stay_within_the_bound_on_single24() -> None:
    """LLaMA-2-70B on single24 (the shipped ILP layout): losing node 0 leaves layers 7-10 unheld;
    at most 3 other nodes move, the rest keep their ranges, and the new plan serves again."""
    p = load_shipped_layout("ilp")
    res = replan(p, [0], max_moves=3, tries=2, node_limit=300, seed=1)
    assert res.without == 0.0 and res.after > 0
    assert 1 <= len(res.moved) <= 3
    keep = [i for i in p.layers if i != 0 and i not in res.moved]
    assert all(res.placement.layers[i] == p.layers[i] for i in keep)
    assert covered(res.placement) == set(range(80))
    # the same seed gives the same plan
    again = replan(p, [0], max_moves=3, tries=2, node_limit=300, seed=1)
    assert dict(again.placement.layers) == dict(res.placement.layers)


@pytest.mark.parametrize(("lose", "kw", "flag", "words"), [
    ([7], {}, "--lose", "node 7 is not in the plan's cluster"),
    ([1], {"max_moves": 0}, "--max-moves", "must be at least 1"),
])
def test_bad_requests_name_the_flag(lose: list[int], kw: dict[str, int], flag: str, words: str) -> None:
    with pytest.raises(ConfigError, match=flag) as err:
        replan(tiny3(), lose, **kw)
    assert words in str(err.value)


def test_a_node_without_layers_is_refused() -> None:
    p = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 4), 1: (4, 8), 2: None})
    with pytest.raises(ConfigError, match="--lose.*node 2 holds no layers"):
        replan(p, [2])


def test_losing_every_node_is_refused() -> None:
    with pytest.raises(ConfigError, match="--lose: no node that can hold layers would be left"):
        replan(tiny3(), [0, 1, 2], max_moves=1, tries=1, node_limit=50)


def test_the_whole_fleet_replaced_by_new_nodes() -> None:
    """Every old node lost and as many new ones joining: no old node can move, so one try of the
    new nodes alone is the whole search."""
    res = replan(tiny3(), [0, 1, 2], add=["CPU", "CPU", "CPU"], max_moves=2, tries=4, node_limit=100)
    assert res.tries == 1 and res.moved == {} and res.after > 0
    assert all(res.placement.layers[i] is None for i in (0, 1, 2)) and covered(res.placement) == set(range(8))


def test_two_lost_of_three_leave_one_node_to_hold_everything() -> None:
    res = replan(tiny3(), [0, 2], max_moves=1, tries=1, node_limit=100)
    assert dict(res.placement.layers) == {0: None, 1: (0, 8), 2: None} and list(res.moved) == [1]


def test_a_joining_node_takes_layers_connected_as_its_region_is() -> None:
    """--add CPU on tiny3: the cluster gains node 3, linked as node 0 is (to its peers, the source
    and the sink, and to node 0 itself); the new node takes layers and the max flow grows, with no
    other node moving (the first try frees the new node alone)."""
    p = tiny3()
    res = replan(p, add=["CPU"], max_moves=2, tries=1, node_limit=200)
    new = res.placement
    c = new.cluster
    assert c.num_nodes == 4 and c.nodes[3].machine_type == "CPU" and c.nodes[3].region == "default"
    for peer in ("source", "sink", 1, 2):
        a, b = (peer, 3) if peer == "source" else (3, peer)
        link, tmpl = c.arc(a, b), c.arc(*((peer, 0) if peer == "source" else (0, peer)))
        assert link is not None and tmpl is not None and (link.bandwidth, link.latency) == (tmpl.bandwidth, tmpl.latency)
    assert c.arc(0, 3) is not None and c.arc(3, 0) is not None
    assert res.before == res.without and res.after > res.before
    assert res.added[3] is not None and res.moved == {}
    verify(new)


@pytest.mark.parametrize(("kw", "flag", "words"), [
    ({"add": ["Z80"]}, "--add", "unknown machine type 'Z80'"),
    ({"add": ["CPU"], "region": "mars"}, "--region", "unknown region 'mars'"),
    ({}, "--lose", "give a node that leaves (--lose) or a machine type that joins (--add)"),
])
def test_bad_additions_name_the_flag(kw: dict[str, object], flag: str, words: str) -> None:
    with pytest.raises(ConfigError, match=flag) as err:
        replan(tiny3(), **kw)  # type: ignore[arg-type]
    assert words in str(err.value)


def test_cli_writes_the_new_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_placement(tiny3(), tmp_path / "plan.toml", flow=max_flow(tiny3()))
    out = tmp_path / "new.toml"
    assert main(["replan", "--from", str(src), "--lose", "2", "--max-moves", "1", "--tries", "2", "--node-limit", "100",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "with the change and nobody moving" in text and "moved 1 node(s):" in text
    new = read_placement(out)
    assert new.layers[2] is None and covered(new) == set(range(8))
    assert main(["replan", "--from", str(src), "--add", "CPU", "--tries", "1", "--node-limit", "100",
                 "--out", str(out)]) == 0
    assert "new node 3 (CPU): [" in capsys.readouterr().out and read_placement(out).cluster.num_nodes == 4
    assert main(["replan", "--from", str(src), "--lose", "9", "--out", str(tmp_path / "x.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lose" in err and not (tmp_path / "x.toml").exists()
