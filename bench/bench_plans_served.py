"""What plans serve: max flow next to simulated throughput and latency, on the same workload.

Run: ``python bench/bench_plans_served.py [--quick] [--plans-dir DIR]``.

Max flow is Helix's objective; users get what the serving system delivers.  This bench plans
single24, 3cluster24 and cluster42 (LLaMA-2-70B) with our planner's default served objective
(``plan_served``: ``--served-seconds`` each, seed 0), with the max-flow objective (Helix's ILP
objective, our MILP search) and with the Petals, Swarm and homogeneous heuristics, takes the
original's shipped single24 layouts beside them, and simulates each with MaxFlow scheduling:

* ``offline``: 20 initial queries topped up while the KV expectation allows, window 80-680 s
  (the original's README scenario), default semantics;
* ``offline compat``: the same under ``--compat helix`` (the original's semantics, which the
  served planner simulates its candidates in by default), for every plan of 3cluster24 and
  cluster42 and for our served and max-flow plans and the shipped ILP and Petals plans on
  single24;
* ``online``: the README online workload (Azure conversation arrivals and lengths, 700 tokens/s,
  1800 s, KV (0.9, 0.6)), default semantics, for our single24 plans and the shipped ILP and
  Petals plans.

Columns: max flow, decode tokens/s in the window, all-token tokens/s, TTFT p50/p99 and time per
output token (TPOT) p50/p99 (seconds).  ``--quick`` shortens every window to 120 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.placement.io import load_shipped_layout, write_placement  # noqa: E402
from helix_async.placement.search import plan  # noqa: E402
from helix_async.placement.served_plan import plan_served  # noqa: E402
from helix_async.settings import SearchSettings  # noqa: E402
from sim.planning import simulate_candidate  # noqa: E402
from sim.runner import Workload, run  # noqa: E402
from sim.simulation import SimulationSetup  # noqa: E402


def _plans(cluster: str, out: Path, milp_s: float, served_s: float) -> list[tuple[str, Placement]]:
    spec = load_cluster(cluster)
    plans = []
    t = time.perf_counter()
    served = plan_served(spec, "llama2-70b", search=SearchSettings(time_limit=served_s, seed=0), simulate=simulate_candidate)
    write_placement(served.placement, out / f"{cluster}_served.toml")
    print(f"{cluster}: served plan in {time.perf_counter() - t:.0f} s, found by {served.row.source}", file=sys.stderr)
    plans.append(("ours served", served.placement))
    # on single24 our heuristics reproduce the shipped petals/swarm/homogeneous max flows: only
    # the shipped ones are simulated there
    methods = ("milp",) if cluster == "single24" else ("milp", "petals", "swarm", "homogeneous")
    for method in methods:
        path = out / f"{cluster}_{method}.toml"
        res = plan(spec, "llama2-70b", SearchSettings(method=method, time_limit=milp_s, stall_limit=min(milp_s, 30.0), seed=0))
        write_placement(res.placement, path)
        plans.append((f"ours {'maxflow' if method == 'milp' else method}", res.placement))
    if cluster == "single24":
        for name in ("ilp", "petals", "swarm", "homogeneous"):
            plans.append((f"shipped {name}", load_shipped_layout(name)))
    return plans


def _row(label: str, mode: str, p: Placement, wl: Workload, kv: tuple[float, float], compat: bool) -> list[str]:
    setup = SimulationSetup(p, scheduler="maxflow", kv=kv, compat=compat, drop_rejected=compat and wl.mode == "offline")
    t = time.perf_counter()
    r = run(setup, wl).report
    wall = time.perf_counter() - t

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return [
        label,
        mode,
        f"{r['plan']['max_flow']:.1f}",
        f"{r['decode_throughput']:.1f}",
        f"{r['all_tokens']['throughput']:.1f}",
        f(r["prompt_latency"]["p50"]),
        f(r["prompt_latency"]["p99"]),
        f(r["decode_latency"]["p50"]),
        f(r["decode_latency"]["p99"]),
        f"{wall:.0f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="120-s windows")
    ap.add_argument("--plans-dir", default="out/bench_plans", help="where the planned files go")
    ap.add_argument("--milp-seconds", type=float, default=60.0, help="max-flow MILP search time per cluster")
    ap.add_argument("--served-seconds", type=float, default=300.0, help="served planner time per cluster")
    args = ap.parse_args()
    out = Path(args.plans_dir)
    out.mkdir(parents=True, exist_ok=True)
    window = 120.0 if args.quick else 600.0
    online_s = 120 if args.quick else 1800
    head = ["plan", "workload", "max flow", "decode tok/s", "all tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "wall s"]
    rows: list[list[str]] = []
    for cluster in ("single24", "3cluster24", "cluster42"):
        for label, p in _plans(cluster, out, args.milp_seconds, args.served_seconds):
            name = f"{cluster} {label}"
            off = Workload(mode="offline", initial=20, warmup=60, duration=window, seed=0)
            new = [_row(name, "offline", p, off, (0.85, 1.0), False)]
            if cluster != "single24" or label in ("ours served", "ours maxflow", "shipped ilp", "shipped petals"):
                new.append(_row(name, "offline compat", p, off, (0.85, 1.0), True))
            if label in ("ours served", "ours maxflow", "shipped ilp", "shipped petals") and cluster == "single24":
                on = Workload(mode="online", rate=700.0, warmup=0, duration=online_s, seed=0)
                new.append(_row(name, "online 700", p, on, (0.9, 0.6), False))
            for r in new:
                print("  ".join(r), file=sys.stderr, flush=True)
            rows += new
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
