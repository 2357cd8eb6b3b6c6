"""Live KV migration with real tensors (docs/migration.md): torch workers on a virtual loop.

A tiny LLaMA checkpoint is split over nodes 0 [0, 2), 1 and 3 [2, 4), 2 and 4 [4, 6). Queries are
moved mid-decode, a middle stage between nodes 1 and 3 and a last stage between nodes 2 and 4,
in several pre-copy rounds (chunks of 3 positions). Every query's greedy tokens must equal
transformers' ``generate`` and the same run without migration; the sources must hold nothing of
the moved queries afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_oracle import hf_greedy, make_checkpoint  # noqa: E402

from helix_async.clock import LoopClock  # noqa: E402
from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES  # noqa: E402
from helix_async.cluster.spec import ClusterSpec, Link, Node  # noqa: E402
from helix_async.executors.llama import load_stage  # noqa: E402
from helix_async.executors.torch import TorchExecutor  # noqa: E402
from helix_async.host import Host  # noqa: E402
from helix_async.ids import SINK, SOURCE, NodeRef  # noqa: E402
from helix_async.routing import FlowRouter, KVTracker  # noqa: E402
from helix_async.settings import WorkerSettings  # noqa: E402
from helix_async.transport import HOST  # noqa: E402
from helix_async.transport.memory import MemoryNetwork  # noqa: E402
from helix_async.vloop import VirtualTimeLoop  # noqa: E402
from helix_async.worker import BatchLimits, Worker, WorkerPy  # noqa: E402

LAYERS = 6
RANGES = {0: (0, 2), 1: (2, 4), 3: (2, 4), 2: (4, 6), 4: (4, 6)}
PLAN = [(SOURCE, 0), (0, 1), (0, 3), (1, 2), (1, 4), (3, 2), (3, 4), (2, SINK), (4, SINK)]
PROMPTS = [[5, 9, 5, 9, 17, 33, 2, 8], [40, 41, 42, 43, 44], [7] * 11, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
NEW = 20
#: the node that takes over from each node of a pair
OTHER = {1: 3, 3: 1, 2: 4, 4: 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    d = tmp_path_factory.mktemp("tiny-llama-migration")
    model = make_checkpoint(d, 2468, vocab_size=96, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    yield d, model


def serve(ckpt: Path, worker_cls: type, migrate: bool) -> tuple[dict[int, list[int]], Host, dict[int, Any]]:
    """Every prompt through the cluster; with ``migrate``, each query's middle stage (after its 3rd
    token) and last stage (after its 9th) move to the other node holding those layers."""
    loop = VirtualTimeLoop()
    try:
        clock = LoopClock(loop)
        t = DEFAULT_MACHINE_TYPES["A100"]
        copy = [(1, 3), (3, 1), (2, 4), (4, 2)]
        spec = ClusterSpec("pairs", {"A100": t}, tuple(Node(i, "A100") for i in RANGES),
                           tuple(Link(a, b, 1e9, 0.002, False) for a, b in PLAN + copy))
        net = MemoryNetwork(clock, spec, PLAN, lambda s, d, m: 0.0)
        for u, v in copy:
            net.add_link(u, v)
        kv = KVTracker({i: 10**6 for i in RANGES}, RANGES, kv_fill_limit=1.0, output_ratio=0.0, avg_output_len=0,
                       num_layers=LAYERS)
        links: dict[NodeRef, list[tuple[NodeRef, float]]] = {}
        for u, v in PLAN:
            links.setdefault(u, []).append((v, 1.0))
        router = FlowRouter(RANGES, links, {i: 2048 for i in RANGES}, kv, LAYERS)
        workers = {}
        for i, (a, b) in RANGES.items():
            ex = TorchExecutor(clock, load_stage(ckpt, a, b), threaded=False)
            w = worker_cls(i, clock, net.endpoint(i), ex,
                           WorkerSettings(layers=(a, b), num_layers=LAYERS, limits=BatchLimits(8, 2048, 16, 10**6),
                                          kv_capacity=10**7, activation_bytes=128, migration_chunk=3,
                                          migration_tail=1))
            w.start()
            workers[i] = w
        host = Host(clock, net.endpoint(HOST), router=router)
        host.start()
        got: dict[int, list[int]] = {}

        def on_token(q: Any, tok: Any, last: bool) -> None:
            got.setdefault(q.qid, []).append(int(tok))
            n = len(got[q.qid])
            if migrate and n in (3, 9) and q.route is not None:
                stage = 1 if n == 3 else 2
                why = host.migrate(q.qid, stage, OTHER[q.route[stage][0]])
                assert why == "", why

        host.on_token = on_token
        for qid, p in enumerate(PROMPTS):
            host.submit(qid, len(p), NEW, tuple(p))
        loop.run_until(600.0)
        return got, host, workers
    finally:
        loop.close()


@pytest.mark.parametrize("worker_cls", [WorkerPy, Worker], ids=["pure", "compiled"])
def test_moved_queries_give_the_tokens_of_an_unmoved_run_and_of_transformers(
    checkpoint: tuple[Path, Any], worker_cls: type
) -> None:
    ckpt, model = checkpoint
    plain, _, _ = serve(ckpt, worker_cls, migrate=False)
    moved, host, workers = serve(ckpt, worker_cls, migrate=True)
    assert host.stats.finished == len(PROMPTS) and host.stats.failed == 0
    # every query moved twice: its middle stage, then its last
    assert host.stats.live_migrations == 2 * len(PROMPTS)
    assert host.stats.migrations_aborted == 0
    for qid, p in enumerate(PROMPTS):
        want = hf_greedy(model, p, NEW)
        assert plain[qid] == want
        assert moved[qid] == want, f"query {qid}"
    # several pre-copy rounds of 3 positions each, and the KV really went over the wire
    assert sum(w.stats.migrated_out for w in workers.values()) == 2 * len(PROMPTS)
    assert sum(w.stats.migrated_in for w in workers.values()) == 2 * len(PROMPTS)
    assert sum(w.stats.migrate_bytes for w in workers.values()) > 0
    for w in workers.values():
        assert w.kv_used == 0 and w.stats.bad_messages == 0
        assert w._executor.cached_requests == 0
    for _, _, _, _, began, held, resumed, upto in host.live_moves:
        assert began <= held <= resumed and upto > 0


def test_an_exported_chunk_imports_bit_for_bit(checkpoint: tuple[Path, Any]) -> None:
    """export_kv then import_kv on another executor of the same stage: the same keys and values."""
    ckpt, _ = checkpoint
    loop = VirtualTimeLoop()
    try:
        clock = LoopClock(loop)
        src = TorchExecutor(clock, load_stage(ckpt, 2, 4), threaded=False)
        dst = TorchExecutor(clock, load_stage(ckpt, 2, 4), threaded=False)
        slab = src.stage.kv
        from helix_async.executors.llama import SeqCache

        cache = src._caches[7] = SeqCache()
        slab.admit(cache, 10, 10)
        gen = torch.Generator().manual_seed(3)
        for layer in slab.layers:
            slab.k[layer][cache.slot, :, :10] = torch.randn(slab.kv_heads, 10, slab.head_dim, generator=gen)
            slab.v[layer][cache.slot, :, :10] = torch.randn(slab.kv_heads, 10, slab.head_dim, generator=gen)
        out: list[Any] = []
        src.export_kv(7, 0, 6, lambda tok, data: out.append(data), None)
        src.export_kv(7, 6, 4, lambda tok, data: out.append(data), None)
        loop.run_until(1.0)
        assert [a.shape for a in out] == [(2, 2, slab.kv_heads, 6, slab.head_dim), (2, 2, slab.kv_heads, 4, slab.head_dim)]
        errs: list[Any] = []
        dst.import_kv(7, 0, out[0], lambda tok, e: errs.append(e), None)
        dst.import_kv(7, 6, out[1], lambda tok, e: errs.append(e), None)
        loop.run_until(2.0)
        assert errs == [None, None]
        d = dst.stage.kv
        c = dst._caches[7]
        for layer in slab.layers:
            assert torch.equal(d.k[layer][c.slot, :, :10], slab.k[layer][cache.slot, :, :10])
            assert torch.equal(d.v[layer][c.slot, :, :10], slab.v[layer][cache.slot, :, :10])
        # what the target refuses: a chunk that does not start at 0 for a new request, a wrong shape
        dst.import_kv(8, 3, out[0], lambda tok, e: errs.append(e), None)
        dst.import_kv(9, 0, np.zeros((2, 2, 1, 3, 4), np.float32), lambda tok, e: errs.append(e), None)
        src.export_kv(5, 0, 2, lambda tok, data: errs.append(data), None)
        loop.run_until(3.0)
        assert "starts at position 3" in errs[2] and "shape" in errs[3]
        assert "holds no KV" in errs[4].reason
    finally:
        loop.close()
