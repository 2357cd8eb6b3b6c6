"""The torch executor: really runs a worker's layers of a LLaMA model (CPU or CUDA).

The worker hands it the same batches it hands the cost model (one layer, docs/original.md §8.5) and it
computes them with :mod:`helix_async.executors.llama`:

* a request entering the node's stage at layer 0 brings token ids (``PromptWork.token_ids``, a
  decode's ``token_id``), embedded here; entering later, the hidden states of the previous stage
  (the message's first tensor, (tokens, hidden));
* between layers of the stage the hidden states stay on the item (``item.data``); a batch may run
  several consecutive layers in one call (the worker's runs of layers), which :meth:`shorten`
  cuts short when a request arrives at one of them, as the cost model's runs are;
* after the model's last layer the final norm and LM head run on each request's last position and
  a token is chosen by :mod:`helix_async.executors.sampling` (the request's penalties, ban,
  temperature, truncation and seeded draw, or plain greedy), which ``item.data`` then holds (its
  id, or a ``SampledToken`` with log-probabilities when the request asked for them);
* every request keeps a KV cache per layer here (:class:`~helix_async.executors.llama.SeqCache`);
  the worker frees it through :meth:`TorchExecutor.release` when its KV accounting frees the
  request (finished, cancelled or preempted).

A request whose input is unusable (a tensor of the wrong shape, a token id outside the
vocabulary) fails alone: its ``item.data`` becomes an :class:`ExecFailure` and the worker reports
it to the host; the others in the batch run on.

``run`` does not block the event loop: by default the batch is computed on one helper thread and
``done`` is posted back to the loop (torch releases the GIL in its kernels, so the loop keeps
moving messages meanwhile).  ``threaded=False`` computes inline and calls ``done`` on the next loop
turn: for the virtual-time loop, which refuses threads, and for tests.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..clock import Clock
from ..messages import PromptWork
from .base import Batch, ExecFailure
from .llama import SeqCache, StageWeights
from .registry import ExecutorLoadError
from .sampling import RequestSampler, sample, sampler_for

if TYPE_CHECKING:
    from .registry import ExecutorContext

__all__ = ["ExecFailure", "TorchExecutor", "from_context"]


class TorchExecutor:
    """Runs batches of a worker on ``stage`` (see the module doc).

    clock: the worker's clock (``done`` is scheduled on its loop). threaded: compute on a helper
    thread (real time) or inline (virtual time, tests). threads: torch intra-op threads for this
    process (None: leave torch's setting).
    """

    def __init__(self, clock: Clock, stage: StageWeights, *, threaded: bool = True, threads: int | None = None) -> None:
        self._clock = clock
        self.stage = stage
        self.num_layers = stage.config.num_layers
        self.hidden = stage.config.hidden_size
        self.vocab = stage.config.vocab_size
        self._caches: dict[int, SeqCache] = {}
        self._sampling: dict[int, RequestSampler] = {}  # requests that do not take the plain arg-max
        self._threaded = threaded
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: Any = None
        if threads is not None:
            torch.set_num_threads(int(threads))
        # the run of layers now computing (see shorten): its layer limit and the layers started
        self._lock = threading.Lock()
        self._limit = 0
        self._started = 0
        self.busy_time = 0.0  # wall seconds spent computing (statistics only)
        self.batches = 0
        self.failures = 0
        self._last = 0.0  # the last batch's wall time (duration's estimate)

    # ---- the Executor interface -----------------------------------------------------------------

    def duration(self, batch: Batch) -> float:
        """An estimate only (the last batch's measured time)."""
        return self._last

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        with self._lock:
            self._limit = batch.layers
            self._started = 0
        caches = []
        for it in batch.items:
            c = self._caches.get(it.rid)
            if c is None:
                c = self._caches[it.rid] = SeqCache()
            caches.append(c)
        if not self._threaded:
            self._compute(batch, caches)
            self._clock.call_soon(done, batch)
            return
        if self._pool is None:
            import asyncio

            self._loop = asyncio.get_running_loop()
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="helix-torch")
        loop = self._loop
        fut = self._pool.submit(self._compute, batch, caches)
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(done, batch))

    def shorten(self, batch: Batch, layers: int) -> int:
        """Stop the running run of layers after its first ``layers`` layers, or after the one
        computing now if that is later; returns the count it will have run (``batch.layers``)."""
        with self._lock:
            n = batch.layers
            k = max(layers, self._started)
            if k >= n:
                return n
            self._limit = k
            batch.layers = k
            return k

    # ---- what the worker tells it ---------------------------------------------------------------

    def release(self, rid: int) -> None:
        """The worker freed request ``rid`` here: drop its KV cache (and sampling state)."""
        self._caches.pop(rid, None)
        self._sampling.pop(rid, None)

    def set_sampling(self, rid: int, sampler: RequestSampler) -> None:
        self._sampling[rid] = sampler

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def cached_requests(self) -> int:
        return len(self._caches)

    # ---- live KV migration (docs/migration.md) ----------------------------------------------------

    def export_kv(self, rid: int, first: int, count: int, done: Callable[[Any, Any], None], token: Any) -> None:
        """Read request ``rid``'s keys and values for positions ``[first, first + count)`` of this
        stage's layers, in the order of the batches (on the compute thread when threaded), and
        call ``done(token, array)`` on the loop: an array (layers, 2, kv_heads, count, head_dim) in
        the cache's dtype (bfloat16 as float32: the wire has no bfloat16), or an ExecFailure."""
        self._off_loop(self._export, (rid, first, count), done, token)

    def import_kv(self, rid: int, first: int, data: Any, done: Callable[[Any, Any], None], token: Any) -> None:
        """Write ``data`` (as :meth:`export_kv` gives it) into request ``rid``'s cache at positions
        ``[first, first + count)``, giving it a slot first; ``done(token, None)`` when it is there,
        ``done(token, reason)`` when it cannot be."""
        self._off_loop(self._import, (rid, first, data), done, token)

    def _off_loop(self, fn: Callable[..., Any], args: tuple, done: Callable[[Any, Any], None], token: Any) -> None:
        if not self._threaded:
            self._clock.call_soon(done, token, fn(*args))
            return
        if self._pool is None:
            import asyncio

            self._loop = asyncio.get_running_loop()
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="helix-torch")
        loop = self._loop
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(done, token, f.result()))

    def _export(self, rid: int, first: int, count: int) -> Any:
        cache = self._caches.get(rid)
        slab = self.stage.kv
        if cache is None or cache.slab is not slab or first + count > slab.touched[cache.slot]:
            return ExecFailure(f"request {rid} holds no KV for positions [{first}, {first + count}) here")
        with slab._lock, torch.inference_mode():
            parts = []
            for layer in slab.layers:
                k = slab.k[layer][cache.slot, :, first : first + count]
                v = slab.v[layer][cache.slot, :, first : first + count]
                parts.append(torch.stack((k, v)))
            out = torch.stack(parts).to("cpu")
        if out.dtype == torch.bfloat16:
            out = out.float()
        return out.numpy()

    def _import(self, rid: int, first: int, data: Any) -> Any:
        slab = self.stage.kv
        t = torch.from_numpy(np.asarray(data))
        want = (len(slab.layers), 2, slab.kv_heads, slab.head_dim)
        if t.ndim != 5 or (t.shape[0], t.shape[1], t.shape[2], t.shape[4]) != want:
            return f"KV of shape {tuple(t.shape)}, expected ({want[0]}, 2, {want[2]}, count, {want[3]})"
        if not t.dtype.is_floating_point:
            return f"KV of dtype {t.dtype}, expected floating point"
        count = t.shape[3]
        cache = self._caches.get(rid)
        if cache is None:
            if first != 0:
                return f"the first chunk of request {rid} starts at position {first}, not 0"
            cache = self._caches[rid] = SeqCache()
        slab.admit(cache, first + count, first + count)
        t = t.to(dtype=slab.dtype, device=slab.device)
        with slab._lock, torch.inference_mode():
            for i, layer in enumerate(slab.layers):
                slab.k[layer][cache.slot, :, first : first + count] = t[i, 0]
                slab.v[layer][cache.slot, :, first : first + count] = t[i, 1]
        return None

    # ---- compute --------------------------------------------------------------------------------

    def _input(self, item: Any, layer: int) -> torch.Tensor | ExecFailure:
        """The hidden states ``item`` enters this stage with (tokens, hidden)."""
        st = self.stage
        msg = item.msg
        n = item.tokens
        if layer == 0:
            if msg.__class__ is PromptWork:
                ids = list(msg.token_ids)
                if len(ids) != n:
                    return ExecFailure(
                        f"prompt carries {len(ids)} token ids for {n} tokens (a preempted request cannot be recomputed here)"
                    )
            else:
                ids = [msg.token_id]
                if n != 1:
                    return ExecFailure("a preempted decode cannot be recomputed from one token id")
            if any(not 0 <= t < self.vocab for t in ids):
                return ExecFailure(f"token id outside the vocabulary [0, {self.vocab})")
            return st.embed_tokens(ids)
        if not msg.tensors:
            return ExecFailure(f"work entering layer {layer} carries no hidden states")
        t = msg.tensors[0]
        if isinstance(t, np.ndarray):
            if t.dtype.kind != "f":
                return ExecFailure(f"hidden states of dtype {t.dtype}, expected floating point")
            t = torch.from_numpy(np.array(t))  # a copy: decoded frames are read-only
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, self.hidden):
            return ExecFailure(
                f"hidden states of shape {tuple(getattr(t, 'shape', ()))}, expected ({n}, {self.hidden})"
            )
        return t.to(dtype=st.dtype, device=st.device)

    def _compute(self, batch: Batch, caches: list[SeqCache]) -> None:
        t0 = time.perf_counter()
        try:
            self._compute_batch(batch, caches)
        except Exception as e:  # a bug or an out-of-memory: this batch's requests fail, the node lives
            self.failures += 1
            for it in batch.items:
                it.data = ExecFailure(f"{type(e).__name__}: {e}")
        self._last = time.perf_counter() - t0
        self.busy_time += self._last
        self.batches += 1

    @torch.inference_mode()
    def _compute_batch(self, batch: Batch, caches: list[SeqCache]) -> None:
        st = self.stage
        first = batch.layer
        last = first + batch.layers
        xs: list[torch.Tensor] = []
        live: list[Any] = []
        spans: list[tuple[int, int]] = []
        live_caches: list[SeqCache] = []
        reserve: list[int] = []
        for it, cache in zip(batch.items, caches, strict=True):
            data = it.data
            if data is None:
                data = self._input(it, first)
            if isinstance(data, ExecFailure):
                it.data = data
                continue
            msg = it.msg
            xs.append(data)
            live.append(it)
            spans.append((it.ctx, it.tokens))
            live_caches.append(cache)
            reserve.append(msg.num_tokens + msg.max_tokens if msg.__class__ is PromptWork else it.ctx + 1)
        if not live:
            return
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=0)
        lock = self._lock
        ran = 0
        for layer in range(first, last):
            with lock:  # a shortened run stops here
                if ran >= self._limit:
                    break
                ran += 1
                self._started = ran
            x = st.layer(layer, x, spans, live_caches, reserve)
        last = first + ran
        if last == self.num_layers:
            # each request's last position chooses its next token
            ends = []
            off = 0
            for _, n in spans:
                off += n
                ends.append(off - 1)
            logits = st.logits(x[ends])
            samplers = []
            for it in live:
                s = self._sampling.get(it.rid)
                if s is None and it.msg.__class__ is PromptWork:
                    s = sampler_for(it.msg, self.vocab, logits.device)
                    if s is not None:
                        self._sampling[it.rid] = s
                samplers.append(s)
            for it, tok in zip(live, sample(logits, samplers), strict=True):
                it.data = tok  # an int, or a SampledToken with its log-probabilities
            return
        off = 0
        for it, (_, n) in zip(live, spans, strict=True):
            it.data = x[off : off + n]
            off += n


def from_context(ctx: ExecutorContext) -> TorchExecutor:
    """The registry's factory (``executors.registry``): the worker's layers from its
    ``checkpoint`` (a Hugging Face directory or a GGUF file; default: the plan's model's own, when it
    was read from files) or seeded dummy weights of the plan's model, computed in ``dtype`` (default:
    the checkpoint's; float32 for a GGUF and for dummy weights) on ``device``, on one helper thread
    with ``threads`` torch threads.

    Raises :class:`ExecutorLoadError`: with ``out_of_memory`` when the layers' weights exceed
    ``memory_bytes`` (when set) or the GPU's free memory, or an allocation fails while loading;
    without it for anything else (a checkpoint that is not the plan's model or not readable, no
    CUDA).  Blocks while it loads: the worker calls it off its event loop.
    """
    from ..errors import ConfigError
    from ..models.weights import open_checkpoint
    from .llama import LlamaConfig, ModelLoadError, dummy_stage, load_stage, stage_bytes, torch_dtype
    from .profiling import llama_config

    opts = ctx.options
    spec = ctx.model
    start, end = ctx.layers
    checkpoint = str(opts["checkpoint"] or spec.checkpoint)
    device = str(opts["device"])
    dtype = str(opts["dtype"] or "")
    memory = int(opts["memory_bytes"])
    try:
        if checkpoint:
            ck = open_checkpoint(checkpoint)
            cfg = LlamaConfig.from_arch(ck.arch)
            dtype = dtype or ck.dtype
        else:
            cfg = llama_config(spec)
            dtype = dtype or "float32"
        if (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) != (spec.num_layers, spec.hidden_size, spec.vocab_size):
            raise ModelLoadError(f"{checkpoint}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocabulary "
                                 f"{cfg.vocab_size}; the plan's {spec.name} has {spec.num_layers}, {spec.hidden_size}, "
                                 f"{spec.vocab_size}")
        need = stage_bytes(cfg, start, end, torch_dtype(dtype).itemsize)
        if memory and need > memory:
            raise ExecutorLoadError(f"layers [{start}, {end}) need {need} bytes of weights; the device holds {memory}",
                                    out_of_memory=True)
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ModelLoadError("--device cuda: CUDA is not available on this machine")
            free, _total = torch.cuda.mem_get_info(torch.device(device))
            if need > free:
                raise ExecutorLoadError(f"layers [{start}, {end}) need {need} bytes; the GPU has {free} free",
                                        out_of_memory=True)
        if checkpoint:
            stage = load_stage(checkpoint, start, end, dtype=dtype, device=device)
        else:
            stage = dummy_stage(cfg, start, end, seed=int(opts["seed"]), dtype=dtype, device=device)
    except (ModelLoadError, ConfigError) as e:
        raise ExecutorLoadError(str(e)) from None
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        raise ExecutorLoadError(f"layers [{start}, {end}): out of memory while loading ({e})", out_of_memory=True) from None
    return TorchExecutor(ctx.clock, stage, threaded=True, threads=int(opts["threads"]))
