"""The analytical profile against the measured profiles we ship (docs/profiles.md, "Validation").

The original's two models were measured on its seven GPU types (docs/original.md §3.2). Each
type's efficiency factor is fitted on LLaMA-2-70B's tables alone (:func:`fit_on_reference`);
LLaMA-1-30B's tables are the out-of-sample check. The ``CPU`` type's factor is fitted on the
shipped CPU profile of SmolLM2-135M-Instruct alone (:func:`fit_cpu`); tiny-llama's CPU profile
checks it (:func:`compare_cpu`). ``bench/bench_analytical.py`` prints the resulting error tables.

Units: seconds; errors are ``predicted / measured - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from ..fileio import load_toml
from ..model import PROFILE_META, dataset_constants, get_model, read_profile_table
from .analytical import LayerShape, fit_efficiency, layer_time
from .gpus import GpuType, find_gpu

__all__ = ["CHECK_MODEL", "CPU_CHECK_MODEL", "CPU_FIT_MODEL", "CPU_TYPE", "FIT_MODEL", "MEASURED_GPUS", "CpuProfile",
           "PointError", "compare", "compare_cpu", "fit_cpu", "fit_on_reference", "measured_cpu", "measured_points"]

#: the model every factor is fitted on, and the one that checks it
FIT_MODEL, CHECK_MODEL = "llama2-70b", "llama1-30b"
#: the original's measured GPU types (docs/original.md §3.2), in its order
MEASURED_GPUS = ("A100", "V100", "L4", "L4x2", "T4", "T4x2", "T4x4")
#: the CPU type of the datasheet table, the shipped CPU profile its factor is fitted on, and the
#: one that checks it (profile keys: directories under helix_async/data/profiles)
CPU_TYPE, CPU_FIT_MODEL, CPU_CHECK_MODEL = "CPU", "smollm2_135m_instruct", "tiny_llama"
#: how the shipped CPU profiles without a profile.toml were measured, as (tokens per prompt
#: request, tokens cached per decoding sequence): tiny-llama's by the ``profile`` command of
#: commit c940496 (helix_async/data/PROVENANCE.md)
_CPU_CONDITIONS = {"tiny_llama": (128, 128)}
_DATA = resources.files("helix_async") / "data" / "profiles"


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


# ---- the CPU type --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuProfile:
    """A shipped measured CPU profile as the analytical time needs it: the layer shape, the
    measuring conditions (tokens per prompt request, tokens cached per decode) and its points
    ``(phase, x, seconds)``, x > 0."""

    key: str
    shape: LayerShape
    prompt_len: int
    context: int
    points: tuple[tuple[str, float, float], ...]


def measured_cpu(key: str) -> CpuProfile:
    """The shipped ``CPU`` tables of the model whose profile key is ``key``. The shape and the
    conditions come from the directory's profile.toml when it has one (the LLaMA models measured
    there have no biases), else from the built-in model and ``_CPU_CONDITIONS``; no model file is
    read, so this works without the model installed."""
    d = _DATA / key
    where = f"helix_async/data/profiles/{key}"
    meta = d / PROFILE_META
    if meta.is_file():
        raw = load_toml(meta, "profile description", src=f"{where}/{PROFILE_META}")
        m, how = raw["model"], raw["measurement"][CPU_TYPE]
        shape = LayerShape(int(m["hidden_size"]), int(m["intermediate_size"]), int(m["num_attention_heads"]),
                           int(m["num_key_value_heads"]), int(m["head_dim"]))
        plen, ctx = int(how["prompt_len"]), int(how["decode_ctx"])
    else:
        shape = LayerShape.of(get_model(key))
        plen, ctx = _CPU_CONDITIONS[key]
    pts: list[tuple[str, float, float]] = []
    for phase in ("prompt", "decode"):
        name = f"{CPU_TYPE.lower()}_{phase}.csv"
        xs, ys = read_profile_table(d / name, f"{where}/{name}")
        pts += [(phase, x, y) for x, y in zip(xs, ys, strict=True) if x > 0]
    return CpuProfile(key, shape, plen, ctx, tuple(pts))


def fit_cpu() -> float:
    """The CPU type's efficiency fitted on CPU_FIT_MODEL's measured CPU profile only."""
    p = measured_cpu(CPU_FIT_MODEL)
    return fit_efficiency(p.shape, _gpu(CPU_TYPE), dataset_constants(), p.points, prompt_len=p.prompt_len,
                          context=p.context)


def compare_cpu(key: str, efficiency: float | None = None) -> list[PointError]:
    """Every point of the shipped CPU profile of ``key`` against the analytical time under the
    conditions it was measured in, at the datasheet table's factor (or ``efficiency``)."""
    p = measured_cpu(key)
    g = _gpu(CPU_TYPE)
    out = []
    for phase, x, s in p.points:
        kw = {"prompt_tokens": int(x)} if phase == "prompt" else {"decode_seqs": int(x)}
        pred = layer_time(p.shape, g, prompt_len=p.prompt_len, context=p.context, efficiency=efficiency, **kw)
        out.append(PointError(key, g.name, phase, int(x), s, pred))
    return out
