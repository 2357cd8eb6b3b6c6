"""The analytical per-layer profile against every measured profile we ship, in one run.

Run: ``python bench/bench_analytical.py`` (add ``--fit`` to refit the seven factors on LLaMA-2-70B
and the CPU's on SmolLM2, and print them as gpus.toml lines). The rules: docs/profiles.md.

Each GPU type's one efficiency factor is fitted on LLaMA-2-70B's measured tables only; LLaMA-1-30B's
tables check it. For both models and the original's seven GPU types the script prints the signed
error ``analytical / measured - 1`` at a few batch sizes of each phase and the mean absolute error
over the whole grid, then the node settings (most layers, KV capacity) against the measured ones.
The ``CPU`` type (one core of the development machine) is fitted on SmolLM2-135M-Instruct's shipped
CPU profile only and checked on tiny-llama's: the same error table, every point of both.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helix_async.model import (  # noqa: E402
    attach_profiles,
    dataset_constants,
    get_model,
    load_profiles,
    max_compute_throughput,
)
from helix_async.profiles.analytical import LayerShape, analytical_settings  # noqa: E402
from helix_async.profiles.gpus import find_gpu  # noqa: E402
from helix_async.profiles.validation import (  # noqa: E402
    CHECK_MODEL,
    CPU_CHECK_MODEL,
    CPU_FIT_MODEL,
    CPU_TYPE,
    FIT_MODEL,
    MEASURED_GPUS,
    PointError,
    compare,
    compare_cpu,
    fit_cpu,
    fit_on_reference,
)

PROMPT_AT = (250, 1000, 2000, 4000, 7500)
DECODE_AT = (2, 16, 60, 100, 200, 400)
CPU_PROMPT_AT = (16, 64, 256, 512, 2048)
CPU_DECODE_AT = (1, 2, 8, 32, 128)


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table (as bench/README.md shows it)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.0f}%"


def error_table(model: str) -> tuple[list[str], list[list[str]], list[float]]:
    head = ["GPU"] + [f"P{x}" for x in PROMPT_AT] + ["P mean abs"] + [f"D{x}" for x in DECODE_AT] + ["D mean abs"]
    rows = []
    all_abs: list[float] = []
    for gpu in MEASURED_GPUS:
        pts = compare(model, gpu)
        at = {(p.phase, p.x): p.error for p in pts}
        row = [gpu]
        for phase, grid in (("prompt", PROMPT_AT), ("decode", DECODE_AT)):
            row += [_pct(at.get((phase, x))) for x in grid]
            errs = [abs(p.error) for p in pts if p.phase == phase]
            all_abs += errs
            row.append(f"{100 * statistics.fmean(errs):.0f}%")
        rows.append(row)
    return head, rows, all_abs


def cpu_error_table() -> tuple[list[str], list[list[str]], dict[str, list[float]]]:
    """The CPU type against the two shipped CPU profiles (fit and check), every point of each."""
    head = (["model"] + [f"P{x}" for x in CPU_PROMPT_AT] + ["P mean abs"] + [f"D{x}" for x in CPU_DECODE_AT]
            + ["D mean abs"])
    rows = []
    errs: dict[str, list[float]] = {}
    for key, role in ((CPU_FIT_MODEL, "fit"), (CPU_CHECK_MODEL, "check")):
        pts: list[PointError] = compare_cpu(key)
        at = {(p.phase, p.x): p.error for p in pts}
        row = [f"{key} ({role})"]
        errs[key] = []
        for phase, grid in (("prompt", CPU_PROMPT_AT), ("decode", CPU_DECODE_AT)):
            row += [_pct(at.get((phase, x))) for x in grid]
            e = [abs(p.error) for p in pts if p.phase == phase]
            errs[key] += e
            row.append(f"{100 * statistics.fmean(e):.0f}%")
        rows.append(row)
    return head, rows, errs


def settings_table(model: str) -> tuple[list[str], list[list[str]]]:
    ps = load_profiles(model)
    shape = LayerShape.of(ps.model)
    head = ["GPU", "most layers meas/ana", "KV(1) ana/meas", "KV(max) ana/meas", "decode cap meas/ana"]
    rows = []
    for gpu in MEASURED_GPUS:
        m = ps.node_settings(gpu)
        a = analytical_settings(shape, find_gpu(gpu), ps.model.num_layers, dataset_constants())  # type: ignore[arg-type]
        assert a is not None
        k = min(m.max_layers, a.max_layers)
        rows.append([gpu, f"{m.max_layers}/{a.max_layers}", f"{a.kv_capacity[0] / m.kv(1):.2f}",
                     f"{a.kv_capacity[k - 1] / m.kv(k):.2f} (k={k})",
                     f"{m.decode_max_tokens[0]}/{a.decode_max_tokens[0]}"])
    return head, rows


def planner_view() -> tuple[list[str], list[list[str]]]:
    """Max compute throughput (docs/original.md §3.5) of the original's clusters (and of tiny3, three
    CPU workers, for tiny-llama's CPU profile) with every profile analytical (the same model under another key, so no measured table and none of the original's
    hand-set constants applies) against the measured profiles."""
    from helix_async.cluster import load_cluster

    head = ["model", "cluster", "measured tok/s", "analytical tok/s", "ratio"]
    rows = []
    for model, clusters in ((FIT_MODEL, ("single24", "cluster42")), (CHECK_MODEL, ("single24", "cluster10")),
                            ("tiny-llama", ("tiny3",))):
        spec = get_model(model)
        alone = dataclasses.replace(spec, name=f"{spec.name}-analytical", key=f"{spec.key}_analytical", gpus=(),
                                    typical_layers_a={}, typical_layers_b={}, normalized_perf_initial={},
                                    max_num_layers={}, profile_kinds={})
        for name in clusters:
            c = load_cluster(name)
            m, a = max_compute_throughput(c, spec), max_compute_throughput(c, attach_profiles(alone))
            rows.append([model, name, f"{m:.0f}", f"{a:.0f}", f"{a / m:.2f}"])
    return head, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true",
                    help="refit the factors (GPUs on LLaMA-2-70B, the CPU on SmolLM2) and print gpus.toml lines")
    args = ap.parse_args(argv)
    print(f"efficiency factors (fitted on {FIT_MODEL} only; the table uses the shipped gpus.toml values)")
    fit_rows = []
    for gpu in MEASURED_GPUS:
        fitted = fit_on_reference(gpu)
        g = find_gpu(gpu)
        assert g is not None
        fit_rows.append([gpu, f"{fitted:.3f}", f"{g.efficiency:.3f}"])
    cpu = find_gpu(CPU_TYPE)
    assert cpu is not None
    fit_rows.append([f"{CPU_TYPE} (on {CPU_FIT_MODEL})", f"{fit_cpu():.3f}", f"{cpu.efficiency:.3f}"])
    print(table(["GPU", "fitted now", "shipped"], fit_rows))
    if args.fit:
        for gpu, fitted, _ in fit_rows:
            name = gpu.split()[0]
            kind = "cpu" if name == CPU_TYPE else "group" if "x" in name else "gpu"
            print(f"[{kind}.{name}] efficiency = {fitted}")
    for model, role in ((FIT_MODEL, "fit"), (CHECK_MODEL, "check")):
        head, rows, errs = error_table(model)
        print(f"\n{model} ({role}): analytical / measured - 1 (P: prompt tokens, D: decode sequences)")
        print(table(head, rows))
        print(f"mean absolute error over all {len(errs)} points: {100 * statistics.fmean(errs):.1f}%, "
              f"median {100 * statistics.median(errs):.1f}%, max {100 * max(errs):.0f}%")
    head, rows, cpu_errs = cpu_error_table()
    print(f"\n{CPU_TYPE} ({cpu.description}; {cpu.flops / 1e9:.1f} GFLOP/s x {cpu.efficiency:.3f}, "
          f"{cpu.mem_bw / 1e9:.1f} GB/s, {cpu.dtype}): analytical / measured - 1, fitted on {CPU_FIT_MODEL}, "
          f"checked on {CPU_CHECK_MODEL}")
    print(table(head, rows))
    for key, errs in cpu_errs.items():
        print(f"{key}: mean absolute error over all {len(errs)} points: {100 * statistics.fmean(errs):.1f}%, "
              f"median {100 * statistics.median(errs):.1f}%, max {100 * max(errs):.0f}%")
    for model in (FIT_MODEL, CHECK_MODEL):
        head, rows = settings_table(model)
        print(f"\n{model}: node settings, analytical against measured")
        print(table(head, rows))
    head, rows = planner_view()
    print("\nwhat the planner sees: max compute throughput, all analytical against measured")
    print(table(head, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
