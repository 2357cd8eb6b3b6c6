"""Executors: what runs a worker's layers on a batch.

``base`` defines the :class:`Executor` interface and the :class:`Batch` it receives;
``cost_model`` prices a batch from the measured per-layer profiles (the simulator, and the
cost-model emulation in real time).  The torch executor (runtime issue) is the only module that
imports torch.
"""

from .base import Batch, Executor
from .cost_model import CostModelExecutor

__all__ = ["Batch", "CostModelExecutor", "Executor"]
