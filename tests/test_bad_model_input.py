"""Bad model files through the real command line (issue 23, item 9).

Each case is one bad model given to ``serve`` (and where it applies ``plan``), run in-process
through ``helix_async.cli.main``: exit 2, one line on stderr starting ``error:`` that names the
file and the field, flag or tensor, and nothing started: ``serve`` writes its plan and worker logs
only once every check has passed, so its ``--log-dir`` must stay empty.  The model-source tests
(test_model_sources.py) cover the same errors one level down; these check that the commands stop
on them before a host or a worker exists.

Checkpoints are written with numpy (``safetensors.numpy``); the GGUF cases cut or corrupt a copy
of the real model's header (skipped, saying why, where it is not installed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from real_model import SMOLLM2_GGUF, needs_real_model

from helix_async.cli import main
from helix_async.frontend.tokenizer import TINY_DIR

safetensors_numpy = pytest.importorskip("safetensors.numpy")

# a small LLaMA whose vocabulary is the tiny tokenizer's (2,048 ids), so that file can serve it
CFG = {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 16, "intermediate_size": 32,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "rms_norm_eps": 1e-5,
       "max_position_embeddings": 512, "tie_word_embeddings": False, "torch_dtype": "float32"}


def _tensors(cfg: dict) -> dict[str, np.ndarray]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}


def _checkpoint(d: Path, cfg: dict = CFG, *, tokenizer: bool = True) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    safetensors_numpy.save_file(_tensors(cfg), str(d / "model.safetensors"))
    if tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY_DIR / f, d / f)
    return d


def _serve(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path | str, *extra: str) -> str:
    """``serve --model MODEL`` must stop with exit 2 and one line, starting nothing; its line."""
    logs = tmp_path / "serve-logs"
    rc = main(["serve", "--model", str(model), "--http", "127.0.0.1:0", "--log-dir", str(logs), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not logs.exists() or not any(logs.iterdir()), "serve wrote a plan or started a worker"
    return err


def test_a_config_missing_a_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "m")
    cfg = dict(CFG)
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    err = _serve(capsys, tmp_path, d)
    assert "config.json" in err and "hidden_size" in err and "missing" in err
    assert main(["plan", "--cluster", "single24", "--model", str(d)]) == 2
    assert "hidden_size" in capsys.readouterr().err


def test_an_unsupported_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "vocab_size": 50257}))
    err = _serve(capsys, tmp_path, d)
    assert "config.json" in err and "model_type" in err and "'gpt2'" in err


def test_a_truncated_or_corrupt_safetensors_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    err = _serve(capsys, tmp_path, d)
    assert "model.safetensors" in err
    f.write_bytes(b"\xff" * 64)
    err = _serve(capsys, tmp_path, d)
    assert "model.safetensors" in err


def test_a_missing_tokenizer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "m", tokenizer=False)
    err = _serve(capsys, tmp_path, d)
    assert "tokenizer.json" in err and str(d) in err


def test_layers_that_do_not_fit_memory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "m")
    # the first stage holds a 2,048 x 16 float32 embedding table: 128 KiB, more than 64 KiB
    err = _serve(capsys, tmp_path, d, "--workers", "3", "--memory-bytes", str(64 * 1024))
    assert "--memory-bytes" in err and "layers [0, 1)" in err


@needs_real_model
def test_a_truncated_or_corrupt_gguf_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert SMOLLM2_GGUF is not None
    cut = tmp_path / "cut.gguf"
    with SMOLLM2_GGUF.open("rb") as src:
        cut.write_bytes(src.read(3 << 20))  # the header and the first tensors, not the rest
    err = _serve(capsys, tmp_path, cut)
    assert "cut.gguf" in err and "truncated" in err.lower()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + cut.read_bytes()[4:])
    err = _serve(capsys, tmp_path, bad)
    assert "bad.gguf" in err


@needs_real_model
def test_an_unsupported_quantisation(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The real file with one tensor retyped to a quantisation we do not read (IQ2_XXS)."""
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType, GGUFReader

    assert SMOLLM2_GGUF is not None
    reader = GGUFReader(str(SMOLLM2_GGUF))
    t = next(t for t in reader.tensors if t.tensor_type.name == "Q4_1")
    # the type field of the tensor's info record is the uint32 after its dims
    type_field = t.field.parts[-2]
    offset = int(type_field.ctypes.data - reader.data.ctypes.data)
    data = bytearray(SMOLLM2_GGUF.read_bytes())
    assert int.from_bytes(data[offset:offset + 4], "little") == int(GGMLQuantizationType.Q4_1)
    data[offset:offset + 4] = int(GGMLQuantizationType.IQ2_XXS).to_bytes(4, "little")
    retyped = tmp_path / "retyped.gguf"
    retyped.write_bytes(bytes(data))
    err = _serve(capsys, tmp_path, retyped)
    assert "IQ2_XXS" in err and t.name in err
