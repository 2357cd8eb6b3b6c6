# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled twin of helix_async/_codec_py.py (the specification; read it first).

The hot messages (prompt_work, decode_work, activations, token_result, feedback) are encoded and
decoded here, and sized (``wire_size``: the encoder run with a writer that only counts bytes, so it
accepts exactly what the encoder accepts; anything else goes to the pure-Python ``wire_size``):
msgpack is written and parsed by hand for their fixed layouts, producing the bytes
``msgpack.packb(..., use_bin_type=True)`` produces (smallest int encoding, float64, fixarray /
array16 / array32, fixstr / str8 / str16 / str32) and accepting every valid msgpack encoding of
the fields that ``msgpack.unpackb`` accepts. Decoded messages are built without running the
dataclass ``__init__``: a fresh instance from the type's allocator gets its slots written at the
offsets of the class's slot descriptors (checked at import), an equal instance of the same class.

Bounded work: every array header is checked against the bytes left (an item takes one byte at
least) and against its limit, and a container is allocated at its declared size only when that is
small (routes are checked in place first, token ids and shapes beyond PREALLOC_MAX items too), so a
hostile payload costs at most a pass over its bytes here before the rejection; the pure-Python
codec, which then names the error, is bounded the same way (see its docstring).

Errors: the fast paths only say accept or reject (None); the encoder's also lets through the
``CodecError`` of the shared tensor helper. On a rejection ``encode``/``decode`` rerun the
pure-Python codec, which raises the canonical ``CodecError`` (and would return its result if the
fast path were ever stricter than the spec; the test suite compares the two through
``_encode_strict``/``_decode_strict``, which do not fall back). Any other exception is a bug of
the fast path (or a failing helper, or MemoryError) and propagates: it is never hidden by a
silent re-encode. Other message types, and limits that do not fit a C long long, go to the
pure-Python codec directly. ``wire_size`` (no limits: its counting writer checks against the
default ones, and remembers the routes it checked) hands what its fast path rejects to the
pure-Python ``wire_size``. Tensors to encode are checked by the same Python helper
(``tensor_to_wire``) in both codecs; received tensor frames are checked here (size against the
descriptor, span against ``max_frame_bytes``) and wrapped as ``tensor_from_wire`` does
(``np.ndarray(shape, dtype, buffer=frame)``, no copy; an array numpy refuses is a rejection).
"""

from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcpy
from libc.stdlib cimport malloc, realloc, free
from libc.math cimport isfinite

import numpy as np

from helix_async import _codec_py as _py
from helix_async import messages as _m
from helix_async import sampling as _sampling

cdef extern from "Python.h":
    bint c_long_check "PyLong_Check"(PyObject* o)
    bint c_bool_check "PyBool_Check"(PyObject* o)
    bint c_float_check "PyFloat_Check"(PyObject* o)
    bint c_float_check_exact "PyFloat_CheckExact"(PyObject* o)
    bint c_tuple_check "PyTuple_Check"(PyObject* o)
    bint c_list_check "PyList_Check"(PyObject* o)
    bint c_bytes_check_exact "PyBytes_CheckExact"(PyObject* o)
    bint c_unicode_check "PyUnicode_Check"(PyObject* o)
    char* c_bytes_as_string "PyBytes_AS_STRING"(PyObject* o)
    Py_ssize_t c_bytes_size "PyBytes_GET_SIZE"(PyObject* o)
    Py_ssize_t c_tuple_size "PyTuple_GET_SIZE"(PyObject* o)
    PyObject* c_tuple_item "PyTuple_GET_ITEM"(PyObject* o, Py_ssize_t i)
    double c_float_as_double "PyFloat_AS_DOUBLE"(PyObject* o)
    long long c_long_as_ll_ovf "PyLong_AsLongLongAndOverflow"(PyObject* o, int* overflow)
    double c_long_as_double "PyLong_AsDouble"(PyObject* o)
    const char* c_unicode_utf8 "PyUnicode_AsUTF8AndSize"(PyObject* o, Py_ssize_t* size)
    PyObject* c_err_occurred "PyErr_Occurred"()
    void c_err_clear "PyErr_Clear"()
    object PyType_GenericAlloc(PyTypeObject* t, Py_ssize_t nitems)
    PyObject* Py_True
    PyObject* Py_False
    object PyBytes_FromStringAndSize(const char* s, Py_ssize_t n)
    object PyLong_FromLongLong(long long v)
    object PyFloat_FromDouble(double v)
    Py_ssize_t PY_SSIZE_T_MAX

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
        int flags
    int T_OBJECT_EX
    int READONLY

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member

cdef enum:
    STACK_BYTES = 512  # payloads up to this size are built on the C stack

cdef long long I32_MAX = 2147483647
cdef long long I32_MIN = -2147483648
cdef long long I64_MAX = 9223372036854775807
cdef long long MAX_LP = _sampling.MAX_LOGPROBS  # most top log-probabilities a request asks for

cdef object _COLD = object()  # "not a hot message: the pure-Python codec handles it"

# --- slot layouts of the hot message classes --------------------------------------------------------

cdef type PromptWork_t = _m.PromptWork
cdef type DecodeWork_t = _m.DecodeWork
cdef type Activations_t = _m.Activations
cdef type TokenResult_t = _m.TokenResult
cdef type Feedback_t = _m.Feedback

cdef Py_ssize_t OFF_PW[24]
cdef Py_ssize_t OFF_DW[8]
cdef Py_ssize_t OFF_AC[5]
cdef Py_ssize_t OFF_TR[7]
cdef Py_ssize_t OFF_FB[4]

cdef object TAG_PW = _py.TAG_FRAMES[int(_m.MsgType.PROMPT_WORK)]
cdef object TAG_DW = _py.TAG_FRAMES[int(_m.MsgType.DECODE_WORK)]
cdef object TAG_AC = _py.TAG_FRAMES[int(_m.MsgType.ACTIVATIONS)]
cdef object TAG_TR = _py.TAG_FRAMES[int(_m.MsgType.TOKEN_RESULT)]
cdef object TAG_FB = _py.TAG_FRAMES[int(_m.MsgType.FEEDBACK)]
cdef int T_PW = _m.MsgType.PROMPT_WORK
cdef int T_DW = _m.MsgType.DECODE_WORK
cdef int T_AC = _m.MsgType.ACTIVATIONS
cdef int T_TR = _m.MsgType.TOKEN_RESULT
cdef int T_FB = _m.MsgType.FEEDBACK

cdef object _tensor_to_wire = _py.tensor_to_wire
cdef object _zero_frame = _py.zero_frame
cdef object _py_wire_size = _py.wire_size
cdef object _DEFAULT_LIMITS = _py.DEFAULT_LIMITS
cdef object CodecError = _py.CodecError
cdef dict _DTYPES = _py.DTYPES
cdef dict _DT_INFO = {name: (dt, dt.itemsize) for name, dt in _py.DTYPES.items()}
cdef object _ndarray = np.ndarray


cdef int _slot_offsets(type cls, tuple expected, Py_ssize_t* out) except -1:
    if cls.FIELDS != expected:
        raise ImportError(
            f"helix_async._ext._codec was built for {cls.__name__} fields {expected}, "
            f"the class has {cls.FIELDS}: rebuild with `pip install -e .`"
        )
    if cls.__new__ is not object.__new__ or cls.__dictoffset__ != 0:
        raise ImportError(f"{cls.__name__} must be a slotted class without a custom __new__")
    cdef PyMemberDef* m
    for i, name in enumerate(expected):
        d = cls.__dict__.get(name)
        if type(d).__name__ != "member_descriptor":
            raise ImportError(f"{cls.__name__}.{name} is not a slot")
        m = (<PyMemberDescrObject*><PyObject*>d).d_member
        if m.type != T_OBJECT_EX or m.flags & READONLY:
            raise ImportError(f"{cls.__name__}.{name} is not a writable object slot")
        out[i] = m.offset
    return 0


_slot_offsets(PromptWork_t, (
    "request_id", "query_id", "route", "stage", "num_tokens", "token_ids", "max_tokens", "sent_at", "tensors",
    "payload_bytes", "temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "stop_token_ids", "logprobs", "context_ids", "generated", "priority",
), OFF_PW)
_slot_offsets(DecodeWork_t, (
    "request_id", "route", "stage", "context_len", "token_id", "sent_at", "tensors", "payload_bytes"
), OFF_DW)
_slot_offsets(Activations_t, ("request_id", "stage", "num_tokens", "sent_at", "tensors"), OFF_AC)
_slot_offsets(
    TokenResult_t, ("request_id", "token_id", "context_len", "finished", "sent_at", "route", "logprobs"), OFF_TR
)
_slot_offsets(Feedback_t, ("request_id", "node_id", "delay", "sent_at"), OFF_FB)


cdef inline PyObject* _get(object obj, Py_ssize_t off) noexcept:
    # borrowed; NULL when the slot was never set
    return (<PyObject**>((<char*><PyObject*>obj) + off))[0]


cdef inline void _set(object obj, Py_ssize_t off, object v) noexcept:
    # only on a fresh instance (slot still NULL)
    Py_INCREF(v)
    (<PyObject**>((<char*><PyObject*>obj) + off))[0] = <PyObject*>v


# --- limits --------------------------------------------------------------------------------------

cdef struct CLimits:
    long long max_frame
    long long max_route
    long long max_tensors
    long long max_ndim


cdef CLimits DEFAULT_C


cdef long long LL_MIN = -9223372036854775807LL - 1


cdef int _limits(object limits, CLimits* out) except -1:
    # 0 = ok; 1 = a limit is not an int that fits a long long (the pure-Python codec handles those)
    if limits is None:
        out[0] = DEFAULT_C
        return 0
    frame = limits.max_frame_bytes
    route = limits.max_route_stages
    tensors = limits.max_tensors
    ndim = limits.max_ndim
    if (o_int(<PyObject*>frame, LL_MIN, I64_MAX, &out.max_frame) < 0
            or o_int(<PyObject*>route, LL_MIN, I64_MAX, &out.max_route) < 0
            or o_int(<PyObject*>tensors, LL_MIN, I64_MAX, &out.max_tensors) < 0
            or o_int(<PyObject*>ndim, LL_MIN, I64_MAX, &out.max_ndim) < 0):
        return 1
    return 0


if _limits(_DEFAULT_LIMITS, &DEFAULT_C) != 0:
    raise ImportError("helix_async._codec_py.DEFAULT_LIMITS do not fit a C long long")


# --- reading Python values (borrowed PyObject*; 0 = ok, -1 = reject, no exception left set) -----

cdef inline int o_int(PyObject* o, long long lo, long long hi, long long* out) noexcept:
    cdef int ovf = 0
    cdef long long v
    if o == NULL or not c_long_check(o) or c_bool_check(o):
        return -1
    v = c_long_as_ll_ovf(o, &ovf)
    if ovf != 0:
        return -1
    if v == -1 and c_err_occurred() != NULL:
        c_err_clear()
        return -1
    if v < lo or v > hi:
        return -1
    out[0] = v
    return 0


cdef inline int o_float(PyObject* o, double* out) noexcept:
    cdef double d
    if o == NULL:
        return -1
    if c_float_check(o):
        d = c_float_as_double(o)
    elif c_long_check(o) and not c_bool_check(o):
        d = c_long_as_double(o)
        if d == -1.0 and c_err_occurred() != NULL:
            c_err_clear()
            return -1
    else:
        return -1
    if not isfinite(d):
        return -1
    out[0] = d
    return 0


# --- msgpack writer ------------------------------------------------------------------------------

cdef struct Writer:
    unsigned char* p  # NULL: a counting writer (wire_size), which only adds up the bytes in n
    Py_ssize_t n
    Py_ssize_t cap
    bint heap


cdef inline int int_size(long long v) noexcept:
    # bytes of msgpack's smallest encoding of v (as w_int writes it)
    if v >= 0:
        if v < 128:
            return 1
        if v < 256:
            return 2
        if v < 65536:
            return 3
        return 5 if v < 4294967296LL else 9
    if v >= -32:
        return 1
    if v >= -128:
        return 2
    if v >= -32768:
        return 3
    return 5 if v >= -2147483648LL else 9


cdef inline Py_ssize_t array_header_size(Py_ssize_t n) noexcept:
    return 1 if n < 16 else (3 if n < 65536 else 5)


cdef int w_grow(Writer* w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = w.cap * 2
    cdef unsigned char* q
    if cap < w.n + extra:
        cap = w.n + extra
    if w.heap:
        q = <unsigned char*>realloc(w.p, cap)
    else:
        q = <unsigned char*>malloc(cap)
        if q != NULL:
            memcpy(q, w.p, w.n)
    if q == NULL:
        raise MemoryError()
    w.p = q
    w.cap = cap
    w.heap = True
    return 0


cdef inline int w_reserve(Writer* w, Py_ssize_t extra) except -1:
    if w.n + extra > w.cap:
        w_grow(w, extra)
    return 0


cdef inline void be16(unsigned char* q, unsigned long long x) noexcept:
    q[0] = <unsigned char>(x >> 8)
    q[1] = <unsigned char>x


cdef inline void be32(unsigned char* q, unsigned long long x) noexcept:
    q[0] = <unsigned char>(x >> 24)
    q[1] = <unsigned char>(x >> 16)
    q[2] = <unsigned char>(x >> 8)
    q[3] = <unsigned char>x


cdef inline void be64(unsigned char* q, unsigned long long x) noexcept:
    be32(q, x >> 32)
    be32(q + 4, x & 0xffffffffULL)


cdef inline int w_int(Writer* w, long long v) except -1:
    # msgpack's choice: positive fixint, uint8/16/32/64 for v >= 0; negative fixint, int8/16/32/64
    if w.p == NULL:
        w.n += int_size(v)
        return 0
    w_reserve(w, 9)
    cdef unsigned char* q = w.p + w.n
    cdef unsigned long long u = <unsigned long long>v
    if v >= 0:
        if v < 128:
            q[0] = <unsigned char>v
            w.n += 1
        elif v < 256:
            q[0] = 0xcc
            q[1] = <unsigned char>v
            w.n += 2
        elif v < 65536:
            q[0] = 0xcd
            be16(q + 1, u)
            w.n += 3
        elif v < 4294967296LL:
            q[0] = 0xce
            be32(q + 1, u)
            w.n += 5
        else:
            q[0] = 0xcf
            be64(q + 1, u)
            w.n += 9
    elif v >= -32:
        q[0] = <unsigned char>(u & 0xff)
        w.n += 1
    elif v >= -128:
        q[0] = 0xd0
        q[1] = <unsigned char>(u & 0xff)
        w.n += 2
    elif v >= -32768:
        q[0] = 0xd1
        be16(q + 1, u & 0xffff)
        w.n += 3
    elif v >= -2147483648LL:
        q[0] = 0xd2
        be32(q + 1, u & 0xffffffffULL)
        w.n += 5
    else:
        q[0] = 0xd3
        be64(q + 1, u)
        w.n += 9
    return 0


cdef inline int w_double(Writer* w, double d) except -1:
    cdef unsigned long long u
    if w.p == NULL:
        w.n += 9
        return 0
    w_reserve(w, 9)
    memcpy(&u, &d, 8)
    w.p[w.n] = 0xcb
    be64(w.p + w.n + 1, u)
    w.n += 9
    return 0


cdef inline int w_byte(Writer* w, unsigned char b) except -1:
    if w.p == NULL:
        w.n += 1
        return 0
    w_reserve(w, 1)
    w.p[w.n] = b
    w.n += 1
    return 0


cdef inline int w_array(Writer* w, Py_ssize_t n) except -1:
    if w.p == NULL:
        w.n += array_header_size(n)
        return 0
    w_reserve(w, 5)
    cdef unsigned char* q = w.p + w.n
    if n < 16:
        q[0] = <unsigned char>(0x90 | n)
        w.n += 1
    elif n < 65536:
        q[0] = 0xdc
        be16(q + 1, <unsigned long long>n)
        w.n += 3
    else:
        q[0] = 0xdd
        be32(q + 1, <unsigned long long>n)
        w.n += 5
    return 0


cdef int w_str(Writer* w, const char* s, Py_ssize_t n) except -1:
    if w.p == NULL:
        w.n += n + (1 if n < 32 else (2 if n < 256 else (3 if n < 65536 else 5)))
        return 0
    w_reserve(w, n + 5)
    cdef unsigned char* q = w.p + w.n
    if n < 32:
        q[0] = <unsigned char>(0xa0 | n)
        w.n += 1
    elif n < 256:
        q[0] = 0xd9
        q[1] = <unsigned char>n
        w.n += 2
    elif n < 65536:
        q[0] = 0xda
        be16(q + 1, <unsigned long long>n)
        w.n += 3
    else:
        q[0] = 0xdb
        be32(q + 1, <unsigned long long>n)
        w.n += 5
    memcpy(w.p + w.n, s, n)
    w.n += n
    return 0


# --- encoding the hot messages (return frames, or None to reject) ---------------------------------

# The counting writer (wire_size) remembers the routes it has checked: every message of a request
# carries the same route tuple, and a tuple of tuples of ints that was a valid route stays one (the
# entry holds a reference, so its address names that tuple while it is cached). Direct-mapped by
# address; the limits are checked again on a hit (only the stage count depends on them).
cdef struct RouteEntry:
    PyObject* route  # a strong reference, or NULL
    Py_ssize_t size  # bytes in the payload
cdef enum:
    ROUTE_SLOTS = 256
cdef RouteEntry _ROUTE_SIZES[ROUTE_SLOTS]


cdef int e_route(Writer* w, PyObject* o, CLimits* lim, Py_ssize_t min_len, Py_ssize_t* n_out) except -2:
    # -1 = reject; the route's stage tuples: node 0..I32, 0 <= start < end <= I32, contiguous
    cdef Py_ssize_t n, i, begin = w.n
    cdef PyObject* st
    cdef long long node, start, end, prev_end = -1
    cdef RouteEntry* slot = &_ROUTE_SIZES[(<size_t>o >> 4) % ROUTE_SLOTS]
    if o == NULL or not c_tuple_check(o):
        return -1
    n = c_tuple_size(o)
    if n < min_len or n > lim.max_route:
        return -1
    if w.p == NULL and slot.route == o:
        w.n += slot.size
        n_out[0] = n
        return 0
    w_array(w, n)
    for i in range(n):
        st = c_tuple_item(o, i)
        if not c_tuple_check(st) or c_tuple_size(st) != 3:
            return -1
        if (o_int(c_tuple_item(st, 0), 0, I32_MAX, &node) < 0
                or o_int(c_tuple_item(st, 1), 0, I32_MAX, &start) < 0
                or o_int(c_tuple_item(st, 2), 0, I32_MAX, &end) < 0
                or end <= start
                or (i > 0 and start != prev_end)):
            return -1
        prev_end = end
        w_byte(w, 0x93)
        w_int(w, node)
        w_int(w, start)
        w_int(w, end)
    if w.p == NULL and n > 0:
        Py_XDECREF(slot.route)
        Py_INCREF(<object>o)
        slot.route = o
        slot.size = w.n - begin
    n_out[0] = n
    return 0


cdef list _NO_FRAMES = []  # shared, never mutated


cdef object e_tensors(Writer* w, PyObject* o, CLimits* lim, long long min_count, str name, object limits):
    # writes the descriptors; returns the list of tensor frames, or None to reject
    cdef Py_ssize_t n, i, k, nd, slen
    cdef const char* s
    if o == NULL or not c_tuple_check(o):
        return None
    n = c_tuple_size(o)
    if n < min_count or n > lim.max_tensors:
        return None
    w_array(w, n)
    if n == 0:
        return _NO_FRAMES
    if limits is None:
        limits = _DEFAULT_LIMITS
    tensors = <tuple>o
    frames = []
    for i in range(n):
        dtype_name, shape, frame = _tensor_to_wire(tensors[i], name, i, limits)
        frames.append(frame)
        w_byte(w, 0x92)
        s = c_unicode_utf8(<PyObject*>dtype_name, &slen)
        w_str(w, s, slen)
        nd = len(shape)
        w_array(w, nd)
        for k in range(nd):
            w_int(w, <long long>shape[k])
    return frames


cdef object _frames(object tag, Writer* w, list tensor_frames, long long payload_bytes):
    # [tag, payload, tensor frames..., the modelled payload's zero frame when payload_bytes > 0]
    cdef Py_ssize_t nt = len(tensor_frames), i
    out = PyList_New(2 + nt + (1 if payload_bytes > 0 else 0))
    Py_INCREF(tag)
    PyList_SET_ITEM(out, 0, tag)
    payload = PyBytes_FromStringAndSize(<char*>w.p, w.n)
    Py_INCREF(payload)
    PyList_SET_ITEM(out, 1, payload)
    for i in range(nt):
        f = tensor_frames[i]
        Py_INCREF(f)
        PyList_SET_ITEM(out, 2 + i, f)
    if payload_bytes > 0:
        f = _zero_frame(payload_bytes)
        Py_INCREF(f)
        PyList_SET_ITEM(out, 2 + nt, f)
    return out


cdef inline int e_payload_bytes(PyObject* o, CLimits* lim, long long* out) noexcept:
    # -1 = reject: payload_bytes is 0, or 1..max_frame_bytes
    if o_int(o, 0, I64_MAX, out) < 0 or (out[0] > 0 and out[0] > lim.max_frame):
        return -1
    return 0


cdef int e_ints(Writer* w, PyObject* o, long long lo, long long hi, Py_ssize_t* n_out) except -2:
    # a tuple of ints in [lo, hi] (at most 5 bytes each: lo, hi within the int32 range); -1 = reject
    cdef Py_ssize_t n, i
    cdef long long v
    if o == NULL or not c_tuple_check(o):
        return -1
    n = c_tuple_size(o)
    w_array(w, n)
    w_reserve(w, 5 * n)
    for i in range(n):
        if o_int(c_tuple_item(o, i), lo, hi, &v) < 0:
            return -1
        w_int(w, v)
    n_out[0] = n
    return 0


cdef int e_logprobs(Writer* w, PyObject* o, long long token_id) except -2:
    # token_result.logprobs: 0..1 + MAX_LP pairs (token id 0..I32, an exact float, finite, <= 0),
    # the first one's id token_id; -1 = reject
    cdef Py_ssize_t n, i
    cdef PyObject* pair
    cdef PyObject* f
    cdef long long tok
    cdef double d
    if o == NULL or not c_tuple_check(o):
        return -1
    n = c_tuple_size(o)
    if n > 1 + MAX_LP:
        return -1
    w_array(w, n)
    for i in range(n):
        pair = c_tuple_item(o, i)
        if not c_tuple_check(pair) or c_tuple_size(pair) != 2:
            return -1
        if o_int(c_tuple_item(pair, 0), 0, I32_MAX, &tok) < 0 or (i == 0 and tok != token_id):
            return -1
        f = c_tuple_item(pair, 1)
        if not c_float_check_exact(f):
            return -1
        d = c_float_as_double(f)
        if not isfinite(d) or d > 0:
            return -1
        w_byte(w, 0x92)
        w_int(w, tok)
        w_double(w, d)
    return 0


# Each enc_* writes the payload of a valid message to w (a counting writer: only its size) and
# returns its tensor frames, with its modelled payload's size in payload_bytes; None to reject.

cdef object enc_decode_work(object msg, Writer* w, CLimits* lim, object limits, long long* payload_bytes):
    cdef long long request_id, stage, context_len, token_id
    cdef double sent_at
    cdef Py_ssize_t nroute
    if (o_int(_get(msg, OFF_DW[0]), 0, I64_MAX, &request_id) < 0):
        return None
    w_byte(w, 0x98)
    w_int(w, request_id)
    if e_route(w, _get(msg, OFF_DW[1]), lim, 1, &nroute) < 0:
        return None
    if (o_int(_get(msg, OFF_DW[2]), 0, I32_MAX, &stage) < 0
            or o_int(_get(msg, OFF_DW[3]), 1, I32_MAX, &context_len) < 0
            or o_int(_get(msg, OFF_DW[4]), -1, I32_MAX, &token_id) < 0
            or o_float(_get(msg, OFF_DW[5]), &sent_at) < 0):
        return None
    w_int(w, stage)
    w_int(w, context_len)
    w_int(w, token_id)
    w_double(w, sent_at)
    frames = e_tensors(w, _get(msg, OFF_DW[6]), lim, 0, "decode_work", limits)
    if frames is None or e_payload_bytes(_get(msg, OFF_DW[7]), lim, payload_bytes) < 0:
        return None
    w_int(w, payload_bytes[0])
    # exactly one of a token id, tensors, a modelled payload
    if stage >= nroute or (token_id >= 0) + (len(frames) > 0) + (payload_bytes[0] > 0) != 1:
        return None
    return frames


cdef object enc_prompt_work(object msg, Writer* w, CLimits* lim, object limits, long long* payload_bytes):
    cdef long long request_id, query_id, stage, num_tokens, max_tokens, tok, seed
    cdef long long top_k, min_tokens, logprobs, generated, priority
    cdef double sent_at, temperature, top_p, min_p, presence, frequency, repetition
    cdef Py_ssize_t nroute, nids, i, nstop, ncids
    cdef PyObject* ids
    if (o_int(_get(msg, OFF_PW[0]), 0, I64_MAX, &request_id) < 0
            or o_int(_get(msg, OFF_PW[1]), 0, I64_MAX, &query_id) < 0):
        return None
    w_array(w, 24)
    w_int(w, request_id)
    w_int(w, query_id)
    if e_route(w, _get(msg, OFF_PW[2]), lim, 1, &nroute) < 0:
        return None
    if (o_int(_get(msg, OFF_PW[3]), 0, I32_MAX, &stage) < 0
            or o_int(_get(msg, OFF_PW[4]), 1, I32_MAX, &num_tokens) < 0):
        return None
    w_int(w, stage)
    w_int(w, num_tokens)
    ids = _get(msg, OFF_PW[5])
    if ids == NULL or not c_tuple_check(ids):
        return None
    nids = c_tuple_size(ids)
    w_array(w, nids)
    w_reserve(w, 5 * nids)
    for i in range(nids):
        if o_int(c_tuple_item(ids, i), 0, I32_MAX, &tok) < 0:
            return None
        w_int(w, tok)
    if (o_int(_get(msg, OFF_PW[6]), 1, I32_MAX, &max_tokens) < 0
            or o_float(_get(msg, OFF_PW[7]), &sent_at) < 0):
        return None
    w_int(w, max_tokens)
    w_double(w, sent_at)
    frames = e_tensors(w, _get(msg, OFF_PW[8]), lim, 0, "prompt_work", limits)
    if frames is None or e_payload_bytes(_get(msg, OFF_PW[9]), lim, payload_bytes) < 0:
        return None
    w_int(w, payload_bytes[0])
    if (o_float(_get(msg, OFF_PW[10]), &temperature) < 0 or temperature < 0
            or o_float(_get(msg, OFF_PW[11]), &top_p) < 0 or not (0 < top_p <= 1)
            or o_int(_get(msg, OFF_PW[12]), 0, I64_MAX, &seed) < 0):
        return None
    w_double(w, temperature)
    w_double(w, top_p)
    w_int(w, seed)
    if (o_int(_get(msg, OFF_PW[13]), 0, I32_MAX, &top_k) < 0
            or o_float(_get(msg, OFF_PW[14]), &min_p) < 0 or min_p < 0 or min_p > 1
            or o_float(_get(msg, OFF_PW[15]), &presence) < 0 or presence < -2 or presence > 2
            or o_float(_get(msg, OFF_PW[16]), &frequency) < 0 or frequency < -2 or frequency > 2
            or o_float(_get(msg, OFF_PW[17]), &repetition) < 0 or not (repetition > 0)
            or o_int(_get(msg, OFF_PW[18]), 0, I32_MAX, &min_tokens) < 0):
        return None
    w_int(w, top_k)
    w_double(w, min_p)
    w_double(w, presence)
    w_double(w, frequency)
    w_double(w, repetition)
    w_int(w, min_tokens)
    if (e_ints(w, _get(msg, OFF_PW[19]), 0, I32_MAX, &nstop) < 0
            or o_int(_get(msg, OFF_PW[20]), -1, MAX_LP, &logprobs) < 0):
        return None
    w_int(w, logprobs)
    if (e_ints(w, _get(msg, OFF_PW[21]), 0, I32_MAX, &ncids) < 0
            or o_int(_get(msg, OFF_PW[22]), 0, I32_MAX, &generated) < 0
            or o_int(_get(msg, OFF_PW[23]), I32_MIN, I32_MAX, &priority) < 0):
        return None
    w_int(w, generated)
    w_int(w, priority)
    # exactly one of token ids (num_tokens of them), tensors, a modelled payload; context ids only
    # without token ids (num_tokens of them); generated < num_tokens
    if (stage >= nroute or (nids > 0 and nids != num_tokens)
            or (nids > 0) + (len(frames) > 0) + (payload_bytes[0] > 0) != 1
            or (ncids > 0 and (nids > 0 or ncids != num_tokens))
            or generated >= num_tokens):
        return None
    return frames


cdef object enc_activations(object msg, Writer* w, CLimits* lim, object limits):
    cdef long long request_id, stage, num_tokens
    cdef double sent_at
    if (o_int(_get(msg, OFF_AC[0]), 0, I64_MAX, &request_id) < 0
            or o_int(_get(msg, OFF_AC[1]), 0, I32_MAX, &stage) < 0
            or o_int(_get(msg, OFF_AC[2]), 0, I32_MAX, &num_tokens) < 0
            or o_float(_get(msg, OFF_AC[3]), &sent_at) < 0):
        return None
    w_byte(w, 0x95)
    w_int(w, request_id)
    w_int(w, stage)
    w_int(w, num_tokens)
    w_double(w, sent_at)
    return e_tensors(w, _get(msg, OFF_AC[4]), lim, 1, "activations", limits)


cdef object enc_token_result(object msg, Writer* w, CLimits* lim):
    cdef long long request_id, token_id, context_len
    cdef double sent_at
    cdef Py_ssize_t nroute
    cdef PyObject* fin = _get(msg, OFF_TR[3])
    if (o_int(_get(msg, OFF_TR[0]), 0, I64_MAX, &request_id) < 0
            or o_int(_get(msg, OFF_TR[1]), 0, I32_MAX, &token_id) < 0
            or o_int(_get(msg, OFF_TR[2]), 1, I32_MAX, &context_len) < 0
            or (fin != Py_True and fin != Py_False)
            or o_float(_get(msg, OFF_TR[4]), &sent_at) < 0):
        return None
    w_byte(w, 0x97)
    w_int(w, request_id)
    w_int(w, token_id)
    w_int(w, context_len)
    w_byte(w, 0xc3 if fin == Py_True else 0xc2)
    w_double(w, sent_at)
    if (e_route(w, _get(msg, OFF_TR[5]), lim, 0, &nroute) < 0
            or e_logprobs(w, _get(msg, OFF_TR[6]), token_id) < 0):
        return None
    return _NO_FRAMES


cdef object enc_feedback(object msg, Writer* w):
    cdef long long request_id, node_id
    cdef double delay, sent_at
    if (o_int(_get(msg, OFF_FB[0]), 0, I64_MAX, &request_id) < 0
            or o_int(_get(msg, OFF_FB[1]), 0, I32_MAX, &node_id) < 0
            or o_float(_get(msg, OFF_FB[2]), &delay) < 0
            or delay < 0
            or o_float(_get(msg, OFF_FB[3]), &sent_at) < 0):
        return None
    w_byte(w, 0x94)
    w_int(w, request_id)
    w_int(w, node_id)
    w_double(w, delay)
    w_double(w, sent_at)
    return _NO_FRAMES


cdef object _encode_body(type t, object msg, Writer* w, CLimits* lim, object limits, long long* payload_bytes):
    # the tensor frames of a hot message (payload in w), None to reject; _COLD for other types
    payload_bytes[0] = 0
    if t is DecodeWork_t:
        return enc_decode_work(msg, w, lim, limits, payload_bytes)
    if t is TokenResult_t:
        return enc_token_result(msg, w, lim)
    if t is PromptWork_t:
        return enc_prompt_work(msg, w, lim, limits, payload_bytes)
    if t is Feedback_t:
        return enc_feedback(msg, w)
    if t is Activations_t:
        return enc_activations(msg, w, lim, limits)
    return _COLD


cdef object _fast_encode(object msg, object limits):
    cdef type t = type(msg)
    cdef CLimits lim
    cdef unsigned char stack[STACK_BYTES]
    cdef Writer w
    cdef long long payload_bytes
    if (t is not DecodeWork_t and t is not PromptWork_t and t is not TokenResult_t and t is not Activations_t
            and t is not Feedback_t):
        return _COLD
    if _limits(limits, &lim):
        return _COLD
    w.p = stack
    w.n = 0
    w.cap = STACK_BYTES
    w.heap = False
    try:
        frames = _encode_body(t, msg, &w, &lim, limits, &payload_bytes)
        if frames is None or w.n > lim.max_frame:
            return None
        if t is DecodeWork_t:
            tag = TAG_DW
        elif t is TokenResult_t:
            tag = TAG_TR
        elif t is PromptWork_t:
            tag = TAG_PW
        elif t is Feedback_t:
            tag = TAG_FB
        else:
            tag = TAG_AC
        return _frames(tag, &w, frames, payload_bytes)
    finally:
        if w.heap:
            free(w.p)


def encode(msg, limits=None):
    """Frames of ``msg`` (see helix_async.codec.encode); raises CodecError on invalid messages."""
    try:
        r = _fast_encode(msg, limits)
    except CodecError:
        # the tensor helper refused a tensor: the pure-Python codec raises the canonical error
        # (the first bad field in field order). Any other exception is a bug: it propagates
        r = None
    if r is None or r is _COLD:
        return _py.encode(msg, limits)
    return r


def _encode_strict(msg, limits=None):
    """Compiled encoder without the fallback (tests): CodecError when it rejects ``msg``."""
    r = _fast_encode(msg, limits)
    if r is _COLD:
        return _py.encode(msg, limits)
    if r is None:
        raise CodecError(type(msg).__name__, "message", "rejected by the compiled encoder")
    return r


cdef long long _fast_wire_size(object msg) except -3:
    # bytes of the frames encode(msg) makes: the encoder's checks with a counting writer (default
    # limits); -1 = rejected (invalid, or beyond the default limits), -2 = not a hot message
    cdef Writer w
    cdef long long payload_bytes, n
    cdef Py_ssize_t i
    w.p = NULL
    w.n = 0
    w.cap = PY_SSIZE_T_MAX
    w.heap = False
    frames = _encode_body(type(msg), msg, &w, &DEFAULT_C, None, &payload_bytes)
    if frames is None:
        return -1
    if frames is _COLD:
        return -2
    n = 1 + w.n + payload_bytes
    for i in range(len(<list>frames)):
        n += len((<list>frames)[i])  # 1-D byte memoryviews, or b""
    return n


def wire_size(msg):
    """Bytes of ``encode(msg)``'s frames, without encoding (see helix_async.codec.wire_size)."""
    cdef long long n
    try:
        n = _fast_wire_size(msg)
    except CodecError:  # a tensor the shared helper refuses: the pure-Python twin decides
        n = -1
    if n < 0:
        return _py_wire_size(msg)
    return n


def _wire_size_strict(msg):
    """Compiled wire_size without the fallback (tests): CodecError when its fast path rejects ``msg``."""
    n = _fast_wire_size(msg)
    if n == -2:
        return _py_wire_size(msg)
    if n == -1:
        raise CodecError(type(msg).__name__, "message", "rejected by the compiled wire_size")
    return n


# --- msgpack reader (0 = ok, -1 = reject: wrong type, truncated, out of range) ---------------------

cdef struct Reader:
    const unsigned char* p
    Py_ssize_t n
    Py_ssize_t i


cdef inline unsigned long long rd16(const unsigned char* q) noexcept:
    return (<unsigned long long>q[0] << 8) | q[1]


cdef inline unsigned long long rd32(const unsigned char* q) noexcept:
    return (<unsigned long long>q[0] << 24) | (<unsigned long long>q[1] << 16) | (<unsigned long long>q[2] << 8) | q[3]


cdef inline unsigned long long rd64(const unsigned char* q) noexcept:
    return (rd32(q) << 32) | rd32(q + 4)


cdef inline int r_int(Reader* r, long long lo, long long hi, long long* out) noexcept:
    cdef Py_ssize_t left = r.n - r.i
    cdef const unsigned char* q = r.p + r.i
    cdef unsigned char c
    cdef long long v
    cdef unsigned long long u
    if left < 1:
        return -1
    c = q[0]
    if c <= 0x7f:
        v = c
        r.i += 1
    elif c >= 0xe0:
        v = <signed char>c
        r.i += 1
    elif c == 0xcc:
        if left < 2:
            return -1
        v = q[1]
        r.i += 2
    elif c == 0xcd:
        if left < 3:
            return -1
        v = <long long>rd16(q + 1)
        r.i += 3
    elif c == 0xce:
        if left < 5:
            return -1
        v = <long long>rd32(q + 1)
        r.i += 5
    elif c == 0xcf:
        if left < 9:
            return -1
        u = rd64(q + 1)
        if u > <unsigned long long>I64_MAX:
            return -1
        v = <long long>u
        r.i += 9
    elif c == 0xd0:
        if left < 2:
            return -1
        v = <signed char>q[1]
        r.i += 2
    elif c == 0xd1:
        if left < 3:
            return -1
        v = <short>rd16(q + 1)
        r.i += 3
    elif c == 0xd2:
        if left < 5:
            return -1
        v = <int>rd32(q + 1)
        r.i += 5
    elif c == 0xd3:
        if left < 9:
            return -1
        v = <long long>rd64(q + 1)
        r.i += 9
    else:
        return -1
    if v < lo or v > hi:
        return -1
    out[0] = v
    return 0


cdef inline int r_float(Reader* r, double* out) noexcept:
    # float32 or float64, finite
    cdef Py_ssize_t left = r.n - r.i
    cdef const unsigned char* q = r.p + r.i
    cdef unsigned long long u
    cdef unsigned int u32
    cdef float f
    cdef double d
    if left >= 9 and q[0] == 0xcb:
        u = rd64(q + 1)
        memcpy(&d, &u, 8)
        r.i += 9
    elif left >= 5 and q[0] == 0xca:
        u32 = <unsigned int>rd32(q + 1)
        memcpy(&f, &u32, 4)
        d = f
        r.i += 5
    else:
        return -1
    if not isfinite(d):
        return -1
    out[0] = d
    return 0


cdef inline int r_array(Reader* r, Py_ssize_t* out) noexcept:
    # array header; the count is also bounded by the bytes left (one byte per item at least)
    cdef Py_ssize_t left = r.n - r.i
    cdef const unsigned char* q = r.p + r.i
    cdef Py_ssize_t n
    if left < 1:
        return -1
    if 0x90 <= q[0] <= 0x9f:
        n = q[0] & 0x0f
        r.i += 1
    elif q[0] == 0xdc and left >= 3:
        n = <Py_ssize_t>rd16(q + 1)
        r.i += 3
    elif q[0] == 0xdd and left >= 5:
        n = <Py_ssize_t>rd32(q + 1)
        r.i += 5
    else:
        return -1
    if n > r.n - r.i:
        return -1
    out[0] = n
    return 0


cdef inline int r_str(Reader* r, const char** s, Py_ssize_t* out) noexcept:
    cdef Py_ssize_t left = r.n - r.i
    cdef const unsigned char* q = r.p + r.i
    cdef Py_ssize_t n
    if left < 1:
        return -1
    if 0xa0 <= q[0] <= 0xbf:
        n = q[0] & 0x1f
        r.i += 1
    elif q[0] == 0xd9 and left >= 2:
        n = q[1]
        r.i += 2
    elif q[0] == 0xda and left >= 3:
        n = <Py_ssize_t>rd16(q + 1)
        r.i += 3
    elif q[0] == 0xdb and left >= 5:
        n = <Py_ssize_t>rd32(q + 1)
        r.i += 5
    else:
        return -1
    if n > r.n - r.i:
        return -1
    s[0] = <const char*>(r.p + r.i)
    r.i += n
    out[0] = n
    return 0


cdef enum:
    # a tuple of ints is allocated at its declared size; beyond this many items (a 32 KiB tuple)
    # the items are checked first (r_ints_scan), so a hostile count allocates nothing
    PREALLOC_MAX = 4096


cdef int r_ints_scan(Reader* r, Py_ssize_t n, long long lo, long long hi) noexcept:
    # check that n ints in [lo, hi] follow, without building them: 0 = ok (r unmoved), -1 = reject
    cdef Py_ssize_t i, begin = r.i
    cdef long long v
    for i in range(n):
        if r_int(r, lo, hi, &v) < 0:
            return -1
    r.i = begin
    return 0


# Decoded routes are interned by their encoded bytes: every decode step of a request carries the
# same route, and looking it up costs less than building its tuples (a 6-stage route: ~50 ns vs
# ~270 ns). Routes are immutable tuples of ints, so sharing them between messages is invisible.
cdef dict _ROUTES = {}
cdef Py_ssize_t ROUTES_MAX = 4096  # then the cache starts over (bounds memory on a long run)


cdef int d_route_scan(Reader* r, CLimits* lim, Py_ssize_t min_len, Py_ssize_t* n_out) noexcept:
    # validate a route without building it: 0 = ok (r moved past it), -1 = reject
    cdef Py_ssize_t n, i, k
    cdef long long node, start, end, prev_end = -1
    if r_array(r, &n) < 0 or n < min_len or n > lim.max_route:
        return -1
    for i in range(n):
        if (r_array(r, &k) < 0 or k != 3
                or r_int(r, 0, I32_MAX, &node) < 0
                or r_int(r, 0, I32_MAX, &start) < 0
                or r_int(r, 0, I32_MAX, &end) < 0
                or end <= start
                or (i > 0 and start != prev_end)):
            return -1
        prev_end = end
    n_out[0] = n
    return 0


cdef object d_route(Reader* r, CLimits* lim, Py_ssize_t min_len):
    # tuple of (node, start, end) tuples (min_len.. of them), or None to reject
    cdef Py_ssize_t n, i, k, begin = r.i
    cdef long long node, start, end
    cdef Reader again
    if d_route_scan(r, lim, min_len, &n) < 0:
        return None
    key = PyBytes_FromStringAndSize(<const char*>(r.p + begin), r.i - begin)
    route = _ROUTES.get(key)
    if route is not None:
        return route
    again.p = r.p
    again.n = r.i
    again.i = begin
    r_array(&again, &k)
    route = PyTuple_New(n)
    for i in range(n):
        r_array(&again, &k)
        r_int(&again, 0, I32_MAX, &node)
        r_int(&again, 0, I32_MAX, &start)
        r_int(&again, 0, I32_MAX, &end)
        st = (PyLong_FromLongLong(node), PyLong_FromLongLong(start), PyLong_FromLongLong(end))
        Py_INCREF(st)
        PyTuple_SET_ITEM(route, i, st)
    if len(_ROUTES) >= ROUTES_MAX:
        _ROUTES.clear()
    _ROUTES[key] = route
    return route


cdef list _NO_DESCS = []  # shared, never mutated


cdef object d_descriptors(Reader* r, CLimits* lim, long long min_count):
    # list of (dtype name, shape tuple), or None to reject
    cdef Py_ssize_t n, i, k, nd, slen
    cdef long long dim
    cdef const char* s
    if r_array(r, &n) < 0 or n < min_count or n > lim.max_tensors:
        return None
    if n == 0:
        return _NO_DESCS
    descs = []
    for i in range(n):
        if r_array(r, &k) < 0 or k != 2 or r_str(r, &s, &slen) < 0:
            return None
        try:
            dtype_name = PyUnicode_DecodeUTF8(s, slen, NULL)
        except UnicodeDecodeError:
            return None
        if dtype_name not in _DTYPES:
            return None
        if (r_array(r, &nd) < 0 or nd > lim.max_ndim
                or (nd > PREALLOC_MAX and r_ints_scan(r, nd, 0, I32_MAX) < 0)):
            return None
        shape = PyTuple_New(nd)
        for k in range(nd):
            if r_int(r, 0, I32_MAX, &dim) < 0:
                return None
            d = PyLong_FromLongLong(dim)
            Py_INCREF(d)
            PyTuple_SET_ITEM(shape, k, d)
        descs.append((dtype_name, shape))
    return descs


cdef object d_tensors(object descs, object frames, Py_ssize_t nfr, CLimits* lim):
    # the arrays over frames 2.. (as tensor_from_wire builds them), or None to reject
    cdef Py_ssize_t n = len(descs), i, k, nd
    cdef long long span, expected, dim, nbytes
    cdef bint empty
    cdef Py_buffer view
    if nfr != 2 + n:
        return None
    if n == 0:
        return ()
    out = PyTuple_New(n)
    for i in range(n):
        dtype_name, shape = descs[i]
        dt, itemsize = _DT_INFO[dtype_name]
        nd = len(shape)
        # the span (itemsize x the nonzero dims, tensor_span) must not exceed max_frame_bytes;
        # it is the size of a non-empty tensor. Checked before multiplying: no overflow
        span = itemsize
        empty = False
        for k in range(nd):
            dim = shape[k]
            if dim == 0:
                empty = True
            elif span > lim.max_frame // dim:
                return None
            else:
                span *= dim
        if span > lim.max_frame:
            return None
        expected = 0 if empty else span
        frame = frames[2 + i]
        try:
            PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
        except Exception:
            return None
        nbytes = view.len
        PyBuffer_Release(&view)
        if nbytes != expected:
            return None
        try:
            arr = _ndarray(shape, dt, frame)
        except Exception:
            return None  # numpy refuses it (it cannot under long long limits): the spec's CodecError
        Py_INCREF(arr)
        PyTuple_SET_ITEM(out, i, arr)
    return out


cdef inline int r_payload_bytes(Reader* r, CLimits* lim, long long* out) noexcept:
    # payload_bytes: 0, or 1..max_frame_bytes
    if r_int(r, 0, I64_MAX, out) < 0 or (out[0] > 0 and out[0] > lim.max_frame):
        return -1
    return 0


cdef int d_modelled_frame(object frames, Py_ssize_t nfr, long long payload_bytes) except -2:
    # frame 2, the modelled payload of a message without tensors: payload_bytes bytes (content
    # not read); 0 = ok, -1 = reject
    cdef Py_buffer view
    cdef Py_ssize_t nbytes
    if nfr != 3:
        return -1
    try:
        PyObject_GetBuffer(frames[2], &view, PyBUF_SIMPLE)
    except Exception:
        return -1
    nbytes = view.len
    PyBuffer_Release(&view)
    return 0 if nbytes == payload_bytes else -1


cdef object d_payload(object descs, object frames, Py_ssize_t nfr, CLimits* lim, long long payload_bytes):
    # the tensors (empty for a modelled payload, which must come alone), or None to reject
    if payload_bytes > 0:
        if len(descs) > 0 or d_modelled_frame(frames, nfr, payload_bytes) < 0:
            return None
        return ()
    return d_tensors(descs, frames, nfr, lim)


cdef object d_ints(Reader* r, long long lo, long long hi, Py_ssize_t count):
    # a tuple of ints in [lo, hi], empty or of exactly count items (count < 0: any count), or
    # None to reject (checked before anything is built beyond PREALLOC_MAX items)
    cdef Py_ssize_t n, i
    cdef long long v
    if (r_array(r, &n) < 0 or (count >= 0 and n > 0 and n != count)
            or (n > PREALLOC_MAX and r_ints_scan(r, n, lo, hi) < 0)):
        return None
    out = PyTuple_New(n)
    for i in range(n):
        if r_int(r, lo, hi, &v) < 0:
            return None
        x = PyLong_FromLongLong(v)
        Py_INCREF(x)
        PyTuple_SET_ITEM(out, i, x)
    return out


cdef object d_logprobs(Reader* r, long long token_id):
    # token_result.logprobs (see e_logprobs), or None to reject
    cdef Py_ssize_t n, k, i
    cdef long long tok
    cdef double d
    if r_array(r, &n) < 0 or n > 1 + MAX_LP:
        return None
    out = PyTuple_New(n)
    for i in range(n):
        if (r_array(r, &k) < 0 or k != 2
                or r_int(r, 0, I32_MAX, &tok) < 0 or (i == 0 and tok != token_id)
                or r_float(r, &d) < 0 or d > 0):
            return None
        pair = (PyLong_FromLongLong(tok), PyFloat_FromDouble(d))
        Py_INCREF(pair)
        PyTuple_SET_ITEM(out, i, pair)
    return out


cdef object dec_decode_work(Reader* r, CLimits* lim, object frames, Py_ssize_t nfr):
    cdef Py_ssize_t n
    cdef long long request_id, stage, context_len, token_id, payload_bytes
    cdef double sent_at
    if r_array(r, &n) < 0 or n != 8 or r_int(r, 0, I64_MAX, &request_id) < 0:
        return None
    route = d_route(r, lim, 1)
    if (route is None
            or r_int(r, 0, I32_MAX, &stage) < 0
            or r_int(r, 1, I32_MAX, &context_len) < 0
            or r_int(r, -1, I32_MAX, &token_id) < 0
            or r_float(r, &sent_at) < 0):
        return None
    descs = d_descriptors(r, lim, 0)
    if (descs is None or r_payload_bytes(r, lim, &payload_bytes) < 0 or r.i != r.n
            or stage >= len(<tuple>route)
            or (token_id >= 0) + (len(descs) > 0) + (payload_bytes > 0) != 1):
        return None
    tensors = d_payload(descs, frames, nfr, lim, payload_bytes)
    if tensors is None:
        return None
    msg = PyType_GenericAlloc(<PyTypeObject*>DecodeWork_t, 0)
    _set(msg, OFF_DW[0], PyLong_FromLongLong(request_id))
    _set(msg, OFF_DW[1], route)
    _set(msg, OFF_DW[2], PyLong_FromLongLong(stage))
    _set(msg, OFF_DW[3], PyLong_FromLongLong(context_len))
    _set(msg, OFF_DW[4], PyLong_FromLongLong(token_id))
    _set(msg, OFF_DW[5], PyFloat_FromDouble(sent_at))
    _set(msg, OFF_DW[6], tensors)
    _set(msg, OFF_DW[7], PyLong_FromLongLong(payload_bytes))
    return msg


cdef object dec_prompt_work(Reader* r, CLimits* lim, object frames, Py_ssize_t nfr):
    cdef Py_ssize_t n, nids, i
    cdef long long request_id, query_id, stage, num_tokens, max_tokens, tok, payload_bytes, seed
    cdef long long top_k, min_tokens, logprobs, generated, priority
    cdef double sent_at, temperature, top_p, min_p, presence, frequency, repetition
    if (r_array(r, &n) < 0 or n != 24
            or r_int(r, 0, I64_MAX, &request_id) < 0
            or r_int(r, 0, I64_MAX, &query_id) < 0):
        return None
    route = d_route(r, lim, 1)
    if (route is None
            or r_int(r, 0, I32_MAX, &stage) < 0
            or r_int(r, 1, I32_MAX, &num_tokens) < 0
            or r_array(r, &nids) < 0
            or (nids > 0 and nids != num_tokens)  # the token_ids rule below, before building
            or (nids > PREALLOC_MAX and r_ints_scan(r, nids, 0, I32_MAX) < 0)):
        return None
    ids = PyTuple_New(nids)
    for i in range(nids):
        if r_int(r, 0, I32_MAX, &tok) < 0:
            return None
        t = PyLong_FromLongLong(tok)
        Py_INCREF(t)
        PyTuple_SET_ITEM(ids, i, t)
    if r_int(r, 1, I32_MAX, &max_tokens) < 0 or r_float(r, &sent_at) < 0:
        return None
    descs = d_descriptors(r, lim, 0)
    if (descs is None or r_payload_bytes(r, lim, &payload_bytes) < 0
            or r_float(r, &temperature) < 0 or temperature < 0
            or r_float(r, &top_p) < 0 or not (0 < top_p <= 1)
            or r_int(r, 0, I64_MAX, &seed) < 0
            or r_int(r, 0, I32_MAX, &top_k) < 0
            or r_float(r, &min_p) < 0 or min_p < 0 or min_p > 1
            or r_float(r, &presence) < 0 or presence < -2 or presence > 2
            or r_float(r, &frequency) < 0 or frequency < -2 or frequency > 2
            or r_float(r, &repetition) < 0 or not (repetition > 0)
            or r_int(r, 0, I32_MAX, &min_tokens) < 0):
        return None
    stop_ids = d_ints(r, 0, I32_MAX, -1)
    if stop_ids is None or r_int(r, -1, MAX_LP, &logprobs) < 0:
        return None
    # context ids: only without token ids, num_tokens of them (checked before they are built)
    context_ids = d_ints(r, 0, I32_MAX, 0 if nids > 0 else num_tokens)
    if (context_ids is None
            or r_int(r, 0, I32_MAX, &generated) < 0 or generated >= num_tokens
            or r_int(r, I32_MIN, I32_MAX, &priority) < 0
            or r.i != r.n
            or stage >= len(<tuple>route)
            or (nids > 0) + (len(descs) > 0) + (payload_bytes > 0) != 1):
        return None
    tensors = d_payload(descs, frames, nfr, lim, payload_bytes)
    if tensors is None:
        return None
    msg = PyType_GenericAlloc(<PyTypeObject*>PromptWork_t, 0)
    _set(msg, OFF_PW[0], PyLong_FromLongLong(request_id))
    _set(msg, OFF_PW[1], PyLong_FromLongLong(query_id))
    _set(msg, OFF_PW[2], route)
    _set(msg, OFF_PW[3], PyLong_FromLongLong(stage))
    _set(msg, OFF_PW[4], PyLong_FromLongLong(num_tokens))
    _set(msg, OFF_PW[5], ids)
    _set(msg, OFF_PW[6], PyLong_FromLongLong(max_tokens))
    _set(msg, OFF_PW[7], PyFloat_FromDouble(sent_at))
    _set(msg, OFF_PW[8], tensors)
    _set(msg, OFF_PW[9], PyLong_FromLongLong(payload_bytes))
    _set(msg, OFF_PW[10], PyFloat_FromDouble(temperature))
    _set(msg, OFF_PW[11], PyFloat_FromDouble(top_p))
    _set(msg, OFF_PW[12], PyLong_FromLongLong(seed))
    _set(msg, OFF_PW[13], PyLong_FromLongLong(top_k))
    _set(msg, OFF_PW[14], PyFloat_FromDouble(min_p))
    _set(msg, OFF_PW[15], PyFloat_FromDouble(presence))
    _set(msg, OFF_PW[16], PyFloat_FromDouble(frequency))
    _set(msg, OFF_PW[17], PyFloat_FromDouble(repetition))
    _set(msg, OFF_PW[18], PyLong_FromLongLong(min_tokens))
    _set(msg, OFF_PW[19], stop_ids)
    _set(msg, OFF_PW[20], PyLong_FromLongLong(logprobs))
    _set(msg, OFF_PW[21], context_ids)
    _set(msg, OFF_PW[22], PyLong_FromLongLong(generated))
    _set(msg, OFF_PW[23], PyLong_FromLongLong(priority))
    return msg


cdef object dec_activations(Reader* r, CLimits* lim, object frames, Py_ssize_t nfr):
    cdef Py_ssize_t n
    cdef long long request_id, stage, num_tokens
    cdef double sent_at
    if (r_array(r, &n) < 0 or n != 5
            or r_int(r, 0, I64_MAX, &request_id) < 0
            or r_int(r, 0, I32_MAX, &stage) < 0
            or r_int(r, 0, I32_MAX, &num_tokens) < 0
            or r_float(r, &sent_at) < 0):
        return None
    descs = d_descriptors(r, lim, 1)
    if descs is None or r.i != r.n:
        return None
    tensors = d_tensors(descs, frames, nfr, lim)
    if tensors is None:
        return None
    msg = PyType_GenericAlloc(<PyTypeObject*>Activations_t, 0)
    _set(msg, OFF_AC[0], PyLong_FromLongLong(request_id))
    _set(msg, OFF_AC[1], PyLong_FromLongLong(stage))
    _set(msg, OFF_AC[2], PyLong_FromLongLong(num_tokens))
    _set(msg, OFF_AC[3], PyFloat_FromDouble(sent_at))
    _set(msg, OFF_AC[4], tensors)
    return msg


cdef object dec_token_result(Reader* r, CLimits* lim, Py_ssize_t nfr):
    cdef Py_ssize_t n
    cdef long long request_id, token_id, context_len
    cdef double sent_at
    cdef unsigned char fin
    if (nfr != 2 or r_array(r, &n) < 0 or n != 7
            or r_int(r, 0, I64_MAX, &request_id) < 0
            or r_int(r, 0, I32_MAX, &token_id) < 0
            or r_int(r, 1, I32_MAX, &context_len) < 0
            or r.i >= r.n):
        return None
    fin = r.p[r.i]
    if fin != 0xc2 and fin != 0xc3:
        return None
    r.i += 1
    if r_float(r, &sent_at) < 0:
        return None
    route = d_route(r, lim, 0)
    if route is None:
        return None
    logprobs = d_logprobs(r, token_id)
    if logprobs is None or r.i != r.n:
        return None
    msg = PyType_GenericAlloc(<PyTypeObject*>TokenResult_t, 0)
    _set(msg, OFF_TR[0], PyLong_FromLongLong(request_id))
    _set(msg, OFF_TR[1], PyLong_FromLongLong(token_id))
    _set(msg, OFF_TR[2], PyLong_FromLongLong(context_len))
    _set(msg, OFF_TR[3], <object>(Py_True if fin == 0xc3 else Py_False))
    _set(msg, OFF_TR[4], PyFloat_FromDouble(sent_at))
    _set(msg, OFF_TR[5], route)
    _set(msg, OFF_TR[6], logprobs)
    return msg


cdef object dec_feedback(Reader* r, Py_ssize_t nfr):
    cdef Py_ssize_t n
    cdef long long request_id, node_id
    cdef double delay, sent_at
    if (nfr != 2 or r_array(r, &n) < 0 or n != 4
            or r_int(r, 0, I64_MAX, &request_id) < 0
            or r_int(r, 0, I32_MAX, &node_id) < 0
            or r_float(r, &delay) < 0
            or delay < 0
            or r_float(r, &sent_at) < 0
            or r.i != r.n):
        return None
    msg = PyType_GenericAlloc(<PyTypeObject*>Feedback_t, 0)
    _set(msg, OFF_FB[0], PyLong_FromLongLong(request_id))
    _set(msg, OFF_FB[1], PyLong_FromLongLong(node_id))
    _set(msg, OFF_FB[2], PyFloat_FromDouble(delay))
    _set(msg, OFF_FB[3], PyFloat_FromDouble(sent_at))
    return msg


cdef inline int _acquire(object o, Py_buffer* view, const unsigned char** p, Py_ssize_t* n) except -2:
    # 1 = view must be released, 0 = bytes (no view), -1 = not a C-contiguous buffer (no error set)
    if c_bytes_check_exact(<PyObject*>o):
        p[0] = <const unsigned char*>c_bytes_as_string(<PyObject*>o)
        n[0] = c_bytes_size(<PyObject*>o)
        return 0
    try:
        PyObject_GetBuffer(o, view, PyBUF_SIMPLE)
    except Exception:
        return -1
    p[0] = <const unsigned char*>view.buf
    n[0] = view.len
    return 1


cdef object _fast_decode(object frames, object limits):
    cdef Py_ssize_t nfr
    cdef Py_buffer view
    cdef int held
    cdef const unsigned char* p
    cdef Py_ssize_t n
    cdef int tag
    cdef CLimits lim
    cdef Reader r
    if not (c_list_check(<PyObject*>frames) or c_tuple_check(<PyObject*>frames)):
        return None
    nfr = len(frames)
    if nfr < 2:
        return None
    held = _acquire(frames[0], &view, &p, &n)
    if held < 0:
        return None
    tag = p[0] if n == 1 else -1
    if held:
        PyBuffer_Release(&view)
    if tag != T_DW and tag != T_TR and tag != T_PW and tag != T_AC and tag != T_FB:
        return _COLD if tag >= 0 else None
    if _limits(limits, &lim):
        return _COLD
    held = _acquire(frames[1], &view, &p, &n)
    if held < 0:
        return None
    try:
        if n == 0 or n > lim.max_frame:
            return None
        r.p = p
        r.n = n
        r.i = 0
        if tag == T_DW:
            return dec_decode_work(&r, &lim, frames, nfr)
        if tag == T_TR:
            return dec_token_result(&r, &lim, nfr)
        if tag == T_PW:
            return dec_prompt_work(&r, &lim, frames, nfr)
        if tag == T_FB:
            return dec_feedback(&r, nfr)
        return dec_activations(&r, &lim, frames, nfr)
    finally:
        if held:
            PyBuffer_Release(&view)


def decode(frames, limits=None):
    """The message in ``frames`` (see helix_async.codec.decode); raises only CodecError."""
    # the fast path turns every defect of the input into a rejection (None), never an exception;
    # on a rejection the pure-Python codec raises the canonical error. An exception from the fast
    # path is a bug (or MemoryError): it propagates rather than being hidden by a silent re-decode
    r = _fast_decode(frames, limits)
    if r is None or r is _COLD:
        return _py.decode(frames, limits)
    return r


def _decode_strict(frames, limits=None):
    """Compiled decoder without the fallback (tests): CodecError when it rejects ``frames``."""
    r = _fast_decode(frames, limits)
    if r is _COLD:
        return _py.decode(frames, limits)
    if r is None:
        raise CodecError("?", "frames", "rejected by the compiled decoder")
    return r
