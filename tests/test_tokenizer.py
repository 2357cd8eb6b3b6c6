"""The shipped tiny tokenizer is reproducible, and streaming detokenization equals whole decoding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

from helix_async.errors import ConfigError  # noqa: E402
from helix_async.frontend.tokenizer import (  # noqa: E402
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
