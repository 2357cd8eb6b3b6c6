"""The runtime's command-line entry points: ``host``, ``worker``, ``keys`` and ``report``
(``python -m helix_async``).

The ``host`` command builds a :class:`~helix_async.settings.HostSettings` from its flags (the
flags' defaults are the settings' own) and, with ``--http``, the front door
(:mod:`helix_async.runtime.http_api`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..aio import run
from ..errors import ConfigError, RequestFailed
from ..fileio import atomic_write_text
from ..settings import HostSettings, KVExpectation, WorkerOptions

log = logging.getLogger("helix_async.runtime")


def _percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def summary_line(served: int, workers: int, tokens: int, span: float, ttft: list[float], tpot: list[float]) -> str:
    rate = tokens / span if span > 0 else 0.0
    return (
        f"served {served} requests on {workers} workers: {rate:.1f} tokens/s, "
        f"TTFT p50 {_percentile(ttft, 0.5):.3f} s, per-token p50 {_percentile(tpot, 0.5):.4f} s"
    )


async def _host_main(args: argparse.Namespace) -> int:
    from ..placement.io import read_flow, read_placement
    from .host_main import HostServer

    for flag, value in (("--cv", args.cv), ("--rate-profile", args.rate_profile)):
        if value is not None and (args.trace or args.mode != "online"):
            raise ConfigError("<argument>", flag, "is for --mode online (a generated trace)")
    placement = read_placement(args.plan)
    flow = read_flow(args.plan)
    trace: list[Any] | None = None
    if args.trace:
        from ..workloads import read_trace_csv

        trace = read_trace_csv(args.trace)
    elif args.mode == "online":
        from ..workloads import RateProfile, generate_online_trace

        if args.duration % 3:
            raise ConfigError("<argument>", "--duration", "online traces are built in 3-s steps: give a multiple of 3")
        profile = RateProfile.parse(args.rate_profile, duration=args.duration) if args.rate_profile else None
        trace = generate_online_trace(args.arrivals, args.lengths, args.rate, start=0.0, duration=int(args.duration),
                                      seed=args.seed, cv=args.cv, profile=profile)
    door = None
    if args.admin_key is not None and not args.http:
        raise ConfigError("<argument>", "--admin-key", "needs --http (the endpoints are served there)")
    if args.http:
        from .http_api import prepare_front_door

        # bad flags fail here, before anything listens
        door = prepare_front_door(args.http, placement.model_spec, tokenizer=args.tokenizer,
                                  max_model_len=args.max_model_len, served_model_name=args.served_model_name,
                                  seed=args.seed, api_key=args.api_key, admin_key=args.admin_key)
    from ..transport.curve import security

    curve = security(args.keys, "host", [("--listen", args.listen)], args.insecure)
    server = HostServer(placement, flow, host_settings(args), curve=curve)
    address = await server.start()
    print(f"host listening on {address}", flush=True)
    api = None
    if door is not None:
        from .http_api import start_front_door

        api = await start_front_door(server, door)
        print(f"OpenAI-compatible API on {api.url}/v1 (model {api.model_name!r}; metrics on {api.url}/metrics)", flush=True)
        if args.url_file:
            atomic_write_text(args.url_file, api.url + "\n", "URL file", flag="--url-file")
    if args.address_file:
        atomic_write_text(args.address_file, address + "\n", "address file", flag="--address-file")
    try:
        return await _host_serve(args, server, trace)
    finally:
        if api is not None:
            await api.stop()


#: the ``host`` flag that sets each HostSettings field
HOST_FLAGS = {"listen": "--listen", "scheduler": "--scheduler", "kv": "--kv", "admission_capacity": "--admission-capacity", "log_dir": "--log-dir",
              "emulate_time_scale": "--emulate", "recovery_timeout": "--recovery-timeout", "shutdown_grace": "--grace",
              "migration": "--migration"}


def host_settings(args: argparse.Namespace) -> HostSettings:
    """The ``host`` command's settings from its flags (the fields with no flag keep their defaults)."""
    try:
        return HostSettings(listen=args.listen, scheduler=args.scheduler, kv=KVExpectation(*args.kv), admission_capacity=args.admission_capacity,
                            log_dir=args.log_dir, emulate_time_scale=args.emulate, recovery_timeout=args.recovery_timeout,
                            shutdown_grace=args.grace, migration=args.migration == "on")
    except ConfigError as e:
        raise ConfigError("<argument>", HOST_FLAGS.get(e.field, e.field), e.message) from None


async def _host_serve(args: argparse.Namespace, server: Any, trace: list[Any] | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready = loop.create_task(server.wait_ready())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        print("stopped before the workers were ready", flush=True)
        await server.shutdown("host stopped", grace=0.0)
        return 0
    print(f"all {len(server.nodes)} workers ready", flush=True)
    if trace is None and args.mode != "offline":
        await stopped
        await server.shutdown("host stopped (signal)")
        for f in server.log_files:
            print(f"log written to {f}", flush=True)
        return 0
    if trace is None:
        work = offline(server, args.initial, args.duration, args.lengths, seed=args.seed)
    else:
        work = replay_trace(server, trace, seed=args.seed, progress=args.progress)
    replay = loop.create_task(work)
    await asyncio.wait({replay, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not replay.done():
        print("stopping: in-flight requests finish or are cancelled", flush=True)
        await server.shutdown("host stopped (signal)")
        await asyncio.gather(replay, return_exceptions=True)
    else:
        await server.shutdown("trace done")
    for f in server.log_files:
        print(f"log written to {f}", flush=True)
    print(replay.result() if replay.done() and not replay.cancelled() and replay.exception() is None else "replay cut short",
          flush=True)
    return 0


async def replay_trace(server: Any, trace: list[Any], *, seed: int = 0, progress: bool = False) -> str:
    """Submit every trace entry at its arrival time (relative to now) with seeded random prompt token
    ids; returns the summary line once all have finished or failed.  progress: a tqdm bar of the
    requests done (on stderr)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trace), unit="req", desc="serving", leave=False)
    rng = random.Random(seed)
    vocab = server.model.vocab_size
    clock = server.clock
    t0 = clock.now()
    failed = 0
    tokens = 0

    async def one(t: float, n: int, m: int) -> None:
        nonlocal failed, tokens
        await clock.sleep_until(t0 + t)
        prompt = [rng.randrange(vocab) for _ in range(n)]
        try:
            async for _ in server.generate(prompt, m):
                tokens += 1
        except RequestFailed as e:
            failed += 1
            log.warning("request failed: %s", e)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tokens=tokens, refresh=False)

    try:
        await asyncio.gather(*(one(float(t), int(n), int(m)) for t, n, m in trace))
    finally:
        if bar is not None:
            bar.close()
    span = clock.now() - t0
    host = server.host
    line = summary_line(len(trace) - failed, len(server.nodes), tokens, span, list(host.prompt_latency),
                        list(host.decode_latency))
    if failed:
        line += f" ({failed} failed)"
    return line


async def offline(server: Any, initial: int, duration: float, lengths: str, *, seed: int = 0) -> str:
    """A constant population: ``initial`` requests (lengths from the ``lengths`` dataset, seeded),
    each replaced when it ends, until ``duration`` seconds have passed; returns the summary line."""
    from ..workloads import LengthSampler

    sampler = LengthSampler(lengths, seed)
    rng = random.Random(seed)
    vocab = server.model.vocab_size
    clock = server.clock
    t0 = clock.now()
    served = failed = tokens = 0

    async def lane() -> None:
        nonlocal served, failed, tokens
        while clock.now() - t0 < duration and not server.closing:
            n, m = sampler.sample()
            try:
                async for _ in server.generate([rng.randrange(vocab) for _ in range(n)], m):
                    tokens += 1
                served += 1
            except RequestFailed as e:
                failed += 1
                log.warning("request failed: %s", e)
                await clock.sleep(0.1)

    await asyncio.gather(*(lane() for _ in range(initial)))
    host = server.host
    line = summary_line(served, len(server.nodes), tokens, clock.now() - t0, list(host.prompt_latency),
                        list(host.decode_latency))
    return line + (f" ({failed} failed)" if failed else "")


def cmd_host(args: argparse.Namespace) -> int:
    return run(_host_main(args))


def cmd_report(args: argparse.Namespace) -> int:
    from ..runlog import read_events, summarise

    d = Path(args.dir)
    events = read_events(d / "events.txt")
    s = summarise(events, args.warmup, args.finish)
    for line in s.lines():
        print(line)
    if args.plots:
        from ..plots import plot_latency, plot_throughput

        tt = [e[0] for e in events if e[2] == "in"]
        counts = [e[5] for e in events if e[2] == "in"]
        dt = [e[0] for e in events if e[2] == "in" and e[3] == "decode"]
        stats = {k: s.stats(k) for k in ("prompt", "decode") if (s.prompt_latency if k == "prompt" else s.decode_latency)}
        for p in (
            plot_throughput(tt, counts, dt, d / "throughput.png", window=(args.warmup, args.finish),
                            title=f"served run {d.name}: throughput over time"),
            plot_latency(s.prompt_latency, s.decode_latency, d / "latency.png", stats=stats),
        ):
            print(f"plot written to {p}")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from ..transport.curve import generate_keys

    files = generate_keys(args.dir, args.workers)
    print(f"wrote {len(files)} key files and {args.dir}/allowed/ (copy a worker's .key_secret only to its machine)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker_main import WorkerServer

    opts = worker_options(args)
    if opts.checkpoint:
        from ..models.weights import open_checkpoint

        open_checkpoint(opts.checkpoint, "--checkpoint")  # headers only: a bad file is one line, exit 2
    server = WorkerServer(opts)
    rc = run(server.run())
    log.info("worker exits: %s", server.exit_reason or "done")
    return rc


def worker_options(args: argparse.Namespace) -> WorkerOptions:
    """The ``worker`` command's options from its flags: the common ones and every executor's
    (``executors.registry``); an executor flag that no ``WorkerOptions`` field holds goes to
    ``extra``."""
    from ..executors.registry import executor_flags

    known = {f.name for f in fields(WorkerOptions)}
    values: dict[str, Any] = {}
    extra: list[tuple[str, Any]] = []
    for name in [*WORKER_FLAGS, *(f.dest for f in executor_flags())]:
        value = getattr(args, name)
        if name not in known:
            extra.append((name, value))
        elif name == "memory_bytes":
            values[name] = int(value or 0)
        else:
            values[name] = "" if value is None else value
    return WorkerOptions(**values, extra=tuple(extra))


#: the ``worker`` flags every executor shares, by WorkerOptions field (the executors' own flags
#: come from ``executors.registry``)
WORKER_FLAGS = ("connect", "node_id", "executor", "device", "machine_type", "memory_bytes", "bind", "keys", "key_name",
                "insecure", "advertise", "gather")


def _add_executor_flags(w: Any, defaults: WorkerOptions, kinds: dict[str, Any]) -> None:
    """Every executor's flags (each once), with the WorkerOptions default of a flag it has a field for."""
    from ..executors.registry import executor_flags

    have = {f.name for f in fields(WorkerOptions)}
    for f in executor_flags():
        kw: dict[str, Any] = {"dest": f.dest, "help": f.help,
                              "default": getattr(defaults, f.dest) if f.dest in have else f.default}
        if f.kind != "str":
            kw["type"] = kinds[f.kind]
        if f.choices is not None:
            kw["choices"] = list(f.choices)
        if f.metavar is not None:
            kw["metavar"] = f.metavar
        w.add_argument(f.option, **kw)


def add_parsers(sub: Any, positive_int: Any, positive: Any, pair: Any) -> None:
    from ..cli.args import (
        MAX_NODE_ID,
        endpoint,
        int_in,
        kv_expectation,
        nonnegative_seconds,
        number_in,
        output_file,
        seconds,
        seed,
    )
    from ..workloads import MAX_CV, MIN_CV

    d = HostSettings()  # the flags' defaults
    h = sub.add_parser("host", help="run the coordinator of a real cluster (ZeroMQ)")
    h.add_argument("--plan", required=True, help="plan file (from `plan`)")
    h.add_argument("--listen", default=d.listen, type=endpoint, help="inbox address (default %(default)s: an ephemeral port)")
    h.add_argument("--address-file", default=None, type=output_file, help="write the bound address here (for scripts)")
    h.add_argument("--trace", default=None, help="replay this trace CSV (arrive_time_s,input_tokens,output_tokens), then stop")
    h.add_argument("--mode", choices=["serve", "offline", "online"], default="serve",
                   help="serve (until a signal; the default), offline (a constant population) or online "
                   "(a generated arrival trace); --trace replays a CSV instead")
    h.add_argument("--initial", type=int_in(1, 1_000_000), default=4, help="offline: requests in flight")
    h.add_argument("--duration", type=seconds, default=60.0, help="offline/online: seconds of load")
    h.add_argument("--rate", type=positive, default=700.0, help="online: tokens/s (input + output)")
    h.add_argument("--lengths", default="azure-conv", help="offline/online: length dataset (as in `python -m sim`)")
    h.add_argument("--arrivals", default="azure-conv",
                   help="online: an arrival series, or gamma (with --cv) or poisson gaps (as in `python -m sim`)")
    h.add_argument("--cv", type=number_in(MIN_CV, MAX_CV), default=None, help="online, --arrivals gamma: the gaps' coefficient of variation")
    h.add_argument("--rate-profile", default=None, metavar="PROFILE",
                   help="online: the rate over time, step:0=M0,T1=M1,... or diurnal:period=P,low=L (as in `python -m sim`)")
    h.add_argument("--seed", type=seed, default=0, help="seed of the workload and of the prompts' token ids")
    h.add_argument("--scheduler", default=d.scheduler, metavar="NAME",
                   help="routing policy (default %(default)s; the simulator runs more: python -m sim run --help)")
    h.add_argument("--kv", type=kv_expectation, default=d.kv,
                   help="KV expectation HWM,RATIO: HWM in (0, 1], RATIO in [0, 10] (default %(default)s)")
    h.add_argument("--admission-capacity", type=positive_int, default=d.admission_capacity,
                   help="most queries waiting for admission (default %(default)s)")
    h.add_argument("--grace", type=seconds, default=d.shutdown_grace,
                   help="seconds in-flight requests may finish at shutdown (default %(default)s)")
    h.add_argument("--migration", choices=("on", "off"), default="off",
                   help="reschedule running requests by live KV migration between workers that hold the same "
                        "layers (maxflow; docs/migration.md; default off)")
    h.add_argument("--recovery-timeout", type=seconds, default=d.recovery_timeout,
                   help="seconds a request moved off a lost worker may wait for a live route (default %(default)s)")
    h.add_argument("--progress", action="store_true", help="a progress bar of the requests done (stderr)")
    h.add_argument("--log-dir", default=d.log_dir, help="write events.txt, query_route.txt, requests.jsonl here at the end")
    h.add_argument("--emulate", type=number_in(0.0, 1e6, low_open=True), default=d.emulate_time_scale, metavar="K",
                   help="cost-model emulation: hold the host's messages back by its links' modelled times x K")
    h.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="serve the OpenAI-compatible API and /metrics here (e.g. 127.0.0.1:8000; port 0: any free one)")
    h.add_argument("--tokenizer", default=None,
                   help="--http: tokenizer (tiny-llama, a directory with tokenizer.json, or none: token ids only; "
                   "default: the model's own when shipped)")
    h.add_argument("--served-model-name", default=None, help="--http: the model id clients use (default: the plan's model)")
    h.add_argument("--max-model-len", type=int_in(1, 2**31 - 1), default=None, help="--http: prompt plus output tokens at most")
    h.add_argument("--api-key", default=None, help="--http: require 'Authorization: Bearer KEY' on /v1/")
    h.add_argument("--admin-key", default=None,
                   help="--http: serve the operator's /admin/nodes and /admin/retire (drain a node, then stop it), "
                        "to 'Authorization: Bearer KEY' only (docs/migration.md)")
    h.add_argument("--url-file", default=None, type=output_file, help="--http: write the API's base URL here (for scripts)")
    h.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE keys: encrypt and authenticate every link (python -m helix_async keys generate DIR)")
    h.add_argument("--insecure", action="store_true", help="allow plaintext links that leave this machine (warned)")
    h.set_defaults(handler=cmd_host)

    k = sub.add_parser("keys", help="CURVE key pairs for encrypted, authenticated links")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kg = ksub.add_parser("generate", help="a host key pair, N worker key pairs and the allow-list of their public keys")
    kg.add_argument("dir", help="directory to create (secret keys are written mode 600)")
    kg.add_argument("--workers", type=int_in(1, MAX_NODE_ID + 1), required=True, help="worker key pairs to make (worker-0 ...)")
    kg.set_defaults(handler=cmd_keys_generate)

    r = sub.add_parser("report", help="throughput and latency of a served run's logs (the original parser's definitions)")
    r.add_argument("dir", help="a host's --log-dir")
    r.add_argument("--warmup", type=nonnegative_seconds, default=60.0, help="window start, s (default %(default)s, as the original)")
    r.add_argument("--finish", type=nonnegative_seconds, default=300.0, help="window end, s (default %(default)s, as the original)")
    r.add_argument("--plots", action="store_true", help="also write throughput.png and latency.png into DIR")
    r.set_defaults(handler=cmd_report)

    from ..executors.registry import EXECUTORS

    dw = WorkerOptions(connect="")  # the flags' defaults
    w = sub.add_parser("worker", help="run one compute node of a real cluster (ZeroMQ)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="executors:\n" + "\n".join(f"  {e.describe()}" for e in EXECUTORS.values()))
    w.add_argument("--connect", required=True, type=endpoint, help="the host's address (tcp://HOST:PORT)")
    w.add_argument("--node-id", type=int_in(-1, MAX_NODE_ID, "a node id (-1: any)"), default=dw.node_id,
                   help="the plan node to serve (default: any free one of this type)")
    w.add_argument("--executor", default=dw.executor,
                   help=f"{', '.join(EXECUTORS)} (see below) (default %(default)s)")
    w.add_argument("--device", default=dw.device, help="device: cpu or cuda (default %(default)s)")
    w.add_argument("--machine-type", default=dw.machine_type, help="machine type (default CPU, or CUDA on a GPU)")
    w.add_argument("--memory-bytes", type=positive, default=dw.memory_bytes,
                   help="what the device may hold (refuse larger layer ranges)")
    w.add_argument("--bind", default=dw.bind, type=endpoint, help="inbox address (default %(default)s)")
    w.add_argument("--keys", default=dw.keys, metavar="DIR", help="CURVE keys (the same directory layout as the host's)")
    w.add_argument("--key-name", default=dw.key_name, help="--keys: this worker's key pair (default worker-<node id>)")
    w.add_argument("--insecure", action="store_true", help="allow plaintext links that leave this machine (warned)")
    w.add_argument("--advertise", default=dw.advertise, type=endpoint, metavar="ENDPOINT",
                   help="the address peers dial, when it differs from --bind (NAT, containers, proxies)")
    w.add_argument("--gather", type=number_in(0.0, 10.0), default=dw.gather, metavar="K",
                   help="before a decode batch, wait for the decodes on their way back that are expected within K "
                        "times the node's last run (0: never; default %(default)s; docs/runtime.md)")
    # (the executors' one "int" flag is --seed)
    _add_executor_flags(w, dw, {"int": seed, "positive": positive, "positive_int": positive_int})
    w.set_defaults(handler=cmd_worker)
