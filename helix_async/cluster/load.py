"""Loading a cluster by built-in name or by file (our TOML, or an original Helix INI)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ..fileio import read_text
from .defaults import BUILTIN_CLUSTER_DIR, BUILTIN_CLUSTERS
from .helix_ini import import_helix_ini
from .spec import ClusterSpec
from .toml_io import read_cluster_toml

__all__ = ["load_cluster"]



def load_cluster(name_or_path: str | os.PathLike[str]) -> ClusterSpec:
    """Load a cluster: a name in :data:`BUILTIN_CLUSTERS` (takes precedence), a ``.toml`` file or a Helix
    ``.ini`` file (imported with the built-in machine profile)."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_CLUSTERS:
        return read_cluster_toml(BUILTIN_CLUSTER_DIR / f"{name_or_path}.toml")
    path = Path(name_or_path)
    if path.exists() and not path.is_file():
        read_text(path, "cluster file")  # refuses a folder, FIFO or device, naming what it is
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

