"""Plots of a simulation run (matplotlib, the ``plots`` extra): throughput over time, latency
histograms, and the placement coloured by measured utilisation (docs/original.md §8.11)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from helix_async.plots import plot_latency, plot_placement, plot_throughput

__all__ = ["write_plots"]


def write_plots(result: Any, out_dir: Path) -> list[Path]:
    """Write ``throughput.png``, ``latency.png`` and ``placement.png`` into ``out_dir``."""
    sim = result.sim
    host = sim.host
    report = result.report
    w = report["window"]
    written = [
        plot_throughput(
            host.tokens_done,
            host.tokens_count,
            host.decode_done,
            out_dir / "throughput.png",
            max_flow=sim.max_flow,
            window=(w["start"], w["end"]),
            title=f"{report['config'].get('scheduler')} on {sim.placement.cluster.name}: throughput over time",
            time_label="simulated time (s)",
        )
    ]
    lat = {}
    for key in ("prompt", "decode"):
        a = np.frombuffer(getattr(host, f"{key}_latency"), dtype=float) if len(getattr(host, f"{key}_latency")) else np.zeros(0)
        done = np.frombuffer(getattr(host, f"{key}_done"), dtype=float) if len(getattr(host, f"{key}_done")) else np.zeros(0)
        lat[key] = a[(done >= w["start"]) & (done <= w["end"])]
    stats = {k: report[f"{k}_latency"] for k in ("prompt", "decode") if len(lat[k])}
    written.append(plot_latency(lat["prompt"], lat["decode"], out_dir / "latency.png", stats=stats))

    util = {node["node"]: node["utilisation"] for node in report["nodes"]}
    written.append(
        plot_placement(
            sim.placement,
            sim.flow,
            out_dir / "placement.png",
            utilisation=util,
            title=f"{sim.placement.method} on {sim.placement.cluster.name}: nodes coloured by measured busy fraction; "
            f"decode {report['decode_throughput']:.1f} tok/s, max flow {sim.max_flow:.1f}",
        )
    )
    return written
