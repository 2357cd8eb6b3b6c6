"""Running a command's coroutine to its end: on uvloop where it is installed, else on asyncio's loop.

The one runner the command-line entry points share (``host``, ``worker``, ``serve``,
``bench-serve``): each builds its coroutine and hands it here, so the choice of event loop is made
in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a new event loop (uvloop when installed) until it returns; returns its result."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a base dependency off Windows
        return asyncio.run(main)
    # (outside the try: an ImportError raised by the coroutine itself, e.g. a missing extra, is its own)
    return uvloop.run(main)
