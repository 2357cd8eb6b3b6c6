"""Measure per-layer batch times with the torch executor's model code, in the shipped profile format.

``python -m helix_async profile --model M --device cpu|cuda`` runs a stage of ``layers`` decoder
layers of the model (its real layer code and shape, biases included, with seeded dummy weights: the
time does not depend on their values) on

* prompt batches of ``n`` tokens, as requests of at most ``prompt_len`` tokens each (the last one
  shorter), for ``n`` on a grid, and
* decode batches of ``s`` sequences, each with ``decode_ctx`` tokens already cached, and
* the model's head (final norm, LM head, greedy choice) on ``s`` sequences, once per batch,

and writes ``<gpu>_prompt.csv`` and ``<gpu>_decode.csv`` (``batch_tokens,time_per_layer_ms``, the
layout of the shipped GPU profiles, docs/original.md §3.2), ``<gpu>_head.csv`` (``sequences,time_ms``),
the node settings rows for that machine
type (``node_settings.csv``'s columns, §3.3) and ``profile.toml`` (the model's shape and how it was
measured), so the model can be planned and simulated on that machine like any profiled GPU
(docs/profiles.md, "Measured profiles").  A point is the time of the batch through the stage
divided by its layers: the median of ``repeats`` timed runs after one warm-up run.  With
``concurrent`` > 1 that many processes measure the same grid at the same time, each on its own
threads, so the cores are shared as that many serving workers share them.
This is a measurement tool: it reads the wall clock (``time.perf_counter``) or, with ``clock="cpu"``,
the measuring thread's CPU time (``time.thread_time``).
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import torch

from ..errors import ConfigError
from ..fileio import atomic_write_text, load_toml, read_text
from ..model import HEAD_COLUMNS, PROFILE_META, ModelSpec
from .llama import LlamaConfig, SeqCache, dummy_stage
from .sampling import sample

__all__ = ["CLOCKS", "DECODE_GRID", "PROMPT_GRID", "ProfileResult", "llama_config", "measure", "measure_concurrent",
           "measure_head", "node_settings_rows", "write_profile"]

PROMPT_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048)
DECODE_GRID = (1, 2, 4, 8, 16, 32, 64, 128)


def llama_config(spec: ModelSpec) -> LlamaConfig:
    """The decoder shape of a model spec: its ``arch`` when it was read from files (biases, RoPE
    scaling, tied head as the checkpoint says), else the named spec's fields."""
    if spec.arch is not None:
        return LlamaConfig.from_arch(spec.arch)
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_attention_heads,
        num_kv_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
    )


@dataclass(frozen=True)
class ProfileResult:
    """Measured seconds per layer: ``prompt[(tokens, s)]`` and ``decode[(seqs, s)]``, and how:
    device, dtype, torch threads per process, processes measuring at once, timed runs per point,
    the request length of the prompt batches and the cached context of the decodes (tokens), and
    the layers a batch ran through per timed run, and the clock (``wall`` or ``cpu``)."""

    gpu: str
    prompt: tuple[tuple[int, float], ...]
    decode: tuple[tuple[int, float], ...]
    device: str
    threads: int
    dtype: str = "float32"
    concurrent: int = 1
    repeats: int = 5
    prompt_len: int = 128
    decode_ctx: int = 128
    layers: int = 1
    clock: str = "wall"
    # the head (final norm, LM head, greedy choice) per batch: (sequences, s); empty: not measured
    head: tuple[tuple[int, float], ...] = ()


#: what a timed run is measured with: the wall clock, or the CPU time of the measuring thread (the
#: run as if alone on a core: other load on a shared machine does not count, which makes the
#: figures repeatable there; only meaningful with one torch thread on CPU)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def _time(run: Callable[[], None], repeats: int, clock: Callable[[], float]) -> float:
    run()
    samples = []
    for _ in range(repeats):
        t0 = clock()
        run()
        samples.append(clock() - t0)
    return statistics.median(samples)


def measure(
    spec: ModelSpec,
    *,
    gpu: str = "CPU",
    device: str = "cpu",
    dtype: str = "float32",
    threads: int = 1,
    repeats: int = 5,
    prompt_grid: Sequence[int] = PROMPT_GRID,
    decode_grid: Sequence[int] = DECODE_GRID,
    prompt_len: int = 128,
    decode_ctx: int = 128,
    layers: int = 4,
    clock: str = "wall",
) -> ProfileResult:
    """Time ``spec``'s layers on the grids (see the module doc): each batch runs through a stage of
    ``layers`` consecutive layers (at most the model's), as a worker runs it, and the time is
    divided by their count, so what a batch's layers share (rotary tables, masks, the decode
    batch's slab view) is spread over them as in serving."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and (threads != 1 or device != "cpu"):
        raise ValueError("the cpu clock times one thread on the CPU: use threads=1 and device cpu")
    tick = CLOCKS[clock]
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = llama_config(spec)
    n_layers = max(1, min(layers, cfg.num_layers))
    stage = dummy_stage(cfg, 0, n_layers, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(dtype=stage.dtype, device=stage.device)

    def sync() -> None:
        if stage.device.type == "cuda":
            torch.cuda.synchronize()

    def through(x: torch.Tensor, spans: list[tuple[int, int]], caches: list[SeqCache], reserve: list[int]) -> None:
        for i in range(n_layers):
            x = stage.layer(i, x, spans, caches, reserve)
        sync()

    prompt = []
    with torch.inference_mode():
        for n in prompt_grid:
            sizes = [prompt_len] * (n // prompt_len) + ([n % prompt_len] if n % prompt_len else [])
            x = rand(n, cfg.hidden_size, scale=0.5)
            spans = [(0, k) for k in sizes]

            def run_prompt(x: torch.Tensor = x, spans: list[tuple[int, int]] = spans) -> None:
                # new sequences each run: their slots are taken back when the handles are dropped
                through(x, spans, [SeqCache() for _ in spans], [k for _, k in spans])

            prompt.append((n, _time(run_prompt, repeats, tick) / n_layers))
        decode = []
        slab = stage.kv
        reserve = decode_ctx + repeats + 2
        for s in decode_grid:
            caches = [SeqCache() for _ in range(s)]
            for c in caches:  # decode_ctx cached positions of random keys and values (not timed)
                slab.admit(c, decode_ctx, reserve)
                for i in range(n_layers):
                    slab.k[i][c.slot, :, :decode_ctx] = rand(cfg.num_kv_heads, decode_ctx, cfg.head_dim)
                    slab.v[i][c.slot, :, :decode_ctx] = rand(cfg.num_kv_heads, decode_ctx, cfg.head_dim)
            x = rand(s, cfg.hidden_size, scale=0.5)
            pos = [decode_ctx]

            def run_decode(x: torch.Tensor = x, caches: list[SeqCache] = caches, s: int = s, pos: list[int] = pos) -> None:
                # every run appends one position per sequence, as successive decode steps would
                through(x, [(pos[0], 1)] * s, caches, [reserve] * s)
                pos[0] += 1

            decode.append((s, _time(run_decode, repeats, tick) / n_layers))
            del caches
    head = measure_head(cfg, decode_grid, repeats=repeats, clock=tick, dtype=dtype, device=device)
    return ProfileResult(gpu, tuple(prompt), tuple(decode), device, threads, dtype, 1, repeats, prompt_len, decode_ctx,
                         n_layers, clock, head)


def measure_head(cfg: LlamaConfig, grid: Sequence[int], *, repeats: int, clock: Callable[[], float], dtype: str,
                 device: str) -> tuple[tuple[int, float], ...]:
    """Seconds of the model's head for ``s`` sequences, ``s`` on ``grid``: the final norm, the LM
    head and the greedy choice (``executors.sampling.sample``), what the torch executor runs once
    per batch that leaves the model's last layer (one position per request, prompt or decode).
    The median of ``repeats`` timed runs by ``clock`` after one warm-up run."""
    stage = dummy_stage(cfg, cfg.num_layers - 1, cfg.num_layers, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    out = []
    with torch.inference_mode():
        for s in grid:
            x = (torch.randn(s, cfg.hidden_size, generator=gen) * 0.5).to(dtype=stage.dtype, device=stage.device)

            def run(x: torch.Tensor = x, s: int = s) -> None:
                sample(stage.logits(x), [None] * s)  # the choice reads the tokens back: synchronised

            out.append((s, _time(run, repeats, clock)))
    return tuple(out)


def _measure_child(args: tuple[str, dict[str, object]]) -> ProfileResult:
    from ..model import get_model

    ref, kw = args
    return measure(get_model(ref), **kw)  # type: ignore[arg-type]


def measure_concurrent(spec: ModelSpec, concurrent: int, **kw: object) -> ProfileResult:
    """:func:`measure` in ``concurrent`` processes at once (started with ``spawn``, each with its
    own torch threads); each grid point is the median over the processes of their medians."""
    if concurrent <= 1:
        return measure(spec, **kw)  # type: ignore[arg-type]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(concurrent) as pool:
        results = pool.map(_measure_child, [(spec.reference, kw)] * concurrent)
    first = results[0]

    def med(rows: list[tuple[tuple[int, float], ...]]) -> tuple[tuple[int, float], ...]:
        return tuple((x, statistics.median(r[i][1] for r in rows)) for i, (x, _) in enumerate(rows[0]))

    return ProfileResult(first.gpu, med([r.prompt for r in results]), med([r.decode for r in results]), first.device,
                         first.threads, first.dtype, concurrent, first.repeats, first.prompt_len, first.decode_ctx,
                         first.layers, first.clock, med([r.head for r in results]) if first.head else ())


def node_settings_rows(
    spec: ModelSpec,
    gpu: str,
    *,
    kv_bytes: int,
    prompt_max_requests: int,
    prompt_max_tokens: int,
    decode_max_tokens: int,
    block: int = 16,
    context_per_decode: int = 1000,
    element_bytes: int | None = None,
) -> list[dict[str, int | str]]:
    """node_settings.csv rows for ``gpu`` holding 1..L layers: a KV budget of ``kv_bytes`` (the
    same token x layer entries whatever the layer count, in blocks of ``block`` tokens), and the
    batch limits given (decode context: ``context_per_decode`` per sequence, as the shipped rows).
    ``element_bytes``: bytes of a key or value element in the compute dtype (default: the spec's
    own KV bytes, at its checkpoint's dtype)."""
    if element_bytes is None:
        per_entry = spec.kv_bytes_per_token_per_layer
    else:
        per_entry = 2 * spec.num_key_value_heads * spec.head_dim * element_bytes
    rows: list[dict[str, int | str]] = []
    for k in range(1, spec.num_layers + 1):
        blocks = kv_bytes // (per_entry * block * k)
        rows.append(
            {
                "model": spec.key,
                "gpu": gpu,
                "max_num_layers": spec.num_layers,
                "num_layers": k,
                "vllm_num_blocks": blocks,
                "kv_cache_capacity_token_layers": block * blocks * k,
                "prompt_max_requests": prompt_max_requests,
                "prompt_max_tokens": prompt_max_tokens,
                "decode_max_tokens": decode_max_tokens,
                "decode_max_context": decode_max_tokens * context_per_decode,
            }
        )
    return rows


def _meta(spec: ModelSpec, result: ProfileResult, old: dict[str, object]) -> str:
    """profile.toml: the shape the tables belong to (checked when they are read) and, per GPU type,
    how its tables were measured (the other types' entries of ``old`` are kept)."""
    measured = {k: v for k, v in dict(old.get("measurement", {})).items() if k.lower() != result.gpu.lower()}  # type: ignore[call-overload]
    measured[result.gpu] = {
        "device": result.device,
        "dtype": result.dtype,
        "threads": result.threads,
        "concurrent": result.concurrent,
        "repeats": result.repeats,
        "prompt_len": result.prompt_len,
        "decode_ctx": result.decode_ctx,
        "layers": result.layers,
        "clock": result.clock,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    doc = {
        "model": {
            "name": spec.name,
            "key": spec.key,
            **{f: getattr(spec, f) for f in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "head_dim")},
        },
        "measurement": measured,
    }
    return ("# Written by `python -m helix_async profile` (docs/profiles.md, \"Measured profiles\").\n"
            "# [measurement.GPU]: threads = torch threads per process; concurrent = processes measuring at once;\n"
            "# prompt_len = tokens per request of a prompt batch; decode_ctx = tokens cached per decoding sequence;\n"
            "# layers = consecutive layers a batch ran through per timed run (the time is per layer);\n"
            "# clock = wall (the wall clock) or cpu (the measuring thread's CPU time: as if alone on a core);\n"
            "# each point is the median of `repeats` timed runs.\n" + tomli_w.dumps(doc))


def write_profile(result: ProfileResult, out: Path, settings: list[dict[str, int | str]],
                  spec: ModelSpec | None = None) -> list[Path]:
    """Write ``<gpu>_prompt.csv``, ``<gpu>_decode.csv`` (milliseconds per layer, a 0,0 first row as
    the shipped profiles), ``<gpu>_head.csv`` when the head was measured (milliseconds per batch by
    sequences, ``model.HEAD_COLUMNS``), ``node_settings.csv`` (``settings`` replace this GPU type's rows; other
    types' rows stay) and, given ``spec``, ``profile.toml`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    # every file is written atomically and never through a symbolic link (fileio.atomic_write_text)
    tables = [("prompt", ["batch_tokens", "time_per_layer_ms"], result.prompt),
              ("decode", ["batch_tokens", "time_per_layer_ms"], result.decode)]
    if result.head:
        # the head's table (docs/profiles.md): milliseconds per batch, by the batch's sequences
        tables.append(("head", list(HEAD_COLUMNS), result.head))
    for kind, header, rows in tables:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerow([0, 0])
        for x, s in rows:
            w.writerow([x, f"{s * 1e3:.4f}"])
        paths.append(atomic_write_text(out / f"{result.gpu.lower()}_{kind}.csv", buf.getvalue(), "profile table"))
    p = out / "node_settings.csv"
    kept: list[dict[str, str]] = []
    if p.is_file():
        kept = [r for r in csv.DictReader(io.StringIO(read_text(p, "node settings table"), newline=""))
                if str(r.get("gpu", "")).lower() != result.gpu.lower()]
    buf = io.StringIO()
    dw = csv.DictWriter(buf, fieldnames=list(settings[0]), lineterminator="\n")
    dw.writeheader()
    dw.writerows(kept)
    dw.writerows(settings)
    paths.append(atomic_write_text(p, buf.getvalue(), "node settings table"))
    if spec is not None:
        m = out / PROFILE_META
        old: dict[str, object] = {}
        if m.is_file():
            try:
                old = load_toml(m, "profile description")
            except ConfigError:
                old = {}
        paths.append(atomic_write_text(m, _meta(spec, result, old), "profile description"))
    return paths
