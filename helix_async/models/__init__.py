"""Where a model comes from: the model sources and the one function that resolves ``--model``.

Every command that takes ``--model NAME|DIR`` resolves it with :func:`resolve_model`, which asks
the sources of :data:`SOURCES` in order. A source is one module; adding one (a GGUF file, say)
means writing that module and adding one line to the table in :mod:`.sources`.
"""

from __future__ import annotations

from .sources import SOURCES, ModelSource, ResolvedModel, resolve_model

__all__ = ["SOURCES", "ModelSource", "ResolvedModel", "resolve_model"]
