"""A stage's weights read from the model's own files, against their makers.

* Hugging Face directories made by ``transformers`` (LLaMA, Llama 3 RoPE scaling, Qwen2, tied
  embeddings, sharded, bfloat16): each stage's tensors equal the model's ``state_dict`` exactly,
  and a stage opens only the shards holding its tensors.
* GGUF files written with ``gguf.GGUFWriter``, one per tensor type, the q/k rows permuted as
  llama.cpp's converter does: each tensor equals ``gguf.quants.dequantize`` of its bytes, rows put
  back by an index formula written here.
* The real GGUF (SmolLM2-135M-Instruct, Q4_1): a stage's tensors equal the parameters transformers
  loads from the same file (de-quantised, un-permuted by its own loader).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from real_model import SMOLLM2_GGUF, needs_real_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from helix_async.errors import ConfigError  # noqa: E402
from helix_async.executors.llama import load_stage  # noqa: E402
from helix_async.models import resolve_model  # noqa: E402
from helix_async.models import weights as weights_mod  # noqa: E402
from helix_async.models.weights import open_checkpoint, read_stage  # noqa: E402

SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
STAGES = [(0, 1), (1, 3), (0, 3)]


def _make(path: Path, kind: str) -> Any:
    """A random ``transformers`` model of ``kind`` saved to ``path`` (safetensors); returns it."""
    torch.manual_seed(11)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, tie_word_embeddings=False))
    else:
        extra: dict[str, Any] = {"tie_word_embeddings": kind == "tied"}
        if kind == "llama3":
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
            extra["rope_theta"] = 500000.0
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, **extra))
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB" if kind == "sharded" else "50GB")
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    out = {}
    for kind in ("llama", "llama3", "qwen2", "tied", "sharded", "bf16"):
        d = tmp_path_factory.mktemp(kind)
        out[kind] = (d, _make(d, kind))
    return out


def _expected(model: Any, start: int, end: int) -> dict[str, Any]:
    """The stage's tensors from the model's own state dict (a tied head under the embedding's name)."""
    sd = model.state_dict()
    L = model.config.num_hidden_layers
    keep = {k: v for k, v in sd.items() if k.startswith(tuple(f"model.layers.{i}." for i in range(start, end)))}
    if start == 0 or (end == L and model.config.tie_word_embeddings):
        keep["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
    if end == L:
        keep["model.norm.weight"] = sd["model.norm.weight"]
        if not model.config.tie_word_embeddings:
            keep["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v for k, v in keep.items() if "rotary_emb" not in k}


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "tied", "sharded", "bf16"])
def test_a_stage_of_a_hf_directory_is_the_state_dict(hf_models: dict[str, tuple[Path, Any]], kind: str) -> None:
    d, model = hf_models[kind]
    spec = resolve_model(str(d)).spec
    arch = spec.arch
    assert (spec.num_layers, spec.hidden_size, spec.vocab_size, spec.num_key_value_heads) == (3, 32, 96, 2)
    assert spec.dtype == ("bfloat16" if kind == "bf16" else "float32")
    assert arch.family == ("qwen2" if kind == "qwen2" else "llama")
    assert arch.qkv_bias == (kind == "qwen2") and arch.tie_word_embeddings == (kind == "tied")
    if kind == "llama3":
        r = arch.rope_scaling
        assert (r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position, arch.rope_theta) == (
            8.0, 1.0, 4.0, 64, 500000.0)
    else:
        assert arch.rope_scaling is None
    for a, b in STAGES:
        got = read_stage(d, a, b)
        want = _expected(model, a, b)
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    if kind == "sharded":
        assert len(list(d.glob("*.safetensors"))) > 2 and (d / "model.safetensors.index.json").is_file()


def test_a_stage_opens_only_the_shards_holding_its_tensors(hf_models: dict[str, tuple[Path, Any]],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = hf_models["sharded"]
    wmap = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    opened: list[str] = []

    def spy(f: str, mode: str = "r") -> Any:
        opened.append(Path(f).name)
        return open(f, mode)

    monkeypatch.setattr(weights_mod, "open", spy, raising=False)
    read_stage(d, 1, 2)
    need = {f for k, f in wmap.items() if k.startswith("model.layers.1.")}
    assert set(opened) == need and len(opened) == len(need) < len(set(wmap.values()))


def test_the_compute_dtype_converts_at_load(hf_models: dict[str, tuple[Path, Any]]) -> None:
    d, model = hf_models["bf16"]
    st = load_stage(d, 0, 1, dtype="float32")
    assert st.dtype == torch.float32
    assert torch.equal(st.layers[0].q, model.state_dict()["model.layers.0.self_attn.q_proj.weight"].float())
    assert load_stage(d, 2, 3).dtype == torch.bfloat16  # default: the checkpoint's
    q, _ = _qwen = hf_models["qwen2"]
    st = load_stage(q, 0, 3)
    sd = _qwen[1].state_dict()
    assert torch.equal(st.layers[2].k_bias, sd["model.layers.2.self_attn.k_proj.bias"]) and st.layers[2].o_bias is None
    tied = load_stage(hf_models["tied"][0], 0, 3)
    assert tied.lm_head is tied.embed  # one table, read once
    with pytest.raises(ConfigError, match=r"--dtype: 'int8' is not one of"):
        open_checkpoint(d).read(0, 1, "int8")


# ---- GGUF, every supported type ------------------------------------------------------------------

# K-quants have 256-element blocks: rows of 256
G_H, G_I, G_HEADS, G_KV, G_V = 256, 256, 4, 2, 16
G_HD = G_H // G_HEADS


def _gguf_row(hf_row: int, head_dim: int) -> int:
    """llama.cpp's converter moves Hugging Face row ``h*hd + j*hd/2 + i`` of q or k to
    ``h*hd + 2i + j`` (interleaving the two rotary halves of each head)."""
    h, r = divmod(hf_row, head_dim)
    j, i = divmod(r, head_dim // 2)
    return h * head_dim + 2 * i + j


# the byte offset of each K-quant block's fp16 scales (d, and dmin where it has one): ggml's layouts
_K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _gguf_bytes(x: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """``x`` stored as ``qtype``: quantised where gguf can, else random blocks with sane scales."""
    q = gguf.GGMLQuantizationType[qtype]
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(x, q)
    block, size = gguf.GGML_QUANT_SIZES[q]
    raw = rng.integers(0, 256, size=(x.shape[0], x.shape[1] // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        raw[..., off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.reshape(x.shape[0], -1)


def _write_llama_gguf(path: Path, qtype: str, arch: str = "llama") -> dict[str, np.ndarray]:
    """A one-layer GGUF whose 2-D tensors are ``qtype``; returns the Hugging Face tensors it must
    read back as (de-quantised, q/k rows un-permuted for llama)."""
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(G_H)
    w.add_feed_forward_length(G_I)
    w.add_head_count(G_HEADS)
    w.add_head_count_kv(G_KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(G_V)
    hf = {"model.embed_tokens.weight": ("token_embd.weight", (G_V, G_H)),
          "model.norm.weight": ("output_norm.weight", (G_H,)),
          "lm_head.weight": ("output.weight", (G_V, G_H)),
          "model.layers.0.input_layernorm.weight": ("blk.0.attn_norm.weight", (G_H,)),
          "model.layers.0.post_attention_layernorm.weight": ("blk.0.ffn_norm.weight", (G_H,)),
          "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", (G_H, G_H)),
          "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", (G_KV * G_HD, G_H)),
          "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", (G_KV * G_HD, G_H)),
          "model.layers.0.self_attn.o_proj.weight": ("blk.0.attn_output.weight", (G_H, G_H)),
          "model.layers.0.mlp.gate_proj.weight": ("blk.0.ffn_gate.weight", (G_I, G_H)),
          "model.layers.0.mlp.up_proj.weight": ("blk.0.ffn_up.weight", (G_I, G_H)),
          "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", (G_H, G_I))}
    if arch == "qwen2":
        hf.update({"model.layers.0.self_attn.q_proj.bias": ("blk.0.attn_q.bias", (G_H,)),
                   "model.layers.0.self_attn.k_proj.bias": ("blk.0.attn_k.bias", (G_KV * G_HD,)),
                   "model.layers.0.self_attn.v_proj.bias": ("blk.0.attn_v.bias", (G_KV * G_HD,))})
    want = {}
    for name, (gname, shape) in hf.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(gname, x)
            want[name] = x
            continue
        q = gguf.GGMLQuantizationType[qtype]
        stored = _gguf_bytes(x, qtype, rng)
        w.add_tensor(gname, stored, raw_dtype=q)
        deq = gguf.quants.dequantize(stored, q).reshape(shape)
        if arch == "llama" and gname in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            deq = deq[[_gguf_row(r, G_HD) for r in range(shape[0])]]
        want[name] = deq
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_every_gguf_type_reads_back_de_quantised(tmp_path: Path, qtype: str) -> None:
    f = tmp_path / f"m.{qtype}.gguf"
    want = _write_llama_gguf(f, qtype)
    got = read_stage(f, 0, 1)
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        assert got[name].dtype == torch.float32 and np.array_equal(got[name].numpy(), x), name
    assert all(np.isfinite(x).all() for x in want.values())


def test_qwen2_gguf_rows_are_not_permuted_and_biases_read(tmp_path: Path) -> None:
    f = tmp_path / "q.gguf"
    want = _write_llama_gguf(f, "Q8_0", arch="qwen2")
    got = read_stage(f, 0, 1, dtype="float64")
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        assert got[name].dtype == torch.float64 and np.array_equal(got[name].numpy(), x.astype(np.float64)), name


# ---- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_oracle() -> Iterator[dict[str, Any]]:
    """transformers' SmolLM2 from the same GGUF: its de-quantised parameters (float32)."""
    assert SMOLLM2_GGUF is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name,
                                                              dtype=torch.float32)
    yield model.state_dict()


@needs_real_model
@pytest.mark.parametrize("stage", [(0, 2), (28, 30)])
def test_smollm2_stages_equal_transformers_parameters(smollm2_oracle: dict[str, Any], stage: tuple[int, int]) -> None:
    assert SMOLLM2_GGUF is not None
    got = read_stage(SMOLLM2_GGUF, *stage)
    a, b = stage
    want = {k: v for k, v in smollm2_oracle.items()
            if k.startswith(tuple(f"model.layers.{i}." for i in range(a, b)))}
    want["model.embed_tokens.weight"] = smollm2_oracle["model.embed_tokens.weight"]  # first stage, or the tied head
    if b == 30:
        want["model.norm.weight"] = smollm2_oracle["model.norm.weight"]
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
