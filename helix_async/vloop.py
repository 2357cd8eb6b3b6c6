"""Virtual-time asyncio event loop: the simulator's engine.

:class:`VirtualTimeLoop` is a complete asyncio event loop whose clock is virtual: ``loop.time()``
is a float of *virtual seconds* that only moves when every coroutine is blocked.  Whenever nothing
is ready to run, the loop jumps straight to the earliest scheduled timer (like trio's ``MockClock``
with autojump), so hours of ``asyncio.sleep`` take microseconds of wall time.  Host/worker code is
plain asyncio and runs unchanged here or on uvloop; only the loop differs.

Guarantees, beyond stock asyncio:

* **Exact timestamps.**  A timer fires with ``loop.time()`` equal to its ``when`` bit for bit (the
  loop sets the clock to ``when`` instead of adding a computed timeout), and time never moves
  backwards: a timer scheduled in the past fires at the current time.
* **FIFO among equal times.**  Timers are ordered by ``(when, insertion sequence)``, as SimPy orders
  events by ``(time, priority, id)``.  Stock asyncio compares only ``when``, so its heap may run
  same-time timers in any order.  A timer scheduled in the past (``call_later(-1)``) is queued at
  the current time, so it never overtakes callbacks or timers already due now (as on uvloop,
  where a past deadline becomes ``call_soon``; stock asyncio would run it before the timers due
  now, its deadline being earlier).
* **No hangs.**  If nothing is ready and no timer will ever fire, ``run_forever``/
  ``run_until_complete`` raise :class:`DeadlockError` instead of waiting forever (SimPy raises on an
  empty schedule too).  A timer at ``when == inf`` counts as "will never fire".
* **No real I/O, no threads.**  Sockets, DNS, pipes, subprocesses, signals, fd watchers and
  executors (hence ``asyncio.to_thread``) raise :class:`VirtualTimeIOError`: their completion
  depends on the real world, so they would either never complete or complete at a meaningless
  virtual time.

Entry points: :func:`run_virtual` (like ``asyncio.run``, with an optional virtual deadline) and
:meth:`VirtualTimeLoop.run_until` (advance a long-lived loop step by step, for the simulator).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import logging
import math
import threading
import time
import weakref
from asyncio import base_events, events
from collections.abc import Callable, Coroutine
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from helix_async import _ext
from helix_async.errors import HelixError

__all__ = [
    "DeadlockError",
    "VirtualTimeIOError",
    "VirtualTimeLoop",
    "run_virtual",
]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

# Compact the timer heap when it holds more than this many entries and more than this fraction of
# them are cancelled (same policy as BaseEventLoop): cancelled timers are otherwise removed lazily,
# only when they reach the head of the heap.
_MIN_SCHEDULED_FOR_COMPACTION = 100
_MAX_CANCELLED_FRACTION = 0.5

# How many pending tasks a DeadlockError names (it always gives the total count).
_DEADLOCK_TASKS_SHOWN = 5


class VirtualTimeIOError(HelixError, RuntimeError):
    """A real-I/O or thread operation was attempted on a :class:`VirtualTimeLoop`.

    ``call`` names the refused loop method, ``reason`` says why it cannot work under virtual time.
    """

    def __init__(self, call: str, reason: str) -> None:
        self.call = call
        self.reason = reason
        super().__init__(
            f"loop.{call}() is refused by VirtualTimeLoop: {reason}. The loop runs in virtual time "
            "and never waits for the operating system, so this would never complete, or complete "
            "at a meaningless virtual time. Run this code on a real-time loop (asyncio/uvloop) or "
            "use a simulated transport."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*self.args); our constructor takes different arguments.
        return (type(self), (self.call, self.reason))


class DeadlockError(HelixError, RuntimeError):
    """Nothing is ready and no timer will ever fire: the virtual-time run can never make progress.

    ``virtual_time`` is the loop time (seconds) at which it was detected, ``pending_tasks`` the
    number of unfinished tasks on the loop (each is blocked on something nobody will resolve),
    ``detail`` names the first few of them (creation order) or the context.
    """

    def __init__(self, virtual_time: float, pending_tasks: int, detail: str = "") -> None:
        self.virtual_time = virtual_time
        self.pending_tasks = pending_tasks
        self.detail = detail
        msg = (
            f"deadlock at virtual time t={virtual_time!r}s: no callback is ready and no timer will "
            f"ever fire, so nothing can happen again; {pending_tasks} task(s) pending"
        )
        if detail:
            msg += f": {detail}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*self.args); our constructor takes different arguments.
        return (type(self), (self.virtual_time, self.pending_tasks, self.detail))


def _refuse(name: str, reason: str) -> Any:
    """Build a loop method that raises :class:`VirtualTimeIOError` naming ``name``.

    Typed ``Any`` so that one factory can stand in for methods of many different signatures.

    Refusals raise synchronously, at the call, even for methods that are coroutines on other loops:
    ``await loop.create_connection(...)`` fails the same way, and a refused call that is never
    awaited cannot leave a "coroutine was never awaited" warning behind.
    """

    def refused(self: VirtualTimeLoop, *args: Any, **kwargs: Any) -> NoReturn:
        raise VirtualTimeIOError(name, reason)

    refused.__name__ = refused.__qualname__ = name
    refused.__doc__ = f"Refused under virtual time: {reason}."
    return refused


_FD = "watching file descriptors is real I/O"
_SOCK = "socket I/O is real I/O"
_NET = "opening network/unix transports is real I/O"
_DNS = "name resolution runs in a thread pool and talks to the network"
_PIPE = "pipes are real I/O"
_PROC = "child processes run in real time"
_THREAD = "threads run in real time, outside the virtual clock (this covers asyncio.to_thread)"
_SIGNAL = "signals arrive in real time"


# Hot-path handles.  Every task step, future callback and sleep creates a Handle or TimerHandle,
# and the stock constructors cost two Python frames plus a get_debug() call each.  These subclasses
# set exactly the fields Handle/TimerHandle.__init__ set (the slots are the same from Python 3.7 to
# 3.13; tests/test_vloop.py checks them against the stock constructors) in one frame, without the
# debug-only source traceback.  In debug mode the loop uses the stock constructors instead.


class _Handle(events.Handle):
    """``call_soon`` handle with a one-frame constructor (non-debug mode only)."""

    __slots__ = ()

    if TYPE_CHECKING:
        _source_traceback: list[Any] | None

    def __init__(
        self,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: VirtualTimeLoop,
        context: Context | None = None,
    ) -> None:
        self._context = copy_context() if context is None else context
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None


class _Timer(events.TimerHandle):
    """The loop's timer handle: one-frame constructor and ``cancel`` (non-debug mode)."""

    __slots__ = ()

    if TYPE_CHECKING:
        _scheduled: bool
        _source_traceback: list[Any] | None

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: VirtualTimeLoop,
        context: Context | None = None,
    ) -> None:
        self._context = copy_context() if context is None else context
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None
        self._when = when
        self._scheduled = False

    def cancel(self) -> None:
        """Cancel the timer (asyncio.sleep cancels its timer after every wake-up: hot path)."""
        if self._cancelled:
            return
        loop: Any = self._loop
        if loop._debug:
            super().cancel()  # keeps the stock debug behaviour (repr kept for slow-callback logs)
            return
        if self._scheduled:
            loop._timer_cancelled_count += 1  # what BaseEventLoop._timer_handle_cancelled does
        self._cancelled = True
        self._callback = None  # type: ignore[assignment]  # as Handle.cancel: drop references
        self._args = None  # type: ignore[assignment]


class _Plain:
    """A bare callback for :meth:`VirtualTimeLoop.call_at_plain`: no context, no asyncio Handle.

    Quacks like the loop's timer handles where ``_run_once`` and the heap compaction look
    (``_cancelled``, ``_scheduled``, ``_run``).  An exception stops the loop and is re-raised by
    the ``run_*`` call that was driving it: a simulation must not carry on past a failed callback.
    """

    __slots__ = ("_loop", "_fn", "_args", "_cancelled", "_scheduled", "_when")

    def __init__(self, loop: VirtualTimeLoop, when: float, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._loop = loop
        self._when = when
        self._fn = fn
        self._args = args
        self._cancelled = False
        self._scheduled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        if self._cancelled:
            return
        if self._scheduled:
            self._loop._timer_cancelled_count += 1
        self._cancelled = True
        self._fn = None  # type: ignore[assignment]
        self._args = ()

    def cancelled(self) -> bool:
        return self._cancelled

    def _run(self) -> None:
        try:
            self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - handed to the driving run_* call
            loop = self._loop
            if loop._plain_error is None:
                loop._plain_error = exc
            loop.stop()


class VirtualTimeLoop(base_events.BaseEventLoop):
    """asyncio event loop on a virtual clock (seconds, starting at ``start``).

    Use it like any loop (``run_until_complete``, ``create_task``, ...), through
    :func:`run_virtual`, or step it with :meth:`run_until`.  See the module docstring for the
    guarantees (exact timestamps, FIFO same-time timers, DeadlockError, refused I/O).

    ``self._scheduled`` holds ``(due, seq, TimerHandle)`` tuples instead of bare handles: tuple
    comparison is done in C and the unique ``seq`` gives FIFO order among equal ``due`` without
    ever comparing handles.  ``due`` is the handle's ``when``, or the virtual time at which it was
    scheduled if ``when`` was already past.
    """

    if TYPE_CHECKING:
        # BaseEventLoop internals this class relies on; typeshed does not declare them.
        _ready: collections.deque[events.Handle]
        _closed: bool
        _scheduled: list[tuple[float, int, _Timer | _Plain]]
        _timer_cancelled_count: int
        _stopping: bool
        _debug: bool
        _thread_id: int | None
        _current_handle: events.Handle | None

        def _check_closed(self) -> None: ...
        def _check_running(self) -> None: ...
        def _check_thread(self) -> None: ...
        def _check_callback(self, callback: Any, method: str) -> None: ...

    def __init__(self, start: float = 0.0) -> None:
        """``start``: initial virtual time, in seconds (finite)."""
        super().__init__()
        start = float(start)
        if not math.isfinite(start):
            raise ValueError(f"start must be a finite number of seconds, got {start!r}")
        self._now = start
        self._seq = 0
        # _run_once never adds a resolution slack: a timer is due when ``when <= now``, exactly.
        self._clock_resolution = 0.0
        self._deadline: float | None = None
        self._idle_ok = False
        self._deadline_reached = False
        self._callbacks_run = 0
        # Weak references to the tasks made by create_task, in creation order (asyncio.all_tasks
        # is a set ordered by memory address, so it differs from run to run).  Dead and finished
        # entries are pruned whenever the list doubles: O(1) amortized per task.
        self._task_refs: list[weakref.ref[asyncio.Task[Any]]] = []
        self._task_refs_prune_at = 64
        self._plain_error: BaseException | None = None
        if _call_at_plain is not None:  # the compiled twin of call_at_plain, bound to this loop
            self.call_at_plain = functools.partial(_call_at_plain, self)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ clock and timers

    def time(self) -> float:
        """Current virtual time, in seconds."""
        return self._now

    @property
    def callbacks_run(self) -> int:
        """Number of callbacks (handles, including task steps) this loop has run so far."""
        return self._callbacks_run

    def call_soon(  # type: ignore[override]  # typeshed spells *args with TypeVarTuple
        self,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> events.Handle:
        """Run ``callback(*args)`` in the next loop iteration (FIFO), at the current virtual time."""
        if self._debug:
            return super().call_soon(callback, *args, context=context)
        if self._closed:
            raise RuntimeError("Event loop is closed")
        handle = _Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(  # type: ignore[override]  # typeshed spells *args with TypeVarTuple
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> events.TimerHandle:
        """Schedule ``callback(*args)`` at virtual time ``time() + delay`` (delay in seconds)."""
        if delay is None:
            raise TypeError("delay must not be None")
        return self.call_at(self._now + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]  # typeshed spells *args with TypeVarTuple
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> events.TimerHandle:
        """Schedule ``callback(*args)`` at virtual time ``when`` (seconds).

        Timers with equal ``when`` run in the order they were scheduled.  A ``when`` in the past
        means "now": the timer is queued at the current time (time never moves backwards), so it
        runs after the callbacks and timers already due now, in scheduling order, as on uvloop;
        ``handle.when()`` still reports the ``when`` asked for.  ``when == inf`` never fires.
        """
        if when is None:
            raise TypeError("when cannot be None")
        when = float(when)
        if when != when:  # NaN would corrupt the heap order
            raise ValueError("when must not be NaN")
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_at")
            timer = _Timer.__new__(_Timer)
            events.TimerHandle.__init__(timer, when, callback, args, self, context)
            if timer._source_traceback:
                del timer._source_traceback[-1]
        else:
            timer = _Timer(when, callback, args, self, context)
        self._seq += 1
        # Key a past deadline at the current time: keyed at its own ``when`` it would sort before,
        # and so overtake, the timers already due now.
        heapq.heappush(self._scheduled, (when if when > self._now else self._now, self._seq, timer))
        timer._scheduled = True
        return timer

    def call_at_plain(self, when: float, fn: Callable[..., object], *args: Any) -> _Plain:
        """Schedule the bare callback ``fn(*args)`` at virtual time ``when`` (seconds); same order as
        :meth:`call_at` (FIFO among equal times, a past ``when`` means now).

        The simulator's hot path: no ``contextvars`` copy, no asyncio handle, about a fifth of the
        cost of ``call_at``.  The returned handle has ``cancel()``.  An exception raised by ``fn``
        stops the loop and propagates out of the ``run_*`` call driving it (instead of being
        logged by the loop's exception handler).  ``when`` must be a float (not checked: hot path).
        """
        now = self._now
        h = _Plain(self, when, fn, args)
        self._seq += 1
        heapq.heappush(self._scheduled, (when if when > now else now, self._seq, h))
        h._scheduled = True
        return h

    def call_soon_plain(self, fn: Callable[..., object], *args: Any) -> _Plain:
        """``call_at_plain(time(), fn, *args)``: runs after everything already due now."""
        return self.call_at_plain(self._now, fn, *args)

    def next_timer_at(self) -> float | None:
        """Virtual time (seconds) the earliest live timer fires at, or None if none is scheduled."""
        sched = self._scheduled
        while sched and sched[0][2]._cancelled:
            self._timer_cancelled_count -= 1
            heapq.heappop(sched)[2]._scheduled = False
        return sched[0][0] if sched else None

    # ------------------------------------------------------------------ tasks

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        """``BaseEventLoop.create_task``, also recording the task's creation order."""
        task = super().create_task(coro, **kwargs)
        refs = self._task_refs
        refs.append(weakref.ref(task))
        if len(refs) >= self._task_refs_prune_at:
            self._task_refs = refs = [r for r in refs if (t := r()) is not None and not t.done()]
            self._task_refs_prune_at = max(64, 2 * len(refs))
        return task

    def pending_tasks(self) -> list[asyncio.Task[Any]]:
        """Unfinished tasks of this loop, in creation order (deterministic, unlike all_tasks()).

        Tasks not made through ``create_task`` (e.g. ``asyncio.Task(coro, loop=loop)``) come last,
        sorted by name.
        """
        pending = {t for t in asyncio.all_tasks(self) if not t.done()}
        ordered = []
        for ref in self._task_refs:
            task = ref()
            if task is not None and task in pending:
                ordered.append(task)
                pending.discard(task)
        ordered.extend(sorted(pending, key=lambda t: t.get_name()))
        return ordered

    # ------------------------------------------------------------------ running

    def run_until(self, deadline: float) -> None:
        """Run every callback due before virtual time ``deadline`` (seconds), then stop there.

        The interval is half-open, as in SimPy's ``env.run(until=...)``: ready callbacks and timers
        with ``when < deadline`` run, together with everything they schedule in turn; timers at
        ``when >= deadline`` stay pending.  On return ``time() == deadline`` and the loop can be run
        again (``run_until(later)``), so a simulator can advance it step by step and inject work in
        between.  Being idle before the deadline is not a deadlock here: the caller may still
        resolve futures after this returns.  ``loop.stop()`` inside returns early.
        """
        deadline = float(deadline)
        if not math.isfinite(deadline) or deadline < self._now:
            raise ValueError(
                f"deadline must be finite and not before the current virtual time {self._now!r}, got {deadline!r}"
            )
        self._run(deadline, idle_ok=True)

    def _run(self, deadline: float | None, *, idle_ok: bool) -> None:
        """``run_forever`` with an optional virtual deadline; see :meth:`run_until`."""
        self._check_closed()
        # Check before touching _deadline: a nested call must not clobber the running one's.
        self._check_running()
        self._deadline = deadline
        self._idle_ok = idle_ok
        self._deadline_reached = False
        self._plain_error = None
        try:
            self.run_forever()
        finally:
            self._deadline = None
            self._idle_ok = False
        err, self._plain_error = self._plain_error, None
        if err is not None:
            raise err

    def _reach_deadline(self, deadline: float) -> None:
        if deadline > self._now:
            self._now = deadline
        self._deadline_reached = True
        self._stopping = True

    def _deadlock(self) -> DeadlockError:
        pending = self.pending_tasks()
        shown = []
        for task in pending[:_DEADLOCK_TASKS_SHOWN]:
            coro = task.get_coro()
            shown.append(f"{task.get_name()} ({getattr(coro, '__qualname__', coro)!s})")
        detail = ", ".join(shown)
        if len(pending) > _DEADLOCK_TASKS_SHOWN:
            detail += ", ..."
        return DeadlockError(self._now, len(pending), detail)

    def _run_plain(self, sched: list[Any], ready: collections.deque[Any], deadline: float | None) -> int:
        """The fast path of :meth:`_run_once`: run the bare callbacks at the head of the heap while
        nothing else is ready, jumping the clock to each; returns how many ran.  An exception is
        kept in ``_plain_error`` (the first one) and stops the loop.  ``ext/_vloop.pyx`` is its
        compiled twin."""
        inf = math.inf
        heappop = heapq.heappop
        ran = 0
        try:
            while sched:
                entry = sched[0]
                h = entry[2]
                if h.__class__ is not _Plain:
                    break
                when = entry[0]
                if when == inf or (deadline is not None and when >= deadline):
                    break
                heappop(sched)
                h._scheduled = False
                if h._cancelled:
                    self._timer_cancelled_count -= 1
                    continue
                if when > self._now:
                    self._now = when
                ran += 1
                h._fn(*h._args)
                if ready or self._stopping:
                    break
        except BaseException as exc:  # noqa: BLE001 - re-raised by _run
            if self._plain_error is None:
                self._plain_error = exc
            self._stopping = True
        return ran

    def _run_once(self) -> None:
        """Run loop iterations until a stop is requested (``loop.stop()`` or the deadline).

        Replaces ``BaseEventLoop._run_once``.  There is no selector to poll: "waiting" for the next
        timer is a jump of the virtual clock to its exact ``when``.  ``run_forever`` calls
        ``_run_once`` in a loop until ``_stopping`` is set; iterating here instead, with the queues
        in local variables, saves a method call and the attribute lookups on every iteration,
        which matters because an idle virtual loop iterates once per distinct timer time.  Each
        iteration keeps asyncio's semantics: it runs the callbacks ready at its start, and those
        they schedule run in the next iteration.
        """
        ready = self._ready
        popleft = ready.popleft
        sched = self._scheduled
        heappop = heapq.heappop
        inf = math.inf
        handle: events.Handle | None = None
        while True:
            # Drop cancelled timers.  _timer_cancelled_count is exactly the number of cancelled
            # entries still in the heap (every removal decrements it), so 0 means none.
            if self._timer_cancelled_count:
                n = len(sched)
                if (
                    n > _MIN_SCHEDULED_FOR_COMPACTION
                    and self._timer_cancelled_count > n * _MAX_CANCELLED_FRACTION
                ):
                    live = []
                    for entry in sched:
                        if entry[2]._cancelled:
                            entry[2]._scheduled = False
                        else:
                            live.append(entry)
                    heapq.heapify(live)
                    self._scheduled = sched = live
                    self._timer_cancelled_count = 0
                else:
                    while sched and sched[0][2]._cancelled:
                        self._timer_cancelled_count -= 1
                        heappop(sched)[2]._scheduled = False

            if not ready and not self._stopping and sched and sched[0][2].__class__ is _Plain and not self._debug:
                # Fast path for bare callbacks (call_at_plain), the simulator's events: while nothing
                # else is ready, run the earliest one straight off the heap, jumping the clock to it
                # as the idle branch below would.  Same order as the general path: the heap keys
                # (when, seq) give FIFO among equal times.  It hands over to the general path as soon
                # as a callback makes something ready (call_soon, a future's callbacks).
                if _run_plain is not None:  # the compiled twin of _run_plain
                    ran = _run_plain(self, sched, ready, self._deadline)
                else:
                    ran = self._run_plain(sched, ready, self._deadline)
                self._callbacks_run += ran
                if self._stopping:
                    return
                if ran or ready:
                    continue
                # nothing ran: the head is due at or after the deadline (or never); the idle
                # branch below stops there

            if not ready and not self._stopping:
                # Idle: every coroutine is blocked, so the next thing that can happen is the
                # earliest timer.  Jump there instead of sleeping.
                when = sched[0][0] if sched else inf
                deadline = self._deadline
                if when == inf:
                    if deadline is not None and self._idle_ok:
                        self._reach_deadline(deadline)
                        return
                    raise self._deadlock()
                if deadline is not None and when >= deadline:
                    self._reach_deadline(deadline)
                    return
                if when > self._now:
                    self._now = when

            now = self._now
            while sched and sched[0][0] <= now:
                timer = heappop(sched)[2]
                timer._scheduled = False
                if timer._cancelled:
                    self._timer_cancelled_count -= 1
                else:
                    ready.append(timer)  # type: ignore[arg-type]  # _Plain quacks like a Handle

            # Run only the callbacks ready now; those they schedule run next iteration (as asyncio).
            ntodo = len(ready)
            ran = 0
            if self._debug:
                for _ in range(ntodo):
                    handle = popleft()
                    if handle._cancelled:
                        continue
                    self._current_handle = handle
                    # Virtual time does not move inside a callback: measure slowness in wall time.
                    t0 = time.perf_counter()
                    try:
                        handle._run()
                    finally:
                        self._current_handle = None
                    ran += 1
                    dt = time.perf_counter() - t0
                    if dt >= self.slow_callback_duration:
                        logger.warning("Executing %r took %.3f wall-clock seconds", handle, dt)
            else:
                for _ in range(ntodo):
                    handle = popleft()
                    if handle._cancelled:
                        continue
                    handle._run()
                    ran += 1
            handle = None  # do not keep the last callback alive while idle
            self._callbacks_run += ran
            if self._stopping:
                return

    def _process_events(self, event_list: list[Any]) -> None:
        """No selector, hence no I/O events."""

    def _write_to_self(self) -> None:
        """Nothing to wake: the loop never blocks in a selector."""

    # ------------------------------------------------------------------ threads

    def call_soon_threadsafe(  # type: ignore[override]  # typeshed uses TypeVarTuple
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> events.Handle:
        """``call_soon`` for the loop's own thread; refused from another thread while running.

        A callback injected by a real thread lands at whatever virtual time the loop happens to
        be at, which makes runs nondeterministic.  While the loop is stopped (e.g. between
        :meth:`run_until` steps) it is accepted from any thread, like ``call_soon``.
        """
        tid = self._thread_id
        if tid is not None and tid != threading.get_ident():
            raise VirtualTimeIOError(
                "call_soon_threadsafe",
                "it was called from another thread while the loop runs; a real thread's "
                "callback would land at an arbitrary virtual time",
            )
        return self.call_soon(callback, *args, context=context)

    run_in_executor = _refuse("run_in_executor", _THREAD)
    set_default_executor = _refuse("set_default_executor", _THREAD)

    # ------------------------------------------------------------------ refused real I/O

    add_reader = _refuse("add_reader", _FD)
    remove_reader = _refuse("remove_reader", _FD)
    add_writer = _refuse("add_writer", _FD)
    remove_writer = _refuse("remove_writer", _FD)

    sock_recv = _refuse("sock_recv", _SOCK)
    sock_recv_into = _refuse("sock_recv_into", _SOCK)
    sock_recvfrom = _refuse("sock_recvfrom", _SOCK)
    sock_recvfrom_into = _refuse("sock_recvfrom_into", _SOCK)
    sock_sendall = _refuse("sock_sendall", _SOCK)
    sock_sendto = _refuse("sock_sendto", _SOCK)
    sock_connect = _refuse("sock_connect", _SOCK)
    sock_accept = _refuse("sock_accept", _SOCK)
    sock_sendfile = _refuse("sock_sendfile", _SOCK)
    sendfile = _refuse("sendfile", _SOCK)

    create_connection = _refuse("create_connection", _NET)
    create_server = _refuse("create_server", _NET)
    create_datagram_endpoint = _refuse("create_datagram_endpoint", _NET)
    create_unix_connection = _refuse("create_unix_connection", _NET)
    create_unix_server = _refuse("create_unix_server", _NET)
    connect_accepted_socket = _refuse("connect_accepted_socket", _NET)
    start_tls = _refuse("start_tls", _NET)

    getaddrinfo = _refuse("getaddrinfo", _DNS)
    getnameinfo = _refuse("getnameinfo", _DNS)

    connect_read_pipe = _refuse("connect_read_pipe", _PIPE)
    connect_write_pipe = _refuse("connect_write_pipe", _PIPE)
    subprocess_exec = _refuse("subprocess_exec", _PROC)
    subprocess_shell = _refuse("subprocess_shell", _PROC)

    add_signal_handler = _refuse("add_signal_handler", _SIGNAL)
    remove_signal_handler = _refuse("remove_signal_handler", _SIGNAL)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} t={self._now!r} running={self.is_running()} "
            f"closed={self.is_closed()} debug={self.get_debug()}>"
        )


# ---------------------------------------------------------------------- run_virtual


def run_virtual(
    main: Coroutine[Any, Any, _T],
    *,
    until: float | None = None,
    start: float = 0.0,
    debug: bool = False,
) -> _T | None:
    """Run coroutine ``main`` on a fresh :class:`VirtualTimeLoop` and return its result.

    The virtual-time counterpart of ``asyncio.run``: the loop starts at virtual time ``start``
    (seconds) and is closed on return; no event loop is set globally.  Leftover tasks are cancelled
    in creation order (their cleanup runs on the virtual loop, and may advance virtual time if it
    sleeps) and async generators are shut down.

    ``until``: virtual deadline (seconds, >= ``start``; ``inf`` means none).  Callbacks due before
    it run, as in :meth:`VirtualTimeLoop.run_until`.  If ``main`` has not finished by then, the
    loop's time is set to exactly ``until``, ``main`` is cancelled along with the other tasks, and ``run_virtual``
    returns **None**.  (Have ``main`` return a value other than None to tell the two cases apart.)
    If ``main`` finishes earlier, its result is returned at once; time is not advanced to ``until``.

    Exceptions raised by ``main`` propagate.  Raises :class:`DeadlockError` when nothing can ever
    happen again (nothing ready, no timer) before ``main`` finishes, even with ``until`` set, and
    :class:`VirtualTimeIOError` (from inside ``main``) on real I/O or threads.
    """
    if not asyncio.iscoroutine(main):
        raise TypeError(f"run_virtual() expects a coroutine, got {main!r}")
    start = float(start)
    problem: Exception | None = None
    if events._get_running_loop() is not None:
        problem = RuntimeError("run_virtual() cannot be called from a running event loop")
    elif until is not None and not (until >= start):  # also catches NaN
        problem = ValueError(f"until={until!r} must be >= start={start!r}")
    if problem is not None:
        main.close()  # avoid a "coroutine was never awaited" warning on top of the error
        raise problem

    loop = VirtualTimeLoop(start=start)
    try:
        loop.set_debug(debug)
        task = loop.create_task(main)
    except BaseException:
        main.close()
        loop.close()
        raise

    def _stop(_: asyncio.Future[Any]) -> None:
        loop.stop()

    task.add_done_callback(_stop)
    try:
        try:
            # until=inf is no deadline at all (a DeadlockError comes first if the run goes idle).
            deadline = None if until is None or until == math.inf else float(until)
            loop._run(deadline, idle_ok=False)
        except BaseException:
            # Retrieve the exception so the task does not log "exception was never retrieved".
            if task.done() and not task.cancelled():
                task.exception()
            raise
        finally:
            task.remove_done_callback(_stop)
        if task.done():
            result: _T | None = task.result()
        elif loop._deadline_reached:
            result = None
        else:
            raise RuntimeError("the loop was stopped (loop.stop()) before main() completed")
    except BaseException:
        # Do not let a failure in the cleanup replace the error already propagating.
        _shutdown(loop, raise_errors=False)
        raise
    _shutdown(loop, raise_errors=True)
    return result


def _shutdown(loop: VirtualTimeLoop, *, raise_errors: bool) -> None:
    """Cancel leftover tasks, shut down async generators, close ``loop`` (always)."""
    try:
        try:
            pending = loop.pending_tasks()
            if pending:
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                for task in pending:
                    if task.cancelled():
                        continue
                    if task.exception() is not None:
                        loop.call_exception_handler(
                            {
                                "message": "unhandled exception during run_virtual() shutdown",
                                "exception": task.exception(),
                                "task": task,
                            }
                        )
            loop.run_until_complete(loop.shutdown_asyncgens())
        except DeadlockError as exc:
            if raise_errors:
                raise DeadlockError(
                    exc.virtual_time, exc.pending_tasks, "while cancelling leftover tasks"
                ) from exc
            loop.call_exception_handler(
                {"message": "deadlock while cancelling leftover tasks", "exception": exc}
            )
    finally:
        loop.close()


# The compiled twin of the bare-callback path (ext/_vloop.pyx), unless HELIX_NO_EXTENSIONS is set:
# its Plain replaces _Plain, and call_at_plain and the fast path of _run_once call into it.
_PlainPy = _Plain  # the pure class (what the agreement tests switch back to)
_compiled = _ext.load("_vloop")
_run_plain: Callable[..., int] | None = None
_call_at_plain: Callable[..., Any] | None = None
if _compiled is not None:
    _Plain = _compiled.Plain  # type: ignore[misc]
    _run_plain = _compiled.run_plain
    _call_at_plain = _compiled.call_at_plain
