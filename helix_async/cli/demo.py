"""``demo``: the main job in one command: a cluster, a plan for what it serves, its flows, its
simulation, and the tiny LLaMA served for real by worker processes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import envs
from ..errors import ConfigError
from .args import model_ref

__all__ = ["add_parser", "cmd_demo"]


def add_parser(sub: Any) -> None:
    """The ``demo`` command, on ``sub`` (argparse sub-parsers)."""
    demo = sub.add_parser("demo", help="the main job: plan and simulate single24 (LLaMA-2 70B), serve a real small model")
    demo.add_argument("--quick", action="store_true", help="short time limits (CI)")
    demo.add_argument("--out", default=None, help="directory for the demo's files (default out/demo)")
    demo.add_argument("--model", default=None, type=model_ref,
                      help="what step 5 serves: NAME, a checkpoint directory or a FILE.gguf (default: serve's default, "
                           "SmolLM2-135M-Instruct)")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    # the demo runs other commands through the command line's own entry point
    from ..runtime.demo import serve_model, simulate_plan
    from ..runtime.serve import DEFAULT_MODEL
    from . import main

    served = args.model or DEFAULT_MODEL
    from ..models import resolve_model

    resolve_model(served, "--model")  # a model that is not there stops the demo now, not at step 5
    if args.out == "":
        raise ConfigError("<argument>", "--out", "empty path for the demo's folder")
    out = Path(args.out) if args.out is not None else Path(envs.HELIX_OUT_DIR) / "demo"
    out.mkdir(parents=True, exist_ok=True)
    limit = "60" if args.quick else "180"
    print("== 1. the cluster ==")
    rc = main(["cluster", "show", "single24", "--model", "llama2-70b"])
    if rc:
        return rc
    print(f"\n== 2. plan a placement for what it serves ({limit} s: max flow, the MILP with KV and depth "
          "constraints, a local search on the served model, the best candidates simulated) ==")
    plan_file = out / "plan.toml"
    rc = main(["plan", "--cluster", "single24", "--model", "llama2-70b", "--time-limit", limit,
               "--simulate-top", "3" if args.quick else "6", "--refine", "2" if args.quick else "6",
               "--sim-window", "60" if args.quick else "600",
               "--explain", "--out", str(plan_file), "--plot", str(out / "placement.png")])
    if rc:
        return rc
    print("\n== 3. flow analysis of the plan ==")
    rc = main(["flow", str(plan_file)])
    if rc:
        return rc
    window = "60" if args.quick else "600"
    print(f"\n== 4. simulate the plan (offline MaxFlow, {window}-s window, virtual time) ==")
    rc = simulate_plan(plan_file, out / "sim", window=window, plots=not args.quick)
    if rc:
        return rc
    print(f"\n== 5. serve {served} for real: a host with the OpenAI API and 3 torch workers as processes on "
          "loopback ==")
    return serve_model(out / "serve", model=served, requests=8 if args.quick else 24)
