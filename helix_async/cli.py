"""Command line: ``python -m helix_async <command> ...``.

``main(argv) -> int`` is the entry point; ``__main__`` only calls it. Bad input (a ConfigError,
PlacementError or PlanningError) prints one line to stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import envs
from .errors import ConfigError, HelixError

if TYPE_CHECKING:
    from .cluster import ClusterSpec
    from .flowplan import FlowPlan
    from .placement import Placement

log = logging.getLogger("helix_async.cli")

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    """A finite number > 0 (seconds of a limit)."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _nonnegative(text: str) -> float:
    """A finite number >= 0."""
    value = _finite(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown level {text!r} (choose from {', '.join(_LOG_LEVELS)})")
    return level


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _pair(text: str) -> tuple[float, float]:
    """Parse "AVG" or "AVG,VAR" (finite numbers, scientific notation allowed)."""
    parts = text.split(",")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected AVG or AVG,VAR, got {text!r}")
    vals = [_finite(p) for p in parts]
    return (vals[0], vals[1] if len(vals) == 2 else 0.0)


def _parse_weights(text: str) -> dict[str, float]:
    """Parse "A100:4,L4:8,T4:12" into finite, non-negative weights; ValueError saying what is wrong."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, val = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"expected TYPE:NUMBER[,TYPE:NUMBER...], got {text!r}")
        try:
            weight = float(val)
        except ValueError:
            raise ValueError(f"the number after {name!r} is not a number: {val!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"the number after {name!r} must be finite and >= 0, got {val!r}")
        out[name] = weight
    return out


def _weights(text: str) -> dict[str, float]:
    try:
        return _parse_weights(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _plot_path(text: str) -> str:
    if Path(text).suffix.lower() not in _PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"expected a {'/'.join(_PLOT_SUFFIXES)} file name, got {text!r}")
    return text


_PLOT_SUFFIXES = (".png", ".pdf", ".svg")

# Defaults of the MILP search's flags; None on the command line means "not given".
_SEARCH_DEFAULTS: dict[str, Any] = {"time_limit": 600.0, "stall_limit": 120.0, "gap_limit": 0.0, "prune": None}
#: plan's served-objective flags (None on the command line means not given, so that a flag the
#: chosen objective ignores can be named)
_SERVED_DEFAULTS: dict[str, Any] = {
    "simulate_top": 6, "refine": 6, "sim_workload": "offline", "sim_rate": 700.0, "sim_window": 600.0, "sim_semantics": "helix",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line ``error: <command>: <message>``, exit 2.

    (argparse's own format is a usage block and then the message; ``--help`` still shows usage.)
    Sub-command parsers are made with the parent's class, so they inherit this.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {_one_line(f'{self.prog}: {message}')} (see {self.prog} --help)\n")


_MAX_MESSAGE = 500


def _one_line(text: str) -> str:
    """``text`` as one plain line: control characters (newlines, ESC, ...) escaped, and the middle
    of an over-long message (a 5,000-character file name) cut out."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > _MAX_MESSAGE:
        half = _MAX_MESSAGE // 2 - 10
        text = f"{text[:half]} ... ({len(text) - 2 * half} characters) ... {text[-half:]}"
    return text


def _build_parser() -> argparse.ArgumentParser:
    from .placement.search import METHODS
    from .placement.served import slo_argument

    p = _Parser(
        prog="python -m helix_async",
        description="Plan, simulate and serve LLMs over heterogeneous GPU clusters (after Helix, ASPLOS'25).",
    )
    p.add_argument(
        "--log-level", type=_log_level, default=None, help=f"logging level (default {envs.HELIX_LOG_LEVEL})"
    )
    sub = p.add_subparsers(dest="command", required=True)

    cl = sub.add_parser("cluster", help="inspect or generate cluster descriptions")
    clsub = cl.add_subparsers(dest="cluster_command", required=True)
    show = clsub.add_parser("show", help="summarise a cluster (builtin name, .toml or Helix .ini)")
    show.add_argument("cluster", help="builtin name (e.g. single24) or path")
    show.add_argument("--model", default="llama2-70b", help="model for throughput figures (default %(default)s)")
    show.add_argument("--machine-profile", help="Helix machine_profile.ini for an .ini cluster")

    gen = clsub.add_parser("generate", help="generate a seeded random cluster and write it as TOML")
    gen.add_argument("kind", choices=["single", "partitioned"])
    gen.add_argument("--out", required=True, help="TOML file to write")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--name", default=None)
    gen.add_argument("--nodes", type=_positive_int, default=24, help="single: number of compute nodes")
    gen.add_argument("--degree", type=int, default=None, help="single: average degree (default: complete)")
    gen.add_argument("--types", type=_weights, default={"A100": 4, "L4": 8, "T4": 12}, help="single: TYPE:WEIGHT,...")
    gen.add_argument("--bandwidth", type=_pair, default=(1e9, 0.0), help="single: AVG[,VAR] bytes/s")
    gen.add_argument("--latency", type=_pair, default=(1e-3, 0.0), help="single: AVG[,VAR] seconds")
    gen.add_argument(
        "--partition",
        action="append",
        default=[],
        help="partitioned: one region as TYPE:COUNT,... (repeat per region)",
    )
    gen.add_argument("--in-bandwidth", type=_pair, default=(1.25e9, 0.125e9))
    gen.add_argument("--in-latency", type=_pair, default=(1e-3, 0.0))
    gen.add_argument("--cross-bandwidth", type=_pair, default=(12.5e6, 2.5e6))
    gen.add_argument("--cross-latency", type=_pair, default=(0.05, 0.01))

    show.set_defaults(handler=cmd_cluster_show)
    gen.set_defaults(handler=cmd_cluster_generate)

    pl = sub.add_parser("plan", help="plan a layer placement (MILP search or a heuristic)")
    pl.add_argument("--cluster", default="single24", help="builtin name or path (default %(default)s)")
    pl.add_argument("--model", default="llama2-70b", help="model (default %(default)s)")
    pl.add_argument("--method", default="milp", choices=METHODS, help="planner (default %(default)s)")
    pl.add_argument("--time-limit", type=_positive, default=None,
                    help=f"milp: seconds of search (default {_SEARCH_DEFAULTS['time_limit']:g})")
    pl.add_argument("--stall-limit", type=_positive, default=None,
                    help=f"milp: stop after this many seconds without improvement "
                    f"(default {_SEARCH_DEFAULTS['stall_limit']:g})")
    pl.add_argument("--gap-limit", type=_nonnegative, default=None,
                    help="milp: stop at this relative gap to the bound, e.g. 0.01 (default 0)")
    pl.add_argument("--seed", type=int, default=None, help="seed of the search and of petals/swarm/homogeneous (default 0)")
    pl.add_argument("--partial", action="store_true",
                    help="milp: allow partial inference links (petals always uses them)")
    pl.add_argument("--prune", type=_positive_int, default=None, metavar="K",
                    help="milp: neighbourhoods keep each node's K fastest links plus the incumbent's")
    pl.add_argument("--out", default=None, help="plan file to write (.toml or .json; default out/plan.toml)")
    pl.add_argument("--plot", type=_plot_path, default=None, help="picture of the placement coloured by flow (.png, .pdf, .svg)")
    pl.add_argument("--quiet", action="store_true", help="no progress lines")
    pl.add_argument("--progress", action="store_true",
                    help="milp: a progress bar over the time limit with the incumbent and the gap, instead of lines")
    pl.add_argument("--objective", choices=("served", "maxflow"), default="served",
                    help="milp: served (default) = what the plan serves: the served model's decode throughput, "
                    "then the best candidates simulated; maxflow = Helix's objective")
    pl.add_argument("--slo", type=slo_argument, default=None, metavar="ttft=S,tpot=S",
                    help="served: maximise goodput, the decode throughput of requests meeting both limits")
    pl.add_argument("--simulate-top", type=_nonnegative_int, default=None, metavar="K",
                    help="served: simulate K plans (the best distinct candidates and, from K = 2, the max-flow "
                    f"plan; the heuristics' plans are simulated as well) and keep the one that serves best (0: trust the prediction; default {_SERVED_DEFAULTS['simulate_top']}). "
                    "The simulations run after the search's share of --time-limit")
    pl.add_argument("--refine", type=_nonnegative_int, default=None, metavar="K",
                    help="served: after the candidates, simulate up to K neighbours of the best one that the model "
                    "cannot rank (stages of a chain swapped; the least busy node moved to the range whose KV filled "
                    f"most), keeping what serves best (default {_SERVED_DEFAULTS['refine']}; 0: none)")
    pl.add_argument("--sim-workload", choices=("offline", "online"), default=None,
                    help=f"served: the workload candidates are predicted and simulated on (default {_SERVED_DEFAULTS['sim_workload']})")
    pl.add_argument("--sim-rate", type=_positive, default=None,
                    help=f"served, online workload: tokens/s offered (default {_SERVED_DEFAULTS['sim_rate']})")
    pl.add_argument("--sim-window", type=_positive, default=None,
                    help=f"served: seconds of each candidate's simulation window (default {_SERVED_DEFAULTS['sim_window']})")
    pl.add_argument("--sim-semantics", choices=("helix", "ours"), default=None,
                    help="served: simulate candidates with the original simulator's semantics (helix, as `sim run "
                    f"--compat helix`) or with ours (default {_SERVED_DEFAULTS['sim_semantics']})")
    pl.add_argument("--explain", action="store_true",
                    help="say what limits the plan (flow, KV on which nodes, latency on which stages) and which GPU "
                    "would help most")
    pl.set_defaults(handler=cmd_plan)

    fl = sub.add_parser("flow", help="flow analysis of an existing plan file")
    fl.add_argument("plan", help="plan file written by `plan`")
    fl.add_argument("--plot", type=_plot_path, default=None, help="picture of the placement coloured by flow (.png, .pdf, .svg)")
    fl.add_argument("--links", action="store_true", help="list every link's flow")
    fl.set_defaults(handler=cmd_flow)

    pr = sub.add_parser("profile", help="measure per-layer batch times with the torch executor (profile format)")
    pr.add_argument("--model", default="tiny-llama", help="model (default %(default)s)")
    pr.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default %(default)s)")
    pr.add_argument("--gpu", default=None, help="machine type to name the profile after (default: CPU or CUDA)")
    pr.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    pr.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default %(default)s)")
    pr.add_argument("--repeats", type=_positive_int, default=7, help="timed runs per point; the median is kept")
    pr.add_argument("--kv-bytes", type=_positive, default=256 * 2**20, help="KV budget of the machine type, bytes")
    pr.add_argument("--prompt-max-requests", type=_positive_int, default=4)
    pr.add_argument("--prompt-max-tokens", type=_positive_int, default=2048)
    pr.add_argument("--decode-max-tokens", type=_positive_int, default=128)
    pr.add_argument("--out", default=None, help="directory to write (default out/profile/<model>)")
    pr.set_defaults(handler=cmd_profile)

    from .runtime.commands import add_parsers

    add_parsers(sub, _positive_int, _positive, _pair)
    from .runtime.serve import add_parser as add_serve_parser

    add_serve_parser(sub, _positive_int, _positive)
    from .frontend.bench_serve import add_parser as add_bench_serve_parser

    add_bench_serve_parser(sub, _positive)
    from .runtime.launch import add_parser as add_launch_parser

    add_launch_parser(sub, _positive)

    demo = sub.add_parser("demo", help="the main job: plan and simulate single24 (LLaMA-2 70B), serve the tiny model")
    demo.add_argument("--quick", action="store_true", help="short time limits (CI)")
    demo.add_argument("--out", default=None, help="directory for the demo's files (default out/demo)")
    demo.set_defaults(handler=cmd_demo)
    return p


def _fmt_bw(bps: float) -> str:
    for unit, div in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.3g} {unit}"
    return f"{bps:.3g} B/s"


def cmd_cluster_show(args: argparse.Namespace) -> int:
    from .cluster import import_helix_ini, load_cluster
    from .ids import SINK, SOURCE
    from .model import ThroughputModel, check_fits, get_model, max_compute_throughput

    if args.machine_profile:
        spec = import_helix_ini(args.cluster, args.machine_profile)
    else:
        spec = load_cluster(args.cluster)
    model = get_model(args.model)
    print(f"cluster {spec.name} ({spec.source_file}): {spec.num_nodes} nodes, {len(spec.links)} links")
    counts = spec.machine_counts()
    print("machine types:")
    for name, n in counts.items():
        m = spec.machine_types[name]
        print(
            f"  {name:6s} x{n:<3d} gpus={m.num_gpus} vram={m.vram_bytes / 1e9:.0f} GB "
            f"nic in/out={_fmt_bw(m.nic_in)}/{_fmt_bw(m.nic_out)} profile={m.gpu}"
        )
    regions = spec.regions()
    if len(regions) > 1:
        print("regions:")
        for r, ids in regions.items():
            print(f"  {r}: {len(ids)} nodes {ids[0]}..{ids[-1]}")
    arcs = spec.arcs()
    src = [a for a in arcs if a.src == SOURCE]
    snk = [a for a in arcs if a.dst == SINK]
    pair = [a for a in arcs if a.src != SOURCE and a.dst != SINK]
    for label, group in (("coordinator->node", src), ("node->coordinator", snk), ("node->node", pair)):
        if group:
            bws = [a.bandwidth for a in group]
            lats = [a.latency for a in group]
            print(
                f"links {label}: {len(group)} arcs, bandwidth {_fmt_bw(min(bws))}..{_fmt_bw(max(bws))}, "
                f"latency {min(lats) * 1e3:.3g}..{max(lats) * 1e3:.3g} ms"
            )
    print(f"complete graph: {'yes' if spec.is_complete() else 'no'}")
    tm = ThroughputModel.for_cluster(model, spec)
    check_fits(spec, model, tm)
    fit = sum(tm.max_layers(spec.machine(n.id)) for n in spec.nodes)
    print(f"model {model.name}: {model.num_layers} layers; the nodes hold up to {fit} layers in total")
    print(f"max compute throughput: {max_compute_throughput(spec, model, tm):.2f} tokens/s")
    return EXIT_OK


# The generators' argument names (in their ConfigErrors) -> the flags that set them.
_GENERATOR_FLAGS = {
    "n": "--nodes",
    "avg_degree": "--degree",
    "type_weights": "--types",
    "partitions": "--partition",
    "name": "--name",
    "seed": "--seed",
    "bandwidth": "--bandwidth",
    "latency": "--latency",
    "in_bandwidth": "--in-bandwidth",
    "in_latency": "--in-latency",
    "cross_bandwidth": "--cross-bandwidth",
    "cross_latency": "--cross-latency",
}


def _generator_error(exc: ConfigError, kind: str) -> ConfigError:
    """A generator's ConfigError about one of its arguments, re-addressed to the flag that set it."""
    if not exc.source.startswith("<"):
        return exc
    head, _, index = exc.field.partition("[")
    if head == "machine type":
        flag = "--types" if kind == "single" else "--partition"
    elif head in _GENERATOR_FLAGS:
        flag = _GENERATOR_FLAGS[head]
    else:
        return exc
    if flag.endswith(("bandwidth", "latency")) and index in ("0]", "1]"):
        flag += " AVG" if index == "0]" else " VAR"
    return ConfigError("<argument>", flag, exc.message)


def cmd_cluster_generate(args: argparse.Namespace) -> int:
    from .cluster import write_cluster_toml
    from .cluster.generate import MAX_GENERATED_NODES
    from .fileio import MAX_FILE_BYTES, check_output_path

    out = check_output_path(args.out, "cluster file")
    # Generated clusters are complete graphs: N nodes make N*(N-1)/2 pair links plus 2N coordinator
    # links, each about 90 bytes of TOML. Refuse up front what the readers could not read back.
    max_nodes = MAX_GENERATED_NODES
    while max_nodes > 1 and (max_nodes * (max_nodes - 1) // 2 + 2 * max_nodes) * _TOML_BYTES_PER_LINK > MAX_FILE_BYTES:
        max_nodes -= 1
    try:
        spec = _generate(args, max_nodes)
    except ConfigError as exc:
        raise _generator_error(exc, args.kind) from None
    write_cluster_toml(spec, out)
    print(f"wrote {out}: {spec.num_nodes} nodes, {len(spec.links)} links, {len(spec.regions())} region(s)")
    return EXIT_OK


_TOML_BYTES_PER_LINK = 100  # measured: about 89 bytes per [[links]] table


def _generate(args: argparse.Namespace, max_nodes: int) -> ClusterSpec:
    """The cluster ``cluster generate`` asks for (ConfigErrors name the generators' arguments)."""
    from .cluster import generate_partitioned, generate_single_region

    if args.kind == "single":
        if args.nodes > max_nodes:  # checked here too: the generator must never see it
            raise ConfigError(
                "<argument>", "--nodes", f"must be an integer in [1, {max_nodes}] (what a cluster file holds), got {args.nodes}"
            )
        degree = args.degree if args.degree is not None else args.nodes - 1
        return generate_single_region(
            args.nodes,
            degree,
            args.types,
            bandwidth=args.bandwidth,
            latency=args.latency,
            seed=args.seed,
            name=args.name or f"single{args.nodes}_seed{args.seed}",
        )
    if not args.partition:
        raise ConfigError("<argument>", "--partition", "give at least one region, e.g. --partition A100:4")
    parts: list[list[str]] = []
    total = 0
    for text in args.partition:
        try:
            counts = _parse_weights(text)
        except ValueError as exc:
            raise ConfigError("<argument>", "--partition", str(exc)) from None
        region: list[str] = []
        for t, n in counts.items():
            if n != int(n):
                raise ConfigError("<argument>", "--partition", f"count of {t} must be a whole number, got {n:g}")
            total += int(n)
            if total > max_nodes:
                raise ConfigError("<argument>", "--partition", f"more than {max_nodes} nodes in all")
            region += [t] * int(n)
        if not region:
            raise ConfigError("<argument>", "--partition", f"region {text!r} has no nodes")
        parts.append(region)
    return generate_partitioned(
        parts,
        in_bandwidth=args.in_bandwidth,
        in_latency=args.in_latency,
        cross_bandwidth=args.cross_bandwidth,
        cross_latency=args.cross_latency,
        seed=args.seed,
        name=args.name or f"partitioned{len(parts)}_seed{args.seed}",
    )


def _print_flow_summary(placement: Placement, flow: FlowPlan, *, links: bool = False) -> None:
    used = placement.used_nodes()
    print(f"plan: {placement.method} placement of {placement.model} on {placement.cluster.name}")
    print(f"  nodes used: {len(used)} of {placement.cluster.num_nodes}; links: {len(placement.links)}")
    print(f"  max compute throughput: {flow.max_compute_throughput:.2f} tokens/s")
    print(f"  max flow: {flow.value:.4f} tokens/s")
    print("  node  type   layers    flow/capacity (tokens/s)")
    for i in sorted(placement.layers):
        r = placement.layers[i]
        if r is None:
            continue
        m = placement.cluster.machine(i)
        f = flow.node_flows.get(i, 0.0)
        c = flow.node_capacity.get(i, 0.0)
        print(f"  {i:4d}  {m.name:6s} [{r[0]:2d},{r[1]:2d})   {f:9.2f} / {c:9.2f}  ({100 * f / c if c else 0:5.1f}%)")
    if links:
        print("  links (tokens/s):")
        for (u, v), f in sorted(flow.link_flows.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            print(f"    {u}->{v}: {f:.3f}")


def _cmd_plan_served(args: argparse.Namespace, spec: Any, out: Path, seed: int, time_limit: float) -> int:
    import time

    from .placement.flow import max_flow
    from .placement.io import write_placement
    from .placement.served import ServedWorkload
    from .placement.served_plan import explain, plan_served
    from .signals import SignalStop, StopFlag

    t0 = time.monotonic()
    wl = ServedWorkload(mode=args.sim_workload, rate=args.sim_rate)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - t0:7.1f}s] {line}", file=sys.stderr, flush=True)

    with SignalStop(StopFlag()) as stop:
        res = plan_served(spec, args.model, time_limit=time_limit, seed=seed, slo=args.slo, workload=wl,
                          simulate_top=args.simulate_top, refine=args.refine, sim_window=args.sim_window,
                          sim_compat=args.sim_semantics == "helix", partial=args.partial,
                          stop=stop, log=say)
    flow = max_flow(res.placement)
    write_placement(res.placement, out, flow=flow)
    what = "decode tok/s" if args.slo is None else f"goodput ({args.slo})"
    print(f"planned {res.placement.model} on {spec.name} for the served objective in {res.seconds:.1f} s "
          f"({args.sim_workload} workload{'' if args.slo is None else f', SLO {args.slo}'})")
    head = f"{'candidate':<52} {'max flow':>9} {'predicted':>10} {'pred TPOT':>9} {'simulated':>10} {'sim TPOT':>9}"
    print(f"candidates ({what}; simulated: {res.sim_window:g}-s window, seed {seed}, {args.sim_semantics} semantics):")
    print(head)
    for r in res.rows:
        sim = r.simulated
        mark = "*" if r is res.row else " "
        print(f"{mark}{r.source[:51]:<51} {r.max_flow:9.1f} {r.predicted:10.1f} {r.predicted_tpot:9.3f} "
              + (f"{sim['score']:10.1f} " if sim else f"{'-':>10} ")
              + (f"{sim['tpot_mean']:9.3f}" if sim and sim["tpot_mean"] is not None else f"{'-':>9}"))
    for r in res.rows:
        if r.second_seed is not None:
            print(f"{'*' if r is res.row else ' '}{r.source[:51]} on seed {seed + 1}: {r.second_seed:.1f} "
                  f"(a close call against a baseline, decided by the mean of two seeds)")
    print(f"max flow: {flow.value:.4f} tokens/s")
    print(f"max-flow upper bound (a bound on max flow, not on the served objective): {res.maxflow.upper_bound:.4f} "
          f"tokens/s ({res.maxflow.bound_source})")
    print(f"plan written to {out}")
    if args.explain:
        for line in explain(res.placement, wl, slo=args.slo, seed=seed):
            print("explain: " + line)
    if args.plot:
        from .plots import plot_placement

        plot_placement(res.placement, flow, args.plot, title_extra=_explain_title(res.placement, wl))
        print(f"plot written to {args.plot}")
    return EXIT_OK


def _explain_title(placement: Any, wl: Any) -> str:
    from .placement.served import ServedModel

    p = ServedModel(wl).predict(placement)
    return f"predicted {p.decode_throughput:.0f} decode tok/s; limited by {p.limit}"


def cmd_plan(args: argparse.Namespace) -> int:
    import time

    from .cluster import load_cluster
    from .extras import require
    from .fileio import check_output_path
    from .placement.flow import max_flow
    from .placement.heuristics import SEEDED_HEURISTICS
    from .placement.io import write_placement
    from .placement.search import plan
    from .signals import SignalStop, StopFlag

    given = {k for k in _SEARCH_DEFAULTS if getattr(args, k) is not None}
    if args.partial:
        given.add("partial")
    if args.method != "milp" and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
        verb = "applies" if len(given) == 1 else "apply"
        print(f"note: {flags} only {verb} to --method milp; ignored for {args.method}", file=sys.stderr)
    if args.seed is not None and args.method != "milp" and args.method not in SEEDED_HEURISTICS:
        print(f"note: --seed does not change {args.method} (it draws nothing at random); ignored", file=sys.stderr)
    seed = 0 if args.seed is None else args.seed
    search = {k: (_SEARCH_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)) for k in _SEARCH_DEFAULTS}
    if args.out is None:
        default_out = Path(envs.HELIX_OUT_DIR) / "plan.toml"
        default_out.parent.mkdir(parents=True, exist_ok=True)
    out = check_output_path(default_out if args.out is None else args.out, "plan file")
    if args.plot:
        check_output_path(args.plot, "plot", "--plot")
        require("matplotlib", "plots")  # fail before the search, not after it
    if args.slo is not None and not (args.method == "milp" and args.objective == "served"):
        raise ConfigError("<argument>", "--slo", "applies to --objective served (with --method milp)")
    if args.method == "milp":
        require("pyscipopt", "plan")
    served_given = {k for k in _SERVED_DEFAULTS if getattr(args, k) is not None}
    for k, v in _SERVED_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not (args.method == "milp" and args.objective == "served"):
        # --explain predicts on the named workload under either objective
        unused = served_given - ({"sim_workload", "sim_rate"} if args.explain else set())
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(unused))
            print(f"note: {flags} only apply to the served objective; ignored", file=sys.stderr)
    spec = load_cluster(args.cluster)
    if args.method == "milp" and args.objective == "served":
        ignored = [f"--{k.replace('_', '-')}" for k in ("stall_limit", "gap_limit", "prune") if k in given]
        ignored += ["--progress"] if args.progress else []
        if ignored:
            print(f"note: {', '.join(ignored)} only apply to --objective maxflow; ignored", file=sys.stderr)
        return _cmd_plan_served(args, spec, out, seed, search["time_limit"])

    def on_improve(placement: Placement, value: float) -> None:
        write_placement(placement, out)

    t0 = time.monotonic()
    bar = _PlanBar(search["time_limit"], t0) if args.progress and args.method == "milp" else None

    def progress(ev: dict[str, Any]) -> None:
        if bar is not None:
            bar.event(ev)
            return
        if args.quiet:
            return
        print(
            f"[{ev['elapsed']:7.1f}s] incumbent {ev['incumbent']:10.3f}  bound {ev['bound']:10.3f}  "
            f"gap {100 * ev['gap']:6.2f}%  ({ev['event']}: {ev['source']})",
            file=sys.stderr,
            flush=True,
        )

    try:
        with SignalStop(StopFlag()) as stop:
            result = plan(
                spec,
                args.model,
                method=args.method,
                time_limit=search["time_limit"],
                stall_limit=search["stall_limit"],
                gap_limit=search["gap_limit"],
                seed=seed,
                partial=args.partial,
                prune=search["prune"],
                on_improve=on_improve,
                progress=progress,
                stop=stop,
            )
    finally:
        if bar is not None:
            bar.close()
    flow = max_flow(result.placement)
    write_placement(result.placement, out, flow=flow)
    print(f"planned {result.placement.model} on {spec.name} with {args.method} in {time.monotonic() - t0:.1f} s "
          f"(stopped: {result.stopped}; best found by {result.found_by})")
    if result.heuristics:
        print("heuristics (max flow, tokens/s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.heuristics.items()))
    print(f"max compute throughput: {result.max_compute_throughput:.2f} tokens/s")
    print(f"max flow: {result.value:.4f} tokens/s")
    print(f"upper bound: {result.upper_bound:.4f} tokens/s ({result.bound_source}); gap {100 * result.gap:.2f}%")
    print(f"plan written to {out}")
    if args.explain:
        from .placement.served import ServedWorkload
        from .placement.served_plan import explain

        wl = ServedWorkload(mode=args.sim_workload, rate=args.sim_rate)
        for line in explain(result.placement, wl, seed=seed):
            print("explain: " + line)
    if args.plot:
        from .plots import plot_placement

        plot_placement(result.placement, flow, args.plot)
        print(f"plot written to {args.plot}")
    return EXIT_OK


class _PlanBar:
    """``plan --progress``: a tqdm bar over the search's time limit (it may stop sooner), showing the
    incumbent and the gap; a display thread advances it between the search's events."""

    def __init__(self, time_limit: float, t0: float) -> None:
        import threading
        import time

        from tqdm import tqdm

        self._t0 = t0
        self._now = time.monotonic
        self._total = max(1, round(time_limit))
        self._bar = tqdm(total=self._total, unit="s", desc="planning", file=sys.stderr, leave=False,
                         dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s{postfix}")
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True, name="plan-progress")
        self._thread.start()

    def _advance(self) -> None:
        n = min(self._total, int(self._now() - self._t0))
        if n > self._bar.n:
            self._bar.update(n - self._bar.n)

    def _tick(self) -> None:
        while not self._done.wait(0.5):
            with self._lock:
                self._advance()

    def event(self, ev: dict[str, Any]) -> None:
        with self._lock:
            self._bar.set_postfix_str(f"max flow {ev['incumbent']:.1f}, bound {ev['bound']:.1f}, gap {100 * ev['gap']:.1f}%",
                                      refresh=False)
            self._advance()
            self._bar.refresh()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=2)
        self._bar.close()


def cmd_flow(args: argparse.Namespace) -> int:
    from .extras import require
    from .fileio import check_output_path
    from .placement.flow import max_flow
    from .placement.io import read_placement

    if args.plot:
        check_output_path(args.plot, "plot", "--plot")
        require("matplotlib", "plots")
    placement = read_placement(args.plan)
    flow = max_flow(placement)
    _print_flow_summary(placement, flow, links=args.links)
    if args.plot:
        from .plots import plot_placement

        plot_placement(placement, flow, args.plot)
        print(f"plot written to {args.plot}")
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from .extras import require

    require("torch", "torch")
    from .executors.profiling import DECODE_GRID, PROMPT_GRID, measure, node_settings_rows, write_profile
    from .model import get_model

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


def cmd_demo(args: argparse.Namespace) -> int:
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
    # The simulator is its own package (the runtime never imports it): run it as a program.
    window = "60" if args.quick else "600"
    print(f"\n== 4. simulate the plan (offline MaxFlow, {window}-s window, virtual time) ==")
    sim_argv = [sys.executable, "-m", "sim", "run", "--plan", str(plan_file), "--duration", window,
                "--report", str(out / "sim"), "--progress"]
    if not args.quick:
        sim_argv.append("--plots")
    rc = subprocess.run(sim_argv, check=False).returncode
    if rc:
        return rc
    print("\n== 5. serve the tiny LLaMA for real: a host and 3 torch workers as processes on loopback ==")
    from .runtime.demo import serve_tiny

    return serve_tiny(out / "serve", requests=8 if args.quick else 24)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input, after one ``error:`` line)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # a usage error (one line, see _Parser) or --help
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    level = args.log_level or envs.HELIX_LOG_LEVEL.strip().upper()
    if level not in _LOG_LEVELS:
        print(f"error: HELIX_LOG_LEVEL: unknown level {_one_line(repr(envs.HELIX_LOG_LEVEL))} "
              f"(choose from {', '.join(_LOG_LEVELS)})", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return dispatch(args.handler, args)


def dispatch(handler: Any, args: argparse.Namespace) -> int:
    """Run a command handler; bad input (HelixError, OSError) becomes one ``error:`` line and
    exit 2, Ctrl-C exit 130. Shared with ``python -m sim``."""
    try:
        return int(handler(args))
    except HelixError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {_one_line(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
