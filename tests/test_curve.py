"""CURVE on the ZeroMQ transport: keys made by ``keys generate``, encrypted and authenticated links,
a stranger's key refused and counted with nothing it sends delivered, and what a bad key directory
says."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from polling import wait_until_async

from helix_async.clock import LoopClock
from helix_async.errors import ConfigError
from helix_async.ids import SOURCE, NodeRef
from helix_async.messages import Cancel
from helix_async.transport.base import TransportError
from helix_async.transport.curve import CurveKeys, generate_keys, load_keys, split_address
from helix_async.transport.zmq import ZmqTransport

zmq = pytest.importorskip("zmq")
if not zmq.has("curve"):  # pragma: no cover
    pytest.skip("libzmq without CURVE", allow_module_level=True)


def run(coro: Callable[[], Awaitable[None]], timeout: float = 300.0) -> None:
    import uvloop

    async def main() -> None:
        await asyncio.wait_for(coro(), timeout)

    uvloop.run(main())


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    generate_keys(d, 2)
    return d


def test_generated_keys_and_allow_list(keys: Path) -> None:
    names = sorted(p.name for p in keys.iterdir() if p.is_file())
    assert names == ["host.key", "host.key_secret", "worker-0.key", "worker-0.key_secret", "worker-1.key",
                     "worker-1.key_secret"]
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == ["host.key", "worker-0.key", "worker-1.key"]
    assert (keys / "host.key_secret").stat().st_mode & 0o077 == 0
    w = load_keys(keys, "worker-1")
    h = load_keys(keys, "host")
    assert w.default_server == h.public and h.default_server is None and len(w.public) == 40
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keys(keys, 1)
    with pytest.raises(ConfigError, match="no such key file"):
        load_keys(keys, "worker-7")
    assert split_address(w.address("tcp://127.0.0.1:5")) == ("tcp://127.0.0.1:5", w.public)


def test_encrypted_links_deliver_and_a_stranger_is_refused(keys: Path, tmp_path: Path) -> None:
    stranger_dir = tmp_path / "stranger"
    generate_keys(stranger_dir, 1)

    async def main() -> None:
        clock = LoopClock()
        host = ZmqTransport(SOURCE, clock, curve=load_keys(keys, "host"))
        w = ZmqTransport(1, clock, curve=load_keys(keys, "worker-0"))
        bad = ZmqTransport(2, clock, curve=load_keys(stranger_dir, "worker-0", host_key=False))
        got: dict[str, list[tuple[NodeRef, Any]]] = {"host": [], "w": []}
        host.set_handler(lambda s, m: got["host"].append((s, m)))
        w.set_handler(lambda s, m: got["w"].append((s, m)))
        bad.set_handler(lambda s, m: None)
        try:
            await host.start()
            await w.start()
            await bad.start()
            assert "#curve=" in host.address and "#curve=" in w.address
            w.connect(SOURCE, host.address)  # the host's key: from the address
            host.connect(1, w.address)
            w.send(SOURCE, Cancel(request_id=7, reason="hello"))
            host.send(1, Cancel(request_id=8, reason="back"))
            await wait_until_async(lambda: got["host"] and got["w"])
            # the sender is named by the key it authenticated with (worker-0's: node 0), not by the
            # identity it chose ("1")
            assert w.name == "1" and got["host"] == [(0, Cancel(request_id=7, reason="hello"))]
            assert got["w"] == [(SOURCE, Cancel(request_id=8, reason="back"))]
            # a stranger (a key not in allowed/) is refused: counted, nothing delivered
            bad.connect(SOURCE, host.address)
            bad.send(SOURCE, Cancel(request_id=9, reason="let me in"))
            # refused: its handshake failed, and a full retry period later it still has no
            # acknowledgement (the host answers whatever it receives), so it sends the message again
            await wait_until_async(lambda: host.stats.auth_failures >= 1)
            await wait_until_async(lambda: bad.stats.retried >= 1, what="the stranger resending")
            assert all(m.request_id != 9 for _, m in got["host"]) and not bad.link_idle(SOURCE)
            # an endpoint without keys cannot dial a CURVE address
            plain = ZmqTransport(3, clock)
            await plain.start()
            with pytest.raises(TransportError, match="CURVE-encrypted links only"):
                plain.connect(SOURCE, host.address)
            await plain.close()
        finally:
            for t in (host, w, bad):
                await t.close()

    run(main)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "curve"])
def test_an_eavesdropper_on_the_link_sees_no_plaintext_activations(keys: Path, encrypted: bool) -> None:
    """A recording TCP proxy between a worker and the host: the activation tensor's bytes (and a
    marker string) cross it readable in plaintext mode, and never with CURVE."""
    import numpy as np

    from helix_async.messages import Activations

    tensor = (np.arange(4096, dtype=np.float32) * 0.37 + 1.5).reshape(16, 256)
    marker = b"PLAINTEXT-MARKER-0123456789"
    captured = bytearray()

    async def main() -> None:
        clock = LoopClock()
        host = ZmqTransport(SOURCE, clock, curve=load_keys(keys, "host") if encrypted else None)
        w = ZmqTransport(1, clock, curve=load_keys(keys, "worker-0") if encrypted else None)
        got: list[Any] = []
        host.set_handler(lambda s, m: got.append(m))
        w.set_handler(lambda s, m: None)
        await host.start()
        await w.start()
        endpoint, _ = split_address(host.address)
        port = int(endpoint.rsplit(":", 1)[1])

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    captured.extend(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def on_client(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            sr, sw = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

        proxy = await asyncio.start_server(on_client, "127.0.0.1", 0)
        pport = proxy.sockets[0].getsockname()[1]
        try:
            via = f"tcp://127.0.0.1:{pport}" + (host.address[len(endpoint):] if encrypted else "")
            w.connect(SOURCE, via)
            w.send(SOURCE, Activations(request_id=5, stage=1, num_tokens=16, sent_at=0.0, tensors=(tensor,)))
            w.send(SOURCE, Cancel(request_id=5, reason=marker.decode()))
            await wait_until_async(lambda: len(got) == 2)
            assert np.array_equal(np.asarray(got[0].tensors[0]), tensor)  # it did cross, and decoded
        finally:
            proxy.close()
            await w.close()
            await host.close()

    run(main)
    seen = bytes(captured)
    tensor_bytes = tensor.tobytes()
    windows = [tensor_bytes[i : i + 32] for i in range(0, len(tensor_bytes) - 32, 512)]
    found = sum(1 for win in windows if win in seen)
    if encrypted:
        assert found == 0 and marker not in seen and b"CURVE" in seen  # only the mechanism's name is clear
    else:
        assert found == len(windows) and marker in seen  # the control: the same check does see plaintext


def test_processes_serve_over_curve_and_refuse_a_stranger(keys: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from helix_async.cluster import load_cluster
    from helix_async.placement import Placement
    from helix_async.runtime.host_main import HostServer

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    stranger = tmp_path / "stranger"
    generate_keys(stranger, 1)
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", {0: (0, 4), 1: (4, 8)})
    procs: list[subprocess.Popen[bytes]] = []

    def worker(*args: str) -> None:
        procs.append(subprocess.Popen([sys.executable, "-m", "helix_async", "worker", *args, "--executor", "null"],
                                      cwd=root, env=env))

    async def main() -> tuple[list[int], int, int]:
        server = HostServer(placement, curve=load_keys(keys, "host"))
        address = await server.start()
        assert "#curve=" in address
        worker("--connect", address, "--node-id", "0", "--keys", str(keys))
        worker("--connect", address, "--node-id", "1", "--keys", str(keys))
        await server.wait_ready(180)
        tokens = await server.complete([1, 2, 3], 5)
        registrations = server.counters.registrations
        worker("--connect", address, "--node-id", "0", "--keys", str(stranger))  # a key not in allowed/
        await wait_until_async(lambda: server.tp.stats.auth_failures >= 1, what="the stranger refused")
        # (a refused handshake ends that connection before any message, and ZeroMQ does not retry
        # it); the cluster still serves, and no registration came in the meantime
        tokens_after = await server.complete([1, 2, 3], 5)
        assert tokens_after == tokens
        refused, later = server.tp.stats.auth_failures, server.counters.registrations - registrations
        await server.shutdown("test done", grace=0.5)
        return tokens, refused, later

    try:
        tokens, refused, later = asyncio.run(main())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    assert len(tokens) == 5 and refused >= 1 and later == 0


def test_plaintext_links_off_this_machine_need_insecure() -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    p = subprocess.run([sys.executable, "-m", "helix_async", "worker", "--connect", "tcp://10.9.8.7:5555", "--executor",
                        "null"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--connect: tcp://10.9.8.7:5555 leaves this machine: give --keys DIR" in p.stderr
    assert "--insecure" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_plaintext_on_loopback_takes_an_explicit_insecure() -> None:
    from helix_async.transport.curve import security

    with pytest.raises(ConfigError, match="--keys: tcp://127.0.0.1:5555 is a plaintext link: give --keys DIR"):
        security(None, "host", [("--listen", "tcp://127.0.0.1:5555")], False)
    assert security(None, "host", [("--listen", "tcp://127.0.0.1:5555")], True) is None


def test_keys_for_a_run_are_private_and_removed_at_its_end(tmp_path: Path) -> None:
    import stat

    from helix_async.transport.curve import key_bindings, key_files, run_keys, write_key_files

    with run_keys(2) as d:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        # what a worker's machine needs, copied there: its own pair, the host's public key, the allow-list
        copy = write_key_files(tmp_path / "copy", key_files(d, "worker-1"))
        assert sorted(p.name for p in Path(copy).glob("*.key*")) == ["host.key", "worker-1.key", "worker-1.key_secret"]
        assert stat.S_IMODE(os.stat(Path(copy) / "worker-1.key_secret").st_mode) == 0o600
        mine = load_keys(copy, "worker-1")
        assert load_keys(d, "worker-1") == CurveKeys(mine.public, mine.secret, d + "/allowed", mine.default_server)
        assert key_bindings(mine.allowed_dir)[mine.public] == 1 and "host" in key_bindings(mine.allowed_dir).values()
    assert not Path(d).exists()
