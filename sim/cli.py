"""``python -m sim run|compare``: simulate plans on the runtime's host and workers in virtual time.

``run`` simulates one plan with one scheduler and workload and writes a JSON report (and plots);
``compare`` runs several plans and/or schedulers on the same workload and prints one table.
Defaults follow the original per mode and scheduler (docs/original.md §8.8, §11): offline warm-up 60 s,
window 600 s, 20 initial queries for MaxFlow and 240 for the per-hop schedulers, KV (0.85, 1.0);
online warm-up 0, window 1800 s, 700 tokens/s for MaxFlow and 400 for the others, KV (0.9, 0.6).
Bad flags or files exit 2 with one line naming the flag, file or field.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from helix_async.cli import EXIT_OK, EXIT_USAGE, dispatch
from helix_async.cli.args import (
    MAX_COUNT,
    Parser,
    int_in,
    kv_expectation,
    model_ref,
    number_in,
    output_file,
    slo,
)
from helix_async.cluster import load_cluster
from helix_async.errors import ConfigError
from helix_async.fileio import atomic_write_text, check_output_path
from helix_async.placement import Placement
from helix_async.placement.io import (
    SHIPPED_LAYOUTS,
    import_helix_solution,
    load_shipped_layout,
    read_placement,
)
from helix_async.routing.policies import get_policy
from helix_async.settings import KV_OFFLINE, KV_ONLINE, KVExpectation, WorkerSettings, kv_for_mode

from .fleet import DEFAULT_PRICES, FleetConfig, parse_spares
from .report import report_json, summary_lines
from .runner import DEFAULT_MAX_EVENTS, MAX_SIM_SECONDS, Workload, run
from .simulation import SCHEDULERS, SimulationSetup
from .workloads import (
    ARRIVAL_SERIES,
    LENGTH_DATASETS,
    MAX_CV,
    MIN_CV,
    RENEWAL_ARRIVALS,
    RateProfile,
    check_arrivals,
    read_trace_csv,
)

__all__ = ["build_parser", "load_plan", "main"]

MODES = ("offline", "online")


#: The highest offered load a simulation takes, tokens/s (a thousand times a 24-node cluster's);
#: with --duration bounded, the generated trace stays a few million queries at most.
MAX_SIM_RATE = 1e7
#: Cores of one machine (--shared-cores).
MAX_SHARED_CORES = 65_536.0

_count = int_in(1, 1_000_000, "a whole number")
_seed = int_in(0, 2**63 - 1, "an integer seed")
_sim_seconds = number_in(0.0, MAX_SIM_SECONDS, low_open=True, unit="simulated s")
_sim_seconds0 = number_in(0.0, MAX_SIM_SECONDS, unit="simulated s")


def load_plan(plan: str, cluster: str | None, model: str) -> Placement:
    """A placement from a plan file, an original layout directory (``*_sol.ini`` +
    ``simulator_cluster.ini``, on ``cluster``) or a shipped layout name (``ilp``, ``petals``, ...)."""
    path = Path(plan)
    if path.is_dir():
        sols = sorted(path.glob("*_sol.ini")) + sorted(path.glob("*_solution_file.ini"))
        sims = sorted(path.glob("*simulator_cluster.ini"))
        if len(sols) != 1 or len(sims) != 1:
            raise ConfigError(
                plan, "--plan", "a layout directory must hold one *_sol.ini (or *_solution_file.ini) and one simulator_cluster.ini"
            )
        if cluster is None:
            raise ConfigError(plan, "--cluster", "an original layout directory needs --cluster (the cluster it was planned for)")
        return import_helix_solution(sols[0], sims[0], load_cluster(cluster), model)
    if path.exists():
        p = read_placement(path)
        if cluster is not None:
            want = load_cluster(cluster)
            if want.name != p.cluster.name:
                raise ConfigError(plan, "--cluster", f"the plan is for cluster {p.cluster.name!r}, not {want.name!r}")
        return p
    if plan in SHIPPED_LAYOUTS:
        p = load_shipped_layout(plan)
        if cluster is not None and load_cluster(cluster).name != p.cluster.name:
            raise ConfigError(plan, "--cluster", f"the shipped layout is for cluster {p.cluster.name!r}, not {cluster!r}")
        return p
    raise ConfigError(
        plan, "--plan", f"no such file or directory, and not a shipped layout ({', '.join(SHIPPED_LAYOUTS)})"
    )


def _cores_list(text: str) -> tuple[float, ...]:
    """``A1,A2,...``: cores available to 1, 2, ... busy processes (each > 0, at most
    :data:`MAX_SHARED_CORES` of them)."""
    parts = text.split(",")
    if len(parts) > MAX_SHARED_CORES:
        raise argparse.ArgumentTypeError(f"more than {MAX_SHARED_CORES:g} numbers")
    try:
        vals = tuple(float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not vals or any(not 0 < v <= MAX_SHARED_CORES for v in vals):
        raise argparse.ArgumentTypeError(f"each must be > 0 and <= {MAX_SHARED_CORES:g}, got {text!r}")
    return vals


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", help="cluster (built-in name, .toml or .ini); required for a layout directory")
    p.add_argument("--model", default="llama2-70b", type=model_ref,
                   help="NAME, a checkpoint directory or a FILE.gguf (default llama2-70b)")
    p.add_argument("--mode", choices=MODES, default="offline")
    p.add_argument("--rate", type=number_in(0.0, MAX_SIM_RATE, low_open=True, unit="tokens/s"),
                   help=f"online: target tokens/s, at most {MAX_SIM_RATE:g} (default 700 MaxFlow, 400 others)")
    p.add_argument("--lengths", choices=sorted(LENGTH_DATASETS), default="azure-conv", help="length dataset")
    p.add_argument("--arrivals", choices=sorted(ARRIVAL_SERIES) + list(RENEWAL_ARRIVALS), default="azure-conv",
                   help="online: an arrival series, or gamma (with --cv) or poisson gaps")
    p.add_argument("--cv", type=number_in(MIN_CV, MAX_CV), default=None,
                   help="online, --arrivals gamma: coefficient of variation of the gaps (1 is Poisson, above 1 "
                   "bursty)")
    p.add_argument("--priority-share", type=number_in(0.0, 1.0), default=0.0, metavar="F",
                   help="the share of queries given high priority (-1; the rest 0), drawn from a stream of its own; "
                   "the report then breaks latency down per class (default 0)")
    p.add_argument("--rate-profile", default=None, metavar="PROFILE",
                   help="online: the rate over time, step:0=M0,T1=M1,... (multipliers of --rate from T s on) or "
                   "diurnal:period=P,low=L (L x --rate at the start, --rate at P/2)")
    p.add_argument("--duration", type=_sim_seconds,
                   help=f"statistics window, simulated s, at most {MAX_SIM_SECONDS:g} (one day; default 600 offline, "
                   "1800 online)")
    p.add_argument("--warmup", type=_sim_seconds0,
                   help=f"warm-up before the window, simulated s, at most {MAX_SIM_SECONDS:g} (default 60 offline, "
                   "0 online)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of every random stream, in [0, 2**63) (default 0)")
    p.add_argument("--initial-queries", type=_count, help="offline population (default 20 MaxFlow, 240 others)")
    p.add_argument("--kv", type=kv_expectation, help="KV expectation HWM,RATIO (default "
                   f"{KV_OFFLINE.fill_limit},{KV_OFFLINE.output_ratio} offline; "
                   f"{KV_ONLINE.fill_limit},{KV_ONLINE.output_ratio} online)")
    p.add_argument("--compat", choices=("helix",), help="reproduce the original simulator's semantics")
    p.add_argument("--trace", help="replay a CSV trace arrive_time_s,input_tokens,output_tokens (virtual seconds; arrivals before the models are loaded wait until then)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.add_argument("--max-events", type=int_in(1, MAX_COUNT), default=DEFAULT_MAX_EVENTS, metavar="N",
                   help="stop with an error after N events, a bound on the work (default %(default)s: about a "
                   "simulated day of a busy 24-node cluster, some 15 minutes)")
    p.add_argument("--shared-cores", type=number_in(0.0, MAX_SHARED_CORES, low_open=True), default=None, metavar="N",
                   help="the nodes are processes of one machine with N cores, shared while they compute "
                        "(a CPU cluster such as tiny3; profile with --clock cpu); default: a device per node")
    p.add_argument("--cores-available", type=_cores_list, default=(), metavar="A1,A2,...",
                   help="with --shared-cores: the cores measured available to 1, 2, ... busy processes on that "
                        "machine (default: min(k, N))")
    p.add_argument("--gather", type=number_in(0.0, 10.0), default=None, metavar="K",
                   help="the workers' decode gathering factor, as worker --gather (default: the workers' "
                        f"{WorkerSettings.gather:g}; 0: off; docs/runtime.md)")
    p.add_argument("--spares", type=parse_spares, default=None, metavar="TYPE:N,...",
                   help="an elastic fleet: spare nodes of these machine types join while the load is high and leave "
                        "when it falls (MaxFlow, not with --compat helix; docs/simulator.md, \"Elastic fleet\")")
    p.add_argument("--autoscale", type=_min_max, default=None, metavar="MIN:MAX",
                   help="with --spares: between MIN and MAX spares serve at any time (default 0:all of them; "
                        "MIN = MAX: a static fleet of that many)")
    p.add_argument("--shrink", action="store_true",
                   help="an elastic fleet whose plan nodes may leave too while the load is low, keeping every layer "
                        "served, and join again (with their layers) when it rises; with or without --spares "
                        "(docs/simulator.md, \"Elastic fleet\")")
    p.add_argument("--prices", type=_prices, default=None, metavar="TYPE=USD,...",
                   help="with --spares: US dollars per GPU-hour per machine type (default: sim.fleet.DEFAULT_PRICES)")
    p.add_argument("--migration", choices=("on", "off"), default="off",
                   help="reschedule running queries by live KV migration (MaxFlow, not with --compat helix; "
                        "docs/migration.md; default off)")


def _min_max(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 <= MIN <= MAX, got {text!r}")
    return int(lo), int(hi)


def _prices(text: str) -> dict[str, float]:
    out = dict(DEFAULT_PRICES)
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not sep or not name or not (math.isfinite(price) and price >= 0):
            raise argparse.ArgumentTypeError(f"expected TYPE=USD with USD >= 0, got {part.strip()!r}")
        out[name.strip()] = price
    return out


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m sim` (run, compare)."""
    parser = Parser(prog="python -m sim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    r = sub.add_parser("run", help="simulate one plan")
    r.add_argument("--plan", required=True, help="plan file, original layout directory, or shipped layout name")
    r.add_argument("--scheduler", choices=SCHEDULERS, default="maxflow")
    _add_workload_flags(r)
    r.add_argument("--report", help="write report.json (and plots with --plots) into this directory")
    r.add_argument("--plots", action="store_true", help="with --report: throughput, latency and placement plots")
    r.add_argument("--watch", type=_sim_seconds, help="print the original's watch block every N simulated seconds")
    r.add_argument("--faults", default=None, metavar="SPEC",
                   help="kill nodes in virtual time, e.g. node=7@t=120s,node=3@t=300s+60s (revived 60 s later); "
                   "times after the models load, as --warmup")
    r.add_argument("--detect-after", type=_sim_seconds0, default=None,
                   help="--faults: seconds from a crash to the host's noticing (default 1.5, the runtime's)")
    r.add_argument("--slo", type=slo, default=None, metavar="ttft=S,tpot=S",
                   help="also report goodput: queries finished in the window whose TTFT and mean time per output "
                   "token are within these seconds")
    r.set_defaults(handler=_cmd_run)
    c = sub.add_parser("compare", help="several plans and/or schedulers on the same workload, one table")
    c.add_argument("--plan", action="append", required=True, help="plan (repeat for several)")
    c.add_argument("--scheduler", action="append", choices=SCHEDULERS, help="scheduler (repeat; default maxflow)")
    _add_workload_flags(c)
    c.add_argument("--json", type=output_file, help="also write all reports as one JSON file")
    c.set_defaults(handler=_cmd_compare)
    return parser


def _workload(args: argparse.Namespace, scheduler: str) -> tuple[Workload, KVExpectation]:
    offline = args.mode == "offline"
    # the original's defaults differ between MaxFlow and the per-hop schedulers: a policy that routes
    # at admission takes MaxFlow's
    maxflow = get_policy(scheduler).routes_at_admission
    trace = None
    mode = args.mode
    if args.trace is not None:
        trace = read_trace_csv(args.trace)
        mode = "trace"
    wl = Workload(
        mode=mode,
        rate=args.rate if args.rate is not None else (700.0 if maxflow else 400.0),
        lengths=args.lengths,
        arrivals=args.arrivals,
        warmup=args.warmup if args.warmup is not None else (60.0 if offline and trace is None else 0.0),
        duration=args.duration if args.duration is not None else (600.0 if offline and trace is None else 1800.0),
        initial=args.initial_queries if args.initial_queries is not None else (20 if maxflow else 240),
        seed=args.seed,
        trace=trace,
        cv=args.cv,
        rate_profile=args.rate_profile,
        priority_share=args.priority_share,
    )
    if mode != "online":
        for flag, value in (("--cv", args.cv), ("--rate-profile", args.rate_profile)):
            if value is not None:
                raise ConfigError("<argument>", flag, f"is for --mode online, not {mode}")
    else:  # refused here, before anything is built
        check_arrivals(args.arrivals, args.cv)
        if args.rate_profile is not None:
            RateProfile.parse(args.rate_profile, duration=wl.duration)
    if mode == "online" and (wl.duration != int(wl.duration) or int(wl.duration) % 3):
        raise ConfigError("<argument>", "--duration", f"online traces are built in 3-s intervals: give a multiple of 3, got {wl.duration:g}")
    kv = args.kv if args.kv is not None else kv_for_mode(args.mode)
    return wl, kv


def _config(args: argparse.Namespace, plan: str, scheduler: str, wl: Workload, kv: KVExpectation) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if args.shared_cores is not None:  # (absent otherwise: reports of a device per node stay as they were)
        extra = {"shared_cores": args.shared_cores, "cores_available": list(args.cores_available)}
    if args.gather is not None:  # (likewise)
        extra["gather"] = args.gather
    if wl.mode == "online" and wl.cv is not None:  # (likewise)
        extra["cv"] = wl.cv
    if wl.mode == "online" and wl.rate_profile is not None:  # (likewise)
        extra["rate_profile"] = wl.rate_profile
    if wl.priority_share > 0:  # (likewise)
        extra["priority_share"] = wl.priority_share
    if args.migration == "on":  # (likewise)
        extra["migration"] = "on"
    if args.spares:  # (likewise)
        extra["spares"] = [list(s) for s in args.spares]
        if args.autoscale is not None:
            extra["autoscale"] = list(args.autoscale)
    if args.shrink:  # (likewise)
        extra["shrink"] = True
    return {
        "plan": plan,
        "cluster": args.cluster,
        "model": args.model,
        "scheduler": scheduler,
        "mode": wl.mode,
        "rate": wl.rate if wl.mode == "online" else None,
        "lengths": wl.lengths,
        "arrivals": wl.arrivals if wl.mode == "online" else None,
        "warmup": wl.warmup,
        "duration": wl.duration,
        "initial_queries": wl.initial if wl.mode == "offline" else None,
        "kv": list(kv),
        "compat": args.compat,
        "seed": wl.seed,
        "trace": args.trace,
        **extra,
    }


def _simulate(args: argparse.Namespace, plan_name: str, placement: Placement, scheduler: str, **kw: Any) -> Any:
    wl, kv = _workload(args, scheduler)
    compat = args.compat == "helix"
    if args.shared_cores is not None and compat:
        raise ConfigError("<argument>", "--shared-cores", "the original gives every node a device of its own: not with "
                          "--compat helix")
    if args.priority_share and compat:
        raise ConfigError("<argument>", "--priority-share", "the original has no priorities: not with --compat helix")
    if args.gather is not None and compat:
        raise ConfigError("<argument>", "--gather", "the original does not gather decodes: not with --compat helix")
    if args.migration == "on" and compat:
        raise ConfigError("<argument>", "--migration", "the original does not migrate: not with --compat helix")
    if args.migration == "on" and scheduler != "maxflow":
        raise ConfigError("<argument>", "--migration", f"needs the maxflow scheduler (the host routes), not {scheduler}")
    fleet = None
    if args.spares or args.shrink:
        if compat or scheduler != "maxflow":
            raise ConfigError("<argument>", "--spares" if args.spares else "--shrink",
                              "an elastic fleet needs the maxflow scheduler in our semantics (not --compat helix)")
        spares = args.spares or ()
        if args.autoscale is not None and not spares:
            raise ConfigError("<argument>", "--autoscale", "needs --spares")
        lo, hi = args.autoscale if args.autoscale is not None else (0, sum(n for _, n in spares))
        fleet = FleetConfig(spares=spares, min_spares=lo, max_spares=hi, shrink=args.shrink,
                            **({} if args.prices is None else {"prices": args.prices}))
    elif args.autoscale is not None or args.prices is not None:
        raise ConfigError("<argument>", "--autoscale" if args.autoscale is not None else "--prices",
                          "needs --spares or --shrink")
    if args.cores_available and args.shared_cores is None:
        raise ConfigError("<argument>", "--cores-available", "needs --shared-cores")
    if any(a > (args.shared_cores or 0.0) for a in args.cores_available):
        raise ConfigError("<argument>", "--cores-available", f"more than the {args.shared_cores:g} shared cores")
    setup = SimulationSetup(
        placement,
        scheduler=scheduler,
        kv=kv,
        compat=compat,
        drop_rejected=compat and wl.mode == "offline",
        seed=args.seed,
        cores=args.shared_cores or 0.0,
        available=args.cores_available,
        gather=args.gather,
        migration=args.migration == "on",
        fleet=fleet,
    )
    return run(setup, wl, config=_config(args, plan_name, scheduler, wl, kv), progress=args.progress,
               max_events=args.max_events, **kw)


def _cmd_run(args: argparse.Namespace) -> int:
    out_dir = Path(args.report) if args.report else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(str(out_dir), "--report", "exists and is not a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        check_output_path(out_dir / "report.json", "--report")
    placement = load_plan(args.plan, args.cluster, args.model)
    faults: list[Any] = []
    if args.faults is not None:
        if args.spares or args.shrink:
            # the fault injector re-plans from the plan it was given, which the fleet changes
            raise ConfigError("<argument>", "--faults", "not with an elastic fleet (--spares, --shrink) yet")
        from .faults import parse_faults

        faults = parse_faults(args.faults, placement.used_nodes())
    slo = args.slo
    res = _simulate(args, args.plan, placement, args.scheduler, watch_interval=args.watch or 0.0, faults=faults,
                    detect_after=args.detect_after, slo=slo)
    print("\n".join(summary_lines(res.report)))
    if slo is not None:
        g = res.report["goodput"]
        print(f"Goodput (TTFT <= {slo.ttft:g} s, TPOT <= {slo.tpot:g} s): {g['decode_throughput']:.1f} decode tokens/s; "
              f"{g['met']} of {g['queries']} queries met it")
    print(
        f"[wall {res.wall_s:.1f} s, {res.events} events, {res.events / max(res.wall_s, 1e-9):,.0f} events/s, "
        f"{res.report['virtual_end'] / max(res.wall_s, 1e-9):,.1f} simulated s per wall s]",
        file=sys.stderr,
    )
    if out_dir is not None:
        atomic_write_text(out_dir / "report.json", report_json(res.report))
        if args.plots:
            from .plots import write_plots

            write_plots(res, out_dir)
        print(f"report: {out_dir / 'report.json'}")
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    schedulers = args.scheduler or ["maxflow"]
    rows = []
    reports = []
    for plan in args.plan:
        placement = load_plan(plan, args.cluster, args.model)
        for sched in schedulers:
            res = _simulate(args, plan, placement, sched)
            r = res.report
            reports.append(r)
            rows.append(
                (
                    plan,
                    sched,
                    f"{r['plan']['max_flow']:.1f}",
                    f"{r['decode_throughput']:.1f}",
                    f"{r['all_tokens']['throughput']:.1f}",
                    _fmt(r["prompt_latency"]["p50"]),
                    _fmt(r["prompt_latency"]["p99"]),
                    _fmt(r["decode_latency"]["p50"]),
                    _fmt(r["decode_latency"]["p99"]),
                )
            )
    head = ("plan", "scheduler", "max flow", "decode tok/s", "all tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if args.json:
        import json

        check_output_path(Path(args.json), "--json")
        atomic_write_text(Path(args.json), json.dumps(reports, sort_keys=True, indent=2, allow_nan=False) + "\n")
    return EXIT_OK


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input, after one ``error:`` line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return dispatch(args.handler, args)


def entry() -> None:
    """Console-script entry point (``helix-sim``)."""
    raise SystemExit(main())
