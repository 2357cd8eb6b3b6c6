"""The model sources' table: named specs and checkpoint directories, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helix_async.errors import ConfigError
from helix_async.model import get_model
from helix_async.models import resolve_model
from helix_async.models import sources as sources_mod

# tiny-llama's shape as a Hugging Face config.json writes it (8 layers, hidden 256, ...)
TINY = {"model_type": "llama", "num_hidden_layers": 8, "hidden_size": 256, "intermediate_size": 688,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 2048}


def _checkpoint(tmp_path: Path, cfg: dict, tokenizer: bool = False) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


@pytest.mark.parametrize("ref, name", [("llama2-70b", "llama2-70b"), ("LLaMA-30B", "llama1-30b"), ("tinyllama", "tiny-llama")])
def test_named_models_resolve_by_alias(ref: str, name: str) -> None:
    m = resolve_model(ref)
    assert (m.spec.name, m.source, m.checkpoint, m.tokenizer) == (name, "named", "", "")


def test_a_checkpoint_directory_of_a_known_shape_resolves_to_its_spec(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path, TINY, tokenizer=True)
    m = resolve_model(str(d))
    assert m.spec == get_model("tiny-llama")
    assert (m.source, m.checkpoint, m.tokenizer) == ("hf-dir", str(d), str(d / "tokenizer.json"))
    # no tokenizer.json: the command's default tokenizer is used
    d2 = tmp_path / "other"
    d2.mkdir()
    (d2 / "config.json").write_text(json.dumps(TINY))
    assert resolve_model(str(d2)).tokenizer == ""


def test_num_key_value_heads_defaults_to_the_attention_heads(tmp_path: Path) -> None:
    cfg = dict(TINY, num_key_value_heads=None)
    del cfg["num_key_value_heads"]
    d = _checkpoint(tmp_path, cfg)
    # 8 kv heads is not tiny-llama's 4: the shape error, not a missing-field error
    with pytest.raises(ConfigError, match=r"shape: .*\(8, 256, 688, 8, 8, 2048\) match no model"):
        resolve_model(str(d))


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(TINY, model_type="gpt2"), r"model_type: 'gpt2' is not supported"),
        (dict(TINY, hidden_size=0), r"hidden_size: must be a positive integer, got 0"),
        (dict(TINY, vocab_size="2048"), r"vocab_size: must be a positive integer"),
        ({k: v for k, v in TINY.items() if k != "intermediate_size"}, r"intermediate_size: must be a positive integer, got None"),
        (dict(TINY, num_hidden_layers=9), r"shape: .* match no model with CPU profiles \(tiny-llama is"),
        ([1, 2], r"config.json: not a JSON object"),
    ],
)
def test_a_bad_config_json_is_named_with_its_field(tmp_path: Path, cfg: object, match: str) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match) as e:
        resolve_model(str(d))
    assert str(d / "config.json") in str(e.value)


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(ConfigError, match=r"--model: a checkpoint directory must hold config.json"):
        resolve_model(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: config.json: unreadable"):
        resolve_model(str(d))
    with pytest.raises(ConfigError, match=r"/nope: plan.model: neither a known model .*built-in name .*checkpoint directory"):
        resolve_model(str(tmp_path / "nope"), where="plan.model")


def test_a_new_source_is_one_entry_in_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new source (a GGUF file, say) needs: its class, and its line in SOURCES."""

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
