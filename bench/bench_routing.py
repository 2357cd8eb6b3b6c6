"""Routing hot paths: compiled vs pure Python, in one run.

Run: ``python bench/bench_routing.py`` (needs the compiled build: ``pip install -e .``).

* ``IWRR.choose`` with 2, 8 and 64 candidates (preset mask; one call per admission hop);
* ``FlowRouter.route`` of one request through the single24 ILP flow plan (every hop, with the
  prompt-limit and KV checks, the KV reservation) followed by the matching ``finish`` so the KV
  never fills;
* ``FlowRouter.on_decode`` of a stored route (one call per decode iteration of every request).

Targets: choose <= 150 ns at 8 candidates and >= 10x the pure twin; route + finish <= 5 us.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ns_per_op, table  # noqa: E402

from helix_async.placement import load_shipped_layout  # noqa: E402
from helix_async.placement.flow import max_flow  # noqa: E402
from helix_async.routing import IWRRC, FlowRouterC, FlowRouterPy, IWRRPy, KVTrackerC, KVTrackerPy  # noqa: E402

N_CALLS = 1000


def _choose_loop(iw, works):
    def run() -> None:
        ch = iw.choose
        for w in works:
            ch(w)

    return run


def _route_loop(router, lengths):
    def run() -> None:
        route = router.route
        finish = router.finish
        for i, n in enumerate(lengths):
            route(i, n)
            finish(i)

    return run


def _decode_loop(router, routes):
    def run() -> None:
        dec = router.on_decode
        for r in routes:
            dec(r)

    return run


def main() -> int:
    if IWRRC is None:
        print("compiled extension not built (HELIX_NO_EXTENSIONS=1?); nothing to compare", file=sys.stderr)
        return 1
    rng = random.Random(0)
    rows: list[tuple[str, ...]] = []
    works = [float(rng.randint(1, 2048)) for _ in range(N_CALLS)]
    for n in (2, 8, 64):
        weights = [rng.uniform(10.0, 1300.0) for _ in range(n)]
        nc = ns_per_op(_choose_loop(IWRRC(weights), works), len(works))
        npy = ns_per_op(_choose_loop(IWRRPy(weights), works), len(works))
        rows.append((f"IWRR.choose, {n} candidates", f"{nc:.1f}", f"{npy:.1f}", f"{npy / nc:.1f}x"))

    placement = load_shipped_layout("ilp")
    plan = max_flow(placement)
    assert FlowRouterC is not None and KVTrackerC is not None
    routers = {}
    for name, router_cls, kv_cls in (("c", FlowRouterC, KVTrackerC), ("py", FlowRouterPy, KVTrackerPy)):
        kv = kv_cls.from_placement(placement, kv_fill_limit=0.85, output_ratio=1.0)
        routers[name] = router_cls.from_plan(placement, plan, kv)
    lengths = [rng.randint(1, 2048) for _ in range(200)]
    nc = ns_per_op(_route_loop(routers["c"], lengths), len(lengths))
    npy = ns_per_op(_route_loop(routers["py"], lengths), len(lengths))
    probes = [routers["c"].route(f"probe{i}", n) for i, n in enumerate(lengths[:20])]
    # a route's hops: one into each stage, then the last stage's hop to the (implicit) sink
    hops = sum(len(r) + 1 for r in probes if r is not None) / len(probes)
    rows.append(
        (f"route + finish, single24 ILP ({hops:.0f} hops)", f"{nc:.1f}", f"{npy:.1f}", f"{npy / nc:.1f}x")
    )

    routes = [
        r for r in (routers["py"].route(f"d{i}", n) for i, n in enumerate(lengths[:50])) if r is not None
    ]
    nc = ns_per_op(_decode_loop(routers["c"], routes), len(routes))
    npy = ns_per_op(_decode_loop(routers["py"], routes), len(routes))
    rows.append(("on_decode, single24 ILP route", f"{nc:.1f}", f"{npy:.1f}", f"{npy / nc:.1f}x"))

    print(table(rows, ("operation", "compiled ns/op", "python ns/op", "speed-up")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
