"""Executors: what runs a worker's layers on a batch.

``base`` defines the :class:`Executor` interface and the :class:`Batch` it receives;
``cost_model`` prices a batch from the measured per-layer profiles (the simulator, and the
cost-model emulation in real time); ``torch`` (with the model in ``llama``) computes them, and is
with ``llama`` the only module that imports torch (import it as ``helix_async.executors.torch``).
"""

from .base import Batch, ExecFailure, Executor
from .cost_model import CostModelExecutor

__all__ = ["Batch", "CostModelExecutor", "ExecFailure", "Executor"]
