"""How well the served model predicts what plans serve: predicted next to simulated, over many plans.

Run: ``python bench/bench_served_model.py [--window S] [--jobs N] [--quick]``.

Plans (LLaMA-2-70B): on single24 the original's shipped layouts (ILP, ILP artifact, Petals,
Swarm, homogeneous); on single24, 3cluster24 and cluster42 every heuristic of ours that applies,
the max-flow MILP's plan (20 s), the position MILP with KV floors (served constraints, two
settings), and seeded perturbations of those plans (one to three random local-search moves; seeds
0..). Each plan is predicted by ``helix_async.placement.served`` and simulated (MaxFlow, the
README offline scenario: 20 initial queries, KV (0.85, 1.0), warm-up 60 s, then ``--window``
seconds; default semantics and seed 0).

Printed: one row per plan (predicted and simulated decode tokens/s and mean TPOT), then per
cluster and overall the Spearman rank correlation of predicted against simulated decode
throughput and the median absolute relative error. ``--quick``: 5 plans, 60-s windows (a smoke run).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_async.cluster import load_cluster  # noqa: E402
from helix_async.errors import PlanningError  # noqa: E402
from helix_async.model import ThroughputModel, get_model  # noqa: E402
from helix_async.placement import Placement  # noqa: E402
from helix_async.placement.heuristics import HEURISTICS, run_heuristic  # noqa: E402
from helix_async.placement.io import load_shipped_layout, placement_from_dict, placement_to_dict  # noqa: E402
from helix_async.placement.milp import Capacities, PositionModel, interchangeable_classes  # noqa: E402
from helix_async.placement.search import plan  # noqa: E402
from helix_async.placement.served import ServedModel  # noqa: E402
from helix_async.placement.served_search import ServedSearch, perturb  # noqa: E402
from helix_async.settings import SearchSettings  # noqa: E402

MODEL = "llama2-70b"


def _position(cluster: str, frac: float, kmin: int, seconds: float) -> Placement | None:
    spec = load_cluster(cluster)
    model = get_model(MODEL)
    tm = ThroughputModel.for_cluster(model, spec)
    caps = Capacities.build(spec, model, tm)
    kv = {(n.id, k): tm.kv_capacity(spec.machine(n.id).gpu, k) / k
          for n in spec.nodes for k in range(1, caps.node_max_layers[n.id] + 1)}
    top = sum(tm.kv_capacity(spec.machine(n.id).gpu, 1) for n in spec.nodes) / model.num_layers
    classes = {str(j): ids for j, ids in enumerate(interchangeable_classes(spec))}
    res = PositionModel(caps, classes, time_limit=seconds, seed=0, kv_tokens=kv, kv_floor=frac * top,
                        min_layers=kmin).solve()
    if res.layers is None or res.objective <= 0:
        return None
    return Placement.from_layers(spec, MODEL, res.layers, method="position")


def plans(quick: bool) -> list[tuple[str, str, Placement]]:
    out: list[tuple[str, str, Placement]] = []
    if quick:
        for name in ("ilp", "petals", "swarm", "homogeneous"):
            out.append(("single24", f"shipped {name}", load_shipped_layout(name)))
    else:
        for name in ("ilp", "ilp_artifact", "petals", "swarm", "homogeneous"):
            out.append(("single24", f"shipped {name}", load_shipped_layout(name)))
    for cluster in ("single24",) if quick else ("single24", "3cluster24", "cluster42"):
        spec = load_cluster(cluster)
        bases: list[tuple[str, Placement]] = []
        for h in HEURISTICS if not quick else ("homogeneous",):
            try:
                p = run_heuristic(h, spec, MODEL, seed=0)
            except PlanningError:
                continue
            if not p.exceed_profiled_max:
                out.append((cluster, f"ours {h}", p))
                bases.append((h, p))
        if quick:
            continue
        mf = plan(spec, MODEL, SearchSettings(method="milp", time_limit=20, stall_limit=20, seed=0)).placement
        out.append((cluster, "max-flow MILP", mf))
        bases.append(("max-flow MILP", mf))
        for frac, kmin in ((0.5, 4), (0.4, 1)):
            p = _position(cluster, frac, kmin, 15)
            if p is not None:
                out.append((cluster, f"position MILP {frac:.0%} >={kmin}", p))
                bases.append((f"position {frac:.0%}", p))
        # seeded perturbations: 1-3 random moves from each base, kept when valid
        search = ServedSearch(spec, MODEL, ServedModel(), seed=0)
        rng = random.Random(0)
        L = get_model(MODEL).num_layers
        for label, base in bases:
            made = 0
            for _ in range(200):
                if made >= 2:
                    break
                layers: dict | None = dict(base.layers)
                for _ in range(rng.randint(1, 3)):
                    layers = perturb(layers, search.max_k, L, rng) if layers is not None else None
                cand = search.evaluate(layers, label) if layers is not None else None
                if cand is not None and cand.placement.layers != base.layers:
                    made += 1
                    out.append((cluster, f"perturbed {label} #{made}", cand.placement))
    return out


def _simulate(args: tuple[dict, float]) -> tuple[float, float, float]:
    doc, window = args
    from sim.runner import Workload, run
    from sim.simulation import SimulationSetup

    p = placement_from_dict(doc)
    t = time.perf_counter()
    r = run(SimulationSetup(p, scheduler="maxflow", kv=(0.85, 1.0)),
            Workload(mode="offline", initial=20, warmup=60.0, duration=window, seed=0)).report
    return float(r["decode_throughput"]), float(r["decode_latency"]["mean"] or 0.0), time.perf_counter() - t


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=300.0, help="simulated seconds after the warm-up")
    ap.add_argument("--jobs", type=int, default=2, help="simulations in parallel")
    ap.add_argument("--quick", action="store_true", help="5 plans, 60-s windows")
    args = ap.parse_args()
    window = 60.0 if args.quick else args.window
    t0 = time.perf_counter()
    ps = plans(args.quick)
    print(f"{len(ps)} plans in {time.perf_counter() - t0:.0f} s; simulating ({window:g}-s windows)", file=sys.stderr)
    model = ServedModel()
    preds = [model.predict(p) for _, _, p in ps]
    with ProcessPoolExecutor(args.jobs) as ex:
        sims = list(ex.map(_simulate, [(placement_to_dict(p), window) for _, _, p in ps]))
    head = f"{'cluster':<11}{'plan':<34}{'max flow':>9}{'pred tok/s':>11}{'sim tok/s':>10}{'err':>7}{'pred TPOT':>10}{'sim TPOT':>9}"
    print(head)
    by: dict[str, list[tuple[float, float]]] = {}
    for (cl, label, _), pr, (d, tpot, _) in zip(ps, preds, sims, strict=True):
        err = (pr.decode_throughput - d) / d if d > 0 else float("nan")
        print(f"{cl:<11}{label[:33]:<34}{pr.max_flow:9.1f}{pr.decode_throughput:11.1f}{d:10.1f}{err:+7.0%}"
              f"{pr.tpot:10.3f}{tpot:9.3f}")
        by.setdefault(cl, []).append((pr.decode_throughput, d))
        by.setdefault("all", []).append((pr.decode_throughput, d))
    print()
    for cl, pairs in by.items():
        a = [x for x, _ in pairs]
        b = [y for _, y in pairs]
        errs = [abs(x - y) / y for x, y in pairs if y > 0]
        mf = [p.max_flow for (c, _, _), p in zip(ps, preds, strict=True) if cl in ("all", c)]
        print(f"{cl:<11} plans {len(pairs):3d}  Spearman(predicted, simulated) {spearman(a, b):+.3f}  "
              f"median |error| {statistics.median(errs):.1%}  (Spearman(max flow, simulated) {spearman(mf, b):+.3f})")
    print(f"[{time.perf_counter() - t0:.0f} s wall]", file=sys.stderr)


if __name__ == "__main__":
    main()
