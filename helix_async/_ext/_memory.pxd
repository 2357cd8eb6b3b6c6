# C types for the compiled build of helix_async/transport/memory.py (setup.py compiles that file,
# unchanged, as helix_async._ext._memory; Cython reads this file by that module name).  The Python
# file is the specification and the pure-Python build; nothing here changes what it does.
cimport cython

cdef class _Link:
    cdef public object src, dst, queue, pending
    cdef public double bandwidth, latency, rate, free_at, bytes, busy_time
    cdef public bint busy
    cdef public Py_ssize_t messages, max_queue

cdef class MemoryNetwork:
    cdef public object _clock, _at, _size, _cluster
    cdef public str mode
    cdef public bint _reserved
    cdef public dict links, _out_nic, _in_nic, _n_out, _busy_out, _busy_in, _in_used
    cdef public dict _handlers, _idle_handlers
    cdef public Py_ssize_t control_messages, dropped

    @cython.locals(link=_Link, size=double, now=double, start=double, dur=double, finish=double)
    cpdef send(self, object src, object dest, object msg)
    @cython.locals(bo=Py_ssize_t, bi=Py_ssize_t, rate=double, dur=double, size=double)
    cpdef _start(self, _Link link)
    cpdef _sent(self, _Link link, object msg, double rate)
    cpdef _maybe_idle(self, _Link link)
    cpdef _deliver(self, object dest, object src, object msg)
