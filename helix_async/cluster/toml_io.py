"""Cluster files in our TOML format, a superset of the shipped conversions in
``helix_async/data/clusters/*.toml``::

    [meta]                       # free-form; name, description, ...
    [coordinator]                # optional: nic_in, nic_out (bytes/s)
    [machine_types.NAME]         # optional: num_gpus, vram_bytes, nic_in, nic_out, disk, gpu
    [[nodes]]   id, type, region (optional, default "default")
    [[links]]   a, b, bidirectional (optional), bandwidth, latency   # a/b: node id, "source" or "sink"

Machine-type fields that a file leaves out come from
:data:`~helix_async.cluster.defaults.DEFAULT_MACHINE_TYPES`. The ``meta`` keys ``name``,
``num_compute_nodes``, ``source_connected`` and ``sink_connected`` are reserved: the reader checks the
last three against the links and drops them (they are derived), the writer regenerates them. The
writer always writes explicit regions (when not ``"default"``), so files we write never depend on
header comments (see :mod:`helix_async.cluster.regions`).

Bandwidths as in the original: its files write ``X * mbps`` with ``mbps = 1e6`` and its simulator
uses the number as bytes/s; we keep that reading (``1000 * mbps`` = 1e9 bytes/s).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import ConfigError
from ..fileio import (
    array_field,
    atomic_write_text,
    bool_field,
    int_field,
    name_field,
    no_unknown_keys,
    node_ref_field,
    number_field,
    parse_document,
    read_text,
    required_field,
    str_field,
    table_field,
)
from ..ids import SINK, SOURCE
from .defaults import DEFAULT_COORDINATOR_NIC_IN, DEFAULT_COORDINATOR_NIC_OUT, DEFAULT_MACHINE_TYPES
from .regions import apply_header_regions
from .spec import DEFAULT_REGION, RESERVED_META, ClusterSpec, Link, MachineType, Node, validate_machine_type

__all__ = ["read_cluster_toml", "write_cluster_toml", "cluster_to_toml_dict", "cluster_from_toml_dict"]


_TOP_KEYS = ("meta", "coordinator", "machine_types", "nodes", "links")
_MACHINE_KEYS = ("num_gpus", "vram_bytes", "nic_in", "nic_out", "disk", "gpu")
_NODE_KEYS = ("id", "type", "region")
_LINK_KEYS = ("a", "b", "bidirectional", "bandwidth", "latency")


def _machine_type_from_table(source: str, name: str, table: Mapping[str, Any]) -> MachineType:
    where = f"machine_types.{name}"
    no_unknown_keys(source, where, table, _MACHINE_KEYS)
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
        num_gpus=int_field(source, f"{where}.num_gpus", get("num_gpus")),
        vram_bytes=number_field(
            source, f"{where}.vram_bytes", get("vram_bytes"), minimum="positive", unit="bytes"
        ),
        nic_in=number_field(source, f"{where}.nic_in", get("nic_in"), minimum="positive", unit="bytes/s"),
        nic_out=number_field(source, f"{where}.nic_out", get("nic_out"), minimum="positive", unit="bytes/s"),
        disk=number_field(source, f"{where}.disk", get("disk"), minimum="positive", unit="bytes/s"),
        gpu=str_field(source, f"{where}.gpu", gpu),
    )
    validate_machine_type(source, name, mt)
    return mt


def cluster_from_toml_dict(d: Mapping[str, Any], source: str) -> ClusterSpec:
    """Build and validate a :class:`ClusterSpec` from parsed TOML (see the module doc for the layout).

    ``source`` names the file in error messages and becomes ``source_file``. Header-comment regions are
    not applied here (a dict has no comments); :func:`read_cluster_toml` does that.
    """
    no_unknown_keys(source, "", d, _TOP_KEYS)

    meta = dict(table_field(source, "meta", d.get("meta", {})))
    fallback_name = Path(source).stem if not source.startswith("<") else "cluster"
    name = name_field(source, "meta.name", meta.pop("name", fallback_name))
    derived = {key: meta.pop(key) for key in RESERVED_META[1:] if key in meta}

    coord = table_field(source, "coordinator", d.get("coordinator", {}))
    no_unknown_keys(source, "coordinator", coord, ("nic_in", "nic_out"))
    nic_in = number_field(
        source,
        "coordinator.nic_in",
        coord.get("nic_in", DEFAULT_COORDINATOR_NIC_IN),
        minimum="positive",
        unit="bytes/s",
    )
    nic_out = number_field(
        source,
        "coordinator.nic_out",
        coord.get("nic_out", DEFAULT_COORDINATOR_NIC_OUT),
        minimum="positive",
        unit="bytes/s",
    )

    machine_types: dict[str, MachineType] = {}
    for mname, mtable in table_field(source, "machine_types", d.get("machine_types", {})).items():
        machine_types[mname] = _machine_type_from_table(
            source, mname, table_field(source, f"machine_types.{mname}", mtable)
        )

    raw_nodes = array_field(source, "nodes", required_field(source, "", d, "nodes"))
    nodes: list[Node] = []
    for i, raw in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        table = table_field(source, where, raw)
        no_unknown_keys(source, where, table, _NODE_KEYS)
        node_id = int_field(source, f"{where}.id", required_field(source, where, table, "id"))
        mtype = str_field(source, f"{where}.type", required_field(source, where, table, "type"))
        region = str_field(source, f"{where}.region", table.get("region", DEFAULT_REGION))
        nodes.append(Node(node_id, mtype, region))
        # A type the file does not define comes from the defaults; an unknown one stays missing and
        # validate() reports it against this node.
        if mtype not in machine_types and mtype in DEFAULT_MACHINE_TYPES:
            machine_types[mtype] = DEFAULT_MACHINE_TYPES[mtype]

    raw_links = array_field(source, "links", d.get("links", []))
    links: list[Link] = []
    for k, raw in enumerate(raw_links):
        where = f"links[{k}]"
        table = table_field(source, where, raw)
        no_unknown_keys(source, where, table, _LINK_KEYS)
        a = node_ref_field(source, f"{where}.a", required_field(source, where, table, "a"), len(nodes))
        b = node_ref_field(source, f"{where}.b", required_field(source, where, table, "b"), len(nodes))
        bandwidth = number_field(
            source,
            f"{where}.bandwidth",
            required_field(source, where, table, "bandwidth"),
            minimum="positive",
            unit="bytes/s",
        )
        latency = number_field(
            source,
            f"{where}.latency",
            required_field(source, where, table, "latency"),
            minimum="nonnegative",
            unit="s",
        )
        # Omitted direction: pair links are physical two-way links, coordinator links are one-way.
        default_bidir = isinstance(a, int) and isinstance(b, int)
        bidirectional = bool_field(source, f"{where}.bidirectional", table.get("bidirectional", default_bidir))
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
    atomic_write_text(path, "".join(parts), "cluster file")


def read_cluster_toml(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read and validate a cluster TOML file (ours or a shipped conversion)."""
    src = str(Path(path))
    text = read_text(path, "cluster file")
    spec = cluster_from_toml_dict(parse_document(text, src, "toml"), src)
    return apply_header_regions(spec, text)
