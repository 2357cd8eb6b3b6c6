"""Plots of a simulation run (matplotlib, the ``plots`` extra): throughput over time, latency
histograms, and the placement coloured by measured utilisation (HELIX_SPEC §8.11)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from helix_async.extras import require
from helix_async.fileio import atomic_write_bytes
from helix_async.plots import plot_placement

__all__ = ["write_plots"]


def _save(fig: Any, plt: Any, path: Path) -> Path:
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue(), "plot")


def write_plots(result: Any, out_dir: Path) -> list[Path]:
    """Write ``throughput.png``, ``latency.png`` and ``placement.png`` into ``out_dir``."""
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = result.sim
    host = sim.host
    report = result.report
    written = []

    t = np.frombuffer(host.tokens_done, dtype=float) if len(host.tokens_done) else np.zeros(0)
    n = np.frombuffer(host.tokens_count, dtype=np.int64) if len(host.tokens_count) else np.zeros(0, np.int64)
    fig, ax = plt.subplots(figsize=(10, 4), dpi=110)
    if len(t):
        edges = np.arange(0.0, np.ceil(t.max()) + 1.0)
        per_s, _ = np.histogram(t, bins=edges, weights=n)
        ax.plot(edges[:-1], per_s, lw=0.6, label="all tokens (per 1-s bin)")
        d = np.frombuffer(host.decode_done, dtype=float) if len(host.decode_done) else np.zeros(0)
        dec, _ = np.histogram(d, bins=edges)
        ax.plot(edges[:-1], dec, lw=0.6, label="decode tokens")
    ax.axhline(sim.max_flow, color="tab:red", ls="--", lw=1, label=f"max flow {sim.max_flow:.1f}")
    w = report["window"]
    ax.axvspan(w["start"], w["end"], color="0.9", zorder=0, label="statistics window")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"{report['config'].get('scheduler')} on {sim.placement.cluster.name}: throughput over time", fontsize=9)
    written.append(_save(fig, plt, out_dir / "throughput.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, key, label in ((axes[0], "prompt", "prompt latency (TTFT), s"), (axes[1], "decode", "decode latency (per token), s")):
        lat = np.frombuffer(getattr(host, f"{key}_latency"), dtype=float) if len(getattr(host, f"{key}_latency")) else np.zeros(0)
        done = np.frombuffer(getattr(host, f"{key}_done"), dtype=float) if len(getattr(host, f"{key}_done")) else np.zeros(0)
        lat = lat[(done >= w["start"]) & (done <= w["end"])]
        if len(lat):
            ax.hist(lat, bins=50, color="tab:blue", alpha=0.8)
            stats = report[f"{key}_latency"]
            ax.axvline(stats["mean"], color="k", lw=1, label=f"mean {stats['mean']:.3f}")
            ax.axvline(stats["p99"], color="tab:red", lw=1, ls="--", label=f"p99 {stats['p99']:.3f}")
            ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("iterations in window")
    written.append(_save(fig, plt, out_dir / "latency.png"))

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
