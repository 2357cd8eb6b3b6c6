# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled twins of helix_async/routing/_iwrr_py.py, _kv_py.py and _router_py.py.

Those pure-Python modules are the specification (read them first): every float here is computed
with the same operations in the same order, so loads, choices, KV counts and routes are identical
(checked by hypothesis tests). Built with -ffp-contract=off so the C compiler cannot fuse a
multiply and an add into an FMA. Validation and error messages reuse the Python helpers; the hot
paths (IWRR.choose, FlowRouter.route/on_decode) allocate no Python objects per hop.
"""

from libc.float cimport DBL_MAX
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from cpython.list cimport PyList_GET_ITEM

from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF

from helix_async.ids import SINK, SOURCE
from helix_async.routing._iwrr_py import _check_weights
from helix_async.routing._kv_py import (
    MAX_INPUT_LEN, _as_count, check_kv_nodes, check_kv_params, placement_kv_inputs,
)
from helix_async.routing._router_py import (
    MIN_FLOW_SHARE, check_input_len, check_kv_matches, placement_router_inputs,
    prepare_router_inputs,
)


cdef object _MAX_N = MAX_INPUT_LEN
cdef object _NO_STAGE = object()  # the stage slot of a link to the sink (routes leave the sink implicit)


cdef void* _alloc(Py_ssize_t count, size_t size) except NULL:
    # one element at least, so that an empty table is still a valid pointer
    cdef void* p = malloc((count if count > 0 else 1) * size)
    if p == NULL:
        raise MemoryError()
    return p


cdef inline int _bad_work(double work) noexcept nogil:
    return not (work >= 0.0 and work <= DBL_MAX)


cdef int _raise_work(double work) except -1:
    raise ValueError(f"IWRR work must be a finite float >= 0 (tokens), got {work!r}")


# ==================================================================================================
# IWRR
# ==================================================================================================

cdef class IWRR:
    """Weighted round robin by virtual finish time; see helix_async/routing/_iwrr_py.py."""

    cdef Py_ssize_t _n
    cdef double* _w
    cdef double* _load
    cdef unsigned char* _mask   # preset mask, 1 = masked out
    cdef unsigned char* _tmp    # scratch for a mask given in a call

    def __cinit__(self):
        self._w = NULL
        self._load = NULL
        self._mask = NULL
        self._tmp = NULL
        self._n = 0

    def __init__(self, weights):
        w = _check_weights(weights)
        cdef Py_ssize_t n = len(w)
        cdef Py_ssize_t j
        self._release()  # __init__ called again on a live object: drop the old tables
        self._n = 0
        self._w = <double*> _alloc(n, sizeof(double))
        self._load = <double*> _alloc(n, sizeof(double))
        self._mask = <unsigned char*> _alloc(n, sizeof(unsigned char))
        self._tmp = <unsigned char*> _alloc(n, sizeof(unsigned char))
        self._n = n
        for j in range(n):
            self._w[j] = w[j]
            self._load[j] = 0.0
            self._mask[j] = 0
            self._tmp[j] = 0

    cdef void _release(self) noexcept:
        free(self._w)
        self._w = NULL
        free(self._load)
        self._load = NULL
        free(self._mask)
        self._mask = NULL
        free(self._tmp)
        self._tmp = NULL

    def __dealloc__(self):
        self._release()

    def __len__(self):
        return self._n

    @property
    def weights(self):
        return tuple([self._w[j] for j in range(self._n)])

    @property
    def loads(self):
        return tuple([self._load[j] for j in range(self._n)])

    @property
    def mask(self):
        return tuple([self._mask[j] != 0 for j in range(self._n)])

    cdef Py_ssize_t _check_index(self, Py_ssize_t j) except -1:
        if not 0 <= j < self._n:
            raise IndexError(f"IWRR candidate {j} out of range 0..{self._n - 1}")
        return j

    cpdef double load(self, Py_ssize_t j) except? -1.0:
        self._check_index(j)
        return self._load[j]

    cdef unsigned char* _mask_of(self, object mask) except NULL:
        if len(mask) != self._n:
            raise ValueError(f"IWRR mask has {len(mask)} entries for {self._n} candidates")
        cdef Py_ssize_t j
        for j in range(self._n):
            self._tmp[j] = 1 if mask[j] else 0
        return self._tmp

    def set_mask(self, mask):
        cdef Py_ssize_t j
        if mask is None:
            for j in range(self._n):
                self._mask[j] = 0
            return
        cdef unsigned char* m = self._mask_of(mask)
        memcpy(self._mask, m, self._n * sizeof(unsigned char))

    cdef Py_ssize_t _argmin(self, double work, const unsigned char* mask) noexcept nogil:
        cdef Py_ssize_t best = -1
        cdef double best_cost = 0.0
        cdef double cost
        cdef Py_ssize_t j
        for j in range(self._n):
            if mask[j]:
                continue
            cost = self._load[j] + work / self._w[j]
            # strict < keeps the lowest index on a tie
            if best < 0 or cost < best_cost:
                best = j
                best_cost = cost
        return best

    cpdef Py_ssize_t argmin(self, double work, object mask=None) except -2:
        if _bad_work(work):
            _raise_work(work)
        cdef const unsigned char* m = self._mask if mask is None else self._mask_of(mask)
        return self._argmin(work, m)

    cpdef Py_ssize_t choose(self, double work, object mask=None) except -2:
        if _bad_work(work):
            _raise_work(work)
        cdef const unsigned char* m = self._mask if mask is None else self._mask_of(mask)
        cdef Py_ssize_t j = self._argmin(work, m)
        if j >= 0:
            self._load[j] = self._load[j] + work / self._w[j]
        return j

    cpdef add(self, Py_ssize_t j, double work=1.0):
        self._check_index(j)
        if _bad_work(work):
            _raise_work(work)
        self._load[j] = self._load[j] + work / self._w[j]

    cpdef undo(self, Py_ssize_t j, double work):
        self._check_index(j)
        if _bad_work(work):
            _raise_work(work)
        self._load[j] = self._load[j] - work / self._w[j]

    cpdef restore(self, Py_ssize_t j, double load):
        self._check_index(j)
        self._load[j] = load

    def reset(self):
        cdef Py_ssize_t j
        for j in range(self._n):
            self._load[j] = 0.0

    def __repr__(self):
        return f"IWRR(weights={list(self.weights)!r}, loads={list(self.loads)!r})"


# ==================================================================================================
# KV expectation
# ==================================================================================================

cdef class _Reservation:
    """What one request took: ``n`` (KV index, entries) pairs."""

    cdef Py_ssize_t n
    cdef Py_ssize_t* idx
    cdef long long* amt

    def __cinit__(self):
        self.n = 0
        self.idx = NULL
        self.amt = NULL

    def __dealloc__(self):
        free(self.idx)
        free(self.amt)


cdef _Reservation _new_reservation(Py_ssize_t n):
    cdef _Reservation r = _Reservation.__new__(_Reservation)
    r.idx = <Py_ssize_t*> _alloc(n, sizeof(Py_ssize_t))
    r.amt = <long long*> _alloc(n, sizeof(long long))
    r.n = n
    return r


cdef class KVTracker:
    """Expected KV usage per compute node; see helix_async/routing/_kv_py.py."""

    cdef Py_ssize_t _n
    cdef long long* _total
    cdef long long* _avail
    cdef long long* _a
    cdef long long* _b
    cdef long long* _k
    cdef double* _thr
    cdef double _extra
    cdef double _fill
    cdef double _ratio
    cdef long long _avg
    cdef long long _L
    cdef tuple _nodes
    cdef dict _index
    cdef dict _resv

    def __cinit__(self):
        self._n = 0
        self._total = NULL
        self._avail = NULL
        self._a = NULL
        self._b = NULL
        self._k = NULL
        self._thr = NULL

    def __init__(self, capacity, layers, *, kv_fill_limit, output_ratio, avg_output_len=240, num_layers=None):
        self._fill, self._ratio, self._avg = check_kv_params(kv_fill_limit, output_ratio, avg_output_len)
        nodes, caps, ranges, L = check_kv_nodes(capacity, layers, num_layers)
        self._L = L
        cdef Py_ssize_t n = len(nodes)
        cdef Py_ssize_t i
        self._release()  # __init__ called again on a live object: drop the old tables
        self._n = 0
        self._total = <long long*> _alloc(n, sizeof(long long))
        self._avail = <long long*> _alloc(n, sizeof(long long))
        self._a = <long long*> _alloc(n, sizeof(long long))
        self._b = <long long*> _alloc(n, sizeof(long long))
        self._k = <long long*> _alloc(n, sizeof(long long))
        self._thr = <double*> _alloc(n, sizeof(double))
        self._n = n
        self._nodes = tuple(nodes)
        self._index = {u: i for i, u in enumerate(nodes)}
        for i in range(n):
            self._total[i] = caps[i]
            self._avail[i] = caps[i]
            self._a[i] = ranges[i][0]
            self._b[i] = ranges[i][1]
            self._k[i] = self._b[i] - self._a[i]
            self._thr[i] = (1.0 - self._fill) * <double> self._total[i]
        self._extra = <double> self._avg * self._ratio
        self._resv = {}

    cdef void _release(self) noexcept:
        free(self._total)
        self._total = NULL
        free(self._avail)
        self._avail = NULL
        free(self._a)
        self._a = NULL
        free(self._b)
        self._b = NULL
        free(self._k)
        self._k = NULL
        free(self._thr)
        self._thr = NULL

    def __dealloc__(self):
        self._release()

    @classmethod
    def from_placement(cls, placement, *, kv_fill_limit, output_ratio, tm=None, avg_output_len=None):
        capacity, layers, L = placement_kv_inputs(placement, tm)
        if avg_output_len is None:
            from helix_async.model import dataset_constants

            avg_output_len = dataset_constants().avg_output_len
        return cls(
            capacity,
            layers,
            kv_fill_limit=kv_fill_limit,
            output_ratio=output_ratio,
            avg_output_len=avg_output_len,
            num_layers=L,
        )

    @property
    def nodes(self):
        return self._nodes

    @property
    def kv_fill_limit(self):
        """Fraction (0..1) of each node's KV capacity that admitted queries' expected usage may fill."""
        return self._fill

    @property
    def output_ratio(self):
        return self._ratio

    @property
    def avg_output_len(self):
        return self._avg

    @property
    def num_layers(self):
        return self._L

    cdef Py_ssize_t _i(self, object node) except -1:
        try:
            return self._index[node]
        except (KeyError, TypeError):
            raise KeyError(f"node {node!r} is not tracked by this KVTracker") from None

    def total(self, node):
        return self._total[self._i(node)]

    def available(self, node):
        return self._avail[self._i(node)]

    def layer_range(self, node):
        cdef Py_ssize_t i = self._i(node)
        return (self._a[i], self._b[i])

    def snapshot(self):
        return tuple([(self._nodes[i], self._avail[i]) for i in range(self._n)])

    def __contains__(self, request_id):
        return request_id in self._resv

    def __len__(self):
        return len(self._resv)

    def reserved(self, request_id):
        cdef _Reservation r = self._resv[request_id]
        return tuple([(self._nodes[r.idx[h]], r.amt[h]) for h in range(r.n)])

    cdef long long _expected(self, long long n) noexcept nogil:
        return <long long> (<double> n + self._extra)

    cdef bint _can_add_i(self, Py_ssize_t i, long long e) noexcept nogil:
        return <double> (self._avail[i] - e * self._k[i]) >= self._thr[i]

    cdef bint _can_ever_add_i(self, Py_ssize_t i, long long e) noexcept nogil:
        return <double> (self._total[i] - e * self._k[i]) >= self._thr[i]

    def expected_len(self, n):
        return self._expected(_as_count(n, "input length", 0, MAX_INPUT_LEN))

    def can_add(self, node, n):
        cdef Py_ssize_t i = self._i(node)
        cdef long long e = self._expected(_as_count(n, "input length", 0, MAX_INPUT_LEN))
        return self._can_add_i(i, e)

    def can_ever_add(self, node, n):
        cdef Py_ssize_t i = self._i(node)
        cdef long long e = self._expected(_as_count(n, "input length", 0, MAX_INPUT_LEN))
        return self._can_ever_add_i(i, e)

    def reserve(self, request_id, stages, n):
        if request_id in self._resv:
            raise ValueError(f"request {request_id!r} already holds a KV reservation")
        cdef long long e = self._expected(_as_count(n, "input length", 0, MAX_INPUT_LEN))
        cdef list idx = []
        cdef list amts = []
        cdef set seen = set()
        cdef Py_ssize_t i
        cdef long long k
        cdef long long amt
        for node, layers_run in stages:
            i = self._i(node)
            if i in seen:
                raise ValueError(f"node {node} appears twice in the stages of request {request_id!r}")
            seen.add(i)
            k = _as_count(layers_run, f"layers run on node {node}", 1, self._k[i])
            amt = e * k
            if self._avail[i] - amt < 0:
                raise ValueError(
                    f"node {node} has {self._avail[i]} KV entries free, request {request_id!r} needs {amt}"
                )
            idx.append(i)
            amts.append(amt)
        cdef Py_ssize_t h
        cdef _Reservation r = _new_reservation(len(idx))
        for h in range(r.n):
            r.idx[h] = idx[h]
            r.amt[h] = amts[h]
            self._avail[r.idx[h]] = self._avail[r.idx[h]] - r.amt[h]
        self._resv[request_id] = r

    cdef int _reserve_arrays(self, object request_id, const Py_ssize_t* idx, const long long* layers,
                             Py_ssize_t count, long long e) except -1:
        # The router's path: the caller has checked that the id is new and that every node
        # passed can_add (so each has the entries); nodes are distinct along a route.
        cdef _Reservation r = _new_reservation(count)
        cdef Py_ssize_t h
        cdef long long amt
        for h in range(count):
            amt = e * layers[h]
            if self._avail[idx[h]] - amt < 0:
                raise ValueError(
                    f"node {self._nodes[idx[h]]} has {self._avail[idx[h]]} KV entries free, "
                    f"request {request_id!r} needs {amt}"
                )
            r.idx[h] = idx[h]
            r.amt[h] = amt
        for h in range(count):
            self._avail[r.idx[h]] = self._avail[r.idx[h]] - r.amt[h]
        self._resv[request_id] = r
        return 0

    cpdef release(self, object request_id):
        cdef _Reservation r
        try:
            r = self._resv.pop(request_id)
        except KeyError:
            raise KeyError(f"request {request_id!r} holds no KV reservation") from None
        cdef Py_ssize_t h
        for h in range(r.n):
            self._avail[r.idx[h]] = self._avail[r.idx[h]] + r.amt[h]

    def bottleneck_usage(self):
        cdef double worst = 0.0
        cdef double free_, tot, usage
        cdef long long layer
        cdef Py_ssize_t i
        for layer in range(self._L):
            free_ = 0.0
            tot = 0.0
            for i in range(self._n):
                if self._a[i] <= layer < self._b[i]:
                    free_ = free_ + <double> self._avail[i] / <double> self._k[i]
                    tot = tot + <double> self._total[i] / <double> self._k[i]
            if tot > 0.0:
                usage = 1.0 - free_ / tot
                if usage > worst:
                    worst = usage
        return worst

    def __repr__(self):
        return f"KVTracker(nodes={self._n}, reservations={len(self._resv)}, kv_fill_limit={self._fill})"


# ==================================================================================================
# FlowRouter
# ==================================================================================================

cdef class FlowRouter:
    """MaxFlow + IWRR route selection with KV admission; see helix_async/routing/_router_py.py.

    Needs the compiled KVTracker (the pure one is a TypeError).
    """

    cdef object _in          # the validated RouterInputs (shared with the pure twin)
    cdef KVTracker _kv
    cdef list _iwrr          # IWRR per scheduling index (0 = source)
    cdef list _sched         # node ref per scheduling index
    cdef Py_ssize_t _ns
    cdef Py_ssize_t* _coff   # candidates of scheduling index x: [_coff[x], _coff[x + 1])
    cdef Py_ssize_t* _cy     # candidate -> scheduling index of its next hop, -1 = sink
    cdef Py_ssize_t* _ckv    # candidate -> KV index of its next hop, -1 = sink
    cdef long long* _climit  # candidate -> prompt limit of its next hop (unused for the sink)
    cdef long long* _clayers # candidate -> layers run on its next hop
    cdef list _cstage        # candidate -> its stage tuple (node, start, end), _NO_STAGE for the sink
    cdef dict _sidx          # node ref -> scheduling index (the sink is never a stage's node)
    cdef unsigned char* _maskbuf
    cdef Py_ssize_t* _hx     # per hop of the route being searched: scheduling index and
    cdef Py_ssize_t* _hj     # chosen candidate (local index)
    cdef Py_ssize_t* _rkv    # per compute hop: KV index and
    cdef long long* _rlayers # layers run
    cdef Py_ssize_t* _dx     # on_decode, per hop: scheduling index and
    cdef Py_ssize_t* _dj     # candidate (local index)
    cdef unsigned long long* _dead  # per scheduling index: == _epoch when a dead end in this search
    cdef unsigned long long _epoch  # one per search, so _dead never needs clearing
    cdef long long _L
    cdef Py_ssize_t _routed
    cdef Py_ssize_t _failed
    cdef Py_ssize_t _backtracks

    def __cinit__(self):
        self._coff = NULL
        self._cy = NULL
        self._ckv = NULL
        self._climit = NULL
        self._clayers = NULL
        self._maskbuf = NULL
        self._hx = NULL
        self._hj = NULL
        self._rkv = NULL
        self._rlayers = NULL
        self._dx = NULL
        self._dj = NULL
        self._dead = NULL
        self._epoch = 0

    def __init__(self, stages, links, prompt_limits, KVTracker kv not None, num_layers, *,
                 min_share=MIN_FLOW_SHARE):
        inp = prepare_router_inputs(stages, links, prompt_limits, num_layers, min_share)
        check_kv_matches(inp, kv)
        self._in = inp
        self._kv = kv
        self._L = inp.num_layers
        sched = list(inp.sched)
        cdef Py_ssize_t ns = len(sched)
        cdef dict sidx = {x: xi for xi, x in enumerate(sched)}
        cdef Py_ssize_t total = 0
        cdef Py_ssize_t widest = 1
        for x in sched:
            total += len(inp.cands[x])
            widest = max(widest, len(inp.cands[x]))
        self._release()  # __init__ called again on a live object: drop the old tables
        self._ns = ns
        self._sched = sched
        self._coff = <Py_ssize_t*> _alloc(ns + 1, sizeof(Py_ssize_t))
        self._cy = <Py_ssize_t*> _alloc(total, sizeof(Py_ssize_t))
        self._ckv = <Py_ssize_t*> _alloc(total, sizeof(Py_ssize_t))
        self._climit = <long long*> _alloc(total, sizeof(long long))
        self._clayers = <long long*> _alloc(total, sizeof(long long))
        self._maskbuf = <unsigned char*> _alloc(widest, sizeof(unsigned char))
        self._hx = <Py_ssize_t*> _alloc(ns + 1, sizeof(Py_ssize_t))
        self._hj = <Py_ssize_t*> _alloc(ns + 1, sizeof(Py_ssize_t))
        self._rkv = <Py_ssize_t*> _alloc(ns + 1, sizeof(Py_ssize_t))
        self._rlayers = <long long*> _alloc(ns + 1, sizeof(long long))
        self._dx = <Py_ssize_t*> _alloc(ns + 1, sizeof(Py_ssize_t))
        self._dj = <Py_ssize_t*> _alloc(ns + 1, sizeof(Py_ssize_t))
        self._dead = <unsigned long long*> _alloc(ns, sizeof(unsigned long long))
        self._epoch = 0
        self._iwrr = []
        self._cstage = []
        self._sidx = {x: xi for xi, x in enumerate(sched)}
        cdef Py_ssize_t c = 0
        cdef Py_ssize_t xi, j
        cdef long long start
        for xi in range(ns):
            self._dead[xi] = 0
            x = sched[xi]
            cands = inp.cands[x]
            self._coff[xi] = c
            self._iwrr.append(IWRR([f for _, f in cands]))
            for j in range(len(cands)):
                y = cands[j][0]
                if y == SINK:
                    self._cy[c] = -1
                    self._ckv[c] = -1
                    self._climit[c] = 0
                    self._clayers[c] = 0
                    self._cstage.append(_NO_STAGE)
                else:
                    a, b = inp.stages[y]
                    start = a if x == SOURCE else inp.stages[x][1]
                    self._cy[c] = sidx[y]
                    self._ckv[c] = kv._i(y)
                    self._climit[c] = inp.prompt_limits[y]
                    self._clayers[c] = b - start
                    self._cstage.append((y, start, b))
                c += 1
        self._coff[ns] = c
        self._routed = 0
        self._failed = 0
        self._backtracks = 0

    cdef void _release(self) noexcept:
        free(self._coff)
        self._coff = NULL
        free(self._cy)
        self._cy = NULL
        free(self._ckv)
        self._ckv = NULL
        free(self._climit)
        self._climit = NULL
        free(self._clayers)
        self._clayers = NULL
        free(self._maskbuf)
        self._maskbuf = NULL
        free(self._hx)
        self._hx = NULL
        free(self._hj)
        self._hj = NULL
        free(self._rkv)
        self._rkv = NULL
        free(self._rlayers)
        self._rlayers = NULL
        free(self._dx)
        self._dx = NULL
        free(self._dj)
        self._dj = NULL
        free(self._dead)
        self._dead = NULL

    def __dealloc__(self):
        self._release()

    @classmethod
    def from_plan(cls, placement, flow_plan, kv=None, *, prompt_limits=None, kv_fill_limit=0.85,
                  output_ratio=1.0, tm=None, min_share=MIN_FLOW_SHARE):
        if kv is None:
            kv = KVTracker.from_placement(placement, kv_fill_limit=kv_fill_limit, output_ratio=output_ratio, tm=tm)
        stages, links, limits, L = placement_router_inputs(placement, flow_plan, prompt_limits)
        return cls(stages, links, limits, kv, L, min_share=min_share)

    @property
    def kv(self):
        return self._kv

    @property
    def num_layers(self):
        return self._L

    @property
    def scheduling_nodes(self):
        return self._in.sched

    def candidates(self, x):
        return self._in.cands[x]

    def loads(self, x):
        return (<IWRR> self._iwrr[self._in.sched.index(x)]).loads

    def snapshot(self):
        return tuple([(self._sched[xi], (<IWRR> self._iwrr[xi]).loads) for xi in range(self._ns)])

    @property
    def stats(self):
        return {"routed": self._routed, "failed": self._failed, "backtracks": self._backtracks}

    def feasible(self, n):
        cdef long long nn = check_input_len(n)
        return self._search(nn, self._kv._expected(nn), True) >= 0

    cdef Py_ssize_t _search(self, long long n, long long e, bint idle) noexcept:
        # The search of _router_py.FlowRouter._search: greedy first, backtracking only on dead
        # ends. Leaves the hops in _hx/_hj and returns their count, or -1 when there is no route;
        # charges nothing.
        cdef KVTracker kv = self._kv
        cdef double work = <double> n
        cdef unsigned long long ep
        cdef Py_ssize_t x = 0
        cdef Py_ssize_t nh = 0
        cdef Py_ssize_t off, m, k, j, yi, kvi
        cdef unsigned char* mask = self._maskbuf
        cdef IWRR iw
        self._epoch += 1
        ep = self._epoch
        while True:
            off = self._coff[x]
            m = self._coff[x + 1] - off
            for k in range(m):
                yi = self._cy[off + k]
                if yi < 0:
                    mask[k] = 0
                elif n > self._climit[off + k] or self._dead[yi] == ep:
                    mask[k] = 1
                else:
                    kvi = self._ckv[off + k]
                    mask[k] = not (kv._can_ever_add_i(kvi, e) if idle else kv._can_add_i(kvi, e))
            iw = <IWRR> PyList_GET_ITEM(self._iwrr, x)
            j = iw._argmin(work, mask)
            if j < 0:
                if nh == 0:
                    return -1
                # dead end: no way on from x; mask it and re-choose at the previous hop
                self._dead[x] = ep
                nh -= 1
                x = self._hx[nh]
                if not idle:
                    self._backtracks += 1
                continue
            self._hx[nh] = x
            self._hj[nh] = j
            nh += 1
            yi = self._cy[off + j]
            if yi < 0:
                return nh
            x = yi

    def route(self, request_id, input_len):
        cdef long long n
        if type(input_len) is int and 1 <= input_len <= _MAX_N:
            n = input_len
        else:
            n = check_input_len(input_len)
        cdef KVTracker kv = self._kv
        if request_id in kv._resv:
            raise ValueError(f"request {request_id!r} already holds a KV reservation")
        cdef long long e = kv._expected(n)
        cdef Py_ssize_t nh = self._search(n, e, False)
        if nh < 0:
            self._failed += 1
            return None
        cdef double work = <double> n
        cdef Py_ssize_t nr = 0
        cdef Py_ssize_t h, c, j
        cdef IWRR iw
        for h in range(nh):
            c = self._coff[self._hx[h]] + self._hj[h]
            if self._cy[c] >= 0:
                self._rkv[nr] = self._ckv[c]
                self._rlayers[nr] = self._clayers[c]
                nr += 1
        kv._reserve_arrays(request_id, self._rkv, self._rlayers, nr, e)
        # every hop is charged; the last one, to the sink, is left out of the route (implicit)
        route = PyTuple_New(nh - 1)
        for h in range(nh):
            j = self._hj[h]
            iw = <IWRR> PyList_GET_ITEM(self._iwrr, self._hx[h])
            iw._load[j] = iw._load[j] + work / iw._w[j]
            if h < nh - 1:
                stage = <object> PyList_GET_ITEM(self._cstage, self._coff[self._hx[h]] + j)
                Py_INCREF(stage)
                PyTuple_SET_ITEM(route, h, stage)
        self._routed += 1
        return route

    def on_decode(self, route):
        # every hop is found first (source -> the stages' nodes -> sink), then charged: a bad
        # route charges nothing
        cdef Py_ssize_t x = 0
        cdef Py_ssize_t nh = 0
        cdef Py_ssize_t off, m, k, j, yi, h
        cdef IWRR iw
        for stage in route:
            off = self._coff[x]
            m = self._coff[x + 1] - off
            j = -1
            # a route from route() holds this router's own stage tuples: match them by identity,
            # anything else (a copy, the other twin's route) by its node
            for k in range(m):
                if <object> PyList_GET_ITEM(self._cstage, off + k) is stage:
                    j = k
                    break
            if j < 0:
                try:
                    yi = self._sidx.get(stage[0], -2)
                except TypeError:  # unhashable: no node
                    yi = -2
                if yi > 0:  # a compute node (0 is the source: no link enters it)
                    for k in range(m):
                        if self._cy[off + k] == yi:
                            j = k
                            break
                if j < 0 or nh >= self._ns:  # (a path visits each node once: nh < ns)
                    raise ValueError(f"hop {self._sched[x]}->{stage[0]} is not a candidate link of this router")
            self._dx[nh] = x
            self._dj[nh] = j
            nh += 1
            x = self._cy[off + j]
        off = self._coff[x]
        m = self._coff[x + 1] - off
        j = -1
        for k in range(m):
            if self._cy[off + k] < 0:
                j = k
                break
        if j < 0:
            raise ValueError(f"hop {self._sched[x]}->{SINK} is not a candidate link of this router")
        self._dx[nh] = x
        self._dj[nh] = j
        nh += 1
        for h in range(nh):
            iw = <IWRR> PyList_GET_ITEM(self._iwrr, self._dx[h])
            j = self._dj[h]
            iw._load[j] = iw._load[j] + 1.0 / iw._w[j]

    def finish(self, request_id):
        self._kv.release(request_id)

    def __repr__(self):
        return f"FlowRouter(nodes={self._ns - 1}, L={self._L}, kv={self._kv!r})"
