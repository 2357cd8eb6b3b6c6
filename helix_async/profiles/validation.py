"""The analytical profile against the measured profiles we ship (docs/profiles.md, "Validation").

The original's two models were measured on its seven GPU types (docs/original.md §3.2). Each
type's efficiency factor is fitted on LLaMA-2-70B's tables alone (:func:`fit_on_reference`);
LLaMA-1-30B's tables are the out-of-sample check. ``bench/bench_analytical.py`` prints the
resulting error table.

Units: seconds; errors are ``predicted / measured - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from ..model import dataset_constants, get_model, read_profile_table
from .analytical import LayerShape, fit_efficiency, layer_time
from .gpus import GpuType, find_gpu

__all__ = ["CHECK_MODEL", "FIT_MODEL", "MEASURED_GPUS", "PointError", "compare", "fit_on_reference", "measured_points"]

#: the model every factor is fitted on, and the one that checks it
FIT_MODEL, CHECK_MODEL = "llama2-70b", "llama1-30b"
#: the original's measured GPU types (docs/original.md §3.2), in its order
MEASURED_GPUS = ("A100", "V100", "L4", "L4x2", "T4", "T4x2", "T4x4")


@dataclass(frozen=True)
class PointError:
    """One measured grid point against the analytical time: ``phase`` is prompt (x = tokens) or
    decode (x = sequences); times in seconds per layer."""

    model: str
    gpu: str
    phase: str
    x: int
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        """predicted / measured - 1."""
        return self.predicted / self.measured - 1


def measured_points(model: str, gpu: str) -> list[tuple[str, float, float]]:
    """The shipped measured profile of ``model`` on ``gpu`` as ``(phase, x, seconds)`` points,
    x > 0 (read from helix_async/data/profiles, never from the user's profile directory)."""
    spec = get_model(model)
    d = resources.files("helix_async") / "data" / "profiles" / spec.key
    out: list[tuple[str, float, float]] = []
    for phase in ("prompt", "decode"):
        xs, ys = read_profile_table(d / f"{gpu.lower()}_{phase}.csv", f"{spec.key}/{gpu.lower()}_{phase}.csv")
        out += [(phase, x, y) for x, y in zip(xs, ys, strict=True) if x > 0]
    return out


def _gpu(gpu: str) -> GpuType:
    g = find_gpu(gpu)
    if g is None:
        raise KeyError(f"{gpu} is not in the datasheet table")
    return g


def fit_on_reference(gpu: str) -> float:
    """The efficiency of ``gpu`` fitted on FIT_MODEL's measured profile only."""
    return fit_efficiency(LayerShape.of(get_model(FIT_MODEL)), _gpu(gpu), dataset_constants(),
                          measured_points(FIT_MODEL, gpu))


def compare(model: str, gpu: str, efficiency: float | None = None) -> list[PointError]:
    """Every measured point of ``model`` on ``gpu`` against the analytical time, at the datasheet
    table's factor (or ``efficiency``)."""
    spec = get_model(model)
    shape = LayerShape.of(spec)
    g = _gpu(gpu)
    c = dataset_constants()
    ctx = c.avg_input_len + c.avg_output_len / 2
    out = []
    for phase, x, s in measured_points(model, gpu):
        kw = {"prompt_tokens": int(x)} if phase == "prompt" else {"decode_seqs": int(x)}
        pred = layer_time(shape, g, prompt_len=c.avg_input_len, context=ctx, efficiency=efficiency, **kw)
        out.append(PointError(spec.name, g.name, phase, int(x), s, pred))
    return out
