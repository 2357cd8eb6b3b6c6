"""Random clusters, after the original's generators (docs/original.md §2.3).

Each generator draws from its own ``random.Random(seed)``; the same seed gives the same cluster.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from ..errors import ConfigError
from ..fileio import number_field
from ..ids import SINK, SOURCE, NodeRef
from .defaults import DEFAULT_COORDINATOR_NIC_IN, DEFAULT_COORDINATOR_NIC_OUT, DEFAULT_MACHINE_TYPES
from .spec import ClusterSpec, Link, MachineType, Node

__all__ = ["generate_single_region", "generate_partitioned", "MAX_GENERATED_NODES"]


_ARG = "<argument>"

# A complete graph of N nodes has N*(N-1)/2 pair links; 2,048 nodes (about two million links)
# covers the 1,536-GPU clusters the simulator targets and keeps a generated file in memory.
MAX_GENERATED_NODES = 2048


def _check_stats(where: str, stats: tuple[float, float], *, positive: bool, unit: str) -> tuple[float, float]:
    """(avg, var) of a uniform draw avg + U(-var, var); every possible draw must be valid."""
    if not isinstance(stats, (tuple, list)) or len(stats) != 2:
        raise ConfigError(_ARG, where, f"must be a pair (avg, var), got {stats!r}")
    avg = number_field(_ARG, f"{where}[0]", stats[0], minimum="nonnegative", unit=unit)
    var = number_field(_ARG, f"{where}[1]", stats[1], minimum="nonnegative", unit=unit)
    low = avg - var
    if positive and not low > 0:
        raise ConfigError(_ARG, where, f"avg - var must be > 0 {unit}, got {low!r}")
    return avg, var


def _resolve_types(
    names: Iterable[str], machine_types: Mapping[str, MachineType] | None
) -> dict[str, MachineType]:
    extra = machine_types or {}
    out: dict[str, MachineType] = {}
    for t in names:
        if t in out:
            continue
        if t in extra:
            out[t] = extra[t]
        elif t in DEFAULT_MACHINE_TYPES:
            out[t] = DEFAULT_MACHINE_TYPES[t]
        else:
            known = ", ".join(sorted(set(extra) | set(DEFAULT_MACHINE_TYPES)))
            raise ConfigError(
                _ARG, "machine type", f"unknown machine type {t!r} (known: {known})"
            )
    return out


def _type_counts(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """Round each normalised weight times n, then fix the drift by +-1 cyclically over the types."""
    total = sum(weights.values())
    counts = {t: round(w / total * n) for t, w in weights.items()}
    names = [t for t, w in weights.items() if w > 0]  # never hand nodes to a zero-weight type
    drift = n - sum(counts.values())
    k = 0
    while drift != 0:
        t = names[k % len(names)]
        if drift > 0:
            counts[t] += 1
            drift -= 1
        elif counts[t] > 0:
            counts[t] -= 1
            drift += 1
        k += 1
    return counts


def _draw_link(
    rng: random.Random, bw: tuple[float, float], lat: tuple[float, float], int_threshold: float
) -> tuple[float, float]:
    """One link's (bandwidth bytes/s, latency s): two uniform draws, bandwidth first (as the original).

    The bandwidth is rounded as the original files print it (whole mbps above ``int_threshold``, else
    0.1 mbps above 1e6, else 0.001 mbps); the latency to whole microseconds (the original truncated to
    whole milliseconds, which loses sub-millisecond latencies).
    """
    raw_bw = bw[0] + rng.uniform(-bw[1], bw[1])
    raw_lat = lat[0] + rng.uniform(-lat[1], lat[1])
    mbps = raw_bw / 1e6
    if raw_bw > int_threshold:
        q = Fraction(int(mbps))
    elif raw_bw > 1e6:
        q = Fraction(str(round(mbps, 1)))
    else:
        q = Fraction(str(round(mbps, 3)))
    bandwidth = float(q * 10**6)
    if bandwidth <= 0:  # rounding a tiny draw to zero would make an invalid link: keep the raw draw
        bandwidth = raw_bw
    latency = max(0.0, round(raw_lat, 6))
    return bandwidth, latency


def _check_seed(seed: Any) -> None:
    # The seed is recorded in meta, which must stay TOML-serialisable, so only integers are accepted.
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(_ARG, "seed", f"must be an integer, got {seed!r}")


def _gen_int(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(_ARG, where, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def generate_single_region(
    n: int,
    avg_degree: int,
    type_weights: Mapping[str, float],
    *,
    source_degree: int | None = None,
    sink_degree: int | None = None,
    bandwidth: tuple[float, float] = (1e9, 0.0),
    latency: tuple[float, float] = (1e-3, 0.0),
    slow_bandwidth: tuple[float, float] | None = None,
    slow_latency: tuple[float, float] | None = None,
    fill_with_slow_links: bool = True,
    machine_types: Mapping[str, MachineType] | None = None,
    seed: int,
    name: str | None = None,
) -> ClusterSpec:
    """A random single-region cluster, after Helix's FakeClusterGenerator (docs/original.md §2.3).

    With its own ``random.Random(seed)``: (1) sample ``n*avg_degree//2`` "fast" pairs out of all
    ``C(n, 2)``; (2) sample ``source_degree`` / ``sink_degree`` fast coordinator neighbours (default n);
    (3) type counts = rounded normalised ``type_weights`` times n with the drift fixed, listed in
    ``type_weights`` order and shuffled; (4) per link, bandwidth ~ avg + U(-var, var) (bytes/s) and
    latency ~ avg + U(-var, var) (s), fast or slow stats. With ``fill_with_slow_links`` every missing link
    is present with the slow stats (the graph is complete; slow stats default to the fast ones),
    otherwise only fast links exist. Links are listed source links, sink links, then pairs in
    ``combinations`` order. Same seed -> identical cluster. The draw sequence follows the original's
    structure but the original files are not reproduced bit for bit (different RNG instance, and
    latencies are rounded to microseconds instead of truncated to milliseconds).

    ``machine_types`` supplies definitions for types outside :data:`DEFAULT_MACHINE_TYPES`.
    """
    _check_seed(seed)
    n = _gen_int("n", n, 1, MAX_GENERATED_NODES)
    avg_degree = _gen_int("avg_degree", avg_degree, 0, n - 1)
    source_degree = _gen_int("source_degree", n if source_degree is None else source_degree, 0, n)
    sink_degree = _gen_int("sink_degree", n if sink_degree is None else sink_degree, 0, n)
    bw = _check_stats("bandwidth", bandwidth, positive=True, unit="bytes/s")
    lat = _check_stats("latency", latency, positive=False, unit="s")
    slow_bw = _check_stats(
        "slow_bandwidth", slow_bandwidth if slow_bandwidth is not None else bw, positive=True, unit="bytes/s"
    )
    slow_lat = _check_stats(
        "slow_latency", slow_latency if slow_latency is not None else lat, positive=False, unit="s"
    )
    weights = _check_weights(type_weights)
    types = _resolve_types(weights, machine_types)

    rng = random.Random(seed)
    pairs = list(itertools.combinations(range(n), 2))
    fast_pairs = set(rng.sample(pairs, n * avg_degree // 2))
    fast_src = set(rng.sample(range(n), source_degree))
    fast_snk = set(rng.sample(range(n), sink_degree))
    counts = _type_counts(weights, n)
    type_list = [t for t, c in counts.items() for _ in range(c)]
    rng.shuffle(type_list)
    nodes = tuple(Node(i, t) for i, t in enumerate(type_list))

    # Same bandwidth print rule as the original single-region generator: whole mbps above 10e6.
    threshold = 10e6
    links: list[Link] = []
    ends: list[tuple[NodeRef, NodeRef, bool]] = []
    ends += [(SOURCE, i, i in fast_src) for i in range(n)]
    ends += [(i, SINK, i in fast_snk) for i in range(n)]
    ends += [(i, j, (i, j) in fast_pairs) for i, j in pairs]
    for a, b, fast in ends:
        if not fast and not fill_with_slow_links:
            continue
        bwv, latv = _draw_link(rng, bw if fast else slow_bw, lat if fast else slow_lat, threshold)
        links.append(Link(a, b, bwv, latv, isinstance(a, int) and isinstance(b, int)))

    used = [t for t, c in counts.items() if c > 0]
    spec = ClusterSpec(
        name=name if name is not None else f"single_region_n{n}_seed{seed}",
        machine_types={t: types[t] for t in used},
        nodes=nodes,
        links=tuple(links),
        coordinator_nic_in=DEFAULT_COORDINATOR_NIC_IN,
        coordinator_nic_out=DEFAULT_COORDINATOR_NIC_OUT,
        meta={
            "description": f"{n} nodes, one region, generated by generate_single_region",
            "generator": {
                "kind": "single_region",
                "seed": seed,
                "n": n,
                "avg_degree": avg_degree,
                "source_degree": source_degree,
                "sink_degree": sink_degree,
                "type_weights": dict(weights),
                "bandwidth": list(bw),
                "latency": list(lat),
                "slow_bandwidth": list(slow_bw),
                "slow_latency": list(slow_lat),
                "fill_with_slow_links": fill_with_slow_links,
            },
        },
        source_file=f"<generate_single_region seed={seed}>",
    )
    spec.validate()
    return spec


def _check_weights(type_weights: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(type_weights, Mapping) or not type_weights:
        raise ConfigError(_ARG, "type_weights", f"must be a non-empty mapping, got {type_weights!r}")
    out: dict[str, float] = {}
    for t, w in type_weights.items():
        if not isinstance(t, str):
            raise ConfigError(_ARG, "type_weights", f"type names must be strings, got {t!r}")
        number_field(_ARG, f"type_weights.{t}", w, minimum="nonnegative", unit="(weight)")
        out[t] = w
    if not sum(out.values()) > 0:
        raise ConfigError(_ARG, "type_weights", "weights must not all be zero")
    return out


def generate_partitioned(
    partitions: Sequence[Sequence[str]],
    *,
    in_bandwidth: tuple[float, float] = (1.25e9, 0.125e9),
    in_latency: tuple[float, float] = (1e-3, 0.0),
    cross_bandwidth: tuple[float, float] = (12.5e6, 2.5e6),
    cross_latency: tuple[float, float] = (0.05, 0.01),
    machine_types: Mapping[str, MachineType] | None = None,
    cross_links_per_region: int | None = None,
    seed: int,
    name: str | None = None,
) -> ClusterSpec:
    """A complete multi-region cluster, after Helix's PartitionedClusterGenerator (docs/original.md §2.3).

    ``partitions[k]`` lists the machine types of region ``"region{k}"``; node ids are the concatenation.
    Pair links inside a region use the ``in_*`` stats, pairs across regions the ``cross_*`` stats; the
    coordinator is outside every region, so source and sink links always use the cross stats. Stats are
    (avg, var) for avg + U(-var, var) draws (bytes/s, seconds) from the generator's own
    ``random.Random(seed)``, two draws per link in the order source links, sink links, pairs in
    ``combinations`` order. Defaults are 3cluster24's. Same seed -> identical cluster; the original files
    are not reproduced bit for bit (see :func:`generate_single_region`).

    ``cross_links_per_region`` (None: the complete graph above) makes the cluster sparse, for large
    geo-distributed clusters: pairs inside a region stay complete, but between regions only
    ``cross_links_per_region`` links join each pair of adjacent regions ``(k, k+1)``, plus
    ``(last, first)`` when there are more than two regions (a ring), each between a distinct node pair
    drawn with the generator's RNG (bidirectional links, cross stats). Source and sink links still go
    to every node. The pairs are drawn first, one ``rng.sample`` per adjacent region pair in ring
    order, then the link stats in the order above (pairs ascending). It must be an integer >= 1 and at
    most ``|region k| * |region k+1|`` for every adjacent pair.
    """
    if isinstance(partitions, str) or not isinstance(partitions, Sequence) or not partitions:
        raise ConfigError(
            _ARG, "partitions", f"must be a non-empty list of lists of machine types, got {partitions!r}"
        )
    flat: list[str] = []
    regions: list[str] = []
    for k, part in enumerate(partitions):
        if isinstance(part, str) or not isinstance(part, Sequence) or not part:
            raise ConfigError(
                _ARG, f"partitions[{k}]", f"must be a non-empty list of machine types, got {part!r}"
            )
        for t in part:
            if not isinstance(t, str):
                raise ConfigError(_ARG, f"partitions[{k}]", f"machine types must be strings, got {t!r}")
            flat.append(t)
            regions.append(f"region{k}")
    if len(flat) > MAX_GENERATED_NODES:
        raise ConfigError(_ARG, "partitions", f"{len(flat)} nodes in all, over the limit of {MAX_GENERATED_NODES}")
    _check_seed(seed)
    in_bw = _check_stats("in_bandwidth", in_bandwidth, positive=True, unit="bytes/s")
    in_lat = _check_stats("in_latency", in_latency, positive=False, unit="s")
    x_bw = _check_stats("cross_bandwidth", cross_bandwidth, positive=True, unit="bytes/s")
    x_lat = _check_stats("cross_latency", cross_latency, positive=False, unit="s")
    types = _resolve_types(flat, machine_types)
    sizes = [len(part) for part in partitions]
    ring = _region_ring(len(partitions))
    if cross_links_per_region is not None:
        cross_links_per_region = _check_cross_links(cross_links_per_region, sizes, ring)

    rng = random.Random(seed)
    n = len(flat)
    nodes = tuple(Node(i, t, regions[i]) for i, t in enumerate(flat))
    threshold = 100e6  # the partitioned generator printed whole mbps only above 100e6
    ends: list[tuple[NodeRef, NodeRef, bool]] = []
    ends += [(SOURCE, i, False) for i in range(n)]
    ends += [(i, SINK, False) for i in range(n)]
    if cross_links_per_region is None:
        ends += [(i, j, regions[i] == regions[j]) for i, j in itertools.combinations(range(n), 2)]
    else:
        ends += _sparse_pairs(rng, sizes, ring, cross_links_per_region)
    links: list[Link] = []
    for a, b, inside in ends:
        bwv, latv = _draw_link(rng, in_bw if inside else x_bw, in_lat if inside else x_lat, threshold)
        links.append(Link(a, b, bwv, latv, isinstance(a, int) and isinstance(b, int)))

    generator: dict[str, Any] = {
        "kind": "partitioned",
        "seed": seed,
        "partitions": [list(part) for part in partitions],
        "in_bandwidth": list(in_bw),
        "in_latency": list(in_lat),
        "cross_bandwidth": list(x_bw),
        "cross_latency": list(x_lat),
    }
    default_name = f"partitioned{len(partitions)}_n{n}_seed{seed}"
    if cross_links_per_region is not None:
        generator["cross_links_per_region"] = cross_links_per_region
        default_name = f"partitioned{len(partitions)}_n{n}_x{cross_links_per_region}_seed{seed}"
    spec = ClusterSpec(
        name=name if name is not None else default_name,
        machine_types=types,
        nodes=nodes,
        links=tuple(links),
        coordinator_nic_in=DEFAULT_COORDINATOR_NIC_IN,
        coordinator_nic_out=DEFAULT_COORDINATOR_NIC_OUT,
        meta={
            "description": f"{n} nodes in {len(partitions)} regions, generated by generate_partitioned",
            "generator": generator,
        },
        source_file=f"<generate_partitioned seed={seed}>",
    )
    spec.validate()
    return spec



def _region_ring(num_regions: int) -> list[tuple[int, int]]:
    """Adjacent region pairs (k, k+1), closed into a ring (last, first) when there are > 2 regions."""
    pairs = [(k, k + 1) for k in range(num_regions - 1)]
    if num_regions > 2:
        pairs.append((num_regions - 1, 0))
    return pairs


def _check_cross_links(value: Any, sizes: Sequence[int], ring: Sequence[tuple[int, int]]) -> int:
    where = "cross_links_per_region"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(_ARG, where, f"must be an integer >= 1 or None, got {value!r}")
    for k, m in ring:
        room = sizes[k] * sizes[m]
        if value > room:
            raise ConfigError(
                _ARG,
                where,
                f"{value} links between region{k} ({sizes[k]} nodes) and region{m} ({sizes[m]} nodes), "
                f"which have only {room} distinct node pairs",
            )
    return value


def _sparse_pairs(
    rng: random.Random, sizes: Sequence[int], ring: Sequence[tuple[int, int]], per_pair: int
) -> list[tuple[NodeRef, NodeRef, bool]]:
    """Node pairs (i < j, ascending) of a sparse partitioned cluster, flagged inside a region or not.

    Every pair inside a region, plus ``per_pair`` distinct cross pairs per adjacent region pair of
    ``ring``, drawn in ring order (one ``rng.sample`` over the ``|A| * |B|`` pairs each).
    """
    starts = list(itertools.accumulate(sizes, initial=0))
    partners: list[list[int]] = [[] for _ in range(starts[-1])]
    for k, m in ring:
        size_m = sizes[m]
        for code in rng.sample(range(sizes[k] * size_m), per_pair):
            u = starts[k] + code // size_m
            v = starts[m] + code % size_m
            i, j = (u, v) if u < v else (v, u)
            partners[i].append(j)
    out: list[tuple[NodeRef, NodeRef, bool]] = []
    for k, size in enumerate(sizes):
        end = starts[k] + size
        for i in range(starts[k], end):
            out += [(i, j, True) for j in range(i + 1, end)]
            out += [(i, j, False) for j in sorted(partners[i])]
    return out
