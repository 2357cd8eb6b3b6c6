"""The cluster's value types: machine types, compute nodes, physical links and the whole spec.

A cluster is a set of compute nodes ``0..N-1`` plus a coordinator split, as in Helix, into a send
side (:data:`~helix_async.ids.SOURCE`) and a receive side (:data:`~helix_async.ids.SINK`). Links
join two compute nodes (usable both ways, as in the original cluster files) or join the
coordinator and one node (one-directional: ``source -> i`` or ``i -> sink``). Each usable
direction of a link is a :class:`DirectedLink`.

Units everywhere: bandwidths, NIC and disk speeds in bytes/s, VRAM in bytes, latencies in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import ConfigError
from ..fileio import bool_field, int_field, name_field, node_ref_field, number_field, short_repr, str_field
from ..ids import SINK, SOURCE, NodeRef, node_order

__all__ = ["DEFAULT_REGION", "MachineType", "MachineProfile", "Node", "Link", "DirectedLink", "ClusterSpec"]

DEFAULT_REGION = "default"

MAX_GPUS_PER_MACHINE = 1024

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
class DirectedLink:
    """One usable direction of a link: ``src`` (SOURCE or a node id) -> ``dst`` (a node id or SINK)."""

    src: NodeRef
    dst: NodeRef
    bandwidth: float  # bytes/s
    latency: float  # seconds


@dataclass(frozen=True)
class _LinkIndex:
    arcs: tuple[DirectedLink, ...]
    out: dict[NodeRef, tuple[DirectedLink, ...]]
    inc: dict[NodeRef, tuple[DirectedLink, ...]]
    by_pair: dict[tuple[NodeRef, NodeRef], DirectedLink]


def _link_arcs(link: Link) -> tuple[DirectedLink, ...]:
    """The directed arcs one link provides (two for a bidirectional pair link, else one)."""
    fwd = DirectedLink(link.a, link.b, link.bandwidth, link.latency)
    if link.bidirectional:
        return (fwd, DirectedLink(link.b, link.a, link.bandwidth, link.latency))
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
    def _index(self) -> _LinkIndex:
        # Computed once per (immutable) spec; cached_property writes to __dict__ directly, which a frozen
        # dataclass permits, and it takes no part in equality or repr.
        src_arcs: list[DirectedLink] = []
        pair_arcs: list[DirectedLink] = []
        sink_arcs: list[DirectedLink] = []
        for link in self.links:
            for arc in _link_arcs(link):
                if arc.src == SOURCE:
                    src_arcs.append(arc)
                elif arc.dst == SINK:
                    sink_arcs.append(arc)
                else:
                    pair_arcs.append(arc)
        src_arcs.sort(key=lambda a: node_order(a.dst))
        sink_arcs.sort(key=lambda a: node_order(a.src))
        arcs = tuple(src_arcs + pair_arcs + sink_arcs)
        out: dict[NodeRef, list[DirectedLink]] = {}
        inc: dict[NodeRef, list[DirectedLink]] = {}
        by_pair: dict[tuple[NodeRef, NodeRef], DirectedLink] = {}
        for arc in arcs:
            out.setdefault(arc.src, []).append(arc)
            inc.setdefault(arc.dst, []).append(arc)
            by_pair.setdefault((arc.src, arc.dst), arc)
        return _LinkIndex(
            arcs,
            {k: tuple(v) for k, v in out.items()},
            {k: tuple(v) for k, v in inc.items()},
            by_pair,
        )

    def arcs(self) -> tuple[DirectedLink, ...]:
        """All directed arcs: SOURCE->i (by i), pair-link directions (in link order, a->b before b->a),
        then i->SINK (by i)."""
        return self._index.arcs

    def out_arcs(self, u: NodeRef) -> tuple[DirectedLink, ...]:
        """Arcs leaving ``u`` (in :meth:`arcs` order); empty for SINK or an unknown node."""
        return self._index.out.get(u, ())

    def in_arcs(self, v: NodeRef) -> tuple[DirectedLink, ...]:
        """Arcs entering ``v`` (in :meth:`arcs` order); empty for SOURCE or an unknown node."""
        return self._index.inc.get(v, ())

    def arc(self, u: NodeRef, v: NodeRef) -> DirectedLink | None:
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
        name_field(src, "name", self.name)
        number_field(src, "coordinator.nic_in", self.coordinator_nic_in, minimum="positive", unit="bytes/s")
        number_field(
            src, "coordinator.nic_out", self.coordinator_nic_out, minimum="positive", unit="bytes/s"
        )
        for key in RESERVED_META:
            if key in self.meta:
                raise ConfigError(src, f"meta.{key}", "reserved key (derived from the cluster itself)")

        for key, mt in self.machine_types.items():
            validate_machine_type(src, key, mt)

        if not self.nodes:
            raise ConfigError(src, "nodes", "a cluster needs at least one compute node")
        seen_ids: dict[int, int] = {}
        for i, node in enumerate(self.nodes):
            where = f"nodes[{i}]"
            if not isinstance(node, Node):
                raise ConfigError(src, where, f"expected a Node, got {type(node).__name__}")
            int_field(src, f"{where}.id", node.id)
            if node.id in seen_ids:
                raise ConfigError(
                    src, f"{where}.id", f"duplicate node id {node.id} (also nodes[{seen_ids[node.id]}])"
                )
            seen_ids[node.id] = i
            if node.id != i:
                raise ConfigError(
                    src, f"{where}.id", f"node ids must be 0..N-1 in order: expected {i}, got {node.id}"
                )
            str_field(src, f"{where}.type", node.machine_type)
            if node.machine_type not in self.machine_types:
                from .defaults import DEFAULT_MACHINE_TYPES  # defaults.py imports this module

                known = ", ".join(sorted(set(self.machine_types) | set(DEFAULT_MACHINE_TYPES)))
                raise ConfigError(
                    src,
                    f"{where}.type",
                    f"unknown machine type {short_repr(node.machine_type)} (define it under [machine_types]; known: {known})",
                )
            name_field(src, f"{where}.region", node.region)

        n = len(self.nodes)
        arc_owner: dict[tuple[NodeRef, NodeRef], int] = {}
        for k, link in enumerate(self.links):
            where = f"links[{k}]"
            if not isinstance(link, Link):
                raise ConfigError(src, where, f"expected a Link, got {type(link).__name__}")
            node_ref_field(src, f"{where}.a", link.a, n)
            node_ref_field(src, f"{where}.b", link.b, n)
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
            bool_field(src, f"{where}.bidirectional", link.bidirectional)
            if link.bidirectional and (isinstance(link.a, str) or isinstance(link.b, str)):
                raise ConfigError(
                    src,
                    f"{where}.bidirectional",
                    "links to the coordinator (source/sink) are one-directional",
                )
            number_field(src, f"{where}.bandwidth", link.bandwidth, minimum="positive", unit="bytes/s")
            number_field(src, f"{where}.latency", link.latency, minimum="nonnegative", unit="s")
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

    def with_node(self, machine_type: str, region: str | None = None, *, flag: str = "--add") -> tuple[ClusterSpec, int]:
        """This cluster and one more node of ``machine_type`` in ``region`` (default: the region with
        the most nodes), connected as a node already there is: a template node of that region (one of
        the same type when there is one, else the first) lends each of its links (to the other nodes,
        the source and the sink) to the new node, and the template's own link to a neighbour in the
        region joins the two. Returns the cluster and the new node's id. A type the cluster does not
        define comes from the built-in machine types; an unknown type or region is a ConfigError
        naming ``flag``."""
        from .defaults import DEFAULT_MACHINE_TYPES  # defaults.py imports this module

        types = dict(self.machine_types)
        if machine_type not in types:
            if machine_type not in DEFAULT_MACHINE_TYPES:
                known = ", ".join(sorted(set(types) | set(DEFAULT_MACHINE_TYPES)))
                raise ConfigError("<argument>", flag, f"unknown machine type {short_repr(machine_type)} (known: {known})")
            types[machine_type] = DEFAULT_MACHINE_TYPES[machine_type]
        regions = self.regions()
        if region is None:
            region = max(regions, key=lambda r: (len(regions[r]), -list(regions).index(r)))
        if region not in regions:
            raise ConfigError("<argument>", "--region", f"unknown region {short_repr(region)} (regions: "
                                                        f"{', '.join(regions)})")
        members = regions[region]
        like = next((i for i in members if self.nodes[i].machine_type == machine_type), members[0])
        new = len(self.nodes)
        links = list(self.links)
        peer_link: Link | None = None
        for lk in self.links:
            if like not in (lk.a, lk.b):
                continue
            a = new if lk.a == like else lk.a
            b = new if lk.b == like else lk.b
            links.append(Link(a, b, lk.bandwidth, lk.latency, lk.bidirectional))
            other = lk.b if lk.a == like else lk.a
            if peer_link is None and not isinstance(other, str) and self.nodes[other].region == region:
                peer_link = lk
        if peer_link is not None:  # the template and the new node, as the template and its neighbour
            links.append(Link(like, new, peer_link.bandwidth, peer_link.latency, True))
        spec = ClusterSpec(
            name=self.name,
            machine_types=types,
            nodes=(*self.nodes, Node(new, machine_type, region)),
            links=tuple(links),
            coordinator_nic_in=self.coordinator_nic_in,
            coordinator_nic_out=self.coordinator_nic_out,
            meta=dict(self.meta),
            source_file=self.source_file,
        )
        spec.validate()
        return spec, new

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


# [meta] keys derived from the cluster itself: the TOML writer regenerates them, the reader checks them.
RESERVED_META = ("name", "num_compute_nodes", "source_connected", "sink_connected")


def validate_machine_type(source: str, key: str, mt: Any) -> None:
    name_field(source, "machine_types", key)
    where = f"machine_types.{key}"
    if not isinstance(mt, MachineType):
        raise ConfigError(source, where, f"expected a MachineType, got {type(mt).__name__}")
    if mt.name != key:
        raise ConfigError(source, f"{where}.name", f"must equal the key {key!r}, got {mt.name!r}")
    int_field(source, f"{where}.num_gpus", mt.num_gpus, lo=1, hi=MAX_GPUS_PER_MACHINE)
    number_field(source, f"{where}.vram_bytes", mt.vram_bytes, minimum="positive", unit="bytes")
    number_field(source, f"{where}.nic_in", mt.nic_in, minimum="positive", unit="bytes/s")
    number_field(source, f"{where}.nic_out", mt.nic_out, minimum="positive", unit="bytes/s")
    number_field(source, f"{where}.disk", mt.disk, minimum="positive", unit="bytes/s")
    name_field(source, f"{where}.gpu", mt.gpu)

