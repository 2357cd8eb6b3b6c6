"""Pure-Python message codec: the specification (``ext/_codec.pyx`` is its compiled twin).

Wire format of one message, a list of frames (bytes-like objects):

* frame 0: one byte, the ``MsgType`` value;
* frame 1: ``msgpack.packb([field values in FIELDS order], use_bin_type=True)`` — an array, not a
  map. Ints use msgpack's smallest encoding, floats are float64, tuples are arrays, strings str;
* frames 2..: for messages with a ``tensors`` field, one raw frame per tensor (its C-contiguous
  little-endian buffer, no header, never copied); the payload's ``tensors`` field holds one
  descriptor ``[dtype name, [dim, ...]]`` per tensor, in frame order;
* modelled payload frame: a work message with ``payload_bytes`` > 0 (a payload it stands for but
  does not carry, see ``helix_async.messages``) has one more frame after its tensor frames (it has
  none: the rules below) of exactly ``payload_bytes`` bytes, written as zeros. The payload's own
  ``payload_bytes`` field announces it, and the decoder checks the frame's length against it and
  does not read its content; decoding gives ``payload_bytes`` back, not a tensor.

So the wire size of a message, the sum of its frames' byte lengths, is 1 + the msgpack payload +
its tensors' bytes + ``payload_bytes``: :func:`wire_size` computes it without encoding.

Field layouts (ints are checked against the ranges below, I32 = 2**31 - 1, I64 = 2**63 - 1):

======================  ==================================================================
register                [node_id -1..I32, name, machine_type, address, num_gpus 0..I32,
                        gpu_memory_bytes 0..I64, capabilities [str...]]
assign_layers           [node_id, model, start, end, plan_id 0..I64,
                        next_hops [[node, address, start, end]...], prev_nodes [node...]]
prompt_work             [request_id, query_id, route [[node, start, end]...], stage,
                        num_tokens 1..I32, token_ids [0..I32...], max_tokens 1..I32,
                        sent_at float, tensors [[dtype, shape]...], payload_bytes,
                        temperature float >= 0, top_p float in (0, 1], seed 0..I64,
                        top_k 0..I32, min_p float in [0, 1], presence_penalty float in [-2, 2],
                        frequency_penalty float in [-2, 2], repetition_penalty float > 0,
                        min_tokens 0..I32, stop_token_ids [0..I32...],
                        logprobs -1..MAX_LOGPROBS, context_ids [0..I32...], generated 0..I32,
                        priority -I32-1..I32]
decode_work             [request_id, route, stage, context_len 1..I32, token_id -1..I32,
                        sent_at, tensors, payload_bytes]
activations             [request_id, stage, num_tokens 0..I32, sent_at, tensors (>= 1)]
token_result            [request_id, token_id 0..I32, context_len 1..I32, finished bool,
                        sent_at, route (may be empty),
                        logprobs [[token_id 0..I32, logprob float <= 0]...] (0..1 + MAX_LOGPROBS)]
heartbeat               [node_id, seq 0..I64, now float]
cancel                  [request_id, reason]
error                   [request_id -1..I64, code 0..I32, text]
shutdown                [reason]
feedback                [request_id, node_id, delay float >= 0, sent_at]
======================  ==================================================================

Unless given above: request/query ids are 0..I64; node ids, layer indices and stage indices
0..I32; floats finite; strings valid UTF-8; ``payload_bytes`` is 0 (none) or
1..``Limits.max_frame_bytes`` (and <= I64). A route (``helix_async.ids.Route``, what the router
returns) has 1..``Limits.max_route_stages`` compute stages (token_result: 0.. of them), each with
start < end, stage i starting where stage i-1 ends, and ``stage < len(route)``; the sink after the
last stage is implicit.
Cross-field rules: prompt_work carries exactly one of token ids (exactly ``num_tokens`` of
them), tensors and a modelled payload (``payload_bytes`` > 0), context ids only without token
ids (exactly ``num_tokens`` of them), and ``generated < num_tokens``; decode_work exactly one of a
token id >= 0, tensors and a modelled payload (token_id -1 with either of the last two);
token_result's logprobs, when given, start with its own token id; assign_layers has start < end.

Encoding validates the same rules (a message that encodes always decodes to an equal one).
Decoding validates everything (frame count, tag, sizes, msgpack well-formedness and trailing
bytes, arity, types — bool is not an int, tuple not list on encode —, ranges, tensors) and
raises ``CodecError`` and nothing else, naming the message type and the field or frame.

Decoding is bounded by the payload's length, whatever a peer sends: the payload is read in place,
item by item in field order, and only where the layout expects an item. The top-level array
header is checked against the message's field count before any field is read; every array header
against its size limit (``Limits``, the layout's fixed sizes, and the bytes left: an item takes one
byte at least) before its items are read; every str/bin/ext header against the bytes left before
its data is read. An array or map found where the layout expects something else is refused at its
header, never read. So one item read costs one byte of payload at least, nothing is read twice and
nothing the layout does not hold is built: a hostile frame fails at the first item that breaks the
layout. Errors come in that order: payload size, top-level header and field count, then each
field in order (its type, size, values, and msgpack well-formedness up to that point), trailing
bytes, tensor frames and the modelled payload frame, then the cross-field rules.

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

import functools
import math
import struct
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
    Feedback,
    Heartbeat,
    Message,
    MigrateAbort,
    MigrateFinish,
    MigrateKV,
    MigrateReserve,
    MigrateStart,
    MigrateStatus,
    MsgType,
    NodeStats,
    PromptWork,
    Register,
    Shutdown,
    TokenResult,
    as_ndarray,
)
from .sampling import MAX_LOGPROBS

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

    max_frame_bytes: largest payload, tensor or modelled payload frame, bytes.
    max_route_stages: longest route.
    max_tensors: most tensors in one message. max_ndim: most dimensions of one tensor.
    """

    max_frame_bytes: int = 64 << 20
    max_route_stages: int = 64
    max_tensors: int = 8
    max_ndim: int = 8


DEFAULT_LIMITS = Limits()


class _Unread:
    """An array or map the decoder found where the layout holds no such thing and left unread;
    ``kind`` is the type msgpack would have built for it (errors name it)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


_UNREAD_ARRAY = _Unread("tuple")
_UNREAD_MAP = _Unread("dict")


def _tname(x: object) -> str:
    return x.kind if type(x) is _Unread else type(x).__name__


class _Ctx:
    """Per-call state: message name (for errors), limits, frames (decode) or tensor frames (encode)."""

    __slots__ = ("name", "limits", "frames")

    def __init__(self, name: str, limits: Limits, frames: Any) -> None:
        self.name = name
        self.limits = limits
        self.frames = frames

    def error(self, where: str, problem: str) -> CodecError:
        return CodecError(self.name, where, problem)


# --- the payload reader: msgpack read in place, one expected item at a time ------------------------

_PAYLOAD = "frame 1 (payload)"
_INCOMPLETE = "ValueError: Unpack failed: incomplete input"  # msgpack's words for a truncated payload

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_F32 = struct.Struct(">f").unpack_from
_F64 = struct.Struct(">d").unpack_from
#: int formats: header byte -> (reader of the value after the header, its size in bytes)
_INT_FORMATS: dict[int, tuple[Any, int]] = {
    b: (struct.Struct(">" + c).unpack_from, struct.calcsize(c))
    for b, c in ((0xCC, "B"), (0xCD, "H"), (0xCE, "I"), (0xCF, "Q"), (0xD0, "b"), (0xD1, "h"), (0xD2, "i"), (0xD3, "q"))
}
#: str8/16/32: header byte -> size of the length that follows it
_STR_LENGTHS = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_ARRAY_HEADERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_MAP_HEADERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
#: the formats no field holds (nil, the unused 0xc1, bin, ext): header byte -> (size of the length
#: after the header, bytes between that length and the data); left to msgpack itself, one item
_OTHER_FORMATS = {
    0xC0: (0, 0),
    0xC1: (0, 0),
    0xC4: (1, 0),
    0xC5: (2, 0),
    0xC6: (4, 0),
    0xC7: (1, 1),
    0xC8: (2, 1),
    0xC9: (4, 1),
    0xD4: (0, 2),
    0xD5: (0, 3),
    0xD6: (0, 5),
    0xD7: (0, 9),
    0xD8: (0, 17),
}
_LENGTH = {1: lambda buf, p: (buf[p],), 2: _U16, 4: _U32}


class _Reader:
    """A cursor over the payload (a byte memoryview) that reads one msgpack item at a time.

    ``item()`` reads a scalar; ``array()`` an array header, checked against the layout's size limits
    and the bytes left before any item is read. Containers where a scalar belongs are not read
    (``item()`` returns an ``_Unread`` and the caller refuses it); every read checks that its bytes
    are there. Work and memory are thus bounded by the bytes the layout can consume.
    """

    __slots__ = ("ctx", "buf", "pos", "end")

    def __init__(self, ctx: _Ctx, buf: memoryview) -> None:
        self.ctx = ctx
        self.buf = buf
        self.pos = 0
        self.end = len(buf)

    def invalid(self, problem: str) -> CodecError:
        return self.ctx.error(_PAYLOAD, f"is not valid msgpack ({problem})")

    def _span(self, start: int, size: int) -> int:
        """End of ``size`` bytes at ``start``; CodecError when the payload is shorter."""
        stop = start + size
        if stop > self.end:
            raise self.invalid(_INCOMPLETE)
        return stop

    def _str(self, start: int, size: int) -> str:
        stop = self._span(start, size)
        self.pos = stop
        try:
            return str(self.buf[start:stop], "utf-8")
        except UnicodeDecodeError as exc:
            raise self.invalid(f"{_tname(exc)}: {exc}") from None

    def item(self) -> object:
        """The next item as msgpack reads it (unpackb(raw=False)) when it is a scalar; an
        ``_Unread`` for an array or a map, which stays unread (the caller refuses it)."""
        buf = self.buf
        p = self.pos
        if p >= self.end:
            raise self.invalid(_INCOMPLETE)
        b = buf[p]
        if b < 0x80:  # positive fixint
            self.pos = p + 1
            return b
        if b >= 0xE0:  # negative fixint
            self.pos = p + 1
            return b - 0x100
        if 0xA0 <= b < 0xC0:  # fixstr
            return self._str(p + 1, b & 0x1F)
        fmt = _INT_FORMATS.get(b)
        if fmt is not None:
            read, size = fmt
            self.pos = self._span(p + 1, size)
            return read(buf, p + 1)[0]
        if b == 0xCB:
            self.pos = self._span(p + 1, 8)
            return _F64(buf, p + 1)[0]
        if b == 0xCA:
            self.pos = self._span(p + 1, 4)
            return _F32(buf, p + 1)[0]
        if b == 0xC2 or b == 0xC3:
            self.pos = p + 1
            return b == 0xC3
        k = _STR_LENGTHS.get(b)
        if k is not None:
            start = self._span(p + 1, k)
            return self._str(start, _LENGTH[k](buf, p + 1)[0])
        if b in _ARRAY_HEADERS:
            return _UNREAD_ARRAY
        if b in _MAP_HEADERS:
            return _UNREAD_MAP
        # nil, 0xc1, bin, ext: no field holds them; msgpack reads exactly this one item (its value
        # names the type in the caller's error; a malformed one is msgpack's own error)
        k, gap = _OTHER_FORMATS[b]
        start = self._span(p + 1, k)
        size = _LENGTH[k](buf, p + 1)[0] if k else 0
        stop = self._span(start, gap + size)
        self.pos = stop
        try:
            return msgpack.unpackb(buf[p:stop], raw=False)
        except Exception as exc:
            raise self.invalid(f"{_tname(exc)}: {exc}") from None

    def array_header(self) -> int | None:
        """Item count of the next item when it is an array (its header consumed), else None
        (nothing consumed)."""
        buf = self.buf
        p = self.pos
        if p >= self.end:
            raise self.invalid(_INCOMPLETE)
        b = buf[p]
        if 0x90 <= b < 0xA0:
            self.pos = p + 1
            return b & 0x0F
        if b == 0xDC:
            self.pos = self._span(p + 1, 2)
            return _U16(buf, p + 1)[0]
        if b == 0xDD:
            self.pos = self._span(p + 1, 4)
            return _U32(buf, p + 1)[0]
        return None

    def array(self, where: str, lo: int, hi: int | None) -> int:
        """Item count of the next item, an array of lo..hi items (hi None: no limit but the
        payload's bytes) whose header is consumed; raises CodecError for anything else."""
        n = self.array_header()
        if n is None:
            raise _not_a_tuple(self.ctx, self.item(), where)
        _check_count(self.ctx, n, where, lo, hi)
        if n > self.end - self.pos:  # each item takes a byte at least: the payload is truncated
            raise self.invalid(_INCOMPLETE)
        return n


# --- field kinds: to_wire(value) validates a message's value and returns what msgpack packs;
# read(reader) reads the field from the payload, validates it and returns the message's value;
# size(value) is the bytes the value takes in the payload (plus its frames), without validating it --

#: msgpack size of a non-negative int by its bit length (fixint, uint8/16/32/64)
_UINT_SIZES = (1,) * 8 + (2,) + (3,) * 8 + (5,) * 16 + (9,) * 32


def _int_size(v: int) -> int:
    """Bytes msgpack takes for the int ``v`` (its smallest encoding)."""
    if v >= 0:
        return _UINT_SIZES[v.bit_length()]
    if v >= -32:
        return 1
    if v >= -128:
        return 2
    if v >= -32768:
        return 3
    return 5 if v >= -2147483648 else 9


def _array_size(n: int) -> int:
    """Bytes of a msgpack array header of ``n`` items (fixarray, array16, array32)."""
    return 1 if n < 16 else 3 if n < 65536 else 5


def _str_size(v: str) -> int:
    """Bytes msgpack takes for the str ``v`` (header and UTF-8 data)."""
    n = len(v) if v.isascii() else len(v.encode("utf-8"))
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


#: id(route) -> (route, its payload size): every message of a request carries the same route tuple,
#: so its size is computed once (the entry keeps the route alive: an id is not reused meanwhile)
_ROUTE_SIZES: dict[int, tuple[object, int]] = {}
_ROUTE_SIZES_MAX = 4096  # then the cache starts over


def _route_size(route: tuple) -> int:
    e = _ROUTE_SIZES.get(id(route))
    if e is not None and e[0] is route:
        return e[1]
    n = _array_size(len(route))
    for node, start, end in route:
        n += 1 + _int_size(node) + _int_size(start) + _int_size(end)
    if len(_ROUTE_SIZES) >= _ROUTE_SIZES_MAX:
        _ROUTE_SIZES.clear()
    _ROUTE_SIZES[id(route)] = (route, n)
    return n


def _check_int(ctx: _Ctx, v: object, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.error(where, f"must be an int, got {_tname(v)}")
    if v < lo:
        raise ctx.error(where, f"must be >= {lo}, got {v}")
    if v > hi:
        raise ctx.error(where, f"must be <= {hi}, got {v}")
    return v


def _not_a_tuple(ctx: _Ctx, v: object, where: str) -> CodecError:
    return ctx.error(where, f"must be a tuple (msgpack array), got {_tname(v)}")


def _check_count(ctx: _Ctx, n: int, where: str, lo: int, hi: int | None) -> None:
    if n < lo:
        raise ctx.error(where, f"must have at least {lo} items, got {n}")
    if hi is not None and n > hi:
        raise ctx.error(where, f"must have at most {hi} items, got {n}")


def _check_tuple(ctx: _Ctx, v: object, where: str, lo: int, hi: int | None) -> tuple:
    if not isinstance(v, tuple):
        raise _not_a_tuple(ctx, v, where)
    _check_count(ctx, len(v), where, lo, hi)
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

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        return _check_int(ctx, rd.item(), where, self.lo, self.hi)

    def size(self, v: Any) -> int:
        return _int_size(v)


class _Float:
    """A finite float (an int is accepted on encode and sent as a float) in the range from ``lo``
    (excluded when ``lo_open``) to ``hi``; None: unbounded on that side."""

    __slots__ = ("lo", "hi", "lo_open", "rule")

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open = lo, hi, lo_open
        if hi is not None:
            self.rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        elif lo is not None:
            self.rule = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            self.rule = ""

    def _check(self, ctx: _Ctx, f: float, where: str) -> float:
        if not math.isfinite(f):
            raise ctx.error(where, f"must be finite, got {f}")
        lo, hi = self.lo, self.hi
        if (lo is not None and (f <= lo if self.lo_open else f < lo)) or (hi is not None and f > hi):
            raise ctx.error(where, f"must be {self.rule}, got {f}")
        return f

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ctx.error(where, f"must be a float, got {_tname(v)}")
        try:
            f = float(v)
        except OverflowError:
            raise ctx.error(where, f"must be finite, got {v}") from None
        return self._check(ctx, f, where)

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        v = rd.item()
        if type(v) is not float:
            raise ctx.error(where, f"must be a float, got {_tname(v)}")
        return self._check(ctx, v, where)

    def size(self, v: Any) -> int:
        return 9  # float64


class _Bool:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        if type(v) is not bool:
            raise ctx.error(where, f"must be a bool, got {_tname(v)}")
        return v

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        return self.to_wire(ctx, rd.item(), where)

    def size(self, v: Any) -> int:
        return 1


class _Str:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        return _check_str(ctx, v, where)

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        return _check_str(ctx, rd.item(), where)

    def size(self, v: Any) -> int:
        return _str_size(v)


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

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        n = rd.array(where, 0, None)
        item = rd.item
        lo, hi = self.lo, self.hi
        out = []
        for i in range(n):
            x = item()
            if type(x) is not int or not lo <= x <= hi:
                _check_int(ctx, x, f"{where}[{i}]", lo, hi)  # raises
            out.append(x)
        return tuple(out)

    def size(self, v: Any) -> int:
        return _array_size(len(v)) + sum(map(_int_size, v))


class _Strs:
    __slots__ = ()

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, 0, None)
        for i, x in enumerate(t):
            _check_str(ctx, x, f"{where}[{i}]")
        return t

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        n = rd.array(where, 0, None)
        return tuple(_check_str(ctx, rd.item(), f"{where}[{i}]") for i in range(n))

    def size(self, v: Any) -> int:
        return _array_size(len(v)) + sum(map(_str_size, v))


def _check_range(ctx: _Ctx, where: str, start: int, end: int) -> None:
    if end <= start:
        raise ctx.error(where, f"layer range must have start < end, got [{start}, {end})")


class _Route:
    """A route: ``min_len``..max_route_stages contiguous stages (node, start, end)."""

    __slots__ = ("min_len",)

    def __init__(self, min_len: int = 1) -> None:
        self.min_len = min_len

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, self.min_len, ctx.limits.max_route_stages)
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

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        n = rd.array(where, self.min_len, ctx.limits.max_route_stages)
        out = []
        prev_end = None
        for i in range(n):
            w = f"{where}[{i}]"
            rd.array(w, 3, 3)
            node = _check_int(ctx, rd.item(), w + ".node", 0, I32_MAX)
            start = _check_int(ctx, rd.item(), w + ".start", 0, I32_MAX)
            end = _check_int(ctx, rd.item(), w + ".end", 0, I32_MAX)
            _check_range(ctx, w, start, end)
            if prev_end is not None and start != prev_end:
                raise ctx.error(w, f"must start at layer {prev_end} where stage {i - 1} ends, got {start}")
            prev_end = end
            out.append((node, start, end))
        return tuple(out)

    def size(self, v: Any) -> int:
        return _route_size(v)


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

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        n = rd.array(where, 0, None)
        out = []
        for i in range(n):
            w = f"{where}[{i}]"
            rd.array(w, 4, 4)
            node = _check_int(ctx, rd.item(), w + ".node", 0, I32_MAX)
            address = _check_str(ctx, rd.item(), w + ".address")
            start = _check_int(ctx, rd.item(), w + ".start", 0, I32_MAX)
            end = _check_int(ctx, rd.item(), w + ".end", 0, I32_MAX)
            _check_range(ctx, w, start, end)
            out.append((node, address, start, end))
        return tuple(out)

    def size(self, v: Any) -> int:
        n = _array_size(len(v))
        for node, address, start, end in v:
            n += 1 + _int_size(node) + _str_size(address) + _int_size(start) + _int_size(end)
        return n


class _Logprobs:
    """(token id, logprob) pairs, 0..1 + MAX_LOGPROBS of them: ids 0..I32, logprobs finite <= 0."""

    __slots__ = ()

    def _check_lp(self, ctx: _Ctx, x: object, where: str) -> float:
        if type(x) is not float:
            raise ctx.error(where, f"must be a float, got {_tname(x)}")
        if not math.isfinite(x):
            raise ctx.error(where, f"must be finite, got {x}")
        if x > 0:
            raise ctx.error(where, f"must be <= 0 (a log-probability), got {x}")
        return x

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        t = _check_tuple(ctx, v, where, 0, 1 + MAX_LOGPROBS)
        for i, p in enumerate(t):
            w = f"{where}[{i}]"
            s = _check_tuple(ctx, p, w, 2, 2)
            _check_int(ctx, s[0], w + ".token_id", 0, I32_MAX)
            self._check_lp(ctx, s[1], w + ".logprob")
        return t

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        n = rd.array(where, 0, 1 + MAX_LOGPROBS)
        out = []
        for i in range(n):
            w = f"{where}[{i}]"
            rd.array(w, 2, 2)
            tok = _check_int(ctx, rd.item(), w + ".token_id", 0, I32_MAX)
            out.append((tok, self._check_lp(ctx, rd.item(), w + ".logprob")))
        return tuple(out)

    def size(self, v: Any) -> int:
        return _array_size(len(v)) + sum(10 + _int_size(tok) for tok, _ in v)


class _PayloadBytes:
    """``payload_bytes``: 0 (no modelled payload) or 1..max_frame_bytes (and <= I64)."""

    __slots__ = ()

    def _check(self, ctx: _Ctx, v: object, where: str) -> int:
        n = _check_int(ctx, v, where, 0, I64_MAX)
        limit = ctx.limits.max_frame_bytes
        if n and n > limit:
            raise ctx.error(where, f"is {n} bytes, more than max_frame_bytes={limit}")
        return n

    def to_wire(self, ctx: _Ctx, v: object, where: str) -> object:
        return self._check(ctx, v, where)

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        return self._check(ctx, rd.item(), where)

    def size(self, v: Any) -> int:
        return _int_size(v) + v  # the field, and the modelled payload's frame when v > 0


_ZEROS = b""


def zero_frame(n: int) -> bytes | memoryview:
    """The frame of a modelled payload: ``n`` zero bytes, a read-only view of one shared buffer
    (which grows to the largest ``n`` asked for, rounded up to a power of two)."""
    global _ZEROS
    if n > len(_ZEROS):
        _ZEROS = bytes(max(4096, 1 << (n - 1).bit_length()))  # calloc: untouched pages stay unmapped
    return memoryview(_ZEROS)[:n]


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

    def read(self, ctx: _Ctx, rd: _Reader, where: str) -> object:
        """The descriptors [(dtype name, shape)...]; :func:`_tensors_from_frames` makes the arrays."""
        lim = ctx.limits
        n = rd.array(where, self.min_count, lim.max_tensors)
        descs = []
        for i in range(n):
            w = f"{where}[{i}]"
            rd.array(w, 2, 2)
            name = _check_str(ctx, rd.item(), w + ".dtype")
            if name not in DTYPES:
                raise ctx.error(w + ".dtype", f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
            nd = rd.array(w + ".shape", 0, lim.max_ndim)
            shape = tuple(_check_int(ctx, rd.item(), f"{w}.shape[{k}]", 0, I32_MAX) for k in range(nd))
            descs.append((name, shape))
        return descs

    def size(self, v: Any) -> int:
        return _tensors_size(v)


#: numpy dtype -> bytes of the descriptor's fixarray header and dtype name
_DESC_SIZES: dict[np.dtype, int] = {dt: 1 + _str_size(name) for dt, name in _NAME_BY_DTYPE.items()}


def _tensors_size(ts: tuple) -> int:
    """Bytes of the descriptors of ``ts`` in the payload plus their frames."""
    n = _array_size(len(ts))
    for t in ts:
        arr: Any = t if type(t) is np.ndarray else as_ndarray(t)
        shape = arr.shape
        n += _DESC_SIZES[arr.dtype] + _array_size(len(shape)) + sum(map(_int_size, shape)) + arr.nbytes
    return n


def _tensors_from_frames(
    ctx: _Ctx, descs: list[tuple[str, tuple[int, ...]]], payload_bytes: int = 0
) -> tuple[np.ndarray, ...]:
    """The tensors of a decoded message: frame ``2 + i`` checked against descriptor ``i`` and viewed;
    with ``payload_bytes`` > 0, the modelled payload's frame after them checked for its length."""
    frames = ctx.frames
    nt = len(descs)
    if payload_bytes:
        if len(frames) != 3 + nt:
            raise ctx.error(
                "frames",
                f"expected {3 + nt} frames (tag, payload, {nt} tensors, modelled payload of {payload_bytes} bytes), "
                f"got {len(frames)}",
            )
    elif len(frames) != 2 + nt:
        raise ctx.error("frames", f"expected {2 + nt} frames (tag, payload, {nt} tensors), got {len(frames)}")
    out = tuple(tensor_from_wire(name, shape, frames[2 + i], ctx.name, i, ctx.limits) for i, (name, shape) in enumerate(descs))
    if payload_bytes:
        where = f"frame {2 + nt} (payload_bytes)"
        n = _view(frames[2 + nt], ctx.name, where).nbytes
        if n != payload_bytes:
            raise ctx.error(where, f"has {n} bytes, expected payload_bytes={payload_bytes}")
    return out


# --- per-message layouts and cross-field rules ----------------------------------------------------

_ID = _Int(0, I64_MAX)
_I32 = _Int(0, I32_MAX)
_POS32 = _Int(1, I32_MAX)
_F = _Float()
_S = _Str()


def _check_stage_index(ctx: _Ctx, v: dict) -> None:
    if v["stage"] >= len(v["route"]):
        raise ctx.error("stage", f"must be < len(route) = {len(v['route'])}, got {v['stage']}")


def _check_one_payload(ctx: _Ctx, v: dict) -> None:
    if v["tensors"] and v["payload_bytes"]:
        raise ctx.error("payload_bytes", "must be 0 when tensors are given (real xor modelled payload)")


def _rules_prompt(ctx: _Ctx, v: dict) -> None:
    _check_stage_index(ctx, v)
    ids, tensors, modelled = v["token_ids"], v["tensors"], v["payload_bytes"]
    if ids:
        if tensors:
            raise ctx.error("tensors", "must be empty when token_ids are given (token ids xor hidden states)")
        if modelled:
            raise ctx.error("payload_bytes", "must be 0 when token_ids are given (real xor modelled payload)")
        if len(ids) != v["num_tokens"]:
            raise ctx.error("token_ids", f"has {len(ids)} ids but num_tokens is {v['num_tokens']}")
    elif not tensors and not modelled:
        raise ctx.error(
            "token_ids", "is empty and no tensors nor payload_bytes are given (need token ids xor hidden states)"
        )
    _check_one_payload(ctx, v)
    ctx_ids = v["context_ids"]
    if ctx_ids:
        if ids:
            raise ctx.error("context_ids", "must be empty when token_ids are given (the first stage has them there)")
        if len(ctx_ids) != v["num_tokens"]:
            raise ctx.error("context_ids", f"has {len(ctx_ids)} ids but num_tokens is {v['num_tokens']}")
    if v["generated"] >= v["num_tokens"]:
        raise ctx.error("generated", f"must be < num_tokens = {v['num_tokens']}, got {v['generated']}")


def _rules_token_result(ctx: _Ctx, v: dict) -> None:
    lps = v["logprobs"]
    if lps and lps[0][0] != v["token_id"]:
        raise ctx.error("logprobs[0].token_id", f"must be the result's token_id {v['token_id']}, got {lps[0][0]}")


def _rules_decode(ctx: _Ctx, v: dict) -> None:
    _check_stage_index(ctx, v)
    if v["token_id"] >= 0:
        if v["tensors"]:
            raise ctx.error("tensors", "must be empty when token_id >= 0 (token id xor hidden state)")
        if v["payload_bytes"]:
            raise ctx.error("payload_bytes", "must be 0 when token_id >= 0 (real xor modelled payload)")
    elif not v["tensors"] and not v["payload_bytes"]:
        raise ctx.error("token_id", "is -1 but no tensors nor payload_bytes are given (token id xor hidden state)")
    _check_one_payload(ctx, v)


def _rules_assign(ctx: _Ctx, v: dict) -> None:
    _check_range(ctx, "end", v["start"], v["end"])


def _rules_node_stats(ctx: _Ctx, v: dict) -> None:
    n = len(v["peers"])
    for name in ("bytes_out", "retried", "rtt_us"):
        if name != "bytes_out" and not v[name]:
            continue  # (optional: empty)
        if len(v[name]) != n:
            raise ctx.error(name, f"one count per peer: {n} peers, {len(v[name])} counts")


def _rules_migrate_reserve(ctx: _Ctx, v: dict) -> None:
    _check_stage_index(ctx, v)
    if v["max_context"] < v["context_len"]:
        raise ctx.error("max_context", f"must be >= context_len = {v['context_len']}, got {v['max_context']}")


def _rules_migrate_kv(ctx: _Ctx, v: dict) -> None:
    _check_one_payload(ctx, v)
    if v["count"] and not v["tensors"] and not v["payload_bytes"]:
        raise ctx.error("count", f"is {v['count']} but no tensors nor payload_bytes are given")
    if len(v["tensors"]) > 1:
        raise ctx.error("tensors", f"at most one (the stage's keys and values), got {len(v['tensors'])}")


class _Layout:
    __slots__ = ("cls", "name", "specs", "rules", "has_tensors", "has_payload_bytes")

    def __init__(self, cls: type, specs: dict[str, Any], rules: Any = None) -> None:
        assert tuple(specs) == cls.FIELDS, (cls, tuple(specs))  # type: ignore[attr-defined]
        self.cls = cls
        self.name: str = cls.NAME  # type: ignore[attr-defined]
        self.specs = tuple(specs.items())
        self.rules = rules
        self.has_tensors = "tensors" in specs
        self.has_payload_bytes = "payload_bytes" in specs


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
                "payload_bytes": _PayloadBytes(),
                "temperature": _Float(0.0),
                "top_p": _Float(0.0, 1.0, lo_open=True),
                "seed": _ID,
                "top_k": _I32,
                "min_p": _Float(0.0, 1.0),
                "presence_penalty": _Float(-2.0, 2.0),
                "frequency_penalty": _Float(-2.0, 2.0),
                "repetition_penalty": _Float(0.0, lo_open=True),
                "min_tokens": _I32,
                "stop_token_ids": _Ints(0, I32_MAX),
                "logprobs": _Int(-1, MAX_LOGPROBS),
                "context_ids": _Ints(0, I32_MAX),
                "generated": _I32,
                "priority": _Int(-I32_MAX - 1, I32_MAX),
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
                "payload_bytes": _PayloadBytes(),
            },
            _rules_decode,
        ),
        _Layout(
            Activations,
            {"request_id": _ID, "stage": _I32, "num_tokens": _I32, "sent_at": _F, "tensors": _Tensors(1)},
        ),
        _Layout(
            TokenResult,
            {
                "request_id": _ID,
                "token_id": _I32,
                "context_len": _POS32,
                "finished": _Bool(),
                "sent_at": _F,
                "route": _Route(0),
                "logprobs": _Logprobs(),
            },
            _rules_token_result,
        ),
        _Layout(Heartbeat, {"node_id": _I32, "seq": _ID, "now": _F}),
        _Layout(Cancel, {"request_id": _ID, "reason": _S}),
        _Layout(Error, {"request_id": _Int(-1, I64_MAX), "code": _I32, "text": _S}),
        _Layout(Shutdown, {"reason": _S}),
        _Layout(Feedback, {"request_id": _ID, "node_id": _I32, "delay": _Float(0.0), "sent_at": _F}),
        _Layout(
            NodeStats,
            {
                "node_id": _I32,
                "now": _F,
                "kv_used": _ID,
                "kv_capacity": _ID,
                "queued": _ID,
                "peers": _Ints(-1, I32_MAX),
                "bytes_out": _Ints(0, I64_MAX),
                "bad_frames": _ID,
                "retried": _Ints(0, I64_MAX),
                "rtt_us": _Ints(0, I64_MAX),
                "batches": _ID,
                "busy_s": _Float(0.0),
            },
            _rules_node_stats,
        ),
        _Layout(
            MigrateReserve,
            {
                "request_id": _ID,
                "route": _Route(),
                "stage": _I32,
                "context_len": _POS32,
                "max_context": _POS32,
                "priority": _Int(-I32_MAX - 1, I32_MAX),
                "source": _I32,
                "address": _S,
            },
            _rules_migrate_reserve,
        ),
        _Layout(MigrateStart, {"request_id": _ID, "target": _I32, "address": _S}),
        _Layout(
            MigrateKV,
            {
                "request_id": _ID,
                "first": _I32,
                "count": _I32,
                "final": _Bool(),
                "sent_at": _F,
                "tensors": _Tensors(0),
                "payload_bytes": _PayloadBytes(),
            },
            _rules_migrate_kv,
        ),
        _Layout(
            MigrateStatus,
            {"request_id": _ID, "node_id": _I32, "state": _Int(1, 5), "upto": _Int(-1, I32_MAX), "text": _S},
        ),
        _Layout(MigrateFinish, {"request_id": _ID}),
        _Layout(MigrateAbort, {"request_id": _ID, "reason": _S}),
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
    if lay.has_payload_bytes and values["payload_bytes"]:
        ctx.frames.append(zero_frame(values["payload_bytes"]))
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
        raise ctx.error(_PAYLOAD, "is empty, expected a msgpack array")
    # msgpack refuses multi-byte formats; the cast is a view (C-contiguity was checked)
    rd = _Reader(ctx, pv.cast("B"))
    specs = lay.specs
    count = rd.array_header()
    if count is None:
        raise ctx.error(_PAYLOAD, f"must be a msgpack array, got {_tname(rd.item())}")
    if count != len(specs):
        names = ", ".join(name for name, _ in specs)
        raise ctx.error(_PAYLOAD, f"expected an array of {len(specs)} fields ({names}), got {count}")
    values = {name: spec.read(ctx, rd, name) for name, spec in specs}
    if rd.pos != rd.end:
        raise ctx.error(_PAYLOAD, "trailing bytes after the msgpack array")
    if lay.has_tensors:
        values["tensors"] = _tensors_from_frames(ctx, values["tensors"], values.get("payload_bytes", 0))
    if lay.rules is not None:
        lay.rules(ctx, values)
    return lay.cls(**values)


# --- wire size: the bytes of encode(msg), computed from the field values ------------------------------

_U = _UINT_SIZES
_RS = _ROUTE_SIZES


def _size_fields(lay: _Layout, msg: Any) -> int:
    n = 1 + _array_size(len(lay.specs))  # tag frame, payload's array header
    for name, spec in lay.specs:
        n += spec.size(getattr(msg, name))
    return n


# The hot messages, written out (the simulator sizes every message it moves). Non-negative ints are
# sized by their bit length; a route by the cache (inlined); constants: tag byte, fixarray header,
# float64 fields (9 bytes), the header of an empty tensors array, a bool.


def _size_prompt_work(m: Any) -> int:
    r = m.route
    e = _RS.get(id(r))
    n = e[1] if e is not None and e[0] is r else _route_size(r)
    ids, t, p = m.token_ids, m.tensors, m.payload_bytes
    if ids:
        n += _array_size(len(ids)) + sum(map(_int_size, ids)) - 1
    if t:
        n += _tensors_size(t) - 1
    ids = m.stop_token_ids
    if ids:
        n += _array_size(len(ids)) + sum(map(_int_size, ids)) - 1
    ids = m.context_ids
    if ids:
        n += _array_size(len(ids)) + sum(map(_int_size, ids)) - 1
    return (
        n
        # tag, array16 header (24 fields), seven float64 fields (sent_at, temperature, top_p, min_p,
        # the presence and frequency penalties, repetition_penalty), one byte each for the empty
        # token_ids, tensors, stop_token_ids and context_ids arrays and logprobs (-1..20)
        + 72
        + _U[m.request_id.bit_length()]
        + _U[m.query_id.bit_length()]
        + _U[m.stage.bit_length()]
        + _U[m.num_tokens.bit_length()]
        + _U[m.max_tokens.bit_length()]
        + _U[p.bit_length()]
        + _U[m.seed.bit_length()]
        + _U[m.top_k.bit_length()]
        + _U[m.min_tokens.bit_length()]
        + _U[m.generated.bit_length()]
        + _int_size(m.priority)
        + p
    )


def _size_decode_work(m: Any) -> int:
    r = m.route
    e = _RS.get(id(r))
    n = e[1] if e is not None and e[0] is r else _route_size(r)
    tok, t, p = m.token_id, m.tensors, m.payload_bytes
    if t:
        n += _tensors_size(t) - 1
    return (
        n
        + 12
        + _U[m.request_id.bit_length()]
        + _U[m.stage.bit_length()]
        + _U[m.context_len.bit_length()]
        + (_U[tok.bit_length()] if tok >= 0 else _int_size(tok))
        + _U[p.bit_length()]
        + p
    )


def _size_token_result(m: Any) -> int:
    r = m.route
    e = _RS.get(id(r))
    n = e[1] if e is not None and e[0] is r else _route_size(r)
    lps = m.logprobs
    if lps:
        n += _array_size(len(lps)) + sum(10 + _int_size(tok) for tok, _ in lps) - 1
    return n + 13 + _U[m.request_id.bit_length()] + _U[m.token_id.bit_length()] + _U[m.context_len.bit_length()]


def _size_feedback(m: Any) -> int:
    return 20 + _U[m.request_id.bit_length()] + _U[m.node_id.bit_length()]


def _size_activations(m: Any) -> int:
    return (
        11
        + _U[m.request_id.bit_length()]
        + _U[m.stage.bit_length()]
        + _U[m.num_tokens.bit_length()]
        + _tensors_size(m.tensors)
    )


_SIZERS: dict[type, Any] = {
    PromptWork: _size_prompt_work,
    DecodeWork: _size_decode_work,
    TokenResult: _size_token_result,
    Feedback: _size_feedback,
    Activations: _size_activations,
}
for _lay in LAYOUTS.values():
    _SIZERS.setdefault(_lay.cls, functools.partial(_size_fields, _lay))
del _lay


def wire_size(msg: Message) -> int:
    """Bytes ``encode(msg)`` produces, summed over its frames (each frame's byte length: the tag
    byte, the msgpack payload, tensor frames, the modelled payload's ``payload_bytes``), computed
    from the field values without encoding (no allocation for messages without tensors).

    Exact for every message ``encode`` accepts. It does not validate: for a message ``encode``
    refuses it returns some size, or raises the ``CodecError`` that ``encode`` raises (when the
    sizing itself fails, on a non-message or a value of the wrong type, it reruns ``encode``).
    """
    try:
        return _SIZERS[type(msg)](msg)
    except Exception:
        pass
    return sum(memoryview(f).nbytes for f in encode(msg))


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
    "wire_size",
    "zero_frame",
]
