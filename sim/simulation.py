"""Assembly: the runtime's host and workers on a virtual-time loop over the in-memory network.

:class:`Simulation` builds, from a placement, one :class:`helix_async.worker.Worker` per used
node (cost-model executor priced by the node's GPU profile, its batch limits and KV capacity from
the profiled node settings), the :class:`helix_async.host.Host` with the chosen scheduler, and a
:class:`helix_async.transport.memory.MemoryNetwork`, all on one
:class:`helix_async.vloop.VirtualTimeLoop`.  Nothing here schedules or routes: the workload
(:mod:`sim.feeders`) submits queries to the host and the loop runs.

Start time: as in the original (docs/original.md §8.0), the workload starts at ``t0 = ceil(longest
model load) + 1`` seconds, a node's load taking ``layers * layer bytes / disk speed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from helix_async.clock import LoopClock
from helix_async.cluster import ClusterSpec
from helix_async.codec import wire_size
from helix_async.executors.cost_model import CostModelExecutor
from helix_async.flowplan import FlowPlan
from helix_async.host import Host
from helix_async.ids import SINK, SOURCE, NodeRef
from helix_async.messages import DecodeWork, PromptWork
from helix_async.model import ModelSpec, ThroughputModel, load_profiles, max_compute_throughput
from helix_async.placement import Placement
from helix_async.placement.flow import max_flow
from helix_async.roles import worker_roles
from helix_async.routing.migration import MigrationConfig, MigrationPolicy
from helix_async.routing.policies import POLICIES, get_policy
from helix_async.settings import KV_OFFLINE
from helix_async.transport.base import HOST
from helix_async.transport.memory import MemoryNetwork
from helix_async.vloop import VirtualTimeLoop
from helix_async.worker import Worker

from .cores import SharedCoreExecutor, SharedCores
from .fleet import Fleet, FleetConfig

__all__ = ["SCHEDULERS", "Simulation", "SimulationSetup", "helix_message_bytes", "reserved_rates"]

#: The scheduler names a simulation takes: the routing policies' table (``routing.policies``).
SCHEDULERS = tuple(POLICIES)

#: The original's minimum bandwidth on source/sink hops and on compute hops (B/s), §1.
TOKEN_SLOW_LINK = 10.0
ACT_SLOW_LINK = 200.0


@dataclass(frozen=True)
class SimulationSetup:
    """What a simulation runs: the plan, the scheduler and the semantics.

    kv: (fill limit, expected-output ratio) of the KV expectation (MaxFlow). compat: the
    original's semantics throughout (see docs/simulator.md). drop_rejected: MaxFlow drops a query
    it cannot place (compat offline) instead of queueing it. seed: per-node RNG seeds of the
    random per-hop schedulers derive from it.  fuse_layers: a worker runs a batch through its
    consecutive layers in one executor call when nothing else waits there (the same layer-by-layer
    schedule in fewer events, see ``helix_async.worker``); False prices every layer as its own
    call (for tests and profiling).  runtime_costs: default mode prices what the runtime computes
    where the profile measured it (a lone decode at its measured time, the model's head on the last
    stage: ``executors.cost_model``); False prices batches as the original does (compat never
    uses them).  cores: the nodes are processes of one machine with this many cores, shared while
    they compute; available: the cores measured available to 1, 2, ... busy processes there
    (``sim.cores``: the profile is then seconds of one core, ``profile --clock cpu``); cores 0:
    every node computes on a device of its own (the original; compat always).  gather: the
    workers' decode gathering factor (``worker --gather``; None: the workers' default; docs/runtime.md).
    migration: the host reschedules running queries by live KV migration (MaxFlow, default mode;
    ``helix_async.routing.migration``, docs/migration.md), with ``migration_config``'s parameters
    (None: their defaults). fleet: an elastic fleet of spare nodes joining and leaving while
    serving (``sim.fleet``), or None for the plan's nodes throughout.
    """

    placement: Placement
    scheduler: str = "maxflow"
    kv: tuple[float, float] = KV_OFFLINE
    compat: bool = False
    drop_rejected: bool = False
    seed: int = 0
    fuse_layers: bool = True
    runtime_costs: bool = True
    cores: float = 0.0
    available: tuple[float, ...] = ()
    gather: float | None = None
    migration: bool = False
    migration_config: MigrationConfig | None = None
    fleet: FleetConfig | None = None


def helix_message_bytes(model: ModelSpec) -> Callable[[NodeRef, NodeRef, Any], float]:
    """The original's transfer sizes (§8.3): token ids cost ``token_size`` bytes per token on the
    source and sink hops, hidden states ``token_size + activation_size`` per token between nodes.
    A token result is charged one token; unlike the original, which charges the hop to the sink the
    request's whole length (2 n bytes for a prompt of n tokens, docs/original.md §8.3), a difference
    of microseconds at these bandwidths."""
    tok = float(model.token_size)
    mid = float(model.token_size + model.activation_size)

    def size(src: NodeRef, dst: NodeRef, msg: Any) -> float:
        t = type(msg)
        if t is DecodeWork:
            return tok if src == SOURCE else mid
        if t is PromptWork:
            return (tok if src == SOURCE else mid) * msg.num_tokens
        return tok

    return size


def wire_bytes(src: NodeRef, dst: NodeRef, msg: Any) -> float:
    """Bytes of ``msg`` as the codec would put it on the wire (default mode)."""
    return float(wire_size(msg))


def reserved_rates(placement: Placement, flow: FlowPlan) -> dict[tuple[NodeRef, NodeRef], float]:
    """The original's static per-link bandwidth reservation for MaxFlow (docs/original.md §7.1 step 5).

    A link's byte flow is its planned token flow times its bytes per token; its share of the
    sender's out-NIC (receiver's in-NIC) is its byte flow over all byte flows leaving the sender
    (entering the receiver); the rate is ``floor(min(bandwidth, out-NIC * share_out, in-NIC *
    share_in))``.  A link without flow gets its full bandwidth: MaxFlow never routes on it.
    """
    cluster = placement.cluster
    spec = placement.model_spec
    tok = spec.token_size
    mid = spec.token_size + spec.activation_size
    used: dict[tuple[NodeRef, NodeRef], float] = {}
    out_sum: dict[NodeRef, float] = {}
    in_sum: dict[NodeRef, float] = {}
    for u, v in placement.links:
        bpt = tok if (u == SOURCE or v == SINK) else mid
        b = flow.link_flows.get((u, v), 0.0) * bpt
        used[(u, v)] = b
        out_sum[u] = out_sum.get(u, 0.0) + b
        in_sum[v] = in_sum.get(v, 0.0) + b
    rates: dict[tuple[NodeRef, NodeRef], float] = {}
    for (u, v), b in used.items():
        arc = cluster.arc(u, v)
        assert arc is not None
        if b <= 0.0:
            rates[(u, v)] = float(arc.bandwidth)
            continue
        out_nic = cluster.coordinator_nic_out if u == SOURCE else cluster.machine(u).nic_out  # type: ignore[arg-type]
        in_nic = cluster.coordinator_nic_in if v == SINK else cluster.machine(v).nic_in  # type: ignore[arg-type]
        bw = math.floor(min(arc.bandwidth, out_nic * b / out_sum[u], in_nic * b / in_sum[v]))
        floor_ok = TOKEN_SLOW_LINK if (u == SOURCE or v == SINK) else ACT_SLOW_LINK
        rates[(u, v)] = float(max(bw, floor_ok))
    return rates


def load_start_time(placement: Placement) -> float:
    """``ceil(longest model load) + 1`` seconds (docs/original.md §8.0 step 4)."""
    spec = placement.model_spec
    longest = 0.0
    for node, rng in placement.layers.items():
        if rng is None:
            continue
        m = placement.cluster.machine(node)
        longest = max(longest, (rng[1] - rng[0]) * spec.param_bytes_per_layer / m.disk)
    return float(math.ceil(longest) + 1)


class Simulation:
    """Host, workers and network of one placement on a fresh virtual-time loop."""

    def __init__(self, setup: SimulationSetup, tm: ThroughputModel | None = None) -> None:
        policy = get_policy(setup.scheduler)
        self.setup = setup
        #: the scheduler's entry in the policies' table
        self.policy = policy
        p = setup.placement
        self.placement = p
        cluster: ClusterSpec = p.cluster
        spec = p.model_spec
        self.model = spec
        self.tm = tm if tm is not None else ThroughputModel.for_cluster(spec, cluster)
        self.flow = max_flow(p, self.tm)
        self.max_flow = self.flow.value
        self.max_compute = max_compute_throughput(cluster, spec, self.tm)
        self.t0 = load_start_time(p)
        self.loop = VirtualTimeLoop()
        self.clock = LoopClock(self.loop)
        compat = setup.compat
        if compat:
            size = helix_message_bytes(spec)
            # the original reserves each link's share of the flows a router routes on (§7.1 step 5)
            mode = "reserved" if policy.routes_at_admission else "available"
        else:
            size = wire_bytes
            mode = "fair"
        self.network = MemoryNetwork(
            self.clock,
            cluster,
            p.links,
            size,
            mode=mode,
            reserved_rates=reserved_rates(p, self.flow) if mode == "reserved" else None,
        )
        roles = worker_roles(p, self.tm)
        layers = {i: r.layers for i, r in roles.items()}
        self.workers: dict[int, Worker] = {}
        #: node -> its earlier workers, stopped (a node that left and came back, or was revived)
        self.past_workers: dict[int, list[Worker]] = {}
        #: the machine's shared cores (default mode with ``setup.cores``), else None
        self.cores = SharedCores(self.clock, setup.cores, setup.available) if setup.cores and not compat else None
        self._peer_len = self._peer_queue_len if policy.peer_queue_len else None
        self._profiles = load_profiles(spec)
        self._roles = roles
        for i in roles:
            self.workers[i] = self._make_worker(i)
        host_tp = self.network.endpoint(HOST)
        if policy.routes_at_admission:
            router = policy.make_router(p, self.flow, setup.kv, self.tm)
            self.host = Host(self.clock, host_tp, router=router, compat=compat, drop_rejected=setup.drop_rejected)
        else:
            first = p.out_links(SOURCE)
            hops = [(y, 0, layers[y][1]) for y in first if isinstance(y, int)]
            self.host = Host(
                self.clock,
                host_tp,
                policy=policy.make_hop(first, setup.seed, SOURCE),
                first_hops=hops,
                compat=compat,
                free_links_only=policy.free_links_only,
                peer_queue_len=self._peer_len,
            )
        self.host.start()
        #: the rescheduling policy (``setup.migration``), else None
        self.migration: MigrationPolicy | None = None
        if setup.migration:
            if compat or not policy.routes_at_admission:
                raise ValueError("live migration needs the MaxFlow router in default mode (not compat, not per-hop)")
            self._copy_links(layers)
            self.migration = MigrationPolicy(self.host, self.clock, layers, p.links, self._node_load,
                                             setup.migration_config)
            self.migration.start()
        #: the elastic fleet (``setup.fleet``), else None
        self.fleet: Fleet | None = None
        if setup.fleet is not None:
            if compat or not policy.routes_at_admission:
                raise ValueError("an elastic fleet needs the MaxFlow router in default mode (not compat, not per-hop)")
            try:
                self.fleet = Fleet(self, setup.fleet)
            except BaseException:  # a bad fleet setting: nothing of this simulation runs
                self.loop.close()
                raise
            self.fleet.install()

    def _copy_links(self, layers: dict[int, tuple[int, int]]) -> None:
        for u in layers:
            for v in layers:
                # a KV copy goes between two nodes that hold a layer in common
                if u != v and layers[u][0] < layers[v][1] and layers[v][0] < layers[u][1]:
                    self.network.add_link(u, v)

    def router_for(self, placement: Placement) -> Any:
        """A MaxFlow router of ``placement`` (its own max flow), as this simulation makes them."""
        tm = ThroughputModel.for_cluster(self.model, placement.cluster)
        return self.policy.make_router(placement, max_flow(placement, tm), self.setup.kv, tm)

    def adopt(self, placement: Placement, router: Any = None) -> None:
        """Serve ``placement`` from now on (an elastic fleet: the old plan plus nodes that joined,
        or without nodes that leave; the nodes in both keep their layers). Nodes new to it get a
        worker and their links; the host routes by ``router`` (default: this plan's own) and every
        running query keeps its route."""
        self.placement = placement
        cluster = placement.cluster
        self.network.grow(cluster)
        self.tm = ThroughputModel.for_cluster(self.model, cluster)
        roles = worker_roles(placement, self.tm)
        for i, role in roles.items():
            old = self._roles.get(i)
            if old is not None and old.layers != role.layers and not self.workers[i].stopped:
                raise ValueError(f"node {i} serves layers {old.layers}; the new plan gives it {role.layers}")
        self._roles.update(roles)
        for u, v in placement.links:
            self.network.add_link(u, v)
        for i in roles:
            w = self.workers.get(i)
            if w is None or w.stopped:
                self._replace_worker(i)
        layers = {i: r.layers for i, r in roles.items()}
        if self.migration is not None:
            self._copy_links(layers)
            self.migration.layers = layers
            self.migration.links = frozenset(placement.links)
        self.host.replan(self.router_for(placement) if router is None else router, (), "")

    def retire(self, node: int) -> None:
        """Node ``node`` leaves the fleet: its worker stops and its endpoint goes (it carries no
        query by now, or the caller moved them)."""
        w = self.workers.get(node)
        if w is not None and not w.stopped:
            w.kill()
        self.network.detach(node)

    def _node_load(self, node: int) -> tuple[int, int, int]:
        """(KV in use, KV capacity, KV the first waiting prompt needs) of a live node; a dead one
        has no capacity (the policy never moves anything there)."""
        w = self.workers.get(node)
        if w is None or w.stopped:
            return (0, 0, 0)
        return (w.kv_used, w.kv_capacity, w.kv_demand())

    def _make_worker(self, i: int) -> Worker:
        role = self._roles[i]
        spec = self.model
        setup = self.setup
        policy = self.policy
        # default mode prices what the runtime computes: a lone decode at its measured time, the
        # head on the last stage (when the profile has them); compat keeps the original's prices
        ours = setup.runtime_costs and not setup.compat
        last = spec.num_layers if ours and role.layers[1] == spec.num_layers else 0
        executor: Any = CostModelExecutor(self.clock, self._profiles.profile(role.gpu), spec.activation_size,
                                          measured_single=ours, last_layer=last)
        if self.cores is not None:
            executor = SharedCoreExecutor(self.clock, executor, self.cores)
        settings = role.worker_settings(spec, policy, compat=setup.compat, fuse=setup.fuse_layers,
                                        gather=setup.gather)
        w = Worker(
            i,
            self.clock,
            self.network.endpoint(i),
            executor,
            settings,
            policy=None if policy.routes_at_admission else policy.make_hop(settings.out_links, setup.seed, i),
            peer_queue_len=self._peer_len,
        )
        w.start()
        return w

    def revive_worker(self, i: int) -> Worker:
        """A fresh worker in node ``i``'s role (empty KV, no requests), on the network from now on
        (fault injection: after ``Worker.kill``)."""
        return self._replace_worker(i)

    def _replace_worker(self, i: int) -> Worker:
        """A fresh worker in node ``i``'s role; the one it replaces (stopped) is kept in
        ``past_workers``, so that the report counts what it did."""
        old = self.workers.get(i)
        if old is not None:
            self.past_workers.setdefault(i, []).append(old)
        w = self._make_worker(i)
        self.workers[i] = w
        return w

    def _peer_queue_len(self, node: NodeRef) -> int:
        """Shortest-queue's view of a neighbour: its first-layer queue (0 for the sink).  In a
        simulation every node can look; a distributed runtime would learn it from heartbeats."""
        w = self.workers.get(node) if isinstance(node, int) else None
        return 0 if w is None else w.first_queue_len()

    @property
    def events(self) -> int:
        """Callbacks the loop has run so far (every timer and delivery)."""
        return self.loop.callbacks_run

    def run_until(self, t: float) -> None:
        self.loop.run_until(t)

    def close(self) -> None:
        self.loop.close()
