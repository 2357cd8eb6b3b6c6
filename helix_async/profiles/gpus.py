"""The datasheet table: peak FLOP/s, memory bandwidth, VRAM and interconnect per GPU type, and
per CPU type (one core of a processor).

Data: ``helix_async/data/profiles/gpus.toml`` (figures from the vendors' datasheets, each entry
names its source). A type is one GPU (``[gpu.NAME]``), a tensor-parallel group of ``count``
GPUs of one type (``[group.NAME]``, e.g. the original's ``L4x2``; any other ``<GPU>x<N>`` name is
understood as a group too), or one CPU core (``[cpu.NAME]``: computes in float32, no groups).
How the figures become per-layer times: docs/profiles.md.

Units: FLOP/s, bytes/s, bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from ..fileio import load_toml

__all__ = ["GPU_TABLE", "GpuType", "find_gpu", "gpu_types"]

GPU_TABLE = "gpus.toml"
_SOURCE = f"helix_async/data/profiles/{GPU_TABLE}"
#: bytes per element of a compute dtype (as helix_async.models.arch's table, which imports the model
#: registry and so cannot be imported here)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_GROUP = re.compile(r"^(?P<gpu>.+?)x(?P<n>[1-9][0-9]*)$", re.IGNORECASE)


@dataclass(frozen=True)
class GpuType:
    """One GPU type of the datasheet table (a single GPU, or ``count`` of them in tensor parallel).

    flops: peak dense FP16/BF16 tensor FLOP/s of ONE GPU. mem_bw: DRAM bytes/s of one GPU.
    vram: bytes of one GPU. link_bw: bytes/s one way between two GPUs of a group. count: GPUs in
    the group (1 for a single GPU). efficiency: the fraction of ``flops`` a layer's matrix products
    reach (the one calibrated number; docs/profiles.md). efficiency_source: the type it was fitted
    on ("" when fitted on this type itself). source: the datasheet(s). device: "cuda" for a GPU,
    "cpu" for one CPU core (flops: its peak fp32 FLOP/s; mem_bw: its share of the memory system;
    vram and link_bw: 0, its node settings do not come from them). dtype: the compute dtype the
    model is served in on it (weights, KV and activations; float16 on a GPU, float32 on a CPU).
    """

    name: str
    gpu: str
    count: int
    flops: float
    mem_bw: float
    vram: float
    link_bw: float
    efficiency: float
    efficiency_source: str
    description: str
    source: str
    device: str = "cuda"
    dtype: str = "float16"

    @property
    def element_bytes(self) -> int:
        """Bytes of one weight, KV or activation element in the compute dtype."""
        return DTYPE_BYTES[self.dtype]

    @property
    def total_vram(self) -> float:
        """Bytes of memory of the whole group."""
        return self.vram * self.count

    @property
    def fitted(self) -> bool:
        """True when ``efficiency`` was fitted on this type's own measured profile."""
        return not self.efficiency_source


def _number(where: str, table: Mapping[str, Any], key: str) -> float:
    v = table.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConfigError(_SOURCE, f"{where}.{key}", f"must be a positive number, got {v!r}")
    return float(v)


def _parse(raw: Mapping[str, Any]) -> dict[str, GpuType]:
    gpus: dict[str, GpuType] = {}
    singles = raw.get("gpu", {})
    # a borrowed factor names a type that was fitted itself: resolve those first
    for name, t in singles.items():
        where = f"gpu.{name}"
        if "efficiency" in t:
            eff, src = _number(where, t, "efficiency"), ""
        else:
            src = str(t.get("efficiency_from", ""))
            base = singles.get(src)
            if base is None or "efficiency" not in base:
                raise ConfigError(_SOURCE, f"{where}.efficiency_from",
                                  f"needs efficiency, or efficiency_from naming a fitted GPU; got {src!r}")
            eff = _number(f"gpu.{src}", base, "efficiency")
        gpus[name] = GpuType(
            name=name, gpu=name, count=1, flops=_number(where, t, "flops"), mem_bw=_number(where, t, "mem_bw"),
            vram=_number(where, t, "vram"), link_bw=_number(where, t, "link_bw"), efficiency=eff,
            efficiency_source=src, description=str(t.get("description", name)), source=str(t.get("source", "")),
        )
    for name, t in raw.get("cpu", {}).items():
        # one core: fitted on a measured CPU profile of its own, computing in float32
        where = f"cpu.{name}"
        if name in gpus:
            raise ConfigError(_SOURCE, where, "a [gpu.*] entry has the same name")
        dtype = t.get("dtype", "float32")
        if dtype not in DTYPE_BYTES:
            raise ConfigError(_SOURCE, f"{where}.dtype", f"{dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        gpus[name] = GpuType(
            name=name, gpu=name, count=1, flops=_number(where, t, "flops"), mem_bw=_number(where, t, "mem_bw"),
            vram=0.0, link_bw=0.0, efficiency=_number(where, t, "efficiency"), efficiency_source="",
            description=str(t.get("description", name)), source=str(t.get("source", "")), device="cpu", dtype=dtype,
        )
    for name, t in raw.get("group", {}).items():
        where = f"group.{name}"
        base_gpu = gpus.get(str(t.get("gpu", "")))
        if base_gpu is None or base_gpu.device != "cuda":
            raise ConfigError(_SOURCE, f"{where}.gpu", f"{t.get('gpu')!r} is not a [gpu.*] entry")
        count = t.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ConfigError(_SOURCE, f"{where}.count", f"must be an integer >= 2, got {count!r}")
        gpus[name] = _group(name, base_gpu, count, _number(where, t, "efficiency") if "efficiency" in t else None,
                            str(t.get("description", "")))
    return gpus


def _group(name: str, base: GpuType, count: int, efficiency: float | None, description: str = "") -> GpuType:
    return GpuType(
        name=name, gpu=base.gpu, count=count, flops=base.flops, mem_bw=base.mem_bw, vram=base.vram,
        link_bw=base.link_bw,
        efficiency=base.efficiency if efficiency is None else efficiency,
        efficiency_source=(base.efficiency_source or base.name) if efficiency is None else "",
        description=description or f"{count}x {base.description}, tensor-parallel", source=base.source,
    )


@functools.lru_cache(maxsize=1)
def gpu_types() -> Mapping[str, GpuType]:
    """Every type of the datasheet table, by name (in file order: single GPUs, CPU types, then groups)."""
    raw = load_toml(resources.files("helix_async") / "data" / "profiles" / GPU_TABLE, "GPU table",
                    src=f"helix_async/data/profiles/{GPU_TABLE}")
    return MappingProxyType(_parse(raw))


def find_gpu(name: str) -> GpuType | None:
    """The datasheet type called ``name`` (case-insensitive), a ``<GPU>x<N>`` group of a known GPU
    (not of a CPU type), or None."""
    table = gpu_types()
    low = name.lower()
    for key, g in table.items():
        if key.lower() == low:
            return g
    m = _GROUP.match(name)
    if m is not None:
        base = find_gpu(m.group("gpu"))
        n = int(m.group("n"))
        if base is not None and base.count == 1 and base.device == "cuda":
            return base if n == 1 else _group(f"{base.name}x{n}", base, n, None)
    return None
