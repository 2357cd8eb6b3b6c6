"""Sparse geo-partitioned clusters: ``generate_partitioned(..., cross_links_per_region=c)``."""

from __future__ import annotations

import hashlib
import random
from collections import deque
from pathlib import Path

import pytest

from helix_async.cluster import ClusterSpec, generate_partitioned, read_cluster_toml, write_cluster_toml
from helix_async.errors import ConfigError
from helix_async.ids import SINK, SOURCE

PARTS = [["A100"] * 2, ["L4", "T4", "L4"], ["T4"] * 4]  # regions of 2, 3 and 4 nodes


def _pair_links(spec: ClusterSpec) -> list[tuple[int, int, bool]]:
    """(a, b, inside one region) of every node-to-node link, in link order."""
    region = {n.id: n.region for n in spec.nodes}
    return [
        (link.a, link.b, region[link.a] == region[link.b])
        for link in spec.links
        if isinstance(link.a, int) and isinstance(link.b, int)
    ]


def _digest(spec: ClusterSpec) -> str:
    rows = [(link.a, link.b, link.bandwidth, link.latency, link.bidirectional) for link in spec.links]
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def test_default_path_unchanged() -> None:
    # Digests of the links list taken with the generator before the sparse option existed.
    before = {
        0: "117b2bf0673ed7d933430ced92f2b0f5fb1d26c14557058cd89dde76b8bd8947",
        5: "081540b624391f6fb1da2035bf00d04c8572f9804a6c6717839b5762d5e21858",
    }
    parts = [["A100"] * 2, ["L4", "T4", "L4"], ["T4"] * 3]
    for seed, digest in before.items():
        spec = generate_partitioned(parts, seed=seed)
        assert _digest(spec) == digest
        assert spec == generate_partitioned(parts, cross_links_per_region=None, seed=seed)
        assert spec.is_complete() and len(spec.links) == 8 + 8 + 28
        assert spec.name == f"partitioned3_n8_seed{seed}"
        assert "cross_links_per_region" not in spec.meta["generator"]


def test_link_counts_by_hand_three_regions() -> None:
    spec = generate_partitioned(PARTS, cross_links_per_region=2, seed=0)
    n = 9
    inside = 1 + 3 + 6  # C(2,2) + C(3,2) + C(4,2)
    cross = 3 * 2  # a ring of 3 regions: (0,1), (1,2), (2,0), two links each
    assert len(spec.links) == n + n + inside + cross
    pairs = _pair_links(spec)
    assert sum(1 for *_, same in pairs if same) == inside
    assert sum(1 for *_, same in pairs if not same) == cross
    # source and sink links go to every node, cross stats
    assert [(link.a, link.b) for link in spec.links[: 2 * n]] == [(SOURCE, i) for i in range(n)] + [
        (i, SINK) for i in range(n)
    ]
    # ascending, distinct pairs; each adjacent region pair gets exactly two links
    assert [(a, b) for a, b, _ in pairs] == sorted({(a, b) for a, b, _ in pairs})
    assert all(a < b for a, b, _ in pairs)
    region = {node.id: int(node.region.removeprefix("region")) for node in spec.nodes}
    per_pair: dict[frozenset[int], int] = {}
    for a, b, same in pairs:
        if not same:
            key = frozenset((region[a], region[b]))
            per_pair[key] = per_pair.get(key, 0) + 1
    assert per_pair == {frozenset((0, 1)): 2, frozenset((1, 2)): 2, frozenset((0, 2)): 2}
    for arc in spec.arcs():
        both = isinstance(arc.src, int) and isinstance(arc.dst, int)
        if both and region[arc.src] == region[arc.dst]:  # type: ignore[index]
            assert 1.125e9 <= arc.bandwidth <= 1.375e9 and arc.latency == 1e-3
        else:
            assert 1e7 <= arc.bandwidth <= 1.5e7 and 0.04 <= arc.latency <= 0.06
    assert not spec.is_complete()
    assert spec.meta["generator"]["cross_links_per_region"] == 2
    assert spec.name == "partitioned3_n9_x2_seed0"


def test_two_regions_no_ring_and_one_region() -> None:
    two = generate_partitioned(PARTS[1:], cross_links_per_region=5, seed=3)
    assert len(two.links) == 7 + 7 + (3 + 6) + 5  # only (0, 1): no (last, first) with two regions
    one = generate_partitioned(PARTS[2:], cross_links_per_region=1, seed=3)
    assert len(one.links) == 4 + 4 + 6 and one.is_complete()
    # every cross pair of two regions (3 * 4 = 12) may be asked for: then the graph is complete
    full = generate_partitioned(PARTS[1:], cross_links_per_region=12, seed=3)
    assert full.is_complete()


def test_deterministic_and_seeded() -> None:
    state = random.getstate()
    a = generate_partitioned(PARTS, cross_links_per_region=3, seed=11)
    assert random.getstate() == state  # the generator's own RNG only
    assert a == generate_partitioned(PARTS, cross_links_per_region=3, seed=11)
    assert _digest(a) == _digest(generate_partitioned(PARTS, cross_links_per_region=3, seed=11))
    def cross(spec: ClusterSpec) -> list[tuple[int, int]]:
        return [(x, y) for x, y, same in _pair_links(spec) if not same]

    others = [generate_partitioned(PARTS, cross_links_per_region=3, seed=s) for s in range(12, 16)]
    assert any(cross(o) != cross(a) for o in others)


def test_connected_and_round_trips(tmp_path: Path) -> None:
    parts = [["A100"] * 4 + ["L4"] * 8 + ["T4"] * 12] * 5
    spec = generate_partitioned(parts, cross_links_per_region=1, seed=2)
    n = spec.num_nodes
    assert len(spec.links) == 2 * n + 5 * (24 * 23 // 2) + 5
    adj: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b, _ in _pair_links(spec):
        adj[a].add(b)
        adj[b].add(a)
    seen = {0}
    todo = deque([0])
    while todo:
        for v in adj[todo.popleft()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    assert seen == set(range(n))
    assert all(spec.arc(SOURCE, i) is not None and spec.arc(i, SINK) is not None for i in range(n))
    path = tmp_path / "sparse.toml"
    write_cluster_toml(spec, path)
    assert read_cluster_toml(path) == spec


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "4", 13])
def test_bad_values(bad: object) -> None:
    # 13 > 3 * 4 = 12 distinct pairs between the 3- and the 4-node region
    with pytest.raises(ConfigError) as err:
        generate_partitioned(PARTS[1:], cross_links_per_region=bad, seed=0)  # type: ignore[arg-type]
    assert err.value.field == "cross_links_per_region"


def test_bad_value_names_the_small_region_pair() -> None:
    with pytest.raises(ConfigError, match="region0") as err:
        generate_partitioned(PARTS, cross_links_per_region=7, seed=0)  # region0 x region1: 6 pairs
    assert err.value.field == "cross_links_per_region"
