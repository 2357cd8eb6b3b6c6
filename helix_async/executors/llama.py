"""A LLaMA-architecture decoder in plain torch, one layer range at a time (the torch executor's model).

What a pipeline stage of a LLaMA model computes, written from the architecture as published
(Touvron et al. 2023, "LLaMA"; Hugging Face's ``LlamaForCausalLM`` is the oracle the tests compare
against, token for token):

* RMSNorm: ``w * x / sqrt(mean(x^2) + eps)``, the mean taken in float32;
* rotary position embeddings (RoPE) on queries and keys, half-split rotation, frequencies
  ``theta^(-2i/d)`` computed in float32, with Llama 3.1's ``llama3`` frequency scaling where the
  config has it (:func:`rope_frequencies`);
* grouped-query attention: ``num_kv_heads`` key/value heads shared by ``num_heads / num_kv_heads``
  query heads each, softmax in float32, causal within the new tokens and open to everything cached;
* SwiGLU MLP: ``down(silu(gate(x)) * up(x))``;
* biases on q/k/v (Qwen2; LLaMA's ``attention_bias``), o (``attention_bias``) and the MLP
  (``mlp_bias``) where the config has them;
* pre-norm residual blocks; the first stage embeds token ids, the last applies the final norm and
  the LM head (the embedding table itself when the embeddings are tied).

docs/models.md ("The layer math") states the rules in full.

Weights come from a checkpoint, a Hugging Face directory (``config.json`` and safetensors) or a GGUF
file, through ``helix_async.models.weights`` (only the tensors of the requested layers are read), or
are seeded dummy weights of the same shapes. The shape and the arithmetic choices (RoPE scaling,
biases, a tied head) come from the checkpoint's ``ArchConfig`` (docs/models.md).

The dense parts of a layer (projections, MLP) run once over the tokens of all sequences of a batch
packed together. Keys and values live in a preallocated slab per stage (:class:`KVSlab`), one slot
per sequence (:class:`SeqCache` is a sequence's handle on it); a batch of decodes attends in a few
batched operations over a padded view of the slab, a batch with prompts sequence by sequence.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
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
    "KVSlab",
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


#: rows of the LM head per product on CPU (see StageWeights.logits)
HEAD_ROWS = 1024

#: a batch of decodes reads the slab's rows from its lowest slot to its highest as one view when
#: they are at most this many per sequence, and gathers its slots otherwise (see StageWeights._attention)
RANGE_ROWS_PER_SEQ = 2


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


def _bias_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The biases the architecture carries (``qkv_bias``, ``o_bias``, ``mlp_bias``), by field."""
    h, i, hd = c.hidden_size, c.intermediate_size, c.head_dim
    out: dict[str, tuple[int, ...]] = {}
    if c.qkv_bias:
        out.update(q_bias=(c.num_heads * hd,), k_bias=(c.num_kv_heads * hd,), v_bias=(c.num_kv_heads * hd,))
    if c.o_bias:
        out["o_bias"] = (h,)
    if c.mlp_bias:
        out.update(gate_bias=(i,), up_bias=(i,), down_bias=(h,))
    return out


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """The rotary inverse frequencies (head_dim / 2,), float32, in radians per position.

    Plain RoPE: ``theta^(-2i / head_dim)``.  With Llama 3.1's ``llama3`` scaling (docs/models.md,
    "The layer math"), each frequency's wavelength ``2 pi / f`` decides: shorter than
    ``original_max_position / high_freq_factor``, kept; longer than ``original_max_position /
    low_freq_factor``, divided by ``factor``; in between, a linear blend of the two weighted by
    ``(original_max_position / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    Computed in float32 in the order Hugging Face's ``LlamaRotaryEmbedding`` uses, so the tables are
    the same to the bit.
    """
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / head_dim
    inv = 1.0 / (theta**exps)
    if scaling is None:
        return inv
    orig, lo, hi, factor = (scaling.original_max_position, scaling.low_freq_factor, scaling.high_freq_factor,
                            scaling.factor)
    wavelength = 2 * math.pi / inv
    long_waves = wavelength > orig / lo
    short_waves = wavelength < orig / hi
    slow = torch.where(long_waves, inv / factor, inv)
    weight = (orig / wavelength - lo) / (hi - lo)
    blend = (1 - weight) * slow / factor + weight * slow
    return torch.where(~short_waves & ~long_waves, blend, slow)


class SeqCache:
    """One sequence's place in a stage's KV cache: a handle (the keys and values live in the
    stage's :class:`KVSlab`). The stage that first computes the sequence gives it a slot; the slot
    is freed when the handle is dropped (garbage collected), so dropping it frees the sequence's
    KV. A handle belongs to one stage."""

    __slots__ = ("slot", "slab", "__weakref__")

    def __init__(self) -> None:
        self.slot = -1
        self.slab: KVSlab | None = None


class KVSlab:
    """A stage's keys and values: per layer one (slots, kv_heads, capacity, head_dim) tensor for
    the keys and one for the values, each sequence in one slot (a row).

    Preallocated and uninitialised: only the positions written touch memory pages on CPU, so a
    large capacity costs address space, not resident memory. It grows by doubling (slots when
    every slot is taken, capacity when a sequence outgrows it), copying each live slot's touched
    positions. Slots are handed out lowest first and taken back when a :class:`SeqCache` is
    dropped (from any thread: the free list is locked).  Because the sequences of one batch sit in
    rows of one tensor, a batch of decodes attends in a few batched operations over a padded view
    (:meth:`StageWeights._attention`) instead of one call per sequence."""

    def __init__(self, layers: range, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.slots = 0
        self.capacity = 0
        # per slot: its positions [0, touched) hold finite numbers (written, by this sequence or
        # the slot's earlier one, or zeroed); beyond, uninitialised memory
        self.touched: list[int] = []
        self._free: list[int] = []
        # re-entrant: a handle collected by the garbage collector while the slab resizes frees its slot
        self._lock = threading.RLock()

    def _resize(self, slots: int, capacity: int) -> None:
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        free = set(self._free)
        live = [s for s in range(self.slots) if s not in free]
        for store in (self.k, self.v):
            for layer in self.layers:
                old = store.get(layer)
                # a normal tensor even when allocated under inference mode: the slab is written in
                # place by whichever mode computes next (an inference tensor refuses that outside)
                with torch.inference_mode(False):
                    new = torch.empty(shape, dtype=self.dtype, device=self.device)
                if old is not None:
                    for s in live:
                        if self.touched[s]:
                            new[s, :, : self.touched[s]] = old[s, :, : self.touched[s]]
                store[layer] = new
        self._free.extend(range(self.slots, slots))
        self._free.sort(reverse=True)
        self.touched.extend([0] * (slots - self.slots))
        self.slots, self.capacity = slots, capacity

    def admit(self, cache: SeqCache, end: int, reserve: int) -> None:
        """Give ``cache`` a slot if it has none, and room for positions ``0 .. end``; ``reserve``:
        the positions it may come to need (sizes a first allocation)."""
        if cache.slab is not self:
            if cache.slab is not None:
                raise ValueError("this SeqCache belongs to another stage")
            with self._lock:
                if not self._free:
                    self._resize(max(8, 2 * self.slots), max(self.capacity, reserve, end, 16))
                slot = self._free.pop()
                self.touched[slot] = 0
            cache.slab, cache.slot = self, slot
            weakref.finalize(cache, self._release, slot)
        if end > self.capacity:
            with self._lock:
                self._resize(self.slots, max(2 * self.capacity, end))
        if end > self.touched[cache.slot]:
            self.touched[cache.slot] = end

    def make_finite(self, slot: int, width: int) -> None:
        """Zero what ``slot`` holds beyond its touched positions up to ``width`` (and as far again,
        so that a sequence read through a growing window is zeroed O(log n) times, not every step):
        a batched decode reads every sequence's slot up to the longest context, and a position it
        masks out must still be a number (0 x NaN is NaN)."""
        t = self.touched[slot]
        if t >= width:
            return
        upto = min(self.capacity, max(width, 2 * t))
        for store in (self.k, self.v):
            for layer in self.layers:
                store[layer][slot, :, t:upto] = 0
        self.touched[slot] = upto

    def _release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
            self._free.sort(reverse=True)

    @property
    def used_slots(self) -> int:
        """Slots held by live sequences."""
        return self.slots - len(self._free)


class _Fused:
    """A layer's projections as the math runs them: q, k and v stacked into one matrix (and their
    biases into one vector), gate and up likewise; one matrix product each instead of three and
    two. The LayerWeights' own fields become views of these (no second copy)."""

    __slots__ = ("qkv", "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias", "down", "down_bias",
                 "input_norm", "post_norm")

    def __init__(self, w: LayerWeights) -> None:
        nq, nk = w.q.shape[0], w.k.shape[0]
        self.qkv = torch.cat((w.q, w.k, w.v))
        w.q, w.k, w.v = self.qkv[:nq], self.qkv[nq : nq + nk], self.qkv[nq + nk :]
        self.qkv_bias = None
        if w.q_bias is not None or w.k_bias is not None or w.v_bias is not None:
            parts = [b if b is not None else self.qkv.new_zeros(n)
                     for b, n in ((w.q_bias, nq), (w.k_bias, nk), (w.v_bias, nk))]
            self.qkv_bias = torch.cat(parts)
            w.q_bias, w.k_bias, w.v_bias = (self.qkv_bias[:nq], self.qkv_bias[nq : nq + nk],
                                            self.qkv_bias[nq + nk :])
        ni = w.gate.shape[0]
        self.gate_up = torch.cat((w.gate, w.up))
        w.gate, w.up = self.gate_up[:ni], self.gate_up[ni:]
        self.gate_up_bias = None
        if w.gate_bias is not None or w.up_bias is not None:
            self.gate_up_bias = torch.cat([b if b is not None else self.gate_up.new_zeros(ni)
                                           for b in (w.gate_bias, w.up_bias)])
            w.gate_bias, w.up_bias = self.gate_up_bias[:ni], self.gate_up_bias[ni:]
        self.o, self.o_bias = w.o, w.o_bias
        self.down, self.down_bias = w.down, w.down_bias
        self.input_norm, self.post_norm = w.input_norm, w.post_norm


class _Plan:
    """What every layer of one batch shares (built once per batch, see StageWeights.layer): the
    rotary cos/sin of every token's position, each sequence's slot and slice of the packed tokens
    and, for a sequence of several new tokens, its attention mask; for a batch of decodes only,
    the index tensors and padding mask of the batched attention."""

    __slots__ = ("spans", "caches", "tokens", "cos", "sin", "seqs", "batched", "rows", "sel", "slots_t", "pos_t",
                 "width", "pad")

    def __init__(self, st: StageWeights, spans: list[tuple[int, int]], caches: list[SeqCache], reserve: list[int]) -> None:
        self.spans = list(spans)
        # weakly: a plan kept for the next layer must not keep a finished sequence's slot taken
        self.caches = [weakref.ref(c) for c in caches]
        st._rope_tables(max(p + n for p, n in spans))
        dev = st.device
        decode = all(n == 1 for _, n in spans)
        if len(spans) == 1:
            p, n = spans[0]
            cos, sin = st._cos[p : p + n], st._sin[p : p + n]
        elif decode:
            idx = torch.tensor([p for p, _ in spans], dtype=torch.long, device=dev)
            cos, sin = st._cos[idx], st._sin[idx]
        else:
            idx = torch.cat([torch.arange(p, p + n, device=dev) for p, n in spans])
            cos, sin = st._cos[idx], st._sin[idx]
        self.cos, self.sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (tokens, 1, head_dim)
        slab = st.kv
        seqs: list[tuple[int, int, int, int, torch.Tensor | None]] = []
        off = 0
        for (p, n), cache, res in zip(spans, caches, reserve, strict=True):
            slab.admit(cache, p + n, res)
            mask = None
            if n > 1:  # causal among the new tokens, open to all cached positions
                mask = torch.ones(n, p + n, dtype=torch.bool, device=dev).tril(diagonal=p).logical_not_()
            seqs.append((off, n, p, cache.slot, mask))
            off += n
        self.tokens = off
        self.seqs = seqs
        # a batch of decodes attends together when it pays (see StageWeights._attention)
        self.batched = decode and len(spans) >= st.batch_decode_min
        self.rows: slice | None = None
        self.sel: torch.Tensor | None = None
        self.slots_t: torch.Tensor | None = None
        self.pos_t: torch.Tensor | None = None
        self.pad: torch.Tensor | None = None
        self.width = 0
        if self.batched:
            slots = [s for _, _, _, s, _ in seqs]
            ends = [p + 1 for p, _ in spans]
            self.width = max(ends)
            lo, hi = min(slots), max(slots)
            if hi - lo + 1 <= RANGE_ROWS_PER_SEQ * len(slots):
                # read the slab's rows lo..hi as a view, no gather (see StageWeights._attention)
                self.rows = slice(lo, hi + 1)
                if slots != list(range(lo, lo + len(slots))):
                    self.sel = torch.tensor([s - lo for s in slots], dtype=torch.long, device=dev)
            self.slots_t = torch.tensor(slots, dtype=torch.long, device=dev)
            self.pos_t = torch.tensor([p for p, _ in spans], dtype=torch.long, device=dev)
            if min(ends) < self.width:
                for s in slots:
                    slab.make_finite(s, self.width)
                if self.rows is not None:  # a row between the batch's own reads its whole width
                    row_ends = [self.width] * (hi - lo + 1)
                    for s, e in zip(slots, ends, strict=True):
                        row_ends[s - lo] = e
                    ends = row_ends
                lens = torch.tensor(ends, device=dev)
                pad = torch.arange(self.width, device=dev)[None, :] >= lens[:, None]  # (rows, width)
                self.pad = pad[:, None, None, :]  # against the (rows, kv_heads, groups, width) scores

    def matches(self, spans: list[tuple[int, int]], caches: list[SeqCache]) -> bool:
        if self.spans != spans or len(self.caches) != len(caches):
            return False
        return all(r() is c for r, c in zip(self.caches, caches))  # noqa: B905 - lengths checked


class StageWeights:
    """Layers ``[start, end)`` of a LLaMA-family model, with the embedding when ``start == 0`` and
    the final norm and LM head when ``end == num_layers``; and the math that runs them.

    Building it stacks each layer's q/k/v and gate/up matrices (``_Fused``); the ``LayerWeights``
    fields stay readable, as views of the stacked matrices."""

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
        self._fused = {i: _Fused(w) for i, w in layers.items()}
        # RoPE frequencies as Hugging Face computes them (float32), then cached per position
        self._inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, device)
        self._cos = torch.empty(0, c.head_dim, dtype=dtype, device=device)
        self._sin = self._cos
        self._plan: _Plan | None = None
        self._head_pieces: tuple[torch.Tensor, ...] = ()
        if lm_head is not None and device.type == "cpu" and lm_head.shape[0] > 2 * HEAD_ROWS:
            self._head_pieces = lm_head.split(HEAD_ROWS)
        self.kv = KVSlab(range(start, end), c.num_kv_heads, c.head_dim, dtype, device)
        #: decode batches of at least this many sequences attend as one (see _attention)
        self.batch_decode_min = 2
        # float32: torch's fused RMSNorm computes Hugging Face's formula (the variance in float32,
        # then x * rsqrt(variance + eps) * w); other dtypes take the spelled-out path, which rounds
        # the normalised value to the dtype before the weight multiplies it, as Hugging Face does
        self._fused_rms = dtype == torch.float32 and hasattr(torch, "rms_norm")  # torch >= 2.4

    # ---- pieces ---------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._fused_rms:
            return torch.rms_norm(x, w.shape, w, self.config.rms_norm_eps)
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
        """Final norm and LM head on hidden states (n, hidden) -> (n, vocab), in float32.

        On CPU, for two rows or more, the head's product runs in pieces of ``HEAD_ROWS``
        vocabulary rows: the same products (the same numbers to the bit), but a piece of the
        matrix fits in cache while the BLAS packs it, which on SmolLM2's 49,152 x 576 head
        measured 15-25 % faster at 4 to 32 rows (one row is a matrix-vector product: whole)."""
        assert self.norm is not None and self.lm_head is not None
        x = self._rms(h, self.norm)
        if self._head_pieces and x.shape[0] > 1:
            return torch.cat([F.linear(x, w) for w in self._head_pieces], dim=1).float()
        return F.linear(x, self.lm_head).float()

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
        ``caches``: their KV caches (appended to); ``reserve``: capacity hint per sequence.

        The positions' rotary tables and the masks are built once for the layers of a batch: the
        calls of consecutive layers with equal ``spans`` and the same cache objects share them."""
        plan = self._plan
        if plan is None or not plan.matches(spans, caches):
            plan = self._plan = _Plan(self, spans, caches, reserve)
        f = self._fused[idx]
        c = self.config
        hd, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        t = x.shape[0]
        h = self._rms(x, f.input_norm)
        qkv = F.linear(h, f.qkv, f.qkv_bias)  # (T, (heads + 2 kv_heads) x head_dim)
        # RoPE on the queries and keys together: (T, heads + kv_heads, head_dim)
        qk = qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd)
        qk = qk * plan.cos + self._rotate_half(qk) * plan.sin
        v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)
        a = self._attention(idx, qk, v, plan)
        x = F.linear(a, f.o, f.o_bias).add_(x)
        h = self._rms(x, f.post_norm)
        gu = F.linear(h, f.gate_up, f.gate_up_bias)
        i = c.intermediate_size
        return F.linear(F.silu(gu[:, :i]).mul_(gu[:, i:]), f.down, f.down_bias).add_(x)

    def _attention(self, idx: int, qk: torch.Tensor, v: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Grouped-query attention of every sequence of the plan over its cache (which it extends
        with the new keys and values); (T, heads x head_dim).

        The query heads sharing a key-value head attend as one (groups x n, head_dim) block
        against that head's keys, so keys and values are never repeated per query head. A batch
        of decodes (one new token per sequence, ``batch_decode_min`` sequences or more) attends
        as one: its keys and values are written with one indexed copy each and read as a padded
        (rows, kv_heads, longest context, head_dim) block, the positions past each sequence's own
        length masked out. The block is a view of the slab's rows from the lowest slot of the
        batch to the highest when they are at most ``RANGE_ROWS_PER_SEQ`` per sequence (each
        query at its slot's row; the rows between are computed and dropped), and the batch's
        slots gathered otherwise.  Otherwise each sequence attends alone.  Both spell the
        attention out (two products around a float32 softmax): on CPU at SmolLM2's shape it
        measured as fast as torch's ``scaled_dot_product_attention`` in a whole decode step, and
        faster for one sequence and for prompts, and a batch of equal lengths then gives the
        numbers of its sequences computed alone, bit for bit (docs/models.md)."""
        c = self.config
        hd, nh, nkv, g = c.head_dim, c.num_heads, c.num_kv_heads, self._groups
        kl, vl = self.kv.k[idx], self.kv.v[idx]
        k_new = qk[:, nh:]  # (T, kv_heads, head_dim)
        if plan.batched:
            b, w = plan.tokens, plan.width
            kl[plan.slots_t, :, plan.pos_t] = k_new
            vl[plan.slots_t, :, plan.pos_t] = v
            # the groups of a key-value head as its query rows: (batch, kv_heads, groups, head_dim)
            q = qk[:, :nh].view(b, nkv, g, hd)
            if plan.rows is not None:
                keys, values = kl[plan.rows, :, :w], vl[plan.rows, :, :w]
                if plan.sel is not None:  # each query at its slot's row; the rows between are not read back
                    q = q.new_zeros((keys.shape[0], nkv, g, hd)).index_copy_(0, plan.sel, q)
            else:
                keys, values = kl[plan.slots_t, :, :w], vl[plan.slots_t, :, :w]
            s = torch.matmul(q, keys.transpose(2, 3)).mul_(self._scale)  # (rows, kv_heads, groups, width)
            if plan.pad is not None:
                s.masked_fill_(plan.pad, float("-inf"))
            p = s.softmax(-1) if s.dtype == torch.float32 else s.softmax(-1, dtype=torch.float32).to(s.dtype)
            o = torch.matmul(p, values)
            if plan.sel is not None:
                o = o.index_select(0, plan.sel)
            return o.view(b, nh * hd)
        out = qk.new_empty((plan.tokens, nh * hd))
        for off, n, pos, slot, mask in plan.seqs:
            end = pos + n
            kl[slot, :, pos:end] = k_new[off : off + n].transpose(0, 1)
            vl[slot, :, pos:end] = v[off : off + n].transpose(0, 1)
            keys, values = kl[slot, :, :end], vl[slot, :, :end]  # (kv_heads, context, head_dim)
            if n == 1:
                q = qk[off, :nh].view(nkv, g, hd)
                s = torch.bmm(q, keys.transpose(1, 2)).mul_(self._scale)  # (kv_heads, groups, context)
                p = s.softmax(-1) if s.dtype == torch.float32 else s.softmax(-1, dtype=torch.float32).to(s.dtype)
                torch.bmm(p, values, out=out[off].view(nkv, g, hd))
                continue
            # (n, heads, hd) -> (kv_heads, groups x n, hd), rows ordered (group, token)
            q = qk[off : off + n, :nh].reshape(n, nkv, g, hd).permute(1, 2, 0, 3).reshape(nkv, g * n, hd)
            s = torch.bmm(q, keys.transpose(1, 2)).mul_(self._scale).view(nkv, g, n, end)
            assert mask is not None
            s.masked_fill_(mask, float("-inf"))
            p = s.softmax(-1) if s.dtype == torch.float32 else s.softmax(-1, dtype=torch.float32).to(s.dtype)
            o = torch.bmm(p.view(nkv, g * n, end), values).view(nkv, g, n, hd)
            out[off : off + n].view(n, nkv, g, hd).copy_(o.permute(2, 0, 1, 3))
        return out


def _check_range(config: LlamaConfig, start: int, end: int) -> None:
    if not 0 <= start < end <= config.num_layers:
        raise ModelLoadError(f"layers [{start}, {end}) are not within the model's [0, {config.num_layers})")


def dummy_stage(
    config: LlamaConfig, start: int, end: int, *, seed: int = 0, dtype: str = "float32", device: str = "cpu"
) -> StageWeights:
    """Seeded dummy weights (normal, std 0.02; norms 1; the biases the config names, also normal):
    each tensor drawn from a generator seeded by ``seed`` and its own name, so any worker builds
    the same layer the same way."""
    _check_range(config, start, end)
    dt = torch_dtype(dtype)
    dev = torch.device(device)

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed((seed * 1_000_003 + sum(ord(ch) * 131**i for i, ch in enumerate(name))) % (2**63))
        return (torch.randn(shape, generator=g) * 0.02).to(dtype=dt, device=dev)

    shapes = {**_layer_shapes(config), **_bias_shapes(config)}
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
    from ..models.weights import open_checkpoint, release_freed_memory

    try:
        ck = open_checkpoint(path)
        config = LlamaConfig.from_arch(ck.arch)
        _check_range(config, start, end)
        dt_name = dtype or ck.dtype
        dt = torch_dtype(dt_name)
        tensors = ck.read(start, end, dt_name, device)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    # tensors are popped, not looked up: what StageWeights rearranges (fuses) is freed as it goes
    layers = {}
    for i in range(start, end):
        p = f"model.layers.{i}."
        layers[i] = LayerWeights(**{k: tensors.pop(p + name) for k, name in _LAYER_KEYS.items() if p + name in tensors})
    embed = tensors.get(EMBED) if start == 0 else None
    norm = lm_head = None
    if end == config.num_layers:
        norm = tensors.pop(NORM)
        lm_head = tensors.get(EMBED) if config.tie_word_embeddings else tensors.pop(LM_HEAD)
    del tensors
    stage = StageWeights(config, start, end, layers, embed, norm, lm_head, dt, torch.device(device))
    release_freed_memory()
    return stage


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

