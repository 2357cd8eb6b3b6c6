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
