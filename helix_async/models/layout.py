"""Which tensors a pipeline stage holds, under which names and of which shapes (torch-free).

The names are Hugging Face's (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` state dicts): every
checkpoint format is read into them. A stage holding layers ``[a, b)`` of a model of ``L`` layers
holds those layers' tensors, plus the embedding table when ``a == 0`` and the final norm and the LM
head when ``b == L`` (the LM head of a model with tied embeddings is the embedding table; it is
read once, under ``model.embed_tokens.weight``). docs/models.md lists the names and the GGUF names
they come from.
"""

from __future__ import annotations

from .arch import ArchConfig

__all__ = [
    "EMBED",
    "GGUF_GLOBAL_NAMES",
    "GGUF_LAYER_NAMES",
    "LM_HEAD",
    "NORM",
    "gguf_name",
    "layer_tensor_shapes",
    "stage_tensor_shapes",
]

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

#: a layer's tensors: the name after ``model.layers.{i}.`` -> GGUF's name after ``blk.{i}.``
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
}

#: the tensors outside the layers -> their GGUF names
GGUF_GLOBAL_NAMES = {EMBED: "token_embd.weight", NORM: "output_norm.weight", LM_HEAD: "output.weight"}


def gguf_name(hf_name: str) -> str:
    """The GGUF name of the Hugging Face tensor name ``hf_name`` (``model.layers.3.mlp.up_proj.weight``
    -> ``blk.3.ffn_up.weight``). KeyError for a name outside the table."""
    if hf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[hf_name]
    prefix, _, rest = hf_name.partition(".layers.")
    if prefix != "model" or not rest:
        raise KeyError(hf_name)
    idx, _, local = rest.partition(".")
    if not idx.isdigit():
        raise KeyError(hf_name)
    return f"blk.{int(idx)}.{GGUF_LAYER_NAMES[local]}"


def layer_tensor_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """One layer's tensors (names after ``model.layers.{i}.``) -> shape, as ``nn.Linear`` stores
    them: (out features, in features); the biases the architecture has are included."""
    h, i, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    if arch.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch.o_bias:
        shapes["self_attn.o_proj.bias"] = (h,)
    if arch.mlp_bias:
        shapes.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)})
    return shapes


def stage_tensor_shapes(arch: ArchConfig, start: int, end: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the stage holding layers ``[start, end)`` reads -> its shape (see the module
    doc; a tied LM head appears as ``model.embed_tokens.weight``). ValueError for a range outside
    the model."""
    if not 0 <= start < end <= arch.num_layers:
        raise ValueError(f"layers [{start}, {end}) are not within the model's [0, {arch.num_layers})")
    table = (arch.vocab_size, arch.hidden_size)
    out: dict[str, tuple[int, ...]] = {}
    if start == 0:
        out[EMBED] = table
    layer = layer_tensor_shapes(arch)
    for i in range(start, end):
        for name, shape in layer.items():
            out[f"model.layers.{i}.{name}"] = shape
    if end == arch.num_layers:
        out[NORM] = (arch.hidden_size,)
        out[EMBED if arch.tie_word_embeddings else LM_HEAD] = table
    return out
