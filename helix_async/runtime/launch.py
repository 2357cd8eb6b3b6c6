"""``python -m helix_async launch --ray ADDRESS plan.toml``: the whole cluster on many machines, placed
and supervised by Ray.

Ray places the processes; it does not carry the traffic.  The launcher connects to a running Ray
cluster (``ray.init(address=ADDRESS)``: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``) and creates
one *process actor* for the host and one per plan node.  A process actor runs one ``python -m
helix_async host`` or ``worker`` process on the Ray node it was placed on and reports its output
and exit.  A worker's actor asks for the custom resource ``gpu_type:<TYPE>`` (1 unit) of its plan
node's machine type, so it lands on a Ray node started with, for instance, ``ray start
--resources='{"gpu_type:A100": 4}'``; with ``--device cuda`` and an executor that computes on one
(``executors.registry``: torch) it also takes one Ray GPU.  The host
binds its ZeroMQ inbox and the HTTP API on its node's IP address; workers connect to it and then
to each other over ZeroMQ, exactly as when started by hand.

The launcher streams every process's output prefixed with its role, waits until the host reports
every worker ready, prints the endpoint, and on Ctrl-C (or SIGTERM) stops the host (which stops
the workers), waits for every process, and removes the actors.  A process that exits before the
cluster is ready tears everything down with exit 1 and shows the end of its output.

The links are CURVE-encrypted and authenticated (docs/security.md): with ``--keys DIR`` (the same
path on every Ray node), or by default with keys made for the run on the launcher's machine (a
private temporary directory, removed at the end), each process getting only its own key pair, the
host's public key and the allow-list, written into its actor's private directory.  ``--insecure``
runs them in plaintext (warned).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import atomic_write_text, open_output_log

__all__ = ["ProcessActor", "cmd_launch"]


class ProcessActor:
    """One runtime process on a Ray node (the body of a Ray actor class; see the module doc)."""

    def __init__(self, role: str) -> None:
        import tempfile

        self.role = role
        self.dir = Path(tempfile.mkdtemp(prefix=f"helix-{role.replace(' ', '-')}-"))
        self.proc: Any = None
        self.log = self.dir / "output.log"

    def node_ip(self) -> str:
        """The address Ray knows this node by (what its peers can reach)."""
        import ray

        me = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == me and n.get("NodeManagerAddress"):
                return str(n["NodeManagerAddress"])
        return str(ray.util.get_node_ip_address())

    def write(self, name: str, text: str) -> str:
        path = self.dir / name
        atomic_write_text(path, text, name)
        return str(path)

    def write_keys(self, files: dict[str, str]) -> str:
        """This process's CURVE key files (``transport.curve.key_files``) in a private directory of
        its own; returns the directory (its ``--keys``)."""
        from ..transport.curve import write_key_files

        return write_key_files(self.dir / "keys", files)

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        import os
        import subprocess

        full_env = dict(os.environ, **(env or {}))
        with open_output_log(self.log) as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "helix_async", *argv], stdout=out,
                                         stderr=subprocess.STDOUT, env=full_env, cwd=self.dir, start_new_session=True)
        return int(self.proc.pid)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def read(self, offset: int) -> tuple[str, int]:
        """Output from byte ``offset`` on, and the next offset."""
        try:
            with self.log.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return "", offset
        return data.decode(errors="replace"), offset + len(data)

    def read_file(self, name: str) -> str:
        p = self.dir / name
        return p.read_text() if p.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        import subprocess

        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return int(p.returncode)


def _plan_roles(plan_path: str) -> tuple[Any, list[tuple[int, str]]]:
    from ..placement.io import read_placement

    placement = read_placement(plan_path)
    nodes = [(i, placement.cluster.machine(i).gpu) for i in sorted(placement.used_nodes())]
    return placement, nodes


def cmd_launch(args: argparse.Namespace) -> int:
    from ..extras import require

    ray = require("ray", "ray")
    placement, nodes = _plan_roles(args.plan)  # a bad plan fails here: exit 2, nothing started
    plan_text = Path(args.plan).read_text()
    if args.http:
        from ..frontend.openai_api import parse_http_address

        try:
            parse_http_address(args.http)
        except ValueError as e:
            raise ConfigError("<argument>", "--http", str(e)) from None
    try:
        ray.init(address=args.ray, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError("<argument>", "--ray", f"cannot connect to Ray at {args.ray!r}: {e}") from None
    try:
        with contextlib.ExitStack() as stack:
            run_keys_dir = ""
            if args.insecure:
                import logging

                logging.getLogger("helix_async.security").warning(
                    "--insecure: the links between the host and its workers are neither encrypted nor authenticated")
            elif not args.keys:
                from ..transport.curve import run_keys

                run_keys_dir = stack.enter_context(run_keys(max(i for i, _ in nodes) + 1))
            return _launch(ray, args, placement, nodes, plan_text, run_keys_dir)
    finally:
        ray.shutdown()


def _launch(ray: Any, args: argparse.Namespace, placement: Any, nodes: list[tuple[int, str]], plan_text: str,
            run_keys_dir: str = "") -> int:
    """run_keys_dir: keys made for this run (``curve.run_keys``), shipped to each process; "" when
    ``--keys`` or ``--insecure`` says how the links are secured."""
    from ..executors.registry import executor_entry
    from ..transport.curve import key_files

    def secure(actor: Any, name: str) -> list[str]:
        if run_keys_dir:
            return ["--keys", ray.get(actor.write_keys.remote(key_files(run_keys_dir, name)))]
        return ["--keys", args.keys] if args.keys else ["--insecure"]

    entry = executor_entry(args.executor)
    available = ray.cluster_resources()
    # machine types compare without case (as registration does): use the cluster's spelling
    by_lower = {k.lower(): k for k in available if k.startswith("gpu_type:")}
    resource: dict[str, str] = {}
    for i, gpu in nodes:
        name = by_lower.get(f"gpu_type:{gpu}".lower(), f"gpu_type:{gpu}")
        resource[gpu] = name
        need = sum(1 for _, g in nodes if g == gpu)
        if available.get(name, 0) < need:
            raise ConfigError("<argument>", "--ray", f"the plan needs {need} x {name} (node {i} and others); the Ray "
                              f"cluster offers {available.get(name, 0):g} (start its nodes with "
                              f"--resources='{{\"{name}\": N}}')")
    Actor = ray.remote(ProcessActor)
    host_opts: dict[str, Any] = {"num_cpus": 0}
    if args.host_resource:
        host_opts["resources"] = {args.host_resource: 0.001}
    host = Actor.options(**host_opts).remote("host")
    host_ip = ray.get(host.node_ip.remote())
    actors: dict[str, Any] = {"host": host}
    offsets: dict[str, int] = {"host": 0}
    stopping = {"flag": False}

    def on_signal(sig: int, frame: Any) -> None:
        stopping["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        plan_remote = ray.get(host.write.remote("plan.toml", plan_text))
        http = args.http
        if http and http.startswith("0.0.0.0:"):
            http = f"{host_ip}:{http.split(':', 1)[1]}"
        argv = ["--log-level", args.log_level, "host", "--plan", plan_remote, "--listen", f"tcp://{host_ip}:*",
                "--address-file", "host.address", "--seed", str(args.seed)]
        if http:
            argv += ["--http", http, "--url-file", "url"]
        if args.tokenizer:
            argv += ["--tokenizer", args.tokenizer]
        if entry.emulates:
            argv += ["--emulate", str(args.time_scale)]
        argv += secure(host, "host")
        ray.get(host.start.remote(argv))
        address = _wait_for(ray, host, "host.address", actors, offsets, stopping, timeout=120)
        if address is None:
            return 1 if not stopping["flag"] else 0
        print(f"[launch] host on {host_ip}: {address}", flush=True)
        for i, gpu in nodes:
            opts: dict[str, Any] = {"num_cpus": 0, "resources": {resource[gpu]: 1}}
            if args.device.startswith("cuda") and "cuda" in entry.devices:
                opts["num_gpus"] = 1
            w = Actor.options(**opts).remote(f"worker {i}")
            ip = ray.get(w.node_ip.remote())
            wargv = ["--log-level", args.log_level, "worker", "--connect", address, "--node-id", str(i), "--executor",
                     args.executor, "--device", args.device, "--bind", f"tcp://{ip}:*", "--seed", str(args.seed)]
            if entry.needs_profile:
                wargv += ["--machine-type", gpu]
            if entry.emulates:
                wplan = ray.get(w.write.remote("plan.toml", plan_text))
                wargv += ["--plan", wplan, "--time-scale", str(args.time_scale)]
            if args.checkpoint and entry.reads("--checkpoint"):
                wargv += ["--checkpoint", args.checkpoint]
            wargv += secure(w, f"worker-{i}")
            ray.get(w.start.remote(wargv))
            actors[f"worker {i}"] = w
            offsets[f"worker {i}"] = 0
        print(f"[launch] {len(nodes)} workers placed; waiting for them to load their layers", flush=True)
        ready = _wait_ready(ray, actors, offsets, stopping, len(nodes), timeout=args.ready_timeout)
        if not ready:
            return 1 if not stopping["flag"] else 0
        url = ray.get(host.read_file.remote("url")).strip()
        print(f"[launch] serving {placement.model}" + (f" on {url}/v1 (OpenAI API; /metrics)" if url else "") +
              "; Ctrl-C stops", flush=True)
        if args.url_file and url:
            atomic_write_text(args.url_file, url + "\n", "URL file", flag="--url-file")
        while not stopping["flag"]:
            _pump(ray, actors, offsets)
            dead = [r for r, a in actors.items() if ray.get(a.poll.remote()) is not None]
            if "host" in dead:
                print("[launch] the host exited; stopping", file=sys.stderr, flush=True)
                break
            time.sleep(0.5)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        print("[launch] stopping the cluster", flush=True)
        try:
            ray.get(host.stop.remote(), timeout=60)  # the host tells the workers to stop
        except Exception as e:  # noqa: BLE001 - teardown goes on whatever failed
            print(f"[launch] host stop: {e}", file=sys.stderr)
        for role, a in actors.items():
            if role != "host":
                try:
                    ray.get(a.stop.remote(timeout=15), timeout=60)
                except Exception as e:  # noqa: BLE001
                    print(f"[launch] {role} stop: {e}", file=sys.stderr)
        _pump(ray, actors, offsets)
        for a in actors.values():
            ray.kill(a)


def _pump(ray: Any, actors: dict[str, Any], offsets: dict[str, int]) -> str:
    """Print new output of every process, prefixed with its role; returns the host's new text."""
    host_text = ""
    reads = {r: a.read.remote(offsets[r]) for r, a in actors.items()}
    for role, ref in reads.items():
        text, offsets[role] = ray.get(ref)
        if role == "host":
            host_text = text
        for line in text.splitlines():
            if line.strip():
                print(f"[{role}] {line}", flush=True)
    return host_text


def _failed(ray: Any, actors: dict[str, Any]) -> str | None:
    for role, a in actors.items():
        rc = ray.get(a.poll.remote())
        if rc is not None:
            return f"{role} exited with {rc}"
    return None


def _wait(ray: Any, actors: dict[str, Any], offsets: dict[str, int], stopping: dict[str, bool], timeout: float,
          what: str, done: Any) -> Any:
    """Pump output until ``done(new host text)`` gives a value; None when a process exits, the
    timeout passes or a signal came."""
    deadline = time.monotonic() + timeout
    while not stopping["flag"]:
        got = done(_pump(ray, actors, offsets))
        if got:
            return got
        why = _failed(ray, actors)
        if why or time.monotonic() > deadline:
            print(f"[launch] error: {why or f'{what} after {timeout:g} s'}", file=sys.stderr, flush=True)
            return None
        time.sleep(0.2)
    return None


def _wait_for(ray: Any, actor: Any, name: str, actors: dict[str, Any], offsets: dict[str, int], stopping: dict[str, bool],
              timeout: float) -> str | None:
    got = _wait(ray, actors, offsets, stopping, timeout, f"no {name}",
                lambda _text: str(ray.get(actor.read_file.remote(name))).strip())
    return str(got) if got else None


def _wait_ready(ray: Any, actors: dict[str, Any], offsets: dict[str, int], stopping: dict[str, bool], n: int,
                timeout: float) -> bool:
    return bool(_wait(ray, actors, offsets, stopping, timeout, "the workers were not ready",
                      lambda text: f"all {n} workers ready" in text))


def add_parser(sub: Any, positive: Any) -> None:
    from ..cli.args import number_in, output_file, seconds, seed
    from ..executors.registry import EXECUTORS
    from ..settings import WorkerOptions

    la = sub.add_parser("launch", help="start the host and one worker per plan node as Ray actors on a Ray cluster")
    la.add_argument("plan", help="plan file (from `plan`)")
    la.add_argument("--ray", required=True, metavar="ADDRESS", help="the Ray cluster: auto, HOST:PORT or ray://HOST:PORT")
    la.add_argument("--executor", default=WorkerOptions.executor, choices=list(EXECUTORS),
                    help="the workers' executor (see `worker --help`) (default %(default)s)")
    la.add_argument("--device", default=WorkerOptions.device,
                    help="device of the workers (cuda: one Ray GPU each, for an executor that computes on one)")
    la.add_argument("--checkpoint", default=None, help="checkpoint directory, the same path on every Ray node")
    la.add_argument("--http", default="0.0.0.0:8000", metavar="HOST:PORT",
                    help="the host's HTTP API (0.0.0.0: the host node's IP) (default %(default)s)")
    la.add_argument("--tokenizer", default=None, help="as for host --tokenizer")
    la.add_argument("--time-scale", type=number_in(0.0, 1e6, low_open=True), default=1.0, help="cost-model: the emulation's time scale K")
    la.add_argument("--host-resource", default=None, help="a custom Ray resource that pins the host (e.g. node:10.0.0.5)")
    la.add_argument("--keys", default=None, metavar="DIR",
                    help="CURVE key directory, the same path on every Ray node (worker-N's pair for plan node N); "
                         "default: keys made for the run and copied to each process")
    la.add_argument("--insecure", action="store_true", help="plaintext links between the processes (warned)")
    la.add_argument("--seed", type=seed, default=0)
    la.add_argument("--ready-timeout", type=seconds, default=600.0, help="seconds for every worker to be ready")
    la.add_argument("--url-file", default=None, type=output_file, help="write the API's base URL here once serving")
    la.add_argument("--log-level", default="WARNING", help="the processes' log level (default %(default)s)")
    la.set_defaults(handler=cmd_launch)
