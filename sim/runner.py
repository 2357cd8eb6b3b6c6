"""One simulation run, from a setup and a workload description to a report.

:func:`run` builds the :class:`~sim.simulation.Simulation`, installs the workload, advances the
virtual-time loop in slices (for the progress bar and the watch printout) and returns the report
(:func:`sim.report.build_report`).  Defaults per mode follow the original (docs/original.md §8.8-8.9):
offline warm-up 60 s and duration 600 s, online warm-up 0 and duration 1800 s.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from helix_async.errors import ConfigError

from .feeders import OfflineFeeder, PriorityDraw, TraceFeeder
from .report import build_report, watch_text
from .simulation import Simulation, SimulationSetup
from .workloads import LengthSampler, RateProfile, TraceEntry, generate_online_trace

__all__ = ["RunResult", "Workload", "run"]

#: Online runs stop this long after the last arrival even if queries are still in flight (s).
ONLINE_DRAIN_LIMIT_S = 3600.0
#: The longest simulated span a workload flag takes (``--duration``, ``--warmup``, fault times),
#: seconds: one simulated day. A busy 24-node cluster runs about 1,100 events per simulated second
#: at about 190,000 events per wall second, so a day is some 10^8 events and minutes of wall time;
#: ``--duration 1e15`` would never finish.
MAX_SIM_SECONDS = 86_400.0
#: Events a run may take by default (``--max-events``): a simulated day of a busy 24-node cluster,
#: about 15 minutes at the figures above. A run that reaches it stops with an error saying so.
DEFAULT_MAX_EVENTS = 200_000_000


@dataclass(frozen=True)
class Workload:
    """What is fed to the cluster.

    mode: "offline" or "online" (an arrival series rescaled to ``rate`` tokens/s) or "trace"
    (``trace`` entries, absolute arrival times). lengths / arrivals: dataset names.
    warmup, duration: the statistics window after ``t0`` (s). initial: offline population.
    seed: the workload's RNG seed. trace_offset: added to trace arrival times (online traces are
    generated from ``t0``).
    """

    mode: str = "offline"
    rate: float = 700.0
    lengths: str = "azure-conv"
    arrivals: str = "azure-conv"
    warmup: float = 60.0
    duration: float = 600.0
    initial: int = 20
    seed: int = 0
    trace: Sequence[TraceEntry] | None = field(default=None, compare=False)
    #: online: the gaps' coefficient of variation (``arrivals`` gamma) and the rate over time
    #: (:meth:`RateProfile.parse`'s text)
    cv: float | None = None
    rate_profile: str | None = None
    #: the share of queries in the high-priority class (``sim.feeders.PriorityDraw``)
    priority_share: float = 0.0


@dataclass
class RunResult:
    report: dict[str, Any]
    sim: Simulation
    wall_s: float
    events: int


#: Young-generation threshold of the cyclic garbage collector during a run (Python's default: 700).
GC_GEN0_THRESHOLD = 50_000


def run(
    setup: SimulationSetup,
    workload: Workload,
    *,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    watch_interval: float = 0.0,
    watch_out: TextIO | None = None,
    slice_s: float = 10.0,
    on_slice: Callable[[Simulation], None] | None = None,
    faults: Sequence[Any] = (),
    detect_after: float | None = None,
    slo: tuple[float, float] | None = None,
    max_events: int | None = None,
) -> RunResult:
    """Simulate ``workload`` on ``setup`` (see the module doc).  faults: ``sim.faults.Fault`` items
    (nodes killed and revived in virtual time, ``sim.faults``); the report gets a ``faults`` entry.
    max_events: a bound on the work: past it (checked after each slice of ``slice_s`` simulated
    seconds) the run stops with a ConfigError naming ``--max-events``; None: no bound."""
    sim = Simulation(setup)
    injector = None
    if faults:
        from .faults import DETECT_AFTER_S, FaultInjector

        injector = FaultInjector(sim, faults, detect_after=DETECT_AFTER_S if detect_after is None else detect_after)
        injector.install()
    t0 = sim.t0
    wl = workload
    draw = PriorityDraw(wl.priority_share, wl.seed) if wl.priority_share > 0 else None
    if wl.mode == "offline":
        # compat shares one RNG stream between lengths and the random schedulers, as the original
        sampler = LengthSampler(wl.lengths, random.Random(wl.seed))
        end = t0 + wl.warmup + wl.duration
        feeder: Any = OfflineFeeder(sim, sampler, initial=wl.initial, start=t0, end=end, priority=draw)
        stop_at = end
    else:
        if wl.mode == "online":
            profile = RateProfile.parse(wl.rate_profile, duration=wl.duration) if wl.rate_profile else None
            trace: Sequence[TraceEntry] = generate_online_trace(
                wl.arrivals, wl.lengths, wl.rate, start=t0, duration=int(wl.duration), seed=wl.seed, cv=wl.cv,
                profile=profile,
            )
        elif wl.mode == "trace":
            if not wl.trace:
                raise ValueError("trace mode needs a trace")
            trace = wl.trace
        else:
            raise ValueError(f"unknown mode {wl.mode!r}")
        feeder = TraceFeeder(sim, trace, priority=draw)
        stop_at = max(e[0] for e in trace) + ONLINE_DRAIN_LIMIT_S
    feeder.install()
    bar = _progress(progress, stop_at)
    started = time.perf_counter()
    watch_next = (math.floor(t0 / watch_interval) + 1) * watch_interval if watch_interval > 0 else math.inf
    now = 0.0
    loop = sim.loop
    # A run allocates millions of short-lived, acyclic objects (messages, queue entries, heap
    # tuples); the cyclic collector's scans of the long-lived setup cost several percent of the
    # run.  Freeze what exists now and collect the young generation less often; both are undone
    # after the run.  (Changes when garbage is found, never what is simulated.)
    gc_threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(gc_threshold[0], GC_GEN0_THRESHOLD), *gc_threshold[1:])
    try:
        while now < stop_at:
            target = min(stop_at, now + slice_s, watch_next)
            loop.run_until(target)
            now = loop.time()
            if on_slice is not None:
                on_slice(sim)
            if bar is not None:
                bar(now, sim.events)
            if max_events is not None and sim.events > max_events:
                raise ConfigError(
                    "<argument>", "--max-events",
                    f"the simulation passed {max_events} events at {now - t0:.0f} simulated seconds of "
                    f"{stop_at - t0:.0f}: shorten --duration or raise --max-events",
                )
            if now >= watch_next:
                print(watch_text(sim, loop.next_timer_at()), file=watch_out or sys.stdout)
                watch_next += watch_interval
            if wl.mode != "offline" and feeder.done:
                break
            if loop.next_timer_at() is None and not loop._ready:
                break
    except BaseException:
        sim.close()
        raise
    finally:
        gc.set_threshold(*gc_threshold)
        gc.unfreeze()
        if bar is not None:
            bar(None, sim.events)
    wall = time.perf_counter() - started
    report = build_report(sim, warmup=wl.warmup, duration=wl.duration, config=dict(config or {}), slo=slo)
    if injector is not None:
        report["faults"] = injector.summary()
    sim.close()  # the loop is done; the host's records stay readable
    return RunResult(report, sim, wall, sim.events)


def _progress(enabled: bool, stop_at: float) -> Callable[[float | None, int], None] | None:
    """A tqdm bar over simulated seconds, showing events/s; None when disabled or not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=round(stop_at), unit="sim-s", dynamic_ncols=True, file=sys.stderr, leave=False)
    state = {"t": 0.0, "wall": time.perf_counter()}

    def update(now: float | None, events: int) -> None:
        if now is None:
            bar.close()
            return
        step = round(now) - bar.n
        if step > 0:
            bar.update(step)
        el = time.perf_counter() - state["wall"]
        bar.set_postfix(events=events, ev_per_s=f"{events / el:.0f}" if el > 0 else "-", refresh=False)

    return update
