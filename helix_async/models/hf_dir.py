"""A Hugging Face checkpoint directory: ``config.json`` and safetensors weights (torch-free).

The weights are one ``model.safetensors``, or shards named by ``model.safetensors.index.json``'s
``weight_map`` (tensor name -> file), or, with neither, every ``*.safetensors`` file of the
directory. A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor:
``dtype``, ``shape``, ``data_offsets`` relative to the end of the header) and the data
(docs/models.md §safetensors). Only headers are read here, each checked against the file's size,
so a truncated or corrupt file is one :class:`~helix_async.errors.ConfigError` before any worker
starts; the data is read by ``helix_async.models.weights``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .arch import ArchConfig
from .layout import EMBED, LM_HEAD, stage_tensor_shapes

__all__ = ["SAFETENSORS_DTYPES", "HFCheckpoint", "STensor", "read_hf_dir", "read_safetensors_header"]

#: safetensors dtype -> (the dtype's name as config.json writes it, bytes per element)
SAFETENSORS_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: a header larger than this is corrupt (safetensors itself caps it at 100 MB)
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class STensor:
    """One tensor of a safetensors file: its ``file`` (absolute), ``dtype`` (safetensors' name),
    ``shape`` and the absolute byte range ``[begin, end)`` of its data."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint directory read and checked: its ``arch``, its ``dtype`` (the stored tensors'),
    and every tensor's place (``tensors``: name -> :class:`STensor`)."""

    path: str
    config: Mapping[str, object]
    arch: ArchConfig
    dtype: str
    tensors: Mapping[str, STensor]


def read_safetensors_header(path: Path) -> dict[str, STensor]:
    """The tensors of the safetensors file ``path``, each checked to lie within the file.
    ConfigError naming the file (and the tensor) when it is truncated or corrupt."""
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ConfigError(where, "header", f"truncated: {size} bytes, not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise ConfigError(where, "header", f"corrupt or truncated: a {n}-byte header in a {size}-byte file")
            raw = fh.read(n)
    except OSError as e:
        raise ConfigError(where, "", f"unreadable: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(where, "header", "corrupt: not JSON") from None
    if not isinstance(header, dict):
        raise ConfigError(where, "header", "corrupt: not a JSON object")
    base = 8 + n
    out: dict[str, STensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(where, f"tensor {name}", "corrupt: needs dtype, shape and data_offsets") from None
        if base + end > size:
            raise ConfigError(where, f"tensor {name}", f"truncated: its data ends at byte {base + end}, the file has "
                              f"{size}")
        if dtype in SAFETENSORS_DTYPES:
            count = 1
            for d in shape:
                count *= d
            if not 0 <= begin <= end or end - begin != count * SAFETENSORS_DTYPES[dtype][1]:
                raise ConfigError(where, f"tensor {name}", f"corrupt: {end - begin} bytes for {dtype} {shape}")
        out[name] = STensor(where, dtype, shape, base + begin, base + end)
    return out


def _files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of ``root`` and the index's weight map (None without an index)."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            doc = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(str(index), "", f"unreadable: {e}") from None
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise ConfigError(str(index), "weight_map", "missing or not an object of tensor name -> file name")
        files = []
        for fname in dict.fromkeys(wmap.values()):
            f = root / fname
            if not f.is_file():
                raise ConfigError(str(index), "weight_map", f"names {fname}, which is not in {root}")
            files.append(f)
        return files, wmap
    single = root / SINGLE_FILE
    if single.is_file():
        return [single], None
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConfigError(str(root), "", "no *.safetensors file in this directory")
    return files, None


def read_hf_dir(path: str | Path, where: str = "--model") -> HFCheckpoint:
    """Read and check the checkpoint directory ``path`` (``where``: the flag it came from): its
    config, and the headers of its weights against the shapes the config implies. ConfigError
    naming the file and field or tensor for anything wrong."""
    root = Path(path).resolve()
    cfg_path = root / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(root), where, "a checkpoint directory must hold config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(str(cfg_path), "config.json", f"unreadable: {e}") from None
    arch = ArchConfig.from_hf(raw, str(cfg_path), name=root.name)
    files, wmap = _files(root)
    tensors: dict[str, STensor] = {}
    for f in files:
        tensors.update(read_safetensors_header(f))
    if wmap is not None:
        for name, fname in wmap.items():
            t = tensors.get(name)
            if t is None or Path(t.file).name != fname:
                raise ConfigError(str(root / INDEX_FILE), "weight_map", f"puts {name} in {fname}, which does not "
                                  "hold it")
    for name, shape in stage_tensor_shapes(arch, 0, arch.num_layers).items():
        t = tensors.get(name)
        if t is None:
            raise ConfigError(str(root), f"tensor {name}", "missing from the safetensors files")
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ConfigError(t.file, f"tensor {name}", f"dtype {t.dtype} is not supported (supported: "
                              f"{', '.join(SAFETENSORS_DTYPES)})")
        if t.shape != shape:
            raise ConfigError(t.file, f"tensor {name}", f"shape {t.shape}, config.json implies {shape}")
    head = tensors.get(LM_HEAD)
    if arch.tie_word_embeddings and head is not None and head.shape != tensors[EMBED].shape:
        raise ConfigError(head.file, f"tensor {LM_HEAD}", f"shape {head.shape}, config.json implies "
                          f"{tensors[EMBED].shape}")
    dtype = SAFETENSORS_DTYPES[tensors["model.layers.0.self_attn.q_proj.weight"].dtype][0]
    return HFCheckpoint(str(root), raw, arch, dtype, tensors)
