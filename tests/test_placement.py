"""Placement verification, plan files (TOML/JSON) and import of the original Helix solution files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from helix_async.cluster import SINK, SOURCE, ClusterSpec, load_cluster
from helix_async.errors import ConfigError
from helix_async.placement import (
    Placement,
    PlacementError,
    clean_arcs,
    import_helix_solution,
    load_shipped_layout,
    read_flow,
    read_placement,
    verify,
    write_placement,
)
from helix_async.placement.flow import max_flow
from helix_async.placement.io import SHIPPED_LAYOUTS, placement_to_dict

MODEL = "llama2-70b"
# single24 node types: A100 = 6, 9, 10, 17 (max 12 layers of LLaMA-2-70B), L4 = 0, 3, 5, 11, 14, 18,
# 21, 23 (max 7), T4 = the rest (max 4).
BASE = {
    6: (0, 12),
    9: (12, 24),
    10: (24, 36),
    17: (36, 48),
    0: (48, 55),
    3: (55, 62),
    5: (62, 69),
    11: (69, 76),
    1: (76, 80),
}
CHAIN = [6, 9, 10, 17, 0, 3, 5, 11, 1]


@pytest.fixture(scope="module")
def single24() -> ClusterSpec:
    return load_cluster("single24")


@pytest.fixture(scope="module")
def base(single24: ClusterSpec) -> Placement:
    return Placement.from_layers(single24, MODEL, BASE, method="test", meta={"note": "one pipeline"})


def _with(p: Placement, **changes: Any) -> Placement:
    return dataclasses.replace(p, **changes)


def _layers(single24: ClusterSpec, **over: Any) -> dict[int, Any]:
    d: dict[int, Any] = {i: None for i in range(single24.num_nodes)}
    d.update(BASE)
    d.update({int(k[1:]): v for k, v in over.items()})
    return d


# --------------------------------------------------------------------------------------------------
# verify / clean_arcs
# --------------------------------------------------------------------------------------------------


def test_base_placement_is_one_chain(base: Placement) -> None:
    verify(base)
    expected = [(SOURCE, 6), *itertools.pairwise(CHAIN), (1, SINK)]
    assert set(base.links) == set(expected)
    assert base.used_nodes() == sorted(CHAIN)
    assert max_flow(base).value > 0


@pytest.mark.parametrize("name", sorted(SHIPPED_LAYOUTS))
def test_shipped_layouts_verify(name: str) -> None:
    p = load_shipped_layout(name)
    verify(p)
    assert p.model == MODEL
    assert p.partial == (name == "petals")
    assert p.exceed_profiled_max == name.startswith("separate_")
    assert "dropped_links" not in p.meta


def test_shipped_layout_details() -> None:
    ilp = load_shipped_layout("ilp")
    assert ilp.layers[15] == (0, 3) and ilp.layers[20] == (76, 77)
    assert 20 not in ilp.used_nodes() and len(ilp.used_nodes()) == 23
    homog = load_shipped_layout("homogeneous")
    assert sum(r is not None for r in homog.layers.values()) == 9
    assert homog.layers[1] is None and homog.layers[10] == (0, 12)
    a100 = load_shipped_layout("separate_a100")
    assert a100.cluster.name == "single_a100" and a100.layers[0] == (0, 20)
    with pytest.raises(ConfigError, match="unknown shipped layout"):
        load_shipped_layout("nope")


def test_rejects_overlapping_and_gapped_ranges(single24: ClusterSpec, base: Placement) -> None:
    overlap = _with(base, layers=_layers(single24, n9=(10, 22)))
    with pytest.raises(PlacementError, match="link 6->9: not valid"):
        verify(overlap)
    # allowed as a partial link, but 9 now ends at 22 while 10 starts at 24: a gap
    with pytest.raises(PlacementError, match="link 9->10: not valid"):
        verify(_with(overlap, partial=True))
    gap = _with(base, layers=_layers(single24, n9=(13, 24)))
    with pytest.raises(PlacementError, match="link 6->9: not valid"):
        verify(gap)


def test_rejects_range_over_max_layers(single24: ClusterSpec, base: Placement) -> None:
    # node 1 is a T4: at most 4 layers of LLaMA-2-70B
    bad = _with(base, layers=_layers(single24, n11=(69, 72), n1=(72, 80)))
    with pytest.raises(PlacementError, match=r"node 1 \(T4\): holds 8 layers, at most 4"):
        verify(bad)
    with pytest.raises(PlacementError, match="not within"):
        verify(_with(base, layers=_layers(single24, n1=(76, 81))))
    # with exceed_profiled_max, more than the profiled maximum is fine while VRAM and a KV cache remain
    forced = _with(base, layers=_layers(single24, n11=(69, 74), n1=(74, 80)), exceed_profiled_max=True)
    verify(forced)
    # 8 T4 layers fit the 16 GB of VRAM but leave no room for a KV cache
    with pytest.raises(PlacementError, match="no KV cache left with 8 layers"):
        verify(_with(base, layers=_layers(single24, n11=(69, 72), n1=(72, 80)), exceed_profiled_max=True))


def test_rejects_link_not_in_cluster(single24: ClusterSpec, base: Placement) -> None:
    links = tuple(lk for lk in single24.links if {lk.a, lk.b} != {9, 10})
    cut = dataclasses.replace(single24, links=links)
    assert cut.arc(9, 10) is None
    with pytest.raises(PlacementError, match="link 9->10: not a link of cluster"):
        verify(_with(base, cluster=cut))
    # from_layers on that cluster finds no path at all
    with pytest.raises(PlacementError, match="no source->sink path"):
        verify(Placement.from_layers(cut, MODEL, BASE))


def test_rejects_dangling_link(single24: ClusterSpec, base: Placement) -> None:
    # T4 node 2 holds [48, 52) after node 17 but nothing continues from layer 52
    layers = _layers(single24, n2=(48, 52))
    dangling = _with(base, layers=layers, links=(*base.links, (17, 2)))
    with pytest.raises(PlacementError, match="link 17->2: dangling"):
        verify(dangling)
    assert (17, 2) not in Placement.from_layers(single24, MODEL, layers).links


def test_rejects_path_that_skips_layers(single24: ClusterSpec, base: Placement) -> None:
    with pytest.raises(PlacementError, match="link 6->10: not valid"):
        verify(_with(base, links=(*base.links, (6, 10))))
    with pytest.raises(PlacementError, match=r"link source->9: not valid"):
        verify(_with(base, links=(*base.links, (SOURCE, 9))))
    with pytest.raises(PlacementError, match=r"link 0->sink: not valid"):
        verify(_with(base, links=(*base.links, (0, SINK))))


def test_partial_links(single24: ClusterSpec, base: Placement) -> None:
    # T4 node 2 holds [10, 14): entered from 6 after layer 12, continues into 9 after layer 14
    layers = _layers(single24, n2=(10, 14))
    p = Placement.from_layers(single24, MODEL, layers, partial=True)
    assert {(6, 2), (2, 9)} <= set(p.links)
    verify(p)
    assert max_flow(p).value >= max_flow(base).value
    with pytest.raises(PlacementError, match="link 6->2: not valid"):
        verify(_with(p, partial=False))
    assert (6, 2) not in Placement.from_layers(single24, MODEL, layers).links


def test_rejects_layer_table_not_naming_every_node(base: Placement) -> None:
    with pytest.raises(PlacementError, match="every cluster node"):
        verify(_with(base, layers=dict(BASE)))


def test_clean_arcs_fixpoint() -> None:
    # a chain whose end is cut drops all the way back
    assert clean_arcs([(SOURCE, 0), (0, 1), (1, 2), (2, 3)]) == ()
    kept = clean_arcs([(SOURCE, 0), (0, SINK), (0, 1), (1, 2), (2, 3), (4, 0)])
    assert kept == ((SOURCE, 0), (0, SINK))
    assert clean_arcs([(SOURCE, 0), (0, 1), (0, 1), (1, SINK)]) == ((SOURCE, 0), (0, 1), (1, SINK))


# --------------------------------------------------------------------------------------------------
# Plan files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("name", ["ilp", "petals", "homogeneous", "separate_t4"])
def test_plan_file_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    p = load_shipped_layout(name).with_meta(
        max_flow=1.5, upper_bound=2028.5, gap=None, tags=["a", "b"], nested={"x": 1}
    )
    flow = max_flow(p)
    path = write_placement(p, tmp_path / f"plan{suffix}", flow=flow)
    q = read_placement(path)
    assert q.same_plan(p)
    assert q.links == p.links
    assert q.cluster == p.cluster
    assert (q.model, q.method, q.partial, q.exceed_profiled_max) == (p.model, p.method, p.partial, p.exceed_profiled_max)
    assert dict(q.meta) == {k: v for k, v in p.meta.items() if v is not None}
    assert read_flow(path) == flow
    # writing the read plan gives the same file
    again = write_placement(q, tmp_path / f"again{suffix}", flow=flow)
    assert again.read_text() == path.read_text()


def test_plan_file_layout(tmp_path: Path, base: Placement) -> None:
    path = write_placement(base.with_meta(max_flow=123.0), tmp_path / "plan.toml")
    doc = tomllib.loads(path.read_text())
    assert doc["plan"] == {
        "model": MODEL,
        "method": "test",
        "partial": False,
        "exceed_profiled_max": False,
        "num_layers": 80,
        "note": "one pipeline",
        "max_flow": 123.0,
    }
    assert doc["cluster"]["meta"]["name"] == "single24"
    assert doc["nodes"][6] == {"id": 6, "type": "A100", "layers": [0, 12]}
    assert doc["nodes"][2] == {"id": 2, "type": "T4"}
    assert {"src": "source", "dst": 6} in doc["links"] and {"src": 1, "dst": "sink"} in doc["links"]
    assert "flow" not in doc and read_flow(path) is None


def _doc(base: Placement) -> dict[str, Any]:
    return placement_to_dict(base)


def _bad_docs() -> list[tuple[str, Any, str]]:
    """(label, mutation of the document, field named in the error)."""

    def drop(key: str):  # type: ignore[no-untyped-def]
        return lambda d: d.pop(key)

    def set_plan(key: str, value: Any):  # type: ignore[no-untyped-def]
        return lambda d: d["plan"].__setitem__(key, value)

    return [
        ("missing plan", drop("plan"), "plan"),
        ("missing cluster", drop("cluster"), "cluster"),
        ("missing model", lambda d: d["plan"].pop("model"), "plan.model"),
        ("unknown model", set_plan("model", "gpt-5"), "plan.model"),
        ("model not a string", set_plan("model", 70), "plan.model"),
        ("partial not a bool", set_plan("partial", "no"), "plan.partial"),
        ("wrong layer count", set_plan("num_layers", 60), "plan.num_layers"),
        ("unknown top key", lambda d: d.__setitem__("extra", {}), "extra"),
        ("range is a string", lambda d: d["nodes"][6].__setitem__("layers", "0-12"), "nodes[6].layers"),
        ("range of floats", lambda d: d["nodes"][6].__setitem__("layers", [0.0, 12.0]), "nodes[6].layers"),
        ("range of three", lambda d: d["nodes"][6].__setitem__("layers", [0, 6, 12]), "nodes[6].layers"),
        ("range reversed", lambda d: d["nodes"][6].__setitem__("layers", [12, 0]), "nodes[6].layers"),
        ("unknown node", lambda d: d["nodes"][6].__setitem__("id", 99), "nodes[6].id"),
        ("node twice", lambda d: d["nodes"][7].__setitem__("id", 6), "nodes[7].id"),
        ("wrong type", lambda d: d["nodes"][6].__setitem__("type", "T4"), "nodes[6].type"),
        ("node key typo", lambda d: d["nodes"][6].__setitem__("layer", [0, 12]), "nodes[6].layer"),
        ("link to unknown node", lambda d: d["links"][0].__setitem__("dst", 42), "links[0].dst"),
        ("link from sink", lambda d: d["links"][0].__setitem__("src", "sink"), "links[0].src"),
        ("link missing dst", lambda d: d["links"][0].pop("dst"), "links[0].dst"),
        ("links not an array", lambda d: d.__setitem__("links", {"src": 1}), "links"),
        (
            "bad cluster",
            lambda d: d["cluster"]["links"][0].__setitem__("bandwidth", -1.0),
            "cluster.links[0].bandwidth",
        ),
        ("bad flow", lambda d: d.__setitem__("flow", {"link_flows": {}}), "flow"),
    ]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize(("label", "mutate", "field"), _bad_docs(), ids=[b[0] for b in _bad_docs()])
def test_malformed_plan_files_raise_config_error(
    tmp_path: Path, base: Placement, label: str, mutate: Any, field: str, suffix: str
) -> None:
    doc = _doc(base)
    mutate(doc)
    path = tmp_path / f"bad{suffix}"
    path.write_text(json.dumps(doc) if suffix == ".json" else tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as info:
        read_placement(path)
    assert info.value.source == str(path)
    assert info.value.field == field, label
    assert str(path) in str(info.value) and field in str(info.value)


def test_unparsable_plan_files(tmp_path: Path) -> None:
    for name, text in (("a.toml", "[plan\nmodel = 1"), ("b.json", "{not json"), ("c.json", "[1, 2]")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match=str(path).replace("\\", "\\\\")):
            read_placement(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_placement(tmp_path / "missing.toml")


def test_invalid_plan_is_neither_written_nor_read(
    tmp_path: Path, single24: ClusterSpec, base: Placement
) -> None:
    bad = _with(base, layers=_layers(single24, n11=(69, 72), n1=(72, 80)))
    path = tmp_path / "bad.toml"
    with pytest.raises(PlacementError):
        write_placement(bad, path)
    assert not path.exists()
    # a well-formed file holding the same invalid plan
    doc = _doc(base)
    doc["nodes"][11]["layers"] = [69, 72]
    doc["nodes"][1]["layers"] = [72, 80]
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(PlacementError, match=r"bad.toml.*node 1 \(T4\): holds 8 layers"):
        read_placement(path)


def test_meta_that_cannot_be_written(tmp_path: Path, base: Placement) -> None:
    with pytest.raises(ValueError, match="clashes"):
        write_placement(base.with_meta(model="x"), tmp_path / "a.toml")
    with pytest.raises(ValueError, match="cannot be written"):
        write_placement(base.with_meta(obj=object()), tmp_path / "b.toml")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Import of original Helix files
# --------------------------------------------------------------------------------------------------


def _write_helix(
    tmp_path: Path, solution: dict[int, list[int]], links: list[tuple[str, str]], listed=None
) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    sol = ["[Settings]", "offset=2", "", "[Solution]"]
    sol += [f"compute_node_{i + 2}={ids}" for i, ids in solution.items()]
    names = [f"compute_node_{i + 2}" for i in (listed if listed is not None else solution)]
    lnames = [f"link_{a}_{b}" for a, b in links]
    sim = ["[ComputeNodes]", f"names={names}", "", "[Links]", f"names={lnames}", ""]
    for (a, b), ln in zip(links, lnames, strict=True):
        sim += [f"[{ln}]", f"in={a}", f"out={b}", "latency=1.0 * MilliSec", "bandwidth=1000.0 * mbps", ""]
    sp, cp = tmp_path / "x_sol.ini", tmp_path / "simulator_cluster.ini"
    sp.write_text("\n".join(sol) + "\n")
    cp.write_text("\n".join(sim) + "\n")
    return sp, cp


def _cn(i: int) -> str:
    return f"compute_node_{i + 2}"


def _chain_links(chain: list[int]) -> list[tuple[str, str]]:
    """source -> chain[0] -> ... -> chain[-1] -> sink, with the original's node names."""
    return [
        ("source", _cn(chain[0])),
        *((_cn(a), _cn(b)) for a, b in itertools.pairwise(chain)),
        (_cn(chain[-1]), "sink"),
    ]


def test_import_drops_dangling_links_to_a_fixpoint(tmp_path: Path, single24: ClusterSpec) -> None:
    # one full chain plus a dead branch 17 -> 2: [36,40) -> 4: [40,44) that no node continues
    solution = {
        6: list(range(0, 12)),
        10: list(range(12, 24)),
        17: list(range(24, 36)),
        9: list(range(36, 48)),
    }
    solution.update(
        {0: list(range(48, 55)), 3: list(range(55, 62)), 5: list(range(62, 69)), 11: list(range(69, 76))}
    )
    solution.update({1: list(range(76, 80)), 2: list(range(36, 40)), 4: list(range(40, 44))})
    chain = [6, 10, 17, 9, 0, 3, 5, 11, 1]
    links = _chain_links(chain)
    links += [(_cn(17), _cn(2)), (_cn(2), _cn(4))]
    sp, cp = _write_helix(tmp_path, solution, links)
    p = import_helix_solution(sp, cp, single24, MODEL)
    assert p.meta["dropped_links"] == 2
    assert (17, 2) not in p.links and len(p.links) == len(chain) + 1
    assert p.method == "x" and not p.partial
    assert p.layers[2] == (36, 40) and p.layers[7] is None


def test_import_detects_partial_links(tmp_path: Path, single24: ClusterSpec) -> None:
    solution = {i: list(range(*r)) for i, r in BASE.items()}
    solution[2] = list(range(10, 14))
    chain = CHAIN
    links = _chain_links(chain)
    sp, cp = _write_helix(tmp_path, solution, [*links, (_cn(6), _cn(2)), (_cn(2), _cn(9))])
    p = import_helix_solution(sp, cp, single24, MODEL, method="mine")
    assert p.partial and p.method == "mine" and "dropped_links" not in p.meta
    # a node not listed in [ComputeNodes] is unused even if the solution gives it layers
    sp, cp = _write_helix(tmp_path, solution, links, listed=list(BASE))
    q = import_helix_solution(sp, cp, single24, MODEL)
    assert q.layers[2] is None and not q.partial


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s, c: (s.replace("offset=2", ""), c), r"\[Settings\]\.offset"),
        (lambda s, c: (s.replace("offset=2", "offset=two"), c), "must be an integer"),
        (
            lambda s, c: (s.replace("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]", "[0, 1, 3]"), c),
            "not contiguous",
        ),
        (lambda s, c: (s.replace("compute_node_8=", "compute_node_99="), c), "compute_node_99"),
        (lambda s, c: (s.replace("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]", "[79, 80]"), c), "not within"),
        (lambda s, c: (s, c.replace("in=source", "in=compute_node_77")), "compute_node_77"),
        (lambda s, c: (s, c.replace("[Links]", "[Linkz]")), r"\[Links\]"),
    ],
)
def test_import_rejects_malformed_files(tmp_path: Path, single24: ClusterSpec, edit: Any, match: str) -> None:
    solution = {i: list(range(*r)) for i, r in BASE.items()}
    links = _chain_links(CHAIN)
    sp, cp = _write_helix(tmp_path, solution, links)
    s, c = edit(sp.read_text(), cp.read_text())
    sp.write_text(s)
    cp.write_text(c)
    with pytest.raises(ConfigError, match=match):
        import_helix_solution(sp, cp, single24, MODEL)


def test_import_rejects_invalid_plan(tmp_path: Path, single24: ClusterSpec) -> None:
    solution = {i: list(range(*r)) for i, r in BASE.items()}
    links = _chain_links(CHAIN)
    sp, cp = _write_helix(tmp_path, solution, [*links, (_cn(6), _cn(10))])  # skips layers 12..24
    with pytest.raises(PlacementError, match="link 6->10: not valid"):
        import_helix_solution(sp, cp, single24, MODEL)


def test_round_trip_keeps_regions(tmp_path: Path) -> None:
    c3 = load_cluster("3cluster24")
    layers = {0: (0, 12), 1: (12, 24), 2: (24, 36), 3: (36, 48), 4: (48, 55), 5: (55, 62), 14: (62, 69)}
    layers.update({15: (69, 76), 6: (76, 80)})
    p = Placement.from_layers(c3, MODEL, layers, method="manual")
    q = read_placement(write_placement(p, tmp_path / "p.toml"))
    assert q.cluster == c3 and q.cluster.regions() == c3.regions() and q.same_plan(p)
    assert max_flow(q).value == max_flow(p).value > 0


def test_plan_files_with_the_old_force_key_still_read(tmp_path: Path) -> None:
    shipped = load_shipped_layout("separate_t4")  # exceeds the profiled layer maximum
    new = tmp_path / "new.toml"
    write_placement(shipped, new)
    text = new.read_text()
    assert "exceed_profiled_max = true" in text
    old = tmp_path / "old.toml"
    old.write_text(text.replace("exceed_profiled_max = true", "force = true"))
    assert read_placement(old).exceed_profiled_max is True
    both = tmp_path / "both.toml"
    both.write_text(text.replace("exceed_profiled_max = true", "exceed_profiled_max = true\nforce = true"))
    with pytest.raises(ConfigError, match="plan.force"):
        read_placement(both)
