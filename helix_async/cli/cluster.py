"""``cluster show`` and ``cluster generate``: inspect a cluster description, or write a seeded random one."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .args import EXIT_OK, model_ref, nonnegative_int, pair, parse_weights, positive_int, seed, weights

if TYPE_CHECKING:
    from ..cluster import ClusterSpec

__all__ = ["add_parser", "cmd_cluster_generate", "cmd_cluster_show", "fmt_bw"]


def add_parser(sub: Any) -> None:
    """The ``cluster`` command and its two sub-commands, on ``sub`` (argparse sub-parsers)."""
    cl = sub.add_parser("cluster", help="inspect or generate cluster descriptions")
    clsub = cl.add_subparsers(dest="cluster_command", required=True)
    show = clsub.add_parser("show", help="summarise a cluster (builtin name, .toml or Helix .ini)")
    show.add_argument("cluster", help="builtin name (e.g. single24) or path")
    show.add_argument("--model", default="llama2-70b", type=model_ref,
                      help="model for throughput figures: NAME, a checkpoint directory or a FILE.gguf (default %(default)s)")
    show.add_argument("--machine-profile", help="Helix machine_profile.ini for an .ini cluster")

    gen = clsub.add_parser("generate", help="generate a seeded random cluster and write it as TOML")
    gen.add_argument("kind", choices=["single", "partitioned"])
    gen.add_argument("--out", required=True, help="TOML file to write")
    gen.add_argument("--seed", type=seed, default=0)
    gen.add_argument("--name", default=None)
    gen.add_argument("--nodes", type=positive_int, default=24, help="single: number of compute nodes")
    gen.add_argument("--degree", type=nonnegative_int, default=None, help="single: average degree (default: complete)")
    gen.add_argument("--types", type=weights, default={"A100": 4, "L4": 8, "T4": 12}, help="single: TYPE:WEIGHT,...")
    gen.add_argument("--bandwidth", type=pair, default=(1e9, 0.0), help="single: AVG[,VAR] bytes/s")
    gen.add_argument("--latency", type=pair, default=(1e-3, 0.0), help="single: AVG[,VAR] seconds")
    gen.add_argument(
        "--partition",
        action="append",
        default=[],
        help="partitioned: one region as TYPE:COUNT,... (repeat per region)",
    )
    gen.add_argument("--in-bandwidth", type=pair, default=(1.25e9, 0.125e9))
    gen.add_argument("--in-latency", type=pair, default=(1e-3, 0.0))
    gen.add_argument("--cross-bandwidth", type=pair, default=(12.5e6, 2.5e6))
    gen.add_argument("--cross-latency", type=pair, default=(0.05, 0.01))

    show.set_defaults(handler=cmd_cluster_show)
    gen.set_defaults(handler=cmd_cluster_generate)


def fmt_bw(bps: float) -> str:
    """A bandwidth in bytes/s as people read it (``1.25 GB/s``)."""
    for unit, div in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.3g} {unit}"
    return f"{bps:.3g} B/s"


def cmd_cluster_show(args: argparse.Namespace) -> int:
    from ..cluster import import_helix_ini, load_cluster
    from ..ids import SINK, SOURCE
    from ..model import ThroughputModel, check_fits, get_model, load_profiles, max_compute_throughput

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
            f"nic in/out={fmt_bw(m.nic_in)}/{fmt_bw(m.nic_out)} profile={m.gpu} "
            f"({load_profiles(model).kind(m.gpu) or 'none'})"
        )
    regions = spec.regions()
    if len(regions) > 1:
        print("regions:")
        for r, ids in regions.items():
            print(f"  {r}: {len(ids)} nodes {ids[0]}..{ids[-1]}")
    arcs = spec.arcs()
    src = [a for a in arcs if a.src == SOURCE]
    snk = [a for a in arcs if a.dst == SINK]
    pair_arcs = [a for a in arcs if a.src != SOURCE and a.dst != SINK]
    for label, group in (("coordinator->node", src), ("node->coordinator", snk), ("node->node", pair_arcs)):
        if group:
            bws = [a.bandwidth for a in group]
            lats = [a.latency for a in group]
            print(
                f"links {label}: {len(group)} arcs, bandwidth {fmt_bw(min(bws))}..{fmt_bw(max(bws))}, "
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
    from ..cluster import write_cluster_toml
    from ..cluster.generate import MAX_GENERATED_NODES
    from ..fileio import MAX_FILE_BYTES, check_output_path

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
    from ..cluster import generate_partitioned, generate_single_region

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
            counts = parse_weights(text)
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
