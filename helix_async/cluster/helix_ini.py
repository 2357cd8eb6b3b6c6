"""Import of the original Helix INI files: cluster descriptions and machine profiles (docs/original.md §2.1).

Their values are unit expressions such as ``1000 * mbps`` (:mod:`helix_async.cluster.units`) and
Python literals; sections name nodes and links (``[ComputeNode-3]``, ``[Link-source-3]``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError
from ..fileio import int_field, no_unknown_keys, number_field, short_repr
from ..ids import SINK, SOURCE, NodeRef
from ..ini import ascii_int, ini_endpoint, ini_get, ini_literal, read_ini
from .defaults import DEFAULT_COORDINATOR_NIC_IN, DEFAULT_COORDINATOR_NIC_OUT, DEFAULT_MACHINE_TYPES
from .regions import apply_header_regions
from .spec import ClusterSpec, Link, MachineProfile, MachineType, Node, validate_machine_type
from .units import eval_unit_expr

__all__ = ["import_helix_ini", "read_machine_profile_ini"]


def _sec(section: str) -> str:
    """``[section]`` for a message: control characters escaped, a hostile long name cut."""
    return f"[{short_repr(section)[1:-1]}]"


def read_machine_profile_ini(path: str | os.PathLike[str]) -> MachineProfile:
    """Read a Helix machine profile (``machine_profile.ini``) into name -> :class:`MachineType`.

    Machine sections need ``inbound_nic_speed``, ``outbound_nic_speed``, ``disk_speed`` and ``vram_size``
    (unit expressions); ``num_gpus`` and ``gpu`` may be added (defaults: the built-in type's, else the
    ``xN`` suffix of the name, else 1; and the lower-case name). ``[SourceNode] outbound_nic_speed`` and
    ``[SinkNode] inbound_nic_speed`` give the coordinator NICs (defaults 1e10 bytes/s).
    """
    p = Path(path)
    source = str(p)
    parser, _ = read_ini(p)
    nic_in, nic_out = DEFAULT_COORDINATOR_NIC_IN, DEFAULT_COORDINATOR_NIC_OUT
    types: dict[str, MachineType] = {}
    required = ("inbound_nic_speed", "outbound_nic_speed", "disk_speed", "vram_size")
    for section in parser.sections():
        sec = _sec(section)
        if section == "SourceNode":
            if parser.has_option(section, "outbound_nic_speed"):
                where = f"{sec}.outbound_nic_speed"
                value = eval_unit_expr(parser.get(section, "outbound_nic_speed"), source=source, field=where)
                nic_out = number_field(source, where, value, minimum="positive", unit="bytes/s")
            continue
        if section == "SinkNode":
            if parser.has_option(section, "inbound_nic_speed"):
                where = f"{sec}.inbound_nic_speed"
                value = eval_unit_expr(parser.get(section, "inbound_nic_speed"), source=source, field=where)
                nic_in = number_field(source, where, value, minimum="positive", unit="bytes/s")
            continue
        no_unknown_keys(source, sec, dict(parser.items(section)), (*required, "num_gpus", "gpu"))
        vals: dict[str, float] = {}
        for option in required:
            where = f"{sec}.{option}"
            value = eval_unit_expr(ini_get(parser, source, section, option), source=source, field=where)
            unit = "bytes" if option == "vram_size" else "bytes/s"
            vals[option] = number_field(source, where, value, minimum="positive", unit=unit)
        if parser.has_option(section, "num_gpus"):
            where = f"{sec}.num_gpus"
            num_gpus = int_field(source, where, ini_literal(parser.get(section, "num_gpus"), source, where))
        elif section in DEFAULT_MACHINE_TYPES:
            num_gpus = DEFAULT_MACHINE_TYPES[section].num_gpus
        else:
            m = re.search(r"x([0-9]+)\Z", section)
            suffix = None if m is None else ascii_int(m.group(1))
            if m is not None and suffix is None:
                raise ConfigError(source, sec, "the xN suffix is too long to be a GPU count; give num_gpus")
            num_gpus = 1 if suffix is None else suffix
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
        validate_machine_type(source, section, mt)
        types[section] = mt
    return MachineProfile(types, coordinator_nic_in=nic_in, coordinator_nic_out=nic_out)


def import_helix_ini(
    cluster_ini: str | os.PathLike[str],
    machine_profile_ini: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> ClusterSpec:
    """Import an original Helix cluster INI (docs/original.md §2.1).

    Machine types and coordinator NICs come from ``machine_profile_ini`` when given, else from
    :data:`DEFAULT_MACHINE_TYPES`. Links keep the file's section order; ``[Link-i-j]`` between compute
    nodes is bidirectional, ``[Link-source-i]`` / ``[Link-i-sink]`` are one-directional. The
    ``connected_nodes`` lists must agree with the link sections. Regions come from the generator header
    (``# partition-k`` comments) when present.
    """
    p = Path(cluster_ini)
    source = str(p)
    parser, text = read_ini(p)

    if machine_profile_ini is not None:
        profile = read_machine_profile_ini(machine_profile_ini)
    else:
        profile = MachineProfile(
            DEFAULT_MACHINE_TYPES,
            coordinator_nic_in=DEFAULT_COORDINATOR_NIC_IN,
            coordinator_nic_out=DEFAULT_COORDINATOR_NIC_OUT,
        )

    n_where = "[NodeNames].total_compute_nodes"
    n = ini_literal(ini_get(parser, source, "NodeNames", "total_compute_nodes"), source, n_where)
    n = int_field(source, n_where, n, lo=1)

    nodes: list[Node] = []
    machine_types: dict[str, MachineType] = {}
    for i in range(n):
        section = f"ComputeNode-{i}"
        mtype = ini_get(parser, source, section, "type").strip().strip("'\"")
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
        sec = _sec(section)
        if section in ("NodeNames", "SourceNode", "SinkNode"):
            continue
        if section.startswith("ComputeNode-"):
            suffix = section[len("ComputeNode-") :]
            node_id = ascii_int(suffix)
            if node_id is None or node_id >= n:
                raise ConfigError(source, sec, f"compute node outside 0..{n - 1}")
            continue
        parts = section.split("-")
        if len(parts) != 3 or parts[0] != "Link":
            raise ConfigError(
                source,
                sec,
                "unknown section (expected NodeNames, SourceNode, SinkNode, ComputeNode-i or Link-x-y)",
            )
        a, b = ini_endpoint(parts[1]), ini_endpoint(parts[2])
        for ref, token in ((a, parts[1]), (b, parts[2])):
            if ref is None:
                raise ConfigError(source, sec, f"unknown endpoint {short_repr(token)}")
            if isinstance(ref, int) and ref >= n:
                raise ConfigError(
                    source, sec, f"link to unknown node {short_repr(ref)} (cluster has nodes 0..{n - 1})"
                )
        assert a is not None and b is not None
        bw_where, lat_where = f"{sec}.bandwidth", f"{sec}.latency"
        bandwidth = number_field(
            source,
            bw_where,
            eval_unit_expr(ini_get(parser, source, section, "bandwidth"), source=source, field=bw_where),
            minimum="positive",
            unit="bytes/s",
        )
        latency = number_field(
            source,
            lat_where,
            eval_unit_expr(ini_get(parser, source, section, "latency"), source=source, field=lat_where),
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
        listed = ini_literal(ini_get(parser, source, section, "connected_nodes"), source, where)
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
    return apply_header_regions(spec, text)

