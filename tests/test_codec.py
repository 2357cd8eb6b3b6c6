"""Message codec: round trips, the compiled twin against the specification, zero-copy tensors,
and robustness (any input decodes to a valid message or raises CodecError, nothing else)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helix_async import _codec_py, envs
from helix_async.codec import (
    COMPILED,
    DTYPES,
    CodecError,
    DropCounter,
    Limits,
    decode,
    decode_c,
    decode_or_drop,
    decode_py,
    encode,
    encode_c,
    encode_py,
    wire_size,
    wire_size_c,
    wire_size_py,
)
from helix_async.errors import HelixError
from helix_async.ids import SINK, SOURCE
from helix_async.messages import (
    MESSAGE_TYPES,
    Activations,
    AssignLayers,
    Cancel,
    DecodeWork,
    Error,
    ErrorCode,
    Feedback,
    Heartbeat,
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
)

I32 = 2**31 - 1
I64 = 2**63 - 1

if COMPILED:
    from helix_async._ext import _codec as _cmod

    encode_strict = _cmod._encode_strict
    decode_strict = _cmod._decode_strict
    wire_size_strict = _cmod._wire_size_strict

IMPLS = [pytest.param((encode_py, decode_py), id="py")]
if encode_c is not None:
    IMPLS.append(pytest.param((encode_c, decode_c), id="c"))

needs_c = pytest.mark.skipif(not COMPILED, reason="pure-Python build (HELIX_NO_EXTENSIONS=1)")

ROUTE6 = ((1, 0, 14), (5, 14, 27), (7, 27, 40), (9, 40, 53), (11, 53, 66), (13, 66, 80))
DTYPES_BY_NP = {dt: name for name, dt in DTYPES.items()}


def test_import_site_picks_compiled_unless_disabled() -> None:
    if envs.HELIX_NO_EXTENSIONS:
        assert not COMPILED and encode is encode_py and decode is decode_py and encode_c is None
    else:
        assert COMPILED and encode is encode_c and decode is decode_c


def test_codec_error_is_a_helix_value_error() -> None:
    assert issubclass(CodecError, HelixError) and issubclass(CodecError, ValueError)
    e = CodecError("decode_work", "route[2].end", "must be > start")
    assert str(e) == "decode_work: route[2].end: must be > start" and e.key == "decode_work.route"
    assert CodecError("?", "frame 0 (tag)", "x").key == "?.frame 0"


#: The wire layout of every message type, written out by hand from the specification (the table
#: in helix_async/_codec_py.py's docstring): tag byte -> (name, fields in payload order). A change
#: here is a change of the wire format.
WIRE_LAYOUTS = {
    1: ("register", ("node_id", "name", "machine_type", "address", "num_gpus", "gpu_memory_bytes", "capabilities")),
    2: ("assign_layers", ("node_id", "model", "start", "end", "plan_id", "next_hops", "prev_nodes")),
    3: (
        "prompt_work",
        (
            "request_id",
            "query_id",
            "route",
            "stage",
            "num_tokens",
            "token_ids",
            "max_tokens",
            "sent_at",
            "tensors",
            "payload_bytes",
            "temperature",
            "top_p",
            "seed",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "min_tokens",
            "stop_token_ids",
            "logprobs",
            "context_ids",
            "generated",
            "priority",
        ),
    ),
    4: ("decode_work", ("request_id", "route", "stage", "context_len", "token_id", "sent_at", "tensors", "payload_bytes")),
    5: ("activations", ("request_id", "stage", "num_tokens", "sent_at", "tensors")),
    6: ("token_result", ("request_id", "token_id", "context_len", "finished", "sent_at", "route", "logprobs")),
    7: ("heartbeat", ("node_id", "seq", "now")),
    8: ("cancel", ("request_id", "reason")),
    9: ("error", ("request_id", "code", "text")),
    10: ("shutdown", ("reason",)),
    11: ("feedback", ("request_id", "node_id", "delay", "sent_at")),
    12: ("node_stats", ("node_id", "now", "kv_used", "kv_capacity", "queued", "peers", "bytes_out", "bad_frames",
                        "retried", "rtt_us", "batches", "busy_s")),
    13: ("migrate_reserve", ("request_id", "route", "stage", "context_len", "max_context", "priority", "source",
                         "address")),
    14: ("migrate_start", ("request_id", "target", "address")),
    15: ("migrate_kv", ("request_id", "first", "count", "final", "sent_at", "tensors", "payload_bytes")),
    16: ("migrate_status", ("request_id", "node_id", "state", "upto", "text")),
    17: ("migrate_finish", ("request_id",)),
    18: ("migrate_abort", ("request_id", "reason")),
}


def test_every_type_has_the_specified_layout() -> None:
    assert {int(t): (cls.NAME, cls.FIELDS) for t, cls in MESSAGE_TYPES.items()} == WIRE_LAYOUTS
    for tag, cls in MESSAGE_TYPES.items():
        assert cls.TAG == tag and MsgType(tag).name.lower() == cls.NAME
        assert not hasattr(cls(**_minimal_kwargs(cls)), "__dict__")  # slotted


def _as_wire(name: str, value: object) -> object:
    """What msgpack.unpackb gives back for a message's field value (tuples as lists, tensors as
    [dtype, shape] descriptors)."""
    if name == "tensors":
        return [[DTYPES_BY_NP[t.dtype], list(t.shape)] for t in value]  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        return [_as_wire("", v) for v in value]
    return value


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", [n for n, _ in WIRE_LAYOUTS.values()])
def test_payload_holds_each_field_at_its_specified_position(impl, name) -> None:
    enc, _ = impl
    tag = next(t for t, (n, _) in WIRE_LAYOUTS.items() if n == name)
    fields = WIRE_LAYOUTS[tag][1]

    @settings(max_examples=40)
    @given(STRATEGIES[name])
    def check(msg) -> None:
        frames = enc(msg)
        assert bytes(frames[0]) == bytes([tag])
        payload = msgpack.unpackb(frames[1], raw=False)
        assert [_as_wire(f, getattr(msg, f)) for f in fields] == payload

    check()


# --- strategies ------------------------------------------------------------------------------------

_INT_EDGES = [0, 1, 31, 32, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, I32, I64]


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in _INT_EDGES + [lo, hi] if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


ids = ints(0, I64)
i32 = ints(0, I32)
pos32 = ints(1, I32)
floats = st.floats(allow_nan=False, allow_infinity=False)
#: modelled payload sizes (encode writes that many zero bytes: kept small enough to copy in tests)
payload_sizes = ints(1, 1 << 18)
texts = st.text(max_size=40) | st.sampled_from(["", "x" * 31, "y" * 32, "z" * 255, "w" * 256, "é" * 70000])


@st.composite
def routes(draw, max_len: int = 64) -> tuple:
    n = draw(st.integers(1, 8) | st.integers(1, max_len))
    start = draw(st.integers(0, 200))
    out = []
    for _ in range(n):
        end = start + draw(st.integers(1, 300))
        out.append((draw(ints(0, I32)), start, end))
        start = end
    return tuple(out)


@st.composite
def tensors(draw, min_count: int = 0, max_count: int = 3) -> tuple:
    out = []
    for _ in range(draw(st.integers(min_count, max_count))):
        dt = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        n = dt.itemsize * math.prod(shape)
        data = draw(st.binary(min_size=n, max_size=n))
        out.append(np.frombuffer(bytearray(data), dtype=dt).reshape(shape))
    return tuple(out)


@st.composite
def prompt_work(draw) -> PromptWork:
    route = draw(routes())
    carries = draw(st.sampled_from(["ids", "tensors", "modelled"]))  # exactly one of the three
    ids_ = tuple(draw(st.lists(ints(0, I32), min_size=1, max_size=40))) if carries == "ids" else ()
    n = len(ids_) if ids_ else draw(st.integers(1, 40) | pos32)
    # context ids only without token ids, and then exactly num_tokens of them
    context = tuple(draw(st.lists(ints(0, I32), min_size=n, max_size=n))) if not ids_ and n <= 40 and draw(st.booleans()) else ()
    return PromptWork(
        request_id=draw(ids),
        query_id=draw(ids),
        route=route,
        stage=draw(st.integers(0, len(route) - 1)),
        num_tokens=n,
        token_ids=ids_,
        max_tokens=draw(pos32),
        sent_at=draw(floats),
        tensors=draw(tensors(min_count=1)) if carries == "tensors" else (),
        payload_bytes=draw(payload_sizes) if carries == "modelled" else 0,
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0, 2.5])),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.5, 1e-3])),
        seed=draw(ids),
        top_k=draw(st.sampled_from([0, 1, 40]) | i32),
        min_p=draw(st.sampled_from([0.0, 0.05, 1.0, -0.0]) | st.floats(0.0, 1.0)),
        presence_penalty=draw(st.sampled_from([0.0, -2.0, 2.0, 0.5]) | st.floats(-2.0, 2.0)),
        frequency_penalty=draw(st.sampled_from([0.0, -2.0, 2.0, -0.3]) | st.floats(-2.0, 2.0)),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.7, 5e-324]) | st.floats(min_value=0.0, exclude_min=True,
                                                                                       allow_infinity=False)),
        min_tokens=draw(st.sampled_from([0, 5]) | i32),
        stop_token_ids=tuple(draw(st.lists(ints(0, I32), max_size=20))),
        logprobs=draw(st.integers(-1, 20)),
        context_ids=context,
        generated=draw(st.integers(0, n - 1)),
        priority=draw(st.sampled_from([0, -1, 5]) | st.integers(-(2**31), 2**31 - 1)),
    )


@st.composite
def decode_work(draw) -> DecodeWork:
    route = draw(routes())
    carries = draw(st.sampled_from(["token", "tensors", "modelled"]))
    return DecodeWork(
        request_id=draw(ids),
        route=route,
        stage=draw(st.integers(0, len(route) - 1)),
        context_len=draw(pos32),
        token_id=draw(i32) if carries == "token" else -1,
        sent_at=draw(floats),
        tensors=draw(tensors(min_count=1)) if carries == "tensors" else (),
        payload_bytes=draw(payload_sizes) if carries == "modelled" else 0,
    )


activations = st.builds(
    Activations, request_id=ids, stage=i32, num_tokens=i32, sent_at=floats, tensors=tensors(min_count=1)
)
logprob = st.sampled_from([0.0, -0.0, -1e-300, -5e-324, -1e300]) | st.floats(max_value=0.0, allow_infinity=False)


@st.composite
def token_results(draw) -> TokenResult:
    tok = draw(i32)
    k = draw(st.sampled_from([-1, 0, 1, 5, 20]))  # -1: no logprobs asked for
    lps = () if k < 0 else ((tok, draw(logprob)), *((draw(i32), draw(logprob)) for _ in range(k)))
    return TokenResult(request_id=draw(ids), token_id=tok, context_len=draw(pos32), finished=draw(st.booleans()),
                       sent_at=draw(floats), route=draw(st.just(()) | routes()), logprobs=lps)


token_result = token_results()
feedback = st.builds(
    Feedback, request_id=ids, node_id=i32, delay=st.floats(min_value=0.0, allow_infinity=False), sent_at=floats
)


@st.composite
def node_stats(draw) -> NodeStats:
    peers = draw(st.lists(st.integers(-1, 2**31 - 1), max_size=6).map(tuple))
    counts = draw(st.lists(ids, min_size=len(peers), max_size=len(peers)).map(tuple))
    per_peer = st.lists(ids, min_size=len(peers), max_size=len(peers)).map(tuple)
    return NodeStats(node_id=draw(i32), now=draw(floats), kv_used=draw(ids), kv_capacity=draw(ids), queued=draw(ids),
                     peers=peers, bytes_out=counts, bad_frames=draw(ids), retried=draw(st.just(()) | per_peer),
                     rtt_us=draw(st.just(()) | per_peer), batches=draw(ids),
                     busy_s=draw(st.floats(0.0, 1e12, allow_nan=False)))


@st.composite
def assign_layers(draw) -> AssignLayers:
    start = draw(st.integers(0, 100))
    peers = draw(
        st.lists(st.tuples(i32, texts, st.integers(0, 50), st.integers(1, 50)).map(lambda p: (p[0], p[1], p[2], p[2] + p[3])))
    )
    return AssignLayers(
        node_id=draw(i32),
        model=draw(texts),
        start=start,
        end=start + draw(st.integers(1, 100)),
        plan_id=draw(ids),
        next_hops=tuple(peers),
        prev_nodes=tuple(draw(st.lists(i32, max_size=10))),
    )


register = st.builds(
    Register,
    node_id=ints(-1, I32),
    name=texts,
    machine_type=texts,
    address=texts,
    num_gpus=i32,
    gpu_memory_bytes=ids,
    capabilities=st.lists(texts, max_size=5).map(tuple),
)
heartbeat = st.builds(Heartbeat, node_id=i32, seq=ids, now=floats)
cancel = st.builds(Cancel, request_id=ids, reason=texts)
error = st.builds(Error, request_id=ints(-1, I64), code=i32, text=texts)
shutdown = st.builds(Shutdown, reason=texts)

@st.composite
def migrate_reserves(draw) -> MigrateReserve:
    route = draw(routes())
    ctx = draw(pos32)
    return MigrateReserve(request_id=draw(ids), route=route, stage=draw(st.integers(0, len(route) - 1)),
                          context_len=ctx, max_context=draw(st.integers(ctx, I32)),
                          priority=draw(ints(-(2**31), I32)), source=draw(i32), address=draw(texts))


@st.composite
def migrate_kvs(draw) -> MigrateKV:
    kind = draw(st.sampled_from(["tensor", "modelled", "empty"]))
    count = 0 if kind == "empty" else draw(st.integers(1, 1000))
    return MigrateKV(request_id=draw(ids), first=draw(i32), count=count, final=draw(st.booleans()),
                     sent_at=draw(floats), tensors=draw(tensors(min_count=1, max_count=1)) if kind == "tensor" else (),
                     payload_bytes=draw(st.integers(1, 1 << 20)) if kind == "modelled" else 0)


migrate_start = st.builds(MigrateStart, request_id=ids, target=i32, address=texts)
migrate_status = st.builds(MigrateStatus, request_id=ids, node_id=i32, state=st.integers(1, 5), upto=ints(-1, I32),
                           text=texts)
migrate_finish = st.builds(MigrateFinish, request_id=ids)
migrate_abort = st.builds(MigrateAbort, request_id=ids, reason=texts)

STRATEGIES = {
    "migrate_reserve": migrate_reserves(),
    "migrate_start": migrate_start,
    "migrate_kv": migrate_kvs(),
    "migrate_status": migrate_status,
    "migrate_finish": migrate_finish,
    "migrate_abort": migrate_abort,
    "register": register,
    "assign_layers": assign_layers(),
    "prompt_work": prompt_work(),
    "decode_work": decode_work(),
    "activations": activations,
    "token_result": token_result,
    "heartbeat": heartbeat,
    "cancel": cancel,
    "error": error,
    "shutdown": shutdown,
    "feedback": feedback,
    "node_stats": node_stats(),
}
HOT = ["prompt_work", "decode_work", "activations", "token_result", "feedback"]
any_message = st.one_of(*STRATEGIES.values())


def _minimal_kwargs(cls: type) -> dict:
    return {
        Register: dict(node_id=0, name="n", machine_type="A100", address="tcp://a:1", num_gpus=1, gpu_memory_bytes=1),
        AssignLayers: dict(node_id=1, model="m", start=0, end=2, plan_id=0, next_hops=()),
        PromptWork: dict(request_id=0, query_id=0, route=((1, 0, 2),), stage=0, num_tokens=1, token_ids=(5,), max_tokens=1, sent_at=0.0),
        DecodeWork: dict(request_id=0, route=((1, 0, 2),), stage=0, context_len=2, token_id=5, sent_at=0.0),
        Activations: dict(request_id=0, stage=0, num_tokens=1, sent_at=0.0, tensors=(np.zeros(2, np.float16),)),
        TokenResult: dict(request_id=0, token_id=1, context_len=1, finished=False, sent_at=0.0),
        Heartbeat: dict(node_id=0, seq=0, now=0.0),
        Cancel: dict(request_id=0),
        Error: dict(request_id=-1, code=ErrorCode.INTERNAL, text="t"),
        Shutdown: dict(),
        Feedback: dict(request_id=0, node_id=1, delay=0.0, sent_at=0.0),
        NodeStats: dict(node_id=0, now=0.0, kv_used=0, kv_capacity=1, queued=0),
        MigrateReserve: dict(request_id=0, route=((1, 0, 2),), stage=0, context_len=1, max_context=1, priority=0,
                             source=2),
        MigrateStart: dict(request_id=0, target=1),
        MigrateKV: dict(request_id=0, first=0, count=0, final=True, sent_at=0.0),
        MigrateStatus: dict(request_id=0, node_id=1, state=1),
        MigrateFinish: dict(request_id=0),
        MigrateAbort: dict(request_id=0),
    }[cls]


def _frame_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_round_trip(impl, name) -> None:
    enc, dec = impl

    @settings(max_examples=60)
    @given(STRATEGIES[name])
    def check(msg) -> None:
        frames = enc(msg)
        assert len(frames[0]) == 1 and frames[0][0] == msg.TAG
        back = dec(frames)
        assert type(back) is type(msg) and back == msg
        assert _frame_bytes(enc(back)) == _frame_bytes(frames)
        # frames as bytes (what a network transport delivers) decode the same
        assert dec(_frame_bytes(frames)) == msg

    check()


@pytest.mark.parametrize("impl", IMPLS)
def test_payload_is_the_msgpack_array_of_the_fields(impl) -> None:
    enc, _ = impl
    m = DecodeWork(request_id=300, route=ROUTE6, stage=2, context_len=70000, token_id=5, sent_at=1.5)
    frames = enc(m)
    assert frames[0] == b"\x04"
    assert frames[1] == msgpack.packb([300, ROUTE6, 2, 70000, 5, 1.5, [], 0], use_bin_type=True)
    assert msgpack.unpackb(frames[1]) == [300, [list(s) for s in ROUTE6], 2, 70000, 5, 1.5, [], 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_ints_and_int_subclasses_encode_as_plain_numbers(impl) -> None:
    enc, dec = impl
    m = Error(request_id=-1, code=ErrorCode.OUT_OF_MEMORY, text="kv full")
    assert dec(enc(m)) == m
    t = TokenResult(request_id=2, token_id=3, context_len=4, finished=True, sent_at=7)  # int time is fine
    back = dec(enc(t))
    assert back.sent_at == 7.0 and type(back.sent_at) is float


# --- compiled twin == specification ----------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("name", HOT)
def test_compiled_encoding_is_byte_identical(name) -> None:
    @settings(max_examples=150)
    @given(STRATEGIES[name])
    def check(msg) -> None:
        py, c = encode_py(msg), encode_strict(msg)
        assert _frame_bytes(c) == _frame_bytes(py)
        assert type(c[1]) is bytes and c[0] is py[0]
        a, b = decode_py(py), decode_strict(c)
        assert type(a) is type(b) and a == b == msg

    check()


# junk values for one field: every msgpack type, ints of every width and sign, edge cases
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([-1, -2, -33, -129, -32769, -(2**31) - 1, 2**31, 2**63, 2**64 - 1]),
    st.floats(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(-2, 300), max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2),
    st.just(float("nan")),
    st.just([["float16", [2]]]),
    st.just([["bfloat16", [2]]]),
    st.just([["float16", [2, -1]]]),
    st.just([[1, 0, 5], [2, 5, 9]]),
    st.just([[1, 5, 5]]),
)


def _wire(msg) -> list:
    frames = encode_py(msg)
    return list(msgpack.unpackb(frames[1])), frames


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except CodecError as e:
        return ("err", str(e))


@needs_c
@pytest.mark.parametrize("name", HOT)
def test_compiled_decoder_accepts_exactly_what_the_spec_accepts(name) -> None:
    @settings(max_examples=200)
    @given(STRATEGIES[name], st.data())
    def check(msg, data) -> None:
        values, frames = _wire(msg)
        i = data.draw(st.integers(0, len(values) - 1))
        values[i] = data.draw(_JUNK)
        single = data.draw(st.booleans())
        try:
            payload = msgpack.packb(values, use_bin_type=True, use_single_float=single)
        except OverflowError:  # a float beyond float32's range
            payload = msgpack.packb(values, use_bin_type=True)
        frames = [frames[0], payload, *frames[2:]]
        py = _outcome(decode_py, frames)
        strict = _outcome(decode_strict, frames)
        assert py[0] == strict[0], (py, strict)
        if py[0] == "ok":
            assert py[1] == strict[1]
        assert _outcome(decode_c, frames) == py  # the fallback gives the canonical error

    check()


@needs_c
@pytest.mark.parametrize("name", HOT)
def test_compiled_encoder_rejects_exactly_what_the_spec_rejects(name) -> None:
    fields = MESSAGE_TYPES[MsgType[name.upper()]].FIELDS
    junk = st.one_of(
        _JUNK,
        st.tuples(st.integers(-1, 5), st.integers(-1, 5), st.integers(-1, 5)),
        st.lists(st.integers(0, 5), max_size=3).map(tuple),
        st.just(()),
        st.just((np.zeros(3, np.float16),)),
        st.just((np.zeros((4, 4), np.float32)[:, ::2],)),  # not contiguous
        st.just((np.zeros(2, ">f4"),)),  # big-endian
        st.just(((1, 0, 5), [2, 5, 9])),
        st.just(((1, 0, 5), (2, 6, 9))),  # not contiguous in layers
        st.just(tuple((i, i, i + 1) for i in range(65))),  # too long
        st.just(10**400),
        st.just(np.int64(3)),
        st.just(np.float64(2.5)),
    )

    @settings(max_examples=200)
    @given(STRATEGIES[name], st.sampled_from(fields), junk)
    def check(msg, field, value) -> None:
        bad = dataclasses.replace(msg, **{field: value})
        py = _outcome(encode_py, bad)
        strict = _outcome(encode_strict, bad)
        assert py[0] == strict[0], (py, strict)
        if py[0] == "ok":
            assert _frame_bytes(py[1]) == _frame_bytes(strict[1])
        else:
            assert _outcome(encode_c, bad) == py

    check()


@needs_c
@settings(max_examples=300)
@given(
    st.sampled_from([*sorted(DTYPES), "bool", "bfloat16"]),
    st.lists(st.sampled_from([0, 1, 2, 3, 7, 2**31 - 1, 2**31]), max_size=4),
    st.one_of(st.none(), st.integers(0, 80)),
    st.sampled_from(["bytes", "bytearray", "memoryview", "strided", "str"]),
    st.sampled_from([None, Limits(max_frame_bytes=24)]),
)
def test_compiled_tensor_frame_checks_match_the_spec(dtype, shape, nbytes, kind, limits) -> None:
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 2
    exact = itemsize * math.prod(shape)
    n = exact if nbytes is None and exact <= 80 else (nbytes or 0)
    frame = {
        "bytes": lambda: bytes(n),
        "bytearray": lambda: bytearray(n),
        "memoryview": lambda: memoryview(np.zeros(n, np.uint8)),
        "strided": lambda: np.zeros(2 * n, np.uint8)[::2],
        "str": lambda: "x" * n,
    }[kind]()
    frames = [b"\x05", msgpack.packb([1, 0, 1, 0.0, [[dtype, shape]]]), frame]
    py = _outcome(decode_py, frames, limits)
    strict = _outcome(decode_strict, frames, limits)
    assert py[0] == strict[0], (py, strict)
    if py[0] == "ok":
        assert py[1] == strict[1]
        assert np.shares_memory(py[1].tensors[0], strict[1].tensors[0]) or exact == 0
    assert _outcome(decode_c, frames, limits) == py


def _pack_nc(obj, rng: random.Random) -> bytes:
    """A valid but non-canonical msgpack encoding: wider ints, str8/array16 for short values,
    float32 where exact."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        opts = []
        if obj >= 0:
            for mark, fmt, hi in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16), (0xCE, ">I", 2**32), (0xCF, ">Q", 2**64)):
                if obj < hi:
                    opts.append(bytes([mark]) + struct.pack(fmt, obj))
        for mark, fmt, lo, hi in ((0xD0, ">b", 2**7, 2**7), (0xD1, ">h", 2**15, 2**15), (0xD2, ">i", 2**31, 2**31), (0xD3, ">q", 2**63, 2**63)):
            if -lo <= obj < hi:
                opts.append(bytes([mark]) + struct.pack(fmt, obj))
        opts.append(msgpack.packb(obj))
        return rng.choice(opts)
    if isinstance(obj, float):
        try:
            single = struct.pack(">f", obj)
        except OverflowError:
            single = None
        if single is not None and struct.unpack(">f", single)[0] == obj and rng.random() < 0.5:
            return b"\xca" + single
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        b = obj.encode()
        heads = [b"\xda" + struct.pack(">H", len(b)), b"\xdb" + struct.pack(">I", len(b))]
        if len(b) < 256:
            heads.append(b"\xd9" + struct.pack(">B", len(b)))
        return rng.choice(heads) + b
    if isinstance(obj, (list, tuple)):
        heads = [b"\xdc" + struct.pack(">H", len(obj)), b"\xdd" + struct.pack(">I", len(obj))]
        if len(obj) < 16:
            heads.append(bytes([0x90 | len(obj)]))
        return rng.choice(heads) + b"".join(_pack_nc(x, rng) for x in obj)
    raise TypeError(obj)


@pytest.mark.parametrize("impl", IMPLS)
def test_any_valid_msgpack_encoding_is_accepted(impl) -> None:
    _, dec = impl

    @settings(max_examples=100)
    @given(st.sampled_from(HOT).flatmap(lambda n: STRATEGIES[n]), st.randoms(use_true_random=False))
    def check(msg, rng) -> None:
        values, frames = _wire(msg)
        nc = [frames[0], _pack_nc(values, rng), *frames[2:]]
        assert dec(nc) == msg

    check()


# --- zero copy -------------------------------------------------------------------------------------


def _addr(buf) -> int:
    return np.frombuffer(buf, np.uint8).ctypes.data


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_frames_are_not_copied(impl) -> None:
    enc, dec = impl
    hidden = np.random.default_rng(0).standard_normal((32, 8192)).astype(np.float16)  # 16 KiB x 32 tokens
    m = Activations(request_id=7, stage=2, num_tokens=32, sent_at=3.25, tensors=(hidden,))
    frames = enc(m)
    assert len(frames) == 3 and len(frames[1]) < 64  # the payload holds only the header
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), hidden)
    assert _addr(frames[2]) == hidden.ctypes.data and len(frames[2]) == hidden.nbytes == 16384 * 32
    # in-process delivery: the decoded array is the sender's memory
    back = dec(frames)
    assert back == m and np.shares_memory(back.tensors[0], hidden)
    # received into a writable buffer: the decoded array is a view of it
    buf = bytearray(frames[2])
    back = dec([frames[0], frames[1], buf])
    assert np.shares_memory(back.tensors[0], np.frombuffer(buf, np.uint8))
    assert back.tensors[0].flags.writeable
    buf[0:2] = b"\x00\x3c"  # float16 1.0
    assert back.tensors[0][0, 0] == 1.0
    # received as bytes: a read-only view of those bytes
    raw = bytes(frames[2])
    back = dec([frames[0], frames[1], raw])
    assert _addr(raw) == back.tensors[0].ctypes.data and not back.tensors[0].flags.writeable


@pytest.mark.parametrize("impl", IMPLS)
def test_work_messages_carry_hidden_states_zero_copy(impl) -> None:
    enc, dec = impl
    h = np.arange(16, dtype=np.float16).reshape(1, 16)
    m = DecodeWork(request_id=1, route=ROUTE6, stage=3, context_len=9, token_id=-1, sent_at=0.0, tensors=(h,))
    frames = enc(m)
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), h)
    back = dec([bytes(f) for f in frames])
    assert back == m and back.tensors[0].dtype == np.float16 and back.tensors[0].shape == (1, 16)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_zero_dim_tensors(impl) -> None:
    enc, dec = impl
    m = Activations(request_id=1, stage=0, num_tokens=0, sent_at=0.0, tensors=(np.zeros((0, 4), np.float16), np.array(3.5)))
    frames = enc(m)
    assert bytes(frames[2]) == b"" and len(frames[3]) == 8
    back = dec(frames)
    assert back == m and back.tensors[0].shape == (0, 4) and back.tensors[1].shape == ()


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_tensor_is_refused_not_copied(impl) -> None:
    enc, _ = impl
    t = np.zeros((4, 8), np.float16)[:, ::2]
    m = Activations(request_id=1, stage=0, num_tokens=4, sent_at=0.0, tensors=(t,))
    with pytest.raises(CodecError, match=r"activations: tensors\[0\]: is not C-contiguous.*ascontiguousarray"):
        enc(m)
    with pytest.raises(CodecError, match=r"unsupported dtype '>f4'"):
        enc(dataclasses.replace(m, tensors=(np.zeros(3, ">f4"),)))
    with pytest.raises(CodecError, match=r"tensors\[0\]: must be a numpy array"):
        enc(dataclasses.replace(m, tensors=([1.0, 2.0],)))
    # platform aliases of the wire dtypes are the same dtypes
    for t, name in ((np.longlong, "int64"), (np.intc, "int32"), (np.ulonglong, "uint64"), (np.half, "float16")):
        frames = enc(dataclasses.replace(m, tensors=(np.ones(3, t),)))
        assert msgpack.unpackb(frames[1])[4] == [[name, [3]]]
    with pytest.raises(CodecError, match=r"unsupported dtype '\|b1'"):
        enc(dataclasses.replace(m, tensors=(np.ones(3, bool),)))


def test_torch_cpu_tensors_encode_without_copy() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    m = Activations(request_id=1, stage=0, num_tokens=3, sent_at=0.0, tensors=(t,))
    for enc, dec in [(encode_py, decode_py)] + ([(encode_c, decode_c)] if COMPILED else []):
        frames = enc(m)
        assert _addr(frames[2]) == t.data_ptr()
        back = dec(frames)
        assert back == m and np.array_equal(back.tensors[0], t.numpy())
        with pytest.raises(CodecError, match="numpy dtype"):
            enc(dataclasses.replace(m, tensors=(t.to(torch.bfloat16),)))
        with pytest.raises(CodecError, match="not C-contiguous"):
            enc(dataclasses.replace(m, tensors=(t.t(),)))
        g = torch.ones(4, requires_grad=True)  # sent without copying; the graph stays behind
        frames = enc(dataclasses.replace(m, tensors=(g,)))
        assert _addr(frames[2]) == g.data_ptr()
        if torch.cuda.is_available():
            with pytest.raises(CodecError, match="torch CPU tensor"):
                enc(dataclasses.replace(m, tensors=(t.cuda(),)))


# --- robustness ------------------------------------------------------------------------------------


def _decode_outcome(dec, frames):
    try:
        msg = dec(frames)
    except CodecError as e:
        assert str(e)
        return "err"
    assert type(msg) in MESSAGE_TYPES.values()
    assert _frame_bytes(encode_py(msg))  # a decoded message always re-encodes
    return msg


def _all_outcomes(frames) -> None:
    out = [_decode_outcome(decode_py, frames)]
    if COMPILED:
        out.append(_decode_outcome(decode_c, frames))
        try:
            out.append(_decode_outcome(decode_strict, frames))
        except CodecError:
            out.append("err")
    assert all((o == "err") == (out[0] == "err") for o in out), out
    if out[0] != "err":
        assert all(o == out[0] for o in out)


_any_frame = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([bytes([t]) for t in range(12)]),
    st.binary(max_size=40).map(bytearray),
    st.binary(max_size=40).map(memoryview),
    st.sampled_from(["text", None, 3, np.zeros((2, 3), np.float32)[:, ::2], np.zeros(0), [b"x"]]),
)


@settings(max_examples=400)
@given(st.lists(_any_frame, max_size=5) | st.tuples(st.sampled_from([b"\x04", b"\x05", b"\x06", b"\x03"]), st.binary(max_size=60)))
def test_random_frames_raise_only_codec_error(frames) -> None:
    _all_outcomes(frames)


@settings(max_examples=100)
@given(st.one_of(st.none(), st.integers(), st.text(), st.binary(), st.dictionaries(st.integers(), st.binary())))
def test_frames_that_are_not_a_list_raise_codec_error(frames) -> None:
    _all_outcomes(frames)
    with pytest.raises(CodecError, match="frames"):
        decode(frames)


@st.composite
def mutated(draw):
    frames = [bytearray(f) for f in encode_py(draw(any_message))]
    kind = draw(st.sampled_from(["truncate", "flip", "tag", "extend", "swap", "drop", "add", "splice"]))
    fi = draw(st.integers(0, len(frames) - 1))
    f = frames[fi]
    if kind == "truncate" and f:
        del f[draw(st.integers(0, len(f) - 1)) :]
    elif kind == "flip" and f:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(f) - 1))
            f[i] ^= draw(st.integers(1, 255))
    elif kind == "tag":
        frames[0] = bytearray([draw(st.integers(0, 255))])
    elif kind == "extend":
        f += draw(st.binary(min_size=1, max_size=8))
    elif kind == "swap" and len(frames) > 1:
        j = draw(st.integers(0, len(frames) - 1))
        frames[fi], frames[j] = frames[j], frames[fi]
    elif kind == "drop":
        del frames[fi]
    elif kind == "add":
        frames.insert(draw(st.integers(0, len(frames))), bytearray(draw(st.binary(max_size=16))))
    elif kind == "splice" and len(f) > 2:
        i = draw(st.integers(0, len(f) - 1))
        f[i:i] = draw(st.binary(min_size=1, max_size=4))
    return [bytes(x) for x in frames]


@settings(max_examples=500)
@given(mutated())
def test_mutated_encodings_raise_only_codec_error(frames) -> None:
    _all_outcomes(frames)


# --- hostile frames: decoding is bounded by the frame, not by what it declares ------------------------

_N = 1 << 18  # tiny items per hostile payload: materialised, they would take tens of MB
_F64 = b"\xcb" + struct.pack(">d", 0.5)
_I32 = b"\xce" + struct.pack(">I", I32)


def _array32(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)


def _tiny_maps(n: int) -> bytes:
    return _array32(n) + b"\x81\xa0\x00" * n  # an array of n one-entry maps {"": 0}


_ROUTE1 = b"\x91\x93\x01\x00\x04"  # [[1, 0, 4]]
_STR4G = b"\xdb\xff\xff\xff\xff"  # a str32 header declaring 4 GiB
_PAYLOAD = r"frame 1 \(payload\)"
_INCOMPLETE = rf"{_PAYLOAD}: is not valid msgpack \(ValueError: Unpack failed: incomplete input\)"

#: (case, tag, payload, the error): each payload holds hundreds of thousands of items, or declares
#: gigabytes, where the layout allows a handful
_PW_HEADER = b"\xdc\x00\x18"  # prompt_work's 24 fields (array16)

HOSTILE = [
    *[
        (f"{name}: array of tiny maps", tag, _tiny_maps(_N), rf"^{name}: {_PAYLOAD}: expected an array of {len(fields)} fields \(.*\), got {_N}$")
        for tag, (name, fields) in WIRE_LAYOUTS.items()
    ],
    ("top level declares 4G items", 6, b"\xdd\xff\xff\xff\xff", rf"^token_result: {_PAYLOAD}: expected an array of 7 fields \(.*\), got 4294967295$"),
    ("top level is a huge map", 6, b"\xdf" + struct.pack(">I", _N) + b"\x00\x00" * _N, rf"^token_result: {_PAYLOAD}: must be a msgpack array, got dict$"),
    ("first field is a huge array", 6, b"\x97" + _tiny_maps(_N) + b"\x01\x01\xc2" + _F64 + b"\x90\x90", r"^token_result: request_id: must be an int, got tuple$"),
    ("a field is a huge map", 7, b"\x93\xdf" + struct.pack(">I", _N) + b"\x00\x00" * _N + b"\x01" + _F64, r"^heartbeat: node_id: must be an int, got dict$"),
    ("token ids of tiny maps", 3, _PW_HEADER + b"\x01\x02" + _ROUTE1 + b"\x00" + b"\xce" + struct.pack(">I", _N) + _tiny_maps(_N) + b"\x01" + _F64 + b"\x90\x00", r"^prompt_work: token_ids\[0\]: must be an int, got dict$"),
    ("token ids declare 4G items", 3, _PW_HEADER + b"\x01\x02" + _ROUTE1 + b"\x00" + _I32 + b"\xdd\xff\xff\xff\xff" + b"\x00" * 64, rf"^prompt_work: {_INCOMPLETE}$"),
    ("capabilities of tiny maps", 1, b"\x97\x00\xa1n\xa1t\xa1a\x01\x01" + _tiny_maps(_N), r"^register: capabilities\[0\]: must be a str, got dict$"),
    ("next hops of empty arrays", 2, b"\x97\x01\xa1m\x00\x04\x00" + _array32(_N) + b"\x90" * _N + b"\x90", r"^assign_layers: next_hops\[0\]: must have at least 4 items, got 0$"),
    ("prev nodes of empty maps", 2, b"\x97\x01\xa1m\x00\x04\x00\x90" + _array32(_N) + b"\x80" * _N, r"^assign_layers: prev_nodes\[0\]: must be an int, got dict$"),
    ("route of 4G stages", 4, b"\x98\x01\xdd\xff\xff\xff\xff" + b"\x93\x01\x00\x04" * 16, r"^decode_work: route: must have at most 64 items, got 4294967295$"),
    ("tensors of tiny maps", 5, b"\x95\x01\x00\x01" + _F64 + _tiny_maps(_N), r"^activations: tensors: must have at most 8 items, got 262144$"),
    ("a shape of many dims", 5, b"\x95\x01\x00\x01" + _F64 + b"\x91\x92\xa5uint8" + _array32(_N) + b"\x01" * _N, rf"^activations: tensors\[0\]\.shape: must have at most 8 items, got {_N}$"),
    ("deep nesting", 10, b"\x91" * _N + b"\xc0", r"^shutdown: reason: must be a str, got tuple$"),
    ("deep nesting in a route", 4, b"\x98\x01" + b"\x91" * _N + b"\x01", r"^decode_work: route\[0\]: must have at least 3 items, got 1$"),
    ("a str declares 4 GiB", 8, b"\x92\x01" + _STR4G + b"x" * 64, rf"^cancel: {_INCOMPLETE}$"),
    ("a bin declares 4 GiB", 8, b"\x92\x01\xc6\xff\xff\xff\xff" + b"x" * 64, rf"^cancel: {_INCOMPLETE}$"),
    ("an ext declares 4 GiB", 8, b"\x92\x01\xc9\xff\xff\xff\xff\x01" + b"x" * 64, rf"^cancel: {_INCOMPLETE}$"),
    ("one field too few", 6, b"\x96\x01\x02\x03\xc2" + _F64 + b"\x90", rf"^token_result: {_PAYLOAD}: expected an array of 7 fields \(.*\), got 6$"),
    ("one field too many", 6, b"\x98\x01\x02\x03\xc2" + _F64 + b"\x90\x90" + _tiny_maps(_N), rf"^token_result: {_PAYLOAD}: expected an array of 7 fields \(.*\), got 8$"),
    ("a huge field after the last", 6, b"\x97\x01\x02\x03\xc2" + _F64 + b"\x90\x90" + _tiny_maps(_N), rf"^token_result: {_PAYLOAD}: trailing bytes after the msgpack array$"),
    ("a route of tiny maps", 6, b"\x97\x01\x02\x03\xc2" + _F64 + _tiny_maps(_N), r"^token_result: route: must have at most 64 items, got 262144$"),
    ("logprobs of tiny maps", 6, b"\x97\x01\x02\x03\xc2" + _F64 + b"\x90" + _tiny_maps(_N), r"^token_result: logprobs: must have at most 21 items, got 262144$"),
    ("stop ids of tiny maps", 3, _PW_HEADER + b"\x01\x02" + _ROUTE1 + b"\x00\x01\x91\x01\x01" + _F64 + b"\x90\x00" + _F64 * 2 + b"\x00\x00"
     + _F64 * 4 + b"\x00" + _array32(_N) + b"\x80" * _N + b"\xff\x90\x00", r"^prompt_work: stop_token_ids\[0\]: must be an int, got dict$"),
    ("context ids declare 4G items", 3, _PW_HEADER + b"\x01\x02" + _ROUTE1 + b"\x00\x01\x90\x01" + _F64 + b"\x90\x04" + _F64 * 2 + b"\x00\x00"
     + _F64 * 4 + b"\x00\x90\xff\xdd\xff\xff\xff\xff" + b"\x00" * 64, rf"^prompt_work: {_INCOMPLETE}$"),
    ("a modelled payload declares 2**63 bytes", 4, b"\x98\x01" + _ROUTE1 + b"\x00\x02\xff" + _F64 + b"\x90\xcf\x7f" + b"\xff" * 7, r"^decode_work: payload_bytes: is 9223372036854775807 bytes, more than max_frame_bytes=67108864$"),
]

#: What a rejection may allocate (bytes, traced by tracemalloc): the error and its traceback. Any
#: of the payloads above, materialised, takes 30 MB and more.
_DECODE_BOUND = 64 << 10


def _traced_peak(fn) -> tuple[object, int]:
    """(fn()'s result or CodecError, peak bytes allocated while it ran)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            out: object = fn()
        except CodecError as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()


# (decoder, whether it names the error): the compiled fast path alone (strict) only rejects
_DECODERS = [pytest.param(decode_py, True, id="py")]
if COMPILED:
    _DECODERS += [pytest.param(decode_c, True, id="c"), pytest.param(decode_strict, False, id="c-fast-path")]


@pytest.mark.parametrize(("dec", "names_error"), _DECODERS)
@pytest.mark.parametrize(("case", "tag", "payload", "pattern"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_frames_fail_without_materialising_them(dec, names_error, case, tag, payload, pattern) -> None:
    frames = [bytes([tag]), payload]
    _traced_peak(lambda: dec(frames))  # warm up: first-call allocations (caches, interned names)
    err, peak = _traced_peak(lambda: dec(frames))
    assert isinstance(err, CodecError), f"{case}: decoded {err!r}"
    if names_error:
        assert re.match(pattern, str(err)), (case, str(err))
    assert peak < _DECODE_BOUND, f"{case}: {peak} bytes allocated for a {len(payload)}-byte payload"


def test_a_long_valid_payload_still_decodes() -> None:
    # the bounds are the layout's and the frame's, not a size cap: 2**18 token ids decode
    ids_ = tuple(range(_N))
    m = PromptWork(request_id=1, query_id=2, route=((1, 0, 4),), stage=0, num_tokens=_N, token_ids=ids_, max_tokens=1, sent_at=0.5)
    frames = _frame_bytes(encode_py(m))
    assert decode_py(frames) == m
    if COMPILED:
        assert decode_c(frames) == m and decode_strict(frames) == m


# --- specific errors -------------------------------------------------------------------------------

_TR = TokenResult(request_id=1, token_id=2, context_len=3, finished=False, sent_at=0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("frames", "pattern"),
    [
        ([b"\x63", b"\x90"], r"^\?: frame 0 \(tag\): unknown message type tag 99$"),
        ([b"\x00", b"\x90"], r"unknown message type tag 0"),
        ([b"\x06\x00", b"\x90"], r"^\?: frame 0 \(tag\): must be exactly 1 byte, got 2$"),
        ([b"\x06"], r"^\?: frames: expected at least 2 frames"),
        ([b"\x06", b"\x94\x01\x02\x03\xc2"], r"^token_result: frame 1 \(payload\): expected an array of 7 fields \(request_id, token_id, context_len, finished, sent_at, route, logprobs\), got 4$"),
        ([b"\x06", b"\x81\xa1a\x01"], r"token_result: frame 1 \(payload\): must be a msgpack array, got dict"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90\x90\x00"], r"token_result: frame 1 \(payload\): trailing bytes"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0"], r"token_result: frame 1 \(payload\): is not valid msgpack"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00"], r"token_result: frame 1 \(payload\): is not valid msgpack"),
        ([b"\x06", b"\x97\xc3\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90"], r"^token_result: request_id: must be an int, got bool$"),
        ([b"\x06", b"\x97\x01\x02\x03\x01\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90"], r"^token_result: finished: must be a bool, got int$"),
        ([b"\x06", b"\x97\xff\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90"], r"^token_result: request_id: must be >= 0, got -1$"),
        ([b"\x06", b"\x97\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90"], r"request_id: must be <= 9223372036854775807"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\x01\x90"], r"^token_result: sent_at: must be a float, got int$"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\x90"], r"sent_at: must be finite, got nan"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x91\x93\x01\x04\x04"], r"^token_result: route\[0\]: layer range must have start < end, got \[4, 4\)$"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\xc0"], r"^token_result: route: must be a tuple \(msgpack array\), got NoneType$"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90\x91\x92\x02\xcb?\xe0\x00\x00\x00\x00\x00\x00"],
         r"^token_result: logprobs\[0\]\.logprob: must be <= 0 \(a log-probability\), got 0\.5$"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90\x91\x92\x02\x00"],
         r"^token_result: logprobs\[0\]\.logprob: must be a float, got int$"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90\x91\x92\x03\xcb\xbf\xe0\x00\x00\x00\x00\x00\x00"],
         r"^token_result: logprobs\[0\]\.token_id: must be the result's token_id 2, got 3$"),
        ([b"\x06", b"\x97\x01\x02\x03\xc2\xcb?\xe0\x00\x00\x00\x00\x00\x00\x90\x91\x93\x02\x00\x00"],
         r"^token_result: logprobs\[0\]: must have at most 2 items, got 3$"),
        ([b"\x0b", b"\x94\x01\x02\xcb\xbf\xf0\x00\x00\x00\x00\x00\x00\xcb?\xe0\x00\x00\x00\x00\x00\x00"], r"^feedback: delay: must be >= 0, got -1\.0$"),
        ([b"\x0b", b"\x94\x01\x02\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00\xcb?\xe0\x00\x00\x00\x00\x00\x00"], r"^feedback: delay: must be finite, got inf$"),
        ([b"\x0b", b"\x94\x01\x02\x00\xcb?\xe0\x00\x00\x00\x00\x00\x00"], r"^feedback: delay: must be a float, got int$"),
        ([b"\x0b", b"\x94\x01\x02\xca\x00\x00\x00\x00\xcb?\xe0\x00\x00\x00\x00\x00\x00", b""], r"^feedback: frames: expected 2 frames \(tag, payload\), got 3$"),
        ([b"\x06", b""], r"token_result: frame 1 \(payload\): is empty"),
        ([b"\x06", b"\x90", b""], r"^token_result: frames: expected 2 frames \(tag, payload\), got 3$"),
        ([b"\x06", "text"], r"frame 1 \(payload\): must be a bytes-like object, got str"),
        ([b"\x0a", b"\x91\xa2\xed\xa0"], r"^shutdown: frame 1 \(payload\): is not valid msgpack \(UnicodeDecodeError"),
    ],
)
def test_specific_decode_errors(impl, frames, pattern) -> None:
    _, dec = impl
    with pytest.raises(CodecError, match=pattern):
        dec(frames)


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_frame_errors_name_the_frame(impl) -> None:
    enc, dec = impl
    h = np.zeros((2, 4), np.float16)
    frames = enc(Activations(request_id=1, stage=0, num_tokens=2, sent_at=0.0, tensors=(h,)))
    with pytest.raises(CodecError, match=r"^activations: frame 2 \(tensors\[0\]\): has 15 bytes, expected 16 \(shape \[2, 4\] x 2-byte float16\)$"):
        dec([frames[0], frames[1], bytes(frames[2])[:-1]])
    with pytest.raises(CodecError, match=r"^activations: frames: expected 3 frames \(tag, payload, 1 tensors\), got 2$"):
        dec(frames[:2])
    bad = msgpack.packb([1, 0, 2, 0.0, [["bfloat16", [2, 4]]]], use_bin_type=True)
    with pytest.raises(CodecError, match=r"^activations: tensors\[0\].dtype: unsupported dtype 'bfloat16'"):
        dec([frames[0], bad, frames[2]])
    bad = msgpack.packb([1, 0, 2, 0.0, []], use_bin_type=True)
    with pytest.raises(CodecError, match=r"^activations: tensors: must have at least 1 items, got 0$"):
        dec([frames[0], bad])
    strided = np.zeros((4, 4), np.uint8)[:, ::2]
    with pytest.raises(CodecError, match=r"frame 2 \(tensors\[0\]\): must be a C-contiguous buffer"):
        dec([frames[0], frames[1], strided])


@pytest.mark.parametrize("impl", IMPLS)
def test_route_and_cross_field_errors(impl) -> None:
    enc, dec = impl
    m = DecodeWork(request_id=1, route=ROUTE6, stage=5, context_len=9, token_id=4, sent_at=0.0)
    cases = [
        (dict(stage=6), r"^decode_work: stage: must be < len\(route\) = 6, got 6$"),
        (dict(route=((1, 0, 5), (2, 6, 9))), r"^decode_work: route\[1\]: must start at layer 5 where stage 0 ends, got 6$"),
        (dict(route=((1, 5, 5),)), r"route\[0\]: layer range must have start < end, got \[5, 5\)"),
        (dict(route=()), r"route: must have at least 1 items, got 0"),
        (dict(route=tuple((i, i, i + 1) for i in range(65))), r"route: must have at most 64 items, got 65"),
        (dict(route=[(1, 0, 5)]), r"route: must be a tuple \(msgpack array\), got list"),
        (dict(route=((True, 0, 5),)), r"route\[0\].node: must be an int, got bool"),
        (dict(token_id=-1), r"^decode_work: token_id: is -1 but no tensors nor payload_bytes are given \(token id xor hidden state\)$"),
        (dict(token_id=-2), r"token_id: must be >= -1, got -2"),
        (dict(request_id=2**63), r"request_id: must be <= 9223372036854775807"),
        (dict(sent_at=math.inf), r"sent_at: must be finite"),
        (dict(sent_at=10**400), r"sent_at: must be finite"),
        (dict(tensors=(np.zeros(2, np.float16),)), r"tensors: must be empty when token_id >= 0"),
    ]
    for change, pattern in cases:
        with pytest.raises(CodecError, match=pattern):
            enc(dataclasses.replace(m, **change))
    # the decoder applies the same rules to what it receives
    values, frames = _wire(m)
    values[2] = 6
    with pytest.raises(CodecError, match=r"^decode_work: stage: must be < len\(route\) = 6, got 6$"):
        dec([frames[0], msgpack.packb(values)])
    values[2] = 5
    values[1] = [[1, 0, 5], [2, 6, 9]]
    with pytest.raises(CodecError, match=r"route\[1\]: must start at layer 5"):
        dec([frames[0], msgpack.packb(values)])
    p = PromptWork(request_id=1, query_id=2, route=ROUTE6, stage=0, num_tokens=3, token_ids=(1, 2), max_tokens=5, sent_at=0.0)
    with pytest.raises(CodecError, match=r"^prompt_work: token_ids: has 2 ids but num_tokens is 3$"):
        enc(p)
    with pytest.raises(CodecError, match=r"token_ids: must be a tuple \(msgpack array\), got list"):
        enc(dataclasses.replace(p, token_ids=[1, 2, 3]))
    with pytest.raises(CodecError, match=r"^prompt_work: token_ids: is empty and no tensors nor payload_bytes are given"):
        enc(dataclasses.replace(p, token_ids=()))
    with pytest.raises(CodecError, match=r"^assign_layers: end: layer range must have start < end, got \[4, 4\)$"):
        enc(AssignLayers(node_id=1, model="m", start=4, end=4, plan_id=0, next_hops=()))


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_rejects_non_messages_and_bad_text(impl) -> None:
    enc, _ = impl
    with pytest.raises(CodecError, match=r"cannot encode dict: not a message type"):
        enc({"request_id": 1})
    with pytest.raises(CodecError, match=r"^shutdown: reason: is not encodable as UTF-8"):
        enc(Shutdown(reason="\ud800"))
    with pytest.raises(CodecError, match=r"^register: capabilities\[1\]: must be a str, got int"):
        enc(Register(node_id=0, name="n", machine_type="T4", address="a", num_gpus=1, gpu_memory_bytes=1, capabilities=("x", 1)))
    with pytest.raises(CodecError, match=r"^token_result: finished: must be a bool, got int"):
        enc(TokenResult(request_id=1, token_id=2, context_len=3, finished=1, sent_at=0.0))
    with pytest.raises(CodecError, match=r"token_result: token_id: must be an int, got int64"):
        enc(TokenResult(request_id=1, token_id=np.int64(2), context_len=3, finished=True, sent_at=0.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_limits_are_configurable(impl) -> None:
    enc, dec = impl
    small = Limits(max_frame_bytes=64, max_route_stages=2, max_tensors=1, max_ndim=2)
    m = DecodeWork(request_id=1, route=ROUTE6, stage=0, context_len=9, token_id=4, sent_at=0.0)
    frames = enc(m)
    with pytest.raises(CodecError, match=r"route: must have at most 2 items, got 6"):
        dec(frames, small)
    with pytest.raises(CodecError, match=r"route: must have at most 2 items, got 6"):
        enc(m, small)
    a = Activations(request_id=1, stage=0, num_tokens=1, sent_at=0.0, tensors=(np.zeros(64, np.float16),))
    with pytest.raises(CodecError, match=r"tensors\[0\]: has 128 bytes, more than max_frame_bytes=64"):
        enc(a, small)
    with pytest.raises(CodecError, match=r"frame 2 \(tensors\[0\]\): has 128 bytes, more than max_frame_bytes=64"):
        dec(enc(a), small)
    with pytest.raises(CodecError, match=r"shape: must have at most 2 items, got 3"):
        dec(enc(dataclasses.replace(a, tensors=(np.zeros((1, 1, 1), np.uint8),))), small)
    with pytest.raises(CodecError, match=r"tensors: must have at most 1 items, got 2"):
        dec(enc(dataclasses.replace(a, tensors=(np.zeros(1), np.zeros(1)))), small)
    p = PromptWork(request_id=1, query_id=2, route=ROUTE6[:1], stage=0, num_tokens=40, token_ids=tuple(range(1000, 1040)), max_tokens=5, sent_at=0.0)
    with pytest.raises(CodecError, match=r"^prompt_work: frame 1 \(payload\): has \d+ bytes, more than max_frame_bytes=64$"):
        enc(p, small)
    with pytest.raises(CodecError, match=r"^prompt_work: frame 1 \(payload\): has \d+ bytes, more than max_frame_bytes=64$"):
        dec(enc(p), small)


def test_drop_counter_counts_by_reason() -> None:
    counter = DropCounter()
    good = encode(_TR)
    assert decode_or_drop(good, counter) == _TR and counter.total == 0
    assert decode_or_drop([b"\x63", b"\x90"], counter) is None
    assert decode_or_drop([good[0], good[1][:-1]], counter) is None
    assert decode_or_drop([good[0], good[1][:-1]], counter) is None
    assert counter.total == 3
    assert counter.by_reason == {"?.frame 0": 1, "token_result.frame 1": 2}
    assert isinstance(counter.last, CodecError) and counter.last.msg_type == "token_result"


def test_messages_with_tensors_compare_by_content_and_are_unhashable() -> None:
    a = np.array([1.0, np.nan], np.float32)
    m1 = Activations(request_id=1, stage=0, num_tokens=1, sent_at=0.0, tensors=(a,))
    assert m1 == dataclasses.replace(m1, tensors=(a.copy(),))  # NaN bytes compare equal
    assert m1 != dataclasses.replace(m1, tensors=(a.astype(np.float64),))
    assert m1 != dataclasses.replace(m1, tensors=(a[:1],))
    assert m1 != dataclasses.replace(m1, stage=1)
    with pytest.raises(TypeError):
        hash(m1)
    assert hash(_TR) == hash(dataclasses.replace(_TR))
    with pytest.raises(dataclasses.FrozenInstanceError):
        _TR.token_id = 5  # type: ignore[misc]


# --- tensor shapes a peer may declare --------------------------------------------------------------

_HUGE_EMPTY = [0, I32, I32, I32, I32]  # no bytes, but a span numpy cannot even represent


def _activations_frames(shape, dtype="float16", frame=b"") -> list:
    return [b"\x05", msgpack.packb([1, 0, 1, 0.0, [[dtype, shape]]]), frame]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("limits", [None, Limits(max_frame_bytes=I64), Limits(max_frame_bytes=2**80)], ids=["default", "i64", "huge"])
def test_empty_tensor_with_huge_dimensions_is_a_codec_error(impl, limits) -> None:
    # regression: numpy raised ValueError("array is too big") from decode
    _, dec = impl
    mfb = (limits or Limits()).max_frame_bytes
    span = 2 * I32**4
    pattern = (
        r"^activations: tensors\[0\]\.shape: shape \[0, 2147483647, 2147483647, 2147483647, 2147483647\] x 2-byte "
        rf"float16 spans {span} bytes with its zero dimensions ignored, more than max_frame_bytes={mfb}$"
    )
    with pytest.raises(CodecError, match=pattern):
        dec(_activations_frames(_HUGE_EMPTY), limits)
    route = ((1, 0, 2),)
    work = [
        [b"\x04", msgpack.packb([1, route, 0, 2, -1, 0.0, [["int8", [3, 0, I32, I32]]], 0]), b""],
        [b"\x03", msgpack.packb([1, 2, route, 0, 3, [], 5, 0.0, [["float64", [I32, I32, 0]]], 0, 0.0, 1.0, 0, 0, 0.0, 0.0,
                                    0.0, 1.0, 0, [], -1, [], 0, 0]), bytearray()],
    ]
    for frames in work:
        # under 2**80 the span check passes (span < 2**80) and numpy's refusal is the error
        with pytest.raises(CodecError, match=r"^(decode|prompt)_work: tensors\[0\](\.shape: .* spans \d+ bytes with its zero dimensions ignored|: cannot be viewed as)"):
            dec(frames, limits)
    if COMPILED:
        for frames in [_activations_frames(_HUGE_EMPTY), *work]:
            with pytest.raises(CodecError):
                decode_strict(frames, limits)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_tensor_spans_are_limited_on_encode_too(impl) -> None:
    enc, dec = impl
    m = Activations(request_id=1, stage=0, num_tokens=0, sent_at=0.0, tensors=(np.zeros((0, 2**20), np.uint8),))
    frames = enc(m)  # spans 1 MiB: fine
    assert len(frames[2]) == 0 and dec(frames) == m and dec(frames).tensors[0].shape == (0, 2**20)
    with pytest.raises(CodecError, match=r"^activations: tensors\[0\]: shape \[0, 4096, 4\] x 8-byte float64 spans 131072 bytes with its zero dimensions ignored, more than max_frame_bytes=65536$"):
        enc(dataclasses.replace(m, tensors=(np.zeros((0, 4096, 4), np.float64),)), Limits(max_frame_bytes=65536))
    # what encodes decodes: the same limit holds on both sides
    small = Limits(max_frame_bytes=2**19)
    with pytest.raises(CodecError, match=r"tensors\[0\]: shape \[0, 1048576\]"):
        enc(m, small)
    with pytest.raises(CodecError, match=r"tensors\[0\]\.shape: shape \[0, 1048576\]"):
        dec(frames, small)


@pytest.mark.parametrize("impl", IMPLS)
def test_array_numpy_refuses_is_a_codec_error(impl) -> None:
    # under absurd limits the span check lets through a shape numpy cannot represent (span > 2**63):
    # the array construction itself is guarded
    _, dec = impl
    with pytest.raises(CodecError, match=r"^activations: tensors\[0\]: cannot be viewed as a \[0, 2147483647, 2147483647, 4\] float64 array \(ValueError: "):
        dec(_activations_frames([0, I32, I32, 4], "float64"), Limits(max_frame_bytes=2**80))


_DIMS = st.one_of(
    st.sampled_from([0, 0, 1, 2, 3, 255, 2**16, 2**20, 2**26, I32 - 1, I32, 2**31, 2**32, I64, 2**64 - 1]),
    st.sampled_from([-1, -2, -(2**31), -(2**63)]),
    st.integers(0, 64),
    st.integers(-(2**63), 2**64 - 1),
)


@settings(max_examples=400)
@given(
    st.sampled_from([*sorted(DTYPES), "float16", "bfloat16"]),
    st.lists(_DIMS, max_size=12) | st.lists(st.sampled_from([0, 1, I32]), min_size=1, max_size=10),
    st.one_of(st.none(), st.integers(0, 64)),
    st.sampled_from(["bytes", "bytearray"]),
    st.sampled_from([None, Limits(max_frame_bytes=24), Limits(max_frame_bytes=I64), Limits(max_frame_bytes=2**80), Limits(max_ndim=12)]),
)
def test_adversarial_activation_shapes_decode_or_raise_codec_error(dtype, shape, nbytes, kind, limits) -> None:
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 2
    exact = itemsize * math.prod(shape)
    n = exact if nbytes is None and 0 <= exact <= 64 else (nbytes or 0)
    frames = _activations_frames(shape, dtype, bytes(n) if kind == "bytes" else bytearray(n))
    outs = [_outcome(decode_py, frames, limits)]
    if COMPILED:
        outs += [_outcome(decode_c, frames, limits), _outcome(decode_strict, frames, limits)]
    py = outs[0]
    if py[0] == "ok":
        (t,) = py[1].tensors
        assert t.shape == tuple(shape) and t.nbytes == n and _codec_py.tensor_span(itemsize, t.shape) <= (limits or Limits()).max_frame_bytes
        assert all(o[0] == "ok" and o[1] == py[1] for o in outs)
    else:
        assert all(o[0] == "err" for o in outs), outs
        assert outs[:2] == [py] * len(outs[:2])  # the compiled decoder falls back to the canonical error


# --- the compiled twin does not hide its own failures ----------------------------------------------


class _OnceFailingLimits:
    """Limits whose ``max_frame_bytes`` raises the first time it is read: a stand-in for a bug
    inside a fast path (the old catch-all re-ran the pure codec, which read it again and worked)."""

    max_route_stages = 64
    max_tensors = 8
    max_ndim = 8

    def __init__(self) -> None:
        self.reads = 0

    @property
    def max_frame_bytes(self) -> int:
        self.reads += 1
        if self.reads == 1:
            raise RuntimeError("internal bug")
        return 64 << 20


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", HOT)
def test_unexpected_errors_propagate_instead_of_a_silent_fallback(impl, name) -> None:
    enc, dec = impl
    msg = _minimal_message(name)
    frames = encode_py(msg)
    lim = _OnceFailingLimits()
    with pytest.raises(RuntimeError, match="internal bug"):
        enc(msg, lim)
    assert lim.reads == 1 and _frame_bytes(enc(msg, lim)) == _frame_bytes(frames)
    lim = _OnceFailingLimits()
    with pytest.raises(RuntimeError, match="internal bug"):
        dec(frames, lim)
    assert lim.reads == 1 and dec(frames, lim) == msg


class _Sub(np.ndarray):
    pass


@pytest.mark.parametrize("impl", IMPLS)
def test_failing_tensor_helper_is_not_swallowed(impl, monkeypatch) -> None:
    enc, _ = impl
    real, calls = _codec_py.as_ndarray, []

    def once_failing(t):
        calls.append(t)
        if len(calls) == 1:
            raise RuntimeError("helper bug")
        return real(t)

    monkeypatch.setattr(_codec_py, "as_ndarray", once_failing)
    m = Activations(request_id=1, stage=0, num_tokens=1, sent_at=0.0, tensors=(np.ones(4, np.float16).view(_Sub),))
    with pytest.raises(RuntimeError, match="helper bug"):
        enc(m)
    assert len(calls) == 1  # not re-encoded behind the caller's back
    assert _frame_bytes(enc(m)) == _frame_bytes(encode_py(m))


@pytest.mark.parametrize("impl", IMPLS)
def test_limits_beyond_a_long_long_still_work(impl) -> None:
    enc, dec = impl
    big = Limits(max_frame_bytes=2**70, max_route_stages=2**64, max_tensors=2**65, max_ndim=2**66)
    for name in HOT:
        msg = _minimal_message(name)
        assert dec(enc(msg, big), big) == msg
    for tiny in (-1, -(2**70)):
        with pytest.raises(CodecError, match=rf"^activations: frame 1 \(payload\): has \d+ bytes, more than max_frame_bytes={tiny}$"):
            dec(encode_py(_minimal_message("activations")), Limits(max_frame_bytes=tiny))


def _minimal_message(name: str):
    cls = MESSAGE_TYPES[MsgType[name.upper()]]
    return cls(**_minimal_kwargs(cls))


# --- routes from the router ------------------------------------------------------------------------


def _work_round_trips(enc, dec, route, num_layers: int) -> None:
    """A route as the router returns it is what work messages carry, as is, and comes back equal."""
    assert type(route) is tuple and route and all(type(s) is tuple and len(s) == 3 for s in route)
    assert all(type(v) is int for s in route for v in s)
    assert route[0][1] == 0 and route[-1][2] == num_layers  # the sink after the last stage is implicit
    assert all(a[2] == b[1] for a, b in itertools.pairwise(route))
    h = np.ones((1, 8), np.float16)
    for stage in range(len(route)):
        msgs = [
            DecodeWork(request_id=7, route=route, stage=stage, context_len=12, token_id=-1 if stage else 5, sent_at=1.0, tensors=(h,) if stage else ()),
            PromptWork(request_id=7, query_id=3, route=route, stage=stage, num_tokens=2, token_ids=() if stage else (4, 9), max_tokens=8, sent_at=1.0, tensors=(np.ones((2, 8), np.float16),) if stage else ()),
        ]
        for m in msgs:
            frames = enc(m)
            if COMPILED:
                assert _frame_bytes(encode_strict(m)) == _frame_bytes(encode_py(m)) == _frame_bytes(frames)
            back = dec(_frame_bytes(frames))
            assert back == m and back.route == route


@pytest.mark.parametrize("impl", IMPLS)
def test_routes_of_the_router_travel_in_work_messages(impl) -> None:
    from helix_async.placement.flow import max_flow
    from helix_async.placement.io import load_shipped_layout
    from helix_async.routing import FlowRouter

    enc, dec = impl
    placement = load_shipped_layout("ilp")  # single24, LLaMA-2-70B (80 layers)
    router = FlowRouter.from_plan(placement, max_flow(placement))
    L = router.num_layers
    seen = set()
    for rid in range(40):
        route = router.route(rid, (16, 128, 700, 2000)[rid % 4])
        assert route is not None
        seen.add(route)
        _work_round_trips(enc, dec, route, L)
        router.on_decode(route)  # and a decoded route is one the router takes back
    assert len(seen) > 1 and all(len(r) > 1 for r in seen)


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_inference_routes_travel_in_work_messages(impl) -> None:
    from helix_async.routing import FlowRouter, KVTracker

    enc, dec = impl
    # node 1 holds [2, 5) but runs [3, 5) after node 0's [0, 3): the stage starts where the last ended
    stages = {0: (0, 3), 1: (2, 5), 2: (3, 6), 3: (5, 6)}
    kv = KVTracker(dict.fromkeys(stages, 10_000), stages, kv_fill_limit=1.0, output_ratio=0.0)
    links = {SOURCE: [(0, 2.0)], 0: [(1, 1.0), (2, 1.0)], 1: [(3, 1.0)], 2: [(SINK, 1.0)], 3: [(SINK, 1.0)]}
    router = FlowRouter(stages, links, dict.fromkeys(stages, 99), kv, 6)
    a, b = router.route("a", 4), router.route("b", 4)
    assert a == ((0, 0, 3), (1, 3, 5), (3, 5, 6))
    assert b == ((0, 0, 3), (2, 3, 6))
    for route in (a, b):
        _work_round_trips(enc, dec, route, 6)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_wire_refuses_routes_that_are_not_routes(impl) -> None:
    enc, dec = impl
    m = DecodeWork(request_id=1, route=((1, 0, 4), (2, 4, 6)), stage=0, context_len=3, token_id=5, sent_at=0.0)
    bad = [
        (((1, 0, 4), (SINK, 4, 4)), r"^decode_work: route\[1\]\.node: must be an int, got str$"),  # no sink stage
        (((SOURCE, 0, 4),), r"^decode_work: route\[0\]\.node: must be an int, got str$"),
        (((1, 0, 4), (2, 3, 6)), r"^decode_work: route\[1\]: must start at layer 4 where stage 0 ends, got 3$"),
        (((1, 4, 4),), r"^decode_work: route\[0\]: layer range must have start < end, got \[4, 4\)$"),
        (((1, 0),), r"^decode_work: route\[0\]: must have at least 3 items, got 2$"),
        (((-1, 0, 4),), r"^decode_work: route\[0\]\.node: must be >= 0, got -1$"),
    ]
    for route, pattern in bad:
        with pytest.raises(CodecError, match=pattern):
            enc(dataclasses.replace(m, route=route))
        values, frames = _wire(m)
        values[1] = [list(st) for st in route]
        with pytest.raises(CodecError, match=pattern):
            dec([frames[0], msgpack.packb(values)])


# --- modelled payloads -------------------------------------------------------------------------------

_MODELLED_DW = DecodeWork(request_id=1, route=ROUTE6, stage=3, context_len=9, token_id=-1, sent_at=0.5, payload_bytes=16384)
_MODELLED_PW = PromptWork(
    request_id=1, query_id=2, route=ROUTE6, stage=0, num_tokens=40, token_ids=(), max_tokens=5, sent_at=0.5, payload_bytes=160
)


@pytest.mark.parametrize("impl", IMPLS)
def test_modelled_payload_travels_as_one_frame_of_zeros(impl) -> None:
    enc, dec = impl
    for m in (_MODELLED_DW, _MODELLED_PW, dataclasses.replace(_MODELLED_PW, stage=2, payload_bytes=40 * 16384)):
        frames = enc(m)
        assert len(frames) == 3 and bytes(frames[2]) == bytes(m.payload_bytes)
        fields = msgpack.unpackb(frames[1])
        at = m.FIELDS.index("tensors")
        assert fields[at : at + 2] == [[], m.payload_bytes]  # no tensors, the size announced
        back = dec(_frame_bytes(frames))
        assert back == m and back.tensors == () and back.payload_bytes == m.payload_bytes
        # the frame's content is not read: any bytes of the announced length stand for the payload
        assert dec([frames[0], frames[1], b"\xff" * m.payload_bytes]) == m
        assert dec([frames[0], frames[1], bytearray(m.payload_bytes)]) == m
        # without a modelled payload, nothing changes: payload_bytes is 0
        assert msgpack.unpackb(enc(_minimal_message(m.NAME))[1])[m.FIELDS.index("payload_bytes")] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_modelled_payload_rules(impl) -> None:
    enc, dec = impl
    h = (np.zeros((1, 8), np.float16),)
    cases = [
        (dataclasses.replace(_MODELLED_DW, tensors=h), r"^decode_work: payload_bytes: must be 0 when tensors are given \(real xor modelled payload\)$"),
        (dataclasses.replace(_MODELLED_DW, token_id=5), r"^decode_work: payload_bytes: must be 0 when token_id >= 0 \(real xor modelled payload\)$"),
        (dataclasses.replace(_MODELLED_DW, payload_bytes=-1), r"^decode_work: payload_bytes: must be >= 0, got -1$"),
        (dataclasses.replace(_MODELLED_DW, payload_bytes=True), r"^decode_work: payload_bytes: must be an int, got bool$"),
        (dataclasses.replace(_MODELLED_DW, payload_bytes=(64 << 20) + 1), r"^decode_work: payload_bytes: is 67108865 bytes, more than max_frame_bytes=67108864$"),
        (dataclasses.replace(_MODELLED_PW, tensors=h), r"^prompt_work: payload_bytes: must be 0 when tensors are given \(real xor modelled payload\)$"),
        (dataclasses.replace(_MODELLED_PW, token_ids=(1,) * 40), r"^prompt_work: payload_bytes: must be 0 when token_ids are given \(real xor modelled payload\)$"),
        (dataclasses.replace(_MODELLED_PW, payload_bytes=2**63), r"^prompt_work: payload_bytes: must be <= 9223372036854775807, got 9223372036854775808$"),
    ]
    for m, pattern in cases:
        with pytest.raises(CodecError, match=pattern):
            enc(m)
    # the bound is the frame limit, as for tensors
    small = Limits(max_frame_bytes=1000)
    with pytest.raises(CodecError, match=r"^decode_work: payload_bytes: is 16384 bytes, more than max_frame_bytes=1000$"):
        enc(_MODELLED_DW, small)
    with pytest.raises(CodecError, match=r"^decode_work: payload_bytes: is 16384 bytes, more than max_frame_bytes=1000$"):
        dec(enc(_MODELLED_DW), small)
    assert dec(enc(dataclasses.replace(_MODELLED_DW, payload_bytes=1000), small), small).payload_bytes == 1000
    # the decoder applies the same rules to what it receives
    values, frames = _wire(_MODELLED_DW)
    values[6] = [["float16", [1, 8]]]
    with pytest.raises(CodecError, match=r"^decode_work: frames: expected 4 frames \(tag, payload, 1 tensors, modelled payload of 16384 bytes\), got 3$"):
        dec([frames[0], msgpack.packb(values), frames[2]])
    with pytest.raises(CodecError, match=r"^decode_work: payload_bytes: must be 0 when tensors are given"):
        dec([frames[0], msgpack.packb(values), bytes(h[0]), frames[2]])
    values, frames = _wire(_MODELLED_PW)
    values[5] = list(range(40))
    with pytest.raises(CodecError, match=r"^prompt_work: payload_bytes: must be 0 when token_ids are given"):
        dec([frames[0], msgpack.packb(values), frames[2]])


@pytest.mark.parametrize("impl", IMPLS)
def test_modelled_payload_frame_errors(impl) -> None:
    _, dec = impl
    frames = encode_py(_MODELLED_DW)
    cases = [
        (frames[:2], r"^decode_work: frames: expected 3 frames \(tag, payload, 0 tensors, modelled payload of 16384 bytes\), got 2$"),
        ([*frames, b""], r"^decode_work: frames: expected 3 frames \(tag, payload, 0 tensors, modelled payload of 16384 bytes\), got 4$"),
        ([frames[0], frames[1], bytes(16383)], r"^decode_work: frame 2 \(payload_bytes\): has 16383 bytes, expected payload_bytes=16384$"),
        ([frames[0], frames[1], bytes(16385)], r"^decode_work: frame 2 \(payload_bytes\): has 16385 bytes, expected payload_bytes=16384$"),
        ([frames[0], frames[1], "x" * 16384], r"^decode_work: frame 2 \(payload_bytes\): must be a bytes-like object, got str$"),
        ([frames[0], frames[1], np.zeros(32768, np.uint8)[::2]], r"^decode_work: frame 2 \(payload_bytes\): must be a C-contiguous buffer$"),
    ]
    for bad, pattern in cases:
        with pytest.raises(CodecError, match=pattern):
            dec(bad)
        if COMPILED:
            with pytest.raises(CodecError):
                decode_strict(bad)
    # a zero-payload message sent with a stray frame is refused as before
    plain = encode_py(_minimal_message("decode_work"))
    with pytest.raises(CodecError, match=r"^decode_work: frames: expected 2 frames \(tag, payload, 0 tensors\), got 3$"):
        dec([*plain, b""])


def test_zero_frames_are_shared_read_only_zeros() -> None:
    a, b = _codec_py.zero_frame(10), _codec_py.zero_frame(5000)
    assert bytes(a) == bytes(10) and bytes(b) == bytes(5000) and a.readonly and b.readonly
    assert len(_codec_py.zero_frame(0)) == 0


# --- token_result routes, feedback ----------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_token_result_carries_the_route_or_none(impl) -> None:
    enc, dec = impl
    for route in ((), ROUTE6, ((4, 0, 80),)):
        m = dataclasses.replace(_TR, route=route)
        back = dec(_frame_bytes(enc(m)))
        assert back == m and back.route == route and hash(back) == hash(m)
    bad = [
        (((1, 0, 4), (2, 3, 6)), r"^token_result: route\[1\]: must start at layer 4 where stage 0 ends, got 3$"),
        (((1, 4, 4),), r"^token_result: route\[0\]: layer range must have start < end, got \[4, 4\)$"),
        (((SINK, 0, 4),), r"^token_result: route\[0\]\.node: must be an int, got str$"),
        ([(1, 0, 4)], r"^token_result: route: must be a tuple \(msgpack array\), got list$"),
        (tuple((i, i, i + 1) for i in range(65)), r"^token_result: route: must have at most 64 items, got 65$"),
    ]
    for route, pattern in bad:
        with pytest.raises(CodecError, match=pattern):
            enc(dataclasses.replace(_TR, route=route))
        if type(route) is list:  # a tuple on the wire
            continue
        values, frames = _wire(_TR)
        values[5] = [list(s) for s in route]
        with pytest.raises(CodecError, match=pattern):
            dec([frames[0], msgpack.packb(values)])


@pytest.mark.parametrize("impl", IMPLS)
def test_feedback_round_trip_and_rules(impl) -> None:
    enc, dec = impl
    m = Feedback(request_id=7, node_id=3, delay=0.0125, sent_at=12.5)
    frames = enc(m)
    assert frames[0] == b"\x0b" and msgpack.unpackb(frames[1]) == [7, 3, 0.0125, 12.5]
    assert dec(_frame_bytes(frames)) == m and hash(m) == hash(dec(frames))
    assert dec(enc(dataclasses.replace(m, delay=0))).delay == 0.0  # an int is sent as a float
    cases = [
        (dict(delay=-0.001), r"^feedback: delay: must be >= 0, got -0\.001$"),
        (dict(delay=math.nan), r"^feedback: delay: must be finite, got nan$"),
        (dict(delay=math.inf), r"^feedback: delay: must be finite, got inf$"),
        (dict(delay=-1), r"^feedback: delay: must be >= 0, got -1\.0$"),
        (dict(delay="1"), r"^feedback: delay: must be a float, got str$"),
        (dict(node_id=-1), r"^feedback: node_id: must be >= 0, got -1$"),
        (dict(request_id=2**63), r"^feedback: request_id: must be <= 9223372036854775807"),
        (dict(sent_at=math.inf), r"^feedback: sent_at: must be finite, got inf$"),
    ]
    for change, pattern in cases:
        with pytest.raises(CodecError, match=pattern):
            enc(dataclasses.replace(m, **change))


# --- wire size -------------------------------------------------------------------------------------

SIZERS = [pytest.param(wire_size_py, id="py")]
if wire_size_c is not None:
    SIZERS.append(pytest.param(wire_size_c, id="c"))


def _frames_size(frames: list) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def test_import_site_picks_the_compiled_wire_size_unless_disabled() -> None:
    assert wire_size is (wire_size_py if wire_size_c is None else wire_size_c)


@pytest.mark.parametrize("size", SIZERS)
def test_wire_size_is_the_encoded_size(size) -> None:
    @settings(max_examples=400)
    @given(any_message)
    def check(msg) -> None:
        n = size(msg)
        assert type(n) is int
        assert n == _frames_size(encode_py(msg))
        if COMPILED:
            assert n == _frames_size(encode_c(msg))
            assert wire_size_strict(msg) == n  # the compiled fast path itself, no fallback

    check()


@pytest.mark.parametrize("size", SIZERS)
def test_wire_size_at_the_msgpack_format_boundaries(size) -> None:
    # every int, str and array width, both sides of each boundary
    int_edges = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, I32, I64]
    for v in int_edges:
        msgs = [
            DecodeWork(request_id=v, route=((min(v, I32), 0, 1),), stage=0, context_len=max(1, min(v, I32)), token_id=min(v, I32), sent_at=0.0),
            Error(request_id=v, code=min(v, I32), text=""),
            Heartbeat(node_id=min(v, I32), seq=v, now=float(v)),
            dataclasses.replace(_MODELLED_DW, request_id=v, payload_bytes=max(1, min(v, 1 << 17))),
        ]
        for m in msgs:
            assert size(m) == _frames_size(encode_py(m)), m
    # no field holds an int below -1, but the int sizing knows every msgpack width
    for v in [*int_edges, 2**64 - 1, -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]:
        assert _codec_py._int_size(v) == len(msgpack.packb(v)), v
    for n in (0, 31, 32, 255, 256, 65535, 65536):
        for text in ("a" * n, "é" * (n // 2), "😀" * (n // 4)):
            m = Cancel(request_id=1, reason=text)
            assert size(m) == _frames_size(encode_py(m))
    for n in (0, 15, 16, 65535, 65536):
        m = PromptWork(request_id=1, query_id=1, route=((1, 0, 4),), stage=0, num_tokens=max(n, 1), token_ids=tuple(range(n)) or (), max_tokens=1, sent_at=0.0, payload_bytes=0 if n else 1)
        assert size(m) == _frames_size(encode_py(m))
        m = Register(node_id=0, name="n", machine_type="t", address="a", num_gpus=1, gpu_memory_bytes=1, capabilities=("x",) * n)
        assert size(m) == _frames_size(encode_py(m))
    for n in (1, 15, 16, 64):
        route = tuple((i, i, i + 1) for i in range(n))
        for m in (dataclasses.replace(_MODELLED_DW, route=route, stage=0), dataclasses.replace(_TR, route=route)):
            assert size(m) == _frames_size(encode_py(m))


@pytest.mark.parametrize("size", SIZERS)
def test_wire_size_needs_no_encoding(size) -> None:
    # a payload beyond any frame limit, a route beyond the default limits: still exact, never built
    m = dataclasses.replace(_MODELLED_DW, payload_bytes=2**40)
    assert size(m) == size(dataclasses.replace(_MODELLED_DW, payload_bytes=1)) - 1 + 2**40 + 8
    long_route = tuple((i, i, i + 1) for i in range(100))
    m = dataclasses.replace(_MODELLED_DW, route=long_route)
    assert size(m) == _frames_size(encode_py(m, Limits(max_route_stages=100)))
    # torch tensors and numpy arrays alike
    h = np.ones((3, 5), np.float32)
    m = Activations(request_id=1, stage=0, num_tokens=3, sent_at=0.0, tensors=(h, np.zeros((0, 7), np.int8)))
    assert size(m) == _frames_size(encode_py(m)) == 1 + len(encode_py(m)[1]) + 60


@pytest.mark.parametrize("size", SIZERS)
def test_wire_size_of_what_is_not_a_message(size) -> None:
    with pytest.raises(CodecError, match=r"cannot encode dict: not a message type"):
        size({"request_id": 1})
    with pytest.raises(CodecError, match=r"^decode_work: route: must be a tuple \(msgpack array\), got str$"):
        size(dataclasses.replace(_MODELLED_DW, route="abc"))
    with pytest.raises(CodecError, match=r"^activations: tensors\[0\]: must be a numpy array"):
        size(Activations(request_id=1, stage=0, num_tokens=1, sent_at=0.0, tensors=([1.0],)))


@needs_c
@pytest.mark.parametrize("name", HOT)
def test_compiled_wire_size_agrees_on_invalid_messages(name) -> None:
    fields = MESSAGE_TYPES[MsgType[name.upper()]].FIELDS

    @settings(max_examples=150)
    @given(STRATEGIES[name], st.sampled_from(fields), _JUNK)
    def check(msg, field, value) -> None:
        bad = dataclasses.replace(msg, **{field: value})
        assert _outcome(wire_size_c, bad) == _outcome(wire_size_py, bad)
        enc = _outcome(encode_py, bad)
        if enc[0] == "ok":  # what encodes is sized exactly; the fast path takes exactly that
            assert _outcome(wire_size_c, bad) == ("ok", _frames_size(enc[1]))
            assert wire_size_strict(bad) == _frames_size(enc[1])
        else:
            with pytest.raises(CodecError):
                wire_size_strict(bad)

    check()


@needs_c
def test_compiled_wire_size_remembers_routes_soundly() -> None:
    # the counting writer caches checked routes by address: shared, evicted and reused routes
    rng = random.Random(5)
    routes_ = []
    for _ in range(1500):
        n = rng.randint(1, 24)
        cuts = sorted(rng.sample(range(1, 80), n - 1))
        bounds = [0, *cuts, 80]
        routes_.append(tuple((rng.randint(0, 300), a, b) for a, b in itertools.pairwise(bounds)))
    for _ in range(3):
        for route in rng.sample(routes_, len(routes_)):
            msgs = [
                dataclasses.replace(_TR, route=route),
                dataclasses.replace(_MODELLED_DW, route=route, stage=len(route) - 1),
                dataclasses.replace(_MODELLED_PW, route=route, stage=0),
            ]
            for m in msgs:
                assert wire_size_strict(m) == _frames_size(encode_py(m))
            # a cached route still goes through the checks that depend on the message
            with pytest.raises(CodecError):
                wire_size_strict(dataclasses.replace(_MODELLED_DW, route=route, stage=len(route)))
    # a route beyond the default limits is never taken from the cache
    long_route = tuple((i, i, i + 1) for i in range(65))
    with pytest.raises(CodecError):
        wire_size_strict(dataclasses.replace(_TR, route=long_route))
    assert wire_size_c(dataclasses.replace(_TR, route=long_route)) == _frames_size(
        encode_py(dataclasses.replace(_TR, route=long_route), Limits(max_route_stages=65))
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_parameters_travel_and_are_checked(impl) -> None:
    enc, dec = impl
    m = dataclasses.replace(_MODELLED_PW, temperature=0.8, top_p=0.95, seed=12345)
    back = dec(_frame_bytes(enc(m)))
    assert (back.temperature, back.top_p, back.seed) == (0.8, 0.95, 12345)
    assert wire_size(m) == sum(len(bytes(f)) for f in enc(m))
    for bad, why in (
        (dataclasses.replace(m, temperature=-0.1), r"^prompt_work: temperature: must be >= 0, got -0.1$"),
        (dataclasses.replace(m, top_p=0.0), r"^prompt_work: top_p: must be in \(0, 1\], got 0.0$"),
        (dataclasses.replace(m, top_p=1.5), r"^prompt_work: top_p: must be in \(0, 1\], got 1.5$"),
        (dataclasses.replace(m, seed=-1), r"^prompt_work: seed: must be >= 0, got -1$"),
    ):
        with pytest.raises(CodecError, match=why):
            enc(bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_penalties_stop_ids_logprobs_and_context_travel_and_are_checked(impl) -> None:
    enc, dec = impl
    m = dataclasses.replace(
        _MODELLED_PW, num_tokens=3, payload_bytes=3 * 16384, top_k=40, min_p=0.05, presence_penalty=-0.5,
        frequency_penalty=1.5, repetition_penalty=1.3, min_tokens=4, stop_token_ids=(2, 70000), logprobs=20,
        context_ids=(9, 8, 70000), generated=2, priority=-(2**31),
    )
    frames = enc(m)
    # the payload is the fields in order, as msgpack packs them (the specification)
    assert frames[1] == msgpack.packb([getattr(m, f) if f != "tensors" else [] for f in PromptWork.FIELDS], use_bin_type=True)
    back = dec(_frame_bytes(frames))
    assert back == m and back.sampling().stop_token_ids == (2, 70000) and back.sampling().logprobs == 20
    assert dataclasses.replace(m, logprobs=-1).sampling().logprobs is None
    assert wire_size(m) == sum(len(bytes(f)) for f in frames)
    for bad, why in (
        (dataclasses.replace(m, top_k=-1), r"^prompt_work: top_k: must be >= 0, got -1$"),
        (dataclasses.replace(m, min_p=1.01), r"^prompt_work: min_p: must be in \[0, 1\], got 1.01$"),
        (dataclasses.replace(m, presence_penalty=-2.5), r"^prompt_work: presence_penalty: must be in \[-2, 2\], got -2.5$"),
        (dataclasses.replace(m, frequency_penalty=math.inf), r"^prompt_work: frequency_penalty: must be finite, got inf$"),
        (dataclasses.replace(m, repetition_penalty=0.0), r"^prompt_work: repetition_penalty: must be > 0, got 0.0$"),
        (dataclasses.replace(m, min_tokens=-3), r"^prompt_work: min_tokens: must be >= 0, got -3$"),
        (dataclasses.replace(m, stop_token_ids=[2]), r"^prompt_work: stop_token_ids: must be a tuple \(msgpack array\), got list$"),
        (dataclasses.replace(m, stop_token_ids=(2, -1)), r"^prompt_work: stop_token_ids\[1\]: must be >= 0, got -1$"),
        (dataclasses.replace(m, logprobs=21), r"^prompt_work: logprobs: must be <= 20, got 21$"),
        (dataclasses.replace(m, logprobs=-2), r"^prompt_work: logprobs: must be >= -1, got -2$"),
        (dataclasses.replace(m, context_ids=(1, 2)), r"^prompt_work: context_ids: has 2 ids but num_tokens is 3$"),
        (dataclasses.replace(m, payload_bytes=0, token_ids=(1, 2, 3)),
         r"^prompt_work: context_ids: must be empty when token_ids are given \(the first stage has them there\)$"),
        (dataclasses.replace(m, generated=3), r"^prompt_work: generated: must be < num_tokens = 3, got 3$"),
        (dataclasses.replace(m, priority=2**31), r"^prompt_work: priority: must be <= 2147483647, got 2147483648$"),
        (dataclasses.replace(m, priority=-(2**31) - 1), r"^prompt_work: priority: must be >= -2147483648, got -2147483649$"),
    ):
        with pytest.raises(CodecError, match=why):
            enc(bad)
        if COMPILED:  # the compiled fast path refuses it too (it does not fall back)
            with pytest.raises(CodecError):
                encode_strict(bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_result_logprobs_travel_and_are_checked(impl) -> None:
    enc, dec = impl
    top = tuple((t, -0.25 * t) for t in range(1, 21))
    m = dataclasses.replace(_TR, token_id=7, logprobs=((7, -1.75), *top))
    frames = enc(m)
    assert frames[1] == msgpack.packb([1, 7, 3, False, 0.5, [], [[7, -1.75], *map(list, top)]], use_bin_type=True)
    back = dec(_frame_bytes(frames))
    assert back == m and back.logprobs[0] == (7, -1.75) and back.logprobs[-1] == (20, -5.0)
    assert wire_size(m) == sum(len(bytes(f)) for f in frames)
    # none asked for: one byte (an empty array) more than before the field
    assert len(enc(_TR)[1]) == len(msgpack.packb([1, 2, 3, False, 0.5, []])) + 1
    for bad, why in (
        (dataclasses.replace(m, logprobs=((7, -1.0), *top, (5, -9.0))), r"^token_result: logprobs: must have at most 21 items, got 22$"),
        (dataclasses.replace(m, logprobs=((7, 0.5),)), r"^token_result: logprobs\[0\]\.logprob: must be <= 0 \(a log-probability\), got 0.5$"),
        (dataclasses.replace(m, logprobs=((7, -math.inf),)), r"^token_result: logprobs\[0\]\.logprob: must be finite, got -inf$"),
        (dataclasses.replace(m, logprobs=((7, -1),)), r"^token_result: logprobs\[0\]\.logprob: must be a float, got int$"),
        (dataclasses.replace(m, logprobs=((7, np.float64(-1.0)),)), r"^token_result: logprobs\[0\]\.logprob: must be a float, got float64$"),
        (dataclasses.replace(m, logprobs=((7, -1.0, 3),)), r"^token_result: logprobs\[0\]: must have at most 2 items, got 3$"),
        (dataclasses.replace(m, logprobs=((6, -1.0),)), r"^token_result: logprobs\[0\]\.token_id: must be the result's token_id 7, got 6$"),
        (dataclasses.replace(m, logprobs=((7, -1.0), (-1, -2.0))), r"^token_result: logprobs\[1\]\.token_id: must be >= 0, got -1$"),
    ):
        with pytest.raises(CodecError, match=why):
            enc(bad)
        if COMPILED:
            with pytest.raises(CodecError):
                encode_strict(bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_node_stats_round_trip_and_rules(impl) -> None:
    enc, dec = impl
    m = NodeStats(node_id=3, now=1.5, kv_used=10, kv_capacity=100, queued=2, peers=(4, -1), bytes_out=(1 << 40, 7),
                  bad_frames=1)
    frames = enc(m)
    assert frames[0] == b"\x0c" and msgpack.unpackb(frames[1]) == [3, 1.5, 10, 100, 2, [4, -1], [1 << 40, 7], 1, [], [], 0, 0.0]
    assert dec(_frame_bytes(frames)) == m
    with pytest.raises(CodecError, match=r"^node_stats: bytes_out: one count per peer: 2 peers, 1 counts$"):
        enc(NodeStats(node_id=3, now=1.5, kv_used=0, kv_capacity=1, queued=0, peers=(4, -1), bytes_out=(1,)))
    with pytest.raises(CodecError, match=r"^node_stats: rtt_us: one count per peer: 2 peers, 1 counts$"):
        enc(NodeStats(node_id=3, now=1.5, kv_used=0, kv_capacity=1, queued=0, peers=(4, -1), bytes_out=(1, 2),
                      rtt_us=(5,)))
    with pytest.raises(CodecError, match=r"^node_stats: peers"):
        enc(NodeStats(node_id=3, now=1.5, kv_used=0, kv_capacity=1, queued=0, peers=(-2,), bytes_out=(1,)))
