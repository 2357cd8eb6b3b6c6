"""``flow``: the flow analysis of a plan file (max flow, each node's flow against its capacity)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .args import EXIT_OK, plot_path

if TYPE_CHECKING:
    from ..flowplan import FlowPlan
    from ..placement import Placement

__all__ = ["add_parser", "cmd_flow", "print_flow_summary"]


def add_parser(sub: Any) -> None:
    """The ``flow`` command, on ``sub`` (argparse sub-parsers)."""
    fl = sub.add_parser("flow", help="flow analysis of an existing plan file")
    fl.add_argument("plan", help="plan file written by `plan`")
    fl.add_argument("--plot", type=plot_path, default=None, help="picture of the placement coloured by flow (.png, .pdf, .svg)")
    fl.add_argument("--links", action="store_true", help="list every link's flow")
    fl.set_defaults(handler=cmd_flow)


def print_flow_summary(placement: Placement, flow: FlowPlan, *, links: bool = False) -> None:
    """The plan's nodes, their ranges and flows (tokens/s), and with ``links`` every link's flow."""
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


def cmd_flow(args: argparse.Namespace) -> int:
    from ..extras import require
    from ..fileio import check_output_path
    from ..placement.flow import max_flow
    from ..placement.io import read_placement

    if args.plot:
        check_output_path(args.plot, "plot", "--plot")
        require("matplotlib", "plots")
    placement = read_placement(args.plan)
    flow = max_flow(placement)
    print_flow_summary(placement, flow, links=args.links)
    if args.plot:
        from ..plots import plot_placement

        plot_placement(placement, flow, args.plot)
        print(f"plot written to {args.plot}")
    return EXIT_OK
