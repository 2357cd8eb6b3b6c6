"""Whole simulator runs: wall time, events, memory and figures, compiled vs pure build, in one run.

Run: ``python bench/bench_sim.py [--scenario reference|online|scale|all] [--builds compiled,pure]
[--quick] [--sizes 24,96,...]``.

Every measurement runs in a fresh subprocess (this script with a hidden ``--child`` argument, which
prints one JSON line), so the peak RSS is that run's alone and the pure build
(``HELIX_NO_EXTENSIONS=1``) really imports no compiled module.  Scenarios:

* ``reference``: the README example (docs/original.md §11.2): single24, LLaMA-2-70B, the shipped ILP
  layout, MaxFlow, offline, 20 initial queries, KV (0.85, 1.0), warm-up 60 s, window 600 s, in
  compat mode (``python -m sim run --plan ilp --compat helix``) and in the default mode, next to
  the original simulator's published cost and figures and the ratio ours/original.
* ``online``: the README online example: same layout, MaxFlow, 1800 s of azure-conv arrivals and
  lengths at 700 tokens/s (seed 0), KV (0.9, 0.6), warm-up 0, default mode and compat.  The
  original could not run it unmodified in 24 GB (docs/original.md §12.2 item 16); its cost with the
  event log trimmed is the reference row.
* ``scale``: sparse geo-partitioned clusters of 24, 96, 384 and 1,536 GPUs (regions of up to 96
  GPUs with single24's mix, 1/6 A100, 1/3 L4, 1/2 T4; complete inside a region, 4 links between
  adjacent regions of a ring), LLaMA-2-70B, the Swarm heuristic's plan on the whole cluster,
  online at 60 % of the plan's max flow for 120 s (azure-conv, seed 0), KV (0.9, 0.6), default
  mode.  Adds the planning time, the tokens simulated, wall time per simulated token and its
  ratio to the 24-GPU row of the same build (the target: within 2x from smallest to largest).

Columns: ``wall s`` is the :func:`sim.runner.run` call (building the simulation, the workload and
running the loop; for ``scale`` the plan is made before and timed apart), ``CPU s`` the CPU time
of that call (steadier than wall time on a shared machine; the original's figure is CPU time);
``events`` the callbacks
the virtual-time loop ran (``RunResult.events``); ``sim-s/wall-s`` virtual seconds from the
workload's start ``t0`` to the end of the run per wall second; ``RSS MB`` the child's peak
resident set (``ru_maxrss``).  Latencies in seconds: TTFT is the prompt latency, TPOT the decode
latency per output token (docs/original.md §8.9); the original published their means.

Nothing here asserts a timing; ``--quick`` shrinks every window to a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from _harness import table  # noqa: E402

SCENARIOS = ("reference", "online", "scale")
BUILDS = ("compiled", "pure")
SCALE_SIZES = (24, 96, 384, 1536)
QUICK_SCALE_SIZES = (24, 96)
REGION_GPUS = 96
CROSS_LINKS = 4
SCALE_LOAD = 0.6
SCALE_PLANNER = "swarm"

# Windows (seconds).  Quick: smoke-run sizes that keep the whole --quick run well under a minute
# (online runs also drain every admitted query after the last arrival, which takes minutes of
# virtual time at these loads; the drain is simulated and counted).
FULL = {"ref_warmup": 60.0, "ref_window": 600.0, "online_s": 1800, "scale_s": 120}
QUICK = {"ref_warmup": 5.0, "ref_window": 10.0, "online_s": 3, "scale_s": 3}

#: The original simulator's published cost and figures (docs/original.md §11.2, §12.2 item 16), measured
#: on a 2-core box.  RSS as a range (low, high) in MB.
ORIGINAL: dict[str, dict[str, Any]] = {
    "reference": {
        "cpu_s": 350.0,
        "events": 12.2e6,
        "rss_mb": (8000.0, 14000.0),
        "decode_tps": 248.3,
        "all_tps": 1176.70,
        "ttft_mean": 3.094,
        "tpot_mean": 1.457,
    },
    "online": {"cpu_s": 776.0, "rss_mb": (17000.0, 17000.0)},
}

# ---------------------------------------------------------------------------- the child


def _single24_setup(compat: bool, offline: bool) -> Any:
    from helix_async.placement.io import load_shipped_layout
    from helix_async.settings import KV_OFFLINE, KV_ONLINE
    from sim.simulation import SimulationSetup

    return SimulationSetup(
        load_shipped_layout("ilp"),
        scheduler="maxflow",
        kv=KV_OFFLINE if offline else KV_ONLINE,
        compat=compat,
        drop_rejected=compat and offline,
        seed=0,
    )


def scale_cluster(gpus: int, *, seed: int = 0) -> Any:
    """A sparse partitioned cluster of ``gpus`` single-GPU nodes in regions of up to 96 GPUs."""
    from helix_async.cluster import generate_partitioned

    per = min(gpus, REGION_GPUS)
    if gpus % per or per % 6:
        raise ValueError(f"scale sizes must be multiples of 6 and of 96 above 96 GPUs, got {gpus}")
    region = ["A100"] * (per // 6) + ["L4"] * (per // 3) + ["T4"] * (per // 2)
    return generate_partitioned(
        [region] * (gpus // per), cross_links_per_region=CROSS_LINKS, seed=seed, name=f"geo{gpus}"
    )


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement described by ``spec``; return its JSON-able result."""
    from helix_async.routing import IWRRC
    from helix_async.settings import KV_ONLINE
    from sim.runner import Workload, run

    win = QUICK if spec["quick"] else FULL
    out: dict[str, Any] = {"compiled": IWRRC is not None}
    scenario = spec["scenario"]
    compat = spec.get("mode") == "compat"
    if scenario == "reference":
        setup = _single24_setup(compat, offline=True)
        wl = Workload(
            mode="offline", warmup=win["ref_warmup"], duration=win["ref_window"], initial=20, seed=0
        )
    elif scenario == "online":
        setup = _single24_setup(compat, offline=False)
        wl = Workload(mode="online", rate=700.0, duration=win["online_s"], warmup=0.0, seed=0)
    elif scenario == "scale":
        from helix_async.placement.flow import max_flow
        from helix_async.placement.heuristics import run_heuristic
        from sim.simulation import SimulationSetup

        t = time.perf_counter()
        cluster = scale_cluster(spec["gpus"])
        out["gen_s"] = time.perf_counter() - t
        t = time.perf_counter()
        placement = run_heuristic(spec.get("planner", SCALE_PLANNER), cluster, "llama2-70b", seed=0)
        out["plan_s"] = time.perf_counter() - t
        t = time.perf_counter()
        mf = max_flow(placement).value
        out["flow_s"] = time.perf_counter() - t
        out["links"] = len(cluster.links)
        out["plan_links"] = len(placement.links)
        out["used"] = len(placement.used_nodes())
        out["rate"] = SCALE_LOAD * mf
        setup = SimulationSetup(placement, scheduler="maxflow", kv=KV_ONLINE, compat=False, seed=0)
        wl = Workload(mode="online", rate=out["rate"], duration=win["scale_s"], warmup=0.0, seed=0)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    t = time.perf_counter()
    c = time.process_time()
    res = run(setup, wl)
    cpu = time.process_time() - c
    wall = time.perf_counter() - t
    rep = res.report
    ru = resource.getrusage(resource.RUSAGE_SELF)
    pl, dl = rep["prompt_latency"], rep["decode_latency"]
    out.update(
        wall_s=wall,
        loop_s=res.wall_s,
        cpu_s=cpu,
        process_cpu_s=ru.ru_utime + ru.ru_stime,
        rss_mb=ru.ru_maxrss / 1024.0,  # kilobytes on Linux
        events=res.events,
        sim_s=rep["virtual_end"] - rep["plan"]["t0"],
        max_flow=rep["plan"]["max_flow"],
        decode_tps=rep["decode_throughput"],
        all_tps=rep["all_tokens"]["throughput"],
        tokens=rep["all_tokens"]["tokens"],
        ttft_mean=pl["mean"],
        ttft_p50=pl["p50"],
        ttft_p99=pl["p99"],
        tpot_mean=dl["mean"],
        tpot_p50=dl["p50"],
        tpot_p99=dl["p99"],
        queries=rep["queries"],
    )
    return out


# ---------------------------------------------------------------------------- the parent


def measure(spec: dict[str, Any], build: str) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter with the given build; its JSON result (or an error)."""
    env = dict(os.environ)
    env.pop("HELIX_NO_EXTENSIONS", None)
    if build == "pure":
        env["HELIX_NO_EXTENSIONS"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    res: dict[str, Any] = json.loads(lines[-1])
    if res["compiled"] != (build == "compiled"):
        res["error"] = f"asked for the {build} build, got the other"
    return res


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ratio(ours: float | None, theirs: float | tuple[float, float] | None) -> str:
    if ours is None or theirs is None:
        return "-"
    if isinstance(theirs, tuple):
        lo, hi = theirs
        if lo == hi:
            return f"{ours / lo:.3g}x"
        return f"{ours / hi:.2g}-{ours / lo:.2g}x"
    return f"{ours / theirs:.3g}x"


COST_HEAD = ("wall s", "CPU s", "events", "events/s", "sim-s/wall-s", "RSS MB")
FIG_HEAD = ("decode tok/s", "all tok/s", "TTFT mean", "p50", "p99", "TPOT mean", "p50", "p99")


def _cost_cells(r: dict[str, Any]) -> tuple[str, ...]:
    wall = r["wall_s"]
    return (
        f"{wall:.1f}",
        f"{r['cpu_s']:.1f}",
        f"{r['events']:,}",
        f"{r['events'] / wall:,.0f}",
        f"{r['sim_s'] / wall:.1f}",
        f"{r['rss_mb']:.0f}",
    )


def _fig_cells(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        f"{r['decode_tps']:.1f}",
        f"{r['all_tps']:.2f}",
        _f(r["ttft_mean"], ".3f"),
        _f(r["ttft_p50"], ".3f"),
        _f(r["ttft_p99"], ".3f"),
        _f(r["tpot_mean"], ".3f"),
        _f(r["tpot_p50"], ".3f"),
        _f(r["tpot_p99"], ".3f"),
    )


def _error_row(label: tuple[str, ...], r: dict[str, Any], width: int) -> tuple[str, ...]:
    return (*label, r["error"], *("" for _ in range(width - len(label) - 1)))


def single24_table(scenario: str, results: Sequence[tuple[str, str, dict[str, Any]]]) -> str:
    """Rows per (mode, build), the original's row, and ours/original for each of ours."""
    head = ("mode", "build", *COST_HEAD, *FIG_HEAD)
    rows: list[tuple[str, ...]] = []
    for mode, build, r in results:
        if "error" in r:
            rows.append(_error_row((mode, build), r, len(head)))
        else:
            rows.append((mode, build, *_cost_cells(r), *_fig_cells(r)))
    orig = ORIGINAL.get(scenario)
    if orig is not None:
        lo, hi = orig["rss_mb"]
        rows.append(
            (
                "original",
                "python",
                "-",
                f"{orig['cpu_s']:.0f}",
                f"{orig['events']:,.0f}" if "events" in orig else "-",
                f"{orig['events'] / orig['cpu_s']:,.0f}" if "events" in orig else "-",
                "-",
                f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}",
                _f(orig.get("decode_tps"), ".1f"),
                _f(orig.get("all_tps"), ".2f"),
                _f(orig.get("ttft_mean"), ".3f"),
                "-",
                "-",
                _f(orig.get("tpot_mean"), ".3f"),
                "-",
                "-",
            )
        )
        for mode, build, r in results:
            if "error" in r:
                continue
            ev_rate = orig["events"] / orig["cpu_s"] if "events" in orig else None
            rows.append(
                (
                    f"{mode}/orig",
                    build,
                    "-",
                    _ratio(r["cpu_s"], orig["cpu_s"]),
                    _ratio(r["events"], orig.get("events")),
                    _ratio(r["events"] / r["wall_s"], ev_rate),
                    "-",
                    _ratio(r["rss_mb"], orig["rss_mb"]),
                    _ratio(r["decode_tps"], orig.get("decode_tps")),
                    _ratio(r["all_tps"], orig.get("all_tps")),
                    _ratio(r["ttft_mean"], orig.get("ttft_mean")),
                    "-",
                    "-",
                    _ratio(r["tpot_mean"], orig.get("tpot_mean")),
                    "-",
                    "-",
                )
            )
    return table(rows, head)


def scale_table(results: Sequence[tuple[int, str, dict[str, Any]]]) -> str:
    """Rows per (GPUs, build) with planning, tokens, time per token and its ratio to the first size."""
    first = f"vs {results[0][0]:,}" if results else "vs first"
    head = (
        "GPUs",
        "build",
        "plan s",
        "max flow",
        "rate",
        *COST_HEAD,
        "queries",
        "waited",
        "tokens",
        "us/token",
        first,
        *FIG_HEAD,
    )
    base: dict[str, float] = {}
    rows: list[tuple[str, ...]] = []
    for gpus, build, r in results:
        if "error" in r:
            rows.append(_error_row((str(gpus), build), r, len(head)))
            continue
        us_tok = r["wall_s"] / max(r["tokens"], 1) * 1e6
        base.setdefault(build, us_tok)
        rows.append(
            (
                f"{gpus:,}",
                build,
                f"{r['plan_s'] + r['flow_s']:.1f}",
                f"{r['max_flow']:.0f}",
                f"{r['rate']:.0f}",
                *_cost_cells(r),
                f"{r['queries']['submitted']:,}",
                f"{r['queries']['admission_waits']:,}",
                f"{r['tokens']:,}",
                f"{us_tok:.0f}",
                f"{us_tok / base[build]:.2f}x",
                *_fig_cells(r),
            )
        )
    return table(rows, head)


def _scale_summary(results: Sequence[tuple[int, str, dict[str, Any]]]) -> list[str]:
    lines = []
    for build in BUILDS:
        ok = [(g, r) for g, b, r in results if b == build and "error" not in r]
        if len(ok) < 2:
            continue
        (g0, r0), (g1, r1) = ok[0], ok[-1]
        wall = (r1["wall_s"] / max(r1["tokens"], 1)) / (r0["wall_s"] / max(r0["tokens"], 1))
        cpu = (r1["cpu_s"] / max(r1["tokens"], 1)) / (r0["cpu_s"] / max(r0["tokens"], 1))
        lines.append(
            f"{build}: per simulated token, {g1:,} GPUs / {g0:,} GPUs = {wall:.2f}x wall, {cpu:.2f}x CPU "
            f"(target <= 2x); peak RSS {r0['rss_mb']:.0f} -> {r1['rss_mb']:.0f} MB"
        )
    return lines


def _progress(what: str) -> None:
    print(f"  running {what} ...", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    ap.add_argument("--builds", default="compiled,pure", help="comma-separated: compiled, pure")
    ap.add_argument("--quick", action="store_true", help="short windows and two scale sizes: a smoke run")
    ap.add_argument("--sizes", help="scale: comma-separated GPU counts (default 24,96,384,1536; quick 24,96)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    builds = [b.strip() for b in args.builds.split(",") if b.strip()]
    bad = [b for b in builds if b not in BUILDS]
    if bad or not builds:
        ap.error(f"--builds: expected a comma-separated subset of {','.join(BUILDS)}, got {args.builds!r}")
    if args.sizes:
        try:
            sizes = tuple(int(s) for s in args.sizes.split(","))
        except ValueError:
            ap.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    else:
        sizes = QUICK_SCALE_SIZES if args.quick else SCALE_SIZES
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    win = QUICK if args.quick else FULL
    started = time.perf_counter()
    for scenario in scenarios:
        if scenario in ("reference", "online"):
            results: list[tuple[str, str, dict[str, Any]]] = []
            for mode in ("compat", "default"):
                for build in builds:
                    _progress(f"{scenario} {mode} {build}")
                    spec = {"scenario": scenario, "mode": mode, "quick": args.quick}
                    results.append((mode, build, measure(spec, build)))
            if scenario == "reference":
                title = (
                    f"reference: single24 ILP, MaxFlow, offline, 20 initial queries, KV (0.85, 1.0), "
                    f"warm-up {win['ref_warmup']:g} s, window {win['ref_window']:g} s"
                )
            else:
                title = (
                    f"online: single24 ILP, MaxFlow, {win['online_s']} s at 700 tokens/s (azure-conv), "
                    "KV (0.9, 0.6)"
                )
            print(title + (" [QUICK]" if args.quick else ""))
            print(single24_table(scenario, results))
        else:
            sresults: list[tuple[int, str, dict[str, Any]]] = []
            for gpus in sizes:
                for build in builds:
                    _progress(f"scale {gpus} GPUs {build}")
                    spec = {"scenario": "scale", "gpus": gpus, "quick": args.quick}
                    sresults.append((gpus, build, measure(spec, build)))
            print(
                f"scale: sparse geo clusters (regions <= {REGION_GPUS} GPUs, {CROSS_LINKS} links per "
                f"adjacent region pair), {SCALE_PLANNER} plan, MaxFlow, online {SCALE_LOAD:.0%} of max "
                f"flow for {win['scale_s']} s, KV (0.9, 0.6)" + (" [QUICK]" if args.quick else "")
            )
            print(scale_table(sresults))
            for line in _scale_summary(sresults):
                print(line)
        print(flush=True)
    print(f"[bench wall {time.perf_counter() - started:.0f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
