"""Built-in machine types (from the original's measured machine table) and the built-in clusters.

Data: ``helix_async/data/profiles/machines.csv`` and ``helix_async/data/clusters/*.toml``, converted
from the Helix authors' public repository (Apache-2.0, see ``helix_async/data/PROVENANCE.md``).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from .spec import MachineType

__all__ = [
    "DEFAULT_MACHINE_TYPES",
    "DEFAULT_COORDINATOR_NIC_IN",
    "DEFAULT_COORDINATOR_NIC_OUT",
    "BUILTIN_CLUSTERS",
    "BUILTIN_CLUSTER_DIR",
]

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_CLUSTER_DIR = _DATA_DIR / "clusters"
_MACHINES_CSV = _DATA_DIR / "profiles" / "machines.csv"




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
    "tiny3",
)

