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


class RequestFailed(HelixError, RuntimeError):
    """A request the serving host could not serve (the message says why).

    kind: ``overloaded`` (the admission queue is full: try again later), ``unavailable`` (the
    host is not serving: starting or shutting down), ``cancelled`` (at shutdown) or ``failed``
    (a worker failed it or was lost).  The HTTP API answers 429 for the first, 503 for the next
    two and 500 for the last (docs: :mod:`helix_async.frontend.openai_api`).
    """

    KINDS = ("overloaded", "unavailable", "cancelled", "failed")

    def __init__(self, message: str, kind: str = "failed") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"RequestFailed kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        super().__init__(message)
        self.kind = kind
