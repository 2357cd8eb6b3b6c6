"""The torch executor against Hugging Face ``transformers`` (the oracle), on the virtual loop.

A tiny LLaMA is made with ``transformers`` (random init, ``save_pretrained`` into a temp dir); three
workers each load their layer range of that checkpoint and serve it through the same host and
worker classes as the simulator, over the in-memory network.  Every request's tokens must equal
``generate``'s greedy tokens for the same prompt on the same weights.  (The runtime test does the
same over ZeroMQ in separate processes.)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_oracle import hf_greedy, hf_last_logits, make_checkpoint  # noqa: E402

from helix_async.clock import LoopClock  # noqa: E402
from helix_async.cluster.defaults import DEFAULT_MACHINE_TYPES  # noqa: E402
from helix_async.cluster.spec import ClusterSpec, Link, Node  # noqa: E402
from helix_async.executors import llama  # noqa: E402
from helix_async.executors.base import Batch, ExecFailure  # noqa: E402
from helix_async.executors.llama import LlamaConfig, ModelLoadError, SeqCache, dummy_stage, load_stage  # noqa: E402
from helix_async.executors.sampling import RequestSampler  # noqa: E402
from helix_async.executors.torch import TorchExecutor  # noqa: E402
from helix_async.host import Host  # noqa: E402
from helix_async.ids import SINK, SOURCE, NodeRef  # noqa: E402
from helix_async.messages import DecodeWork, PromptWork  # noqa: E402
from helix_async.routing import FlowRouter, KVTracker  # noqa: E402
from helix_async.settings import WorkerSettings  # noqa: E402
from helix_async.transport import HOST  # noqa: E402
from helix_async.transport.memory import MemoryNetwork  # noqa: E402
from helix_async.vloop import VirtualTimeLoop  # noqa: E402
from helix_async.worker import BatchLimits, Worker  # noqa: E402

LAYERS = 6
STAGES = [(0, 2), (2, 4), (4, 6)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_checkpoint(d, 1234, vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    yield d, model


class Delayed:
    """The torch executor computed inline, its ``done`` 10 ms of virtual time later (so that
    requests pile up and batches mix prompts and decodes); records each batch's make-up."""

    def __init__(self, clock: LoopClock, inner: TorchExecutor, log: list[tuple[int, int, int]]) -> None:
        self.clock = clock
        self.inner = inner
        self.log = log
        self.release = inner.release

    def run(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        self.log.append((batch.layer, batch.prompt_requests, batch.decode_seqs))
        self.inner.run(batch, lambda b: self.clock.call_at(self.clock.now() + 0.01, done, b))

    def duration(self, batch: Batch) -> float:
        return 0.01


def chain(loop: VirtualTimeLoop, ckpt: Path, dtype: str = "float32") -> tuple[Host, list[Worker], list[Any]]:
    clock = LoopClock(loop)
    t = DEFAULT_MACHINE_TYPES["A100"]
    nodes = tuple(Node(i, "A100") for i in range(3))
    arcs: list[tuple[NodeRef, NodeRef]] = [(SOURCE, 0), (0, 1), (1, 2), (2, SINK)]
    spec = ClusterSpec("tiny", {"A100": t}, nodes, tuple(Link(a, b, 1e9, 0.002, False) for a, b in arcs))
    net = MemoryNetwork(clock, spec, arcs, lambda s, d, m: 0.0)
    ranges = dict(enumerate(STAGES))
    kv = KVTracker({i: 10**6 for i in ranges}, ranges, kv_fill_limit=1.0, output_ratio=0.0, avg_output_len=0,
                   num_layers=LAYERS)
    links: dict[NodeRef, list[tuple[NodeRef, float]]] = {SOURCE: [(0, 1.0)], 0: [(1, 1.0)], 1: [(2, 1.0)], 2: [(SINK, 1.0)]}
    router = FlowRouter(ranges, links, {i: 1000 for i in ranges}, kv, LAYERS)
    workers = []
    execs = []
    for i, (a, b) in ranges.items():
        ex = TorchExecutor(clock, load_stage(ckpt, a, b, dtype=dtype), threaded=False)
        log: list[tuple[int, int, int]] = []
        w = Worker(i, clock, net.endpoint(i), Delayed(clock, ex, log),
                   WorkerSettings(layers=(a, b), num_layers=LAYERS, limits=BatchLimits(8, 512, 16, 10**6),
                                  kv_capacity=10**7, activation_bytes=128))
        w.start()
        workers.append(w)
        execs.append((ex, log))
    host = Host(clock, net.endpoint(HOST), router=router)
    host.start()
    return host, workers, execs


def test_three_workers_produce_hf_greedy_tokens_with_mixed_batches(
    loop: VirtualTimeLoop, checkpoint: tuple[Path, Any]
) -> None:
    ckpt, model = checkpoint
    host, workers, execs = chain(loop, ckpt)
    got: dict[int, list[int]] = {}
    done: list[int] = []
    host.on_token = lambda q, tok, last: got.setdefault(q.qid, []).append(tok)
    host.on_query_done = lambda q: done.append(q.qid)
    lengths = [1, 2, 5, 17, 33, 64, 9, 3]
    prompts = {i: [(7 * i + 13 * j + 1) % 256 for j in range(n)] for i, n in enumerate(lengths)}
    outs = {i: 6 + (i % 3) * 5 for i in prompts}
    for i, p in prompts.items():
        loop.run_until(0.013 * i)  # staggered: later prompts meet earlier requests' decodes
        assert host.submit(i, len(p), outs[i], tuple(p)) is not None
    loop.run_until(60.0)
    assert sorted(done) == sorted(prompts)
    for i, p in prompts.items():
        assert got[i] == hf_greedy(model, p, outs[i]), f"query {i} (prompt of {len(p)} tokens)"
    # prompts and decodes did share batches, and every KV cache was released
    mixed = [e for _, log in execs for e in log if e[1] and e[2]]
    assert mixed
    assert all(ex.cached_requests == 0 for ex, _ in execs)
    assert all(w.kv_used == 0 for w in workers)
    assert host.stats.failed == 0 and host.stats.finished == len(prompts)


def test_a_bad_token_id_fails_only_its_request(loop: VirtualTimeLoop, checkpoint: tuple[Path, Any]) -> None:
    ckpt, model = checkpoint
    host, workers, execs = chain(loop, ckpt)
    failed: list[tuple[int, str]] = []
    host.on_fail = lambda q: failed.append((q.qid, q.error))
    got: dict[int, list[int]] = {}
    host.on_token = lambda q, tok, last: got.setdefault(q.qid, []).append(tok)
    host.submit(0, 3, 4, (5, 6, 7))
    host.submit(1, 2, 4, (5, 999))  # outside the 256-token vocabulary
    loop.run_until(30.0)
    assert failed and failed[0][0] == 1 and "vocabulary" in failed[0][1] and "node 0" in failed[0][1]
    assert got[0] == hf_greedy(model, [5, 6, 7], 4) and 1 not in got
    assert host.stats.failed == 1 and host.stats.finished == 1 and host.active == 0
    assert workers[0].stats.failed == 1
    assert all(ex.cached_requests == 0 for ex, _ in execs)


def test_wrong_hidden_state_shape_fails_the_request_not_the_worker(loop: VirtualTimeLoop, checkpoint: tuple[Path, Any]) -> None:
    ckpt, _ = checkpoint
    clock = LoopClock(loop)
    ex = TorchExecutor(clock, load_stage(ckpt, 2, 4), threaded=False)
    msg = PromptWork(request_id=1, query_id=1, route=((0, 0, 2), (1, 2, 4)), stage=1, num_tokens=3, token_ids=(),
                     max_tokens=2, sent_at=0.0, tensors=(torch.zeros(3, 7),))

    class It:
        rid, tokens, ctx, prompt, data = 1, 3, 0, True, None

    it = It()
    it.msg = msg  # type: ignore[attr-defined]
    batch = Batch(2, [it], 1, 3, 0, 0, 0)
    seen: list[Batch] = []
    ex.run(batch, seen.append)
    loop.run_until(1.0)
    assert seen == [batch] and isinstance(it.data, ExecFailure) and "(3, 64)" in it.data.reason


def test_float64_and_dummy_weights(checkpoint: tuple[Path, Any]) -> None:
    ckpt, model = checkpoint
    st = load_stage(ckpt, 0, LAYERS, dtype="float64")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ref = model.double()(torch.tensor([ids])).logits[0, -1]
        model.float()
        cache = SeqCache()
        x = st.embed_tokens(ids)
        for i in range(LAYERS):
            x = st.layer(i, x, [(0, len(ids))], [cache], [16])
        ours = st.logits(x[-1:])[0]
    assert float((ref.float() - ours).abs().max()) < 1e-5
    cfg = LlamaConfig.from_dir(ckpt)
    a = dummy_stage(cfg, 2, 4, seed=3)
    b = dummy_stage(cfg, 2, 4, seed=3)
    c = dummy_stage(cfg, 2, 4, seed=4)
    assert torch.equal(a.layers[3].q, b.layers[3].q) and not torch.equal(a.layers[3].q, c.layers[3].q)
    assert a.embed is None and a.lm_head is None
    assert dummy_stage(cfg, 4, 6).lm_head is not None and dummy_stage(cfg, 0, 1).embed is not None


def test_sampling_is_seeded_and_top_p_restricts() -> None:
    from helix_async.sampling import SamplingParams

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    a = [RequestSampler(SamplingParams(temperature=1.0, seed=7), 4).choose(logits) for _ in range(1)]
    s1, s2 = (RequestSampler(SamplingParams(temperature=1.0, seed=7), 4) for _ in range(2))
    assert [s1.choose(logits) for _ in range(20)] == [s2.choose(logits) for _ in range(20)]
    narrow = RequestSampler(SamplingParams(temperature=1.0, top_p=0.3, seed=1), 4)
    assert {narrow.choose(logits) for _ in range(50)} == {1}
    assert RequestSampler(SamplingParams(), 4).choose(logits) == 1 and a[0] in range(4)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)


def test_bad_checkpoints_name_the_file_and_field(tmp_path: Path, checkpoint: tuple[Path, Any]) -> None:
    with pytest.raises(ModelLoadError, match="config.json: no such file"):
        LlamaConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="config.json: num_hidden_layers: missing"):
        LlamaConfig.from_dir(tmp_path)
    ckpt, _ = checkpoint
    with pytest.raises(ModelLoadError, match=r"layers \[4, 9\)"):
        load_stage(ckpt, 4, 9)
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_stage(tmp_path, 0, 2)


def test_decode_messages_carry_token_ids_and_hidden_states(loop: VirtualTimeLoop, checkpoint: tuple[Path, Any]) -> None:
    """What travels: token ids into the first stage, hidden states (tokens, hidden) between
    stages, token ids back (seen on a recording of the network's sends)."""
    ckpt, _ = checkpoint
    host, workers, _ = chain(loop, ckpt)
    seen: list[tuple[str, Any]] = []
    for w in workers:
        send = w._send

        def rec(dest: NodeRef, msg: Any, send: Any = send, node: int = w.node_id) -> None:
            seen.append((f"{node}->{dest}", msg))
            send(dest, msg)

        w._send = rec
    host.submit(0, 4, 2, (1, 2, 3, 4))
    loop.run_until(10.0)
    kinds = [(k, type(m).__name__, tuple(m.tensors[0].shape) if getattr(m, "tensors", ()) else None) for k, m in seen]
    assert ("0->1", "PromptWork", (4, 64)) in kinds and ("1->2", "DecodeWork", (1, 64)) in kinds
    assert any(k == f"2->{SINK}" and t == "TokenResult" for k, t, _ in kinds)
    assert all(not isinstance(m, DecodeWork) or m.payload_bytes == 0 for _, m in seen)


def test_a_shortened_run_of_layers_stops_where_it_says(checkpoint: tuple[Path, Any]) -> None:
    """Threaded, a run of 4 layers cut short right after it starts: ``done`` comes with
    ``batch.layers`` lowered to what ``shorten`` returned, and the hidden states are those of
    exactly that many layers."""
    import asyncio

    ckpt, _ = checkpoint
    st = load_stage(ckpt, 0, 4)
    ids = (3, 1, 4, 1, 5)
    msg = PromptWork(request_id=1, query_id=1, route=((0, 0, 4), (1, 4, 6)), stage=0, num_tokens=5, token_ids=ids,
                     max_tokens=2, sent_at=0.0)

    class It:
        rid, tokens, ctx, prompt, data = 1, 5, 0, True, None

    async def main() -> tuple[int, int, Any]:
        ex = TorchExecutor(LoopClock(), st, threaded=True)
        it = It()
        it.msg = msg  # type: ignore[attr-defined]
        batch = Batch(0, [it], 1, 5, 0, 0, 0)
        batch.layers = 4
        fut: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
        ex.run(batch, fut.set_result)
        k = ex.shorten(batch, 1)
        await asyncio.wait_for(fut, 30)
        ex.close()
        return k, batch.layers, it.data

    k, layers, data = asyncio.run(main())
    assert 1 <= k <= 4 and layers == k
    with torch.no_grad():
        x = st.embed_tokens(list(ids))
        for i in range(k):
            x = st.layer(i, x, [(0, 5)], [SeqCache()], [8])
    assert torch.equal(data, x)


def test_sampled_tokens_follow_the_seed(loop: VirtualTimeLoop, checkpoint: tuple[Path, Any]) -> None:
    """temperature/top_p/seed travel with the prompt to the last stage: the same seed gives the same
    tokens, another seed other tokens, and greedy is unchanged."""
    ckpt, model = checkpoint
    host, _, execs = chain(loop, ckpt)
    got: dict[int, list[int]] = {}
    host.on_token = lambda q, tok, last: got.setdefault(q.qid, []).append(tok)
    prompt = (9, 8, 7, 6)
    host.submit(0, 4, 12, prompt, (1.5, 0.95, 7))
    host.submit(1, 4, 12, prompt, (1.5, 0.95, 7))
    host.submit(2, 4, 12, prompt, (1.5, 0.95, 8))
    host.submit(3, 4, 12, prompt)
    loop.run_until(30.0)
    assert got[0] == got[1] and got[0] != got[2]
    assert got[3] == hf_greedy(model, list(prompt), 12) != got[0]
    assert all(ex.cached_requests == 0 and not ex._sampling for ex, _ in execs)


# ---- the families, token for token against transformers -------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
#: case -> (family, bias deviation, config fields); head_dim 16 with theta 1e4 puts the rotary
#: wavelengths (6.3 .. 19,869 positions) on all three sides of llama3's 16 / 64 thresholds
FAMILY_CASES = {
    "llama3-rope": ("llama", 0.0, {"rope_scaling": LLAMA3_ROPE, "rope_theta": 10000.0}),
    "llama-attention-and-mlp-bias": ("llama", 0.5, {"attention_bias": True, "mlp_bias": True}),
    "qwen2-qkv-bias": ("qwen2", 0.5, {}),
    "llama-tied-embeddings": ("llama", 0.0, {"tie_word_embeddings": True}),
    "mistral": ("mistral", 0.0, {}),
    # a head of more than 2 x HEAD_ROWS rows: on CPU it is computed in pieces
    "llama-tied-large-vocab": ("llama", 0.0, {"tie_word_embeddings": True, "vocab_size": 2500}),
}


def staged_greedy(stages: list[Any], prompts: list[list[int]], steps: list[int], join: list[int],
                  reserve: int | None = None) -> tuple[list[list[int]], list[Any]]:
    """Greedy tokens of every prompt through ``stages`` (consecutive layer ranges) driven batch by
    batch the way the executor does it: sequence ``i`` enters at batch ``join[i]`` with its whole
    prompt, packed with the others' prompts and one-token decodes, and leaves (its KV handles
    dropped, which frees its slots) after ``steps[i]`` tokens. ``reserve``: the capacity hint
    (default: prompt plus steps). Returns the tokens and each sequence's logits at its prompt's
    last position."""
    caches: list[list[Any]] = [[SeqCache() for _ in prompts] for _ in stages]
    toks: list[list[int]] = [[] for _ in prompts]
    first: list[Any] = [None] * len(prompts)
    step = 0
    with torch.inference_mode():
        while any(len(t) < n for t, n in zip(toks, steps, strict=True)):
            live = [i for i in range(len(prompts)) if join[i] <= step and len(toks[i]) < steps[i]]
            ids: list[int] = []
            spans: list[tuple[int, int]] = []
            for i in live:
                if toks[i]:
                    ids.append(toks[i][-1])
                    spans.append((len(prompts[i]) + len(toks[i]) - 1, 1))
                else:
                    ids.extend(prompts[i])
                    spans.append((0, len(prompts[i])))
            if live:
                res = [reserve or len(prompts[i]) + steps[i] for i in live]
                x = stages[0].embed_tokens(ids)
                for st, cs in zip(stages, caches, strict=True):
                    mine = [cs[i] for i in live]
                    for layer in range(st.start, st.end):
                        x = st.layer(layer, x, spans, mine, res)
                ends = list(itertools.accumulate(n for _, n in spans))
                logits = stages[-1].logits(x[[e - 1 for e in ends]])
                for j, i in enumerate(live):
                    if not toks[i]:
                        first[i] = logits[j]
                    toks[i].append(int(logits[j].argmax()))
                    if len(toks[i]) == steps[i]:
                        for cs in caches:
                            cs[i] = None  # the sequence is done: its KV slots are freed
            step += 1
    return toks, first


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_each_family_equals_transformers_token_for_token(tmp_path: Path, case: str) -> None:
    """Llama 3.1's RoPE scaling, LLaMA's attention and MLP biases, Qwen2's q/k/v biases, a tied
    LM head and Mistral: two stages of a tiny random model (prompts of 1, 6 and 19 tokens, the
    last joining while the others decode) give transformers' greedy tokens, and the prompts'
    last logits agree to 1e-4.  Each feature is first shown to change transformers' own output,
    so the comparison can fail when the math leaves it out."""
    family, bias_std, fields = FAMILY_CASES[case]
    model = make_checkpoint(tmp_path, 11, family, bias_std, **{**SMALL, **fields})
    prompts = [[(5 * i + 3 * j + 2) % 128 for j in range(n)] for i, n in enumerate((6, 1, 19))]
    if case == "llama3-rope":
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=512, **SMALL)).eval()
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(hf_last_logits(plain, prompts[2]), hf_last_logits(model, prompts[2]), atol=1e-3)
        ours = load_stage(tmp_path, 0, 2)._inv_freq
        assert torch.equal(ours, model.model.rotary_emb.inv_freq)  # the same frequencies, to the bit
    if bias_std:
        unbiased = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in unbiased.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
        assert not torch.allclose(hf_last_logits(unbiased, prompts[2]), hf_last_logits(model, prompts[2]), atol=1e-3)
    stages = [load_stage(tmp_path, 0, 2), load_stage(tmp_path, 2, 4)]
    if fields.get("tie_word_embeddings"):
        assert stages[1].embed is None and stages[1].lm_head is not None
    assert bool(stages[1]._head_pieces) == (case == "llama-tied-large-vocab")
    toks, first = staged_greedy(stages, prompts, [8, 8, 8], join=[0, 0, 3])
    for i, p in enumerate(prompts):
        assert float((first[i] - hf_last_logits(model, p)).abs().max()) < 1e-4, f"prompt {i}"
        assert toks[i] == hf_greedy(model, p, 8), f"prompt {i} ({len(p)} tokens)"


def test_dummy_weights_carry_the_configs_biases() -> None:
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=4, qkv_bias=True, mlp_bias=True)
    w = dummy_stage(cfg, 0, 2, seed=1).layers[1]
    assert w.q_bias is not None and w.q_bias.shape == (16,) and w.v_bias is not None and w.v_bias.shape == (8,)
    assert w.gate_bias is not None and w.down_bias is not None and w.down_bias.shape == (16,) and w.o_bias is None
    assert float(w.q_bias.abs().sum()) > 0
    plain = dummy_stage(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=4), 0, 2, seed=1).layers[1]
    assert plain.q_bias is None and plain.gate_bias is None


@pytest.mark.parametrize("rows_per_seq", [0, 2, 1000], ids=["always-gather", "default", "always-view"])
def test_the_kv_slab_grows_reuses_slots_and_reads_unordered_batches(
        checkpoint: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch, rows_per_seq: int) -> None:
    """Twelve sequences through two stages of the tiny LLaMA, joining and leaving at different
    steps, with a capacity hint of one position: the slab grows past its first 8 slots and its
    first capacity, later sequences take freed slots out of batch order (so decode batches read
    their slots gathered, or as a view of a range of rows holding other sequences' and unwritten
    slots between theirs), and every sequence's tokens are still transformers' greedy ones,
    although the slab's unwritten memory is NaN. Dropping the handles frees every slot."""
    monkeypatch.setattr(llama, "RANGE_ROWS_PER_SEQ", rows_per_seq)
    seen = {"gather": 0, "view": 0, "view with rows between or out of order": 0}
    plan_init = llama._Plan.__init__

    def counting_init(self: Any, *args: Any) -> None:
        plan_init(self, *args)
        if self.batched:
            key = "gather" if self.rows is None else "view" if self.sel is None else "view with rows between or out of order"
            seen[key] += 1

    monkeypatch.setattr(llama._Plan, "__init__", counting_init)
    ckpt, model = checkpoint
    stages = [load_stage(ckpt, 0, 3), load_stage(ckpt, 3, LAYERS)]
    prompts = [[(11 * i + 7 * j + 3) % 256 for j in range(2 + (5 * i) % 9)] for i in range(12)]
    steps = [3 + (i * 7) % 10 for i in range(12)]  # prompt + steps up to 22: past the first 16 positions
    join = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 4, 5]
    for st in stages:  # uninitialised memory may hold anything: make it NaN, which must never reach a token
        st.kv._resize(8, 16)
        for t in (*st.kv.k.values(), *st.kv.v.values()):
            t.fill_(float("nan"))
    toks, _ = staged_greedy(stages, prompts, steps, join, reserve=1)
    for i, p in enumerate(prompts):
        assert toks[i] == hf_greedy(model, p, steps[i]), f"sequence {i}"
    for st in stages:
        assert st.kv.slots == 16 and st.kv.capacity == 32  # both doubled once
        assert st.kv.used_slots == 0
    if rows_per_seq == 0:
        assert seen["view"] == seen["view with rows between or out of order"] == 0 and seen["gather"] > 0
    elif rows_per_seq == 1000:
        assert seen["gather"] == 0 and seen["view with rows between or out of order"] > 0
    else:
        assert seen["view with rows between or out of order"] > 0 and seen["view"] > 0
