"""Routing and scheduling policies by name: the one table the simulator and the runtime read.

Two kinds (docs/original.md §7):

* a policy that routes at admission (MaxFlow, §7.1): the host picks a request's whole route when it
  admits it, with the KV expectation (§7.2); its entry builds the host's router from the plan and
  its flows;
* a per-hop policy (Swarm, Random, Shortest-queue, §7.3-7.5): each sending node (the host for the
  first hop, then every worker) picks the next hop of a prompt when it leaves; its entry builds the
  chooser of one node, seeded per node from the run's seed (:func:`~.baselines.node_seed`), and
  says what a node needs for it: free links only (a prompt waits for an idle link), the
  neighbours' queue lengths, and delay feedback from the next hop.

``simulator_only`` says why a policy runs only in the simulator ("" when the runtime runs it too): the
runtime host refuses such a name with an error naming its flag (:func:`runtime_policy`).

Adding a policy is its chooser (or router) module and one entry in :data:`POLICIES` (or a
:func:`register` call) with its test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..ids import NodeRef
from .baselines import RandomPolicy, ShortestQueuePolicy, SwarmPolicy, node_seed

if TYPE_CHECKING:
    from ..flowplan import FlowPlan
    from ..model import ThroughputModel
    from ..placement.core import Placement

__all__ = ["POLICIES", "Policy", "get_policy", "maxflow_router", "register", "runtime_policy"]

#: (placement, its flows, KV expectation (fill limit, output ratio), throughput model or None)
RouterFactory = Callable[["Placement", "FlowPlan", "tuple[float, float]", "ThroughputModel | None"], Any]
#: (the node's out-links, the node's seed) -> a chooser with ``choose`` and ``observe``
HopFactory = Callable[[Sequence[NodeRef], int], Any]


@dataclass(frozen=True)
class Policy:
    """One routing/scheduling policy (see the module doc).

    name: what ``--scheduler`` takes. summary: one line. router: builds the host's router (a
    policy that routes at admission), or None. hop: builds one node's next-hop chooser (a per-hop
    policy), or None; exactly one of the two is given. free_links_only: a node sends a prompt only
    on a link with nothing in flight (the chooser is told which are free; the prompt waits for one).
    peer_queue_len: the chooser compares the neighbours' first-layer queue lengths. feedback: the
    next hop reports each request's delay to the sender (``Feedback``), which the chooser observes.
    simulator_only: why only the simulator runs it ("" when the runtime can).
    """

    name: str
    summary: str
    router: RouterFactory | None = None
    hop: HopFactory | None = None
    free_links_only: bool = False
    peer_queue_len: bool = False
    feedback: bool = False
    simulator_only: str = ""

    def __post_init__(self) -> None:
        if (self.router is None) == (self.hop is None):
            raise ValueError(f"policy {self.name!r}: give exactly one of router and hop")

    @property
    def routes_at_admission(self) -> bool:
        """The host routes each request whole at admission (a router; KV expectation; its flows can
        be re-planned around lost nodes)."""
        return self.router is not None

    def make_router(self, placement: Placement, flow: FlowPlan, kv: tuple[float, float],
                    tm: ThroughputModel | None = None) -> Any:
        """The host's router over ``flow`` with the KV expectation ``kv``."""
        if self.router is None:
            raise ValueError(f"policy {self.name!r} chooses hop by hop: it has no router")
        return self.router(placement, flow, kv, tm)

    def make_hop(self, out_links: Sequence[NodeRef], run_seed: int, node: NodeRef) -> Any:
        """The chooser of ``node`` over ``out_links``, seeded from ``run_seed`` and the node."""
        if self.hop is None:
            raise ValueError(f"policy {self.name!r} routes at admission: it has no per-hop chooser")
        return self.hop(out_links, node_seed(run_seed, node))


def maxflow_router(placement: Placement, flow: FlowPlan, kv: tuple[float, float],
                   tm: ThroughputModel | None = None) -> Any:
    """MaxFlow's router (a ``FlowRouter``, compiled when built) over ``flow`` with the KV
    expectation ``kv`` = (fill limit, output ratio) (docs/original.md §7.1-7.2)."""
    from ..model import ThroughputModel
    from . import FlowRouter, KVTracker

    tm = tm if tm is not None else ThroughputModel.for_cluster(placement.model_spec, placement.cluster)
    tracker = KVTracker.from_placement(placement, kv_fill_limit=kv[0], output_ratio=kv[1], tm=tm)
    return FlowRouter.from_plan(placement, flow, tracker, tm=tm)


_NO_HOP_POLICY = ("a per-hop policy chooses at every worker, and the runtime's workers are not told a policy "
                  "(their AssignLayers carries none)")

#: Every policy, by name, in the order the CLIs list them.
POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("maxflow", "MaxFlow + IWRR: the whole route at admission, in proportion to the planned flows",
               router=maxflow_router),
        Policy("swarm", "the link with the least expected delay, learnt from the next hops' feedback",
               hop=lambda out, seed: SwarmPolicy(out), feedback=True, simulator_only=_NO_HOP_POLICY),
        Policy("random", "a uniformly random idle link", hop=lambda out, seed: RandomPolicy(out, seed=seed),
               free_links_only=True, simulator_only=_NO_HOP_POLICY),
        Policy("shortest-queue", "an idle link to a neighbour with the shortest queue",
               hop=lambda out, seed: ShortestQueuePolicy(out, seed=seed), free_links_only=True, peer_queue_len=True,
               simulator_only="it reads every neighbour's queue length when it sends, which only the simulator sees"),
    )
}


def register(entry: Policy) -> None:
    """Add ``entry`` to :data:`POLICIES` (a name already there is an error)."""
    if entry.name in POLICIES:
        raise ValueError(f"policy {entry.name!r} is registered already")
    POLICIES[entry.name] = entry


def get_policy(name: str) -> Policy:
    """The entry of ``name``; ValueError naming the known ones when there is none."""
    entry = POLICIES.get(name)
    if entry is None:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(POLICIES)}")
    return entry


def runtime_policy(name: str, flag: str = "--scheduler") -> Policy:
    """The entry of ``name`` for the runtime; ConfigError naming ``flag`` when the name is unknown
    or the policy runs only in the simulator."""
    entry = POLICIES.get(name)
    if entry is None:
        raise ConfigError("<argument>", flag, f"unknown scheduler {name!r}; known: {', '.join(POLICIES)}")
    if entry.simulator_only:
        ok = ", ".join(p.name for p in POLICIES.values() if not p.simulator_only)
        raise ConfigError("<argument>", flag, f"{name} runs only in the simulator: {entry.simulator_only} (the runtime runs: {ok})")
    return entry
