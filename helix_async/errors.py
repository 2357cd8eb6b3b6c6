"""Error types shared across the package."""

from __future__ import annotations


class HelixError(Exception):
    """Base class of the errors this package raises on purpose."""


class ConfigError(HelixError, ValueError):
    """A configuration file or value is invalid.

    ``source`` names the file (or "<builtin NAME>", "<argument>"), ``field`` the offending field
    (for instance ``links[3].bandwidth``); ``str()`` gives one line naming both.
    """

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")


class ExtensionMissingError(HelixError, ImportError):
    """A compiled module is required (HELIX_NO_EXTENSIONS unset) but was not built."""


class MissingExtraError(HelixError, ImportError):
    """An optional dependency group is not installed; the message names the extra to install."""


class PlacementError(HelixError, ValueError):
    """A placement failed verification; ``problems`` lists every violation found."""

    def __init__(self, problems: list[str], where: str = "placement") -> None:
        self.problems = problems
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        super().__init__(f"{where}: {shown}")


class PlanningError(HelixError):
    """A planner cannot build a placement for this cluster and model; the message says why."""
