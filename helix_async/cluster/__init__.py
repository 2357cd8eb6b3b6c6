"""Cluster topology: machine types, compute nodes and network links, their files and generators.

| module | what it holds |
|---|---|
| :mod:`.spec` | the value types: MachineType, Node, Link, DirectedLink, ClusterSpec (+ validation) |
| :mod:`.defaults` | built-in machine types (measured table) and built-in cluster names |
| :mod:`.units` | the original files' unit expressions (``1000 * mbps``) |
| :mod:`.toml_io` | our TOML cluster files (read, write) |
| :mod:`.helix_ini` | import of the original Helix INI cluster and machine-profile files |
| :mod:`.regions` | region names from the original generator's header comments |
| :mod:`.generate` | random clusters after the original's generators |
| :mod:`.load` | ``load_cluster``: a built-in name, a ``.toml`` or a ``.ini`` file |

Node identities (``SOURCE``, ``SINK``, ``NodeRef``) live in :mod:`helix_async.ids`, importable
without any of this.
"""

from ..ids import SINK, SOURCE, NodeRef
from .defaults import (
    BUILTIN_CLUSTERS,
    DEFAULT_COORDINATOR_NIC_IN,
    DEFAULT_COORDINATOR_NIC_OUT,
    DEFAULT_MACHINE_TYPES,
)
from .generate import generate_partitioned, generate_single_region
from .helix_ini import import_helix_ini, read_machine_profile_ini
from .load import load_cluster
from .spec import DEFAULT_REGION, ClusterSpec, DirectedLink, Link, MachineProfile, MachineType, Node
from .toml_io import cluster_from_toml_dict, cluster_to_toml_dict, read_cluster_toml, write_cluster_toml
from .units import UNITS, eval_unit_expr

__all__ = [
    "SOURCE",
    "SINK",
    "NodeRef",
    "UNITS",
    "DEFAULT_REGION",
    "MachineType",
    "MachineProfile",
    "Node",
    "Link",
    "DirectedLink",
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
