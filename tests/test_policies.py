"""The routing/scheduling policies' table (``helix_async.routing.policies``): what each entry builds
and asks of a node, the runtime's refusals, and a new policy as one entry that the simulator runs
without a change elsewhere."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES
from helix_async.cluster.spec import ClusterSpec, Link, Node
from helix_async.errors import ConfigError
from helix_async.ids import SINK, SOURCE, NodeRef
from helix_async.placement import Placement
from helix_async.placement.flow import max_flow
from helix_async.roles import Replanner, worker_roles
from helix_async.routing import FlowRouter, RandomPolicy, ShortestQueuePolicy, SwarmPolicy, node_seed
from helix_async.routing.policies import POLICIES, Policy, get_policy, register, runtime_policy
from sim.faults import Fault, FaultInjector
from sim.feeders import TraceFeeder
from sim.simulation import SCHEDULERS, Simulation, SimulationSetup
from sim.workloads import TraceEntry

TRACE = [TraceEntry(0.0, 100, 5), TraceEntry(0.5, 200, 3), TraceEntry(1.0, 50, 2), TraceEntry(1.5, 80, 4)]


def fan_placement() -> Placement:
    """llama1-30b: nodes 0 and 1 both hold layers [0, 30), node 2 holds [30, 60); the source has two
    links (to 0 and to 1)."""
    t4x4 = DEFAULT_MACHINE_TYPES["T4x4"]
    spec = ClusterSpec(
        "fan3",
        {"T4x4": t4x4},
        (Node(0, "T4x4"), Node(1, "T4x4"), Node(2, "T4x4")),
        (
            Link(SOURCE, 0, 1e9, 0.001, False),
            Link(SOURCE, 1, 1e9, 0.001, False),
            Link(0, 2, 1e9, 0.001, False),
            Link(1, 2, 1e9, 0.001, False),
            Link(2, SINK, 1e9, 0.001, False),
        ),
    )
    return Placement.from_layers(spec, "llama1-30b", {0: (0, 30), 1: (0, 30), 2: (30, 60)})


class FirstLink:
    """A per-hop chooser that always takes its first out-link."""

    def __init__(self, out: Sequence[NodeRef]) -> None:
        self.out = tuple(out)
        self.calls = 0

    def choose(self, free: Sequence[bool] | None = None, queue_len: Any = None) -> int:
        self.calls += 1
        return 0

    def observe(self, link: int, delay: float) -> None:
        pass


@pytest.fixture
def first_link() -> Iterator[Policy]:
    entry = Policy("first-link", "always the first out-link", hop=lambda out, seed: FirstLink(out),
                   simulator_only="a test policy")
    register(entry)
    try:
        yield entry
    finally:
        POLICIES.pop(entry.name, None)


def test_the_table_says_what_each_policy_builds_and_needs() -> None:
    assert list(POLICIES) == list(SCHEDULERS) == ["maxflow", "swarm", "random", "shortest-queue"]
    mf, sw, rnd, sq = (POLICIES[n] for n in SCHEDULERS)
    assert mf.routes_at_admission and not any(p.routes_at_admission for p in (sw, rnd, sq))
    assert [(p.free_links_only, p.peer_queue_len, p.feedback) for p in (mf, sw, rnd, sq)] == [
        (False, False, False), (False, False, True), (True, False, False), (True, True, False)]
    assert isinstance(sw.make_hop([1, 2], 5, 0), SwarmPolicy)
    assert isinstance(rnd.make_hop([1, 2], 5, 0), RandomPolicy)
    assert isinstance(sq.make_hop([1, 2], 5, 0), ShortestQueuePolicy)
    with pytest.raises(ValueError, match="'maxflow' routes at admission"):
        mf.make_hop([1], 0, SOURCE)
    with pytest.raises(ValueError, match="'swarm' chooses hop by hop"):
        sw.make_router(fan_placement(), max_flow(fan_placement()), (0.85, 1.0))
    with pytest.raises(ValueError, match="exactly one of router and hop"):
        Policy("neither", "x")
    with pytest.raises(ValueError, match="'random' is registered already"):
        register(Policy("random", "again", hop=lambda out, seed: FirstLink(out)))


def test_a_node_s_chooser_draws_from_its_own_seed() -> None:
    out = [3, 4, 5, 6]
    a = POLICIES["random"].make_hop(out, 11, 2)
    b = RandomPolicy(out, seed=node_seed(11, 2))
    c = POLICIES["random"].make_hop(out, 11, 3)
    draws = [a.choose() for _ in range(40)]
    assert draws == [b.choose() for _ in range(40)]
    assert draws != [c.choose() for _ in range(40)]


def test_maxflow_builds_the_flow_router_and_the_replanner_uses_the_table() -> None:
    p = fan_placement()
    router = POLICIES["maxflow"].make_router(p, max_flow(p), (0.85, 1.0))
    assert isinstance(router, FlowRouter)
    rp = Replanner(p)
    assert rp.policy is POLICIES["maxflow"]
    r, flow, why = rp.router(frozenset({0}))
    assert isinstance(r, FlowRouter) and flow.value > 0 and why == ""
    with pytest.raises(ValueError, match="policy 'swarm' chooses hop by hop"):
        Replanner(p, policy=POLICIES["swarm"])


def test_the_runtime_refuses_a_simulator_only_policy_naming_the_flag() -> None:
    assert runtime_policy("maxflow") is POLICIES["maxflow"]
    with pytest.raises(ConfigError, match=r"--scheduler: shortest-queue runs only in the simulator: it reads every "
                       r"neighbour's queue length .* \(the runtime runs: maxflow\)"):
        runtime_policy("shortest-queue")
    for name in ("swarm", "random"):
        with pytest.raises(ConfigError, match=f"--scheduler: {name} runs only in the simulator: a per-hop policy"):
            runtime_policy(name)
    with pytest.raises(ConfigError, match="--policy: unknown scheduler 'fastest'; known: maxflow, swarm, random, "
                       "shortest-queue"):
        runtime_policy("fastest", "--policy")
    with pytest.raises(ValueError, match="unknown scheduler 'fastest'; known: maxflow"):
        get_policy("fastest")
    with pytest.raises(ValueError, match="unknown scheduler 'fastest'"):
        Simulation(SimulationSetup(fan_placement(), scheduler="fastest"))


def test_worker_settings_carry_what_a_per_hop_policy_needs() -> None:
    p = fan_placement()
    role = worker_roles(p)[0]
    spec = p.model_spec
    for name in SCHEDULERS:
        pol = POLICIES[name]
        ws = role.worker_settings(spec, pol, compat=True, fuse=False)
        assert (ws.layers, ws.num_layers, ws.out_links, ws.kv_capacity) == ((0, 30), 60, (2,), role.kv_capacity)
        assert (ws.activation_bytes, ws.token_bytes, ws.compat, ws.fuse) == (spec.activation_size, spec.token_size, True, False)
        assert (ws.free_links_only, ws.feedback) == (pol.free_links_only, pol.feedback)
    assert not role.worker_settings(spec).free_links_only


def test_a_new_policy_is_one_entry_the_simulator_runs(first_link: Policy) -> None:
    sim = Simulation(SimulationSetup(fan_placement(), scheduler="first-link"))
    try:
        assert sim.policy is first_link
        feeder = TraceFeeder(sim, TRACE)
        feeder.install()
        sim.run_until(sim.t0 + 600.0)
        assert feeder.done and feeder.finished == len(TRACE)
        # every prompt left the source on its first link (node 0); node 1 ran nothing
        assert sim.workers[0].stats.prompt_tokens > 0 and sim.workers[1].stats.batches == 0
        assert sim.host.stats.finished == len(TRACE) and sim.host.stats.bad_messages == 0
    finally:
        sim.close()
    # fault recovery re-plans flows: only a policy with a router
    sim = Simulation(SimulationSetup(fan_placement(), scheduler="first-link"))
    try:
        with pytest.raises(ConfigError, match="--faults: fault recovery re-plans MaxFlow's flows: use --scheduler maxflow"):
            FaultInjector(sim, [Fault(0, 1.0, None)])
    finally:
        sim.close()
    with pytest.raises(ConfigError, match="first-link runs only in the simulator: a test policy"):
        runtime_policy("first-link")
