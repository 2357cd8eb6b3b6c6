"""Statistics of a simulation run, as the original computes them (docs/original.md §8.9-8.11).

The window is ``[t0 + warmup, t0 + warmup + duration]`` (inclusive) on the finish time of each
iteration (the token's arrival back at the host).  Decode throughput is the number of decode
iterations finished in the window over ``duration``; prompt latency (TTFT) is a prompt's finish
time minus its query's arrival, decode latency (time per output token) a decode's finish time
minus its creation (the previous token's arrival).  Percentiles take ``sorted[int(len * p)]``.
All-token throughput is every token processed (prompt tokens, plus one per decode) over the last
finish time (absolute, as the original prints it), set beside the plan's max flow.

The JSON report holds no wall-clock figure, so that one seed gives one report, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from helix_async.ids import NodeRef
from helix_async.worker import WorkerStats

from .simulation import Simulation

__all__ = ["PERCENTILES", "build_report", "percentiles", "report_json", "summary_lines", "watch_text"]

PERCENTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def percentiles(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """mean and p5..p99 (``sorted[int(len * p)]``); None when there are no values."""
    if len(values) == 0:
        return {"count": 0, "mean": None, **{f"p{round(p * 100)}": None for p in PERCENTILES}}
    arr = np.sort(np.asarray(values, dtype=float))
    n = len(arr)
    out: dict[str, Any] = {"count": n, "mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{round(p * 100)}"] = float(arr[min(n - 1, int(n * p))])
    return out


def _in_window(done: Any, values: Any, lo: float, hi: float) -> np.ndarray:
    d = np.frombuffer(done, dtype=float) if len(done) else np.zeros(0)
    v = np.frombuffer(values, dtype=float) if len(values) else np.zeros(0)
    mask = (d >= lo) & (d <= hi)
    return v[mask]


def _ref(node: NodeRef) -> Any:
    return node if isinstance(node, int) else str(node)


def goodput(sim: Simulation, lo: float, hi: float, ttft: float, tpot: float) -> dict[str, float | int]:
    """SLO goodput over queries finished in ``[lo, hi]``: a query meets the SLO when its TTFT
    (arrival to first token, admission wait included) is at most ``ttft`` and its mean time per
    output token after the first is at most ``tpot``. ``token_fraction``: the share of those
    queries' output tokens that belong to queries meeting it; goodput is the window's decode
    throughput times that share (the same definition the planner's served model predicts)."""
    met = total = met_tokens = all_tokens = 0
    for _qid, arrived, first, done, _n, m in sim.host.query_records:
        if not lo <= done <= hi:
            continue
        total += 1
        per_token = (done - first) / max(m - 1, 1)
        all_tokens += m
        if first - arrived <= ttft and per_token <= tpot:
            met += 1
            met_tokens += m
    return {
        "ttft": ttft,
        "tpot": tpot,
        "queries": total,
        "met": met,
        "token_fraction": met_tokens / all_tokens if all_tokens else 0.0,
    }


def by_priority(host: Any, lo: float, hi: float) -> dict[str, Any]:
    """Per priority class, the queries finished within [lo, hi]: their count, time to first token
    (arrival, admission wait included, to first token) and mean time per output token (first token
    to last, over the tokens after the first); {} when every query had priority 0."""
    prios = host.query_priority
    if not any(prios):
        return {}
    ttft: dict[int, list[float]] = {}
    tpot: dict[int, list[float]] = {}
    for (_qid, arrived, first, done, _n, m), p in zip(host.query_records, prios, strict=True):
        if not lo <= done <= hi:
            continue
        ttft.setdefault(p, []).append(first - arrived)
        if m > 1:
            tpot.setdefault(p, []).append((done - first) / (m - 1))
    return {str(p): {"queries": len(ttft[p]), "ttft": percentiles(ttft[p]), "tpot": percentiles(tpot.get(p, []))}
            for p in sorted(ttft)}


def migration_summary(sim: Simulation) -> dict[str, Any]:
    """Live migrations of the run: how many, their bytes, and the downtime each cost its query
    (from holding its decode to sending it on the new route) and the whole move took."""
    host = sim.host
    hs = host.stats
    down = [done - held for _, _, _, _, _, held, done, _ in host.live_moves]
    whole = [done - began for _, _, _, _, began, _, done, _ in host.live_moves]
    pol = sim.migration
    return {
        "completed": hs.live_migrations,
        "aborted": hs.migrations_aborted,
        "unreserved": hs.migrations_unreserved,
        "started": 0 if pol is None else pol.started,
        "rounds": 0 if pol is None else pol.rounds,
        "bytes": sum(w.stats.migrate_bytes for w in _all_workers(sim)),
        "preemptions": sum(w.stats.kv_preemptions for w in _all_workers(sim)),
        "downtime": percentiles(np.asarray(down, dtype=float)),
        "duration": percentiles(np.asarray(whole, dtype=float)),
    }


def _all_workers(sim: Simulation) -> list[Any]:
    """Every worker the run had: the serving ones and those they replaced."""
    return [*sim.workers.values(), *(w for ws in sim.past_workers.values() for w in ws)]


#: WorkerStats fields that are peaks (the largest over a node's workers); the others add up
_PEAKS = frozenset({"kv_peak", "queued_peak"})


def _node_stats(w: Any, past: Any) -> WorkerStats:
    """A node's counters over its workers: ``w`` and the ones it replaced."""
    if not past:
        return w.stats
    out = WorkerStats()
    for x in (*past, w):
        for f in fields(WorkerStats):
            a, b = getattr(out, f.name), getattr(x.stats, f.name)
            setattr(out, f.name, max(a, b) if f.name in _PEAKS else a + b)
    return out


def build_report(
    sim: Simulation, *, warmup: float, duration: float, config: dict[str, Any], slo: tuple[float, float] | None = None
) -> dict[str, Any]:
    """The run's figures (see the module doc) as plain JSON-able data."""
    host = sim.host
    lo = sim.t0 + warmup
    hi = lo + duration
    decode_done = np.frombuffer(host.decode_done, dtype=float) if len(host.decode_done) else np.zeros(0)
    decodes_in_window = int(((decode_done >= lo) & (decode_done <= hi)).sum())
    prompt_lat = _in_window(host.prompt_done, host.prompt_latency, lo, hi)
    decode_lat = _in_window(host.decode_done, host.decode_latency, lo, hi)
    tok_t = np.frombuffer(host.tokens_done, dtype=float) if len(host.tokens_done) else np.zeros(0)
    tok_n = np.frombuffer(host.tokens_count, dtype=np.int64) if len(host.tokens_count) else np.zeros(0, np.int64)
    t_last = float(tok_t.max()) if len(tok_t) else 0.0
    tokens = int(tok_n.sum())
    win_tokens = int(tok_n[(tok_t >= lo) & (tok_t <= hi)].sum()) if len(tok_t) else 0
    horizon = max(sim.clock.now() - sim.t0, 1e-12)
    nodes = []
    for i, w in sim.workers.items():
        st = _node_stats(w, sim.past_workers.get(i, ()))
        nodes.append(
            {
                "node": i,
                "type": sim.placement.cluster.machine(i).name,
                "layers": [w.a, w.b],
                "utilisation": st.busy_time / horizon,
                "batches": st.batches,
                "prompt_tokens": st.prompt_tokens,
                "decode_tokens": st.decode_tokens,
                "mean_prompt_residence_s": (st.prompt_residence / st.prompts_left) if st.prompts_left else None,
                "mean_decode_residence_s": (st.decode_residence / st.decodes_left) if st.decodes_left else None,
                "queued_peak": st.queued_peak,
                "kv_capacity": w.kv_capacity,
                "kv_peak": st.kv_peak,
                "kv_used_end": w.kv_used,
                "kv_waits": st.kv_waits,
                "kv_overflows": st.kv_overflows,
                "gathers": st.gathers,
                "gather_wait_s": st.gather_wait,
                "bad_messages": st.bad_messages,
                "planned_flow": sim.flow.node_flows.get(i, 0.0),
            }
        )
    links = [
        {**entry, "src": _ref(entry["src"]), "dst": _ref(entry["dst"])} for entry in sim.network.link_stats(horizon)
    ]
    hs = host.stats
    extra: dict[str, Any] = {}
    if slo is not None:
        g = goodput(sim, lo, hi, slo[0], slo[1])
        g["decode_throughput"] = decodes_in_window / duration * g["token_fraction"]
        extra["goodput"] = g
    if sim.migration is not None:
        extra["migration"] = migration_summary(sim)
    if sim.fleet is not None:
        extra["fleet"] = sim.fleet.summary(t_last if t_last > 0 else sim.clock.now())
    classes = by_priority(host, lo, hi)
    if classes:  # (absent otherwise: reports without priorities stay as they were)
        extra["by_priority"] = classes
    return {
        **extra,
        "config": config,
        "plan": {
            "method": sim.placement.method,
            "max_flow": sim.max_flow,
            "max_compute_throughput": sim.max_compute,
            "t0": sim.t0,
        },
        "window": {"start": lo, "end": hi, "duration": duration},
        "decode_throughput": decodes_in_window / duration,
        "window_token_throughput": win_tokens / duration,
        "prompt_latency": percentiles(prompt_lat),
        "decode_latency": percentiles(decode_lat),
        "all_tokens": {
            "tokens": tokens,
            "last_finish": t_last,
            "throughput": tokens / t_last if t_last > 0 else 0.0,
            "max_flow_time": tokens / sim.max_flow if sim.max_flow > 0 else None,
        },
        "queries": {
            "submitted": hs.submitted,
            "admitted": hs.admitted,
            "finished": hs.finished,
            "active_end": host.active,
            "waiting_end": host.waiting,
            "rejected": hs.rejected,
            "would_abort": hs.would_abort,
            "admission_waits": hs.admission_waits,
        },
        "kv": {
            "overflows": sum(n["kv_overflows"] for n in nodes),
            "waits": sum(n["kv_waits"] for n in nodes),
            "expected_bottleneck_end": host.kv_bottleneck(),
        },
        "network": {
            "control_messages": sim.network.control_messages,
            "dropped": sim.network.dropped,
            "links": links,
        },
        "nodes": nodes,
        "events": sim.events,
        "virtual_end": sim.clock.now(),
    }


def report_json(report: dict[str, Any]) -> str:
    """The report as canonical JSON text (sorted keys, stable float repr)."""
    return json.dumps(report, sort_keys=True, indent=2, allow_nan=False) + "\n"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The original's printout (§8.9), plus p50/p99."""
    w = report["window"]
    pl, dl = report["prompt_latency"], report["decode_latency"]
    at = report["all_tokens"]
    plan = report["plan"]

    def f(x: Any, spec: str = ".3f") -> str:
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"Max compute throughput = {plan['max_compute_throughput']}",
        f"Max flow = {plan['max_flow']}",
        "# ------------------------------------------------------------- #",
        f"Simulation Results (time range: {w['start']:g}s - {w['end']:g}s)",
        f"Avg decode speed: {report['decode_throughput']:.1f} tokens/s",
        f"Avg prompt latency: {f(pl['mean'])}s (p50 {f(pl['p50'])}s, p99 {f(pl['p99'])}s)",
        f"Avg decode latency: {f(dl['mean'])}s (p50 {f(dl['p50'])}s, p99 {f(dl['p99'])}s)",
        "# ------------------------------------------------------------- #",
        f"Total tokens: {at['tokens']} in {at['last_finish']:.2f}s ({at['throughput']:.2f} tokens/s)",
    ]
    if at["max_flow_time"] is not None:
        lines.append(
            f"Theoretical optimal: {at['max_flow_time']:.2f}s ({plan['max_flow']:.2f} tokens/s)"
        )
    q = report["queries"]
    lines.append(
        f"Queries: {q['finished']} finished, {q['active_end']} active, {q['waiting_end']} waiting, "
        f"{q['rejected']} rejected; KV overflows {report['kv']['overflows']}, waits {report['kv']['waits']}"
    )
    for p, c in report.get("by_priority", {}).items():
        t, d = c["ttft"], c["tpot"]
        lines.append(
            f"Priority {p}: {c['queries']} queries; TTFT {f(t['mean'])}s (p50 {f(t['p50'])}s, p99 {f(t['p99'])}s), "
            f"per-token {f(d['mean'], '.4f')}s (p99 {f(d['p99'], '.4f')}s)"
        )
    fl = report.get("fleet")
    if fl:
        outs = sum(1 for e in fl["events"] if e["event"] == "out")
        lefts = sum(1 for e in fl["events"] if e["event"] == "left")
        lines.append(f"Fleet: {outs} joined, {lefts} left; {fl['gpu_hours']:.2f} GPU-hours, ${fl['dollars']:.2f}")
    m = report.get("migration")
    if m:
        dt = m["downtime"]
        lines.append(
            f"Migrations: {m['completed']} completed, {m['aborted']} aborted, {m['bytes'] / 1e6:.1f} MB copied; "
            + ("no downtime" if dt["mean"] is None else f"downtime {dt['mean']:.4f}s (p99 {dt['p99']:.4f}s)")
        )
    if report.get("faults"):
        from .faults import fault_lines

        lines.extend(fault_lines(report["faults"]))
    return lines


def watch_text(sim: Simulation, next_event: float | None) -> str:
    """The original's periodic watch block (§8.10)."""
    host = sim.host
    lines = [
        "# -------------- Watch -------------- #",
        f"Last event time = {sim.clock.now()}",
        f"Next event time = {next_event}",
        f"[Item] active queries: {host.active}, finished queries {host.stats.finished}.",
        "[Item] KV-Cache:",
    ]
    router = host.router
    per_layer_free: dict[int, float] = {}
    per_layer_total: dict[int, float] = {}
    for i, w in sim.workers.items():
        used, cap = w.kv_snapshot()
        pct = round(100 * used / cap) if cap else 0
        line = f"\tCompute-{i}: {used}/{cap} ({pct}%)"
        if router is not None:
            kv = router.kv
            total = kv.total(i)
            exp_used = total - kv.available(i)
            line += f" | {exp_used} / {total} ({round(100 * exp_used / total) if total else 0}%) | {exp_used >= used}"
        lines.append(line)
        k = w.b - w.a
        for layer in range(w.a, w.b):
            per_layer_free[layer] = per_layer_free.get(layer, 0.0) + (cap - used) / k
            per_layer_total[layer] = per_layer_total.get(layer, 0.0) + cap / k
    real = max((1 - per_layer_free[x] / per_layer_total[x]) for x in per_layer_total) if per_layer_total else 0.0
    lines.append(f"Realtime bottleneck usage: {real}")
    if router is not None:
        lines.append(f"Expected bottleneck usage: {host.kv_bottleneck()}")
    lines.append("# ------------ End Watch ------------ #")
    return "\n".join(lines)
