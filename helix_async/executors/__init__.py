"""Executors: what runs a worker's layers on a batch.

``base`` defines the :class:`Executor` interface and the :class:`Batch` it receives; ``registry``
is the table of executors by name (factory, flags, capabilities) that the worker process,
``launch`` and ``serve`` read; ``cost_model`` prices a batch from the measured per-layer profiles
(the simulator, and the cost-model emulation in real time); ``null`` costs nothing (overhead
benchmarks); ``torch`` (with the model in ``llama``) computes them, and is with ``llama`` the only
module that imports torch (import it as ``helix_async.executors.torch``, or build it through the
registry).
"""

from .base import Batch, ExecFailure, Executor
from .cost_model import CostModelExecutor
from .registry import EXECUTORS, ExecutorContext, ExecutorEntry, ExecutorLoadError, executor_entry

__all__ = [
    "EXECUTORS",
    "Batch",
    "CostModelExecutor",
    "ExecFailure",
    "Executor",
    "ExecutorContext",
    "ExecutorEntry",
    "ExecutorLoadError",
    "executor_entry",
]
