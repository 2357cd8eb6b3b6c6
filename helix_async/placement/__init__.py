"""Placement values, verification, I/O and planners (heuristics and MILP)."""

from ..errors import PlacementError, PlanningError
from .core import (
    Placement,
    arc_kind,
    clean_arcs,
    placement_arcs,
    verify,
)
from .io import (
    import_helix_solution,
    load_shipped_layout,
    read_flow,
    read_placement,
    write_placement,
)

__all__ = [
    "Placement",
    "PlacementError",
    "PlanningError",
    "arc_kind",
    "clean_arcs",
    "import_helix_solution",
    "load_shipped_layout",
    "placement_arcs",
    "read_flow",
    "read_placement",
    "verify",
    "write_placement",
]
