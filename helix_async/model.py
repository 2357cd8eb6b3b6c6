"""Models, per-GPU layer profiles, node settings and the Helix typical-batch throughput model.

Data: ``helix_async/data/profiles/`` (measured by the Helix authors with vLLM 0.4.0.post1, from the
public Helix-ASPLOS25 repository, Apache-2.0; see ``data/PROVENANCE.md``). Formulas: docs/original.md §3.

Profiles for any model (docs/profiles.md): the measured ones shipped under ``data/profiles/<key>/``
and kept in the user's profile directory (``HELIX_PROFILE_DIR/<key>/``, what ``profile`` writes),
and, for every other type of the datasheet table (the GPUs and the ``CPU`` core), analytical ones
(``helix_async.profiles``).

Units: seconds, bytes, bytes/s; throughput in tokens/s where one token passes every layer a node
holds; KV capacities in token x layer entries.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import functools
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import envs
from .errors import ConfigError
from .fileio import load_toml
from .interp import BatchTimer
from .profiles.analytical import LayerShape, analytical_settings, analytical_tables, typical_constants
from .profiles.gpus import find_gpu, gpu_types

if TYPE_CHECKING:
    from .cluster import ClusterSpec, MachineType

_DATA = resources.files("helix_async") / "data" / "profiles"


@dataclass(frozen=True)
class DatasetConstants:
    """Constants of the dataset the profiles and the typical-batch model assume (docs/original.md §1)."""

    avg_input_len: int = 750
    avg_output_len: int = 240
    max_input_len: int = 2048
    vllm_block_size: int = 16
    decode_per_token_max_context: int = 1000
    typical_kv_fill: float = 0.3  # fraction of a node's KV cache the typical batch fills
    typical_model_iterations: int = 10
    typical_layers_switch_factor: float = 1.2


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A decoder-only transformer as the planner and simulator see it."""

    name: str  # canonical name, e.g. "llama2-70b"
    key: str  # directory of its profiles under data/profiles ("llama2_70b")
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    param_bytes_per_layer: float  # bytes of one transformer layer's weights
    token_size: int  # bytes per token id on the wire
    activation_size: int  # bytes of one token's activation (hidden_size x dtype bytes)
    kv_bytes_per_token_per_layer: int
    gpus: tuple[str, ...]  # GPU types with profiles: measured first, then analytical (profile_kinds)
    typical_layers_a: Mapping[str, int] = field(default_factory=dict)
    typical_layers_b: Mapping[str, int] = field(default_factory=dict)
    normalized_perf_initial: Mapping[str, float] = field(default_factory=dict)
    max_num_layers: Mapping[str, int] = field(default_factory=dict)
    hf_name: str = ""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # A model read from its own files (helix_async.models): ``ref`` is what resolves it again
    # (the --model text, or an absolute path; "" for the built-in names, whose ``name`` does),
    # ``arch`` its ArchConfig, ``checkpoint`` the directory or GGUF file its weights are in,
    # ``weights`` their format ("hf-safetensors", "gguf", or "" for dummy weights).
    # ``profile_kinds``: per GPU type of ``gpus``, "measured" or "analytical".
    ref: str = ""
    arch: Any = None
    checkpoint: str = ""
    weights: str = ""
    profile_kinds: Mapping[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """What ``get_model`` resolves to this model again (a plan file's ``model``)."""
        return self.ref or self.name


MODEL_ALIASES: dict[str, str] = {
    "llama2-70b": "llama2-70b",
    "llama2_70b": "llama2-70b",
    "llama-2-70b": "llama2-70b",
    "llama70b": "llama2-70b",
    "llama1-30b": "llama1-30b",
    "llama1_30b": "llama1-30b",
    "llama-30b": "llama1-30b",
    "llama30b": "llama1-30b",
    "tiny-llama": "tiny-llama",
    "tiny_llama": "tiny-llama",
    "tinyllama": "tiny-llama",
}
MODEL_NAMES: tuple[str, ...] = ("llama2-70b", "llama1-30b", "tiny-llama")


def _tiny_llama() -> ModelSpec:
    # A LLaMA-architecture model small enough to run every layer on a CPU in milliseconds (the
    # serving runtime's CPU demo). Shape choices are ours: 8 layers, hidden 256, GQA 8/4 heads,
    # fp32 weights; parameter bytes follow from the shape.
    layers, hidden, inter, heads, kv_heads, vocab = 8, 256, 688, 8, 4, 2048
    head_dim = hidden // heads
    kv_dim = kv_heads * head_dim
    bytes_per = 4
    params = hidden * hidden * 2 + hidden * kv_dim * 2 + 3 * hidden * inter + 2 * hidden
    return ModelSpec(
        name="tiny-llama",
        key="tiny_llama",
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        dtype="float32",
        param_bytes_per_layer=float(params * bytes_per),
        token_size=4,
        activation_size=hidden * bytes_per,
        kv_bytes_per_token_per_layer=2 * kv_dim * bytes_per,
        # measured on this project's 2-core development machine with `python -m helix_async profile`
        # (data/profiles/tiny_llama/, see data/PROVENANCE.md): one CPU worker process holds it all
        gpus=("CPU",),
        typical_layers_a={"CPU": layers},
        typical_layers_b={"CPU": layers},
        normalized_perf_initial={"CPU": 1.0},
        max_num_layers={"CPU": layers},
        hf_name="(synthetic, random weights)",
    )


@functools.lru_cache(maxsize=1)
def _models_toml() -> dict[str, Any]:
    return load_toml(_DATA / "models.toml", "model table", src=f"{_SHIPPED}/models.toml")


@functools.lru_cache(maxsize=1)
def dataset_constants() -> DatasetConstants:
    """The dataset constants shipped in models.toml."""
    d = _models_toml()["dataset_constants"]
    return DatasetConstants(**{k: d[k] for k in DatasetConstants.__dataclass_fields__})


def get_model(model: str | ModelSpec) -> ModelSpec:
    """Return the model called ``model`` (canonical name or alias, case-insensitive); a ModelSpec
    is returned as it is, so every function can take either.

    Raises ConfigError naming the known models for anything else.
    """
    if isinstance(model, ModelSpec):
        return model
    if model.strip().lower() in MODEL_ALIASES:
        return _model_by_name(model)
    # a model from its own files (a checkpoint directory, a GGUF file, a packaged model)
    from .models.sources import resolve_model

    return resolve_model(model, "model").spec


def _model_by_name(name: str) -> ModelSpec:
    canon = MODEL_ALIASES.get(name.strip().lower())
    if canon is None:
        raise ConfigError("<argument>", "model", f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    # the same object while its profiles stay the same (ModelSpec compares by identity)
    spec = attach_profiles(_named.get(canon) or _base_model(canon))
    _named[canon] = spec
    return spec


_named: dict[str, ModelSpec] = {}


@functools.cache
def _base_model(canon: str) -> ModelSpec:
    """A built-in spec as written down: its measured GPU types and the original's hand-set
    typical-batch constants only (attach_profiles adds the rest)."""
    if canon == "tiny-llama":
        return _tiny_llama()
    key = canon.replace("-", "_")
    d = _models_toml()[key]
    return ModelSpec(
        name=canon,
        key=key,
        num_layers=int(d["num_layers"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_attention_heads=int(d["num_attention_heads"]),
        num_key_value_heads=int(d["num_key_value_heads"]),
        head_dim=int(d["head_dim"]),
        vocab_size=int(d["vocab_size"]),
        dtype=str(d["dtype"]),
        param_bytes_per_layer=float(d["param_bytes_per_layer"]),
        token_size=int(d["token_size_bytes"]),
        activation_size=int(d["activation_size_bytes"]),
        kv_bytes_per_token_per_layer=int(d["kv_bytes_per_token_per_layer"]),
        gpus=tuple(d["gpus"]),
        typical_layers_a=dict(d["typical_layers_A"]),
        typical_layers_b=dict(d["typical_layers_B"]),
        normalized_perf_initial={k: float(v) for k, v in d["normalized_perf_initial"].items()},
        max_num_layers=dict(d["max_num_layers"]),
        hf_name=str(d.get("hf_name", "")),
    )


@dataclass(frozen=True)
class NodeSettings:
    """Per (model, GPU) inference settings, each tuple indexed by ``k - 1`` for k held layers."""

    gpu: str
    max_layers: int
    vllm_blocks: tuple[int, ...]
    kv_capacity: tuple[int, ...]  # token x layer entries = 16 * blocks[k] * k
    prompt_max_requests: tuple[int, ...]
    prompt_max_tokens: tuple[int, ...]
    decode_max_tokens: tuple[int, ...]
    decode_max_context: tuple[int, ...]

    def _at(self, values: tuple[int, ...], k: int) -> int:
        if not 1 <= k <= self.max_layers:
            raise ValueError(f"{self.gpu} holds 1..{self.max_layers} layers, not {k}")
        return values[k - 1]

    def kv(self, k: int) -> int:
        """KV capacity (token x layer entries) of a node holding ``k`` layers."""
        return self._at(self.kv_capacity, k)

    def prompt_limit_tokens(self, k: int) -> int:
        return self._at(self.prompt_max_tokens, k)

    def prompt_limit_requests(self, k: int) -> int:
        return self._at(self.prompt_max_requests, k)

    def decode_limit_tokens(self, k: int) -> int:
        return self._at(self.decode_max_tokens, k)

    def decode_limit_context(self, k: int) -> int:
        return self._at(self.decode_max_context, k)


@dataclass(frozen=True)
class GpuProfile:
    """Measured per-layer latency of one GPU type for one model (seconds per layer)."""

    gpu: str
    prompt_x: tuple[float, ...]
    prompt_s: tuple[float, ...]
    decode_x: tuple[float, ...]
    decode_s: tuple[float, ...]
    timer: Any = field(compare=False, repr=False)  # BatchTimer (compiled or pure)
    # The model's head on the last stage (final norm, LM head, token choice), seconds per batch by
    # the sequences leaving the last layer (prompts and decodes): ``<gpu>_head.csv`` of a measured
    # profile (docs/profiles.md); empty when the profile has none (the original's: not priced).
    head_x: tuple[float, ...] = ()
    head_s: tuple[float, ...] = ()

    def head(self, seqs: float) -> float:
        """Seconds of the head for a batch of ``seqs`` sequences: linear between the measured
        points, along the last segment past the last one; 0.0 without a head table."""
        xs, ys = self.head_x, self.head_s
        if not xs or seqs <= 0:
            return 0.0
        i = bisect.bisect_right(xs, seqs) - 1
        if i >= 0 and xs[i] == seqs:
            return ys[i]
        i = min(max(i, 0), len(xs) - 2)
        return ys[i] + (ys[i + 1] - ys[i]) * (seqs - xs[i]) / (xs[i + 1] - xs[i])

    def prompt(self, tokens: float) -> float:
        return float(self.timer.prompt(tokens))

    def decode(self, seqs: float) -> float:
        return float(self.timer.decode(seqs))

    def batch_time(self, prompt_tokens: int, decode_seqs: int) -> float:
        """Seconds for one layer to run ``prompt_tokens`` prompt tokens plus ``decode_seqs`` decodes."""
        return float(self.timer.batch_time(prompt_tokens, decode_seqs))


@dataclass(frozen=True)
class ProfileSet:
    """All profiles and node settings of one model, keyed by GPU type (upper case, e.g. "L4x2")."""

    model: ModelSpec
    gpus: Mapping[str, GpuProfile]
    settings: Mapping[str, NodeSettings]
    # per GPU type: "measured" or "analytical", and where its profile comes from (a directory of
    # measured tables, or the datasheet entry it was computed from)
    kinds: Mapping[str, str] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)

    def kind(self, gpu: str) -> str:
        """``measured`` or ``analytical`` for ``gpu`` (matched case-insensitively); "" if unknown."""
        return self.kinds.get(self.canonical(gpu), "")

    def canonical(self, gpu: str) -> str:
        """The profile key for ``gpu``, matched case-insensitively ("l4x2" -> "L4x2")."""
        if gpu in self.gpus or gpu in self.settings:
            return gpu
        low = gpu.lower()
        for key in (*self.gpus, *self.settings):
            if key.lower() == low:
                return key
        return gpu

    def profile(self, gpu: str) -> GpuProfile:
        try:
            return self.gpus[self.canonical(gpu)]
        except KeyError:
            raise ConfigError(
                f"<profiles {self.model.name}>",
                "gpu",
                f"no layer profile for GPU {gpu!r} with model {self.model.name}; have: {', '.join(self.gpus) or 'none'}",
            ) from None

    def node_settings(self, gpu: str) -> NodeSettings:
        try:
            return self.settings[self.canonical(gpu)]
        except KeyError:
            raise ConfigError(
                f"<profiles {self.model.name}>",
                "gpu",
                f"no node settings for GPU {gpu!r} with model {self.model.name}; have: {', '.join(self.settings) or 'none'}",
            ) from None


# ---- profiles for any model (docs/profiles.md) ---------------------------------------------------

#: the kinds of profile a GPU type can have: timed on the machine, or computed from its datasheet
MEASURED, ANALYTICAL = "measured", "analytical"
#: the file beside a measured profile that says which model shape it was measured for
PROFILE_META = "profile.toml"
_SHIPPED = "helix_async/data/profiles"


def read_profile_table(src: Traversable, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """One measured table (``batch_tokens,time_per_layer_ms``) as (x, seconds per layer); ``where``
    names it in errors."""
    try:
        with src.open() as fh:
            rows = list(csv.DictReader(fh))
        xs = tuple(float(r["batch_tokens"]) for r in rows)
        # The CSVs hold milliseconds; the Helix loader multiplies by 1e-3 (docs/original.md §3.2).
        ys = tuple(float(r["time_per_layer_ms"]) * 1e-3 for r in rows)
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as e:
        raise ConfigError(where, "batch_tokens,time_per_layer_ms", f"unreadable profile table: {e}") from None
    return xs, ys


#: the columns of a head table (``<gpu>_head.csv``): sequences in the batch, milliseconds per batch
HEAD_COLUMNS = ("sequences", "time_ms")


def read_head_table(src: Traversable, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A head table (``sequences,time_ms``, the first row ``0,0``) as (sequences, seconds per
    batch); ``where`` names it in errors."""
    try:
        with src.open() as fh:
            rows = list(csv.DictReader(fh))
        xs = tuple(float(r["sequences"]) for r in rows)
        ys = tuple(float(r["time_ms"]) * 1e-3 for r in rows)
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as e:
        raise ConfigError(where, ",".join(HEAD_COLUMNS), f"unreadable head table: {e}") from None
    if len(xs) < 2 or xs[0] != 0 or any(b <= a for a, b in zip(xs, xs[1:], strict=False)) or min(ys) < 0:
        raise ConfigError(where, "sequences", "needs the row 0,0 and at least one more, sequences increasing, "
                          "times >= 0")
    return xs, ys


def _read_settings_rows(src: Traversable, where: str, key: str) -> dict[str, list[dict[str, str]]]:
    """node_settings.csv rows of model ``key``, by GPU type."""
    rows: dict[str, list[dict[str, str]]] = {}
    try:
        with src.open() as fh:
            for r in csv.DictReader(fh):
                if r.get("model") == key:
                    rows.setdefault(str(r.get("gpu")), []).append(r)
    except (OSError, csv.Error) as e:
        raise ConfigError(where, "node_settings.csv", f"unreadable: {e}") from None
    return rows


@functools.cache
def _shipped_settings_rows(key: str) -> dict[str, list[dict[str, str]]]:
    return _read_settings_rows(_DATA / "node_settings.csv", f"{_SHIPPED}/node_settings.csv", key)


def _node_settings(rs: list[dict[str, str]], where: str, gpu: str) -> NodeSettings:
    try:
        rs = sorted(rs, key=lambda r: int(r["num_layers"]))
        max_layers = int(rs[0]["max_num_layers"])
        if [int(r["num_layers"]) for r in rs] != list(range(1, max_layers + 1)):
            raise ConfigError(where, gpu, "layer counts are not 1..max_num_layers")

        def col(c: str) -> tuple[int, ...]:
            return tuple(int(r[c]) for r in rs)

        return NodeSettings(
            gpu=gpu,
            max_layers=max_layers,
            vllm_blocks=col("vllm_num_blocks"),
            kv_capacity=col("kv_cache_capacity_token_layers"),
            prompt_max_requests=col("prompt_max_requests"),
            prompt_max_tokens=col("prompt_max_tokens"),
            decode_max_tokens=col("decode_max_tokens"),
            decode_max_context=col("decode_max_context"),
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(where, gpu, f"bad node settings row: {e}") from None


def _derived_settings(shape: LayerShape, gpu: str, num_layers: int, where: str) -> NodeSettings:
    """Node settings of a datasheet GPU type from its VRAM (docs/profiles.md, "Node settings")."""
    gt = find_gpu(gpu)
    if gt is None:
        raise ConfigError(where, gpu, "no node settings for this GPU type, and it is not in the datasheet table "
                          "(helix_async/data/profiles/gpus.toml) to derive them from")
    st = analytical_settings(shape, gt, num_layers, dataset_constants())
    if st is None:
        raise ConfigError(where, gpu, "not one layer of this model fits in half of this GPU type's memory")
    return NodeSettings(gpu, st.max_layers, st.vllm_blocks, st.kv_capacity, st.prompt_max_requests,
                        st.prompt_max_tokens, st.decode_max_tokens, st.decode_max_context)


def _shape_tuple(spec: ModelSpec) -> tuple[int, ...]:
    return (spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_attention_heads,
            spec.num_key_value_heads, spec.head_dim)


_SHAPE_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "head_dim")


def _declared_shape(d: Traversable, where: str, key: str) -> tuple[int, ...] | None:
    """The shape a measured directory says it was measured for: its profile.toml's [model], or for
    the original's models their models.toml entry; None when nothing says."""
    meta = d / PROFILE_META
    if meta.is_file():
        try:
            m = load_toml(meta, "profile description", src=f"{where}/{PROFILE_META}")["model"]
            return tuple(int(m[f]) for f in _SHAPE_FIELDS)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}/{PROFILE_META}", "model", f"unreadable: {e}") from None
    toml = _models_toml().get(key)
    if isinstance(toml, dict) and all(f in toml for f in _SHAPE_FIELDS):
        return tuple(int(toml[f]) for f in _SHAPE_FIELDS)
    return None


@functools.cache
def _shipped_dir(key: str) -> Traversable | None:
    d = _DATA / key
    return d if key and d.is_dir() else None


def _user_dir(key: str) -> Path | None:
    # os.path, not pathlib: this runs on every get_model of a built-in name
    d = os.path.join(os.path.expanduser(envs.HELIX_PROFILE_DIR), key)
    return Path(d) if key and os.path.isdir(d) else None


def measured_profile_dirs(key: str) -> list[tuple[Traversable, str]]:
    """Where measured profiles of the model whose profile key is ``key`` are kept, lowest
    precedence first, as (directory, its name for messages): the shipped
    ``helix_async/data/profiles/<key>/`` and the user's ``HELIX_PROFILE_DIR/<key>/``."""
    out: list[tuple[Traversable, str]] = []
    shipped, user = _shipped_dir(key), _user_dir(key)
    if shipped is not None:
        out.append((shipped, f"{_SHIPPED}/{key}"))
    if user is not None:
        out.append((user, str(user)))
    return out


def _gpu_key(low: str) -> str:
    """The GPU type a measured table's file name stands for: the datasheet's spelling, else upper case."""
    gt = find_gpu(low)
    return gt.name if gt is not None else low.upper()


@dataclass(frozen=True)
class _Profiles:
    gpus: Mapping[str, GpuProfile]
    settings: Mapping[str, NodeSettings]
    kinds: Mapping[str, str]
    origins: Mapping[str, str]
    typical_a: Mapping[str, int]
    typical_b: Mapping[str, int]
    perf: Mapping[str, float]
    max_layers: Mapping[str, int]


def _is_builtin(spec: ModelSpec) -> bool:
    return not spec.ref and spec.name in MODEL_NAMES


def _build(spec: ModelSpec, dirs: list[tuple[Traversable, str]]) -> _Profiles:
    consts = dataset_constants()
    shape = LayerShape.of(spec)
    gpus: dict[str, GpuProfile] = {}
    settings: dict[str, NodeSettings] = {}
    kinds: dict[str, str] = {}
    origins: dict[str, str] = {}
    # measured: the shipped directory, then the user's (a later one replaces an earlier one's type)
    for d, where in dirs:
        declared = _declared_shape(d, where, spec.key)
        if declared is not None and declared != _shape_tuple(spec):
            raise ConfigError(where, "shape", f"measured for layers/hidden/intermediate/heads/kv-heads/head-dim "
                              f"{declared}, but {spec.name} is {_shape_tuple(spec)}: profile it again or remove it")
        rows = dict(_shipped_settings_rows(spec.key)) if where.startswith(_SHIPPED) else {}
        own = d / "node_settings.csv"
        if own.is_file():
            rows.update(_read_settings_rows(own, f"{where}/node_settings.csv", spec.key))
        names = {g.lower(): g for g in rows}
        tables = {f.name.removesuffix("_prompt.csv") for f in d.iterdir() if f.name.endswith("_prompt.csv")}
        for low in sorted(tables | set(names)):
            gpu = names.get(low) or _gpu_key(low)
            p, q = d / f"{low}_prompt.csv", d / f"{low}_decode.csv"
            if not (p.is_file() and q.is_file()):
                raise ConfigError(where, f"{low}_prompt.csv, {low}_decode.csv",
                                  f"GPU type {gpu} needs both tables (its node settings name it)")
            px, ps = read_profile_table(p, f"{where}/{low}_prompt.csv")
            dx, ds = read_profile_table(q, f"{where}/{low}_decode.csv")
            for old in [g for g in gpus if g.lower() == low]:
                del gpus[old], settings[old], kinds[old], origins[old]
            try:
                timer = BatchTimer(px, ps, dx, ds)
            except ValueError as e:
                raise ConfigError(f"{where}/{low}_prompt.csv", "batch_tokens", str(e)) from None
            if px[-1] < consts.max_input_len:
                # the typical batch looks prompts of about a whole input up (docs/original.md §3.4)
                raise ConfigError(f"{where}/{low}_prompt.csv", "batch_tokens",
                                  f"ends at {px[-1]:g} tokens; a profile must reach {consts.max_input_len}")
            h = d / f"{low}_head.csv"
            hx, hs = read_head_table(h, f"{where}/{low}_head.csv") if h.is_file() else ((), ())
            gpus[gpu] = GpuProfile(gpu, px, ps, dx, ds, timer, hx, hs)
            settings[gpu] = (_node_settings(rows[gpu], f"{where}/node_settings.csv", gpu) if gpu in rows
                             else _derived_settings(shape, gpu, spec.num_layers, f"{where}/node_settings.csv"))
            kinds[gpu] = MEASURED
            origins[gpu] = where
    # analytical: every other type of the datasheet table that holds at least one layer (the GPUs
    # and the CPU core, each in its own compute dtype)
    measured = {g.lower() for g in gpus}
    for name, gt in gpu_types().items():
        if name.lower() in measured:
            continue
        st = analytical_settings(shape, gt, spec.num_layers, consts)
        if st is None:
            continue
        px, ps, dx, ds = analytical_tables(shape, gt, consts, decode_upto=max(st.decode_max_tokens))
        gpus[name] = GpuProfile(name, px, ps, dx, ds, BatchTimer(px, ps, dx, ds))
        settings[name] = NodeSettings(name, st.max_layers, st.vllm_blocks, st.kv_capacity, st.prompt_max_requests,
                                      st.prompt_max_tokens, st.decode_max_tokens, st.decode_max_context)
        kinds[name] = ANALYTICAL
        origins[name] = f"datasheet {name}: {gt.description}"
    # typical-batch constants: the original's hand-set ones where it has them, else our rules
    base = _base_model(spec.name) if _is_builtin(spec) else None
    rule = {g: typical_constants(settings[g].max_layers, p.decode, p.decode_x[-1]) for g, p in gpus.items()}
    hand = [g for g in gpus if base is not None and g in base.typical_layers_a]
    # the initial performances only matter relative to each other: put ours on the hand-set scale
    ratios = sorted(base.normalized_perf_initial[g] / rule[g][2] for g in hand) if base is not None else []
    scale = ratios[len(ratios) // 2] if ratios else 1.0
    ta: dict[str, int] = {}
    tb: dict[str, int] = {}
    perf: dict[str, float] = {}
    most: dict[str, int] = {}
    for g in gpus:
        if base is not None and g in hand:
            ta[g], tb[g] = base.typical_layers_a[g], base.typical_layers_b[g]
            perf[g], most[g] = base.normalized_perf_initial[g], base.max_num_layers[g]
        else:
            ta[g], tb[g], perf[g] = rule[g][0], rule[g][1], rule[g][2] * scale
            most[g] = settings[g].max_layers
    return _Profiles(gpus, settings, kinds, origins, ta, tb, perf, most)


_lock = threading.Lock()
_built: dict[tuple[Any, ...], _Profiles] = {}


def _profiles_for(spec: ModelSpec) -> _Profiles:
    """The profiles of ``spec``, built once per shape and state of its measured directories (the
    shipped data do not change; the user's directory may, while we run: keyed on its files)."""
    user = _user_dir(spec.key)
    stamp: tuple[Any, ...] = ()
    if user is not None:
        stats = ((f.name, f.stat()) for f in user.iterdir())
        stamp = (str(user), tuple(sorted((n, st.st_mtime_ns, st.st_size) for n, st in stats)))
    key = (spec.key, spec.name if _is_builtin(spec) else "", _shape_tuple(spec), LayerShape.of(spec), stamp)
    with _lock:
        hit = _built.get(key)
    if hit is None:
        hit = _build(spec, measured_profile_dirs(spec.key))
        with _lock:
            _built[key] = hit
    return hit


#: the profiles a spec object was last checked against (attach_profiles' fast path)
_attached: weakref.WeakKeyDictionary[ModelSpec, _Profiles] = weakref.WeakKeyDictionary()


def attach_profiles(spec: ModelSpec) -> ModelSpec:
    """``spec`` with every profile known for it attached: ``gpus`` (measured types first, then the
    analytical ones of the datasheet table, ``CPU`` among them: every model can be planned on CPU
    workers), the typical-batch tables, ``max_num_layers`` and ``profile_kinds``. The same object
    when nothing changes (docs/profiles.md)."""
    b = _profiles_for(spec)
    if _attached.get(spec) is b:
        return spec
    if not (spec.gpus == tuple(b.gpus) and dict(spec.profile_kinds) == dict(b.kinds)
            and dict(spec.normalized_perf_initial) == dict(b.perf) and dict(spec.typical_layers_a) == dict(b.typical_a)
            and dict(spec.typical_layers_b) == dict(b.typical_b) and dict(spec.max_num_layers) == dict(b.max_layers)):
        spec = dataclasses.replace(spec, gpus=tuple(b.gpus), typical_layers_a=dict(b.typical_a),
                                   typical_layers_b=dict(b.typical_b), normalized_perf_initial=dict(b.perf),
                                   max_num_layers=dict(b.max_layers), profile_kinds=dict(b.kinds))
    with _lock:
        _attached[spec] = b
    return spec


def load_profiles(model: ModelSpec | str) -> ProfileSet:
    """Profiles and node settings of ``model`` for every GPU type it has one for: measured (shipped,
    or in the user's profile directory) or analytical (the datasheet table). Raises ConfigError
    naming the file when a measured profile is unreadable or was measured for another shape."""
    spec = attach_profiles(get_model(model))
    b = _profiles_for(spec)
    return ProfileSet(spec, b.gpus, b.settings, b.kinds, b.origins)


@dataclass(frozen=True)
class TypicalBatch:
    """The steady-state batch a node of one GPU type with k layers is assumed to run (docs/original.md §3.4)."""

    gpu: str
    k: int
    workload_ratio: float
    prompt_requests: float
    prompt_tokens: int
    decode_tokens: int
    throughput: float  # tokens/s through all k layers


class ThroughputModel:
    """Helix's typical-batch node throughput for one model and one cluster composition.

    ``gpu_counts`` maps GPU type (profile key) to the number of machines of that type; the same
    GPU gets different numbers in clusters of different composition, as in the original.
    """

    def __init__(self, model: ModelSpec | str, gpu_counts: Mapping[str, int]) -> None:
        self.model = attach_profiles(get_model(model))
        self.profiles = load_profiles(self.model)
        self.consts = dataset_constants()
        self.counts: dict[str, int] = {}
        for g, n in gpu_counts.items():
            if n > 0:
                key = self.profiles.canonical(g)
                self.counts[key] = self.counts.get(key, 0) + int(n)
        for g in self.counts:
            self.profiles.profile(g)
            self.profiles.node_settings(g)
            if g not in self.model.typical_layers_a or g not in self.model.normalized_perf_initial:
                raise ConfigError(
                    f"<profiles {self.model.name}>", "gpu", f"no typical-batch constants for GPU {g!r}"
                )
        L = self.model.num_layers
        table_a = {g: self.model.typical_layers_a[g] for g in self.counts}
        total_a = sum(self.counts[g] * table_a[g] for g in self.counts)
        if total_a < self.consts.typical_layers_switch_factor * L:
            self.typical_layers = {g: self.model.typical_layers_b[g] for g in self.counts}
        else:
            self.typical_layers = table_a
        perf = {g: self.model.normalized_perf_initial[g] for g in self.counts}
        for _ in range(self.consts.typical_model_iterations):
            # all types are updated from the previous iteration's values at once
            perf = {g: self._batch(g, self.typical_layers[g], perf).throughput * self.typical_layers[g] for g in perf}
        self.normalized_perf: dict[str, float] = perf
        self._cache: dict[tuple[str, int], TypicalBatch] = {}

    @classmethod
    def for_cluster(cls, model: ModelSpec | str, cluster: ClusterSpec) -> ThroughputModel:
        counts: dict[str, int] = {}
        for node in cluster.nodes:
            gpu = cluster.machine(node.id).gpu
            counts[gpu] = counts.get(gpu, 0) + 1
        return cls(model, counts)

    def _batch(self, gpu: str, k: int, perf: Mapping[str, float]) -> TypicalBatch:
        c = self.consts
        L = self.model.num_layers
        tau = {g: 1.0 / p for g, p in perf.items()}
        num = sum(self.counts[g] * self.typical_layers[g] * tau[g] for g in perf)
        den = sum(self.counts[g] * self.typical_layers[g] for g in perf)
        tau_bar = num / den
        round_trip = (L - k) * tau_bar + k * tau[gpu]
        w = k * tau[gpu] / round_trip
        seq = c.avg_input_len + c.avg_output_len
        kv = self.kv_capacity(gpu, k)
        a = int(c.typical_kv_fill * kv / k)
        r_p = (a / seq) * w / c.avg_output_len
        p_tok = round(r_p * c.avg_input_len)
        d_tok = round((a / seq) * w)
        if r_p > 1:
            r_p, p_tok, d_tok = 1.0, c.avg_input_len, c.avg_output_len
        settings = self.profiles.node_settings(gpu)
        cap = settings.decode_max_tokens[min(k, settings.max_layers) - 1]
        if d_tok > cap:
            # Unlike the original, which asserts d_tok <= the cap (docs/original.md §3.4): a node
            # decodes at most its cap at once. Never reached with the original's profiles.
            d_tok = cap
        prof = self.profiles.profile(gpu)
        if p_tok + d_tok == 0:
            # Only reachable past the profiled maximum, where the KV cache barely holds a request:
            # charge decode-only progress on a single sequence instead of dividing 0 by 0.
            d_tok = 1
        if r_p <= 0 or p_tok == 0:
            tp = d_tok / (k * prof.decode(d_tok))
        elif r_p >= 1:
            tp = (p_tok + d_tok) / (k * (prof.prompt(p_tok) + prof.decode(d_tok)))
        else:
            rho = 1 / r_p
            tp = rho * (p_tok + d_tok) / (k * (prof.prompt(int(p_tok * rho)) + rho * prof.decode(d_tok)))
        return TypicalBatch(gpu, k, w, r_p, p_tok, d_tok, tp)

    def kv_capacity(self, gpu: str, k: int) -> int:
        """KV capacity (token x layer entries) for k layers, extended past the profiled maximum.

        Forced layouts (hand-made separate pipelines) hold more layers than were profiled. There,
        each extra layer's weights take their bytes out of the KV space measured at the maximum
        (param_bytes_per_layer / kv_bytes_per_token_per_layer entries per layer). Raises
        ValueError when nothing would be left for the KV cache.
        """
        settings = self.profiles.node_settings(gpu)
        if k <= settings.max_layers:
            return settings.kv(k)
        per_layer = self.model.param_bytes_per_layer / self.model.kv_bytes_per_token_per_layer
        kv = int(settings.kv(settings.max_layers) - (k - settings.max_layers) * per_layer)
        if kv <= 0:
            raise ValueError(f"{gpu} has no KV cache left with {k} layers of {self.model.name}")
        return kv

    def typical_batch(self, gpu: str, k: int, *, exceed_profiled_max: bool = False) -> TypicalBatch:
        """The typical batch of a ``gpu`` node holding ``k`` layers, with the converged performance.

        ``k`` must be within the profiled maximum unless ``exceed_profiled_max`` (then settings are taken at the
        maximum and the time of all k layers is charged, as Helix's ``allow_force_set``).
        """
        gpu = self.profiles.canonical(gpu)
        if gpu not in self.counts:
            raise ConfigError("<argument>", "gpu", f"GPU {gpu!r} is not part of this cluster mix")
        settings = self.profiles.node_settings(gpu)
        if k < 1 or (k > settings.max_layers and not exceed_profiled_max):
            settings.kv(k)  # raises with the allowed range
        key = (gpu, k)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._batch(gpu, k, self.normalized_perf)
            self._cache[key] = hit
        return hit

    def throughput(self, gpu: str, k: int, *, exceed_profiled_max: bool = False) -> float:
        """Typical token throughput (tokens/s) of a ``gpu`` node holding ``k`` layers (no NIC cap)."""
        return self.typical_batch(gpu, k, exceed_profiled_max=exceed_profiled_max).throughput

    def vram_layers(self, machine: MachineType) -> int:
        """Most layers whose weights fit the machine's VRAM."""
        return int(machine.vram_bytes // self.model.param_bytes_per_layer) if machine.vram_bytes > 0 else 0

    def max_layers(self, machine: MachineType) -> int:
        """Most layers a machine may hold: the profiled maximum, and weights within VRAM."""
        settings_max = self.profiles.node_settings(machine.gpu).max_layers
        return min(settings_max, self.vram_layers(machine))

    def node_capacity(self, machine: MachineType, k: int, *, exceed_profiled_max: bool = False) -> float:
        """Capacity (tokens/s) of a node holding ``k`` layers: typical throughput capped by its NICs."""
        nic = min(machine.nic_in, machine.nic_out) / self.model.activation_size
        return min(self.throughput(machine.gpu, k, exceed_profiled_max=exceed_profiled_max), nic)

    def best_node_work(self, machine: MachineType) -> float:
        """max over k of k x node_capacity(k): layer-executions per second the node can deliver."""
        return max(k * self.node_capacity(machine, k) for k in range(1, self.max_layers(machine) + 1))


def max_compute_throughput(cluster: ClusterSpec, model: ModelSpec | str, tm: ThroughputModel | None = None) -> float:
    """Upper bound on serving throughput (tokens/s) with infinitely fast links and no memory limit.

    U = sum over nodes of max_k k * tp_node(k), divided by the number of layers (docs/original.md §3.5).
    """
    spec = get_model(model)
    tm = tm or ThroughputModel.for_cluster(spec, cluster)
    total = 0.0
    for node in cluster.nodes:
        total += tm.best_node_work(cluster.machine(node.id))
    return total / spec.num_layers


def check_fits(cluster: ClusterSpec, model: ModelSpec | str, tm: ThroughputModel | None = None) -> None:
    """Raise ConfigError when the cluster cannot hold one full copy of the model."""
    spec = get_model(model)
    tm = tm or ThroughputModel.for_cluster(spec, cluster)
    fit = sum(tm.max_layers(cluster.machine(n.id)) for n in cluster.nodes)
    if fit < spec.num_layers:
        raise ConfigError(
            cluster.source_file,
            "nodes",
            f"model {spec.name} needs {spec.num_layers} layers but the cluster's nodes hold at most {fit} in total",
        )


def profile_notes(model: ModelSpec | str, cluster: ClusterSpec) -> list[str]:
    """One line per GPU type of ``cluster``: whether ``model``'s profile of it is measured or
    analytical, and where it comes from (what ``plan --explain`` and ``cluster show`` print)."""
    ps = load_profiles(model)
    lines = []
    for gpu in dict.fromkeys(cluster.machine(n.id).gpu for n in cluster.nodes):
        key = ps.canonical(gpu)
        kind = ps.kinds.get(key)
        lines.append(f"profile {key}: {kind} ({ps.origins[key]})" if kind else f"profile {gpu}: none")
    return lines


def kv_capacity(model: ModelSpec | str, gpu: str, k: int) -> int:
    """KV capacity (token x layer entries) of a ``gpu`` node holding ``k`` layers of ``model``."""
    return load_profiles(get_model(model)).node_settings(gpu).kv(k)


__all__ = [
    "DatasetConstants",
    "GpuProfile",
    "HEAD_COLUMNS",
    "MODEL_NAMES",
    "ModelSpec",
    "NodeSettings",
    "ProfileSet",
    "ThroughputModel",
    "TypicalBatch",
    "attach_profiles",
    "measured_profile_dirs",
    "profile_notes",
    "read_head_table",
    "read_profile_table",
    "check_fits",
    "dataset_constants",
    "get_model",
    "kv_capacity",
    "load_profiles",
    "max_compute_throughput",
]

