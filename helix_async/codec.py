"""Import site of the message codec (compiled unless HELIX_NO_EXTENSIONS=1).

``encode(msg) -> frames`` and ``decode(frames) -> msg`` (frame 0: one tag byte, frame 1: msgpack
array of the fields, frames 2..: raw tensor buffers, or the zero bytes of a modelled payload; the
layout is specified in ``helix_async._codec_py``). ``encode_py``/``decode_py`` are the pure-Python
specification, ``encode_c``/``decode_c`` the compiled twins (None in a pure build),
``encode``/``decode`` the ones the rest of the package uses. All raise ``CodecError`` (a
``HelixError`` and ``ValueError``), and ``decode`` nothing else, whatever the frames hold.

``wire_size(msg) -> int`` is the number of bytes ``encode(msg)`` produces (the sum of its frames'
byte lengths) without encoding: what the simulator's network charges per message. It is exact for
every message that encodes and does not validate (see ``_codec_py.wire_size``); ``wire_size_py``
and ``wire_size_c`` are its twins (the compiled one hands what its fast path does not take, cold
message types and invalid messages, to the pure one, so both give the same answers).

Malformed input from the network is not fatal: a receiver drops the message and counts it with
``decode_or_drop(frames, counter)``, which returns None for a dropped message and records the
reason (message type and field, ``CodecError.key``) in a ``DropCounter``; the runtime reports the
counter (and may answer with ``Error(code=ErrorCode.BAD_MESSAGE)`` when it knows the sender).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import _ext
from ._codec_py import DEFAULT_LIMITS, DTYPES, CodecError, Limits
from ._codec_py import decode as decode_py
from ._codec_py import encode as encode_py
from ._codec_py import wire_size as wire_size_py
from .messages import Message

_mod = _ext.load("_codec")
encode_c: Callable[..., list] | None = None if _mod is None else _mod.encode
decode_c: Callable[..., Message] | None = None if _mod is None else _mod.decode
encode: Callable[..., list] = encode_py if encode_c is None else encode_c
decode: Callable[..., Message] = decode_py if decode_c is None else decode_c
wire_size_c: Callable[[Message], int] | None = None if _mod is None else _mod.wire_size
wire_size: Callable[[Message], int] = wire_size_py if wire_size_c is None else wire_size_c
COMPILED: bool = _mod is not None


@dataclass
class DropCounter:
    """Counts of dropped (undecodable) messages: ``total`` and per ``CodecError.key``
    ("decode_work.route", "?.frame 0", ...); ``last`` is the most recent error, for logs."""

    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    last: CodecError | None = None

    def record(self, err: CodecError) -> None:
        self.total += 1
        self.by_reason[err.key] = self.by_reason.get(err.key, 0) + 1
        self.last = err


def decode_or_drop(frames: list | tuple, counter: DropCounter, limits: Limits | None = None) -> Message | None:
    """``decode(frames)``, or None after recording the CodecError in ``counter``."""
    try:
        return decode(frames, limits)
    except CodecError as err:
        counter.record(err)
        return None


__all__ = [
    "COMPILED",
    "DEFAULT_LIMITS",
    "DTYPES",
    "CodecError",
    "DropCounter",
    "Limits",
    "decode",
    "decode_c",
    "decode_or_drop",
    "decode_py",
    "encode",
    "encode_c",
    "encode_py",
    "wire_size",
    "wire_size_c",
    "wire_size_py",
]
