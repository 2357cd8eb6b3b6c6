# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled twin of helix_async/_interp_py.py (the specification; read it first).

Same operation order as the Python version so results are bit-identical; built with
-ffp-contract=off so the C compiler cannot fuse a*b+c into an FMA.
"""

from libc.stdlib cimport malloc, free


cdef class BatchTimer:
    cdef double* _px
    cdef double* _py
    cdef double* _dx
    cdef double* _dy
    cdef Py_ssize_t _np
    cdef Py_ssize_t _nd

    def __cinit__(self):
        self._px = NULL
        self._py = NULL
        self._dx = NULL
        self._dy = NULL

    def __init__(self, prompt_x, prompt_s, decode_x, decode_s):
        from helix_async._interp_py import _check_grid

        px, py = _check_grid(prompt_x, prompt_s, "prompt")
        dx, dy = _check_grid(decode_x, decode_s, "decode")
        # a second __init__ call replaces the tables; free the old ones first
        free(self._px)
        free(self._py)
        free(self._dx)
        free(self._dy)
        self._px = self._py = self._dx = self._dy = NULL
        self._np = len(px)
        self._nd = len(dx)
        self._px = _copy(px)
        self._py = _copy(py)
        self._dx = _copy(dx)
        self._dy = _copy(dy)

    def __dealloc__(self):
        free(self._px)
        free(self._py)
        free(self._dx)
        free(self._dy)

    cdef int _check(self) except -1:
        if self._dy == NULL:
            raise RuntimeError("BatchTimer used before __init__ filled its tables")
        return 0

    @property
    def prompt_max(self):
        self._check()
        return self._px[self._np - 1]

    @property
    def decode_max(self):
        self._check()
        return self._dx[self._nd - 1]

    def prompt(self, tokens):
        self._check()
        return _interp(self._px, self._py, self._np, tokens, "prompt")

    def decode(self, seqs):
        self._check()
        return _interp(self._dx, self._dy, self._nd, seqs, "decode")

    def batch_time(self, prompt_tokens, decode_seqs):
        self._check()
        cdef double t_p = _interp(self._px, self._py, self._np, prompt_tokens, "prompt")
        cdef double t_d = _interp(self._dx, self._dy, self._nd, decode_seqs, "decode")
        if decode_seqs == 1:
            t_d = 2.0 * t_d
        return t_p + t_d


cdef double* _copy(list values) except NULL:
    cdef Py_ssize_t n = len(values)
    cdef double* out = <double*> malloc(n * sizeof(double))
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = values[i]
    return out


cdef double _interp(double* xs, double* ys, Py_ssize_t n, object xo, str what) except? -1.0:
    cdef double x = xo
    if not (xs[0] <= x <= xs[n - 1]):
        raise ValueError(f"{what} batch size {xo} outside the profiled range [{xs[0]}, {xs[n - 1]}]")
    # bisect_right(xs, x) - 1: the last index whose grid point is <= x
    cdef Py_ssize_t lo = 0
    cdef Py_ssize_t hi = n
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < xs[mid]:
            hi = mid
        else:
            lo = mid + 1
    cdef Py_ssize_t i = lo - 1
    if xs[i] == x:
        return ys[i]
    cdef double x0 = xs[i]
    cdef double x1 = xs[i + 1]
    cdef double y0 = ys[i]
    cdef double y1 = ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
