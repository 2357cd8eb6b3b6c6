"""Pictures of plans and runs: a placement drawn over its layers, coloured by the flow through each
node; throughput over time and latency histograms of a run (simulated or served).

Needs matplotlib (``pip install 'helix_async[plots]'``); it is imported only when a plot is drawn.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .extras import require
from .fileio import atomic_write_bytes
from .flowplan import FlowPlan
from .ids import SINK, SOURCE, NodeRef
from .placement.core import Placement
from .placement.flow import max_flow

__all__ = ["plot_latency", "plot_placement", "plot_throughput"]


def _lanes(placement: Placement, nodes: list[int]) -> dict[int, int]:
    """Greedy interval packing: each node on the lowest lane free at its start layer."""
    lane_end: list[int] = []
    out: dict[int, int] = {}
    order = sorted(nodes, key=lambda i: (placement.layers[i][0], -placement.layers[i][1], i))  # type: ignore[index]
    for i in order:
        s, e = placement.layers[i]  # type: ignore[misc]
        for k, end in enumerate(lane_end):
            if end <= s:
                lane_end[k] = e
                out[i] = k
                break
        else:
            out[i] = len(lane_end)
            lane_end.append(e)
    return out


def plot_placement(
    placement: Placement,
    flow_plan: FlowPlan | None,
    path: str | Path,
    *,
    utilisation: Mapping[int, float] | None = None,
    title: str | None = None,
    title_extra: str | None = None,
) -> Path:
    """Draw a placement and its flow to a PNG at ``path`` (matplotlib, Agg backend).

    Nodes are boxes over their layer range (x) on lanes (y), coloured by utilisation (flow/capacity),
    labelled "id type [s,e)"; links are arrows from the end of one box to where the next box is
    entered, width and opacity by flow (zero-flow links dotted grey); the title gives the max flow
    and the max compute throughput. ``flow_plan`` defaults to ``max_flow(placement)``.
    ``utilisation`` (node -> 0..1) colours the nodes instead, e.g. the busy fraction a simulation
    measured; ``title`` replaces the default title, ``title_extra`` adds a line to it (``plan
    --plot`` with the served objective: the predicted throughput and what limits it).
    """
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors
    from matplotlib.patches import FancyBboxPatch

    if flow_plan is None:
        flow_plan = max_flow(placement)
    cl = placement.cluster
    L = placement.num_layers
    nodes = [i for i, r in placement.layers.items() if r is not None]
    lanes = _lanes(placement, nodes)
    n_lanes = max(lanes.values(), default=0) + 1
    fig, ax = plt.subplots(figsize=(18, max(3.2, 0.62 * n_lanes + 1.7)), dpi=110)
    cmap = plt.get_cmap("viridis")
    norm = colors.Normalize(0.0, 1.0)
    box_h, gap = 0.74, 0.2  # lane units; layer units left free at each end of a box
    mid = (n_lanes - 1) / 2
    src_x, sink_x = -4.0, L + 4.0

    def y_of(ref: NodeRef) -> float:
        return mid if ref in (SOURCE, SINK) else float(lanes[int(ref)])

    max_link = max(flow_plan.link_flows.values(), default=0.0) or 1.0
    for (u, v), f in sorted(flow_plan.link_flows.items(), key=lambda kv: kv[1]):
        # from the end of u's box to the point where v is entered (v's start, or inside v's range
        # for a partial link)
        x0 = src_x + 1.5 if u == SOURCE else float(placement.layers[u][1]) - gap  # type: ignore[index]
        if v == SINK:
            x1 = sink_x - 1.5
        elif u == SOURCE:
            x1 = float(placement.layers[v][0]) + gap  # type: ignore[index]
        else:
            x1 = float(placement.layers[u][1]) + gap  # type: ignore[index]
        y0, y1 = y_of(u), y_of(v)
        if f <= 1e-9:
            ax.plot([x0, x1], [y0, y1], ls=":", lw=0.6, color="0.6", zorder=1)
            continue
        share = f / max_link
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={
                "arrowstyle": "-|>",
                "lw": 0.5 + 3.5 * share,
                "color": "tab:red",
                "alpha": 0.4 + 0.5 * share,
                "mutation_scale": 7,
                "shrinkA": 0,
                "shrinkB": 0,
            },
            zorder=2,
        )
    for i in nodes:
        s, e = placement.layers[i]  # type: ignore[misc]
        y = lanes[i]
        busy = flow_plan.utilisation(i) if utilisation is None else utilisation.get(i, 0.0)
        face = cmap(norm(min(1.0, busy)))
        ax.add_patch(
            FancyBboxPatch(
                (s + gap, y - box_h / 2),
                e - s - 2 * gap,
                box_h,
                boxstyle="round,pad=0,rounding_size=0.12",
                facecolor=face,
                edgecolor="black",
                lw=0.6,
                zorder=3,
            )
        )
        r, g, b, _ = face
        ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
        mtype = cl.nodes[i].machine_type
        if e - s >= 2:
            ax.text(
                (s + e) / 2,
                y,
                f"{i} {mtype}\n[{s},{e})",
                ha="center",
                va="center",
                fontsize=6.5,
                color=ink,
                zorder=4,
                linespacing=1.1,
            )
        else:  # one layer: too narrow for a horizontal label
            ax.text(
                (s + e) / 2,
                y,
                f"{i} {mtype} [{s},{e})",
                ha="center",
                va="center",
                fontsize=5,
                rotation=90,
                color=ink,
                zorder=4,
            )
    for x, name in ((src_x, "source"), (sink_x, "sink")):
        ax.add_patch(
            FancyBboxPatch(
                (x - 1.5, mid - box_h / 2),
                3.0,
                box_h,
                boxstyle="round,pad=0,rounding_size=0.2",
                facecolor="0.88",
                edgecolor="black",
                lw=0.6,
                zorder=3,
            )
        )
        ax.text(x, mid, name, ha="center", va="center", fontsize=7, zorder=4)
    ax.set_xlim(src_x - 2.0, sink_x + 2.0)
    ax.set_ylim(-0.6, n_lanes - 0.4)
    ax.invert_yaxis()
    ax.set_yticks([])
    ax.set_xlabel("layer")
    step = 5 if L <= 40 else 10
    ax.set_xticks(list(range(0, L + 1, step)))
    ax.grid(axis="x", color="0.92", zorder=0)
    U = flow_plan.max_compute_throughput
    default_title = (
        f"{placement.method} placement of {placement.model} on {cl.name}: "
        f"max flow {flow_plan.value:.2f} tok/s, max compute throughput {U:.2f} tok/s"
    )
    if title_extra:
        default_title = f"{default_title}\n{title_extra}"
    ax.set_title(default_title if title is None else title, fontsize=10)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    sm.set_array([])
    label = "utilisation (flow / capacity)" if utilisation is None else "utilisation (measured busy fraction)"
    fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01, label=label)
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=Path(path).suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue(), "plot")


def _pyplot() -> tuple[Any, Any]:
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _save(fig: Any, plt: Any, path: Path) -> Path:
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue(), "plot")


def plot_throughput(
    token_times: Sequence[float],
    token_counts: Sequence[int],
    decode_times: Sequence[float],
    path: str | Path,
    *,
    max_flow: float | None = None,
    window: tuple[float, float] | None = None,
    title: str = "throughput over time",
    time_label: str = "time (s)",
) -> Path:
    """Tokens per 1-s bin over time: all tokens (each finished iteration weighted by its tokens) and
    decode tokens; the max flow and the statistics window when given."""
    import numpy as np

    _, plt = _pyplot()
    t = np.asarray(token_times, dtype=float)
    n = np.asarray(token_counts, dtype=float)
    fig, ax = plt.subplots(figsize=(10, 4), dpi=110)
    if len(t):
        edges = np.arange(0.0, np.ceil(t.max()) + 1.0)
        per_s, _ = np.histogram(t, bins=edges, weights=n)
        ax.plot(edges[:-1], per_s, lw=0.6, label="all tokens (per 1-s bin)")
        dec, _ = np.histogram(np.asarray(decode_times, dtype=float), bins=edges)
        ax.plot(edges[:-1], dec, lw=0.6, label="decode tokens")
    if max_flow is not None:
        ax.axhline(max_flow, color="tab:red", ls="--", lw=1, label=f"max flow {max_flow:.1f}")
    if window is not None:
        ax.axvspan(window[0], window[1], color="0.9", zorder=0, label="statistics window")
    ax.set_xlabel(time_label)
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=9)
    return _save(fig, plt, Path(path))


def plot_latency(
    prompt_latency: Sequence[float],
    decode_latency: Sequence[float],
    path: str | Path,
    *,
    stats: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Histograms of prompt latency (TTFT) and decode latency (per token); ``stats`` may hold
    ``{"prompt": {"mean": .., "p99": ..}, "decode": {...}}`` to mark."""
    import numpy as np

    _, plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, key, lat, label in (
        (axes[0], "prompt", prompt_latency, "prompt latency (TTFT), s"),
        (axes[1], "decode", decode_latency, "decode latency (per token), s"),
    ):
        arr = np.asarray(lat, dtype=float)
        if len(arr):
            ax.hist(arr, bins=50, color="tab:blue", alpha=0.8)
            st = (stats or {}).get(key)
            if st:
                ax.axvline(st["mean"], color="k", lw=1, label=f"mean {st['mean']:.3f}")
                ax.axvline(st["p99"], color="tab:red", lw=1, ls="--", label=f"p99 {st['p99']:.3f}")
                ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("iterations")
    return _save(fig, plt, Path(path))
