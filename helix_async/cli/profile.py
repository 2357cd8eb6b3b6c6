"""``profile``: measure one layer's batch times with the torch executor and write a profile.

The profile goes to the user's profile directory by default (``HELIX_PROFILE_DIR/<model key>/``),
where the planner and the simulator find it: a measured profile replaces the analytical one of the
same GPU type (docs/profiles.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import envs
from ..errors import ConfigError
from ..profiles.analytical import (
    CPU_DECODE_MAX_TOKENS,
    CPU_KV_BYTES,
    CPU_PROMPT_MAX_REQUESTS,
    CPU_PROMPT_MAX_TOKENS,
)
from .args import EXIT_OK, int_in, model_ref, positive

#: Bounds of the profile's sizes: what one process can allocate and time (a prompt of a million
#: tokens is already far past any model here), and a machine's threads and processes.
MAX_PROFILE_TOKENS = 1_000_000
MAX_THREADS = 4096

__all__ = ["add_parser", "cmd_profile", "cuda_gpu_name"]


def add_parser(sub: Any) -> None:
    """The ``profile`` command, on ``sub`` (argparse sub-parsers)."""
    pr = sub.add_parser("profile", help="measure per-layer batch times with the torch executor (profile format)")
    pr.add_argument("--model", default="tiny-llama", type=model_ref,
                    help="model: a built-in or packaged name, a checkpoint directory or a FILE.gguf (default %(default)s)")
    pr.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default %(default)s)")
    pr.add_argument("--gpu", default=None,
                    help="GPU type to name the profile after (default: CPU, or the datasheet name of the CUDA device)")
    pr.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="compute dtype (default: float32 on cpu, float16 on cuda)")
    pr.add_argument("--threads", type=int_in(1, MAX_THREADS), default=1,
                    help="torch threads per process (default %(default)s: a served worker runs 1)")
    pr.add_argument("--concurrent", type=int_in(1, MAX_THREADS), default=1,
                    help="processes measuring at the same time, sharing the cores as that many workers would "
                         "(default %(default)s)")
    pr.add_argument("--repeats", type=int_in(1, 10_000), default=7, help="timed runs per point; the median is kept")
    pr.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="time runs by the wall clock, or by the measuring thread's CPU time (as if alone on a core: "
                         "repeatable on a loaded machine; CPU, 1 thread) (default %(default)s)")
    pr.add_argument("--layers", type=int_in(1, 10_000), default=4,
                    help="consecutive layers a batch runs through per timed run, as a worker's stage (default "
                         "%(default)s; the time is per layer)")
    pr.add_argument("--prompt-len", type=int_in(1, MAX_PROFILE_TOKENS), default=None,
                    help="tokens per request in a prompt batch (default: the dataset's mean input, 750)")
    pr.add_argument("--decode-context", type=int_in(1, MAX_PROFILE_TOKENS), default=None,
                    help="tokens cached per decoding sequence (default: mean input + half the mean output, 870)")
    pr.add_argument("--kv-bytes", type=positive, default=None,
                    help="KV budget of the machine type, bytes (default: 256 MiB on cpu; on a datasheet GPU the "
                         "node settings follow its VRAM)")
    # a CPU's batch limits; the analytical CPU type's node settings are these defaults (docs/profiles.md)
    pr.add_argument("--prompt-max-requests", type=int_in(1, MAX_PROFILE_TOKENS), default=CPU_PROMPT_MAX_REQUESTS)
    pr.add_argument("--prompt-max-tokens", type=int_in(1, MAX_PROFILE_TOKENS), default=CPU_PROMPT_MAX_TOKENS)
    pr.add_argument("--decode-max-tokens", type=int_in(1, MAX_PROFILE_TOKENS), default=CPU_DECODE_MAX_TOKENS)
    pr.add_argument("--out", default=None,
                    help="directory to write (default $HELIX_PROFILE_DIR/<model key>, read by plan and sim)")
    pr.set_defaults(handler=cmd_profile)


def cuda_gpu_name(device_name: str) -> str:
    """The datasheet type of a CUDA device called ``device_name`` (``torch.cuda.get_device_name``,
    e.g. "NVIDIA H100 80GB HBM3" -> "H100"), or "CUDA" when the table has none."""
    from ..profiles.gpus import gpu_types

    name = device_name.upper().replace(" ", "").replace("-", "")
    best = ""
    for key, g in gpu_types().items():
        if g.count != 1 or g.device != "cuda":
            continue
        base, _, variant = key.upper().partition("-")
        if base in name and (not variant or variant in name) and len(key) > len(best):
            best = key
    return best or "CUDA"


def _grid(base: tuple[int, ...], upto: int) -> list[int]:
    """``base`` continued by doubling, up to its first point at or past ``upto``."""
    ext = list(base)
    while ext[-1] < upto:
        ext.append(ext[-1] * 2)
    return [n for n in ext if n < upto] + [min(n for n in ext if n >= upto)]


def cmd_profile(args: argparse.Namespace) -> int:
    from ..extras import require

    require("torch", "torch")
    from ..executors.profiling import (
        DECODE_GRID,
        PROMPT_GRID,
        measure_concurrent,
        node_settings_rows,
        write_profile,
    )
    from ..model import dataset_constants, get_model
    from ..models.arch import DTYPE_BYTES
    from ..profiles.analytical import LayerShape, analytical_settings
    from ..profiles.gpus import find_gpu

    spec = get_model(args.model)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ConfigError("<argument>", "--device", f"unknown device {args.device!r}; use cpu or cuda")
    cuda = args.device.startswith("cuda")
    detected = "CUDA"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("<argument>", "--device", "CUDA is not available on this machine")
        detected = cuda_gpu_name(torch.cuda.get_device_name(args.device))
    gpu = args.gpu or (detected if cuda else "CPU")
    dtype = args.dtype or ("float16" if cuda else "float32")
    consts = dataset_constants()
    prompt_len = args.prompt_len or consts.avg_input_len
    decode_ctx = args.decode_context or consts.avg_input_len + consts.avg_output_len // 2
    datasheet = find_gpu(gpu)
    if datasheet is not None and datasheet.device == "cuda" and args.kv_bytes is None:
        derived = analytical_settings(LayerShape.of(spec), datasheet, spec.num_layers, consts)
        if derived is None:
            raise ConfigError("<argument>", "--gpu", f"not one layer of {spec.name} fits in half of a {gpu}'s memory")
        prompt_max_tokens, decode_max_tokens = max(derived.prompt_max_tokens), max(derived.decode_max_tokens)
    else:
        derived = None
        prompt_max_tokens, decode_max_tokens = args.prompt_max_tokens, args.decode_max_tokens
    # the grids reach every batch the simulator runs (the batch limits; the throughput model's
    # typical batch is capped by them too) and the longest input (docs/original.md §3.4)
    grid_p = _grid(PROMPT_GRID, max(prompt_max_tokens, consts.max_input_len))
    grid_d = _grid(DECODE_GRID, decode_max_tokens)
    if args.clock == "cpu" and (cuda or args.threads != 1):
        raise ConfigError("<argument>", "--clock", "cpu times one thread on the CPU: use --device cpu --threads 1")
    print(f"profiling {spec.name} on {args.device} as {gpu} ({dtype}, {args.threads} thread(s) x "
          f"{args.concurrent} process(es), {args.clock} clock, median of {args.repeats} through {args.layers} layer(s); prompts of "
          f"{prompt_len} tokens, decodes with {decode_ctx} cached)")
    res = measure_concurrent(spec, args.concurrent, gpu=gpu, device=args.device, dtype=dtype, threads=args.threads,
                             repeats=args.repeats, prompt_grid=grid_p, decode_grid=grid_d, prompt_len=prompt_len,
                             decode_ctx=decode_ctx, layers=args.layers, clock=args.clock)
    for kind, rows in (("prompt tokens", res.prompt), ("decode seqs", res.decode), ("head seqs", res.head)):
        print(f"  {kind:14s} " + "  ".join(f"{x}:{s * 1e3:.3f}ms" for x, s in rows))
    if derived is not None:
        settings: list[dict[str, int | str]] = [
            {"model": spec.key, "gpu": gpu, "max_num_layers": derived.max_layers, "num_layers": k + 1,
             "vllm_num_blocks": derived.vllm_blocks[k], "kv_cache_capacity_token_layers": derived.kv_capacity[k],
             "prompt_max_requests": derived.prompt_max_requests[k], "prompt_max_tokens": derived.prompt_max_tokens[k],
             "decode_max_tokens": derived.decode_max_tokens[k], "decode_max_context": derived.decode_max_context[k]}
            for k in range(derived.max_layers)
        ]
    else:
        settings = node_settings_rows(spec, gpu, kv_bytes=int(args.kv_bytes or CPU_KV_BYTES),
                                      prompt_max_requests=args.prompt_max_requests,
                                      prompt_max_tokens=args.prompt_max_tokens,
                                      decode_max_tokens=args.decode_max_tokens, element_bytes=DTYPE_BYTES[dtype])
    out = Path(args.out) if args.out else Path(envs.HELIX_PROFILE_DIR).expanduser() / spec.key
    for path in write_profile(res, out, settings, spec):
        print(f"wrote {path}")
    if args.out:
        print(f"plan and sim read it when HELIX_PROFILE_DIR is {out.parent} (the directory is named by the model key "
              f"{spec.key!r})")
    return EXIT_OK
