"""A GGUF file's header: its metadata, its tensors' names, shapes, types and places (torch-free).

GGUF (the llama.cpp project's single-file format, ``docs/models.md`` §GGUF) is: the magic
``GGUF``, a version (2 or 3), the tensor and key-value counts, the key-value pairs (typed
scalars, strings and arrays), one info record per tensor (name, dimensions innermost first, GGML
type, offset) and, aligned to ``general.alignment`` (32 by default) after them, the tensor data.

This module parses the header straight from a memory map with :mod:`struct`, bounds-checking every
read, so a truncated or corrupt file is one :class:`~helix_async.errors.ConfigError` naming what
broke; it needs neither torch nor the ``gguf`` package. (``gguf.GGUFReader`` builds one numpy
array per array element: seconds for a tokenizer's 100k strings, which planning does not need.
Large arrays are kept here as :class:`GGUFArray` places and decoded on request.) The tensor data
is read by ``helix_async.models.weights`` (de-quantised with ``gguf.quants``).

:func:`gguf_arch` turns the metadata into an :class:`~helix_async.models.arch.ArchConfig`.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .arch import ArchConfig
from .layout import gguf_name, stage_tensor_shapes

__all__ = [
    "GGML_TYPE_NAMES",
    "GGUFArray",
    "GGUFFile",
    "GGUFTensor",
    "SUPPORTED_TYPES",
    "gguf_arch",
    "read_gguf",
]

GGUF_MAGIC = b"GGUF"

#: GGML tensor type id -> name (ggml.h's ``enum ggml_type``; ids 4 and 5 are retired)
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}

#: the types this runtime de-quantises: name -> (elements per block, bytes per block)
#: (ggml's block layouts: 32-element blocks with an fp16 scale, and min for the _1 kinds; the
#: K-quants' 256-element super-blocks; docs/models.md §Quantisation types)
SUPPORTED_TYPES = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}

# metadata value types (the GGUF spec's gguf_metadata_value_type): id -> struct format
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
#: arrays longer than this are kept as places (GGUFArray), not decoded while parsing
_EAGER_ARRAY = 256


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array left in the file: ``count`` elements of value type ``elem_type`` starting at
    byte ``offset``. :meth:`GGUFFile.array` decodes it."""

    elem_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's info record.

    name: GGUF's name (``blk.0.attn_q.weight``). shape: numpy order, outermost first (the reverse of
    GGUF's dimensions), e.g. (out features, in features). type_id, type_name: its GGML type.
    offset: absolute byte offset of its data in the file. nbytes: its data's size (0 for a type
    this runtime does not read).
    """

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int
    nbytes: int

    @property
    def supported(self) -> bool:
        return self.type_name in SUPPORTED_TYPES


class _Cursor:
    """Bounds-checked little-endian reads from a buffer (ConfigError naming the file past its end)."""

    __slots__ = ("buf", "pos", "size", "path", "what")

    def __init__(self, buf: Any, size: int, path: str) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, size, path
        self.what = "header"

    def fail(self, message: str) -> ConfigError:
        return ConfigError(self.path, self.what, message)

    def take(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        if self.pos + n > self.size:
            raise self.fail(f"truncated: needs byte {self.pos + n} of a {self.size}-byte file")
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise self.fail(f"truncated: a {n}-byte string past the end of the {self.size}-byte file")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("corrupt: a string that is not UTF-8") from None

    def value(self, vtype: int, eager: bool = True) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            start = self.pos
            if etype in _SCALARS:
                width = struct.calcsize("<" + _SCALARS[etype])
                if count * width > self.size - self.pos:
                    raise self.fail(f"truncated: an array of {count} values past the end of the file")
                if eager and count <= _EAGER_ARRAY:
                    vals = list(struct.unpack_from(f"<{count}{_SCALARS[etype]}", self.buf, self.pos))
                    self.pos += count * width
                    return vals
                self.pos += count * width
                return GGUFArray(etype, count, start)
            if etype == _STRING:
                if eager and count <= _EAGER_ARRAY:
                    return [self.string() for _ in range(count)]
                if count > self.size:
                    raise self.fail(f"corrupt: an array of {count} strings in a {self.size}-byte file")
                # skipped in a tight loop: a tokenizer's vocabulary and merges are 100k strings
                unpack, buf, pos, size = _U64.unpack_from, self.buf, self.pos, self.size
                for _ in range(count):
                    if pos + 8 > size:
                        raise self.fail(f"truncated: an array of {count} strings past the end of the file")
                    pos += 8 + unpack(buf, pos)[0]
                if pos > size:
                    raise self.fail(f"truncated: an array of {count} strings past the end of the file")
                self.pos = pos
                return GGUFArray(etype, count, start)
            if etype == _ARRAY:
                if count > self.size:
                    raise self.fail(f"corrupt: an array of {count} arrays in a {self.size}-byte file")
                for _ in range(count):
                    self.value(_ARRAY, eager=False)
                return GGUFArray(etype, count, start)
            raise self.fail(f"corrupt: array element type {etype} is not a GGUF value type")
        raise self.fail(f"corrupt: value type {vtype} is not a GGUF value type")


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header (see the module doc).

    path: the file (absolute). version: 2 or 3. size: the file's bytes. metadata: key -> value
    (ints, floats, bools, strings, short lists; long arrays as :class:`GGUFArray`). tensors: name ->
    :class:`GGUFTensor`, in file order. data_offset: where the tensor data starts. alignment: bytes.
    """

    path: str
    version: int
    size: int
    metadata: Mapping[str, Any]
    tensors: Mapping[str, GGUFTensor]
    data_offset: int
    alignment: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def count(self, key: str) -> int | None:
        """The number of elements of the array ``key`` (None when absent or not an array)."""
        v = self.metadata.get(key)
        if isinstance(v, GGUFArray):
            return v.count
        return len(v) if isinstance(v, list) else None

    def array(self, key: str) -> list[Any]:
        """The array ``key`` decoded (strings as str). KeyError when absent."""
        v = self.metadata[key]
        if isinstance(v, list):
            return v
        if not isinstance(v, GGUFArray):
            raise KeyError(f"{key} is not an array")
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cur = _Cursor(mm, len(mm), self.path)
            cur.what = key
            cur.pos = v.offset
            return [cur.value(v.elem_type) for _ in range(v.count)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file ``path``; every tensor's data must lie within the file.

    Raises ConfigError naming the file and the part that is truncated or corrupt (``header``, a
    metadata key, ``tensor NAME``).
    """
    p = Path(path).resolve()
    where = str(p)
    try:
        fh = open(p, "rb")
    except OSError as e:
        raise ConfigError(where, "", f"unreadable: {e.strerror or e}") from None
    with fh:
        size = p.stat().st_size
        if size < 24:
            raise ConfigError(where, "header", f"truncated: {size} bytes, not a GGUF file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, size, where)


def _parse(buf: Any, size: int, where: str) -> GGUFFile:
    cur = _Cursor(buf, size, where)
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            raise cur.fail("a big-endian GGUF file is not supported")
        raise cur.fail(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    # each key-value pair and tensor record takes at least 12 bytes: more is a corrupt count
    if n_tensors > size // 12 or n_kv > size // 12:
        raise cur.fail(f"corrupt: {n_tensors} tensors and {n_kv} metadata keys in a {size}-byte file")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        cur.what = "header"
        key = cur.string()
        cur.what = key
        meta[key] = cur.value(cur.take("I"))
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        cur.what = f"tensor info #{i}"
        name = cur.string()
        cur.what = f"tensor {name}"
        ndim = cur.take("I")
        if not 1 <= ndim <= 4:
            raise cur.fail(f"corrupt: {ndim} dimensions")
        dims = tuple(cur.take("Q") for _ in range(ndim))
        type_id, offset = cur.take("I"), cur.take("Q")
        infos.append((name, tuple(reversed(dims)), type_id, offset))
    cur.what = "general.alignment"
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise cur.fail(f"must be a power of two, got {align!r}")
    data_offset = -(-cur.pos // align) * align
    tensors: dict[str, GGUFTensor] = {}
    for name, shape, type_id, offset in infos:
        tname = GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
        n = 1
        for d in shape:
            n *= d
        nbytes = 0
        if tname in SUPPORTED_TYPES:
            block, bsize = SUPPORTED_TYPES[tname]
            if shape[-1] % block:
                raise ConfigError(where, f"tensor {name}", f"corrupt: rows of {shape[-1]} elements are not whole "
                                  f"{tname} blocks of {block}")
            nbytes = n // block * bsize
        start = data_offset + offset
        if start + nbytes > size:
            raise ConfigError(where, f"tensor {name}", f"truncated: its data ends at byte {start + nbytes}, the file "
                              f"has {size}")
        if name in tensors:
            raise ConfigError(where, f"tensor {name}", "corrupt: named twice")
        tensors[name] = GGUFTensor(name, shape, type_id, tname, start, nbytes)
    return GGUFFile(where, version, size, meta, tensors, data_offset, align)


# ---- metadata -> ArchConfig ----------------------------------------------------------------------

#: general.architecture -> family (llama.cpp writes Mistral's dense models as ``llama``)
GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2"}


def gguf_arch(g: GGUFFile, name: str = "") -> ArchConfig:
    """The architecture of the model in ``g`` (the keys read are listed in docs/models.md §GGUF),
    checked against its tensors: every tensor of every layer present, of the shape the metadata
    implies, of a type this runtime de-quantises. ConfigError naming the key or tensor otherwise."""
    where = g.path
    arch_name = g.get("general.architecture")
    if arch_name not in GGUF_FAMILIES:
        raise ConfigError(where, "general.architecture",
                          f"{arch_name!r} is not supported (supported: {', '.join(sorted(GGUF_FAMILIES))})")
    family = GGUF_FAMILIES[arch_name]
    p = f"{arch_name}."

    def positive(key: str, default: int | None = None) -> int:
        v = g.get(p + key, default)
        if v is None:
            raise ConfigError(where, p + key, "missing (a required field of the model's shape)")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(where, p + key, f"must be a positive integer, got {v!r}")
        return v

    def number(key: str, default: float) -> float:
        v = g.get(p + key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(where, p + key, f"must be a positive number, got {v!r}")
        return float(v)

    layers = positive("block_count")
    hidden = positive("embedding_length")
    inter = positive("feed_forward_length")
    heads = positive("attention.head_count")
    kv_heads = positive("attention.head_count_kv", heads)
    head_dim = positive("attention.key_length", hidden // heads if hidden % heads == 0 else None)
    if positive("attention.value_length", head_dim) != head_dim:
        raise ConfigError(where, p + "attention.value_length", f"differs from attention.key_length {head_dim}")
    if positive("rope.dimension_count", head_dim) != head_dim:
        raise ConfigError(where, p + "rope.dimension_count",
                          f"{g.get(p + 'rope.dimension_count')} (partial rotary) is not supported: RoPE must span "
                          f"the head ({head_dim})")
    scaling = g.get(p + "rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConfigError(where, p + "rope.scaling.type", f"{scaling!r} is not supported (none)")
    if "rope_freqs.weight" in g.tensors:
        raise ConfigError(where, "tensor rope_freqs.weight",
                          "RoPE frequency factors (Llama 3.1's scaling as llama.cpp stores it) are not supported; "
                          "serve the Hugging Face checkpoint instead")
    vocab = g.get(p + "vocab_size") or g.count("tokenizer.ggml.tokens")
    embd = g.tensors.get("token_embd.weight")
    if not vocab and embd is not None:
        vocab = embd.shape[0]
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise ConfigError(where, p + "vocab_size", "missing (and no tokenizer.ggml.tokens to count)")
    tensors = g.tensors
    qkv_bias = family == "qwen2" or "blk.0.attn_q.bias" in tensors
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = g.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
            ids.append(v)
    bos = g.get("tokenizer.ggml.bos_token_id")
    try:
        arch = ArchConfig(
            family=family, num_layers=layers, hidden_size=hidden, intermediate_size=inter, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6 if family == "qwen2" else 1e-5),
            rope_theta=number("rope.freq_base", 10000.0), rope_scaling=None, qkv_bias=qkv_bias,
            o_bias="blk.0.attn_output.bias" in tensors, mlp_bias="blk.0.ffn_gate.bias" in tensors,
            tie_word_embeddings="output.weight" not in tensors, max_position=positive("context_length", 2048),
            bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
            eos_token_ids=tuple(ids), dtype="float32", name=name or str(g.get("general.name") or ""),
        )
    except ValueError as e:
        raise ConfigError(where, "shape", str(e)) from None
    check_gguf_tensors(g, arch)
    return arch


def check_gguf_tensors(g: GGUFFile, arch: ArchConfig) -> None:
    """Every tensor of the whole model is in ``g``, of its shape and of a supported type."""
    for hf, shape in stage_tensor_shapes(arch, 0, arch.num_layers).items():
        name = gguf_name(hf)
        t = g.tensors.get(name)
        if t is None:
            raise ConfigError(g.path, f"tensor {name}", "missing")
        if not t.supported:
            raise ConfigError(g.path, f"tensor {name}", f"type {t.type_name} is not supported (supported: "
                              f"{', '.join(SUPPORTED_TYPES)})")
        if t.shape != shape:
            raise ConfigError(g.path, f"tensor {name}", f"shape {t.shape}, the metadata implies {shape}")
