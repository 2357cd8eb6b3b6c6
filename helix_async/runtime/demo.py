"""The demo's process steps: the plan simulated by the installed simulator's command line, and
a real model (SmolLM2-135M-Instruct by default) served through a 3-stage pipeline of torch worker
processes, asked a question and loaded with a short trace.

The simulator is found as the served planner finds it (``placement.simulator``: the entry-point
group ``helix_async.simulators``); this package never imports it. Serving runs the ``serve``
command (a plan of even stages over three worker processes on loopback, each reading only its own
layers of the model file, the host with the OpenAI API), asks the question through the API with
greedy decoding, replays a seeded short trace with ``bench-serve`` and prints its summary.  Every
process it starts is stopped when it returns.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from ..fileio import open_output_log
from ..workloads import write_trace_csv
from .serve import DEFAULT_MODEL

__all__ = ["DEMO_QUESTION", "serve_model", "simulate_plan"]

#: what the demo asks the served model
DEMO_QUESTION = "What is the capital of France?"


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


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out: dict[str, Any] = json.loads(resp.read())
    return out


def serve_model(out: Path, *, model: str = DEFAULT_MODEL, workers: int = 3, requests: int = 24, seed: int = 0,
                question: str = DEMO_QUESTION, timeout: float = 600.0) -> int:
    """Serve ``model`` over ``workers`` worker processes (``python -m helix_async serve``), ask it
    ``question`` through the OpenAI API (greedy) and print the answer, then load it with a seeded
    trace of ``requests`` requests (``bench-serve``) and print its summary; stop everything."""
    out.mkdir(parents=True, exist_ok=True)
    url_file = out / "url"
    url_file.unlink(missing_ok=True)
    log = open_output_log(out / "serve.log", "serve log")
    serve = subprocess.Popen(
        [sys.executable, "-m", "helix_async", "--log-level", "WARNING", "serve", "--model", model, "--workers",
         str(workers), "--http", "127.0.0.1:0", "--url-file", str(url_file), "--log-dir", str(out / "logs"),
         "--seed", str(seed)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not url_file.exists() or not url_file.read_text().strip():
            if serve.poll() is not None or time.monotonic() > deadline:
                log.flush()
                print(f"error: serve did not start (exit {serve.poll()}); its output:\n"
                      + (out / "serve.log").read_text()[-4000:], file=sys.stderr)
                return serve.returncode or 1
            time.sleep(0.2)
        url = url_file.read_text().strip()
        print(f"{model} served on {url}/v1 by {workers} worker processes", flush=True)
        answer = _post_json(f"{url}/v1/chat/completions",
                            {"messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0},
                            timeout)
        text = answer["choices"][0]["message"]["content"]
        print(f"Q: {question}\nA: {text.strip()}", flush=True)
        rng = random.Random(seed)
        t = 0.0
        rows = []
        for _ in range(requests):
            t += rng.expovariate(4.0)  # about 4 requests/s
            rows.append((round(t, 4), rng.randint(16, 128), rng.randint(8, 48)))
        trace = write_trace_csv(out / "trace.csv", rows)
        print(f"load: {requests} requests of a seeded trace ({trace})", flush=True)
        rc = subprocess.run([sys.executable, "-m", "helix_async", "bench-serve", "--url", url, "--lengths", str(trace),
                             "--seed", str(seed), "--json", str(out / "bench.json")], check=False,
                            timeout=timeout).returncode
        if rc:
            print(f"error: bench-serve exit {rc}", file=sys.stderr)
            return rc
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
        log.close()
    return 0
