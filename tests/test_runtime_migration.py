"""Live KV migration in the serving runtime: worker processes over ZeroMQ on loopback (docs/migration.md).

The plan holds a tiny LLaMA checkpoint on three worker processes: node 0 layers [0, 4), nodes 1
and 2 both [4, 8). Every request's second stage moves, with its KV, to the other node while it
decodes: the source dials the target at the address the host gives it and sends real key and
value tensors. Every request's greedy tokens must equal transformers' ``generate``.

The chaos case kills the target's process the moment it has reserved room (mid-copy): the
migration is called off and the request finishes where it was, with the same tokens.

Every process started is killed at the end; every wait is for a state, bounded only to fail
instead of hanging.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from collections.abc import Iterator  # noqa: E402

from hf_oracle import hf_greedy, make_checkpoint  # noqa: E402
from polling import wait_until_async  # noqa: E402
from test_runtime import Procs, plan_file, run  # noqa: E402

from helix_async.messages import MigrateState  # noqa: E402
from helix_async.model import get_model  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.settings import HostSettings  # noqa: E402

pytestmark = pytest.mark.slow

LAYERS = {0: (0, 4), 1: (4, 8), 2: (4, 8)}
OTHER = {1: 2, 2: 1}
PROMPTS = [[(31 * i + 7 * j + 3) % 2048 for j in range(n)] for i, n in enumerate([5, 17, 40, 9])]
NEW = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A checkpoint of the plan's model's shape (tiny-llama), randomly initialised."""
    spec = get_model("tiny-llama")
    d = tmp_path_factory.mktemp("tiny-llama-migration-ckpt")
    model = make_checkpoint(d, 77, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                            num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads)
    return d, model


@pytest.fixture
def processes() -> Iterator[Procs]:
    ps = Procs()
    try:
        yield ps
    finally:
        ps.close()


def test_requests_moved_between_worker_processes_give_hf_greedy_tokens(
    tmp_path: Path, tiny: tuple[Path, Any], processes: Procs
) -> None:
    ckpt, model = tiny
    _, placement = plan_file(tmp_path, LAYERS)

    async def main() -> tuple[list[list[int]], Any, list[Any]]:
        server = HostServer(placement)
        address = await server.start()
        for i in LAYERS:
            processes.worker(address, "--node-id", str(i), "--checkpoint", str(ckpt))
        await server.wait_ready(180)
        host = server.host
        assert host is not None
        refused: list[str] = []
        serve_token = host.on_token
        assert serve_token is not None

        def on_token(q: Any, tok: Any, last: bool) -> None:
            serve_token(q, tok, last)
            if q.iterations == 3 and q.route is not None:  # mid-decode: move its second stage
                why = host.migrate(q.qid, 1, OTHER[q.route[1][0]])
                if why:
                    refused.append(why)

        host.on_token = on_token

        async def one(p: list[int]) -> list[int]:
            return [t async for t in server.generate(p, NEW)]

        got = await asyncio.gather(*(one(p) for p in PROMPTS))
        stats = host.stats
        moves = list(host.live_moves)
        assert not refused, refused
        assert not host.aborted_moves, host.aborted_moves
        await server.shutdown("test done", grace=1.0)
        return list(got), stats, moves

    got, stats, moves = run(main())
    for p, out in zip(PROMPTS, got, strict=True):
        assert out == hf_greedy(model, p, NEW), f"prompt of {len(p)} tokens"
    assert stats.live_migrations == len(PROMPTS) and stats.migrations_aborted == 0 and stats.failed == 0
    for _, stage, source, target, began, held, resumed, upto in moves:
        assert stage == 1 and OTHER[source] == target and began <= held <= resumed and upto > 0


def test_a_target_killed_mid_copy_leaves_the_request_where_it_was(
    tmp_path: Path, tiny: tuple[Path, Any], processes: Procs
) -> None:
    ckpt, model = tiny
    _, placement = plan_file(tmp_path, LAYERS)
    prompt = [(13 * j + 1) % 2048 for j in range(30)]

    async def main() -> tuple[list[int], Any, Any, list[str]]:
        server = HostServer(placement)
        address = await server.start()
        ws = {i: processes.worker(address, "--node-id", str(i), "--checkpoint", str(ckpt)) for i in LAYERS}
        await server.wait_ready(180)
        host = server.host
        assert host is not None
        killed: list[int] = []
        status = host._move_status

        def spy(sender: Any, msg: Any) -> None:
            # the target has reserved its room: it dies before the copy can finish
            if msg.state == MigrateState.RESERVED and not killed:
                killed.append(sender)
                ws[sender].send_signal(signal.SIGKILL)
            status(sender, msg)

        host._move_status = spy  # type: ignore[method-assign]
        serve_token = host.on_token
        assert serve_token is not None
        why: list[str] = []

        def on_token(q: Any, tok: Any, last: bool) -> None:
            serve_token(q, tok, last)
            if q.iterations == 3 and q.route is not None:
                why.append(host.migrate(q.qid, 1, OTHER[q.route[1][0]]))

        host.on_token = on_token
        out = [t async for t in server.generate(prompt, NEW)]
        # the loss is noticed (heartbeats) and the flows re-planned around it
        await wait_until_async(lambda: server.counters.workers_lost == 1, what="the killed target noticed")
        stats, counters = host.stats, server.counters
        await server.shutdown("test done", grace=1.0)
        return out, stats, counters, why

    out, stats, counters, why = run(main())
    assert why == [""]
    assert out == hf_greedy(model, prompt, NEW)
    assert stats.live_migrations == 0 and stats.migrations_aborted == 1 and stats.failed == 0
    assert counters.workers_lost == 1


def test_a_sigterm_drains_the_worker_by_migration_without_recomputing(
    tmp_path: Path, tiny: tuple[Path, Any], processes: Procs
) -> None:
    """host --migration on: a worker told to stop (SIGTERM) hands every request's stage to the node
    holding the same layers, KV and all; none is re-prefilled, and the worker exits cleanly."""
    ckpt, model = tiny
    _, placement = plan_file(tmp_path, LAYERS)
    prompts = [[(19 * i + 5 * j + 2) % 2048 for j in range(6 + 3 * i)] for i in range(6)]
    new = 40

    async def main() -> tuple[list[list[int]], Any, Any, int | None]:
        server = HostServer(placement, settings=HostSettings(migration=True))
        address = await server.start()
        ws = {i: processes.worker(address, "--node-id", str(i), "--checkpoint", str(ckpt)) for i in LAYERS}
        await server.wait_ready(180)
        host = server.host
        assert host is not None

        serve_token = host.on_token
        assert serve_token is not None
        told: list[int] = []

        def on_token(q: Any, tok: Any, last: bool) -> None:
            serve_token(q, tok, last)
            # a request decodes, with most of its tokens to come: its second node is told to stop
            if not told and q.iterations == 3 and q.route is not None:
                told.append(q.route[-1][0])
                ws[told[0]].send_signal(signal.SIGTERM)

        host.on_token = on_token

        async def one(p: list[int]) -> list[int]:
            return [t async for t in server.generate(p, new)]

        got = await asyncio.gather(*(one(p) for p in prompts))
        assert told
        code = await asyncio.get_running_loop().run_in_executor(None, ws[told[0]].wait, 60)
        stats, counters = host.stats, server.counters
        await server.shutdown("test done", grace=1.0)
        return list(got), stats, counters, code

    got, stats, counters, code = run(main())
    for p, out in zip(prompts, got, strict=True):
        assert out == hf_greedy(model, p, new), f"prompt of {len(p)} tokens"
    assert counters.drained == 1 and code == 0
    assert stats.live_migrations >= 2 and stats.migrated == 0 and stats.failed == 0


def test_the_operator_retires_a_node_over_http_and_its_requests_move_live(
    tmp_path: Path, tiny: tuple[Path, Any], processes: Procs
) -> None:
    """``POST /admin/retire`` (host --admin-key): the node drains by live migration and stops,
    every greedy token equals transformers'; a node whose layers no other node holds, a node not
    in the plan, a bad body and a wrong key are refused, and nothing changes."""
    import aiohttp

    from helix_async.frontend.openai_api import OpenAIServer

    ckpt, model = tiny
    _, placement = plan_file(tmp_path, LAYERS)
    prompts = [[(23 * i + 3 * j + 1) % 2048 for j in range(5 + 4 * i)] for i in range(5)]
    new = 40
    admin = {"Authorization": "Bearer operator-key"}

    async def main() -> dict[str, Any]:
        server = HostServer(placement, settings=HostSettings(migration=True))
        address = await server.start()
        api = OpenAIServer(server, "tiny-llama", None, max_model_len=2048, admin_key="operator-key")
        url = await api.start("127.0.0.1", 0)
        ws = {i: processes.worker(address, "--node-id", str(i), "--checkpoint", str(ckpt)) for i in LAYERS}
        out: dict[str, Any] = {}
        try:
            await server.wait_ready(180)
            host = server.host
            assert host is not None
            async with aiohttp.ClientSession() as http:
                async def post(body: Any, headers: dict[str, str] = admin) -> tuple[int, Any]:
                    async with http.post(url + "/admin/retire", json=body, headers=headers) as r:
                        return r.status, await r.json()

                async with http.get(url + "/admin/nodes", headers={"Authorization": "Bearer nope"}) as r:
                    out["wrong_key"] = r.status
                async with http.get(url + "/admin/nodes", headers=admin) as r:
                    out["before"] = [n["state"] for n in (await r.json())["nodes"]]
                out["refused"] = [await post({"node": 0}), await post({"node": 7}), await post({"node": "1"}),
                                  await post({"node": 1}, {"Authorization": "Bearer nope"})]
                out["drained_before"] = server.counters.drained

                serve_token = host.on_token
                assert serve_token is not None
                told: list[asyncio.Task[tuple[int, Any]]] = []
                retired: list[int] = []

                def on_token(q: Any, tok: Any, last: bool) -> None:
                    serve_token(q, tok, last)
                    if not told and q.iterations == 3 and q.route is not None:
                        retired.append(q.route[-1][0])
                        told.append(asyncio.get_running_loop().create_task(post({"node": retired[0]})))

                host.on_token = on_token

                async def one(p: list[int]) -> list[int]:
                    return [t async for t in server.generate(p, new)]

                out["got"] = await asyncio.gather(*(one(p) for p in prompts))
                assert told
                out["accepted"] = await told[0]
                out["code"] = await asyncio.get_running_loop().run_in_executor(None, ws[retired[0]].wait, 60)
                out["again"] = await post({"node": retired[0]})
                async with http.get(url + "/admin/nodes", headers=admin) as r:
                    out["after"] = {n["node"]: n["state"] for n in (await r.json())["nodes"]}
                out["retired"] = retired[0]
            out["stats"], out["counters"] = host.stats, server.counters
        finally:
            await server.shutdown("test done", grace=1.0)
            await api.stop()
        return out

    out = run(main())
    assert out["wrong_key"] == 401
    assert out["before"] == ["serving"] * 3
    (s0, b0), (s7, _), (sbad, _), (skey, _) = out["refused"]
    assert (s0, s7, sbad, skey) == (409, 404, 400, 401)
    assert "[0, 4)" in b0["error"]["message"]  # the layers only node 0 holds
    assert out["drained_before"] == 0
    for p, got in zip(prompts, out["got"], strict=True):
        assert got == hf_greedy(model, p, new), f"prompt of {len(p)} tokens"
    status, body = out["accepted"]
    assert status == 202 and body == {"node": out["retired"], "state": "draining by live migration"}
    assert out["code"] == 0 and out["counters"].drained == 1
    assert out["again"][0] == 409
    assert out["after"][out["retired"]] == "left" and out["after"][0] == "serving"
    stats = out["stats"]
    assert stats.live_migrations >= 1 and stats.migrated == 0 and stats.failed == 0
