"""Hostile peers over real sockets (loopback), with CURVE keys and without (docs/security.md).

A host and two tiny-llama torch workers run in this process, on real ZeroMQ sockets; an attacker
is one more endpoint on the same machine.  With keys it holds a valid key of the allow-list, the
wrong node's; without keys it names itself as it likes (identity ``"1"``: the last stage's id).

* forged tokens, errors and stats from a peer that is not on the victim's route are dropped and
  counted per (kind, sender), and the victim's text equals its greedy run;
* a rogue registrant with a valid key for another node is refused;
* a wedge attempt (``Register`` node 0 with a garbage address, or with an address nobody answers
  at) does not stop the real worker from taking its node;
* 1,000 refused registrations leave the host's file descriptors and RSS flat (within 10 %).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")

from polling import wait_until_async  # noqa: E402

from helix_async.clock import LoopClock  # noqa: E402
from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.ids import SOURCE  # noqa: E402
from helix_async.logs import RateLimitedLog  # noqa: E402
from helix_async.messages import Error, NodeStats, Register, TokenResult  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.runtime.worker_main import WorkerServer  # noqa: E402
from helix_async.settings import WorkerOptions  # noqa: E402
from helix_async.transport.curve import check_address, generate_keys, load_keys  # noqa: E402
from helix_async.transport.zmq import ZmqTransport  # noqa: E402

STAGES = {0: (0, 4), 1: (4, 8)}
PROMPT = [5, 17, 42, 99, 7]
MAX_TOKENS = 48


def run(coro: Callable[[], Awaitable[None]], timeout: float = 300.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro(), timeout)

    asyncio.run(main())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "keys"
    generate_keys(d, 3)  # worker-2's key is valid but bound to node 2, which the plan does not use
    return d


def _placement() -> Placement:
    return Placement.from_layers(load_cluster("tiny3"), "tiny-llama", STAGES)


def _attacker(clock: LoopClock, keys: Path | None, key: str) -> ZmqTransport:
    """An endpoint on this machine: with keys, one of the allow-list (``key``); without, a peer
    that calls itself ``"1"``, the id of the victim's last stage."""
    return ZmqTransport("evil", clock, name="1", curve=load_keys(keys, key) if keys else None)


def _forged_stats(node: int) -> NodeStats:
    # a link so slow and lossy that the host, believing it, would degrade it and re-plan the flows
    return NodeStats(node_id=node, now=0.0, kv_used=0, kv_capacity=1, queued=0, peers=(-1,), bytes_out=(0,), bad_frames=0,
                     retried=(10**6,), rtt_us=(10**7,))


def _register(node: int, name: str, address: str) -> Register:
    return Register(node_id=node, name=name, machine_type="CPU", address=address, num_gpus=1, gpu_memory_bytes=0,
                    capabilities=("torch", "cpu"))


async def _workers(address: str, keys: Path | None) -> list[asyncio.Task[int]]:
    tasks = []
    for node in STAGES:
        opts = WorkerOptions(connect=address, node_id=node, keys=str(keys) if keys else "", insecure=keys is None)
        tasks.append(asyncio.get_running_loop().create_task(WorkerServer(opts).run()))
    return tasks


@pytest.mark.parametrize("mode", ["keys", "plaintext"])
def test_forged_tokens_errors_and_stats_are_dropped_and_counted(keys: Path, mode: str) -> None:
    k = keys if mode == "keys" else None

    async def main() -> None:
        clock = LoopClock()
        server = HostServer(_placement(), curve=load_keys(k, "host") if k else None)
        address = await server.start()
        evil = _attacker(clock, k, "worker-2")
        evil.set_handler(lambda s, m: None)
        await evil.start()
        evil.connect(SOURCE, address)
        workers = await _workers(address, k)
        try:
            await server.wait_ready(120)
            greedy = await server.complete(PROMPT, MAX_TOKENS)  # the victim's text, unattacked
            flow = server.current_flow.value
            host = server.host
            assert host is not None
            counted = 0
            victim = server.generate(PROMPT, MAX_TOKENS)
            text = [await victim.__anext__()]
            # while the victim is in flight: tokens and errors for every request id it may have,
            # and stats claiming node 1's link to the host is broken
            for rid in range(4):
                evil.send(SOURCE, TokenResult(request_id=rid, token_id=3, context_len=6, finished=False, sent_at=0.0))
                evil.send(SOURCE, Error(request_id=rid, code=1, text="forged"))
            evil.send(SOURCE, _forged_stats(1))
            counted = 9
            await wait_until_async(lambda: host.stats.bad_messages + server.counters.bad_messages >= counted,
                                   what="every forged message dropped and counted")
            text += [t async for t in victim]
            assert text == greedy and len(text) == MAX_TOKENS
            sender: Any = 2 if k else "1"  # with keys, the sender is its key's node, whatever identity it chose
            refused = {kind: n for (kind, who), n in host.stats.refused.items() if who == sender}
            # the victim (request 1) was in flight: its forged token and error were refused by origin
            assert refused.get("TokenResult", 0) >= 1 and refused.get("Error", 0) >= 1
            assert server.dropped == {("NodeStats", sender): 1}
            assert host.stats.bad_messages + server.counters.bad_messages == counted
            assert host.stats.failed == 0 and server.counters.workers_lost == 0
            assert not any(h.degraded for h in server.link_health.values()) and server.current_flow.value == flow
        finally:
            await server.shutdown(grace=0)
            await evil.close()
            assert await asyncio.gather(*workers) == [0, 0]

    run(main)


@pytest.mark.parametrize("mode", ["keys", "plaintext"])
def test_rogue_and_wedging_registrations_do_not_take_a_node(keys: Path, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    k = keys if mode == "keys" else None

    async def main() -> None:
        clock = LoopClock()
        server = HostServer(_placement(), curve=load_keys(k, "host") if k else None)
        address = await server.start()
        # with keys: node 1's key, asking for node 0
        evil = _attacker(clock, k, "worker-1")
        evil.set_handler(lambda s, m: None)
        await evil.start()
        evil.connect(SOURCE, address)
        workers: list[asyncio.Task[int]] = []
        try:
            if k is not None:
                evil.send(SOURCE, _register(0, "rogue", evil.address))
            for i in range(50):  # the wedge, over and over: one log line per cause, not per message
                evil.send(SOURCE, _register(0, f"wedge-{i}", "garbage"))
            # an address that parses but where nobody answers (plaintext: nothing proves it wrong)
            dead = "tcp://127.0.0.1:9" + (evil.address[evil.address.index("#"):] if k else "")
            evil.send(SOURCE, _register(0, "dead", dead))
            sent = 52 if k is not None else 51
            await wait_until_async(lambda: server.counters.registrations >= sent, what="the rogue registrations")
            if k is not None:
                # node 1's key may not register as node 0, whatever the address
                assert server.counters.refused == sent
            else:
                # plaintext proves nothing about a well-formed address: the dead one holds node 0
                # until its silence frees it
                assert server.counters.refused == 50
                await wait_until_async(lambda: server.counters.freed == 1, what="the silent registrant freed")
            assert server.nodes[0].name == ""
            workers = await _workers(address, k)
            await server.wait_ready(120)
            assert all(st.name.startswith("w-") for st in server.nodes.values())
            assert await server.complete(PROMPT, 4) != []
            lines = [r for r in caplog.records if "garbage" in r.getMessage()]
            assert 1 <= len(lines) <= 6  # rate-limited: the first few in full, then counted
            assert all(r.exc_info is None for r in caplog.records)
        finally:
            await server.shutdown(grace=0)
            await evil.close()
            assert await asyncio.gather(*workers) == [0] * len(workers)

    caplog.set_level(logging.WARNING)
    run(main)


def test_registrants_that_never_become_ready_free_their_nodes(keys: Path) -> None:
    """Two registrants that answer heartbeats and take their layers but never say ready (with keys:
    node 0's and node 1's own keys) free their nodes after ``ready_timeout_s``; the real workers
    then take them and serve."""

    async def main() -> None:
        clock = LoopClock()
        server = HostServer(_placement(), curve=load_keys(keys, "host"))
        server.ready_timeout_s = 0.5
        address = await server.start()
        squatters = [ZmqTransport(f"squat{i}", clock, curve=load_keys(keys, f"worker-{i}")) for i in STAGES]
        got: list[Any] = []
        workers: list[asyncio.Task[int]] = []
        try:
            for i, sq in enumerate(squatters):
                sq.set_handler(lambda s, m: got.append(m))
                await sq.start()
                sq.connect(SOURCE, address)
                sq.send(SOURCE, _register(i, f"squat{i}", sq.address))
            await wait_until_async(lambda: len(got) == 2, what="both squatters assigned their layers")
            await wait_until_async(lambda: server.counters.freed == 2, what="both nodes freed")
            server.ready_timeout_s = 600.0  # the real workers load a model: no race with the squatters' bound
            workers = await _workers(address, keys)
            await server.wait_ready(120)
            assert await server.complete(PROMPT, 4) != [] and server.counters.rejoined == 2
        finally:
            await server.shutdown(grace=0)
            for sq in squatters:
                await sq.close()
            assert await asyncio.gather(*workers) == [0] * len(workers)

    run(main)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("mode", ["keys", "plaintext"])
def test_a_thousand_refused_registrations_leave_fds_and_rss_flat(keys: Path, mode: str) -> None:
    k = keys if mode == "keys" else None

    async def main() -> None:
        clock = LoopClock()
        server = HostServer(_placement(), curve=load_keys(k, "host") if k else None)
        server.refusal_linger_s = 2.0
        address = await server.start()
        evil = _attacker(clock, k, "worker-2")
        answers: list[Any] = []
        evil.set_handler(lambda s, m: answers.append(m))
        await evil.start()
        evil.connect(SOURCE, address)

        async def refused(n: int, first: int) -> None:
            # node 7 is in no plan; the address is the attacker's own, so the host answers
            for i in range(first, first + n):
                evil.send(SOURCE, _register(7, f"r{i}", evil.address))
            await wait_until_async(lambda: server.counters.refused >= first + n, what="the refusals")
            await wait_until_async(lambda: server.refusals_in_flight == 0, what="the refusal outboxes closed")

        try:
            await refused(100, 0)  # warm-up: what a first refusal allocates once
            fds, rss = _fds(), _rss()
            await refused(1000, 100)
            assert server.counters.refused == 1100 and answers  # (some were answered, the rest refused silently)
            assert all(isinstance(m, Error) for m in answers)
            # (ZeroMQ's I/O thread closes a socket's connections shortly after the socket closes)
            await wait_until_async(lambda: _fds() <= fds * 1.1, what=f"file descriptors back to {fds} (+10 %)")
            assert _rss() <= rss * 1.1, (rss, _rss())
            print(f"[{mode}] after 100 refusals: {fds} fds, RSS {rss / 2**20:.1f} MiB; after 1,100: {_fds()} fds, "
                  f"RSS {_rss() / 2**20:.1f} MiB")  # the figures, with pytest -s
            assert not any(st.name for st in server.nodes.values())
        finally:
            await server.shutdown(grace=0)
            await evil.close()

    run(main)


def test_an_address_is_checked_before_a_node_is_given() -> None:
    key = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    assert check_address("tcp://10.0.0.5:6000", None) == ""
    assert check_address("tcp://10.0.0.5:6000#curve=" + key.hex(), key) == ""
    assert "tcp://" in check_address("garbage", None)
    assert "port" in check_address("tcp://10.0.0.5:0", None)
    assert "port" in check_address("tcp://10.0.0.5:http", None)
    assert "plaintext" in check_address("tcp://10.0.0.5:6000#curve=" + key.hex(), None)
    assert "not the key" in check_address("tcp://10.0.0.5:6000#curve=" + key.hex(), key[::-1])
    assert "not the key" in check_address("tcp://10.0.0.5:6000", key)
    assert "hex" in check_address("tcp://10.0.0.5:6000#curve=zz", key)


def test_logs_are_rate_limited_per_cause(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("helix_async.test"), lambda: now[0], burst=3, period=10.0, max_causes=2)
    caplog.set_level(logging.WARNING)
    logged = [rl.warning("a", "event a %d", i) for i in range(100)]
    assert logged == [True] * 3 + [False] * 97 and len(caplog.records) == 3
    now[0] = 10.0
    rl.warning("a", "event a")  # a period later: one summary of what was suppressed
    assert caplog.records[-1].getMessage().startswith("a: 98 more like this")
    assert rl.warning("b", "event b") and rl.count("a") == 101
    rl.warning("c", "event c")  # past max_causes: counted in one shared bucket
    assert rl.count("(other causes)") == 1 and len(caplog.records) == 6
