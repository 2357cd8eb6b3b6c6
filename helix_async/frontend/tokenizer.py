"""Text in and out of the cluster: a Hugging Face ``tokenizer.json`` (loaded with ``tokenizers``),
the chat template, and streaming detokenization.

Where a tokenizer comes from:

- ``tiny-llama``: the one this project ships in ``data/tokenizers/tiny-llama/``, a byte-level BPE
  of 2,048 ids (the model's vocabulary) trained with ``tokenizers`` on ``corpus.txt`` there (a
  snapshot of this project's own documentation).  ``python -m helix_async.frontend.tokenizer``
  rebuilds it from that corpus; the tests check that the rebuild equals the shipped file, byte for
  byte.  Its ids 0, 1, 2 are ``<unk>``, ``<s>`` (prepended to every prompt) and ``</s>`` (end of
  text).
- a checkpoint directory: its ``tokenizer.json`` and, when present, ``tokenizer_config.json``
  (``bos_token``, ``eos_token``, ``chat_template``).

Chat templates are Jinja templates, as in ``transformers`` (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``), rendered in a sandboxed Jinja environment.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["TINY_DIR", "IncrementalDetokenizer", "TextTokenizer", "build_tiny_tokenizer", "load_tokenizer"]

TINY_DIR = Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "tiny-llama"

#: the tiny model's chat template (ours): a role line, the text, an end-of-text mark per message
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIALS = ("<unk>", "<s>", "</s>")


def build_tiny_tokenizer(corpus: str, vocab_size: int = 2048) -> Any:
    """Train the tiny model's byte-level BPE on ``corpus`` (deterministic for the same text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@dataclass
class TextTokenizer:
    """A tokenizer with what the API needs around it."""

    tok: Any  # tokenizers.Tokenizer
    source: str
    bos_id: int | None
    eos_id: int | None
    bos_token: str
    eos_token: str
    chat_template: str | None

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """The prompt's ids, with the beginning-of-text id where the tokenizer adds one."""
        return list(self.tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        """The chat as one prompt text, ending where the assistant's reply begins."""
        if not self.chat_template:
            raise ConfigError(self.source, "chat_template", "this tokenizer has no chat template (use /v1/completions)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except TemplateError as e:
            raise ConfigError(self.source, "chat_template", f"the template failed: {e}") from None

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """A rendered chat's ids (the template writes the beginning-of-text mark itself)."""
        return list(self.tok.encode(self.apply_chat_template(messages), add_special_tokens=False).ids)


def _token_text(v: Any) -> str:
    if isinstance(v, dict):  # {"content": "</s>", ...} in tokenizer_config.json
        return str(v.get("content", ""))
    return "" if v is None else str(v)


def load_tokenizer(where: str | Path) -> TextTokenizer:
    """``tiny-llama`` (the shipped one) or a directory holding ``tokenizer.json``."""
    from ..extras import require

    require("tokenizers", "serve")
    from tokenizers import Tokenizer

    d = TINY_DIR if str(where) in ("tiny-llama", "tiny_llama", "tinyllama") else Path(where)
    path = d / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(str(d), "tokenizer.json", "no tokenizer.json in this directory")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions on bad files
        raise ConfigError(str(path), "tokenizer.json", f"not a tokenizer file: {e}") from None
    cfg: dict[str, Any] = {}
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(str(cfg_path), "tokenizer_config.json", f"not JSON: {e}") from None
    bos = _token_text(cfg.get("bos_token")) or "<s>"
    eos = _token_text(cfg.get("eos_token")) or "</s>"
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return TextTokenizer(
        tok=tok,
        source=str(d),
        bos_id=tok.token_to_id(bos),
        eos_id=tok.token_to_id(eos),
        bos_token=bos,
        eos_token=eos,
        chat_template=template if isinstance(template, str) else None,
    )


class IncrementalDetokenizer:
    """Text as tokens arrive: each :meth:`add` returns the new text that is final (a byte-level
    token may end inside a UTF-8 character; such text waits for the next token).  It decodes a
    short window of recent tokens, not the whole output, per token."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._t = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are emitted and stable
        self._read = 0  # tokens whose text has been emitted
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        dec = self._t.decode
        prefix_text = dec(self.ids[self._prefix : self._read])
        full = dec(self.ids[self._prefix :])
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""  # an incomplete character (or a special token): wait
        new = full[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """What is left at the end (an incomplete character decodes as U+FFFD)."""
        full = self._t.decode(self.ids[self._prefix :])
        prefix_text = self._t.decode(self.ids[self._prefix : self._read])
        self._prefix = self._read = len(self.ids)
        new = full[len(prefix_text) :]
        self.text += new
        return new


def find_stop(text: str, stops: Iterable[str], start: int = 0) -> int:
    """The index in ``text`` where the first of ``stops`` begins (searching from ``start``), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def _corpus_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "bench" / "README.md"]


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the tiny model's tokenizer from the shipped corpus (``--corpus-from-repo`` first
    refreshes the corpus from this repository's documentation)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m helix_async.frontend.tokenizer", description=main.__doc__)
    ap.add_argument("--corpus-from-repo", action="store_true", help="snapshot README.md, docs/*.md and bench/README.md first")
    ap.add_argument("--out", default=str(TINY_DIR), help="directory to write (default: the shipped one)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus_path = TINY_DIR / "corpus.txt"
    if args.corpus_from_repo:
        root = Path(__file__).resolve().parents[2]
        text = "".join(p.read_text() + "\n" for p in _corpus_files(root) if p.is_file())
        (out / "corpus.txt").write_text(text)
        corpus_path = out / "corpus.txt"
    tok = build_tiny_tokenizer(corpus_path.read_text())
    tok.save(str(out / "tokenizer.json"), pretty=True)
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TINY_CHAT_TEMPLATE,
           "model_max_length": 2048, "source": "helix_async.frontend.tokenizer (byte-level BPE on corpus.txt)"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"wrote {out / 'tokenizer.json'} ({tok.get_vocab_size()} ids) and tokenizer_config.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
