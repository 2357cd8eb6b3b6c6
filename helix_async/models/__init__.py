"""Where a model comes from: the model sources and the one function that resolves ``--model``.

Every command that takes ``--model NAME|DIR|FILE.gguf`` resolves it with :func:`resolve_model`,
which asks the sources of :data:`SOURCES` in order (built-in names, packaged models, GGUF files,
checkpoint directories). Adding a source means writing its module and adding one line to the
table in :mod:`.sources`. Resolving reads headers only and never imports torch; the weights are
read by :mod:`.weights` (torch), one stage's tensors at a time. docs/models.md says what is read.
"""

from __future__ import annotations

from .sources import SOURCES, ModelSource, ResolvedModel, resolve_model

__all__ = ["SOURCES", "ModelSource", "ResolvedModel", "resolve_model"]
