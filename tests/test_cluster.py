"""Tests of helix_async.cluster: shipped clusters, INI import, TOML round trip, generators, validation."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helix_async.cluster import (
    BUILTIN_CLUSTERS,
    DEFAULT_MACHINE_TYPES,
    SINK,
    SOURCE,
    ClusterSpec,
    DirectedLink,
    Link,
    MachineType,
    Node,
    cluster_from_toml_dict,
    cluster_to_toml_dict,
    eval_unit_expr,
    generate_partitioned,
    generate_single_region,
    import_helix_ini,
    load_cluster,
    read_cluster_toml,
    read_machine_profile_ini,
    write_cluster_toml,
)
from helix_async.errors import ConfigError

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "helix_async" / "data" / "clusters"

H100 = MachineType("H100", 1, 80e9, 2.5e10, 2.5e10, 2e9)


def _arc_set(spec: ClusterSpec) -> set[tuple[object, object, float, float]]:
    return {(a.src, a.dst, a.bandwidth, a.latency) for a in spec.arcs()}


def _assert_arcs_close(x: ClusterSpec, y: ClusterSpec) -> None:
    ax = {(a.src, a.dst): a for a in x.arcs()}
    ay = {(a.src, a.dst): a for a in y.arcs()}
    assert ax.keys() == ay.keys()
    for key, arc in ax.items():
        assert math.isclose(arc.bandwidth, ay[key].bandwidth, rel_tol=1e-9), key
        assert math.isclose(arc.latency, ay[key].latency, rel_tol=1e-9), key


# --------------------------------------------------------------------------------------------------
# Shipped clusters
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_CLUSTERS)
def test_every_builtin_loads_and_is_complete(name: str) -> None:
    spec = load_cluster(name)
    spec.validate()
    assert spec.name == name
    assert [n.id for n in spec.nodes] == list(range(spec.num_nodes))
    assert spec.is_complete()
    n = spec.num_nodes
    assert len(spec.links) == 2 * n + n * (n - 1) // 2
    assert spec.coordinator_nic_in == spec.coordinator_nic_out == 1e10
    for node in spec.nodes:
        assert spec.machine(node.id) == DEFAULT_MACHINE_TYPES[node.machine_type]


def test_single24() -> None:
    spec = load_cluster("single24")
    assert spec.num_nodes == 24
    assert spec.machine_counts() == {
        "L4": 8,
        "T4": 12,
        "A100": 4,
    }  # first-appearance order: 0 L4, 1 T4, 6 A100
    assert list(spec.machine_counts()) == ["L4", "T4", "A100"]
    assert spec.nodes[6].machine_type == "A100"
    assert spec.regions() == {"default": list(range(24))}
    src = [lk for lk in spec.links if lk.a == SOURCE]
    snk = [lk for lk in spec.links if lk.b == SINK]
    pairs = [lk for lk in spec.links if isinstance(lk.a, int) and isinstance(lk.b, int)]
    assert (len(src), len(snk), len(pairs)) == (24, 24, 276)
    assert all(lk.bidirectional for lk in pairs) and not any(lk.bidirectional for lk in src + snk)
    assert all(lk.bandwidth == 1e9 and lk.latency == 1e-3 for lk in spec.links)
    assert spec.is_complete()

    arcs = spec.arcs()
    assert len(arcs) == 24 + 24 + 2 * 276
    assert [a.dst for a in arcs[:24]] == list(range(24)) and all(a.src == SOURCE for a in arcs[:24])
    assert [a.src for a in arcs[-24:]] == list(range(24)) and all(a.dst == SINK for a in arcs[-24:])
    assert arcs[24] == DirectedLink(0, 1, 1e9, 1e-3) and arcs[25] == DirectedLink(1, 0, 1e9, 1e-3)
    assert len(spec.out_arcs(SOURCE)) == 24 and spec.in_arcs(SOURCE) == ()
    assert len(spec.out_arcs(5)) == 24 and len(spec.in_arcs(5)) == 24  # 23 peers + sink / source
    assert spec.out_arcs(SINK) == () and len(spec.in_arcs(SINK)) == 24
    assert spec.arc(3, 7) == DirectedLink(3, 7, 1e9, 1e-3)
    assert spec.arc(SINK, 3) is None and spec.arc(3, 3) is None
    with pytest.raises(IndexError):
        spec.machine(24)


def test_3cluster24_regions_and_link_ranges() -> None:
    spec = load_cluster("3cluster24")
    regions = spec.regions()
    assert regions == {"region0": [0, 1, 2, 3], "region1": list(range(4, 14)), "region2": list(range(14, 24))}
    assert {spec.nodes[i].machine_type for i in regions["region0"]} == {"A100"}
    assert [spec.nodes[i].machine_type for i in regions["region1"]].count("L4") == 2
    assert [spec.nodes[i].machine_type for i in regions["region2"]].count("L4") == 6

    cross = spec.arc(0, 20)
    assert cross is not None and 1e7 <= cross.bandwidth <= 1.5e7 and 0.04 <= cross.latency <= 0.06
    assert spec.arc(20, 0) == DirectedLink(20, 0, cross.bandwidth, cross.latency)
    inside = spec.arc(4, 5)
    assert (
        inside is not None
        and 1.125e9 <= inside.bandwidth <= 1.375e9
        and inside.latency == pytest.approx(1e-3)
    )
    region_of = {node.id: node.region for node in spec.nodes}
    for arc in spec.arcs():
        same = (
            isinstance(arc.src, int) and isinstance(arc.dst, int) and region_of[arc.src] == region_of[arc.dst]
        )
        if same:
            assert 1.125e9 <= arc.bandwidth <= 1.375e9
        else:  # cross-region, including every coordinator link
            assert 1e7 <= arc.bandwidth <= 1.5e7 and 0.04 <= arc.latency <= 0.06


def test_subcluster_reproduces_shipped_dist_clusters() -> None:
    full = load_cluster("3cluster24")
    for gpu in ("A100", "L4", "T4"):
        ids = [n.id for n in full.nodes if n.machine_type == gpu]
        sub = full.subcluster(ids, name=f"dist_{gpu.lower()}")
        shipped = load_cluster(f"dist_{gpu.lower()}")
        assert _arc_set(sub) == _arc_set(shipped)
        assert [n.machine_type for n in sub.nodes] == [n.machine_type for n in shipped.nodes]
        assert sub.meta["parent_node_ids"] == ids
        assert list(sub.machine_types) == [gpu]
    pair = full.subcluster([13, 4])  # the order given defines the new ids
    assert [(n.id, n.machine_type, n.region) for n in pair.nodes] == [
        (0, "T4", "region1"),
        (1, "L4", "region1"),
    ]
    orig = full.arc(13, 4)
    assert orig is not None and pair.arc(0, 1) == DirectedLink(0, 1, orig.bandwidth, orig.latency)
    assert pair.in_arcs(0)[0] == dataclasses.replace(full.in_arcs(13)[0], dst=0) and pair.is_complete()
    with pytest.raises(ConfigError, match=r"node_ids\[1\]"):
        full.subcluster([1, 1])


# --------------------------------------------------------------------------------------------------
# Helix INI import
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single24", "3cluster24", "cluster42", "dist_l4"])
def test_ini_import_equals_toml(name: str) -> None:
    toml_spec = load_cluster(name)
    ini_spec = import_helix_ini(CLUSTER_DIR / f"{name}.ini")
    assert ini_spec.name == name
    assert ini_spec.nodes == toml_spec.nodes  # types and (for 3cluster24) header-derived regions
    _assert_arcs_close(ini_spec, toml_spec)
    # Exact unit arithmetic makes the values bit-identical, not just close.
    assert ini_spec.links == toml_spec.links
    assert ini_spec.machine_types == toml_spec.machine_types


def test_load_cluster_accepts_ini_and_toml_paths() -> None:
    assert load_cluster(CLUSTER_DIR / "cluster10.ini").links == load_cluster("cluster10").links
    assert load_cluster(str(CLUSTER_DIR / "cluster10.toml")) == load_cluster("cluster10")


def test_machine_profile_ini() -> None:
    profile = read_machine_profile_ini(CLUSTER_DIR / "machine_profile.ini")
    # the original's table is ours but for the CPU worker type we add (the tiny model's machine)
    ours = dict(DEFAULT_MACHINE_TYPES)
    assert ours.pop("CPU").num_gpus == 1
    assert dict(profile) == ours
    assert profile.coordinator_nic_in == 1e10 and profile.coordinator_nic_out == 1e10
    assert profile["L4x2"].num_gpus == 2 and profile["L4x2"].gpu == "l4x2"
    spec = import_helix_ini(CLUSTER_DIR / "single24.ini", CLUSTER_DIR / "machine_profiles.ini", name="s24")
    assert spec.name == "s24" and spec.machine_types == load_cluster("single24").machine_types


def test_ini_machine_profile_custom_type(tmp_path: Path) -> None:
    prof = tmp_path / "profile.ini"
    prof.write_text(
        "[SourceNode]\noutbound_nic_speed = 5 * gbps\n[SinkNode]\ninbound_nic_speed = 4 * gbps\n"
        "[H100x8]\ninbound_nic_speed = 25 * gbps\noutbound_nic_speed = 25 * gbps\n"
        "disk_speed = 2 * gbps\nvram_size = 640 * GB\n"
    )
    profile = read_machine_profile_ini(prof)
    assert profile.coordinator_nic_out == 5e9 and profile.coordinator_nic_in == 4e9
    assert profile["H100x8"] == MachineType("H100x8", 8, 640e9, 25e9, 25e9, 2e9, "h100x8")


def _write_ini(tmp_path: Path, bandwidth: str = "1000 * mbps", extra: str = "") -> Path:
    text = (
        "[NodeNames]\ntotal_compute_nodes=2\n\n"
        "[SourceNode]\nconnected_nodes=[0, 1]\n\n[SinkNode]\nconnected_nodes=[0, 1]\n\n"
        "[ComputeNode-0]\ntype=A100\nconnected_nodes=['source', 1, 'sink']\n\n"
        "[ComputeNode-1]\ntype=T4\nconnected_nodes=['source', 0, 'sink']\n\n"
        "[Link-source-0]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
        "[Link-source-1]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
        "[Link-0-sink]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
        "[Link-1-sink]\nbandwidth=1000 * mbps\nlatency=1 * MilliSec\n\n"
        f"[Link-0-1]\nbandwidth={bandwidth}\nlatency=2 * MilliSec\n\n{extra}"
    )
    path = tmp_path / "small.ini"
    path.write_text(text)
    return path


def test_ini_small_file_and_errors(tmp_path: Path) -> None:
    spec = import_helix_ini(_write_ini(tmp_path, "12.5 * mbps"))
    assert spec.arc(1, 0) == DirectedLink(1, 0, 12.5e6, 0.002) and spec.is_complete()

    path = _write_ini(tmp_path, "__import__('os').system('true')")
    with pytest.raises(ConfigError) as err:
        import_helix_ini(path)
    assert err.value.source == str(path) and err.value.field == "[Link-0-1].bandwidth"
    assert "unsupported expression" in str(err.value)

    path = _write_ini(tmp_path, "-3 * mbps")
    with pytest.raises(ConfigError, match=r"\[Link-0-1\]\.bandwidth: must be > 0 bytes/s, got -3000000.0"):
        import_helix_ini(path)

    path = _write_ini(tmp_path, extra="[Link-1-5]\nbandwidth=1 * mbps\nlatency=1 * MilliSec\n")
    with pytest.raises(ConfigError, match=r"\[Link-1-5\]: link to unknown node 5"):
        import_helix_ini(path)

    path = _write_ini(tmp_path).with_name("mismatch.ini")
    path.write_text(
        _write_ini(tmp_path)
        .read_text()
        .replace("connected_nodes=[0, 1]\n\n[SinkNode]", "connected_nodes=[0]\n\n[SinkNode]")
    )
    with pytest.raises(ConfigError, match=r"\[SourceNode\]\.connected_nodes: does not match"):
        import_helix_ini(path)


# --------------------------------------------------------------------------------------------------
# Safe unit expressions
# --------------------------------------------------------------------------------------------------


def test_eval_unit_expr_values() -> None:
    assert eval_unit_expr("1000 * mbps") == 1e9
    assert eval_unit_expr("14.2 * mbps") == 14200000.0  # exact, unlike 14.2 * 1e6 in floats
    assert eval_unit_expr("55 * MilliSec") == 0.055
    assert eval_unit_expr("16 * GB") == 16e9
    assert eval_unit_expr("-1") == -1.0
    assert eval_unit_expr("(1 + 1) * KB / 4 - 0.5 * Byte") == 499.5
    assert eval_unit_expr(" 10 ") == 10.0


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('echo pwned')",
        "mbps.__class__",
        "open('/etc/passwd')",
        "os",
        "2 ** 10",
        "[1, 2]",
        "lambda: 1",
        "1 if mbps else 2",
        "'1000'",
        "1000 *",
        "1 / 0",
        "",
        "1" * 300,
    ],
)
def test_eval_unit_expr_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        eval_unit_expr(text, source="f.ini", field="[Link-0-1].bandwidth")
    assert str(err.value).startswith("f.ini: [Link-0-1].bandwidth: ")


# --------------------------------------------------------------------------------------------------
# TOML round trip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single24", "3cluster24", "cluster10", "dist_t4"])
def test_builtin_round_trip(tmp_path: Path, name: str) -> None:
    spec = load_cluster(name)
    path = tmp_path / f"{name}.toml"
    write_cluster_toml(spec, path)
    again = read_cluster_toml(path)
    assert again == spec
    assert again.source_file == str(path)
    assert hash(again) == hash(spec) and len({again, spec}) == 1
    if name == "3cluster24":  # regions now explicit in the file, not taken from comments
        assert 'region = "region2"' in path.read_text()
    assert cluster_from_toml_dict(cluster_to_toml_dict(spec), "<dict>") == spec


def test_generated_round_trip_with_regions_and_custom_type(tmp_path: Path) -> None:
    spec = generate_partitioned(
        [["H100", "H100"], ["L4", "T4", "L4"], ["T4x2"]], machine_types={"H100": H100}, seed=7
    )
    spec = dataclasses.replace(
        spec, coordinator_nic_in=4e9, meta={**spec.meta, "owner": "lab", "tags": ["a", "b"]}
    )
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    write_cluster_toml(spec, first)
    write_cluster_toml(read_cluster_toml(first), second)
    assert read_cluster_toml(first) == spec
    assert first.read_text() == second.read_text()  # deterministic output
    again = read_cluster_toml(first)
    assert again.machine_types["H100"] == H100 and again.regions() == spec.regions()
    assert again.coordinator_nic_in == 4e9


def test_toml_partial_machine_type_uses_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[machine_types.A100]\nvram_bytes = 80e9\n[machine_types.H100]\nnum_gpus = 1\nvram_bytes = 80e9\n"
        "nic_in = 1e10\nnic_out = 1e10\ndisk = 1e9\n"
        '[[nodes]]\nid = 0\ntype = "A100"\n[[nodes]]\nid = 1\ntype = "H100"\nregion = "eu"\n'
        "[[links]]\na = 0\nb = 1\nbandwidth = 1e9\nlatency = 0.001\n"
    )
    spec = read_cluster_toml(path)
    assert spec.machine_types["A100"] == dataclasses.replace(DEFAULT_MACHINE_TYPES["A100"], vram_bytes=80e9)
    assert spec.machine_types["H100"].gpu == "h100"
    assert spec.links[0].bidirectional is True  # default for a pair link
    assert spec.regions() == {"default": [0], "eu": [1]}
    assert not spec.is_complete()
    assert spec.name == "c"


# --------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------


def test_single_region_generator_like_single24() -> None:
    state = random.getstate()
    spec = generate_single_region(24, 23, {"A100": 4, "T4": 12, "L4": 8}, seed=0)
    assert random.getstate() == state  # never touches the global RNG
    assert spec.machine_counts().keys() == {"A100", "T4", "L4"}
    assert sorted(spec.machine_counts().items()) == [("A100", 4), ("L4", 8), ("T4", 12)]
    assert spec.is_complete() and len(spec.links) == 24 + 24 + 276
    assert all(lk.bandwidth == 1e9 and lk.latency == 1e-3 for lk in spec.links)
    assert spec == generate_single_region(24, 23, {"A100": 4, "T4": 12, "L4": 8}, seed=0)
    other = generate_single_region(24, 23, {"A100": 4, "T4": 12, "L4": 8}, seed=1)
    assert [n.machine_type for n in other.nodes] != [n.machine_type for n in spec.nodes]


def test_single_region_generator_degrees_and_stats() -> None:
    kwargs: dict[str, Any] = dict(
        source_degree=5,
        sink_degree=3,
        bandwidth=(1e9, 1e8),
        latency=(2e-3, 1e-3),
        slow_bandwidth=(5e6, 1e6),
        slow_latency=(0.05, 0.01),
    )
    sparse = generate_single_region(
        12, 4, {"A100": 1, "L4": 1, "T4": 1}, fill_with_slow_links=False, seed=3, **kwargs
    )
    assert len(sparse.out_arcs(SOURCE)) == 5 and len(sparse.in_arcs(SINK)) == 3
    pairs = [lk for lk in sparse.links if isinstance(lk.a, int) and isinstance(lk.b, int)]
    assert len(pairs) == 12 * 4 // 2
    assert all(9e8 <= lk.bandwidth <= 1.1e9 and 1e-3 <= lk.latency <= 3e-3 for lk in sparse.links)
    assert not sparse.is_complete()
    assert sparse.machine_counts().keys() == {"A100", "L4", "T4"} and set(
        sparse.machine_counts().values()
    ) == {4}

    full = generate_single_region(12, 4, {"A100": 1, "L4": 1, "T4": 1}, seed=3, **kwargs)
    assert full.is_complete()
    slow = [lk for lk in full.links if lk.bandwidth < 1e8]
    assert len(slow) == (12 - 5) + (12 - 3) + (66 - 24)
    assert all(4e6 <= lk.bandwidth <= 6e6 and 0.04 <= lk.latency <= 0.06 for lk in slow)
    assert full != generate_single_region(12, 4, {"A100": 1, "L4": 1, "T4": 1}, seed=4, **kwargs)


@pytest.mark.parametrize(
    ("n", "weights", "expected"),
    [
        (10, {"A100": 1, "L4": 1, "T4": 1}, 10),  # 3.33 each: rounding drift +1
        (7, {"A100": 1, "L4": 1}, 7),  # 3.5 each: banker's rounding gives 4 + 4, drift -1
        (5, {"A100": 0, "T4": 1}, 5),  # zero weight gets nothing
    ],
)
def test_type_counts_sum_to_n(n: int, weights: dict[str, float], expected: int) -> None:
    spec = generate_single_region(n, 1, weights, seed=0)
    counts = spec.machine_counts()
    assert sum(counts.values()) == expected
    assert all(weights[t] > 0 for t in counts)
    assert max(counts.values()) - min(counts.values()) <= 1 or len(counts) == 1


def test_partitioned_generator() -> None:
    parts = [["A100"] * 4, ["L4"] * 2 + ["T4"] * 8, ["L4"] * 6 + ["T4"] * 4]
    state = random.getstate()
    spec = generate_partitioned(parts, seed=0)
    assert random.getstate() == state
    assert spec.regions() == {
        "region0": [0, 1, 2, 3],
        "region1": list(range(4, 14)),
        "region2": list(range(14, 24)),
    }
    assert spec.machine_counts() == {"A100": 4, "L4": 8, "T4": 12}
    assert spec.is_complete()
    region_of = {n.id: n.region for n in spec.nodes}
    for arc in spec.arcs():
        inside = (
            isinstance(arc.src, int) and isinstance(arc.dst, int) and region_of[arc.src] == region_of[arc.dst]
        )
        if inside:
            assert 1.125e9 <= arc.bandwidth <= 1.375e9 and arc.latency == 1e-3
        else:
            assert 1e7 <= arc.bandwidth <= 1.5e7 and 0.04 <= arc.latency <= 0.06
    assert spec == generate_partitioned(parts, seed=0)
    assert spec.links != generate_partitioned(parts, seed=1).links


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: generate_single_region(4, 4, {"A100": 1}, seed=0), "avg_degree"),
        (lambda: generate_single_region(4, 2, {"A100": 1}, source_degree=5, seed=0), "source_degree"),
        (lambda: generate_single_region(4, 2, {"B200": 1}, seed=0), "machine type"),
        (lambda: generate_single_region(4, 2, {"A100": 0}, seed=0), "type_weights"),
        (lambda: generate_single_region(4, 2, {"A100": 1}, bandwidth=(1e6, 2e6), seed=0), "bandwidth"),
        (lambda: generate_single_region(4, 2, {"A100": 1}, seed=None), "seed"),  # type: ignore[arg-type]
        (lambda: generate_partitioned([[]], seed=0), "partitions[0]"),
        (lambda: generate_partitioned([["A100"]], cross_latency=(0.01, -1.0), seed=0), "cross_latency[1]"),
    ],
)
def test_generator_argument_errors(call: Callable[[], object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        call()
    assert err.value.field == field


# --------------------------------------------------------------------------------------------------
# Validation: one bad file per rule
# --------------------------------------------------------------------------------------------------

_NODES = '[[nodes]]\nid = 0\ntype = "A100"\n\n[[nodes]]\nid = 1\ntype = "T4"\n\n'


def _link(
    a: object, b: object, bandwidth: object = "1e9", latency: object = "0.001", bidir: str | None = None
) -> str:
    def lit(v: object) -> str:
        return f'"{v}"' if v in (SOURCE, SINK) else str(v)

    text = f"[[links]]\na = {lit(a)}\nb = {lit(b)}\nbandwidth = {bandwidth}\nlatency = {latency}\n"
    if bidir is not None:
        text += f"bidirectional = {bidir}\n"
    return text + "\n"


_GOOD_LINKS = _link(SOURCE, 0, bidir="false") + _link(0, 1) + _link(1, SINK, bidir="false")

BAD_FILES = [
    (
        "unknown_type",
        _NODES.replace('"T4"', '"B200"') + _GOOD_LINKS,
        "nodes[1].type",
        "unknown machine type 'B200'",
    ),
    ("unknown_node", _NODES + _link(0, 7), "links[0].b", "unknown node 7"),
    ("unknown_endpoint", _NODES + _link(0, "'coordinator'"), "links[0].b", "unknown endpoint 'coordinator'"),
    (
        "zero_bandwidth",
        _NODES + _GOOD_LINKS + _link(SOURCE, 1, bandwidth=0),
        "links[3].bandwidth",
        "must be > 0 bytes/s, got 0",
    ),
    (
        "negative_bandwidth",
        _NODES + _link(0, 1, bandwidth=-5),
        "links[0].bandwidth",
        "must be > 0 bytes/s, got -5",
    ),
    ("negative_latency", _NODES + _link(0, 1, latency=-0.5), "links[0].latency", "must be >= 0 s, got -0.5"),
    ("nan_bandwidth", _NODES + _link(0, 1, bandwidth="nan"), "links[0].bandwidth", "must be finite, got nan"),
    ("inf_latency", _NODES + _link(0, 1, latency="inf"), "links[0].latency", "must be finite, got inf"),
    ("duplicate_id", _NODES.replace("id = 1", "id = 0") + _GOOD_LINKS, "nodes[1].id", "duplicate node id 0"),
    ("id_gap", _NODES.replace("id = 1", "id = 2"), "nodes[1].id", "expected 1, got 2"),
    ("duplicate_link", _NODES + _link(0, 1) + _link(1, 0), "links[1]", "duplicate link between 1 and 0"),
    ("duplicate_source_link", _NODES + _link(SOURCE, 0) + _link(SOURCE, 0), "links[1]", "duplicate link"),
    ("from_sink", _NODES + _link(SINK, 0), "links[0].a", "cannot leave the sink"),
    ("to_source", _NODES + _link(1, SOURCE), "links[0].b", "cannot enter the source"),
    ("source_to_sink", _NODES + _link(SOURCE, SINK), "links[0].b", "directly to the sink"),
    ("self_loop", _NODES + _link(1, 1), "links[0].b", "self-loop on node 1"),
    (
        "bidir_coordinator",
        _NODES + _link(SOURCE, 0, bidir="true"),
        "links[0].bidirectional",
        "one-directional",
    ),
    (
        "missing_bandwidth",
        _NODES + "[[links]]\na = 0\nb = 1\nlatency = 0.001\n",
        "links[0].bandwidth",
        "missing required field",
    ),
    ("missing_type", "[[nodes]]\nid = 0\n", "nodes[0].type", "missing required field"),
    ("missing_nodes", "[meta]\nname = 'x'\n", "nodes", "missing required field"),
    (
        "wrong_type_bandwidth",
        _NODES + _link(0, 1, bandwidth='"fast"'),
        "links[0].bandwidth",
        "must be a number (bytes/s), got 'fast'",
    ),
    ("wrong_type_id", '[[nodes]]\nid = "0"\ntype = "A100"\n', "nodes[0].id", "must be an integer, got '0'"),
    (
        "wrong_type_bidir",
        _NODES + _link(0, 1, bidir='"yes"'),
        "links[0].bidirectional",
        "must be true or false, got 'yes'",
    ),
    ("wrong_type_nodes", "nodes = 3\n", "nodes", "must be an array of tables"),
    (
        "unknown_field",
        _NODES + _link(0, 1) + "[[links]]\na = 0\nb = 1\nbw = 1\n",
        "links[1].bw",
        "unknown field",
    ),
    ("unknown_top_level", "[[link]]\na = 0\n" + _NODES, "link", "unknown field"),
    (
        "custom_type_incomplete",
        "[machine_types.B200]\nnum_gpus = 1\n" + _NODES,
        "machine_types.B200.vram_bytes",
        "missing required field",
    ),
    (
        "bad_machine_value",
        "[machine_types.A100]\nvram_bytes = -1\n" + _NODES,
        "machine_types.A100.vram_bytes",
        "got -1",
    ),
    (
        "bad_coordinator",
        "[coordinator]\nnic_in = 0\n" + _NODES,
        "coordinator.nic_in",
        "must be > 0 bytes/s, got 0",
    ),
    ("meta_count", "[meta]\nnum_compute_nodes = 3\n" + _NODES, "meta.num_compute_nodes", "says 3"),
    (
        "meta_source",
        "[meta]\nsource_connected = [0, 1]\n" + _NODES + _GOOD_LINKS,
        "meta.source_connected",
        "[0]",
    ),
    ("no_nodes", "nodes = []\n", "nodes", "at least one compute node"),
]


@pytest.mark.parametrize(("stem", "text", "field", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_validation_errors_name_file_and_field(
    tmp_path: Path, stem: str, text: str, field: str, message: str
) -> None:
    path = tmp_path / f"{stem}.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster(path)
    assert err.value.source == str(path)
    assert err.value.field == field
    assert message in err.value.message
    assert str(err.value).startswith(f"{path}: {field}: ")


def test_good_file_of_the_validation_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(_NODES + _GOOD_LINKS)
    spec = load_cluster(path)
    assert spec.num_nodes == 2 and len(spec.arcs()) == 4 and not spec.is_complete()


def test_bad_toml_syntax_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "syntax.toml"
    path.write_text('[[nodes]]\nid = 0\ntype = "A100\n')
    with pytest.raises(ConfigError) as err:
        read_cluster_toml(path)
    assert err.value.source == str(path)
    assert "invalid TOML" in str(err.value) and "line 3" in str(err.value)


def test_missing_file_and_unknown_name_list_builtins(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_cluster("single25")
    assert "single25" in str(err.value) and all(b in str(err.value) for b in BUILTIN_CLUSTERS)
    with pytest.raises(ConfigError) as err:
        load_cluster(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(err.value) and "single24" in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        read_cluster_toml(tmp_path / "nope.toml")
    other = tmp_path / "c.yaml"
    other.write_text("x")
    with pytest.raises(ConfigError, match="expected .toml or .ini"):
        load_cluster(other)


def test_validate_in_memory_specs() -> None:
    good = ClusterSpec(
        name="tiny",
        machine_types={"A100": DEFAULT_MACHINE_TYPES["A100"]},
        nodes=(Node(0, "A100"), Node(1, "A100")),
        links=(Link(SOURCE, 0, 1e9, 0.0, False), Link(0, 1, 1e9, 0.0, True), Link(1, SINK, 1e9, 0.0, False)),
    )
    good.validate()
    assert good.arcs() == (
        DirectedLink(SOURCE, 0, 1e9, 0.0),
        DirectedLink(0, 1, 1e9, 0.0),
        DirectedLink(1, 0, 1e9, 0.0),
        DirectedLink(1, SINK, 1e9, 0.0),
    )
    cases = [
        (dataclasses.replace(good, links=(*good.links, Link(0, 1, -1.0, 0.0, True))), "links[3].bandwidth"),
        (dataclasses.replace(good, links=(Link(0, 1, 1e9, 0.0, "yes"),)), "links[0].bidirectional"),  # type: ignore[arg-type]
        (dataclasses.replace(good, nodes=(Node(0, "A100"), Node(1, "V100"))), "nodes[1].type"),
        (
            dataclasses.replace(
                good, machine_types={"A100": dataclasses.replace(H100, name="A100", num_gpus=0)}
            ),
            "machine_types.A100.num_gpus",
        ),
        (dataclasses.replace(good, machine_types={"A100": H100}), "machine_types.A100.name"),
        (dataclasses.replace(good, meta={"name": "x"}), "meta.name"),
        (dataclasses.replace(good, coordinator_nic_out=math.nan), "coordinator.nic_out"),
        (dataclasses.replace(good, name=""), "name"),
    ]
    for spec, field in cases:
        with pytest.raises(ConfigError) as err:
            spec.validate()
        assert err.value.source == "<memory>" and err.value.field == field
    with pytest.raises(ConfigError, match="links"):
        write_cluster_toml(cases[0][0], "/nonexistent-dir/never-written.toml")


def test_arc_queries_on_directed_pair_links() -> None:
    spec = ClusterSpec(
        name="directed",
        machine_types={"T4": DEFAULT_MACHINE_TYPES["T4"]},
        nodes=tuple(Node(i, "T4") for i in range(3)),
        links=(
            Link(2, SINK, 5e8, 0.0, False),
            Link(SOURCE, 1, 4e8, 0.0, False),
            Link(SOURCE, 0, 3e8, 0.0, False),
            Link(0, 2, 2e8, 0.01, False),
            Link(2, 0, 1e8, 0.02, False),
            Link(1, 2, 1e8, 0.0, True),
        ),
    )
    spec.validate()
    assert [(a.src, a.dst) for a in spec.arcs()] == [
        (SOURCE, 0),
        (SOURCE, 1),
        (0, 2),
        (2, 0),
        (1, 2),
        (2, 1),
        (2, SINK),
    ]
    assert spec.arc(0, 2) == DirectedLink(0, 2, 2e8, 0.01) and spec.arc(2, 0) == DirectedLink(2, 0, 1e8, 0.02)
    assert spec.arc(0, 1) is None and not spec.is_complete()
    assert [a.src for a in spec.in_arcs(2)] == [0, 1]
    assert list(itertools.chain(spec.out_arcs(SOURCE), spec.in_arcs(SINK))) == [
        DirectedLink(SOURCE, 0, 3e8, 0.0),
        DirectedLink(SOURCE, 1, 4e8, 0.0),
        DirectedLink(2, SINK, 5e8, 0.0),
    ]
