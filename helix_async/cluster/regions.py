"""Region names recovered from the original generator's header comments.

The shipped TOML conversions carry no ``region`` fields. When a file has no explicit region on any
node, the readers look for the original generator header kept in the comments (``# partition-k:
['A100', ...]`` lines, written by Helix's PartitionedClusterGenerator) and, if the concatenated
partitions match the node types in order, name the regions ``region0``, ``region1``, ... That is how
``load_cluster("3cluster24")`` gets its three regions without editing the shipped data; every
other file without regions gets the single region ``"default"``.
"""

from __future__ import annotations

import ast
import dataclasses
import re

from .spec import DEFAULT_REGION, ClusterSpec, Node

__all__ = ["apply_header_regions"]

_MAX_HEADER_LIST = 100_000  # characters; the original's headers list a few dozen types
_PARTITION_RE = re.compile(r"^[ \t]*#[ \t]*partition-([0-9]+)[ \t]*:[ \t]*(\[[^\n]*\])[ \t]*$", re.MULTILINE)


def _header_partitions(text: str) -> list[list[str]] | None:
    """Partition lists from a Helix generator header kept in comments (``# partition-k: [...]``).

    Returns None when there are none or they are malformed (comments are best effort, never an error).
    """
    parts: list[list[str]] = []
    for k, match in enumerate(_PARTITION_RE.finditer(text)):
        if match.group(1) != str(k):  # compared as text: no int() of a hostile 5000-digit number
            return None
        if len(match.group(2)) > _MAX_HEADER_LIST:
            return None
        try:
            value = ast.literal_eval(match.group(2))
        except Exception:  # best effort: any unparsable header means "no regions"
            return None
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            return None
        parts.append(value)
    return parts or None


def apply_header_regions(spec: ClusterSpec, text: str) -> ClusterSpec:
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

