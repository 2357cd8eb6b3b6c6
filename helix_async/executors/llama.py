"""A LLaMA-architecture decoder in plain torch, one layer range at a time (the torch executor's model).

What a pipeline stage of a LLaMA model computes, written from the architecture as published
(Touvron et al. 2023, "LLaMA"; Hugging Face's ``LlamaForCausalLM`` is the oracle the tests compare
against, token for token):

* RMSNorm: ``w * x / sqrt(mean(x^2) + eps)``, the mean taken in float32;
* rotary position embeddings (RoPE) on queries and keys, half-split rotation, frequencies
  ``theta^(-2i/d)`` computed in float32;
* grouped-query attention: ``num_kv_heads`` key/value heads shared by ``num_heads / num_kv_heads``
  query heads each, softmax in float32, causal within the new tokens and open to everything cached;
* SwiGLU MLP: ``down(silu(gate(x)) * up(x))``;
* pre-norm residual blocks; the first stage embeds token ids, the last applies the final norm and
  the LM head.

Weights come from a checkpoint, a Hugging Face directory (``config.json`` and safetensors) or a GGUF
file, through ``helix_async.models.weights`` (only the tensors of the requested layers are read), or
are seeded dummy weights of the same shapes. The shape and the arithmetic choices (RoPE scaling,
biases, a tied head) come from the checkpoint's ``ArchConfig`` (docs/models.md).

Every sequence of a batch keeps its own KV cache per layer (:class:`SeqCache`); the dense parts of a
layer (projections, MLP) run once over the tokens of all sequences packed together, the attention
per sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, HelixError
from ..models.arch import ArchConfig, RopeScaling

__all__ = [
    "LlamaConfig",
    "LayerWeights",
    "ModelLoadError",
    "SeqCache",
    "StageWeights",
    "load_stage",
    "dummy_stage",
]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ModelLoadError(HelixError, ValueError):
    """A checkpoint that cannot be served (missing file, field or tensor, wrong shape)."""


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a LLaMA-family model and its arithmetic choices, as the math here needs them
    (built from an :class:`ArchConfig` by :meth:`from_arch`).

    rope_scaling: Llama 3.1's frequency scaling, or None. qkv_bias, o_bias, mlp_bias: the layers
    carry biases on q/k/v, on the output projection, on gate/up/down (``LayerWeights``' ``*_bias``).
    tie_word_embeddings: the LM head is the embedding table. family: ``llama``, ``mistral``, ``qwen2``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position: int = 2048
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    family: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_arch(cls, arch: ArchConfig) -> LlamaConfig:
        """From a model's :class:`ArchConfig` (a ``config.json``'s or a GGUF file's)."""
        return cls(
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            rms_norm_eps=arch.rms_norm_eps,
            rope_theta=arch.rope_theta,
            max_position=arch.max_position,
            tie_word_embeddings=arch.tie_word_embeddings,
            eos_token_id=arch.eos_token_ids[0] if arch.eos_token_ids else None,
            rope_scaling=arch.rope_scaling,
            qkv_bias=arch.qkv_bias,
            o_bias=arch.o_bias,
            mlp_bias=arch.mlp_bias,
            family=arch.family,
        )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], where: str = "config.json") -> LlamaConfig:
        """From a Hugging Face ``config.json`` (as a dict); ``where`` names it in errors."""
        try:
            return cls.from_arch(ArchConfig.from_hf(cfg, where))
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None

    @classmethod
    def from_dir(cls, path: str | Path) -> LlamaConfig:
        f = Path(path) / "config.json"
        try:
            cfg = json.loads(f.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{f}: no such file (a checkpoint directory holds config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{f}: not JSON ({e})") from None
        return cls.from_hf(cfg, str(f))

    def layer_bytes(self, bytes_per_param: int) -> int:
        """Bytes of one decoder layer's weights (biases included)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        params = h * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * h * i + 2 * h
        if self.qkv_bias:
            params += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            params += h
        if self.mlp_bias:
            params += 2 * i + h
        return params * bytes_per_param

    def kv_bytes_per_token_layer(self, bytes_per_param: int) -> int:
        return 2 * self.num_kv_heads * self.head_dim * bytes_per_param


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"dtype {name!r}: expected one of {', '.join(_DTYPES)}") from None


@dataclass
class LayerWeights:
    """One decoder layer. Projections are stored as (out, in) like ``nn.Linear`` weights; a bias is
    None where the architecture has none (``LlamaConfig``'s ``qkv_bias``, ``o_bias``, ``mlp_bias``)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


_LAYER_KEYS = {
    "input_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}


def _layer_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, i, hd = c.hidden_size, c.intermediate_size, c.head_dim
    return {
        "input_norm": (h,),
        "q": (c.num_heads * hd, h),
        "k": (c.num_kv_heads * hd, h),
        "v": (c.num_kv_heads * hd, h),
        "o": (h, c.num_heads * hd),
        "post_norm": (h,),
        "gate": (i, h),
        "up": (i, h),
        "down": (h, i),
    }


class SeqCache:
    """One sequence's keys and values on a range of layers: per layer a (kv_heads, capacity,
    head_dim) buffer for each, grown by doubling; ``length[layer]`` tokens are valid."""

    __slots__ = ("k", "v", "length")

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length: dict[int, int] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, reserve: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (kv_heads, n, head_dim) at positions ``start ..`` of ``layer``; return
        the valid keys and values (positions ``0 .. start + n``). ``reserve``: capacity to allocate
        for a new buffer."""
        n = k.shape[1]
        end = start + n
        kb = self.k.get(layer)
        if kb is None or kb.shape[1] < end:
            cap = max(reserve, end, 0 if kb is None else 2 * kb.shape[1])
            nk = k.new_zeros((k.shape[0], cap, k.shape[2]))
            nv = v.new_zeros((v.shape[0], cap, v.shape[2]))
            if kb is not None:
                old = self.length[layer]
                nk[:, :old] = kb[:, :old]
                nv[:, :old] = self.v[layer][:, :old]
            self.k[layer] = kb = nk
            self.v[layer] = nv
        vb = self.v[layer]
        kb[:, start:end] = k
        vb[:, start:end] = v
        self.length[layer] = end
        return kb[:, :end], vb[:, :end]


class StageWeights:
    """Layers ``[start, end)`` of a LLaMA model, with the embedding when ``start == 0`` and the final
    norm and LM head when ``end == num_layers``; and the math that runs them."""

    def __init__(
        self,
        config: LlamaConfig,
        start: int,
        end: int,
        layers: dict[int, LayerWeights],
        embed: torch.Tensor | None,
        norm: torch.Tensor | None,
        lm_head: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.start, self.end = start, end
        self.layers = layers
        self.embed = embed
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = dtype
        self.device = device
        c = config
        self._groups = c.num_heads // c.num_kv_heads
        self._scale = c.head_dim**-0.5
        # RoPE frequencies as Hugging Face computes them (float32), then cached per position
        exps = torch.arange(0, c.head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / c.head_dim
        self._inv_freq = 1.0 / (c.rope_theta**exps)
        self._cos = torch.empty(0, c.head_dim, dtype=dtype, device=device)
        self._sin = self._cos

    # ---- pieces ---------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xf = x.to(torch.float32)
        var = xf.pow(2).mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(var + self.config.rms_norm_eps)
        return w * xf.to(dt)

    def _rope_tables(self, upto: int) -> None:
        if self._cos.shape[0] >= upto:
            return
        n = max(upto, 2 * self._cos.shape[0], 64)
        pos = torch.arange(n, device=self.device)
        freqs = pos[:, None].float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.dtype)
        self._sin = emb.sin().to(self.dtype)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        assert self.embed is not None
        return F.embedding(torch.tensor(ids, dtype=torch.long, device=self.device), self.embed)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on hidden states (n, hidden) -> (n, vocab), in float32."""
        assert self.norm is not None and self.lm_head is not None
        return F.linear(self._rms(h, self.norm), self.lm_head).float()

    # ---- one layer over a packed batch ----------------------------------------------------------

    def layer(
        self,
        idx: int,
        x: torch.Tensor,
        spans: list[tuple[int, int]],
        caches: list[SeqCache],
        reserve: list[int],
    ) -> torch.Tensor:
        """Run layer ``idx`` on ``x`` (tokens of all sequences packed, (T, hidden)). ``spans``: per
        sequence (first position, token count), its tokens consecutive in ``x`` in that order;
        ``caches``: their KV caches (appended to); ``reserve``: capacity hint per sequence."""
        w = self.layers[idx]
        c = self.config
        hd = c.head_dim
        residual = x
        h = self._rms(x, w.input_norm)
        q = F.linear(h, w.q)
        k = F.linear(h, w.k)
        v = F.linear(h, w.v)
        self._rope_tables(max(p + n for p, n in spans))
        outs = []
        off = 0
        for (pos, n), cache, res in zip(spans, caches, reserve, strict=True):
            qs = q[off : off + n].view(n, c.num_heads, hd).transpose(0, 1)
            ks = k[off : off + n].view(n, c.num_kv_heads, hd).transpose(0, 1)
            vs = v[off : off + n].view(n, c.num_kv_heads, hd).transpose(0, 1)
            cos = self._cos[pos : pos + n]
            sin = self._sin[pos : pos + n]
            qs = qs * cos + self._rotate_half(qs) * sin
            ks = ks * cos + self._rotate_half(ks) * sin
            keys, values = cache.append(idx, ks, vs, pos, res)
            if self._groups > 1:
                keys = keys.repeat_interleave(self._groups, dim=0)
                values = values.repeat_interleave(self._groups, dim=0)
            scores = torch.matmul(qs, keys.transpose(1, 2)) * self._scale  # (heads, n, pos + n)
            if n > 1:
                total = pos + n
                mask = torch.ones(n, total, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)
            att = torch.matmul(probs, values)  # (heads, n, hd)
            outs.append(att.transpose(0, 1).reshape(n, c.num_heads * hd))
            off += n
        a = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        x = residual + F.linear(a, w.o)
        residual = x
        h = self._rms(x, w.post_norm)
        h = F.linear(F.silu(F.linear(h, w.gate)) * F.linear(h, w.up), w.down)
        return residual + h


def _check_range(config: LlamaConfig, start: int, end: int) -> None:
    if not 0 <= start < end <= config.num_layers:
        raise ModelLoadError(f"layers [{start}, {end}) are not within the model's [0, {config.num_layers})")


def dummy_stage(
    config: LlamaConfig, start: int, end: int, *, seed: int = 0, dtype: str = "float32", device: str = "cpu"
) -> StageWeights:
    """Seeded dummy weights (normal, std 0.02; norms 1): each tensor drawn from a generator seeded
    by ``seed`` and its own name, so any worker builds the same layer the same way."""
    _check_range(config, start, end)
    dt = torch_dtype(dtype)
    dev = torch.device(device)

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed((seed * 1_000_003 + sum(ord(ch) * 131**i for i, ch in enumerate(name))) % (2**63))
        return (torch.randn(shape, generator=g) * 0.02).to(dtype=dt, device=dev)

    shapes = _layer_shapes(config)
    layers = {}
    for i in range(start, end):
        t = {}
        for key, shape in shapes.items():
            t[key] = torch.ones(shape, dtype=dt, device=dev) if key.endswith("norm") else draw(f"{i}.{key}", shape)
        layers[i] = LayerWeights(**t)
    h, vocab = config.hidden_size, config.vocab_size
    embed = draw("embed", (vocab, h)) if start == 0 or (end == config.num_layers and config.tie_word_embeddings) else None
    norm = lm_head = None
    if end == config.num_layers:
        norm = torch.ones(h, dtype=dt, device=dev)
        lm_head = embed if config.tie_word_embeddings else draw("lm_head", (vocab, h))
    return StageWeights(config, start, end, layers, embed if start == 0 else None, norm, lm_head, dt, dev)


def load_stage(path: str | Path, start: int, end: int, *, dtype: str | None = None, device: str = "cpu") -> StageWeights:
    """Layers ``[start, end)`` of the checkpoint at ``path`` (a Hugging Face directory or a GGUF
    file; ``helix_async.models.weights`` reads only the tensors those layers, and the embedding or
    the head, need), computed in ``dtype`` (default: the checkpoint's; float32 for a GGUF) on
    ``device``. ModelLoadError naming the file and field or tensor for a bad checkpoint."""
    from ..models.layout import EMBED, LM_HEAD, NORM
    from ..models.weights import open_checkpoint

    try:
        ck = open_checkpoint(path)
        config = LlamaConfig.from_arch(ck.arch)
        _check_range(config, start, end)
        dt_name = dtype or ck.dtype
        dt = torch_dtype(dt_name)
        tensors = ck.read(start, end, dt_name, device)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    layers = {}
    for i in range(start, end):
        p = f"model.layers.{i}."
        layers[i] = LayerWeights(**{k: tensors[p + name] for k, name in _LAYER_KEYS.items() if p + name in tensors})
    embed = tensors[EMBED] if start == 0 else None
    norm = lm_head = None
    if end == config.num_layers:
        norm = tensors[NORM]
        lm_head = tensors[EMBED] if config.tie_word_embeddings else tensors[LM_HEAD]
    return StageWeights(config, start, end, layers, embed, norm, lm_head, dt, torch.device(device))


def stage_bytes(config: LlamaConfig, start: int, end: int, bytes_per_param: int) -> int:
    """Weight bytes of a stage (layers, plus embedding or head where it holds them; a tied head is
    the embedding table, held once when the stage holds both)."""
    n = (end - start) * config.layer_bytes(bytes_per_param)
    table = config.vocab_size * config.hidden_size * bytes_per_param
    if start == 0:
        n += table
    if end == config.num_layers:
        n += config.hidden_size * bytes_per_param + (0 if config.tie_word_embeddings and start == 0 else table)
    return n

