"""Import site of the per-layer batch-time interpolation (compiled unless HELIX_NO_EXTENSIONS=1).

``BatchTimerPy`` is the pure-Python specification, ``BatchTimerC`` the compiled twin (None in a
pure build), ``BatchTimer`` the one the rest of the package uses.
"""

from __future__ import annotations

from . import _ext
from ._interp_py import BatchTimer as BatchTimerPy

_mod = _ext.load("_interp")
BatchTimerC = None if _mod is None else _mod.BatchTimer
BatchTimer = BatchTimerPy if BatchTimerC is None else BatchTimerC
COMPILED: bool = BatchTimerC is not None

__all__ = ["BatchTimer", "BatchTimerC", "BatchTimerPy", "COMPILED"]
