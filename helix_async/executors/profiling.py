"""Measure per-layer batch times with the torch executor's model code, in the shipped profile format.

``python -m helix_async profile --model tiny-llama --device cpu`` runs one decoder layer of the model
(seeded dummy weights: the time does not depend on their values) on

* prompt batches of ``n`` tokens (requests of at most ``prompt_chunk`` tokens each, as a batch of
  several prompts would hold them), for ``n`` on a grid, and
* decode batches of ``s`` sequences, each with ``decode_ctx`` tokens already cached,

and writes ``<gpu>_prompt.csv`` and ``<gpu>_decode.csv`` (``batch_tokens,time_per_layer_ms``, the
layout of the shipped GPU profiles, docs/original.md §3.2) plus the node settings rows for that machine
type (``node_settings.csv``'s columns, §3.3), so the model can be planned and simulated on that
machine like any profiled GPU.  Each point is the median of ``repeats`` timed runs after one
warm-up run.  This is a measurement tool: it reads the wall clock (``time.perf_counter``).
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import ModelSpec
from .llama import LlamaConfig, SeqCache, dummy_stage

__all__ = ["ProfileResult", "llama_config", "measure", "write_profile"]

PROMPT_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048)
DECODE_GRID = (1, 2, 4, 8, 16, 32, 64, 128)


def llama_config(spec: ModelSpec) -> LlamaConfig:
    """The decoder shape of a model spec (for dummy weights of a model without a checkpoint)."""
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
    """Measured seconds per layer: ``prompt[(tokens, s)]`` and ``decode[(seqs, s)]``."""

    gpu: str
    prompt: tuple[tuple[int, float], ...]
    decode: tuple[tuple[int, float], ...]
    device: str
    threads: int


def _time(run: Callable[[], None], repeats: int) -> float:
    run()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
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
    prompt_chunk: int = 128,
    decode_ctx: int = 128,
) -> ProfileResult:
    """Time one layer of ``spec`` on the grids (see the module doc)."""
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = llama_config(spec)
    stage = dummy_stage(cfg, 0, 1, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)

    def hidden(n: int) -> torch.Tensor:
        return (torch.randn(n, cfg.hidden_size, generator=gen) * 0.5).to(dtype=stage.dtype, device=stage.device)

    def sync() -> None:
        if stage.device.type == "cuda":
            torch.cuda.synchronize()

    prompt = []
    with torch.inference_mode():
        for n in prompt_grid:
            sizes = [prompt_chunk] * (n // prompt_chunk) + ([n % prompt_chunk] if n % prompt_chunk else [])
            x = hidden(n)
            spans = [(0, k) for k in sizes]

            def run_prompt(x: torch.Tensor = x, spans: list[tuple[int, int]] = spans) -> None:
                caches = [SeqCache() for _ in spans]
                stage.layer(0, x, spans, caches, [k for _, k in spans])
                sync()

            prompt.append((n, _time(run_prompt, repeats)))
        decode = []
        for s in decode_grid:
            caches = [SeqCache() for _ in range(s)]
            for c in caches:  # fill each cache with decode_ctx tokens (not timed)
                stage.layer(0, hidden(decode_ctx), [(0, decode_ctx)], [c], [decode_ctx + repeats + 2])
            x = hidden(s)
            pos = [decode_ctx]

            def run_decode(
                x: torch.Tensor = x, caches: list[SeqCache] = caches, s: int = s, pos: list[int] = pos
            ) -> None:
                # every run appends one position per sequence, as successive decode steps would
                stage.layer(0, x, [(pos[0], 1)] * s, caches, [pos[0] + 1] * s)
                pos[0] += 1
                sync()

            decode.append((s, _time(run_decode, repeats)))
    return ProfileResult(gpu, tuple(prompt), tuple(decode), device, threads)


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
) -> list[dict[str, int | str]]:
    """node_settings.csv rows for ``gpu`` holding 1..L layers: a KV budget of ``kv_bytes`` (the
    same token x layer entries whatever the layer count, in blocks of ``block`` tokens), and the
    batch limits given (decode context: ``context_per_decode`` per sequence, as the shipped rows)."""
    per_entry = spec.kv_bytes_per_token_per_layer
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


def write_profile(result: ProfileResult, out: Path, settings: list[dict[str, int | str]]) -> list[Path]:
    """Write ``<gpu>_prompt.csv``, ``<gpu>_decode.csv`` (milliseconds per layer, a 0,0 first row as
    the shipped profiles) and ``node_settings.csv`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, rows in (("prompt", result.prompt), ("decode", result.decode)):
        p = out / f"{result.gpu.lower()}_{kind}.csv"
        with p.open("w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["batch_tokens", "time_per_layer_ms"])
            w.writerow([0, 0])
            for x, s in rows:
                w.writerow([x, f"{s * 1e3:.4f}"])
        paths.append(p)
    p = out / "node_settings.csv"
    with p.open("w", newline="") as fh:
        dw = csv.DictWriter(fh, fieldnames=list(settings[0]), lineterminator="\n")
        dw.writeheader()
        dw.writerows(settings)
    paths.append(p)
    return paths
