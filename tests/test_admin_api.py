"""The operator's endpoints (``host --admin-key``; docs/migration.md, "Retiring a node on the
operator's word"): who may call them and what a bad call gets, on a real host that is not serving
yet (no worker has registered). The retirement itself, over worker processes, is in
test_runtime_migration.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("aiohttp")

import aiohttp  # noqa: E402
from test_runtime import run  # noqa: E402

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.frontend.openai_api import OpenAIServer  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.runtime.host_main import HostServer  # noqa: E402
from helix_async.settings import HostSettings  # noqa: E402

STAGES = {0: (0, 4), 1: (4, 8), 2: (4, 8)}
KEY = {"Authorization": "Bearer the-operator"}


async def _calls(admin_key: str | None, calls: list[tuple[str, str, Any, dict[str, str]]]) -> list[tuple[int, Any]]:
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", STAGES)
    server = HostServer(placement, settings=HostSettings())
    await server.start()
    api = OpenAIServer(server, "tiny-llama", None, max_model_len=256, admin_key=admin_key)
    url = await api.start("127.0.0.1", 0)
    out = []
    try:
        async with aiohttp.ClientSession() as http:
            for method, path, body, headers in calls:
                data = body if isinstance(body, bytes) else None
                js = None if isinstance(body, bytes) else body
                async with http.request(method, url + path, json=js, data=data, headers=headers) as r:
                    text = await r.text()
                    out.append((r.status, text))
        out.append((api.admin_refused, server.counters.drained))
    finally:
        await server.shutdown("test done", grace=0.0)
        await api.stop()
    return out


def test_only_the_admin_key_opens_the_admin_endpoints() -> None:
    wrong = {"Authorization": "Bearer the-operatorX"}
    res = run(_calls("the-operator", [
        ("GET", "/admin/nodes", None, {}),
        ("HEAD", "/admin/nodes", None, {}),
        ("POST", "/admin/retire", {"node": 1}, wrong),
        ("POST", "/admin/retire", {"node": 1}, {"Authorization": "the-operator"}),
        ("GET", "/admin/nodes", None, KEY),
    ]))
    statuses = [s for s, _ in res[:-1]]
    assert statuses == [401, 401, 401, 401, 200]
    assert '"invalid_admin_key"' in res[0][1]
    nodes = json.loads(res[4][1])["nodes"]
    assert [(n["node"], n["layers"], n["state"]) for n in nodes] == [(0, [0, 4], "waiting"), (1, [4, 8], "waiting"),
                                                                    (2, [4, 8], "waiting")]
    assert res[-1] == (4, 0)  # four refused and counted; nothing drained


def test_a_bad_retire_is_refused_with_its_reason_and_changes_nothing() -> None:
    res = run(_calls("the-operator", [
        ("POST", "/admin/retire", {"node": True}, KEY),
        ("POST", "/admin/retire", {"node": 1, "model": "tiny-llama"}, KEY),
        ("POST", "/admin/retire", {"node": 1.0}, KEY),
        ("POST", "/admin/retire", [1], KEY),
        ("POST", "/admin/retire", b"{not json", KEY),
        ("POST", "/admin/retire", {"node": 9}, KEY),
        ("POST", "/admin/retire", {"node": 1}, KEY),  # a node of the plan, but the cluster is not serving yet
    ]))
    statuses = [s for s, _ in res[:-1]]
    assert statuses == [400, 400, 400, 400, 400, 404, 503]
    assert "is not in the plan" in res[5][1]
    assert "not serving" in res[6][1]
    assert res[-1] == (0, 0)


def test_without_an_admin_key_there_are_no_admin_endpoints() -> None:
    res = run(_calls(None, [("GET", "/admin/nodes", None, KEY), ("POST", "/admin/retire", {"node": 1}, KEY)]))
    assert [s for s, _ in res[:-1]] == [404, 404]
