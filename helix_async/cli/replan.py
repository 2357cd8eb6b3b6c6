"""``replan``: a plan without some nodes or with new ones, from the plan in force, moving few
others (:func:`helix_async.placement.replan.replan`)."""

from __future__ import annotations

import argparse
from typing import Any

from .args import EXIT_OK, int_in, node_id, positive_int, seed

__all__ = ["add_parser", "cmd_replan"]

#: most branch-and-bound nodes one try may take (a bound on the work)
MAX_NODE_LIMIT = 10_000_000


def add_parser(sub: Any) -> None:
    """The ``replan`` command, on ``sub`` (argparse sub-parsers)."""
    rp = sub.add_parser("replan", help="re-place layers from a plan in force, without some nodes or with new ones, "
                        "moving few others")
    rp.add_argument("--from", dest="plan", required=True, help="the plan in force (a file written by `plan`)")
    rp.add_argument("--lose", type=node_id, action="append", default=[], metavar="NODE",
                    help="a node that leaves (repeatable)")
    rp.add_argument("--add", action="append", default=[], metavar="TYPE",
                    help="a node of this machine type joins (repeatable), connected as a node of its region is")
    rp.add_argument("--region", default=None, help="the region new nodes join (default: the one with the most nodes)")
    rp.add_argument("--max-moves", type=positive_int, default=4, metavar="K",
                    help="most other nodes that may change their layers (default %(default)s)")
    rp.add_argument("--tries", type=positive_int, default=6, metavar="N",
                    help="MILP neighbourhoods to solve (default %(default)s)")
    rp.add_argument("--node-limit", type=int_in(1, MAX_NODE_LIMIT), default=2000, metavar="N",
                    help="branch-and-bound nodes per try: a bound on the work (default %(default)s)")
    rp.add_argument("--seed", type=seed, default=0, help="seed of the tries' choices (default 0)")
    rp.add_argument("--out", default=None, help="plan file to write (.toml or .json; default out/replan.toml)")
    rp.set_defaults(handler=cmd_replan)


def cmd_replan(args: argparse.Namespace) -> int:
    from ..fileio import check_output_path
    from ..placement.flow import max_flow
    from ..placement.io import read_placement, write_placement
    from ..placement.replan import replan

    out = check_output_path("out/replan.toml" if args.out is None else args.out, "plan file")
    placement = read_placement(args.plan)
    res = replan(placement, sorted(set(args.lose)), add=args.add, region=args.region, max_moves=args.max_moves,
                 tries=args.tries, node_limit=args.node_limit, seed=args.seed)
    change = ", ".join([*(f"without node {i}" for i in sorted(set(args.lose))), *(f"with a new {t}" for t in args.add)])
    print(f"replan of {args.plan} {change}: {res.tries} tries of at most {args.max_moves} moves")
    print(f"  max flow: {res.before:.2f} tokens/s before; {res.without:.2f} with the change and nobody "
          f"moving; {res.after:.2f} after re-placing")
    for i, r in res.added.items():
        print(f"  new node {i} ({res.placement.cluster.machine(i).name}): {'-' if r is None else f'[{r[0]}, {r[1]})'}")
    print(f"  moved {len(res.moved)} node(s):" + ("" if res.moved else " none"))
    for i, (a, b) in res.moved.items():
        print(f"    node {i}: {'-' if a is None else f'[{a[0]}, {a[1]})'} -> {'-' if b is None else f'[{b[0]}, {b[1]})'}")
    path = write_placement(res.placement, out, flow=max_flow(res.placement))
    print(f"plan written to {path}")
    return EXIT_OK



