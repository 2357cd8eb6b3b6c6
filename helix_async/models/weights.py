"""One pipeline stage's weights from a checkpoint: only its layers' tensors (torch).

:func:`read_stage` returns the tensors :func:`~helix_async.models.layout.stage_tensor_shapes` names
for layers ``[start, end)`` (the embedding table on the first stage, the final norm and the LM
head on the last), under Hugging Face's names and in Hugging Face's layout, whatever the format:

* a Hugging Face directory (:mod:`.hf_dir`): each tensor's bytes read from its safetensors file
  at the offsets its header gives (only the shards holding the stage's tensors are opened);
  float32, float16 or bfloat16;
* a GGUF file (:mod:`.gguf_file`): memory-mapped, each tensor de-quantised with
  ``gguf.quants.dequantize`` to float32, and for ``general.architecture = llama`` the rows of the
  query and key projections put back in Hugging Face's order (llama.cpp's converter interleaves
  the two rotary halves of every head; docs/models.md §The q/k permutation).

Each tensor is converted to the compute dtype as it is read, so a worker never holds more than its
stage plus one tensor in flight. Torch is imported here only; :mod:`.sources` stays torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .arch import ArchConfig
from .gguf_file import GGUFFile, GGUFTensor, gguf_arch, read_gguf
from .hf_dir import HFCheckpoint, STensor, read_hf_dir
from .layout import gguf_name, stage_tensor_shapes

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointFiles", "open_checkpoint", "read_stage", "release_freed_memory", "unpermute_rows"]

_TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")


class CheckpointFiles:
    """A checkpoint opened for reading: ``path`` (absolute), ``format`` (``hf-safetensors`` or
    ``gguf``), ``arch`` and ``dtype`` (the stored dtype; float32 for a GGUF, whose tensors are
    de-quantised to it)."""

    def __init__(self, path: str, fmt: str, arch: ArchConfig, dtype: str, source: HFCheckpoint | GGUFFile) -> None:
        self.path = path
        self.format = fmt
        self.arch = arch
        self.dtype = dtype
        self._source = source

    def read(self, start: int, end: int, dtype: str | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of the stage holding layers ``[start, end)`` (see the module doc), each in
        ``dtype`` (default: the stored one) on ``device``. ConfigError naming the file and tensor
        when one cannot be read."""
        import torch

        dt = dtype or self.dtype
        if dt not in _TORCH_DTYPES:
            raise ConfigError("<argument>", "--dtype", f"{dt!r} is not one of {', '.join(_TORCH_DTYPES)}")
        tdt = getattr(torch, dt)
        try:
            shapes = stage_tensor_shapes(self.arch, start, end)
        except ValueError as e:
            raise ConfigError(self.path, "layers", str(e)) from None
        if isinstance(self._source, HFCheckpoint):
            return _read_safetensors(self._source, shapes, tdt, device)
        return _read_gguf(self._source, self.arch, shapes, tdt, device)


def open_checkpoint(path: str | Path, where: str = "--checkpoint") -> CheckpointFiles:
    """Open the checkpoint at ``path``: a Hugging Face directory or a ``.gguf`` file (headers only
    are read; ConfigError naming the file for a bad one)."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        ck = read_hf_dir(p, where)
        return CheckpointFiles(str(p), "hf-safetensors", ck.arch, ck.dtype, ck)
    if p.is_file():
        g = read_gguf(p)
        return CheckpointFiles(str(p), "gguf", gguf_arch(g, p.stem), "float32", g)
    raise ConfigError(str(p), where, "no such checkpoint (a directory with config.json, or a .gguf file)")


def read_stage(path: str | Path, start: int, end: int, dtype: str | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``open_checkpoint(path).read(start, end, dtype, device)``."""
    return open_checkpoint(path).read(start, end, dtype, device)


# ---- safetensors ---------------------------------------------------------------------------------


def _read_safetensors(ck: HFCheckpoint, shapes: dict[str, tuple[int, ...]], dtype: Any, device: str) -> dict[str, torch.Tensor]:
    import torch

    by_file: dict[str, list[tuple[str, STensor]]] = {}
    for name in shapes:
        t = ck.tensors[name]
        by_file.setdefault(t.file, []).append((name, t))
    out: dict[str, torch.Tensor] = {}
    for fname, items in by_file.items():
        try:
            fh = open(fname, "rb")
        except OSError as e:
            raise ConfigError(fname, "", f"unreadable: {e.strerror or e}") from None
        with fh:
            for name, t in sorted(items, key=lambda it: it[1].begin):
                buf = bytearray(t.end - t.begin)
                fh.seek(t.begin)
                if fh.readinto(buf) != len(buf):
                    raise ConfigError(fname, f"tensor {name}", "truncated: the file ended while reading it")
                x = torch.frombuffer(buf, dtype=getattr(torch, {"F32": "float32", "F16": "float16",
                                                                "BF16": "bfloat16"}[t.dtype]))
                out[name] = x.reshape(t.shape).to(dtype=dtype, device=device)
    return out


# ---- GGUF ----------------------------------------------------------------------------------------


def unpermute_rows(w: Any, heads: int) -> Any:
    """Undo llama.cpp's interleaving of a q or k projection's rows (or bias): per head, GGUF row
    ``2i + j`` holds Hugging Face row ``j * head_dim / 2 + i`` (j = 0, 1: the two rotary halves).
    ``w``: (heads x head_dim, ...) as a numpy array or a torch tensor; ``heads``: the query heads for
    q, the key-value heads for k."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


#: rows de-quantised at a time: bounds the float32 temporaries to a few MB whatever the tensor
_CHUNK_BYTES = 4 << 20


def _dequantize(t: GGUFTensor, mm: Any, dtype: Any) -> torch.Tensor:
    """Tensor ``t`` of the memory map ``mm`` as a ``dtype`` tensor of its shape, de-quantised a
    chunk of rows at a time into the result (so a worker's peak memory stays near what it keeps)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from .gguf_file import SUPPORTED_TYPES

    qtype = GGMLQuantizationType[t.type_name]
    block, size = SUPPORTED_TYPES[t.type_name]
    cols = t.shape[-1]
    row_bytes = cols // block * size
    rows = mm[t.offset : t.offset + t.nbytes].reshape(-1, row_bytes)
    out = torch.empty((rows.shape[0], cols), dtype=dtype)
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for r in range(0, rows.shape[0], step):
        chunk = rows[r : r + step]
        if t.type_name == "F32":
            part = np.array(chunk.view(np.float32))  # a copy: the map is read-only
        elif t.type_name == "F16":
            part = chunk.view(np.float16).astype(np.float32)
        else:
            part = dequantize(chunk, qtype)
            if not part.flags.writeable:
                part = np.array(part)
        out[r : r + step] = torch.from_numpy(part.reshape(-1, cols))
    return out.reshape(t.shape)


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc keeps the freed temporaries of
    de-quantisation otherwise, and a worker's resident memory would overstate what it holds)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)


def _read_gguf(g: GGUFFile, arch: ArchConfig, shapes: dict[str, tuple[int, ...]], dtype: Any, device: str) -> dict[str, torch.Tensor]:
    import numpy as np

    permute = g.get("general.architecture") == "llama"
    mm = np.memmap(g.path, dtype=np.uint8, mode="r")
    out: dict[str, torch.Tensor] = {}
    try:
        for name, shape in shapes.items():
            gname = gguf_name(name)
            t = g.tensors[gname]
            try:
                x = _dequantize(t, mm, dtype)
            except (ValueError, NotImplementedError) as e:
                raise ConfigError(g.path, f"tensor {gname}", f"cannot be de-quantised ({t.type_name}): {e}") from None
            if permute and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                heads = arch.num_heads if ".q_proj." in name else arch.num_kv_heads
                x = unpermute_rows(x, heads).contiguous()
            if tuple(x.shape) != shape:
                raise ConfigError(g.path, f"tensor {gname}", f"shape {tuple(x.shape)}, expected {shape}")
            out[name] = x.to(device=device)
            del x
    finally:
        del mm
        release_freed_memory()
    return out
