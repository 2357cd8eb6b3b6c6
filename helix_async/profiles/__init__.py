"""Profiles for any model: the GPU datasheet table and the analytical per-layer profiles.

:mod:`.gpus` reads the datasheet table, :mod:`.analytical` turns a model's shape and a GPU type
into per-layer times and node settings. Measured profiles (shipped under ``data/profiles/`` and in
the user's profile directory) are found and merged with the analytical ones by
:func:`helix_async.model.load_profiles` and :func:`helix_async.model.attach_profiles`; the rules
are in docs/profiles.md.
"""

from __future__ import annotations

from .analytical import LayerShape, analytical_settings, analytical_tables, fit_efficiency, layer_time
from .gpus import GpuType, find_gpu, gpu_types

__all__ = [
    "GpuType",
    "LayerShape",
    "analytical_settings",
    "analytical_tables",
    "find_gpu",
    "fit_efficiency",
    "gpu_types",
    "layer_time",
]
