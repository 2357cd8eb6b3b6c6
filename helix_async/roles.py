"""What a plan asks of each node: the one place that turns a :class:`Placement` into worker roles
and the host's router, for the simulator (``sim.simulation``) and the runtime alike.

A worker's role: its layers, its batch limits and KV capacity from the profiled node settings of
its machine type for that many layers (docs/original.md §3.3; a node holding more layers than the
settings list gets the throughput model's KV capacity and the limits of the largest listed count),
and its out-links with the layer ranges of their receivers; :meth:`WorkerRole.worker_settings`
adds the model's sizes, the scheduling policy's needs and the run's semantics.  The host's router:
MaxFlow's :class:`~helix_async.routing.FlowRouter` over the plan's flows with the KV expectation
(the ``maxflow`` entry of ``routing.policies``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .flowplan import FlowPlan
from .ids import NodeRef
from .model import ModelSpec, ProfileSet, ThroughputModel, load_profiles
from .placement import Placement
from .placement.flow import max_flow
from .routing.policies import POLICIES, Policy
from .settings import KV_OFFLINE, WorkerSettings
from .worker import BatchLimits

__all__ = ["Replanner", "WorkerRole", "node_limits", "worker_roles"]


@dataclass(frozen=True)
class WorkerRole:
    """One compute node's part in a plan."""

    node_id: int
    gpu: str
    layers: tuple[int, int]
    limits: BatchLimits
    kv_capacity: int
    out_links: tuple[NodeRef, ...]
    next_layers: dict[NodeRef, tuple[int, int]] = field(default_factory=dict)

    def worker_settings(
        self, model: ModelSpec, policy: Policy | None = None, *, compat: bool = False, fuse: bool = True,
        gather: float | None = None,
    ) -> WorkerSettings:
        """What a :class:`~helix_async.worker.Worker` in this role runs with: the role, the
        ``model``'s sizes, what a per-hop ``policy`` needs of a node (free links only, feedback;
        nothing for one that routes at admission or None) and the run's semantics (``compat``,
        ``fuse``, ``gather``: see :class:`~helix_async.settings.WorkerSettings`; None: its default)."""
        hop = policy if policy is not None and not policy.routes_at_admission else None
        return WorkerSettings(
            layers=self.layers,
            num_layers=model.num_layers,
            limits=self.limits,
            kv_capacity=self.kv_capacity,
            activation_bytes=model.activation_size,
            token_bytes=model.token_size,
            kv_token_bytes=model.kv_bytes_per_token_per_layer,
            out_links=self.out_links,
            next_layers=self.next_layers,
            free_links_only=hop is not None and hop.free_links_only,
            feedback=hop is not None and hop.feedback,
            compat=compat,
            fuse=fuse,
            gather=WorkerSettings.gather if gather is None else gather,
        )


def worker_roles(
    placement: Placement, tm: ThroughputModel | None = None, profiles: ProfileSet | None = None
) -> dict[int, WorkerRole]:
    """The role of every node the plan uses, by node id."""
    spec: ModelSpec = placement.model_spec
    cluster = placement.cluster
    tm = tm if tm is not None else ThroughputModel.for_cluster(spec, cluster)
    profiles = profiles if profiles is not None else load_profiles(spec)
    used = set(placement.used_nodes())
    layers = {i: r for i, r in placement.layers.items() if r is not None and i in used}
    roles = {}
    for i, (a, b) in sorted(layers.items()):
        k = b - a
        gpu = cluster.machine(i).gpu
        limits, kv_cap = node_limits(profiles, gpu, k)
        if kv_cap < 0:
            kv_cap = tm.kv_capacity(gpu, k)
        out = tuple(placement.out_links(i))
        roles[i] = WorkerRole(
            i, gpu, (a, b), limits, int(kv_cap), out, {y: layers[y] for y in out if isinstance(y, int)}
        )
    return roles


def node_limits(profiles: ProfileSet, gpu: str, k: int) -> tuple[BatchLimits, int]:
    """Batch limits and KV capacity (token x layer entries) of a ``gpu`` node holding ``k`` layers,
    from the profiled node settings; the KV capacity is -1 when ``k`` is above the settings' range
    (the caller then asks the throughput model)."""
    ns = profiles.node_settings(gpu)
    kk = min(k, ns.max_layers)
    limits = BatchLimits(
        ns.prompt_limit_requests(kk),
        ns.prompt_limit_tokens(kk),
        ns.decode_limit_tokens(kk),
        ns.decode_limit_context(kk),
    )
    return limits, (ns.kv(k) if k <= ns.max_layers else -1)


class Replanner:
    """MaxFlow re-planned around lost nodes (no MILP: the plan's layer ranges stay, the flows move).

    ``router(lost)`` gives the router of ``placement`` without the ``lost`` nodes, its max flow,
    and "" -- or None, the zero flow and the reason when some layer is held by no live node then.
    The simulator's fault injection and the runtime's host both call it, then ``Host.replan``.
    policy: the routing policy whose router it builds (an entry of ``routing.policies`` that
    routes at admission; default ``maxflow``).
    """

    def __init__(
        self,
        placement: Placement,
        kv: tuple[float, float] = KV_OFFLINE,
        tm: ThroughputModel | None = None,
        *,
        policy: Policy | None = None,
    ) -> None:
        policy = policy if policy is not None else POLICIES["maxflow"]
        if not policy.routes_at_admission:
            raise ValueError(f"re-planning builds a router: policy {policy.name!r} chooses hop by hop")
        self.policy = policy
        self.placement = placement
        self.kv = kv
        self.tm = tm if tm is not None else ThroughputModel.for_cluster(placement.model_spec, placement.cluster)
        #: (src, dst) -> factor on that direction's bandwidth: links seen slow or lossy carry less
        self.link_scale: dict[tuple[NodeRef, NodeRef], float] = {}

    def _cluster(self) -> Any:
        from dataclasses import replace

        from .cluster.spec import Link

        c = self.placement.cluster
        if not self.link_scale:
            return c
        links = []
        for ln in c.links:
            fwd = self.link_scale.get((ln.a, ln.b), 1.0)
            back = self.link_scale.get((ln.b, ln.a), 1.0) if ln.bidirectional else 1.0
            if fwd == 1.0 and back == 1.0:
                links.append(ln)
            elif ln.bidirectional:
                links.append(Link(ln.a, ln.b, ln.bandwidth * fwd, ln.latency, False))
                links.append(Link(ln.b, ln.a, ln.bandwidth * back, ln.latency, False))
            else:
                links.append(Link(ln.a, ln.b, ln.bandwidth * fwd, ln.latency, False))
        return replace(c, links=tuple(links))

    def without(self, lost: set[int] | frozenset[int]) -> Placement:
        """The plan with the ``lost`` nodes' layers dropped (and degraded links scaled)."""
        p = self.placement
        layers = {i: (None if i in lost else r) for i, r in p.layers.items()}
        return Placement.from_layers(self._cluster(), p.model_spec, layers, method=f"{p.method} minus {sorted(lost)}")

    def uncovered(self, lost: set[int] | frozenset[int]) -> list[tuple[int, int]]:
        """Layer ranges [a, b) that no live node holds."""
        covered = [False] * self.placement.model_spec.num_layers
        for i, r in self.placement.layers.items():
            if r is not None and i not in lost:
                for layer in range(r[0], r[1]):
                    covered[layer] = True
        gaps: list[tuple[int, int]] = []
        for layer, ok in enumerate(covered):
            if not ok:
                if gaps and gaps[-1][1] == layer:
                    gaps[-1] = (gaps[-1][0], layer + 1)
                else:
                    gaps.append((layer, layer + 1))
        return gaps

    def router(self, lost: set[int] | frozenset[int]) -> tuple[Any, FlowPlan, str]:
        p = self.without(lost)
        flow = max_flow(p)
        if flow.value <= 0:
            gaps = self.uncovered(lost)
            where = ", ".join(f"[{a}, {b})" for a, b in gaps) if gaps else "every path"
            what = "layers" if gaps else "links"
            return None, flow, f"{what} {where} have no live node (lost: {sorted(lost)}); admission stops until one returns"
        return self.policy.make_router(p, flow, self.kv, self.tm), flow, ""
