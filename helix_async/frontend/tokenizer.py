"""Text in and out of the cluster: a model's own tokenizer and chat template, and streaming
detokenization.

Where a tokenizer comes from (:func:`load_tokenizer`):

- ``tiny-llama``: the one this project ships in ``data/tokenizers/tiny-llama/``, a byte-level BPE
  of 2,048 ids (the model's vocabulary) trained with ``tokenizers`` on ``corpus.txt`` there (a
  snapshot of this project's own documentation).  ``python -m helix_async.frontend.tokenizer``
  rebuilds it from that corpus; the tests check that the rebuild equals the shipped file, byte for
  byte.  Its ids 0, 1, 2 are ``<unk>``, ``<s>`` (prepended to every prompt) and ``</s>`` (end of
  text).  It is for the dummy model only: a real model always brings its own.
- a Hugging Face checkpoint directory: ``tokenizer.json`` (as written: ``tokenizers`` loads it),
  ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``add_bos_token``/``add_eos_token``,
  ``chat_template``: a string, or named templates of which the ``default`` one is taken),
  ``chat_template.jinja`` (preferred to the config's template, as transformers saves it), and the
  end-of-sequence ids of ``generation_config.json`` (``eos_token_id``: an int or a list; else
  ``config.json``'s).
- a GGUF file: its tokenizer metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``), read
  from its header by ``helix_async.models.gguf_file``.  A byte-level BPE (``tokenizer.ggml.model
  = gpt2``: Llama 3, Qwen2, SmolLM2, ...) is built here with ``tokenizers`` the way transformers'
  GGUF conversion builds it (docs/api.md §Tokenizers), so the ids are transformers'
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` ids with no transformers on the host; any
  other kind (a sentencepiece ``llama`` vocabulary, ...) goes through transformers' own
  conversion, and needs transformers installed.

The end-of-sequence ids (:attr:`TextTokenizer.eos_ids`) are all the ids a generation stops at:
the tokenizer's EOS token, the generation config's ids and, from GGUF, llama.cpp's end-of-turn and
end-of-message ids.

Chat templates are Jinja templates rendered as transformers renders them (``apply_chat_template``
with ``add_generation_prompt``): a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, the loop controls, its ``tojson`` filter (no ASCII escaping), the
``raise_exception`` and ``strftime_now`` functions, the ``{% generation %}`` block, and the
variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the special tokens
(``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) the tokenizer defines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "TINY_DIR",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "TextTokenizer",
    "build_tiny_tokenizer",
    "load_tokenizer",
]

TINY_DIR = Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "tiny-llama"
TINY_NAMES = ("tiny-llama", "tiny_llama", "tinyllama")

#: the tiny model's chat template (ours): a role line, the text, an end-of-text mark per message
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIALS = ("<unk>", "<s>", "</s>")


class ChatTemplateError(ValueError):
    """The chat template refused these messages (its ``raise_exception``, or a failure while
    rendering them): the request's fault, answered 400 by the API."""


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
    """A tokenizer with what the API needs around it.

    tok: the ``tokenizers.Tokenizer``. source: the file or directory it came from (for errors).
    bos_id: the beginning-of-sequence id (None: none). eos_ids: every id a generation stops at,
    the tokenizer's EOS token first. bos_token, eos_token: their text ("" when undefined).
    chat_template: Jinja text, or None (no chat). specials: the special tokens a chat template
    sees by name (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``; those defined).
    """

    tok: Any  # tokenizers.Tokenizer
    source: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    bos_token: str
    eos_token: str
    chat_template: str | None
    specials: Mapping[str, str] = field(default_factory=dict)

    @property
    def eos_id(self) -> int | None:
        """The tokenizer's own end-of-sequence id (the first of :attr:`eos_ids`), or None."""
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The most UTF-8 bytes of text one token stands for, where that bounds the tokens of a
        text from below (a text of B bytes has at least B / this many): a byte-level BPE with no
        normalizer and no pre-tokenizer that drops text (each token's spelling is its bytes, one
        character per byte; an added token's spelling is its text).  None for any other tokenizer
        (a normalizer or a whitespace splitter may drop text, so no such bound holds)."""
        try:
            cfg = json.loads(self.tok.to_str())
        except Exception:  # (a tokenizer tokenizers cannot write out: no bound)
            return None
        model = cfg.get("model") or {}
        if cfg.get("normalizer") is not None or model.get("type") != "BPE" or model.get("fuse_unk"):
            return None
        if not _keeps_all_text(cfg.get("pre_tokenizer")):
            return None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=0) or None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's ids, with the beginning-of-text id where the tokenizer adds one (and
        ``add_special_tokens``).  Called as a batch of one: ``tokenizers`` releases the GIL while
        it encodes a batch (its ``encode`` of one text holds it), so a long text tokenized in a
        thread leaves the event loop free."""
        return list(self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def decode_long(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """:meth:`decode` as a batch of one, which releases the GIL (for a long text, off the loop)."""
        return str(self.tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0])

    def token_text(self, token: int) -> str:
        """One token's own text, special tokens spelled out (what log-probabilities name)."""
        return str(self.tok.decode([int(token)], skip_special_tokens=False))

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's spelling of each id (``tokenizers``' ``id_to_token``)."""
        return [str(self.tok.id_to_token(int(i))) for i in ids]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The chat as one prompt text (ending where the assistant's reply begins, with
        ``add_generation_prompt``), rendered as transformers' ``apply_chat_template(...,
        tokenize=False)`` renders it.  Raises ConfigError when there is no template and
        ChatTemplateError when the template refuses the messages."""
        if not self.chat_template:
            raise ConfigError(self.source, "chat_template", "this tokenizer has no chat template (use /v1/completions)")
        from jinja2.exceptions import TemplateError

        template = _compiled_template(self.chat_template)
        # transformers drops the keys whose value is None (a null content, say) before rendering
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return str(template.render(messages=msgs, tools=list(tools) if tools else None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **self.specials))
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        except (TypeError, KeyError, AttributeError) as e:  # a template reading a field these messages lack
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """A rendered chat's ids (the template writes the beginning-of-text mark itself, so none
        is added, as transformers tokenizes a rendered chat)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


@lru_cache(maxsize=8)
def _compiled_template(source: str) -> Any:
    from jinja2.exceptions import TemplateError

    try:
        return _template_env().from_string(source)
    except TemplateError as e:
        raise ConfigError("chat_template", "", f"the chat template does not compile: {e}") from None


@lru_cache(maxsize=1)
def _template_env() -> Any:
    """The Jinja environment chat templates are rendered in (see the module doc)."""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.parser import Parser
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for training
        masks; rendering a prompt needs only its body."""

        tags = {"generation"}

        def parse(self, parser: Parser) -> list[nodes.Node]:
            next(parser.stream)
            return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:  # a template's "today's date" (Llama 3.1's system prompt)
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _keeps_all_text(pre: Any) -> bool:
    """Whether a pre-tokenizer's config (``tokenizer.json``'s) is byte-level and splits without
    dropping any of the text: ByteLevel, and Split (not "Removed"), Digits and Punctuation around it."""
    if not isinstance(pre, dict):
        return False
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(parts, list):
        return False
    kinds = [p.get("type") if isinstance(p, dict) else None for p in parts]
    if "ByteLevel" not in kinds:
        return False
    for p, kind in zip(parts, kinds, strict=True):
        if str(p.get("behavior", "")).lower() == "removed":
            return False
        if kind not in ("ByteLevel", "Split", "Digits", "Punctuation"):
            return False
    return True


# ---- loading ---------------------------------------------------------------------------------


def _token_text(v: Any) -> str:
    if isinstance(v, dict):  # {"content": "</s>", ...} in tokenizer_config.json
        return str(v.get("content", ""))
    return "" if v is None else str(v)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), path.name, f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), path.name, "must be a JSON object")
    return data


def _ids(v: Any) -> tuple[int, ...]:
    """An ``eos_token_id`` field: an int, a list of ints, or absent."""
    if isinstance(v, bool):
        return ()
    if isinstance(v, int):
        return (v,)
    if isinstance(v, list):
        return tuple(i for i in v if isinstance(i, int) and not isinstance(i, bool))
    return ()


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return tuple(out)


def _bos_eos_post_processor(tok: Any, bos: str, eos: str, add_bos: bool, add_eos: bool) -> None:
    """Set the post-processor that adds BOS and/or EOS to an encoded text (what transformers'
    ``update_post_processor`` builds from ``add_bos_token`` and ``add_eos_token``)."""
    from tokenizers import processors

    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    add_bos = add_bos and bos_id is not None
    add_eos = add_eos and eos_id is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def load_tokenizer(where: str | Path) -> TextTokenizer:
    """The tokenizer of ``where``: ``tiny-llama`` (the shipped one), a checkpoint directory
    holding ``tokenizer.json``, or a GGUF file.  Raises ConfigError naming the file (one line)
    when there is none or it is broken."""
    from ..extras import require

    require("tokenizers", "serve")
    if str(where) in TINY_NAMES:
        return _from_directory(TINY_DIR)
    path = Path(where)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _is_gguf(path):
            return _from_gguf(path)
        if path.name == "tokenizer.json":
            return _from_directory(path.parent)
        raise ConfigError(str(path), "tokenizer", "neither a GGUF file nor a tokenizer.json")
    return _from_directory(path)


def _from_directory(d: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    path = d / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(str(d), "tokenizer.json", "no tokenizer.json in this directory")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions on bad files
        raise ConfigError(str(path), "tokenizer.json", f"not a tokenizer file: {e}") from None
    cfg_path = d / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    specials = {name: _token_text(cfg.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials = {k: v for k, v in specials.items() if v}
    bos, eos = specials.get("bos_token", ""), specials.get("eos_token", "")
    if "add_bos_token" in cfg or "add_eos_token" in cfg or tok.post_processor is None:
        _bos_eos_post_processor(tok, bos, eos, bool(cfg.get("add_bos_token")), bool(cfg.get("add_eos_token")))
    template: Any = None
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    else:
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
    gen_path, config_path = d / "generation_config.json", d / "config.json"
    model_eos: tuple[int, ...] = ()
    if gen_path.is_file():
        model_eos = _ids(_read_json(gen_path).get("eos_token_id"))
    elif config_path.is_file():
        model_eos = _ids(_read_json(config_path).get("eos_token_id"))
    return TextTokenizer(
        tok=tok,
        source=str(d),
        bos_id=tok.token_to_id(bos) if bos else None,
        eos_ids=_unique([tok.token_to_id(eos) if eos else None, *model_eos]),
        bos_token=bos,
        eos_token=eos,
        chat_template=template if isinstance(template, str) and template else None,
        specials=specials,
    )


# ---- GGUF -----------------------------------------------------------------------------------

def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file, arrays decoded (the header only is read:
    ``helix_async.models.gguf_file``, which names the file and the part that is broken)."""
    from ..models.gguf_file import GGUFArray, read_gguf

    g = read_gguf(path)
    return {k: g.array(k) if isinstance(v, GGUFArray) else v for k, v in g.metadata.items()
            if k.startswith("tokenizer.")}


@lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte-to-character table: printable bytes stand for themselves, the others for the
    characters from U+0100 on, in byte order (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# the pre-tokenizer split of each ``tokenizer.ggml.pre`` that has its own (transformers'
# GGUF_PRE_TOKENIZER_SPLITS); any other byte-level vocabulary splits as GPT-2 does
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

#: GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def _from_gguf(path: Path) -> TextTokenizer:
    meta = _gguf_tokenizer_metadata(path)
    src = str(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ConfigError(src, "tokenizer.ggml.model", "this GGUF file has no tokenizer metadata")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]

    def special(key: str) -> str:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    if kind == "gpt2":
        tok = _byte_level_bpe(meta, src)
        # transformers' GGUF reading: a gpt2 vocabulary adds no BOS unless the file says so
        _bos_eos_post_processor(tok, special("bos_token_id"), special("eos_token_id"),
                                bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                                bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    else:
        tok = _via_transformers(path, str(kind))
    specials = {"bos_token": special("bos_token_id"), "eos_token": special("eos_token_id"),
                "unk_token": special("unknown_token_id"), "pad_token": special("padding_token_id")}
    specials = {k: v for k, v in specials.items() if v}
    end_ids = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    template = meta.get("tokenizer.chat_template")
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    return TextTokenizer(
        tok=tok,
        source=src,
        bos_id=bos_id if isinstance(bos_id, int) else None,
        eos_ids=_unique(i for i in end_ids if isinstance(i, int) and 0 <= i < len(tokens)),
        bos_token=specials.get("bos_token", ""),
        eos_token=specials.get("eos_token", ""),
        chat_template=template if isinstance(template, str) and template else None,
        specials=specials,
    )


def _byte_level_bpe(meta: dict[str, Any], src: str) -> Any:
    """A GGUF byte-level BPE vocabulary as a ``tokenizers.Tokenizer``: GPT-2's byte-level
    pre-tokenizer and decoder (with the split regex of ``tokenizer.ggml.pre`` where it has its
    own), the file's merges, its control tokens as special tokens and its user-defined tokens as
    added tokens (docs/api.md §Tokenizers)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges_text = meta.get("tokenizer.ggml.merges")
    if not merges_text:
        raise ConfigError(src, "tokenizer.ggml.merges", "a byte-level (gpt2) vocabulary needs its merges")
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    # a token the file writes in plain text (not in the byte alphabet) is respelled byte by byte
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = []
    for m in merges_text:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ConfigError(src, "tokenizer.ggml.merges", f"a merge must be two tokens apart by a space, got {m!r}")
        merges.append((a, b))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    except Exception as e:  # tokenizers: a merge naming a token not in the vocabulary
        raise ConfigError(src, "tokenizer.ggml.merges", f"does not fit the vocabulary: {e}") from None
    split = GGUF_PRE_SPLITS.get(str(meta.get("tokenizer.ggml.pre", "")))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    # a control token outside the byte alphabet is a mislabel (llama.cpp's): adding it would
    # grow the vocabulary past the model's, so it stays as the merges make it
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    known = tok.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED and t in known]
    if user:
        tok.add_tokens(user)
    return tok


def _via_transformers(path: Path, kind: str) -> Any:
    """A non-byte-level GGUF vocabulary (sentencepiece ``llama``, ``t5``, Gemma's): transformers'
    own GGUF conversion builds it (it is the reference; its rules are per vocabulary kind)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(str(path), "tokenizer.ggml.model", f"a {kind!r} vocabulary is built by transformers' GGUF "
                          "conversion: pip install transformers") from None
    try:
        tk = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(str(path), "tokenizer.ggml.model", f"transformers cannot build this {kind!r} tokenizer: "
                          f"{e}") from None
    return tk.backend_tokenizer


class IncrementalDetokenizer:
    """Text as tokens arrive: each :meth:`add` returns the new text that is final (a byte-level
    token may end inside a UTF-8 character; such text waits for the next token).

    Per token it decodes a window of a few recent tokens, never the whole output (vLLM's prefix
    and read offsets: the text of ``ids[prefix:]`` past that of ``ids[prefix:read]`` is new).  A
    window whose text stays incomplete (ends in U+FFFD) or empty (special tokens, skipped) for
    :attr:`MAX_PENDING` tokens is taken as it is: a UTF-8 character spans at most 4 bytes, so by
    then the bytes are broken, not waiting; the window never grows past that.  :attr:`text` is the
    whole text so far (joined when read).
    """

    #: tokens past the emitted ones a window holds at most before its text is taken as it is
    MAX_PENDING = 8

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._t = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are emitted and stable
        self._read = 0  # tokens whose text has been emitted
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """The text emitted so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        dec = self._t.decode
        prefix_text = dec(self.ids[self._prefix : self._read])
        full = dec(self.ids[self._prefix :])
        waiting = full.endswith("\ufffd") or len(full) <= len(prefix_text)
        if waiting and len(self.ids) - self._read < self.MAX_PENDING:
            return ""  # an incomplete character (or a special token): wait
        new = full[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self.ids)
        if new:
            self._parts.append(new)
        return new

    def flush(self) -> str:
        """What is left at the end (an incomplete character decodes as U+FFFD)."""
        full = self._t.decode(self.ids[self._prefix :])
        prefix_text = self._t.decode(self.ids[self._prefix : self._read])
        self._prefix = self._read = len(self.ids)
        new = full[len(prefix_text) :]
        if new:
            self._parts.append(new)
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

    from ..fileio import atomic_write_text

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
        atomic_write_text(out / "corpus.txt", text, "corpus")
        corpus_path = out / "corpus.txt"
    tok = build_tiny_tokenizer(corpus_path.read_text())
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True), "tokenizer")
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TINY_CHAT_TEMPLATE,
           "model_max_length": 2048, "source": "helix_async.frontend.tokenizer (byte-level BPE on corpus.txt)"}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n", "tokenizer config")
    print(f"wrote {out / 'tokenizer.json'} ({tok.get_vocab_size()} ids) and tokenizer_config.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
