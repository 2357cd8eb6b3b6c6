"""Message codec: compiled vs pure Python vs plain msgpack of an equivalent dict, in one run.

Run: ``python bench/bench_codec.py`` (needs the compiled build: ``pip install -e .``).

Every decode step of every request crosses each hop of its route as one message, so the codec
runs (stages + 1) times per generated token. The baseline is what one would write without a
codec: ``msgpack.packb`` of a dict keyed by field names plus a separate tag frame, and
``msgpack.unpackb`` back to a dict (no validation, no message object). Activation messages are
timed at 16 KiB x 32 tokens and 16 KiB x 1024 tokens (float16, hidden 8192): with zero-copy
tensor frames the time does not grow with the payload; a ``bytes()`` copy of the payload is
shown for scale. Then ``wire_size`` (the bytes a message takes on the wire, computed without
encoding: the simulator's network charges it for every message) against ``encode``, for routes of
1, 6 and 24 stages and modelled payloads (``payload_bytes``, no tensors). Last, hostile payloads of the largest frame (64 MiB: 16 M tiny maps where a
handful of fields belong) are timed to their ``CodecError``, with the bytes allocated meanwhile.
"""

from __future__ import annotations

import struct
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
from _harness import ns_per_op, table  # noqa: E402

from helix_async.codec import (  # noqa: E402
    CodecError,
    decode_c,
    decode_py,
    encode_c,
    encode_py,
    wire_size_c,
    wire_size_py,
)
from helix_async.messages import Activations, DecodeWork, Feedback, PromptWork, TokenResult  # noqa: E402

ROUTE1 = ((3, 0, 80),)
ROUTE6 = ((3, 0, 14), (7, 14, 27), (12, 27, 40), (15, 40, 53), (18, 53, 66), (21, 66, 80))
ROUTE24 = tuple((i, 3 * i + (i > 0) * 8, 3 * i + 11) for i in range(24))  # 80 layers: 11, then 3 each


def _as_dict(msg) -> dict:
    return {name: getattr(msg, name) for name in msg.FIELDS}


def _roundtrip(enc, dec, msg):
    def run() -> None:
        dec(enc(msg))

    return run


def _dict_roundtrip(msg):
    d = _as_dict(msg)
    tag = bytes([msg.TAG])
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def run() -> None:
        frames = [tag, packb(d, use_bin_type=True)]
        unpackb(frames[1])

    return run


def main() -> int:
    if encode_c is None or decode_c is None:
        print("compiled extension not built (HELIX_NO_EXTENSIONS=1?); nothing to compare", file=sys.stderr)
        return 1

    hidden1 = np.random.default_rng(0).standard_normal((1, 8192)).astype(np.float16)
    cases = {
        "decode_work, 6-stage route, token": DecodeWork(
            request_id=48213, route=ROUTE6, stage=0, context_len=1523, token_id=29871, sent_at=1234.5678
        ),
        "decode_work, 6-stage route, 16 KiB hidden": DecodeWork(
            request_id=48213, route=ROUTE6, stage=3, context_len=1523, token_id=-1, sent_at=1234.5678, tensors=(hidden1,)
        ),
        "token_result": TokenResult(request_id=48213, token_id=29871, context_len=1523, finished=False, sent_at=1234.5678),
        "prompt_work, 512 token ids": PromptWork(
            request_id=48213,
            query_id=912,
            route=ROUTE6,
            stage=0,
            num_tokens=512,
            token_ids=tuple(range(1000, 1512)),
            max_tokens=256,
            sent_at=1234.5678,
        ),
    }

    rows = []
    for label, msg in cases.items():
        assert decode_c(encode_c(msg)) == msg == decode_py(encode_py(msg))
        fc, fp = encode_c(msg), encode_py(msg)
        assert [bytes(f) for f in fc] == [bytes(f) for f in fp]
        rt_c = ns_per_op(_roundtrip(encode_c, decode_c, msg), 1)
        rt_p = ns_per_op(_roundtrip(encode_py, decode_py, msg), 1)
        enc_c = ns_per_op(lambda msg=msg: encode_c(msg), 1)
        dec_c = ns_per_op(lambda fc=fc: decode_c(fc), 1)
        if getattr(msg, "tensors", ()):
            base, ratio = "-", "-"
        else:
            b = ns_per_op(_dict_roundtrip(msg), 1)
            base, ratio = f"{b:.0f}", f"{b / rt_c:.1f}x"
        rows.append(
            (label, f"{len(fc[1])}", f"{enc_c:.0f}", f"{dec_c:.0f}", f"{rt_c:.0f}", f"{rt_p:.0f}", f"{rt_p / rt_c:.1f}x", base, ratio)
        )
    print("pack + unpack, ns/op (best of 5 rounds)\n")
    print(
        table(
            rows,
            (
                "message",
                "payload B",
                "C encode",
                "C decode",
                "C enc+dec",
                "Py enc+dec",
                "C vs Py",
                "msgpack dict",
                "C vs dict",
            ),
        )
    )

    print("\nactivations (float16, hidden 8192 = 16 KiB per token), ns/op\n")
    rows = []
    for tokens in (32, 1024):
        h = np.random.default_rng(1).standard_normal((tokens, 8192)).astype(np.float16)
        msg = Activations(request_id=48213, stage=2, num_tokens=tokens, sent_at=1234.5678, tensors=(h,))
        fc = encode_c(msg)
        received = [fc[0], fc[1], bytearray(fc[2])]  # as a transport would hand them over
        back = decode_c(received)
        shares_enc = np.shares_memory(np.frombuffer(fc[2], np.uint8), h)
        shares_dec = np.shares_memory(back.tensors[0], np.frombuffer(received[2], np.uint8))
        assert shares_enc and shares_dec and back == msg
        enc_c = ns_per_op(lambda msg=msg: encode_c(msg), 1)
        dec_c = ns_per_op(lambda r=received: decode_c(r), 1)
        enc_p = ns_per_op(lambda msg=msg: encode_py(msg), 1)
        dec_p = ns_per_op(lambda r=received: decode_py(r), 1)
        copy = ns_per_op(lambda h=h: bytes(memoryview(h)), 1, repeat=3, min_time=0.1)
        rows.append(
            (
                f"{tokens} tokens ({h.nbytes >> 10} KiB)",
                f"{enc_c:.0f}",
                f"{dec_c:.0f}",
                f"{enc_p:.0f}",
                f"{dec_p:.0f}",
                f"{copy:.0f}",
                f"{shares_enc}/{shares_dec}",
            )
        )
    print(
        table(
            rows,
            ("payload", "C encode", "C decode", "Py encode", "Py decode", "bytes() copy", "shares memory enc/dec"),
        )
    )

    print("\nwire_size vs encode, ns/op (messages of the simulator: no tensors; one with a tensor)\n")
    print(table(_wire_size_rows(hidden1), ("message", "wire B", "C wire_size", "Py wire_size", "C encode", "Py encode")))

    print("\nhostile 64 MiB payloads, time to CodecError (ns) and peak bytes allocated meanwhile\n")
    n = (64 << 20) // 3 - 2  # one-entry maps {"": 0} of 3 bytes each: a 64 MiB frame
    maps = b"\xdd" + struct.pack(">I", n) + b"\x81\xa0\x00" * n
    hostile = {
        "token_result: 16 M maps for 5 fields": [b"\x06", maps],
        "prompt_work: token_ids of 16 M maps": [
            b"\x03",
            b"\x9a\x01\x02\x91\x93\x01\x00\x04\x00\xce" + struct.pack(">I", n) + maps,
        ],
    }
    rows = []
    for name, frames in hostile.items():
        cells = [name, f"{len(frames[1])}"]
        for dec in (decode_c, decode_py):
            cells.append(f"{ns_per_op(lambda d=dec, f=frames: _rejects(d, f), 1, repeat=3, min_time=0.05):.0f}")
            tracemalloc.start()
            _rejects(dec, frames)
            cells.append(f"{tracemalloc.get_traced_memory()[1]}")
            tracemalloc.stop()
        rows.append(tuple(cells))
    print(table(rows, ("payload", "bytes", "C decode", "C peak B", "Py decode", "Py peak B")))
    return 0


def _wire_size_rows(hidden1) -> list[tuple[str, ...]]:
    assert wire_size_c is not None
    hop = 16384  # one token's hidden state, float16 x 8192
    cases = {
        "decode_work, 1-stage route, token": DecodeWork(
            request_id=48213, route=ROUTE1, stage=0, context_len=1523, token_id=29871, sent_at=1234.5678
        ),
        "decode_work, 6-stage route, modelled 16 KiB": DecodeWork(
            request_id=48213, route=ROUTE6, stage=3, context_len=1523, token_id=-1, sent_at=1234.5678, payload_bytes=hop
        ),
        "decode_work, 24-stage route, modelled 16 KiB": DecodeWork(
            request_id=48213, route=ROUTE24, stage=9, context_len=1523, token_id=-1, sent_at=1234.5678, payload_bytes=hop
        ),
        "prompt_work, 6-stage route, modelled 512 tokens": PromptWork(
            request_id=48213,
            query_id=912,
            route=ROUTE6,
            stage=2,
            num_tokens=512,
            token_ids=(),
            max_tokens=256,
            sent_at=1234.5678,
            payload_bytes=512 * hop,
        ),
        "token_result, 6-stage route": TokenResult(
            request_id=48213, token_id=29871, context_len=1523, finished=False, sent_at=1234.5678, route=ROUTE6
        ),
        "feedback": Feedback(request_id=48213, node_id=7, delay=0.0123, sent_at=1234.5678),
        "decode_work, 6-stage route, 16 KiB hidden": DecodeWork(
            request_id=48213, route=ROUTE6, stage=3, context_len=1523, token_id=-1, sent_at=1234.5678, tensors=(hidden1,)
        ),
    }
    rows = []
    for label, msg in cases.items():
        size = sum(memoryview(f).nbytes for f in encode_c(msg))
        assert wire_size_c(msg) == wire_size_py(msg) == size == sum(memoryview(f).nbytes for f in encode_py(msg))
        cells = [label, f"{size}"]
        for fn in (wire_size_c, wire_size_py, encode_c, encode_py):
            cells.append(f"{ns_per_op(lambda fn=fn, msg=msg: fn(msg), 1):.0f}")
        rows.append(tuple(cells))
    return rows


def _rejects(dec, frames) -> None:
    try:
        dec(frames)
    except CodecError:
        return
    raise AssertionError("a hostile payload decoded")


if __name__ == "__main__":
    raise SystemExit(main())
