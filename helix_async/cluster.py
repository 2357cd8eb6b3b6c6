"""Cluster topology: machine types, compute nodes and network links, their files and generators.

A cluster is a set of compute nodes ``0..N-1`` plus a coordinator that is split, as in Helix, into a
send side (:data:`SOURCE`, which feeds prompts into the cluster) and a receive side (:data:`SINK`, which
collects generated tokens). Links join two compute nodes (usable both ways, as in the original cluster
files) or join the coordinator and one node (one-directional: ``source -> i`` or ``i -> sink``).

Units everywhere: bandwidths, NIC and disk speeds in bytes/s, VRAM in bytes, latencies in seconds. The
original Helix files write bandwidths as ``X * mbps`` with ``mbps = 1e6`` and the simulator uses the
resulting number as bytes/s; we keep that reading (``1000 * mbps`` = 1e9 bytes/s).

Files:

* our TOML format (:func:`read_cluster_toml`, :func:`write_cluster_toml`), a superset of the shipped
  conversions in ``helix_async/data/clusters/*.toml``::

      [meta]                       # free-form; name, description, ...
      [coordinator]                # optional: nic_in, nic_out (bytes/s)
      [machine_types.NAME]         # optional: num_gpus, vram_bytes, nic_in, nic_out, disk, gpu
      [[nodes]]   id, type, region (optional, default "default")
      [[links]]   a, b, bidirectional (optional), bandwidth, latency   # a/b: node id, "source" or "sink"

  Machine-type fields that a file leaves out come from :data:`DEFAULT_MACHINE_TYPES`. The ``meta`` keys
  ``name``, ``num_compute_nodes``, ``source_connected`` and ``sink_connected`` are reserved: the reader
  checks the last three against the links and drops them (they are derived), the writer regenerates them.

  **Regions of the shipped files.** The shipped TOML conversions carry no ``region`` fields. When a file
  has no explicit region on any node, the reader looks for the original generator header kept in the
  comments (``# partition-k: ['A100', ...]`` lines, written by Helix's PartitionedClusterGenerator) and,
  if the concatenated partitions match the node types in order, names the regions ``region0``,
  ``region1``, ... That is how ``load_cluster("3cluster24")`` gets its three regions without editing the
  shipped data; every other file without regions gets the single region ``"default"``. The writer
  always writes explicit regions (when not ``"default"``), so files we write never depend on comments.

* the original Helix INI files (:func:`import_helix_ini`, :func:`read_machine_profile_ini`), whose values
  are unit expressions such as ``1000 * mbps``; :func:`eval_unit_expr` evaluates them with a small
  whitelisting evaluator (numbers, unit names, ``+ - * /``), never with :func:`eval`.
"""

from __future__ import annotations

import ast
import configparser
import csv
import dataclasses
import itertools
import math
import os
import random
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

import tomli_w

from helix_async.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "SOURCE",
    "SINK",
    "NodeRef",
    "UNITS",
    "MachineType",
    "MachineProfile",
    "Node",
    "Link",
    "Arc",
    "ClusterSpec",
    "DEFAULT_MACHINE_TYPES",
    "DEFAULT_COORDINATOR_NIC_IN",
    "DEFAULT_COORDINATOR_NIC_OUT",
    "BUILTIN_CLUSTERS",
    "load_cluster",
    "read_cluster_toml",
    "write_cluster_toml",
    "cluster_to_toml_dict",
    "cluster_from_toml_dict",
    "import_helix_ini",
    "read_machine_profile_ini",
    "eval_unit_expr",
    "generate_single_region",
    "generate_partitioned",
]

SOURCE = "source"  # coordinator, send side: prompts enter the cluster here
SINK = "sink"  # coordinator, receive side: generated tokens leave the cluster here

NodeRef: TypeAlias = int | str  # compute node id (0..N-1), SOURCE or SINK

_DATA_DIR = Path(__file__).resolve().parent / "data"
_CLUSTER_DIR = _DATA_DIR / "clusters"
_MACHINES_CSV = _DATA_DIR / "profiles" / "machines.csv"

# Unit multipliers of the original files (HELIX_SPEC §0). Exact fractions, so that "14.2 * mbps" gives
# exactly the float 14200000.0 that the TOML conversions store (float arithmetic would be off by an ulp).
UNITS: Mapping[str, Fraction] = MappingProxyType(
    {
        "kbps": Fraction(10**3),
        "mbps": Fraction(10**6),
        "gbps": Fraction(10**9),
        "KB": Fraction(10**3),
        "MB": Fraction(10**6),
        "GB": Fraction(10**9),
        "Byte": Fraction(1),
        "Sec": Fraction(1),
        "MilliSec": Fraction(1, 1000),
    }
)

DEFAULT_REGION = "default"


# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MachineType:
    """One kind of machine.

    ``vram_bytes`` is the total GPU memory of the machine (bytes), ``nic_in`` / ``nic_out`` its inbound and
    outbound NIC speeds and ``disk`` its disk read speed (all bytes/s). ``gpu`` is the key of the
    per-layer latency tables in ``data/profiles``; left empty it defaults to ``name.lower()``
    (``"L4x2"`` -> ``"l4x2"``).
    """

    name: str
    num_gpus: int
    vram_bytes: float
    nic_in: float
    nic_out: float
    disk: float
    gpu: str = ""

    def __post_init__(self) -> None:
        if not self.gpu and isinstance(self.name, str):
            object.__setattr__(self, "gpu", self.name.lower())


class MachineProfile(dict[str, MachineType]):
    """Machine types read from a Helix machine-profile INI, plus the coordinator NIC speeds (bytes/s).

    A plain ``dict`` of name -> :class:`MachineType` with two extra attributes, taken from the
    ``[SinkNode] inbound_nic_speed`` and ``[SourceNode] outbound_nic_speed`` entries.
    """

    def __init__(
        self,
        types: Mapping[str, MachineType] | Iterable[tuple[str, MachineType]] = (),
        *,
        coordinator_nic_in: float = 1e10,
        coordinator_nic_out: float = 1e10,
    ) -> None:
        super().__init__(types)
        self.coordinator_nic_in = coordinator_nic_in
        self.coordinator_nic_out = coordinator_nic_out


@dataclass(frozen=True, slots=True)
class Node:
    """A compute node: its id (0..N-1), machine type name and region name."""

    id: int
    machine_type: str
    region: str = DEFAULT_REGION


@dataclass(frozen=True, slots=True)
class Link:
    """One physical link.

    ``bandwidth`` in bytes/s (> 0), ``latency`` in seconds (>= 0). Links between two compute nodes are
    normally ``bidirectional`` (each direction gets the full bandwidth, as in the Helix simulator); links
    ``SOURCE -> i`` and ``i -> SINK`` are one-directional.
    """

    a: NodeRef
    b: NodeRef
    bandwidth: float
    latency: float
    bidirectional: bool


@dataclass(frozen=True, slots=True)
class Arc:
    """One usable direction of a link: ``src`` (SOURCE or a node id) -> ``dst`` (a node id or SINK)."""

    src: NodeRef
    dst: NodeRef
    bandwidth: float  # bytes/s
    latency: float  # seconds


@dataclass(frozen=True)
class _ArcIndex:
    arcs: tuple[Arc, ...]
    out: dict[NodeRef, tuple[Arc, ...]]
    inc: dict[NodeRef, tuple[Arc, ...]]
    by_pair: dict[tuple[NodeRef, NodeRef], Arc]


def _link_arcs(link: Link) -> tuple[Arc, ...]:
    """The directed arcs one link provides (two for a bidirectional pair link, else one)."""
    fwd = Arc(link.a, link.b, link.bandwidth, link.latency)
    if link.bidirectional:
        return (fwd, Arc(link.b, link.a, link.bandwidth, link.latency))
    return (fwd,)


@dataclass(frozen=True)
class ClusterSpec:
    """A complete cluster description (nodes, machine types, links, coordinator NICs).

    ``nodes[i].id == i`` for every i. ``coordinator_nic_in`` is the sink-side NIC and
    ``coordinator_nic_out`` the source-side NIC of the coordinator (bytes/s). ``meta`` is free-form,
    TOML-serialisable data (description, generator arguments, ...). ``source_file`` names where the spec
    came from; it is provenance only and takes no part in equality, so ``read(write(x)) == x``.
    """

    name: str
    machine_types: Mapping[str, MachineType]
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    coordinator_nic_in: float = 1e10
    coordinator_nic_out: float = 1e10
    meta: Mapping[str, Any] = field(default_factory=dict)
    source_file: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        # Normalise containers so that equality does not depend on whether a caller passed lists/tuples or
        # a dict/mappingproxy. The object is frozen, hence object.__setattr__.
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "links", tuple(self.links))
        object.__setattr__(self, "machine_types", dict(self.machine_types))
        object.__setattr__(self, "meta", dict(self.meta))

    def __hash__(self) -> int:
        # The generated hash would fail on the dict fields; hash the hashable ones instead (equal specs
        # have equal values there, so this agrees with __eq__), which lets specs key caches.
        return hash((self.name, self.nodes, self.links, self.coordinator_nic_in, self.coordinator_nic_out))

    # ---- queries ---------------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        """Number of compute nodes N (the coordinator is not counted)."""
        return len(self.nodes)

    def machine(self, node_id: int) -> MachineType:
        """The machine type of compute node ``node_id``."""
        if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id < len(self.nodes):
            raise IndexError(
                f"no compute node {node_id!r} in cluster {self.name!r} ({len(self.nodes)} nodes)"
            )
        return self.machine_types[self.nodes[node_id].machine_type]

    @cached_property
    def _index(self) -> _ArcIndex:
        # Computed once per (immutable) spec; cached_property writes to __dict__ directly, which a frozen
        # dataclass permits, and it takes no part in equality or repr.
        src_arcs: list[Arc] = []
        pair_arcs: list[Arc] = []
        sink_arcs: list[Arc] = []
        for link in self.links:
            for arc in _link_arcs(link):
                if arc.src == SOURCE:
                    src_arcs.append(arc)
                elif arc.dst == SINK:
                    sink_arcs.append(arc)
                else:
                    pair_arcs.append(arc)
        src_arcs.sort(key=lambda a: _ref_sort_key(a.dst))
        sink_arcs.sort(key=lambda a: _ref_sort_key(a.src))
        arcs = tuple(src_arcs + pair_arcs + sink_arcs)
        out: dict[NodeRef, list[Arc]] = {}
        inc: dict[NodeRef, list[Arc]] = {}
        by_pair: dict[tuple[NodeRef, NodeRef], Arc] = {}
        for arc in arcs:
            out.setdefault(arc.src, []).append(arc)
            inc.setdefault(arc.dst, []).append(arc)
            by_pair.setdefault((arc.src, arc.dst), arc)
        return _ArcIndex(
            arcs,
            {k: tuple(v) for k, v in out.items()},
            {k: tuple(v) for k, v in inc.items()},
            by_pair,
        )

    def arcs(self) -> tuple[Arc, ...]:
        """All directed arcs: SOURCE->i (by i), pair-link directions (in link order, a->b before b->a),
        then i->SINK (by i)."""
        return self._index.arcs

    def out_arcs(self, u: NodeRef) -> tuple[Arc, ...]:
        """Arcs leaving ``u`` (in :meth:`arcs` order); empty for SINK or an unknown node."""
        return self._index.out.get(u, ())

    def in_arcs(self, v: NodeRef) -> tuple[Arc, ...]:
        """Arcs entering ``v`` (in :meth:`arcs` order); empty for SOURCE or an unknown node."""
        return self._index.inc.get(v, ())

    def arc(self, u: NodeRef, v: NodeRef) -> Arc | None:
        """The arc ``u -> v``, or None when no link provides that direction."""
        return self._index.by_pair.get((u, v))

    def machine_counts(self) -> dict[str, int]:
        """Machine type name -> number of nodes of that type, in order of first appearance."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.machine_type] = counts.get(node.machine_type, 0) + 1
        return counts

    def regions(self) -> dict[str, list[int]]:
        """Region name -> node ids (ascending), regions in order of first appearance."""
        out: dict[str, list[int]] = {}
        for node in self.nodes:
            out.setdefault(node.region, []).append(node.id)
        return out

    def is_complete(self) -> bool:
        """True when SOURCE reaches every node, every node reaches SINK, and every ordered pair of
        distinct nodes has an arc (what Helix's heuristic placements require)."""
        by_pair = self._index.by_pair
        n = len(self.nodes)
        if any((SOURCE, i) not in by_pair or (i, SINK) not in by_pair for i in range(n)):
            return False
        return all((i, j) in by_pair for i in range(n) for j in range(n) if i != j)

    # ---- validation ------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check the whole spec; raise :class:`ConfigError` naming ``source_file`` and the bad field.

        Checks: name; coordinator NICs; every machine type (finite, positive numbers, key == name); node
        ids exactly 0..N-1 without duplicates, known machine types, region names; links: endpoints known,
        no self-loops, nothing leaves the sink or enters the source, coordinator links one-directional,
        bandwidth finite and > 0, latency finite and >= 0, no two links providing the same arc; reserved
        meta keys absent.
        """
        src = self.source_file
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(src, "name", f"must be a non-empty string, got {self.name!r}")
        _check_number(src, "coordinator.nic_in", self.coordinator_nic_in, minimum="positive", unit="bytes/s")
        _check_number(
            src, "coordinator.nic_out", self.coordinator_nic_out, minimum="positive", unit="bytes/s"
        )
        for key in _RESERVED_META:
            if key in self.meta:
                raise ConfigError(src, f"meta.{key}", "reserved key (derived from the cluster itself)")

        for key, mt in self.machine_types.items():
            _validate_machine_type(src, key, mt)

        if not self.nodes:
            raise ConfigError(src, "nodes", "a cluster needs at least one compute node")
        seen_ids: dict[int, int] = {}
        for i, node in enumerate(self.nodes):
            where = f"nodes[{i}]"
            if not isinstance(node, Node):
                raise ConfigError(src, where, f"expected a Node, got {type(node).__name__}")
            if isinstance(node.id, bool) or not isinstance(node.id, int):
                raise ConfigError(src, f"{where}.id", f"must be an integer, got {node.id!r}")
            if node.id in seen_ids:
                raise ConfigError(
                    src, f"{where}.id", f"duplicate node id {node.id} (also nodes[{seen_ids[node.id]}])"
                )
            seen_ids[node.id] = i
            if node.id != i:
                raise ConfigError(
                    src, f"{where}.id", f"node ids must be 0..N-1 in order: expected {i}, got {node.id}"
                )
            if not isinstance(node.machine_type, str):
                raise ConfigError(src, f"{where}.type", f"must be a string, got {node.machine_type!r}")
            if node.machine_type not in self.machine_types:
                known = ", ".join(sorted(set(self.machine_types) | set(DEFAULT_MACHINE_TYPES)))
                raise ConfigError(
                    src,
                    f"{where}.type",
                    f"unknown machine type {node.machine_type!r} (define it under [machine_types]; known: {known})",
                )
            if not isinstance(node.region, str) or not node.region:
                raise ConfigError(src, f"{where}.region", f"must be a non-empty string, got {node.region!r}")

        n = len(self.nodes)
        arc_owner: dict[tuple[NodeRef, NodeRef], int] = {}
        for k, link in enumerate(self.links):
            where = f"links[{k}]"
            if not isinstance(link, Link):
                raise ConfigError(src, where, f"expected a Link, got {type(link).__name__}")
            _check_ref(src, f"{where}.a", link.a, n)
            _check_ref(src, f"{where}.b", link.b, n)
            if link.a == SINK:
                raise ConfigError(
                    src, f"{where}.a", "a link cannot leave the sink (coordinator receive side)"
                )
            if link.b == SOURCE:
                raise ConfigError(src, f"{where}.b", "a link cannot enter the source (coordinator send side)")
            if link.a == SOURCE and link.b == SINK:
                raise ConfigError(src, f"{where}.b", "the source cannot link directly to the sink")
            if link.a == link.b:
                raise ConfigError(src, f"{where}.b", f"self-loop on node {link.a!r}")
            if not isinstance(link.bidirectional, bool):
                raise ConfigError(
                    src, f"{where}.bidirectional", f"must be true or false, got {link.bidirectional!r}"
                )
            if link.bidirectional and (isinstance(link.a, str) or isinstance(link.b, str)):
                raise ConfigError(
                    src,
                    f"{where}.bidirectional",
                    "links to the coordinator (source/sink) are one-directional",
                )
            _check_number(src, f"{where}.bandwidth", link.bandwidth, minimum="positive", unit="bytes/s")
            _check_number(src, f"{where}.latency", link.latency, minimum="nonnegative", unit="s")
            for arc in _link_arcs(link):
                pair = (arc.src, arc.dst)
                if pair in arc_owner:
                    raise ConfigError(
                        src,
                        where,
                        f"duplicate link between {link.a!r} and {link.b!r} (already given by links[{arc_owner[pair]}])",
                    )
                arc_owner[pair] = k

    # ---- derivation ------------------------------------------------------------------------------

    def subcluster(self, node_ids: Iterable[int], name: str | None = None) -> ClusterSpec:
        """The cluster induced by ``node_ids``, re-indexed ``0..k-1`` in the order given.

        Keeps the links among the chosen nodes and their source/sink links (values unchanged), their
        regions and the machine types they use. ``meta`` records the parent name and the parent ids
        (``meta["parent_node_ids"][new_id] == old_id``).
        """
        ids = list(node_ids)
        n = len(self.nodes)
        new_of: dict[int, int] = {}
        for pos, old in enumerate(ids):
            if isinstance(old, bool) or not isinstance(old, int) or not 0 <= old < n:
                raise ConfigError(
                    "<argument>", f"node_ids[{pos}]", f"unknown node {old!r} (cluster has nodes 0..{n - 1})"
                )
            if old in new_of:
                raise ConfigError("<argument>", f"node_ids[{pos}]", f"duplicate node id {old}")
            new_of[old] = pos
        if not ids:
            raise ConfigError("<argument>", "node_ids", "a sub-cluster needs at least one node")

        def remap(ref: NodeRef) -> NodeRef:
            return ref if isinstance(ref, str) else new_of[ref]

        nodes = tuple(Node(new_of[old], self.nodes[old].machine_type, self.nodes[old].region) for old in ids)
        links = tuple(
            Link(remap(lk.a), remap(lk.b), lk.bandwidth, lk.latency, lk.bidirectional)
            for lk in self.links
            if (isinstance(lk.a, str) or lk.a in new_of) and (isinstance(lk.b, str) or lk.b in new_of)
        )
        used = {node.machine_type for node in nodes}
        spec = ClusterSpec(
            name=name if name is not None else f"{self.name}_sub",
            machine_types={k: v for k, v in self.machine_types.items() if k in used},
            nodes=nodes,
            links=links,
            coordinator_nic_in=self.coordinator_nic_in,
            coordinator_nic_out=self.coordinator_nic_out,
            meta={"parent": self.name, "parent_node_ids": ids},
            source_file=self.source_file,
        )
        spec.validate()
        return spec


_RESERVED_META = ("name", "num_compute_nodes", "source_connected", "sink_connected")


def _ref_sort_key(ref: NodeRef) -> tuple[int, int]:
    return (0, ref) if isinstance(ref, int) else (1, 0)


# --------------------------------------------------------------------------------------------------
# Checks shared by the loaders and validate()
# --------------------------------------------------------------------------------------------------


def _check_number(source: str, where: str, value: Any, *, minimum: str, unit: str) -> float:
    """Check ``value`` is a finite real number satisfying ``minimum`` ("positive" / "nonnegative").

    The error message shows the value as given (``got -5``, not ``got -5.0``). Returns it as float.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(source, where, f"must be a number ({unit}), got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(source, where, f"must be finite, got {value!r}")
    if minimum == "positive" and not value > 0:
        raise ConfigError(source, where, f"must be > 0 {unit}, got {value!r}")
    if minimum == "nonnegative" and not value >= 0:
        raise ConfigError(source, where, f"must be >= 0 {unit}, got {value!r}")
    return float(value)


def _check_ref(source: str, where: str, ref: Any, n: int) -> None:
    if isinstance(ref, str):
        if ref not in (SOURCE, SINK):
            raise ConfigError(
                source, where, f"unknown endpoint {ref!r} (expected a node id, {SOURCE!r} or {SINK!r})"
            )
        return
    if isinstance(ref, bool) or not isinstance(ref, int):
        raise ConfigError(source, where, f"must be a node id or {SOURCE!r}/{SINK!r}, got {ref!r}")
    if not 0 <= ref < n:
        raise ConfigError(source, where, f"link to unknown node {ref} (cluster has nodes 0..{n - 1})")


def _validate_machine_type(source: str, key: str, mt: Any) -> None:
    where = f"machine_types.{key}"
    if not isinstance(mt, MachineType):
        raise ConfigError(source, where, f"expected a MachineType, got {type(mt).__name__}")
    if mt.name != key:
        raise ConfigError(source, f"{where}.name", f"must equal the key {key!r}, got {mt.name!r}")
    if isinstance(mt.num_gpus, bool) or not isinstance(mt.num_gpus, int) or mt.num_gpus < 1:
        raise ConfigError(source, f"{where}.num_gpus", f"must be an integer >= 1, got {mt.num_gpus!r}")
    _check_number(source, f"{where}.vram_bytes", mt.vram_bytes, minimum="positive", unit="bytes")
    _check_number(source, f"{where}.nic_in", mt.nic_in, minimum="positive", unit="bytes/s")
    _check_number(source, f"{where}.nic_out", mt.nic_out, minimum="positive", unit="bytes/s")
    _check_number(source, f"{where}.disk", mt.disk, minimum="positive", unit="bytes/s")
    if not isinstance(mt.gpu, str) or not mt.gpu:
        raise ConfigError(source, f"{where}.gpu", f"must be a non-empty string, got {mt.gpu!r}")


# --------------------------------------------------------------------------------------------------
# Default machine types (data/profiles/machines.csv)
# --------------------------------------------------------------------------------------------------


def _load_default_machines() -> tuple[dict[str, MachineType], float, float]:
    types: dict[str, MachineType] = {}
    nic_in = nic_out = 1e10
    with _MACHINES_CSV.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name = row["machine_type"]
            if name == "SourceNode":
                nic_out = float(row["outbound_nic_bytes_per_s"])
            elif name == "SinkNode":
                nic_in = float(row["inbound_nic_bytes_per_s"])
            else:
                types[name] = MachineType(
                    name=name,
                    num_gpus=int(row["num_gpus"]),
                    vram_bytes=float(row["vram_bytes"]),
                    nic_in=float(row["inbound_nic_bytes_per_s"]),
                    nic_out=float(row["outbound_nic_bytes_per_s"]),
                    disk=float(row["disk_bytes_per_s"]),
                )
    return types, nic_in, nic_out


_defaults, DEFAULT_COORDINATOR_NIC_IN, DEFAULT_COORDINATOR_NIC_OUT = _load_default_machines()
DEFAULT_MACHINE_TYPES: Mapping[str, MachineType] = MappingProxyType(_defaults)
del _defaults

BUILTIN_CLUSTERS: tuple[str, ...] = (
    "single24",
    "3cluster24",
    "cluster42",
    "cluster10",
    "single_a100",
    "single_l4",
    "single_t4",
    "dist_a100",
    "dist_l4",
    "dist_t4",
)


# --------------------------------------------------------------------------------------------------
# Safe unit expressions ("1000 * mbps", "1 * MilliSec", "16 * GB")
# --------------------------------------------------------------------------------------------------

_MAX_EXPR_LEN = 200  # the original files never need more; bounds the work on hostile input


def eval_unit_expr(text: str, *, source: str = "<argument>", field: str = "") -> float:
    """Evaluate a Helix unit expression such as ``"12.5 * mbps"`` to a float (bytes, bytes/s or s).

    Only numeric literals, the unit names of :data:`UNITS`, unary ``+``/``-`` and binary ``+ - * /`` are
    accepted; anything else (calls, attributes, other names, ``**``) raises :class:`ConfigError`. The
    arithmetic is exact (fractions) and rounded once at the end, so ``14.2 * mbps == 14200000.0``.
    """
    if not isinstance(text, str):
        raise ConfigError(source, field, f"expected an expression string, got {text!r}")
    stripped = text.strip()
    if not stripped:
        raise ConfigError(source, field, "empty value")
    if len(stripped) > _MAX_EXPR_LEN:
        raise ConfigError(source, field, f"expression longer than {_MAX_EXPR_LEN} characters")
    try:
        tree = ast.parse(stripped, mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(source, field, f"cannot parse {stripped!r} as a unit expression") from exc

    def reject(node: ast.AST) -> ConfigError:
        return ConfigError(
            source,
            field,
            f"unsupported expression {ast.unparse(node)!r} in {stripped!r} "
            f"(allowed: numbers, {', '.join(UNITS)}, + - * /)",
        )

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise ConfigError(source, field, f"number out of range in {stripped!r}")
                # repr() gives the shortest decimal that round-trips, i.e. the literal as written.
                return Fraction(repr(value))
            assert isinstance(value, int)
            return Fraction(value)
        if isinstance(node, ast.Name) and node.id in UNITS:
            return UNITS[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            val = ev(node.operand)
            return -val if isinstance(node.op, ast.USub) else val
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ConfigError(source, field, f"division by zero in {stripped!r}")
            return left / right
        raise reject(node)

    result = ev(tree)
    try:
        return float(result)
    except OverflowError as exc:
        raise ConfigError(source, field, f"value out of range in {stripped!r}") from exc


# --------------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            str(path), "", f"no such file (built-in clusters: {', '.join(BUILTIN_CLUSTERS)})"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot read file: {exc}") from exc


_PARTITION_RE = re.compile(r"^[ \t]*#[ \t]*partition-(\d+)[ \t]*:[ \t]*(\[[^\n]*\])[ \t]*$", re.MULTILINE)


def _header_partitions(text: str) -> list[list[str]] | None:
    """Partition lists from a Helix generator header kept in comments (``# partition-k: [...]``).

    Returns None when there are none or they are malformed (comments are best effort, never an error).
    """
    parts: list[list[str]] = []
    for k, match in enumerate(_PARTITION_RE.finditer(text)):
        if int(match.group(1)) != k:
            return None
        try:
            value = ast.literal_eval(match.group(2))
        except Exception:  # best effort: any unparsable header means "no regions"
            return None
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            return None
        parts.append(value)
    return parts or None


def _apply_header_regions(spec: ClusterSpec, text: str) -> ClusterSpec:
    """Name regions from the header partitions when the file itself gives none (see module doc)."""
    if any(node.region != DEFAULT_REGION for node in spec.nodes):
        return spec
    parts = _header_partitions(text)
    if parts is None:
        return spec
    regions = [f"region{k}" for k, part in enumerate(parts) for _ in part]
    flat = [t for part in parts for t in part]
    if flat != [node.machine_type for node in spec.nodes]:
        return spec  # header describes some other cluster (e.g. a sub-cluster copy): ignore it
    nodes = tuple(Node(node.id, node.machine_type, regions[node.id]) for node in spec.nodes)
    return dataclasses.replace(spec, nodes=nodes)


# --------------------------------------------------------------------------------------------------
# TOML
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = ("meta", "coordinator", "machine_types", "nodes", "links")
_MACHINE_KEYS = ("num_gpus", "vram_bytes", "nic_in", "nic_out", "disk", "gpu")
_NODE_KEYS = ("id", "type", "region")
_LINK_KEYS = ("a", "b", "bidirectional", "bandwidth", "latency")


def _table(source: str, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(source, where, f"must be a table, got {type(value).__name__}")
    return value


def _no_unknown_keys(source: str, where: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                source, f"{prefix}{key}", f"unknown field (expected one of: {', '.join(allowed)})"
            )


def _required(source: str, where: str, table: Mapping[str, Any], key: str) -> Any:
    if key not in table:
        raise ConfigError(source, f"{where}.{key}", "missing required field")
    return table[key]


def _int_field(source: str, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(source, where, f"must be an integer, got {value!r}")
    return value


def _str_field(source: str, where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(source, where, f"must be a string, got {value!r}")
    return value


def _ref_field(source: str, where: str, value: Any) -> NodeRef:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(source, where, f"must be a node id or {SOURCE!r}/{SINK!r}, got {value!r}")
    return value


def _machine_type_from_table(source: str, name: str, table: Mapping[str, Any]) -> MachineType:
    where = f"machine_types.{name}"
    _no_unknown_keys(source, where, table, _MACHINE_KEYS)
    base = DEFAULT_MACHINE_TYPES.get(name)

    def get(key: str) -> Any:
        if key in table:
            return table[key]
        if base is None:
            raise ConfigError(
                source, f"{where}.{key}", f"missing required field ({name!r} is not a built-in machine type)"
            )
        return getattr(base, key)

    gpu = table.get("gpu", base.gpu if base is not None else "")
    mt = MachineType(
        name=name,
        num_gpus=_int_field(source, f"{where}.num_gpus", get("num_gpus")),
        vram_bytes=_check_number(
            source, f"{where}.vram_bytes", get("vram_bytes"), minimum="positive", unit="bytes"
        ),
        nic_in=_check_number(source, f"{where}.nic_in", get("nic_in"), minimum="positive", unit="bytes/s"),
        nic_out=_check_number(source, f"{where}.nic_out", get("nic_out"), minimum="positive", unit="bytes/s"),
        disk=_check_number(source, f"{where}.disk", get("disk"), minimum="positive", unit="bytes/s"),
        gpu=_str_field(source, f"{where}.gpu", gpu),
    )
    _validate_machine_type(source, name, mt)
    return mt


def cluster_from_toml_dict(d: Mapping[str, Any], source: str) -> ClusterSpec:
    """Build and validate a :class:`ClusterSpec` from parsed TOML (see the module doc for the layout).

    ``source`` names the file in error messages and becomes ``source_file``. Header-comment regions are
    not applied here (a dict has no comments); :func:`read_cluster_toml` does that.
    """
    _no_unknown_keys(source, "", d, _TOP_KEYS)

    meta = dict(_table(source, "meta", d.get("meta", {})))
    fallback_name = Path(source).stem if not source.startswith("<") else "cluster"
    name = _str_field(source, "meta.name", meta.pop("name", fallback_name))
    derived = {key: meta.pop(key) for key in _RESERVED_META[1:] if key in meta}

    coord = _table(source, "coordinator", d.get("coordinator", {}))
    _no_unknown_keys(source, "coordinator", coord, ("nic_in", "nic_out"))
    nic_in = _check_number(
        source,
        "coordinator.nic_in",
        coord.get("nic_in", DEFAULT_COORDINATOR_NIC_IN),
        minimum="positive",
        unit="bytes/s",
    )
    nic_out = _check_number(
        source,
        "coordinator.nic_out",
        coord.get("nic_out", DEFAULT_COORDINATOR_NIC_OUT),
        minimum="positive",
        unit="bytes/s",
    )

    machine_types: dict[str, MachineType] = {}
    for mname, mtable in _table(source, "machine_types", d.get("machine_types", {})).items():
        machine_types[mname] = _machine_type_from_table(
            source, mname, _table(source, f"machine_types.{mname}", mtable)
        )

    raw_nodes = d.get("nodes")
    if raw_nodes is None:
        raise ConfigError(source, "nodes", "missing required field (an array of [[nodes]] tables)")
    if not isinstance(raw_nodes, list):
        raise ConfigError(source, "nodes", f"must be an array of tables, got {type(raw_nodes).__name__}")
    nodes: list[Node] = []
    for i, raw in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        table = _table(source, where, raw)
        _no_unknown_keys(source, where, table, _NODE_KEYS)
        node_id = _int_field(source, f"{where}.id", _required(source, where, table, "id"))
        mtype = _str_field(source, f"{where}.type", _required(source, where, table, "type"))
        region = _str_field(source, f"{where}.region", table.get("region", DEFAULT_REGION))
        nodes.append(Node(node_id, mtype, region))
        # A type the file does not define comes from the defaults; an unknown one stays missing and
        # validate() reports it against this node.
        if mtype not in machine_types and mtype in DEFAULT_MACHINE_TYPES:
            machine_types[mtype] = DEFAULT_MACHINE_TYPES[mtype]

    raw_links = d.get("links", [])
    if not isinstance(raw_links, list):
        raise ConfigError(source, "links", f"must be an array of tables, got {type(raw_links).__name__}")
    links: list[Link] = []
    for k, raw in enumerate(raw_links):
        where = f"links[{k}]"
        table = _table(source, where, raw)
        _no_unknown_keys(source, where, table, _LINK_KEYS)
        a = _ref_field(source, f"{where}.a", _required(source, where, table, "a"))
        b = _ref_field(source, f"{where}.b", _required(source, where, table, "b"))
        bandwidth = _check_number(
            source,
            f"{where}.bandwidth",
            _required(source, where, table, "bandwidth"),
            minimum="positive",
            unit="bytes/s",
        )
        latency = _check_number(
            source,
            f"{where}.latency",
            _required(source, where, table, "latency"),
            minimum="nonnegative",
            unit="s",
        )
        # Omitted direction: pair links are physical two-way links, coordinator links are one-way.
        default_bidir = isinstance(a, int) and isinstance(b, int)
        bidirectional = table.get("bidirectional", default_bidir)
        if not isinstance(bidirectional, bool):
            raise ConfigError(
                source, f"{where}.bidirectional", f"must be true or false, got {bidirectional!r}"
            )
        links.append(Link(a, b, bandwidth, latency, bidirectional))

    spec = ClusterSpec(
        name=name,
        machine_types=machine_types,
        nodes=tuple(nodes),
        links=tuple(links),
        coordinator_nic_in=nic_in,
        coordinator_nic_out=nic_out,
        meta=meta,
        source_file=source,
    )
    spec.validate()
    _check_derived_meta(spec, derived)
    return spec


def _connected(spec: ClusterSpec) -> tuple[list[int], list[int]]:
    """Node ids with a SOURCE->i arc and with an i->SINK arc (ascending)."""
    src = sorted(a.dst for a in spec.out_arcs(SOURCE) if isinstance(a.dst, int))
    snk = sorted(a.src for a in spec.in_arcs(SINK) if isinstance(a.src, int))
    return src, snk


def _check_derived_meta(spec: ClusterSpec, derived: Mapping[str, Any]) -> None:
    """The shipped files repeat N and the coordinator's neighbours in [meta]; they must agree."""
    src = spec.source_file
    if "num_compute_nodes" in derived and derived["num_compute_nodes"] != spec.num_nodes:
        raise ConfigError(
            src,
            "meta.num_compute_nodes",
            f"says {derived['num_compute_nodes']!r} but the file has {spec.num_nodes} nodes",
        )
    source_ids, sink_ids = _connected(spec)
    for key, actual in (("source_connected", source_ids), ("sink_connected", sink_ids)):
        if key not in derived:
            continue
        listed = derived[key]
        if not isinstance(listed, list) or sorted(listed, key=repr) != sorted(actual, key=repr):
            raise ConfigError(src, f"meta.{key}", f"lists {listed!r} but the links give {actual}")


def cluster_to_toml_dict(spec: ClusterSpec) -> dict[str, Any]:
    """The TOML document of ``spec`` as a dict (deterministic key order).

    Every machine type of the spec is written in full so the file stands alone; ``meta`` gets the
    derived keys ``name``, ``num_compute_nodes``, ``source_connected``, ``sink_connected`` like the
    shipped conversions.
    """
    source_ids, sink_ids = _connected(spec)
    meta: dict[str, Any] = {"name": spec.name}
    meta.update(spec.meta)
    meta["num_compute_nodes"] = spec.num_nodes
    meta["source_connected"] = source_ids
    meta["sink_connected"] = sink_ids
    nodes: list[dict[str, Any]] = []
    for node in spec.nodes:
        entry: dict[str, Any] = {"id": node.id, "type": node.machine_type}
        if node.region != DEFAULT_REGION:
            entry["region"] = node.region
        nodes.append(entry)
    return {
        "meta": meta,
        "coordinator": {"nic_in": float(spec.coordinator_nic_in), "nic_out": float(spec.coordinator_nic_out)},
        "machine_types": {
            key: {
                "num_gpus": mt.num_gpus,
                "vram_bytes": float(mt.vram_bytes),
                "nic_in": float(mt.nic_in),
                "nic_out": float(mt.nic_out),
                "disk": float(mt.disk),
                "gpu": mt.gpu,
            }
            for key, mt in spec.machine_types.items()
        },
        "nodes": nodes,
        "links": [
            {
                "a": link.a,
                "b": link.b,
                "bidirectional": link.bidirectional,
                "bandwidth": float(link.bandwidth),
                "latency": float(link.latency),
            }
            for link in spec.links
        ],
    }


_TOML_HEADER = """\
# helix_async cluster file (written by helix_async.cluster.write_cluster_toml).
# Units: bandwidth, NIC and disk speeds in bytes/s; vram_bytes in bytes; latency in seconds.
# Links between compute nodes with bidirectional = true are usable both ways; links from "source"
# (coordinator send side) and to "sink" (coordinator receive side) are one-directional.

"""


def write_cluster_toml(spec: ClusterSpec, path: str | os.PathLike[str]) -> None:
    """Validate ``spec`` and write it as TOML to ``path``; ``read_cluster_toml(path) == spec``."""
    spec.validate()
    doc = cluster_to_toml_dict(spec)
    nodes, links = doc.pop("nodes"), doc.pop("links")
    try:
        parts = [_TOML_HEADER, tomli_w.dumps(doc)]
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(path), "meta", f"cannot be written as TOML: {exc}") from exc
    # tomli_w would write short arrays of tables inline (one long "nodes = [...]" line); write one
    # [[nodes]] / [[links]] table per entry instead, the layout of the shipped conversions.
    for key, entries in (("nodes", nodes), ("links", links)):
        for entry in entries:
            parts.append(f"\n[[{key}]]\n{tomli_w.dumps(entry)}")
    Path(path).write_text("".join(parts), encoding="utf-8", newline="\n")


def read_cluster_toml(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read and validate a cluster TOML file (ours or a shipped conversion)."""
    p = Path(path)
    text = _read_text(p)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message already carries "(at line L, column C)".
        raise ConfigError(str(p), "", f"invalid TOML: {exc}") from exc
    spec = cluster_from_toml_dict(data, str(p))
    return _apply_header_regions(spec, text)


# --------------------------------------------------------------------------------------------------
# Helix INI files
# --------------------------------------------------------------------------------------------------


def _parse_ini(text: str, source: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"), strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep option names as written
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise ConfigError(source, "", f"invalid INI: {exc}") from exc
    return parser


def _ini_get(parser: configparser.ConfigParser, source: str, section: str, option: str) -> str:
    if not parser.has_section(section):
        raise ConfigError(source, f"[{section}]", "missing required section")
    if not parser.has_option(section, option):
        raise ConfigError(source, f"[{section}].{option}", "missing required field")
    return parser.get(section, option)


def _ini_literal(value: str, source: str, where: str) -> Any:
    try:
        return ast.literal_eval(value.strip())
    except Exception as exc:  # literal_eval also raises TypeError, MemoryError, RecursionError
        raise ConfigError(source, where, f"cannot parse {value.strip()!r} as a literal") from exc


def _ini_endpoint(token: str) -> NodeRef | None:
    if token in (SOURCE, SINK):
        return token
    return int(token) if token.isdigit() else None


def read_machine_profile_ini(path: str | os.PathLike[str]) -> MachineProfile:
    """Read a Helix machine profile (``machine_profile.ini``) into name -> :class:`MachineType`.

    Machine sections need ``inbound_nic_speed``, ``outbound_nic_speed``, ``disk_speed`` and ``vram_size``
    (unit expressions); ``num_gpus`` and ``gpu`` may be added (defaults: the built-in type's, else the
    ``xN`` suffix of the name, else 1; and the lower-case name). ``[SourceNode] outbound_nic_speed`` and
    ``[SinkNode] inbound_nic_speed`` give the coordinator NICs (defaults 1e10 bytes/s).
    """
    p = Path(path)
    source = str(p)
    parser = _parse_ini(_read_text(p), source)
    nic_in, nic_out = DEFAULT_COORDINATOR_NIC_IN, DEFAULT_COORDINATOR_NIC_OUT
    types: dict[str, MachineType] = {}
    required = ("inbound_nic_speed", "outbound_nic_speed", "disk_speed", "vram_size")
    for section in parser.sections():
        if section == "SourceNode":
            if parser.has_option(section, "outbound_nic_speed"):
                where = f"[{section}].outbound_nic_speed"
                value = eval_unit_expr(parser.get(section, "outbound_nic_speed"), source=source, field=where)
                nic_out = _check_number(source, where, value, minimum="positive", unit="bytes/s")
            continue
        if section == "SinkNode":
            if parser.has_option(section, "inbound_nic_speed"):
                where = f"[{section}].inbound_nic_speed"
                value = eval_unit_expr(parser.get(section, "inbound_nic_speed"), source=source, field=where)
                nic_in = _check_number(source, where, value, minimum="positive", unit="bytes/s")
            continue
        _no_unknown_keys(source, f"[{section}]", dict(parser.items(section)), (*required, "num_gpus", "gpu"))
        vals: dict[str, float] = {}
        for option in required:
            where = f"[{section}].{option}"
            value = eval_unit_expr(_ini_get(parser, source, section, option), source=source, field=where)
            unit = "bytes" if option == "vram_size" else "bytes/s"
            vals[option] = _check_number(source, where, value, minimum="positive", unit=unit)
        if parser.has_option(section, "num_gpus"):
            where = f"[{section}].num_gpus"
            num_gpus = _int_field(source, where, _ini_literal(parser.get(section, "num_gpus"), source, where))
        elif section in DEFAULT_MACHINE_TYPES:
            num_gpus = DEFAULT_MACHINE_TYPES[section].num_gpus
        else:
            m = re.search(r"x(\d+)$", section)
            num_gpus = int(m.group(1)) if m else 1
        gpu = parser.get(section, "gpu").strip() if parser.has_option(section, "gpu") else ""
        mt = MachineType(
            name=section,
            num_gpus=num_gpus,
            vram_bytes=vals["vram_size"],
            nic_in=vals["inbound_nic_speed"],
            nic_out=vals["outbound_nic_speed"],
            disk=vals["disk_speed"],
            gpu=gpu,
        )
        _validate_machine_type(source, section, mt)
        types[section] = mt
    return MachineProfile(types, coordinator_nic_in=nic_in, coordinator_nic_out=nic_out)


def import_helix_ini(
    cluster_ini: str | os.PathLike[str],
    machine_profile_ini: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> ClusterSpec:
    """Import an original Helix cluster INI (HELIX_SPEC §2.1).

    Machine types and coordinator NICs come from ``machine_profile_ini`` when given, else from
    :data:`DEFAULT_MACHINE_TYPES`. Links keep the file's section order; ``[Link-i-j]`` between compute
    nodes is bidirectional, ``[Link-source-i]`` / ``[Link-i-sink]`` are one-directional. The
    ``connected_nodes`` lists must agree with the link sections. Regions come from the generator header
    (``# partition-k`` comments) when present.
    """
    p = Path(cluster_ini)
    source = str(p)
    text = _read_text(p)
    parser = _parse_ini(text, source)

    if machine_profile_ini is not None:
        profile = read_machine_profile_ini(machine_profile_ini)
    else:
        profile = MachineProfile(
            DEFAULT_MACHINE_TYPES,
            coordinator_nic_in=DEFAULT_COORDINATOR_NIC_IN,
            coordinator_nic_out=DEFAULT_COORDINATOR_NIC_OUT,
        )

    n_where = "[NodeNames].total_compute_nodes"
    n = _ini_literal(_ini_get(parser, source, "NodeNames", "total_compute_nodes"), source, n_where)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(source, n_where, f"must be an integer >= 1, got {n!r}")

    nodes: list[Node] = []
    machine_types: dict[str, MachineType] = {}
    for i in range(n):
        section = f"ComputeNode-{i}"
        mtype = _ini_get(parser, source, section, "type").strip().strip("'\"")
        nodes.append(Node(i, mtype))
        if mtype not in machine_types:
            if mtype not in profile:
                known = ", ".join(profile)
                raise ConfigError(
                    source, f"[{section}].type", f"unknown machine type {mtype!r} (known: {known})"
                )
            machine_types[mtype] = profile[mtype]

    links: list[Link] = []
    neighbours: dict[NodeRef, set[NodeRef]] = {ref: set() for ref in (SOURCE, SINK, *range(n))}
    for section in parser.sections():
        if section in ("NodeNames", "SourceNode", "SinkNode"):
            continue
        if section.startswith("ComputeNode-"):
            suffix = section[len("ComputeNode-") :]
            if not suffix.isdigit() or int(suffix) >= n:
                raise ConfigError(source, f"[{section}]", f"compute node outside 0..{n - 1}")
            continue
        parts = section.split("-")
        if len(parts) != 3 or parts[0] != "Link":
            raise ConfigError(
                source,
                f"[{section}]",
                "unknown section (expected NodeNames, SourceNode, SinkNode, ComputeNode-i or Link-x-y)",
            )
        a, b = _ini_endpoint(parts[1]), _ini_endpoint(parts[2])
        for ref, token in ((a, parts[1]), (b, parts[2])):
            if ref is None:
                raise ConfigError(source, f"[{section}]", f"unknown endpoint {token!r}")
            if isinstance(ref, int) and ref >= n:
                raise ConfigError(
                    source, f"[{section}]", f"link to unknown node {ref} (cluster has nodes 0..{n - 1})"
                )
        assert a is not None and b is not None
        bw_where, lat_where = f"[{section}].bandwidth", f"[{section}].latency"
        bandwidth = _check_number(
            source,
            bw_where,
            eval_unit_expr(_ini_get(parser, source, section, "bandwidth"), source=source, field=bw_where),
            minimum="positive",
            unit="bytes/s",
        )
        latency = _check_number(
            source,
            lat_where,
            eval_unit_expr(_ini_get(parser, source, section, "latency"), source=source, field=lat_where),
            minimum="nonnegative",
            unit="s",
        )
        links.append(Link(a, b, bandwidth, latency, isinstance(a, int) and isinstance(b, int)))
        neighbours[a].add(b)
        neighbours[b].add(a)

    # The original code routes by connected_nodes and by the link sections alike; a mismatch would make
    # the two disagree, so reject it here rather than guess which one is meant.
    owners: list[tuple[str, NodeRef]] = [("SourceNode", SOURCE), ("SinkNode", SINK)]
    owners += [(f"ComputeNode-{i}", i) for i in range(n)]
    for section, owner in owners:
        where = f"[{section}].connected_nodes"
        listed = _ini_literal(_ini_get(parser, source, section, "connected_nodes"), source, where)
        if not isinstance(listed, list) or not all(isinstance(x, (int, str)) for x in listed):
            raise ConfigError(
                source, where, f"must be a list of node ids / 'source' / 'sink', got {listed!r}"
            )
        if set(listed) != neighbours[owner]:
            missing = sorted(set(listed) - neighbours[owner], key=repr)
            extra = sorted(neighbours[owner] - set(listed), key=repr)
            raise ConfigError(
                source,
                where,
                f"does not match the [Link-*] sections: listed without a link {missing}, linked but not listed {extra}",
            )

    spec = ClusterSpec(
        name=name if name is not None else p.stem,
        machine_types=machine_types,
        nodes=tuple(nodes),
        links=tuple(links),
        coordinator_nic_in=profile.coordinator_nic_in,
        coordinator_nic_out=profile.coordinator_nic_out,
        meta={"imported_from": p.name},
        source_file=source,
    )
    spec.validate()
    return _apply_header_regions(spec, text)


# --------------------------------------------------------------------------------------------------
# Loading by name
# --------------------------------------------------------------------------------------------------


def load_cluster(name_or_path: str | os.PathLike[str]) -> ClusterSpec:
    """Load a cluster: a name in :data:`BUILTIN_CLUSTERS` (takes precedence), a ``.toml`` file or a Helix
    ``.ini`` file (imported with the built-in machine profile)."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_CLUSTERS:
        return read_cluster_toml(_CLUSTER_DIR / f"{name_or_path}.toml")
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            str(name_or_path),
            "",
            f"neither a built-in cluster nor an existing file (built-in clusters: {', '.join(BUILTIN_CLUSTERS)})",
        )
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return read_cluster_toml(path)
    if suffix == ".ini":
        return import_helix_ini(path)
    raise ConfigError(str(path), "", "unknown cluster file type (expected .toml or .ini)")


# --------------------------------------------------------------------------------------------------
# Generators (HELIX_SPEC §2.3)
# --------------------------------------------------------------------------------------------------

_ARG = "<argument>"


def _check_stats(where: str, stats: tuple[float, float], *, positive: bool, unit: str) -> tuple[float, float]:
    """(avg, var) of a uniform draw avg + U(-var, var); every possible draw must be valid."""
    if not isinstance(stats, (tuple, list)) or len(stats) != 2:
        raise ConfigError(_ARG, where, f"must be a pair (avg, var), got {stats!r}")
    avg = _check_number(_ARG, f"{where}[0]", stats[0], minimum="nonnegative", unit=unit)
    var = _check_number(_ARG, f"{where}[1]", stats[1], minimum="nonnegative", unit=unit)
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
                _ARG, "machine type", f"unknown machine type {t!r} (pass machine_types=; known: {known})"
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
    """A random single-region cluster, after Helix's FakeClusterGenerator (HELIX_SPEC §2.3).

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
    n = _gen_int("n", n, 1, 1_000_000)
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
        _check_number(_ARG, f"type_weights.{t}", w, minimum="nonnegative", unit="(weight)")
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
    seed: int,
    name: str | None = None,
) -> ClusterSpec:
    """A complete multi-region cluster, after Helix's PartitionedClusterGenerator (HELIX_SPEC §2.3).

    ``partitions[k]`` lists the machine types of region ``"region{k}"``; node ids are the concatenation.
    Pair links inside a region use the ``in_*`` stats, pairs across regions the ``cross_*`` stats; the
    coordinator is outside every region, so source and sink links always use the cross stats. Stats are
    (avg, var) for avg + U(-var, var) draws (bytes/s, seconds) from the generator's own
    ``random.Random(seed)``, two draws per link in the order source links, sink links, pairs in
    ``combinations`` order. Defaults are 3cluster24's. Same seed -> identical cluster; the original files
    are not reproduced bit for bit (see :func:`generate_single_region`).
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
    _check_seed(seed)
    in_bw = _check_stats("in_bandwidth", in_bandwidth, positive=True, unit="bytes/s")
    in_lat = _check_stats("in_latency", in_latency, positive=False, unit="s")
    x_bw = _check_stats("cross_bandwidth", cross_bandwidth, positive=True, unit="bytes/s")
    x_lat = _check_stats("cross_latency", cross_latency, positive=False, unit="s")
    types = _resolve_types(flat, machine_types)

    rng = random.Random(seed)
    n = len(flat)
    nodes = tuple(Node(i, t, regions[i]) for i, t in enumerate(flat))
    threshold = 100e6  # the partitioned generator printed whole mbps only above 100e6
    ends: list[tuple[NodeRef, NodeRef, bool]] = []
    ends += [(SOURCE, i, False) for i in range(n)]
    ends += [(i, SINK, False) for i in range(n)]
    ends += [(i, j, regions[i] == regions[j]) for i, j in itertools.combinations(range(n), 2)]
    links: list[Link] = []
    for a, b, inside in ends:
        bwv, latv = _draw_link(rng, in_bw if inside else x_bw, in_lat if inside else x_lat, threshold)
        links.append(Link(a, b, bwv, latv, isinstance(a, int) and isinstance(b, int)))

    spec = ClusterSpec(
        name=name if name is not None else f"partitioned{len(partitions)}_n{n}_seed{seed}",
        machine_types=types,
        nodes=nodes,
        links=tuple(links),
        coordinator_nic_in=DEFAULT_COORDINATOR_NIC_IN,
        coordinator_nic_out=DEFAULT_COORDINATOR_NIC_OUT,
        meta={
            "description": f"{n} nodes in {len(partitions)} regions, generated by generate_partitioned",
            "generator": {
                "kind": "partitioned",
                "seed": seed,
                "partitions": [list(part) for part in partitions],
                "in_bandwidth": list(in_bw),
                "in_latency": list(in_lat),
                "cross_bandwidth": list(x_bw),
                "cross_latency": list(x_lat),
            },
        },
        source_file=f"<generate_partitioned seed={seed}>",
    )
    spec.validate()
    return spec
