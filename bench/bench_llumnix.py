"""Llumnix's experiments in the simulator (issue 25): priorities, live migration, an elastic fleet.

Run: ``python bench/bench_llumnix.py [--experiment priorities|migration|autoscale] [--plan ilp]
[--rate 4000] [--cv 3] [--duration 150] [--share 0.1] [--seeds 1,2,3]``.

The default rate saturates the plan: at 4,000 tokens/s the host's KV expectation is full in
bursts and queries wait for admission (at 1,000, the rate this bench used first, no query waits
and no node is busier than 61 %: a query's time to first token is its prefill through the
pipeline, which no scheduling shortens).

**Priorities.** LLaMA-2-70B on single24 with a shipped plan, bursty online load (Gamma arrivals of
coefficient of variation ``--cv``; docs/simulator.md, "Arrivals"). For each seed, the same queries
are served twice: once with ``--share`` of them at priority -1 (``sim run --priority-share``:
the host admits them first, the workers batch them first and preempt them last; docs/runtime.md,
"Priorities"), once with every query at priority 0. The urgent class is the same set of queries in
both runs (``sim.feeders.PriorityDraw`` draws it in arrival order from a stream of its own), so
its latencies compare query for query. Per class: queries finished, mean and p99 time to first
token, mean and p99 time per output token; and the whole run's decode throughput.

**Migration** (``--experiment migration``). The same bursty load, served three ways per seed:
"off" (MaxFlow IWRR with KV admission, as today), "on" (the rescheduling policy at its defaults,
``helix_async.routing.migration``: a node above 80 % of its KV, counting virtual usage, hands
stages to a peer holding the same layers) and "eager" (the same policy with every threshold at 0:
a stage moves whenever a linked peer is less loaded, which shows what migration costs when
nothing needs it). Per run: mean and p99 TTFT and time per output token, decode throughput,
migrations completed and aborted, KV bytes copied, mean downtime (a query's decode held for the
stop-and-copy) and preemptions. docs/migration.md.

**Autoscale** (``--experiment autoscale``). A load that varies 4x over the run (a diurnal
profile from a quarter of ``--rate`` up to all of it and back, ``--profile``), served four ways
per seed, all migrating (``--migration on``: a leaving node drains by migration): the plan alone;
a static fleet, the plan with every spare of ``--spares`` serving throughout; the elastic fleet
of ``sim.fleet``, whose spares join when queries wait, the KV expectation stays above 85 % or the
busiest layer computes more than 90 % of the time for 30 s, and leave when the load stays low;
and that fleet with ``--shrink``, whose plan nodes may leave too while every layer stays held and
max flow stays at least twice the tokens offered. Per run: TTFT mean and p99, time per output
token, GPU-hours and dollars (``sim.fleet.DEFAULT_PRICES``) until the last token, joins and
leaves; then each elastic fleet's p99 TTFT, GPU-hours and dollars over the plan alone's and the
static fleet's.

``--plan petals --model M --cluster C`` plans with the Petals heuristic (seed 0) instead of a
shipped layout; ``--output-ratio R`` sets the share of the mean output admission expects every
query to still generate (0.6, the host's online default; smaller admits more).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import table  # noqa: E402

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.placement.heuristics import petals  # noqa: E402
from helix_async.placement.io import SHIPPED_LAYOUTS, load_shipped_layout, read_placement  # noqa: E402
from helix_async.routing.migration import MigrationConfig  # noqa: E402
from helix_async.settings import KV_ONLINE, KVExpectation  # noqa: E402
from sim.feeders import HIGH_PRIORITY, PriorityDraw  # noqa: E402
from sim.fleet import FleetConfig, parse_spares  # noqa: E402
from sim.report import percentiles  # noqa: E402
from sim.runner import Workload, run  # noqa: E402
from sim.simulation import SimulationSetup  # noqa: E402


def classes(records: list[tuple[int, float, float, float, int, int]], urgent: set[int]) -> dict[str, dict[str, float]]:
    """Per class (urgent or normal): count, TTFT mean and p99, per-token mean and p99."""
    out = {}
    for name, want in (("urgent", True), ("normal", False)):
        rows = [r for r in records if (r[0] in urgent) == want]
        ttft = percentiles([first - arrived for _, arrived, first, _, _, _ in rows])
        tpot = percentiles([(done - first) / (m - 1) for _, _, first, done, _, m in rows if m > 1])
        out[name] = {"n": len(rows), "ttft": ttft["mean"], "ttft99": ttft["p99"], "tpot": tpot["mean"],
                     "tpot99": tpot["p99"]}
    return out


def plan_of(args: argparse.Namespace):  # noqa: ANN201
    """--plan: a shipped single24 layout of LLaMA-2-70B, a plan file, or ``petals`` (the Petals
    heuristic, seed 0, for --model on --cluster)."""
    if args.plan == "petals" and (args.model != "llama2-70b" or args.cluster != "single24"):
        return petals(load_cluster(args.cluster), args.model)
    if args.plan in SHIPPED_LAYOUTS:
        if args.model != "llama2-70b" or args.cluster != "single24":
            raise SystemExit(f"--plan {args.plan}: the shipped layouts are LLaMA-2-70B's; give a plan file or petals")
        return load_shipped_layout(args.plan)
    return read_placement(args.plan)


def kv_of(args: argparse.Namespace) -> KVExpectation:
    """The host's KV expectation: the online one, with --output-ratio's share of the mean output."""
    return KVExpectation(KV_ONLINE.fill_limit, args.output_ratio)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="ilp", help="a shipped single24 layout (default ilp), a plan file, or petals "
                                                  "(with --model)")
    ap.add_argument("--model", default="llama2-70b", help="with --plan petals: the model (default llama2-70b)")
    ap.add_argument("--cluster", default="single24", help="with --plan petals: the cluster (default single24)")
    ap.add_argument("--out-window", type=float, default=None,
                    help="autoscale: seconds of high load before a node joins (default: the fleet's window, 30)")
    ap.add_argument("--output-ratio", type=float, default=KV_ONLINE.output_ratio,
                    help="the share of the mean output admission expects each query to still generate (default "
                         f"{KV_ONLINE.output_ratio:g}, the host's online setting; smaller admits more)")
    ap.add_argument("--rate", type=float, default=4000.0, help="tokens/s (default 4000: the ILP plan saturated)")
    ap.add_argument("--cv", type=float, default=3.0, help="coefficient of variation of the Gamma gaps (default 3)")
    ap.add_argument("--duration", type=int, default=150, help="simulated seconds of arrivals (a multiple of 3)")
    ap.add_argument("--share", type=float, default=0.1, help="share of urgent queries (default 0.1)")
    ap.add_argument("--seeds", default="1,2,3", help="workload seeds, comma-separated")
    ap.add_argument("--experiment", choices=("priorities", "migration", "autoscale"), default="priorities")
    ap.add_argument("--spares", default="A100:2", help="autoscale: the spare pool, TYPE:N,... (default A100:2)")
    ap.add_argument("--profile", default="diurnal:period=600,low=0.25",
                    help="autoscale: the rate over time (default diurnal:period=600,low=0.25: 4x)")
    args = ap.parse_args(argv)
    if args.experiment == "migration":
        migration(args)
        return
    if args.experiment == "autoscale":
        autoscale(args)
        return
    setup = SimulationSetup(plan_of(args), kv=kv_of(args))
    rows = []
    gains = []
    for seed in (int(s) for s in args.seeds.split(",")):
        draw = PriorityDraw(args.share, seed)
        res = {}
        for label, share in (("priorities", args.share), ("none", 0.0)):
            wl = Workload(mode="online", rate=args.rate, warmup=0.0, duration=args.duration, seed=seed,
                          arrivals="gamma", cv=args.cv, priority_share=share)
            res[label] = run(setup, wl)
        submitted = res["none"].report["queries"]["submitted"]
        urgent = {q for q in range(submitted) if draw() == HIGH_PRIORITY}
        per = {k: classes(r.sim.host.query_records, urgent) for k, r in res.items()}
        for label in ("priorities", "none"):
            tput = res[label].report["decode_throughput"]
            for cls in ("urgent", "normal"):
                c = per[label][cls]
                rows.append((str(seed), label, cls, str(c["n"]), f"{c['ttft']:.2f}", f"{c['ttft99']:.2f}",
                             f"{c['tpot']:.3f}", f"{c['tpot99']:.3f}", f"{tput:.1f}"))
        u, n = per["priorities"]["urgent"], per["none"]["urgent"]
        gains.append((n["ttft"] / u["ttft"], n["ttft99"] / u["ttft99"], n["tpot"] / u["tpot"], n["tpot99"] / u["tpot99"],
                      res["priorities"].report["decode_throughput"] / res["none"].report["decode_throughput"]))
    print(f"priorities: {args.model}, {args.cluster}, plan {args.plan}, Gamma arrivals cv {args.cv:g} at {args.rate:g} tokens/s "
          f"for {args.duration} s, {args.share:.0%} urgent")
    print(table(rows, ("seed", "run", "class", "queries", "TTFT mean s", "TTFT p99 s", "per-token mean s",
                       "per-token p99 s", "decode tok/s")))
    print("the urgent class, without priorities / with (higher is better), and decode throughput with / without:")
    print(table([(s, *(f"{x:.2f}x" for x in g)) for s, g in zip(args.seeds.split(","), gains, strict=True)],
                ("seed", "TTFT mean", "TTFT p99", "per-token mean", "per-token p99", "throughput")))


def migration(args: argparse.Namespace) -> None:
    """Migration off, on (the policy's defaults) and eager, per seed (see the module doc)."""
    eager = MigrationConfig(high=0.0, low=1.0, gap=0.0)
    runs = (("off", False, None), ("on", True, None), ("eager", True, eager))
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        wl = Workload(mode="online", rate=args.rate, warmup=0.0, duration=args.duration, seed=seed,
                      arrivals="gamma", cv=args.cv)
        for label, on, cfg in runs:
            setup = SimulationSetup(plan_of(args), kv=kv_of(args), migration=on, migration_config=cfg)
            r = run(setup, wl)
            rec = r.sim.host.query_records
            ttft = percentiles([first - arrived for _, arrived, first, _, _, _ in rec])
            tpot = percentiles([(done - first) / (m - 1) for _, _, first, done, _, m in rec if m > 1])
            m = r.report.get("migration") or {"completed": 0, "aborted": 0, "bytes": 0, "downtime": {"mean": None},
                                              "preemptions": sum(w.stats.kv_preemptions for w in r.sim.workers.values())}
            down = m["downtime"]["mean"]
            rows.append((str(seed), label, str(len(rec)), f"{ttft['mean']:.2f}", f"{ttft['p99']:.2f}",
                         f"{tpot['mean']:.3f}", f"{tpot['p99']:.3f}", f"{r.report['decode_throughput']:.1f}",
                         str(m["completed"]), str(m["aborted"]), f"{m['bytes'] / 1e9:.2f}",
                         "-" if down is None else f"{down * 1e3:.1f}", str(m["preemptions"]),
                         f"{max(n['kv_peak'] / n['kv_capacity'] for n in r.report['nodes']):.2f}"))
    print(f"migration: {args.model}, {args.cluster}, plan {args.plan}, Gamma arrivals cv {args.cv:g} at {args.rate:g} "
          f"tokens/s for {args.duration} s, admission expecting {args.output_ratio:g} of the mean output")
    print(table(rows, ("seed", "run", "queries", "TTFT mean s", "TTFT p99 s", "per-token mean s", "per-token p99 s",
                       "decode tok/s", "moves", "aborted", "GB copied", "downtime ms", "preemptions",
                       "KV peak share")))


def autoscale(args: argparse.Namespace) -> None:
    """A static fleet sized for the peak against the elastic one, per seed (see the module doc)."""
    spares = parse_spares(args.spares)
    n = sum(c for _, c in spares)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        wl = Workload(mode="online", rate=args.rate, warmup=0.0, duration=args.duration, seed=seed,
                      arrivals="gamma", cv=args.cv, rate_profile=args.profile)
        res = {}
        for label, lo, hi, shrink in (("plan", 0, 0, False), ("static", n, n, False), ("elastic", 0, n, False),
                                      ("shrink", 0, n, True)):
            fleet = FleetConfig(spares=spares, min_spares=lo, max_spares=hi, shrink=shrink, out_window=args.out_window)
            setup = SimulationSetup(plan_of(args), kv=kv_of(args), migration=True, fleet=fleet)
            res[label] = r = run(setup, wl)
            rec = r.sim.host.query_records
            ttft = percentiles([first - arrived for _, arrived, first, _, _, _ in rec])
            tpot = percentiles([(done - first) / (m - 1) for _, _, first, done, _, m in rec if m > 1])
            f = r.report["fleet"]
            ev = [e["event"] for e in f["events"]]
            rows.append((str(seed), label, str(len(rec)), f"{ttft['mean']:.2f}", f"{ttft['p99']:.2f}",
                         f"{tpot['mean']:.3f}", f"{f['gpu_hours']:.2f}", f"{f['dollars']:.2f}",
                         str(ev.count("out")), str(ev.count("left")), f"{f['end'] - r.sim.t0:.0f}"))
        for base in ("plan", "static"):
            s = res[base].report["fleet"]
            s99 = percentiles([first - arrived for _, arrived, first, _, _, _ in res[base].sim.host.query_records])["p99"]
            for label in ("elastic", "shrink"):
                e = res[label].report["fleet"]
                e99 = percentiles([first - arrived for _, arrived, first, _, _, _
                                   in res[label].sim.host.query_records])["p99"]
                rows.append((str(seed), f"{label} / {base}", "", "", f"{e99 / s99:.3f}", "",
                             f"{e['gpu_hours'] / s['gpu_hours']:.3f}", f"{e['dollars'] / s['dollars']:.3f}", "", "",
                             ""))
    print(f"autoscale: {args.model}, {args.cluster}, plan {args.plan} plus spares {args.spares}, Gamma arrivals cv {args.cv:g} "
          f"at up to {args.rate:g} tokens/s ({args.profile}) for {args.duration} s, migration on")
    print(table(rows, ("seed", "fleet", "queries", "TTFT mean s", "TTFT p99 s", "per-token mean s", "GPU-hours", "USD",
                       "joins", "leaves", "served s")))


if __name__ == "__main__":
    main()
