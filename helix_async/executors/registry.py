"""Executors by name: the one table a worker, ``launch`` and ``serve`` read (docs/runtime.md).

An entry says how to build the executor (``factory``: ``"module:function"``, imported only when a
worker builds one, so that torch stays out of a worker that does not use it), which worker flags
it reads (declared here, added to ``python -m helix_async worker`` by the CLI), and what it can do:
the devices it runs on, the weight formats it reads, the optional dependency it needs, whether it
prices batches from a machine type's profile, and whether it emulates a cluster in real time.

Adding an executor is its own module with a factory ``build(ctx: ExecutorContext) -> Executor``,
and one entry in :data:`EXECUTORS` (or a :func:`register` call) with its test.  A factory that
cannot load its model raises :class:`ExecutorLoadError`, saying whether memory ran out: the worker
reports it to the host as ``OUT_OF_MEMORY`` or ``LOAD_FAILED`` accordingly.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, HelixError

if TYPE_CHECKING:
    from ..clock import Clock
    from ..model import GpuProfile, ModelSpec
    from .base import Executor

__all__ = [
    "EXECUTORS",
    "ExecutorContext",
    "ExecutorEntry",
    "ExecutorLoadError",
    "Flag",
    "executor_entry",
    "executor_flags",
    "register",
]


class ExecutorLoadError(HelixError, RuntimeError):
    """An executor could not load its part of the model.

    out_of_memory: True when the device had no room for it (the layers' weights exceed what it
    holds or has free, or an allocation failed); False for anything else (a bad or missing
    checkpoint, an unknown dtype, no CUDA).
    """

    def __init__(self, message: str, *, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


@dataclass(frozen=True)
class Flag:
    """A ``worker`` flag an executor reads.

    option: the flag ("--dtype"); dest: the option's name in ``WorkerOptions.values()``.  kind: how
    the CLI parses it: ``str``, ``int``, ``positive`` (a finite number > 0) or ``positive_int``.
    default: the default of a flag no ``WorkerOptions`` field holds (a field's default is the
    field's).  choices, metavar, help: as for argparse.
    """

    option: str
    dest: str
    help: str
    kind: str = "str"
    choices: tuple[str, ...] | None = None
    default: Any = None
    metavar: str | None = None

    def __post_init__(self) -> None:
        if not self.option.startswith("--"):
            raise ValueError(f"flag {self.option!r}: expected --NAME")
        if self.kind not in ("str", "int", "positive", "positive_int"):
            raise ValueError(f"flag {self.option}: kind {self.kind!r} is not str, int, positive or positive_int")


@dataclass(frozen=True)
class ExecutorContext:
    """What a factory builds an executor from.

    clock: the worker's clock. model: the plan's model. layers: ``(a, b)``, the layers it runs.
    options: the worker's options by dest (``WorkerOptions.values()``: the executors' flags among
    them). profile: the machine type's GPU profile, for an entry with ``needs_profile`` (else None).
    """

    clock: Clock
    model: ModelSpec
    layers: tuple[int, int]
    options: Mapping[str, Any]
    profile: GpuProfile | None = None


@dataclass(frozen=True)
class ExecutorEntry:
    """One executor (see the module doc).

    name: what ``--executor`` takes. summary: one line for ``--help``. factory: ``"module:function"``
    taking an :class:`ExecutorContext` (a module path relative to this package when it starts with a
    dot). flags: the worker flags it reads beyond the common ones. devices: the kinds of ``--device``
    it computes on (``cpu``, ``cuda``; empty: it computes on none, and ``launch`` reserves no GPU
    for it). weight_formats: the weights it reads (empty: none; it computes
    nothing). extra: ``(module, extra)`` it imports (checked before a worker registers, and by
    ``serve`` before it starts workers), or None. needs_profile: it prices batches from the
    profile of the machine type it emulates (``--machine-type`` required). emulates: it emulates a
    cluster in real time, slowed by ``--time-scale``: its links may be emulated too (``--plan``)
    and the host holds its own messages back (``host --emulate``). blocking: the factory blocks
    (it loads weights), so the worker runs it off its event loop.
    """

    name: str
    summary: str
    factory: str
    flags: tuple[Flag, ...] = ()
    devices: tuple[str, ...] = ()
    weight_formats: tuple[str, ...] = ()
    extra: tuple[str, str] | None = None
    needs_profile: bool = False
    emulates: bool = False
    blocking: bool = False

    def reads(self, option: str) -> bool:
        """Whether it reads the worker flag ``option`` (``--checkpoint``)."""
        return any(f.option == option for f in self.flags)

    def build(self, ctx: ExecutorContext) -> Executor:
        """Import the factory and build the executor (may raise :class:`ExecutorLoadError`)."""
        module, _, func = self.factory.partition(":")
        mod = importlib.import_module(module, __package__) if module.startswith(".") else importlib.import_module(module)
        return getattr(mod, func)(ctx)

    def describe(self) -> str:
        """One line: the name, the summary and the capabilities."""
        what = f"devices {'/'.join(self.devices)}" if self.devices else "no device"
        if self.weight_formats:
            what += f"; weights: {', '.join(self.weight_formats)}"
        if self.needs_profile:
            what += "; needs --machine-type"
        return f"{self.name}: {self.summary} ({what})"


_TORCH_FLAGS = (
    Flag("--checkpoint", "checkpoint", "a Hugging Face checkpoint directory or a GGUF file (default: the plan's "
         "model's own files; seeded dummy weights for a built-in name)"),
    Flag("--dtype", "dtype", "compute dtype (default: the checkpoint's; float32 for a GGUF and dummy weights)",
         choices=("float32", "float64", "float16", "bfloat16")),
    Flag("--seed", "seed", "seed of the dummy weights", kind="int"),
    Flag("--threads", "threads", "torch threads (default %(default)s)", kind="positive_int"),
)
_COST_MODEL_FLAGS = (
    Flag("--time-scale", "time_scale", "cost-model: slow every modelled duration by K", kind="positive"),
    Flag("--plan", "plan", "cost-model: emulate this plan's links out of the node (scaled by --time-scale)"),
)

#: Every executor, by name, in the order ``--help`` lists them.
EXECUTORS: dict[str, ExecutorEntry] = {
    e.name: e
    for e in (
        ExecutorEntry("torch", "computes the layers of a LLaMA model", ".torch:from_context", _TORCH_FLAGS,
                      devices=("cpu", "cuda"), weight_formats=("hf-safetensors", "gguf", "dummy"), extra=("torch", "torch"),
                      blocking=True),
        ExecutorEntry("cost-model", "the simulator's executor on the real clock: each batch takes its profiled time",
                      ".cost_model:from_context", _COST_MODEL_FLAGS, needs_profile=True, emulates=True),
        ExecutorEntry("null", "no cost: the runtime's own overhead (benchmarks)", ".null:from_context"),
    )
}


def register(entry: ExecutorEntry) -> None:
    """Add ``entry`` to :data:`EXECUTORS` (a name already there is an error, as is a flag declared
    differently by another entry)."""
    if entry.name in EXECUTORS:
        raise ValueError(f"executor {entry.name!r} is registered already")
    EXECUTORS[entry.name] = entry
    try:
        executor_flags()
    except ValueError:
        del EXECUTORS[entry.name]
        raise


def executor_entry(name: str, flag: str = "--executor") -> ExecutorEntry:
    """The entry of ``name``; ConfigError naming ``flag`` when there is none."""
    entry = EXECUTORS.get(name)
    if entry is None:
        raise ConfigError("<argument>", flag, f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    return entry


def executor_flags() -> list[Flag]:
    """The flags of every executor, each once, in table order (ValueError when two entries declare
    one flag differently)."""
    seen: dict[str, Flag] = {}
    for entry in EXECUTORS.values():
        for f in entry.flags:
            old = seen.setdefault(f.option, f)
            if old != f:
                raise ValueError(f"executor {entry.name!r} declares {f.option} unlike another executor does")
    return list(seen.values())
