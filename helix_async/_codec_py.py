"""Pure-Python message codec: the specification (``ext/_codec.pyx`` is its compiled twin).

Wire format of one message, a list of frames (bytes-like objects):

* frame 0: one byte, the ``MsgType`` value;
* frame 1: ``msgpack.packb([field values in FIELDS order], use_bin_type=True)`` — an array, not a
  map. Ints use msgpack's smallest encoding, floats are float64, tuples are arrays, strings str;
* frames 2..: for messages with a ``tensors`` field, one raw frame per tensor (its C-contiguous
  little-endian buffer, no header, never copied); the payload's ``tensors`` field holds one
  descriptor ``[dtype name, [dim, ...]]`` per tensor, in frame order.

Field layouts (ints are checked against the ranges below, I32 = 2**31 - 1, I64 = 2**63 - 1):

======================  ==================================================================
register                [node_id -1..I32, name, machine_type, address, num_gpus 0..I32,
                        gpu_memory_bytes 0..I64, capabilities [str...]]
assign_layers           [node_id, model, start, end, plan_id 0..I64,
                        next_hops [[node, address, start, end]...], prev_nodes [node...]]
prompt_work             [request_id, query_id, route [[node, start, end]...], stage,
                        num_tokens 1..I32, token_ids [0..I32...], max_tokens 1..I32,
                        sent_at float, tensors [[dtype, shape]...]]
decode_work             [request_id, route, stage, context_len 1..I32, token_id -1..I32,
                        sent_at, tensors]
activations             [request_id, stage, num_tokens 0..I32, sent_at, tensors (>= 1)]
token_result            [request_id, token_id 0..I32, context_len 1..I32, finished bool,
                        sent_at]
heartbeat               [node_id, seq 0..I64, now float]
cancel                  [request_id, reason]
error                   [request_id -1..I64, code 0..I32, text]
shutdown                [reason]
======================  ==================================================================

Unless given above: request/query ids are 0..I64; node ids, layer indices and stage indices
0..I32; floats finite; strings valid UTF-8. A route has 1..``Limits.max_route_stages`` stages,
each with start < end, stage i starting where stage i-1 ends, and ``stage < len(route)``
(the router's routes without their sink stage: ``messages.wire_route``/``router_route``).
Cross-field rules: prompt_work carries token ids (exactly ``num_tokens`` of them) xor tensors;
decode_work carries a token id >= 0 xor tensors (token_id -1); assign_layers has start < end.

Encoding validates the same rules (a message that encodes always decodes to an equal one).
Decoding validates everything (frame count, tag, sizes, msgpack well-formedness and trailing
bytes, arity, types — bool is not an int, tuple not list on encode —, ranges, tensors) and
raises ``CodecError`` and nothing else, naming the message type and the field or frame.

Tensors: supported dtypes are in ``DTYPES`` (bfloat16 is not: numpy has no such dtype; view such
a torch tensor as int16 first). Encoding needs C-contiguous tensors and raises otherwise (the
codec never copies: call ``np.ascontiguousarray``/``.contiguous()`` yourself). A tensor's *span*,
its itemsize times the product of its nonzero dimensions, is at most ``max_frame_bytes`` (for a
non-empty tensor that is its size; an empty one may not declare huge dimensions either: numpy
could not even represent some of them). Decoded tensors
are numpy arrays over the received frames' own buffers: read-only for ``bytes`` frames, writable for
``bytearray``/writable buffers, and they keep the frame alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import HelixError
from .messages import (
    MESSAGE_TYPES,
    Activations,
    AssignLayers,
    Cancel,
    DecodeWork,
    Error,
    Heartbeat,
    Message,
    MsgType,
    PromptWork,
    Register,
    Shutdown,
    TokenResult,
    as_ndarray,
)

I32_MAX = 2**31 - 1
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

#: Wire name -> numpy dtype (little-endian) of every tensor dtype the codec carries.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
    )
}

_NAME_BY_DTYPE: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}

#: The one-byte tag frame of each message type (shared immutable bytes objects).
TAG_FRAMES: dict[int, bytes] = {int(t): bytes([t]) for t in MsgType}


class CodecError(HelixError, ValueError):
    """A message failed to encode or decode.

    ``msg_type``: snake-case message name ("decode_work"), or "?" before the tag is known;
    ``where``: the field ("route[2].end", "tensors[0]") or frame ("frame 0 (tag)", "frames");
    ``problem``: what was wrong. ``str()`` gives "msg_type: where: problem".
    """

    def __init__(self, msg_type: str, where: str, problem: str) -> None:
        super().__init__(msg_type, where, problem)
        self.msg_type = msg_type
        self.where = where
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.msg_type}: {self.where}: {self.problem}"

    @property
    def key(self) -> str:
        """Coarse reason for counting drops: message type and top-level field or frame
        ("decode_work.route", "?.frame 0")."""
        root = self.where.split(" (", 1)[0].split("[", 1)[0].split(".", 1)[0]
        return f"{self.msg_type}.{root}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits enforced by encode and decode (a peer cannot make a node allocate more).

    max_frame_bytes: largest payload or tensor frame, bytes. max_route_stages: longest route.
    max_tensors: most tensors in one message. max_ndim: most dimensions of one tensor.
    """

    max_frame_bytes: int = 64 << 20
    max_route_stages: int = 64
    max_tensors: int = 8
    max_ndim: int = 8


DEFAULT_LIMITS = Limits()


def _tname(x: object) -> str:
    return type(x).__name__


class _Ctx:
    """Per-call state: message name (for errors), limits, frames (decode) or tensor frames (encode)."""

    __slots__ = ("name", "limits", "frames")

    def __init__(self, name: str, limits: Limits, frames: Any) -> None:
        self.name = name
        self.limits = limits
        self.frames = frames

    def error(self, where: str, problem: str) -> CodecError:
        return CodecError(self.name, where, problem)


# --- field kinds: to_wire(value) validates a message's value and returns what msgpack packs;
# from_wire(value) validates what msgpack unpacked and returns the message's value ----------------


def _check_int(ctx: _Ctx, v: object, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.error(where, f"must be an int, got {_tname(v)}")
    if v < lo:
        raise ctx.error(where, f"must be >= {lo}, got {v}")
    if v > hi:
        raise ctx.error(where, f"must be <= {hi}, got {v}")
    return v


def _check_tuple(ctx: _Ctx, v: object, where: str, lo: int, hi: int | None) -> tuple:
    if not isinstance(v, tuple):
        raise ctx.error(where, f"must be a tuple (msgpack array), got {_tname(v)}")
    if len(v) < lo:
        raise ctx.error(where, f"must have at least {lo} items, got {len(v)}")
    if hi is not None and len(v) > hi:
        raise ctx.error(where, f"must have at most {hi} items, got {len(v)}")
    return v


def _check_str(ctx: _Ctx, v: object, where: str) -> str:
    if not isinstance(v, str):
        raise ctx.error(where, f"must be a str, got {_tname(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ctx.error(where, "is not encodable as UTF-8 (lone surrogate)") from None
    return v


class _Int:
    __slots__ = ("lo", "hi")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        return _check_int(ctx, v, where, self.lo, self.hi)

    from_wire = to_wire


class _Float:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ctx.error(where, f"must be a float, got {_tname(v)}")
        try:
            f = float(v)
        except OverflowError:
            raise ctx.error(where, f"must be finite, got {v}") from None
        if not math.isfinite(f):
            raise ctx.error(where, f"must be finite, got {f}")
        return f

    def from_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        if type(v) is not float:
            raise ctx.error(where, f"must be a float, got {_tname(v)}")
        if not math.isfinite(v):
            raise ctx.error(where, f"must be finite, got {v}")
        return v


class _Bool:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        if type(v) is not bool:
            raise ctx.error(where, f"must be a bool, got {_tname(v)}")
        return v

    from_wire = to_wire


class _Str:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        return _check_str(ctx, v, where)

    from_wire = to_wire


class _Ints:
    """Tuple of ints in [lo, hi]."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, 0, None)
        for i, x in enumerate(t):
            _check_int(ctx, x, f"{where}[{i}]", self.lo, self.hi)
        return t

    from_wire = to_wire


class _Strs:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, 0, None)
        for i, x in enumerate(t):
            _check_str(ctx, x, f"{where}[{i}]")
        return t

    from_wire = to_wire


def _check_range(ctx: _Ctx, where: str, start: int, end: int) -> None:
    if end <= start:
        raise ctx.error(where, f"layer range must have start < end, got [{start}, {end})")


class _Route:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, 1, ctx.limits.max_route_stages)
        prev_end = None
        for i, st in enumerate(t):
            w = f"{where}[{i}]"
            s = _check_tuple(ctx, st, w, 3, 3)
            _check_int(ctx, s[0], w + ".node", 0, I32_MAX)
            start = _check_int(ctx, s[1], w + ".start", 0, I32_MAX)
            end = _check_int(ctx, s[2], w + ".end", 0, I32_MAX)
            _check_range(ctx, w, start, end)
            if prev_end is not None and start != prev_end:
                raise ctx.error(w, f"must start at layer {prev_end} where stage {i - 1} ends, got {start}")
            prev_end = end
        return t

    from_wire = to_wire


class _Peers:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, 0, None)
        for i, p in enumerate(t):
            w = f"{where}[{i}]"
            s = _check_tuple(ctx, p, w, 4, 4)
            _check_int(ctx, s[0], w + ".node", 0, I32_MAX)
            _check_str(ctx, s[1], w + ".address")
            start = _check_int(ctx, s[2], w + ".start", 0, I32_MAX)
            end = _check_int(ctx, s[3], w + ".end", 0, I32_MAX)
            _check_range(ctx, w, start, end)
        return t

    from_wire = to_wire


def tensor_span(itemsize: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``shape`` spans with its zero dimensions ignored: ``itemsize`` times the
    product of its nonzero dimensions (a Python int: never overflows). Its size for a non-empty
    tensor; at most ``max_frame_bytes`` for any tensor the codec carries, which bounds every
    dimension too (numpy itself refuses an empty shape whose span exceeds its index range)."""
    span = itemsize
    for d in shape:
        if d:
            span *= d
    return span


def _span_problem(span: int, shape: tuple[int, ...], itemsize: int, dtype_name: str, limits: Limits) -> str:
    return (
        f"shape {list(shape)} x {itemsize}-byte {dtype_name} spans {span} bytes with its zero dimensions ignored, "
        f"more than max_frame_bytes={limits.max_frame_bytes}"
    )


def tensor_to_wire(t: object, msg_name: str, index: int, limits: Limits) -> tuple[str, tuple[int, ...], object]:
    """Validate tensor ``index`` of a message being encoded; return (dtype name, shape, frame).

    The frame is a 1-D byte memoryview of the tensor's own buffer (no copy).
    """
    arr = t if type(t) is np.ndarray else as_ndarray(t)
    if arr is None:
        raise CodecError(
            msg_name,
            f"tensors[{index}]",
            f"must be a numpy array or a torch CPU tensor with a numpy dtype, got {_tname(t)}",
        )
    name = _NAME_BY_DTYPE.get(arr.dtype)  # a dict lookup: dtype.name costs microseconds
    if name is None:
        raise CodecError(
            msg_name,
            f"tensors[{index}]",
            f"unsupported dtype {arr.dtype.str!r}; supported: {', '.join(DTYPES)} (little-endian)",
        )
    shape = arr.shape
    if len(shape) > limits.max_ndim:
        raise CodecError(msg_name, f"tensors[{index}]", f"has {len(shape)} dimensions, at most {limits.max_ndim} allowed")
    for d in shape:
        if d > I32_MAX:
            raise CodecError(msg_name, f"tensors[{index}]", f"dimension {d} exceeds {I32_MAX}")
    if not arr.flags.c_contiguous:
        raise CodecError(
            msg_name,
            f"tensors[{index}]",
            "is not C-contiguous; the codec never copies tensors: pass np.ascontiguousarray(x)",
        )
    nbytes = arr.nbytes
    if nbytes > limits.max_frame_bytes:
        raise CodecError(
            msg_name, f"tensors[{index}]", f"has {nbytes} bytes, more than max_frame_bytes={limits.max_frame_bytes}"
        )
    if not nbytes:  # an empty tensor: its span is not its size (see tensor_span)
        span = tensor_span(arr.itemsize, shape)
        if span > limits.max_frame_bytes:
            raise CodecError(msg_name, f"tensors[{index}]", _span_problem(span, shape, arr.itemsize, name, limits))
    # memoryview.cast refuses zero-size views; an empty frame carries the same (no) data
    frame = memoryview(arr).cast("B") if nbytes else b""  # type: ignore[arg-type]
    return name, shape, frame


def tensor_from_wire(
    dtype_name: str, shape: tuple[int, ...], frame: object, msg_name: str, index: int, limits: Limits
) -> np.ndarray:
    """Check frame ``2 + index`` against its descriptor and view it as an array (no copy)."""
    dt = DTYPES.get(dtype_name)
    if dt is None:
        raise CodecError(
            msg_name, f"tensors[{index}].dtype", f"unsupported dtype {dtype_name!r}; supported: {', '.join(DTYPES)}"
        )
    try:
        mv = memoryview(frame)  # type: ignore[arg-type]
    except Exception:
        mv = _view(frame, msg_name, f"frame {2 + index} (tensors[{index}])")  # raises the error
    if not mv.c_contiguous:
        raise CodecError(msg_name, f"frame {2 + index} (tensors[{index}])", "must be a C-contiguous buffer")
    expected = dt.itemsize
    for d in shape:
        expected *= d
    if mv.nbytes != expected:
        raise CodecError(
            msg_name,
            f"frame {2 + index} (tensors[{index}])",
            f"has {mv.nbytes} bytes, expected {expected} (shape {list(shape)} x {dt.itemsize}-byte {dtype_name})",
        )
    if expected > limits.max_frame_bytes:
        raise CodecError(
            msg_name,
            f"frame {2 + index} (tensors[{index}])",
            f"has {expected} bytes, more than max_frame_bytes={limits.max_frame_bytes}",
        )
    if not expected:  # empty: the shape may still declare huge dimensions
        span = tensor_span(dt.itemsize, shape)
        if span > limits.max_frame_bytes:
            raise CodecError(msg_name, f"tensors[{index}].shape", _span_problem(span, shape, dt.itemsize, dtype_name, limits))
    # an array over the frame's own buffer (any C-contiguous exporter, read as plain bytes): the
    # array keeps the frame alive and is writable exactly when the frame is. The checks above
    # leave numpy nothing to refuse under sane limits; whatever it raises still is a CodecError
    try:
        return np.ndarray(shape, dt, mv)
    except Exception as exc:
        raise CodecError(
            msg_name, f"tensors[{index}]", f"cannot be viewed as a {list(shape)} {dtype_name} array ({_tname(exc)}: {exc})"
        ) from None


class _Tensors:
    """Descriptors [[dtype, [dims...]], ...] in the payload, one raw frame per tensor after it."""

    __slots__ = ("min_count",)

    def __init__(self, min_count: int) -> None:
        self.min_count = min_count

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, self.min_count, ctx.limits.max_tensors)
        descs = []
        for i, x in enumerate(t):
            name, shape, frame = tensor_to_wire(x, ctx.name, i, ctx.limits)
            descs.append((name, shape))
            ctx.frames.append(frame)
        return tuple(descs)

    def from_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        lim = ctx.limits
        t = _check_tuple(ctx, v, where, self.min_count, lim.max_tensors)
        descs = []
        for i, d in enumerate(t):
            w = f"{where}[{i}]"
            d = _check_tuple(ctx, d, w, 2, 2)
            name = _check_str(ctx, d[0], w + ".dtype")
            if name not in DTYPES:
                raise ctx.error(w + ".dtype", f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
            shape = _check_tuple(ctx, d[1], w + ".shape", 0, lim.max_ndim)
            for k, dim in enumerate(shape):
                _check_int(ctx, dim, f"{w}.shape[{k}]", 0, I32_MAX)
            descs.append((name, shape))
        frames = ctx.frames
        if len(frames) != 2 + len(descs):
            raise ctx.error("frames", f"expected {2 + len(descs)} frames (tag, payload, {len(descs)} tensors), got {len(frames)}")
        return tuple(
            tensor_from_wire(name, shape, frames[2 + i], ctx.name, i, lim) for i, (name, shape) in enumerate(descs)
        )


# --- per-message layouts and cross-field rules ----------------------------------------------------

_ID = _Int(0, I64_MAX)
_I32 = _Int(0, I32_MAX)
_POS32 = _Int(1, I32_MAX)
_F = _Float()
_S = _Str()


def _check_stage_index(ctx: _Ctx, v: dict) -> None:
    if v["stage"] >= len(v["route"]):
        raise ctx.error("stage", f"must be < len(route) = {len(v['route'])}, got {v['stage']}")


def _rules_prompt(ctx: _Ctx, v: dict) -> None:
    _check_stage_index(ctx, v)
    ids, tensors = v["token_ids"], v["tensors"]
    if ids:
        if tensors:
            raise ctx.error("tensors", "must be empty when token_ids are given (token ids xor hidden states)")
        if len(ids) != v["num_tokens"]:
            raise ctx.error("token_ids", f"has {len(ids)} ids but num_tokens is {v['num_tokens']}")
    elif not tensors:
        raise ctx.error("token_ids", "is empty and no tensors are given (need token ids xor hidden states)")


def _rules_decode(ctx: _Ctx, v: dict) -> None:
    _check_stage_index(ctx, v)
    if v["token_id"] >= 0 and v["tensors"]:
        raise ctx.error("tensors", "must be empty when token_id >= 0 (token id xor hidden state)")
    if v["token_id"] < 0 and not v["tensors"]:
        raise ctx.error("token_id", "is -1 but no tensors are given (token id xor hidden state)")


def _rules_assign(ctx: _Ctx, v: dict) -> None:
    _check_range(ctx, "end", v["start"], v["end"])


class _Layout:
    __slots__ = ("cls", "name", "specs", "rules", "has_tensors")

    def __init__(self, cls: type, specs: dict[str, Any], rules: Any = None) -> None:
        assert tuple(specs) == cls.FIELDS, (cls, tuple(specs))  # type: ignore[attr-defined]
        self.cls = cls
        self.name: str = cls.NAME  # type: ignore[attr-defined]
        self.specs = tuple(specs.items())
        self.rules = rules
        self.has_tensors = "tensors" in specs


LAYOUTS: dict[int, _Layout] = {
    int(lay.cls.TAG): lay  # type: ignore[attr-defined]
    for lay in (
        _Layout(
            Register,
            {
                "node_id": _Int(-1, I32_MAX),
                "name": _S,
                "machine_type": _S,
                "address": _S,
                "num_gpus": _I32,
                "gpu_memory_bytes": _ID,
                "capabilities": _Strs(),
            },
        ),
        _Layout(
            AssignLayers,
            {
                "node_id": _I32,
                "model": _S,
                "start": _I32,
                "end": _I32,
                "plan_id": _ID,
                "next_hops": _Peers(),
                "prev_nodes": _Ints(0, I32_MAX),
            },
            _rules_assign,
        ),
        _Layout(
            PromptWork,
            {
                "request_id": _ID,
                "query_id": _ID,
                "route": _Route(),
                "stage": _I32,
                "num_tokens": _POS32,
                "token_ids": _Ints(0, I32_MAX),
                "max_tokens": _POS32,
                "sent_at": _F,
                "tensors": _Tensors(0),
            },
            _rules_prompt,
        ),
        _Layout(
            DecodeWork,
            {
                "request_id": _ID,
                "route": _Route(),
                "stage": _I32,
                "context_len": _POS32,
                "token_id": _Int(-1, I32_MAX),
                "sent_at": _F,
                "tensors": _Tensors(0),
            },
            _rules_decode,
        ),
        _Layout(
            Activations,
            {"request_id": _ID, "stage": _I32, "num_tokens": _I32, "sent_at": _F, "tensors": _Tensors(1)},
        ),
        _Layout(
            TokenResult,
            {"request_id": _ID, "token_id": _I32, "context_len": _POS32, "finished": _Bool(), "sent_at": _F},
        ),
        _Layout(Heartbeat, {"node_id": _I32, "seq": _ID, "now": _F}),
        _Layout(Cancel, {"request_id": _ID, "reason": _S}),
        _Layout(Error, {"request_id": _Int(-1, I64_MAX), "code": _I32, "text": _S}),
        _Layout(Shutdown, {"reason": _S}),
    )
}
assert set(LAYOUTS) == {int(t) for t in MESSAGE_TYPES}
_BY_CLASS: dict[type, _Layout] = {lay.cls: lay for lay in LAYOUTS.values()}


def _view(frame: object, msg_name: str, where: str) -> memoryview:
    try:
        mv = memoryview(frame)  # type: ignore[arg-type]
    except Exception:  # TypeError for non-buffers; ValueError/BufferError from odd exporters
        raise CodecError(msg_name, where, f"must be a bytes-like object, got {_tname(frame)}") from None
    if not mv.c_contiguous:
        raise CodecError(msg_name, where, "must be a C-contiguous buffer")
    return mv


def encode(msg: Message, limits: Limits | None = None) -> list[bytes | memoryview]:
    """Frames of ``msg``: [tag byte, msgpack array of its fields, tensor buffers...].

    Raises CodecError when the message breaks the layout rules (see the module docstring).
    Tensor frames are memoryviews of the tensors' own memory: keep the tensors unchanged until
    the transport has sent them.
    """
    lay = _BY_CLASS.get(type(msg))
    if lay is None:
        raise CodecError("?", "message", f"cannot encode {_tname(msg)}: not a message type")
    ctx = _Ctx(lay.name, limits or DEFAULT_LIMITS, [])
    values = {}
    wire = []
    for name, spec in lay.specs:
        try:
            v = getattr(msg, name)
        except AttributeError:
            raise ctx.error(name, "is not set") from None
        wire.append(spec.to_wire(ctx, v, name))
        values[name] = v
    if lay.rules is not None:
        lay.rules(ctx, values)
    payload = msgpack.packb(wire, use_bin_type=True)
    if len(payload) > ctx.limits.max_frame_bytes:
        raise ctx.error(
            "frame 1 (payload)", f"has {len(payload)} bytes, more than max_frame_bytes={ctx.limits.max_frame_bytes}"
        )
    return [TAG_FRAMES[lay.cls.TAG], payload, *ctx.frames]  # type: ignore[attr-defined]


def decode(frames: list | tuple, limits: Limits | None = None) -> Message:
    """The message in ``frames`` (a list or tuple of bytes-like objects), fully validated.

    Raises CodecError, and only CodecError, for any input that is not a valid encoding.
    """
    lim = limits or DEFAULT_LIMITS
    if not isinstance(frames, (list, tuple)):
        raise CodecError("?", "frames", f"must be a list or tuple of frames, got {_tname(frames)}")
    if len(frames) < 2:
        raise CodecError("?", "frames", f"expected at least 2 frames (tag, payload), got {len(frames)}")
    tag_view = _view(frames[0], "?", "frame 0 (tag)")
    if tag_view.nbytes != 1:
        raise CodecError("?", "frame 0 (tag)", f"must be exactly 1 byte, got {tag_view.nbytes}")
    tag = tag_view.tobytes()[0]
    lay = LAYOUTS.get(tag)
    if lay is None:
        raise CodecError("?", "frame 0 (tag)", f"unknown message type tag {tag}")
    ctx = _Ctx(lay.name, lim, frames)
    if not lay.has_tensors and len(frames) != 2:
        raise ctx.error("frames", f"expected 2 frames (tag, payload), got {len(frames)}")
    pv = _view(frames[1], lay.name, "frame 1 (payload)")
    if pv.nbytes > lim.max_frame_bytes:
        raise ctx.error("frame 1 (payload)", f"has {pv.nbytes} bytes, more than max_frame_bytes={lim.max_frame_bytes}")
    if pv.nbytes == 0:
        raise ctx.error("frame 1 (payload)", "is empty, expected a msgpack array")
    try:
        # msgpack refuses multi-byte formats; the cast is a view (C-contiguity was checked)
        obj = msgpack.unpackb(pv.cast("B"), raw=False, use_list=False, strict_map_key=True)
    except msgpack.ExtraData:
        raise ctx.error("frame 1 (payload)", "trailing bytes after the msgpack array") from None
    except Exception as exc:  # msgpack raises ValueError, UnicodeDecodeError, TypeError, ... on bad input
        raise ctx.error("frame 1 (payload)", f"is not valid msgpack ({_tname(exc)}: {exc})") from None
    if not isinstance(obj, tuple):
        raise ctx.error("frame 1 (payload)", f"must be a msgpack array, got {_tname(obj)}")
    if len(obj) != len(lay.specs):
        raise ctx.error(
            "frame 1 (payload)",
            f"expected an array of {len(lay.specs)} fields ({', '.join(n for n, _ in lay.specs)}), got {len(obj)}",
        )
    values = {name: spec.from_wire(ctx, x, name) for (name, spec), x in zip(lay.specs, obj, strict=True)}
    if lay.rules is not None:
        lay.rules(ctx, values)
    return lay.cls(**values)


__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "I32_MAX",
    "I64_MAX",
    "LAYOUTS",
    "TAG_FRAMES",
    "CodecError",
    "Limits",
    "decode",
    "encode",
    "tensor_from_wire",
    "tensor_span",
    "tensor_to_wire",
]
