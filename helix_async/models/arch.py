"""The architecture of a decoder-only model read from its own files (torch-free).

:class:`ArchConfig` is what the planner, the simulator and the torch executor need to know about a
LLaMA-family or Qwen2 model: its shape, its position encoding, its biases and whether its LM head
is the embedding table.  It is built from a Hugging Face ``config.json`` (:meth:`ArchConfig.from_hf`)
or from GGUF metadata (``helix_async.models.gguf``).  The families and the fields they differ in
are written down in ``docs/models.md``:

* ``llama`` (Llama 1/2/3/3.1, SmolLM2, TinyLlama): optional ``rope_scaling`` of type ``llama3``,
  optional ``attention_bias``/``mlp_bias``, optional ``head_dim``;
* ``mistral``: a LLaMA layer with an optional ``sliding_window`` (served contexts are capped at it);
* ``qwen2`` (Qwen2, Qwen2.5): biases on the q, k and v projections, always.

Anything else (a GPT-2 ``config.json``, say) is refused with one line naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["FAMILIES", "ArchConfig", "RopeScaling"]

#: model_type (HF) or general.architecture (GGUF) -> family; the families this runtime computes
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

#: bytes per element of the checkpoint dtypes a config names
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (``rope_type = "llama3"``): the parameters
    of the rule in docs/models.md §RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ArchConfig:
    """The shape and the arithmetic choices of one model (see the module doc).

    family: ``llama``, ``mistral`` or ``qwen2``. num_layers .. vocab_size: the shape.
    head_dim: per-head width (``hidden / heads`` unless the config says otherwise).
    rms_norm_eps, rope_theta: as named. rope_scaling: llama3 scaling, or None (plain RoPE).
    qkv_bias: biases on q, k, v (Qwen2; LLaMA's ``attention_bias``). o_bias: a bias on the output
    projection (LLaMA's ``attention_bias``). mlp_bias: biases on gate, up, down.
    tie_word_embeddings: the LM head is the embedding table. max_position: the longest context
    the model was trained for. sliding_window: Mistral's window (0: none).
    bos_token_id, eos_token_ids: from the config (the tokenizer's win where they differ).
    dtype: the checkpoint's dtype (``float16``, ``bfloat16``, ``float32``; a quantised GGUF says
    the dtype its tensors are de-quantised to). name: a display name (the checkpoint's, or its
    file or directory name).
    """

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position: int = 2048
    sliding_window: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "max_position"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                             f"{self.num_kv_heads}")
        if self.family not in FAMILIES.values():
            raise ValueError(f"family {self.family!r} is not one of {', '.join(sorted(set(FAMILIES.values())))}")

    # ---- sizes ----------------------------------------------------------------------------------

    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections, biases, the two norms)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        n = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += h
        if self.mlp_bias:
            n += 2 * i + h
        return n

    def layer_flops_per_token(self) -> int:
        """Multiply-adds x 2 of one token through one layer's dense parts (attention over the
        context is extra: 4 x heads x head_dim per cached token)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        return 2 * (h * (self.num_heads * hd + 2 * self.num_kv_heads * hd) + self.num_heads * hd * h + 3 * h * i)

    def kv_bytes_per_token_layer(self, bytes_per_element: int) -> int:
        """Bytes one token's keys and values take in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * bytes_per_element

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    # ---- from a Hugging Face config.json --------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], where: str = "config.json", *, name: str = "") -> ArchConfig:
        """From a Hugging Face ``config.json`` (as a dict); ``where`` names it in errors, which are
        :class:`ConfigError` naming the field."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(where, "config.json", "not a JSON object")
        mtype = cfg.get("model_type")
        if mtype is None:
            archs = cfg.get("architectures") or []
            mtype = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                     "Qwen2ForCausalLM": "qwen2"}.get(archs[0] if archs else "", None)
        if mtype not in FAMILIES:
            raise ConfigError(where, "model_type",
                              f"{mtype!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
        family = FAMILIES[str(mtype)]

        def need(key: str) -> int:
            if key not in cfg:
                raise ConfigError(where, key, "missing (a required field of the model's shape)")
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(where, key, f"must be a positive integer, got {v!r}")
            return v

        def num(key: str, default: float) -> float:
            v = cfg.get(key, default)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(where, key, f"must be a positive number, got {v!r}")
            return float(v)

        layers = need("num_hidden_layers")
        hidden = need("hidden_size")
        inter = need("intermediate_size")
        heads = need("num_attention_heads")
        kv_heads = need("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
        head_dim = need("head_dim") if cfg.get("head_dim") is not None else 0
        if not head_dim:
            if hidden % heads:
                raise ConfigError(where, "hidden_size", f"{hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        vocab = need("vocab_size")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(where, "hidden_act", f"{act!r} is not supported (only 'silu')")
        # RoPE: transformers 5 writes rope_parameters (with rope_theta in it); older configs write
        # rope_theta and rope_scaling at the top level
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise ConfigError(where, "rope_scaling", f"must be an object, got {rope!r}")
        theta_src = rope if "rope_theta" in rope else cfg
        theta = float(num("rope_theta", 10000.0)) if theta_src is cfg else float(rope["rope_theta"])
        rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
        scaling: RopeScaling | None = None
        if rtype == "llama3":
            try:
                scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                      float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
            except KeyError as e:
                raise ConfigError(where, f"rope_scaling.{e.args[0]}", "missing (rope_type llama3 needs it)") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(where, "rope_scaling", f"bad llama3 parameters: {e}") from None
            if not (scaling.factor > 0 and scaling.high_freq_factor > scaling.low_freq_factor > 0
                    and scaling.original_max_position > 0):
                raise ConfigError(where, "rope_scaling", f"bad llama3 parameters: {dict(rope)}")
        elif rtype != "default":
            raise ConfigError(where, "rope_scaling.rope_type",
                              f"{rtype!r} is not supported (supported: default, llama3)")
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = family == "qwen2" or attention_bias
        sliding = 0
        if family == "mistral" or (family == "qwen2" and cfg.get("use_sliding_window")):
            sw = cfg.get("sliding_window")
            sliding = int(sw) if isinstance(sw, int) and not isinstance(sw, bool) and sw > 0 else 0
        eos = cfg.get("eos_token_id")
        eos_ids = (eos,) if isinstance(eos, int) else tuple(e for e in (eos or ()) if isinstance(e, int))
        bos = cfg.get("bos_token_id")
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        if dtype not in DTYPE_BYTES:
            raise ConfigError(where, "torch_dtype", f"{dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        max_pos = cfg.get("max_position_embeddings", 2048)
        if isinstance(max_pos, bool) or not isinstance(max_pos, int) or max_pos <= 0:
            raise ConfigError(where, "max_position_embeddings", f"must be a positive integer, got {max_pos!r}")
        try:
            return cls(
                family=family, num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
                num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                rms_norm_eps=num("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                qkv_bias=qkv_bias, o_bias=attention_bias and family != "qwen2",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), max_position=max_pos,
                sliding_window=sliding, bos_token_id=bos if isinstance(bos, int) else None, eos_token_ids=eos_ids,
                dtype=str(dtype), name=name or str(cfg.get("_name_or_path") or ""),
            )
        except ValueError as e:
            raise ConfigError(where, "shape", str(e)) from None
