"""The demo's process steps: the plan simulated by the installed simulator's command line, and
the tiny LLaMA served through a 3-stage pipeline of torch worker processes.

The simulator is found as the served planner finds it (``placement.simulator``: the entry-point
group ``helix_async.simulators``); this package never imports it. Serving writes a plan (the ``tiny3`` cluster, layers [0, 3), [3, 6), [6, 8): activations pass worker to
worker), a seeded short trace, starts ``python -m helix_async host`` with that trace and three
``python -m helix_async worker`` processes on loopback, waits for the host to replay the trace and
shut the workers down, reports the run from its logs (with plots when matplotlib is installed),
and ends with the host's summary line.  Every process it starts is stopped when it returns.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..cluster import load_cluster
from ..placement import Placement
from ..placement.flow import max_flow
from ..placement.io import write_placement
from ..workloads import write_trace_csv

__all__ = ["TINY_STAGES", "serve_tiny", "simulate_plan"]

TINY_STAGES = {0: (0, 3), 1: (3, 6), 2: (6, 8)}


def simulate_plan(plan: Path, report: Path, *, window: str, plots: bool) -> int:
    """Simulate ``plan`` (offline MaxFlow, ``window`` seconds) with the command line of the package
    that registered the default simulator (``python -m sim run``), writing its report (and plots)
    into ``report``; its exit status. Without a simulator installed, one line says so and 0."""
    from ..placement.simulator import DEFAULT_SIMULATOR, SIMULATORS_GROUP, simulator_package

    package = simulator_package()
    if package is None:
        print(f"no simulator installed ({SIMULATORS_GROUP}: {DEFAULT_SIMULATOR}); the simulation is skipped")
        return 0
    argv = [sys.executable, "-m", package, "run", "--plan", str(plan), "--duration", window, "--report", str(report),
            "--progress"]
    if plots:
        argv.append("--plots")
    return subprocess.run(argv, check=False).returncode


def serve_tiny(out: Path, *, requests: int = 24, seed: int = 0, timeout: float = 600.0) -> int:
    out.mkdir(parents=True, exist_ok=True)
    placement = Placement.from_layers(load_cluster("tiny3"), "tiny-llama", TINY_STAGES, method="manual")
    plan = write_placement(placement, out / "tiny_plan.toml", flow=max_flow(placement))
    rng = random.Random(seed)
    t = 0.0
    rows = []
    for _ in range(requests):
        t += rng.expovariate(8.0)  # about 8 requests/s
        rows.append((round(t, 4), rng.randint(4, 64), rng.randint(8, 32)))
    trace = write_trace_csv(out / "trace.csv", rows)
    print(f"plan {plan} (3 stages of tiny-llama), trace {trace} ({requests} requests)", flush=True)
    addr_file = out / "host.address"
    addr_file.unlink(missing_ok=True)
    logs = out / "logs"
    host = subprocess.Popen(
        [sys.executable, "-m", "helix_async", "--log-level", "WARNING", "host", "--plan", str(plan),
         "--address-file", str(addr_file), "--trace", str(trace), "--log-dir", str(logs), "--seed", str(seed),
         "--progress"],
        stdout=subprocess.PIPE, text=True,
    )
    workers: list[subprocess.Popen[Any]] = []
    try:
        deadline = time.monotonic() + 60
        while not addr_file.exists() or not addr_file.read_text().strip():
            if host.poll() is not None or time.monotonic() > deadline:
                print("error: the host did not start", file=sys.stderr)
                return host.returncode or 1
            time.sleep(0.05)
        address = addr_file.read_text().strip()
        for i in TINY_STAGES:
            with (out / f"worker{i}.log").open("w") as err:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "helix_async", "--log-level", "WARNING", "worker", "--connect", address,
                     "--executor", "torch", "--device", "cpu"],
                    stdout=err, stderr=subprocess.STDOUT,
                ))
        print(f"host on {address}; 3 workers starting (each loads torch and its layers)", flush=True)
        stdout, _ = host.communicate(timeout=timeout)
        lines = [ln for ln in stdout.splitlines() if ln.strip()]
        for ln in lines[:-1]:
            print(ln)
        codes = [w.wait(timeout=30) for w in workers]
        if host.returncode or any(codes):
            print(f"error: host exit {host.returncode}, workers {codes} (their logs: {out}/worker*.log)", file=sys.stderr)
            return host.returncode or 1
    finally:
        procs: list[subprocess.Popen[Any]] = [host, *workers]
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    from .commands import cmd_report

    print(f"\nreport of the served run ({logs}):")
    import argparse

    try:
        import matplotlib  # noqa: F401

        plots = True
    except ImportError:
        plots = False
    cmd_report(argparse.Namespace(dir=str(logs), warmup=0.0, finish=1e9, plots=plots))
    print(lines[-1] if lines else "the host printed no summary", flush=True)
    return 0
