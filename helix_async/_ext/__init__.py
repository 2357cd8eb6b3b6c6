"""Compiled modules (built from ``ext/*.pyx`` by setup.py) and the one place that loads them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .. import envs
from ..errors import ExtensionMissingError


def load(name: str) -> ModuleType | None:
    """Return the compiled module ``helix_async._ext.<name>``, or None when HELIX_NO_EXTENSIONS is set.

    A missing build is an error, never a silent fallback to pure Python.
    """
    if envs.HELIX_NO_EXTENSIONS:
        return None
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        raise ExtensionMissingError(
            f"compiled module helix_async._ext.{name} is not built ({exc}); "
            "run `pip install -e .` (needs Cython and a C compiler) or set HELIX_NO_EXTENSIONS=1"
        ) from exc
