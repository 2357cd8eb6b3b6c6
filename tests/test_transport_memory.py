"""The simulated network (helix_async.transport.memory) on tiny hand-built clusters.

Every expected time is worked out by hand in the test: sizes, bandwidths and latencies are chosen
so that ``t + S/B + L`` is exact in binary floating point, and arrivals are compared with ``==``.
Times are read in the receiving handler from the loop's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from helix_async.clock import LoopClock
from helix_async.cluster.spec import ClusterSpec, Link, MachineType, Node
from helix_async.ids import SINK, SOURCE, NodeRef
from helix_async.transport import HOST, Transport, TransportError
from helix_async.transport.memory import MODES, MemoryNetwork, MemoryTransport
from helix_async.vloop import VirtualTimeLoop

BIG = 2.0**40  # a NIC that is never the bottleneck (bytes/s)


class Msg:
    """A test message: the network only needs its size, which ``size_of`` reads."""

    def __init__(self, name: str, size: float) -> None:
        self.name = name
        self.size = size

    def __repr__(self) -> str:
        return f"Msg({self.name!r}, {self.size})"


def size_of(src: NodeRef, dst: NodeRef, msg: Any) -> float:
    return float(msg.size)


def cluster(
    nics: Mapping[int, tuple[float, float]],
    links: list[Link],
    *,
    coordinator: tuple[float, float] = (BIG, BIG),
) -> ClusterSpec:
    """Nodes 0..N-1 with (nic_in, nic_out) each (one machine type per node) and ``links``;
    coordinator: (nic_in, nic_out) of the host."""
    types = {
        f"M{i}": MachineType(f"M{i}", 1, 4e10, nic_in=nin, nic_out=nout, disk=1e9, gpu="a100")
        for i, (nin, nout) in nics.items()
    }
    nodes = tuple(Node(i, f"M{i}") for i in sorted(nics))
    return ClusterSpec(
        "tiny",
        types,
        nodes,
        tuple(links),
        coordinator_nic_in=coordinator[0],
        coordinator_nic_out=coordinator[1],
    )




Log = list[tuple[float, NodeRef, Any]]


def recorder(clock: LoopClock, log: Log) -> Callable[[NodeRef, Any], None]:
    def handler(sender: NodeRef, msg: Any) -> None:
        log.append((clock.now(), sender, msg))

    return handler


def arrivals(log: Log) -> list[tuple[float, NodeRef, str]]:
    return [(t, s, m.name) for t, s, m in log]


def setup(
    loop: VirtualTimeLoop,
    spec: ClusterSpec,
    arcs: list[tuple[NodeRef, NodeRef]],
    *,
    mode: str = "fair",
    rates: Mapping[tuple[NodeRef, NodeRef], float] | None = None,
) -> tuple[LoopClock, MemoryNetwork, dict[NodeRef, MemoryTransport], dict[NodeRef, Log]]:
    """A network with an endpoint and a recording handler for every node and the host."""
    clock = LoopClock(loop)
    net = MemoryNetwork(clock, spec, arcs, size_of, mode=mode, reserved_rates=rates)
    eps: dict[NodeRef, MemoryTransport] = {}
    logs: dict[NodeRef, Log] = {}
    for ref in [HOST, *(n.id for n in spec.nodes)]:
        ep = net.endpoint(ref)
        logs[ref] = []
        ep.set_handler(recorder(clock, logs[ref]))
        eps[ref] = ep
    return clock, net, eps, logs


# --------------------------------------------------------------------------------------------------
# One link: latency + size / bandwidth, FIFO, pipelined
# --------------------------------------------------------------------------------------------------

CHAIN = [
    Link(SOURCE, 0, 4096.0, 0.125, False),
    Link(0, 1, 1024.0, 0.5, True),
    Link(1, SINK, 1024.0, 0.5, False),
]


def test_one_message_arrives_after_serialisation_plus_latency(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN)
    _, net, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)])
    loop.run_until(1.0)
    eps[0].send(1, Msg("a", 256))
    loop.run_until(1.75)  # half-open: the arrival at exactly 1.75 has not run yet
    assert logs[1] == []
    loop.run_until(10.0)
    # 1.0 + 256 B / 1024 B/s + 0.5 s
    assert arrivals(logs[1]) == [(1.75, 0, "a")]
    assert logs[0] == [] and logs[HOST] == []
    st = {(d["src"], d["dst"]): d for d in net.link_stats(10.0)}
    assert st[(0, 1)]["messages"] == 1
    assert st[(0, 1)]["bytes"] == 256.0
    assert st[(0, 1)]["busy_fraction"] == 0.25 / 10.0
    assert st[(SOURCE, 0)]["messages"] == 0
    assert net.control_messages == 0 and net.dropped == 0


def test_fifo_link_pipelines_the_second_message(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN)
    clock, net, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)])
    idle: list[tuple[float, NodeRef]] = []
    eps[0].set_idle_handler(lambda dest: idle.append((clock.now(), dest)))
    eps[0].send(1, Msg("a", 256))
    eps[0].send(1, Msg("b", 256))
    eps[0].send(1, Msg("c", 512))
    assert not eps[0].link_idle(1)
    assert eps[0].link_idle(0)  # no planned link 0 -> 0: nothing can be in flight
    loop.run_until(1.0)
    # a on the wire 0..0.25, b 0.25..0.5, c 0.5..1.0; each then propagates 0.5 s
    assert not eps[0].link_idle(1)
    loop.run_until(10.0)
    assert arrivals(logs[1]) == [(0.75, 0, "a"), (1.0, 0, "b"), (1.5, 0, "c")]
    assert eps[0].link_idle(1)
    # the idle handler fires once, when the last queued message has been serialised
    assert idle == [(1.0, 1)]
    (st,) = [d for d in net.link_stats(4.0) if (d["src"], d["dst"]) == (0, 1)]
    assert st == {"src": 0, "dst": 1, "messages": 3, "bytes": 1024.0, "busy_fraction": 0.25, "max_queue": 2}


def test_link_is_idle_while_the_last_message_only_propagates(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN)
    _, _, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)])
    eps[0].send(1, Msg("a", 256))
    loop.run_until(0.25)
    assert not eps[0].link_idle(1)
    loop.run_until(0.5)  # serialised at 0.25; in flight until 0.75 but the link is free
    assert eps[0].link_idle(1)
    assert logs[1] == []
    eps[0].send(1, Msg("b", 256))  # starts at once: 0.5 + 0.25 + 0.5
    loop.run_until(5.0)
    assert arrivals(logs[1]) == [(0.75, 0, "a"), (1.25, 0, "b")]


def test_sink_delivers_to_the_host_and_the_host_sends_as_source(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN, coordinator=(BIG, 512.0))
    _, _, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)])
    host = eps[HOST]
    assert host.node == SOURCE == HOST
    assert isinstance(host, Transport)
    # source -> 0: link 4096 B/s but the coordinator's out-NIC is 512 B/s
    host.send(0, Msg("p", 256))
    eps[1].send(SINK, Msg("t", 128))  # 128 / 1024 + 0.5
    loop.run_until(5.0)
    assert arrivals(logs[0]) == [(0.5 + 0.125, SOURCE, "p")]
    assert arrivals(logs[HOST]) == [(0.625, 1, "t")]


# --------------------------------------------------------------------------------------------------
# "fair": NIC shares over the links busy when a transfer starts
# --------------------------------------------------------------------------------------------------

FAN = [
    Link(SOURCE, 0, 4096.0, 0.0, False),
    Link(0, 1, 4096.0, 0.5, True),
    Link(0, 2, 4096.0, 0.5, True),
    Link(3, 2, 4096.0, 0.25, True),
    Link(1, SINK, 4096.0, 0.0, False),
    Link(2, SINK, 4096.0, 0.0, False),
]
FAN_ARCS: list[tuple[NodeRef, NodeRef]] = [(SOURCE, 0), (0, 1), (0, 2), (3, 2), (1, SINK), (2, SINK)]


def test_fair_out_nic_is_shared_by_the_busy_out_links(loop: VirtualTimeLoop) -> None:
    # node 0's out-NIC (1024 B/s) is the bottleneck of both its 4096 B/s links
    spec = cluster({0: (BIG, 1024.0), 1: (BIG, BIG), 2: (BIG, BIG), 3: (BIG, BIG)}, FAN)
    _, _, eps, logs = setup(loop, spec, FAN_ARCS)
    eps[0].send(1, Msg("a", 256))  # starts alone: 1024 B/s, serialised at 0.25
    eps[0].send(2, Msg("b", 256))  # 2 busy out-links at its start: 512 B/s, serialised at 0.5
    eps[0].send(1, Msg("c", 256))  # queued behind a; starts at 0.25 while b is busy: 512 B/s
    loop.run_until(5.0)
    assert arrivals(logs[1]) == [(0.25 + 0.5, 0, "a"), (0.25 + 0.5 + 0.5, 0, "c")]
    assert arrivals(logs[2]) == [(0.5 + 0.5, 0, "b")]


def test_fair_both_links_busy_at_start_get_half_the_nic_each(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, 1024.0), 1: (BIG, BIG), 2: (BIG, BIG), 3: (BIG, BIG)}, FAN)
    _, _, eps, logs = setup(loop, spec, FAN_ARCS)
    eps[0].send(1, Msg("x", 512))  # alone: 1024 B/s, on the wire 0..0.5
    eps[0].send(1, Msg("a", 256))  # starts at 0.5, with y busy: 512 B/s -> 0.5..1.0
    eps[0].send(2, Msg("y", 768))  # starts at 0 with x busy: 512 B/s -> 0..1.5
    loop.run_until(5.0)
    assert arrivals(logs[1]) == [(1.0, 0, "x"), (1.5, 0, "a")]
    assert arrivals(logs[2]) == [(2.0, 0, "y")]


def test_fair_in_nic_is_shared_by_the_busy_in_links(loop: VirtualTimeLoop) -> None:
    # node 2's in-NIC (1024 B/s) is the bottleneck of links 0 -> 2 and 3 -> 2
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG), 2: (1024.0, BIG), 3: (BIG, BIG)}, FAN)
    _, _, eps, logs = setup(loop, spec, FAN_ARCS)
    eps[0].send(2, Msg("a", 256))  # alone: 1024 B/s, 0.25 + 0.5
    eps[3].send(2, Msg("b", 256))  # 2 busy in-links: 512 B/s, 0.5 + 0.25
    loop.run_until(5.0)
    assert arrivals(logs[2]) == [(0.75, 0, "a"), (0.75, 3, "b")]


def test_fair_idle_link_holds_no_bandwidth(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, 1024.0), 1: (BIG, BIG), 2: (BIG, BIG), 3: (BIG, BIG)}, FAN)
    _, _, eps, logs = setup(loop, spec, FAN_ARCS)
    eps[0].send(2, Msg("a", 256))
    loop.run_until(1.0)  # a done serialising at 0.25
    eps[0].send(1, Msg("b", 256))  # 0 -> 2 idle again: the whole NIC
    loop.run_until(5.0)
    assert arrivals(logs[1]) == [(1.0 + 0.25 + 0.5, 0, "b")]


# --------------------------------------------------------------------------------------------------
# "reserved": a fixed rate per link, one timer per message
# --------------------------------------------------------------------------------------------------


def test_reserved_rate_fixed_schedule_one_timer_per_message(loop: VirtualTimeLoop) -> None:
    links = [
        Link(SOURCE, 0, 4096.0, 0.0, False),
        Link(0, 1, 4096.0, 0.25, True),
        Link(1, SINK, 4096.0, 0.0, False),
    ]
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, links)
    rates: dict[tuple[NodeRef, NodeRef], float] = {(SOURCE, 0): 4096.0, (0, 1): 512.0, (1, SINK): 4096.0}
    _, _, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)], mode="reserved", rates=rates)
    before = loop.callbacks_run
    for name in "abc":
        eps[0].send(1, Msg(name, 256))  # 0.5 s each at 512 B/s, although the link has 4096
    assert not eps[0].link_idle(1)
    loop.run_until(1.25)
    assert not eps[0].link_idle(1)  # the last byte leaves at 1.5
    loop.run_until(1.5)
    assert eps[0].link_idle(1)
    loop.run_until(3.0)
    assert arrivals(logs[1]) == [(0.75, 0, "a"), (1.25, 0, "b"), (1.75, 0, "c")]
    assert loop.callbacks_run - before == 3  # one delivery timer per message, nothing else
    eps[0].send(1, Msg("d", 128))  # the link is free again: starts now
    loop.run_until(5.0)
    assert arrivals(logs[1])[-1] == (3.0 + 0.25 + 0.25, 0, "d")


def test_fair_mode_needs_two_callbacks_per_message(loop: VirtualTimeLoop) -> None:
    # the contrast with "reserved": end of serialisation, then the delivery
    links = [
        Link(SOURCE, 0, 4096.0, 0.0, False),
        Link(0, 1, 512.0, 0.25, True),
        Link(1, SINK, 4096.0, 0.0, False),
    ]
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, links)
    _, _, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)])
    before = loop.callbacks_run
    for name in "abc":
        eps[0].send(1, Msg(name, 256))
    loop.run_until(3.0)
    assert arrivals(logs[1]) == [(0.75, 0, "a"), (1.25, 0, "b"), (1.75, 0, "c")]
    assert loop.callbacks_run - before == 6


def test_reserved_mode_requires_a_rate_for_every_link(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN)
    clock = LoopClock(loop)
    with pytest.raises(ValueError, match="reserved mode needs a rate for link 0 -> 1"):
        MemoryNetwork(clock, spec, [(0, 1)], size_of, mode="reserved", reserved_rates={(SOURCE, 0): 1.0})
    with pytest.raises(ValueError, match="reserved mode needs a rate"):
        MemoryNetwork(clock, spec, [(0, 1)], size_of, mode="reserved")


def test_bad_mode_and_unknown_arc_are_refused(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN)
    clock = LoopClock(loop)
    assert MODES == ("fair", "reserved", "available")
    with pytest.raises(ValueError, match="network mode must be one of"):
        MemoryNetwork(clock, spec, [(0, 1)], size_of, mode="fast")
    with pytest.raises(ValueError, match="no cluster link 0 -> sink"):
        MemoryNetwork(clock, spec, [(0, SINK)], size_of)


# --------------------------------------------------------------------------------------------------
# "available": out-NIC / #out-links, link bandwidth, receiver in-NIC not yet taken
# --------------------------------------------------------------------------------------------------


def test_available_mode_rates(loop: VirtualTimeLoop) -> None:
    # node 0: out-NIC 2048 over its 2 planned out-links -> 1024 B/s each, busy or not;
    # node 1: in-NIC 1536 B/s, held by the transfers serialising into it
    links = FAN + [Link(3, 1, 4096, 0.25, True)]
    spec = cluster({0: (BIG, 2048.0), 1: (1536.0, BIG), 2: (BIG, BIG), 3: (BIG, BIG)}, links)
    arcs = FAN_ARCS + [(3, 1)]
    _, _, eps, logs = setup(loop, spec, arcs, mode="available")
    eps[0].send(1, Msg("a", 256))  # min(4096, 1024, 1536) = 1024: 0..0.25, +0.5
    eps[0].send(1, Msg("d", 256))  # queued; at 0.25 in-NIC left 1536 - 512 = 1024: 0.25..0.5, +0.5
    eps[3].send(1, Msg("b", 256))  # min(4096, BIG, 1536 - 1024) = 512: 0..0.5, +0.25
    eps[0].send(2, Msg("c", 256))  # 1024 although 0 -> 1 is busy too: 0..0.25, +0.5
    loop.run_until(5.0)
    # a and b both arrive at 0.75; a's delivery was scheduled first (at 0.25, b's at 0.5)
    assert arrivals(logs[1]) == [(0.75, 0, "a"), (0.75, 3, "b"), (1.0, 0, "d")]
    assert arrivals(logs[2]) == [(0.75, 0, "c")]


def test_available_mode_floor_rate_when_the_in_nic_is_taken(loop: VirtualTimeLoop) -> None:
    links = FAN + [Link(3, 1, 4096, 0.0, True)]
    spec = cluster({0: (BIG, 2048.0), 1: (1024.0, BIG), 2: (BIG, BIG), 3: (BIG, BIG)}, links)
    _, _, eps, logs = setup(loop, spec, FAN_ARCS + [(3, 1)], mode="available")
    eps[0].send(1, Msg("a", 320))  # takes the whole in-NIC (1024): 0.3125 + 0.5
    eps[3].send(1, Msg("b", 320))  # nothing left: the original's 10 B/s floor -> 32 s
    loop.run_until(100.0)
    assert arrivals(logs[1]) == [(0.8125, 0, "a"), (32.0, 3, "b")]


# --------------------------------------------------------------------------------------------------
# Control messages, errors, closing
# --------------------------------------------------------------------------------------------------


def test_control_messages_take_the_cluster_latency_and_no_bandwidth(loop: VirtualTimeLoop) -> None:
    links = [
        Link(SOURCE, 0, 4096.0, 0.0625, False),
        Link(0, 1, 1.0, 0.375, True),  # 1 B/s: a charged transfer would take ages
        Link(1, SINK, 1.0, 0.125, False),
    ]
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG), 2: (BIG, BIG)}, links)
    _, net, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1)])  # 1 -> 0 and 1 -> sink not planned
    loop.run_until(1.0)
    eps[1].send(0, Msg("fb", 1e9))  # reverse of a planned link: cluster latency 0.375
    eps[1].send(SINK, Msg("fs", 1e9))  # cluster link 1 -> sink: 0.125
    eps[0].send(SINK, Msg("f0", 1e9))  # no 0 -> sink link: the host's link source -> 0, 0.0625
    eps[0].send(2, Msg("f2", 1e9))  # no cluster link at all: latency 0
    loop.run_until(2.0)
    assert arrivals(logs[0]) == [(1.375, 1, "fb")]
    assert arrivals(logs[HOST]) == [(1.0625, 0, "f0"), (1.125, 1, "fs")]
    assert arrivals(logs[2]) == [(1.0, 0, "f2")]
    assert net.control_messages == 4
    assert all(d["messages"] == 0 for d in net.link_stats(1.0))
    assert set(net.links) == {(SOURCE, 0), (0, 1)}


def test_unknown_destination_raises(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG), 2: (BIG, BIG)}, CHAIN)
    clock = LoopClock(loop)
    net = MemoryNetwork(clock, spec, [(SOURCE, 0), (0, 1), (1, SINK)], size_of)
    with pytest.raises(TransportError, match="no node 99"):
        net.endpoint(99)
    ep0 = net.endpoint(0)
    ep0.set_handler(lambda s, m: None)
    with pytest.raises(TransportError, match="no endpoint 99"):
        ep0.send(99, Msg("x", 1))
    with pytest.raises(TransportError, match="no endpoint 2"):  # in the cluster, but nobody listens
        ep0.send(2, Msg("x", 1))
    assert net.control_messages == 0
    assert issubclass(TransportError, RuntimeError)


def test_closed_transport_refuses_to_send_and_drops_what_arrives(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN)
    _, net, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)])
    eps[0].send(1, Msg("a", 256))  # arrives at 0.75
    loop.run_until(0.5)
    loop.run_until_complete(eps[1].close())
    assert eps[1].closed
    with pytest.raises(TransportError, match="closed"):
        eps[1].send(SINK, Msg("t", 1))
    loop.run_until(5.0)
    assert logs[1] == []
    assert net.dropped == 1
    # a control message to a closed endpoint has nobody to go to
    with pytest.raises(TransportError, match="no endpoint 1"):
        eps[HOST].send(1, Msg("c", 1))


def test_a_failing_handler_stops_the_run_and_propagates(loop: VirtualTimeLoop) -> None:
    spec = cluster({0: (BIG, BIG), 1: (BIG, BIG)}, CHAIN)
    clock, _, eps, logs = setup(loop, spec, [(SOURCE, 0), (0, 1), (1, SINK)])

    def boom(sender: NodeRef, msg: Any) -> None:
        if msg.name == "bad":
            raise KeyError("handler bug")
        logs[1].append((clock.now(), sender, msg))

    eps[1].set_handler(boom)
    eps[0].send(1, Msg("bad", 256))  # arrives at 0.75
    eps[0].send(1, Msg("ok", 256))  # arrives at 1.0
    with pytest.raises(KeyError, match="handler bug"):
        loop.run_until(5.0)
    assert loop.time() == 0.75  # stopped where it failed, not at the deadline
    loop.run_until(5.0)  # the simulation can be resumed
    assert arrivals(logs[1]) == [(1.0, 0, "ok")]
