"""The model sources: one table, asked in order.

A :class:`ModelSource` says whether a ``--model`` reference is its kind (:meth:`~ModelSource.claims`)
and, if so, turns it into a :class:`ResolvedModel`: the :class:`~helix_async.model.ModelSpec` the
planner, the simulator and the runtime share, plus where its weights and tokenizer live. Sources
are asked in table order; the first that claims a reference resolves it, and its errors are the
user's answer (a claimed reference is never passed on to the next source).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError
from ..model import MODEL_ALIASES, MODEL_NAMES, ModelSpec, get_model

__all__ = ["SOURCES", "HFDirectorySource", "ModelSource", "NamedSource", "ResolvedModel", "resolve_model"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model as a command serves or plans it.

    spec: its shape and the key of its profiles. checkpoint: the directory (or file) its weights
    are read from; "" when there is none (the named specs: planning, simulation, dummy weights).
    tokenizer: a ``tokenizer.json`` beside the weights, or "" for the default of the command.
    source: the name of the source that resolved it.
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


class NamedSource:
    """The built-in specs with shipped profiles (``llama2-70b``, ``llama1-30b``, ``tiny-llama``)."""

    name = "named"
    usage = "a built-in name (" + ", ".join(MODEL_NAMES) + ")"

    def claims(self, ref: str) -> bool:
        return ref.strip().lower() in MODEL_ALIASES

    def resolve(self, ref: str, where: str) -> ResolvedModel:
        return ResolvedModel(spec=get_model(ref), source=self.name)


#: the config.json fields that fix a LLaMA model's shape, in the order shapes are compared
_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")


class HFDirectorySource:
    """A Hugging Face checkpoint directory (``config.json`` beside ``*.safetensors``).

    Today a directory is served only when its shape is one of the named specs with profiles (its
    weights replace the dummy ones); its own spec and profiles come with issue 23. Reading the
    shape needs no torch.
    """

    name = "hf-dir"
    usage = "a checkpoint directory holding config.json"

    def claims(self, ref: str) -> bool:
        return Path(ref).is_dir()

    def resolve(self, ref: str, where: str) -> ResolvedModel:
        import json

        d = Path(ref)
        cfg_path = d / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ConfigError(ref, where, "a checkpoint directory must hold config.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(str(cfg_path), "config.json", f"unreadable: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(str(cfg_path), "config.json", "not a JSON object")
        if raw.get("model_type", "llama") != "llama":
            raise ConfigError(str(cfg_path), "model_type", f"{raw.get('model_type')!r} is not supported (llama)")
        got: list[int] = []
        for field in _SHAPE_FIELDS:
            value = raw.get(field, raw.get("num_attention_heads") if field == "num_key_value_heads" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(str(cfg_path), field, f"must be a positive integer, got {value!r}")
            got.append(value)
        known = []
        for name in MODEL_NAMES:
            m = get_model(name)
            shape = (m.num_layers, m.hidden_size, m.intermediate_size, m.num_attention_heads, m.num_key_value_heads,
                     m.vocab_size)
            if "CPU" in m.gpus:
                known.append(f"{name} is {shape}")
            if shape == tuple(got):
                tok = d / "tokenizer.json"
                return ResolvedModel(spec=m, source=self.name, checkpoint=str(d),
                                     tokenizer=str(tok) if tok.is_file() else "")
        raise ConfigError(str(cfg_path), "shape",
                          f"layers/hidden/intermediate/heads/kv-heads/vocab {tuple(got)} match no model with CPU "
                          f"profiles ({'; '.join(known)})")


#: Asked in this order; a new source is a module of its own plus one line here.
SOURCES: tuple[ModelSource, ...] = (NamedSource(), HFDirectorySource())


def resolve_model(ref: str, where: str = "--model") -> ResolvedModel:
    """The model ``ref`` names, by the first source that claims it.

    where: the flag or field ``ref`` came from, named in errors. Raises ConfigError listing every
    kind of reference when no source claims it.
    """
    for source in SOURCES:
        if source.claims(ref):
            return source.resolve(ref, where)
    kinds = "; ".join(s.usage for s in SOURCES)
    raise ConfigError("<argument>", where, f"unknown model {ref!r}: neither a known name nor a model file or "
                      f"directory; use {kinds}")
