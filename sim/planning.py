"""The simulator's side of the served planner: the ``simulate`` callable it is handed.

``helix_async`` never imports this package; pyproject.toml registers :func:`simulate_candidate`
as the entry point ``virtual-time`` of the group ``helix_async.simulators``, and the planner's
command line finds it there (``helix_async.placement.simulator.find_simulator``).
"""

from __future__ import annotations

from typing import Any

from helix_async.placement import Placement
from helix_async.placement.served import SLO
from helix_async.settings import SimulationSettings

from .runner import Workload, run
from .simulation import SimulationSetup

__all__ = ["simulate_candidate"]


def simulate_candidate(placement: Placement, settings: SimulationSettings, *, slo: SLO | None = None) -> dict[str, Any]:
    """Simulate ``placement`` with MaxFlow routing on ``settings.workload`` for a window of
    ``settings.window`` seconds (offline: after the runner's warm-up, topped up from its initial
    population; online: arrivals at the workload's rate from t0) and return the report
    (``sim.report.build_report``; with ``slo``, its ``goodput`` entry too). With the helix
    semantics, offline queries the KV check refuses are dropped, as the original did."""
    wl = settings.workload
    if wl.mode == "offline":
        workload = Workload(mode="offline", lengths=wl.lengths, duration=settings.window, seed=settings.seed)
    else:
        workload = Workload(mode="online", rate=wl.rate, lengths=wl.lengths, warmup=0.0, duration=settings.window,
                            seed=settings.seed)
    setup = SimulationSetup(placement, scheduler="maxflow", kv=wl.kv_params, compat=settings.compat,
                            drop_rejected=settings.compat and wl.mode == "offline", seed=settings.seed)
    return run(setup, workload, slo=slo).report
