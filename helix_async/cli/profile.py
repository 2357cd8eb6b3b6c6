"""``profile``: measure one layer's batch times with the torch executor and write a profile."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import envs
from ..errors import ConfigError
from .args import EXIT_OK, positive, positive_int

__all__ = ["add_parser", "cmd_profile"]


def add_parser(sub: Any) -> None:
    """The ``profile`` command, on ``sub`` (argparse sub-parsers)."""
    pr = sub.add_parser("profile", help="measure per-layer batch times with the torch executor (profile format)")
    pr.add_argument("--model", default="tiny-llama", help="model (default %(default)s)")
    pr.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default %(default)s)")
    pr.add_argument("--gpu", default=None, help="machine type to name the profile after (default: CPU or CUDA)")
    pr.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    pr.add_argument("--threads", type=positive_int, default=1, help="torch threads (default %(default)s)")
    pr.add_argument("--repeats", type=positive_int, default=7, help="timed runs per point; the median is kept")
    pr.add_argument("--kv-bytes", type=positive, default=256 * 2**20, help="KV budget of the machine type, bytes")
    pr.add_argument("--prompt-max-requests", type=positive_int, default=4)
    pr.add_argument("--prompt-max-tokens", type=positive_int, default=2048)
    pr.add_argument("--decode-max-tokens", type=positive_int, default=128)
    pr.add_argument("--out", default=None, help="directory to write (default out/profile/<model>)")
    pr.set_defaults(handler=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from ..extras import require

    require("torch", "torch")
    from ..executors.profiling import DECODE_GRID, PROMPT_GRID, measure, node_settings_rows, write_profile
    from ..model import get_model

    spec = get_model(args.model)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ConfigError("<argument>", "--device", f"unknown device {args.device!r}; use cpu or cuda")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("<argument>", "--device", "CUDA is not available on this machine")
    gpu = args.gpu or ("CPU" if args.device == "cpu" else "CUDA")
    grid_p = [n for n in PROMPT_GRID if n <= args.prompt_max_tokens] or [args.prompt_max_tokens]
    grid_d = [n for n in DECODE_GRID if n <= args.decode_max_tokens] or [args.decode_max_tokens]
    print(f"profiling one layer of {spec.name} on {args.device} ({args.dtype}, {args.threads} thread(s), "
          f"median of {args.repeats})")
    res = measure(spec, gpu=gpu, device=args.device, dtype=args.dtype, threads=args.threads, repeats=args.repeats,
                  prompt_grid=grid_p, decode_grid=grid_d)
    for kind, rows in (("prompt tokens", res.prompt), ("decode seqs", res.decode)):
        print(f"  {kind:14s} " + "  ".join(f"{x}:{s * 1e3:.3f}ms" for x, s in rows))
    settings = node_settings_rows(spec, gpu, kv_bytes=int(args.kv_bytes), prompt_max_requests=args.prompt_max_requests,
                                  prompt_max_tokens=args.prompt_max_tokens, decode_max_tokens=args.decode_max_tokens)
    out = Path(args.out) if args.out else Path(envs.HELIX_OUT_DIR) / "profile" / spec.key
    for path in write_profile(res, out, settings):
        print(f"wrote {path}")
    return EXIT_OK
