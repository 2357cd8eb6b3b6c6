# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of the bare-callback path of helix_async/vloop.py (the specification: its
``_Plain``, ``VirtualTimeLoop.call_at_plain`` and the plain-callback fast path of ``_run_once``;
read those first).

Same heap (the loop's ``_scheduled``), same keys ``(when, seq, handle)``, same order, same
attribute updates on the loop; only the interpreter is gone from the simulator's per-event path.
"""

cimport cython

import heapq

cdef object _heappush = heapq.heappush
cdef object _heappop = heapq.heappop
cdef double _INF = float("inf")


@cython.freelist(512)
cdef class Plain:
    """``vloop._Plain``: a bare callback in the loop's timer heap."""

    cdef public object _loop, _fn, _args
    cdef public bint _cancelled, _scheduled
    cdef public double _when

    def __init__(self, loop, double when, fn, tuple args):
        self._loop = loop
        self._when = when
        self._fn = fn
        self._args = args
        self._cancelled = False
        self._scheduled = False

    def when(self):
        return self._when

    def cancel(self):
        if self._cancelled:
            return
        if self._scheduled:
            self._loop._timer_cancelled_count += 1
        self._cancelled = True
        self._fn = None
        self._args = ()

    def cancelled(self):
        return self._cancelled

    def _run(self):
        try:
            self._fn(*self._args)
        except BaseException as exc:
            loop = self._loop
            if loop._plain_error is None:
                loop._plain_error = exc
            loop.stop()


def call_at_plain(loop, double when, fn, *args):
    """``VirtualTimeLoop.call_at_plain`` with the loop passed first."""
    cdef double now = loop._now
    cdef Plain h = Plain.__new__(Plain)
    h._loop = loop
    h._when = when
    h._fn = fn
    h._args = args
    h._cancelled = False
    seq = loop._seq + 1
    loop._seq = seq
    _heappush(loop._scheduled, (when if when > now else now, seq, h))
    h._scheduled = True
    return h


def run_plain(loop, list sched, ready, deadline):
    """The fast path of ``VirtualTimeLoop._run_once``: run the bare callbacks at the head of
    ``sched`` while nothing else is ready; returns how many ran.  An exception is stored in
    ``loop._plain_error`` (the first one) and stops the loop, as the Python version does."""
    cdef Py_ssize_t ran = 0
    cdef double dl = _INF if deadline is None else <double>deadline
    cdef double now = loop._now
    cdef double when
    cdef tuple entry
    cdef Plain h
    try:
        while sched:
            entry = <tuple>sched[0]
            if type(entry[2]) is not Plain:
                break
            when = entry[0]
            if when == _INF or when >= dl:
                break
            _heappop(sched)
            h = <Plain>entry[2]
            h._scheduled = False
            if h._cancelled:
                loop._timer_cancelled_count -= 1
                continue
            if when > now:
                now = when
                loop._now = when
            ran += 1
            h._fn(*h._args)
            if ready or loop._stopping:
                break
    except BaseException as exc:
        if loop._plain_error is None:
            loop._plain_error = exc
        loop._stopping = True
    return ran
