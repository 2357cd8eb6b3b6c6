"""The simulation the served planner is handed: its type, and how an installed one is found.

``helix_async`` never imports the simulator (docs/planner.md, "Simulation in the loop"). A
package that can simulate a plan registers a :class:`Simulate` callable as an entry point of the
group :data:`SIMULATORS_GROUP`; this project's own simulator does so in pyproject.toml
(``virtual-time = "sim.planning:simulate_candidate"``). The command line looks it up by name with
:func:`find_simulator` and hands it to ``plan_served``; without one, the planner trusts its model.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, distributions
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..settings import SimulationSettings
    from .core import Placement
    from .served import SLO

__all__ = ["DEFAULT_SIMULATOR", "SIMULATORS_GROUP", "Simulate", "find_simulator", "installed_simulators",
           "simulator_package"]

#: The entry-point group simulators register under.
SIMULATORS_GROUP = "helix_async.simulators"
#: The simulator the command line uses: the virtual-time simulator (package ``sim``).
DEFAULT_SIMULATOR = "virtual-time"


class Simulate(Protocol):
    """Simulate ``placement`` as ``settings`` say (workload, window, seed, semantics; MaxFlow
    routing) and return the simulator's report: a mapping with at least ``decode_throughput``
    (tokens/s), ``prompt_latency`` and ``decode_latency`` (each with ``mean`` and ``p50``, seconds
    or None), ``nodes`` (per node: ``node``, ``utilisation``, ``kv_peak``, ``kv_capacity``) and,
    when ``slo`` is given, ``goodput`` (with ``decode_throughput``: the tokens/s of requests that
    met it)."""

    def __call__(self, placement: Placement, settings: SimulationSettings, *, slo: SLO | None = None) -> Mapping[str, Any]: ...


def _registered() -> list[EntryPoint]:
    # Every distribution's entry points, not importlib.metadata.entry_points()'s view, which keeps
    # one distribution per name: run from a source checkout, a stale ``helix_async.egg-info`` left
    # there by an older build comes first on sys.path and would hide the installed metadata.
    return [ep for dist in distributions() for ep in dist.entry_points if ep.group == SIMULATORS_GROUP]


def installed_simulators() -> list[str]:
    """The names registered under :data:`SIMULATORS_GROUP`, sorted."""
    return sorted({ep.name for ep in _registered()})


def find_simulator(name: str = DEFAULT_SIMULATOR) -> Simulate | None:
    """The simulator registered as ``name``, loaded; None when none is installed under that name."""
    for ep in _registered():
        if ep.name == name:
            fn: Simulate = ep.load()
            return fn
    return None


def simulator_package(name: str = DEFAULT_SIMULATOR) -> str | None:
    """The top-level package that registered the simulator ``name`` (``sim``), without importing
    it; None when none is installed under that name."""
    for ep in _registered():
        if ep.name == name:
            return ep.module.partition(".")[0]
    return None
