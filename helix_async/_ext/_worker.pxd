# C types for the compiled build of helix_async/worker.py (setup.py compiles that file, unchanged,
# as helix_async._ext._worker; Cython reads this file by that module name).  The Python file is the
# specification and the pure-Python build; nothing here changes what it does, only how fast.
cimport cython

cdef class _Item:
    cdef public Py_ssize_t rid, tokens, ctx, layer, end, entry, stage, prio
    cdef public bint prompt
    cdef public object route, msg, data
    cdef public double arrived

cdef class _Req:
    cdef public Py_ssize_t kv, ctx_done, last_ctx, layers, seq, entry, prio
    cdef public bint recompute, awaited
    cdef public double t_out, rt

cdef class Worker:
    cdef public Py_ssize_t node_id, a, b, num_layers, kv_capacity, kv_used
    cdef public object stats, limits, settings
    cdef public bint stopped
    cdef public object _clock, _now, _soon, _transport, _send, _executor, _shorten, _release, _batch
    cdef public object _kv_wait, _link_wait, _policy, _peer_len
    cdef public tuple _lim, _out
    cdef public Py_ssize_t _act, _tok
    cdef public list _queues, _queued_prompts, _queued_prompt_tokens, _queued_decodes, _queued_decode_ctx
    cdef public list _queued_host_tokens
    cdef public Py_ssize_t _queued, _ending_early, _cur, _cancel_debt, _host_tokens, _seq, _credited
    cdef public bint _busy, _purge, _kick_pending, _free_only, _compat, _feedback
    cdef public dict _reqs, _next_layers, _out_reqs
    cdef public double _gather, _last_run_s, _gather_from, _entry_started
    cdef public Py_ssize_t _awaiting, _gather_gen
    cdef public bint _gathering, _no_gather
    cdef public dict _mig_out, _mig_in
    cdef public Py_ssize_t _kv_token_bytes, _mig_chunk, _mig_tail
    cdef public object _export, _import

    @cython.locals(item=_Item, req=_Req, stage=tuple, n=Py_ssize_t, rid=Py_ssize_t)
    cpdef on_message(self, object sender, object msg)
    @cython.locals(req=_Req, need=Py_ssize_t)
    cpdef bint _reserve(self, _Item item)
    @cython.locals(batch=object)
    cpdef _enqueue(self, _Item item)
    cpdef _kick(self)
    @cython.locals(it=_Item, item=_Item, n=Py_ssize_t, cur=Py_ssize_t, p_req=Py_ssize_t,
                   p_tok=Py_ssize_t, d_seq=Py_ssize_t, d_ctx=Py_ssize_t, host=Py_ssize_t,
                   pmr=Py_ssize_t, pmt=Py_ssize_t, dmt=Py_ssize_t, dmc=Py_ssize_t,
                   last=Py_ssize_t, j=Py_ssize_t, queues=list, q=list, chosen=list, skipped=list,
                   first=Py_ssize_t)
    cpdef _step(self)
    @cython.locals(req=_Req, n=Py_ssize_t, entry=Py_ssize_t, now=double, horizon=double)
    cpdef bint _start_gather(self, cur)
    @cython.locals(req=_Req)
    cpdef _end_gather(self)
    cpdef _returned(self, rid, _Req req)
    @cython.locals(item=_Item, k=Py_ssize_t, layer=Py_ssize_t, nxt=Py_ssize_t, i=Py_ssize_t,
                   b=Py_ssize_t, items=list, forward=list, whole=bint, purge=bint)
    cpdef _done(self, object batch)
    @cython.locals(g=Py_ssize_t)
    cpdef _settle_run(self)
    @cython.locals(i=Py_ssize_t)
    cpdef _enqueue_moved(self, _Item item)
    @cython.locals(stage=Py_ssize_t, now=double)
    cpdef _leave(self, _Item item)
    @cython.locals(req=_Req, n=Py_ssize_t, ctx_after=Py_ssize_t, data=object)
    cpdef _emit(self, _Item item, object dest, object route, double now)
