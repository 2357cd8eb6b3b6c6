"""``plan --objective served``: plans chosen for what they serve, checked in the simulator.

1. **Max flow** (Helix's objective, ``search.plan``) for a share of the time: the heuristics and
   the MILP search; each of their plans is a candidate.
2. **The position MILP with served constraints** (``PositionModel``): maximise max flow subject to a
   floor on the KV tokens every layer can hold (what bounds the requests in flight) and a minimum
   of layers per node (what bounds a route's depth), both linear. A sweep over floors and minimums
   traces the flow-versus-KV frontier; each solution is a candidate.
3. **Local search** (``ServedSearch``) on the served model's prediction (``served.py``): decode
   throughput, or goodput under ``--slo``.
4. **Simulation in the loop**: the best ``simulate_top`` distinct candidates run in the simulator
   the planner is handed (``simulate``, a :class:`~.simulator.Simulate`: MaxFlow, the README's
   600-s window by default, a fixed seed, the offline or online workload); the plan that serves
   best is returned, with predicted and simulated figures side by side. Without a simulator the
   best predicted plan is returned, and the result says so.
5. **Refinement** (``refine_rows``): neighbours of the pick the model cannot rank (stage swaps,
   idle nodes moved to the fullest KV), each the best of REFINE_SCREEN screened on a short window.
6. **A second seed** (``second_seed_check``) when the pick serves within NEAR_TIE of a heuristic's
   own plan.

What is maximised is an :class:`~.objectives.Objective` (decode throughput by default, goodput
under an SLO): it scores predictions and simulated reports alike.

Whatever the budget and the load, a plan comes back: when the search leaves nothing to simulate
but the max-flow and heuristic plans, the best predicted of those is taken, and
``ServedPlanResult.notes`` says so. The upper bound printed with a served plan is the max-flow
bound (labelled so): no bound on the served objective itself is proven. Planning uses wall time
on purpose (it is not simulated); ``SearchSettings``' node, round, sweep and step limits bound its
work.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..cluster import ClusterSpec
from ..errors import PlanningError
from ..ids import LayerRange
from ..model import ModelSpec, ThroughputModel, get_model
from ..settings import SearchSettings, ServedWorkload, SimulationSettings
from ..signals import StopFlag
from .core import Placement
from .flow import max_flow
from .milp import Capacities, PositionModel
from .objectives import THROUGHPUT, Objective
from .search import PlanResult, plan
from .served import ServedModel
from .served_search import Candidate, Layers, ServedSearch, origin_of, stages, swap_stages
from .simulator import SIMULATORS_GROUP, Simulate

__all__ = ["Row", "ServedPlanResult", "Simulations", "figures", "plan_served", "refine_rows", "refinements",
           "screen_candidates", "second_seed_check"]

logger = logging.getLogger("helix_async.planner")

#: Position-MILP sweep: minimum layers per node, and KV floors as fractions of the largest floor
#: any plan could reach (every node at one layer, its tokens spread over all layers).
#: (minimum layers per node, KV floor fraction, solver seed offset), tried in this order while the
#: sweep's share of the time lasts. Many plans reach the same max flow under one floor and they
#: serve differently, so the first setting (the one that served best on single24) is solved with
#: three solver seeds; each solution is a start of its own, simulated beside its best descendant.
SWEEP = ((4, 0.5, 0), (4, 0.52, 0), (4, 0.5, 1), (4, 0.4, 0), (4, 0.5, 2), (1, 0.4, 0), (1, 0.5, 0), (4, 0.3, 0))
MIN_SOLVE_S = 12.0
#: Simulated candidates within this fraction of the best are taken as equal; the one with the
#: lowest mean TPOT of them is chosen.
NEAR_TIE = 0.03
#: Screening: with a simulation window longer than this, up to SCREEN_MAX distinct candidates run
#: a window of this many seconds first and only the best go on to the full window. 240 s, not
#: less: deep chains fill their KV slowly, and on cluster42 a 120-s window ranked a chain that
#: serves 700 tokens/s over 600 s below one that serves 621 (at 240 s: 617.5 and 577.1; rank
#: correlation with the 600-s figures over 8 cluster42 plans 0.90, against 0.74 at 120 s).
SCREEN_WINDOW = 240.0
SCREEN_MAX = 14
#: Screened refinement: with a window longer than SCREEN_WINDOW, each refinement screens up to
#: REFINE_SCREEN neighbours of its base on the short window and runs only the best on the full one.
REFINE_SCREEN = 4


@dataclass
class Row:
    """One candidate as printed: its source, predicted figures and (when simulated) simulated ones."""

    source: str
    placement: Placement
    max_flow: float
    predicted: float  # the objective's score of the prediction (decode tokens/s, or goodput)
    predicted_tpot: float
    predicted_ttft: float
    simulated: dict[str, Any] | None = None
    #: the score on a second seed, when a close call against a baseline was checked on one
    second_seed: float | None = None

    @property
    def simulated_score(self) -> float:
        if self.simulated is None:
            return -math.inf
        return float(self.simulated["score"])


@dataclass
class ServedPlanResult:
    """What :func:`plan_served` returns: the plan (``placement``, from ``row``), every candidate
    (``rows``), the max-flow search's result, what it was judged on, and ``notes``: why the
    planner fell back from its usual course (no simulator; nothing to simulate), one line each."""

    placement: Placement
    row: Row
    rows: list[Row]
    maxflow: PlanResult
    workload: ServedWorkload
    objective: Objective
    seconds: float
    sim_window: float
    notes: list[str] = field(default_factory=list)


def figures(report: Mapping[str, Any], objective: Objective) -> dict[str, Any]:
    """The figures the planner compares, from a simulation's report: decode tokens/s, mean and
    median TPOT and TTFT (seconds, None without data), ``score`` (the objective's), and per node
    its busy fraction and the peak share of its KV in use (what refinement moves by)."""
    return {
        "decode_throughput": float(report["decode_throughput"]),
        "tpot_mean": report["decode_latency"]["mean"],
        "ttft_mean": report["prompt_latency"]["mean"],
        "tpot_p50": report["decode_latency"]["p50"],
        "ttft_p50": report["prompt_latency"]["p50"],
        "score": objective.score_report(report),
        "nodes": {
            int(n["node"]): (float(n["utilisation"]), float(n["kv_peak"]) / n["kv_capacity"] if n["kv_capacity"] else 0.0)
            for n in report["nodes"]
        },
    }


def _quiet(_line: str) -> None:
    pass


@dataclass
class Simulations:
    """The served planner's simulations: the simulator it was handed, how it runs a candidate
    (``settings``), the objective that scores the reports, the stop flag polled between runs and
    the progress log (one line per simulation)."""

    simulate: Simulate
    settings: SimulationSettings = field(default_factory=SimulationSettings)
    objective: Objective = THROUGHPUT
    stop: StopFlag = field(default_factory=StopFlag)
    log: Callable[[str], None] = _quiet

    def run(self, placement: Placement, *, window: float | None = None, seed: int | None = None) -> dict[str, Any]:
        """:func:`figures` of ``placement`` simulated as ``settings`` say, on another window
        (seconds) or seed when given."""
        s = self.settings
        s = replace(s, window=s.window if window is None else window, seed=s.seed if seed is None else seed)
        return figures(self.simulate(placement, s, slo=self.objective.slo), self.objective)


def _tpot(r: Row) -> float:
    t = None if r.simulated is None else r.simulated.get("tpot_mean")
    return math.inf if t is None else float(t)


def _distance(a: Placement, b: Placement) -> int:
    return sum(1 for i in a.layers if a.layers[i] != b.layers.get(i))


def _shape(p: Placement) -> tuple[Any, ...]:
    """A plan as it serves, up to swapping nodes of one machine type in one region (alike to the
    planner, as to the position MILP): the ranges of the nodes its max flow uses, each with the
    machine type and region holding it. A node moved where no flow reaches it changes nothing."""
    flows = max_flow(p).node_flows
    held = sorted(
        (r, p.cluster.nodes[i].machine_type, p.cluster.nodes[i].region)
        for i, r in p.layers.items()
        if r is not None and flows.get(i, 0.0) > 1e-9
    )
    return (p.partial, *held)


def _select(rows: list[Row]) -> Row:
    """The simulated row that serves best; among those within NEAR_TIE of the best figure (the
    simulation's own spread between similar plans), the one with the lowest mean TPOT, but never
    one that serves less than a heuristic's own plan (a baseline) did. With no row simulated,
    the first."""
    if not rows:
        raise PlanningError("no candidate plan to choose from")
    top_score = max(r.simulated_score for r in rows)
    floor = max((r.simulated_score for r in rows if r.source.startswith("heuristic ")), default=-math.inf)
    near = [r for r in rows if r.simulated is not None and r.simulated_score >= max((1 - NEAR_TIE) * top_score, floor)]
    return min(near, key=lambda r: (_tpot(r), -r.simulated_score)) if near else rows[0]


def refinements(row: Row, max_k: Mapping[int, int], num_layers: int, rng: random.Random) -> Iterator[tuple[str, Layers]]:
    """Neighbours of a simulated plan that the served model cannot rank, in the order tried:

    * ``swap``: when the plan is a chain of stages, two stages exchange places (seeded choice).
      The model prices a route by its stages whatever their order; the simulation sees the
      order, through the prompts that decode trains queue behind and then follow down the chain;
    * ``rebalance``: the node that was least busy in the simulation (one the plan leaves idle
      first; in a chain, only idle ones) takes the range of the node whose KV filled most (the
      admission check that bounds the population refuses queries there first), or as much of it
      as it can hold.

    The two kinds alternate while both last."""
    nodes = (row.simulated or {}).get("nodes", {})
    layers = row.placement.layers
    st = stages(layers, num_layers)

    def swaps() -> Iterator[tuple[str, Layers]]:
        if st is None or len(st) < 3:
            return
        pairs = [(a, b) for a in range(len(st)) for b in range(a + 1, len(st))]
        rng.shuffle(pairs)
        for a, b in pairs:
            new = swap_stages(layers, num_layers, a, b)
            if new is not None:
                yield f"swap stages {st[a][0]}-{st[a][1]} and {st[b][0]}-{st[b][1]}", new

    def rebalances() -> Iterator[tuple[str, Layers]]:
        def busy(i: int) -> float:
            return nodes[i][0] if layers.get(i) is not None and i in nodes else 0.0

        donors = sorted((i for i in layers if max_k.get(i, 0) > 0), key=lambda i: (busy(i), i))
        if st is not None:
            # a chain: a node taken from its stage weakens that stage (on single24 every such move
            # served 13-15 % less); only nodes the chain leaves idle move
            donors = [i for i in donors if busy(i) == 0.0]
        hot = sorted((i for i, r in layers.items() if r is not None and i in nodes), key=lambda i: (-nodes[i][1], -nodes[i][0], i))
        tried: set[tuple[int, LayerRange]] = set()
        for d in donors[:4]:
            for h in hot[:4]:
                r = layers[h]
                if d == h or r is None:
                    continue
                k = min(max_k[d], r[1] - r[0])
                for span in ((r[0], r[0] + k), (r[1] - k, r[1])):
                    if layers.get(d) != span and (d, span) not in tried:
                        tried.add((d, span))
                        yield f"node {d} takes layers {span[0]}-{span[1]} (node {h}: KV {nodes[h][1]:.0%})", {**layers, d: span}

    a, b = swaps(), rebalances()
    while True:
        got = False
        for it in (a, b):
            nxt = next(it, None)
            if nxt is not None:
                got = True
                yield nxt
        if not got:
            return


def plan_served(
    cluster: ClusterSpec,
    model: ModelSpec | str,
    *,
    search: SearchSettings | None = None,
    simulation: SimulationSettings | None = None,
    objective: Objective = THROUGHPUT,
    simulate: Simulate | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] | None = None,
) -> ServedPlanResult:
    """Plan for the served objective (see the module doc).

    search: time and work limits, seed, partial links, ``simulate_top`` (0: the best predicted
    plan is returned unsimulated) and ``refine``; simulation: the workload and how candidates are
    simulated (``semantics`` helix: the original simulator's; the scenarios the planner is judged
    on are the original's); objective: what is maximised; simulate: the simulator (None: the plan
    is chosen by the prediction alone, and ``notes`` says so); stop: polled between phases and
    by the solvers; log: progress lines."""
    t0 = time.monotonic()
    search = search if search is not None else SearchSettings()
    simulation = simulation if simulation is not None else SimulationSettings()
    spec = get_model(model)
    wl = simulation.workload
    stop = stop if stop is not None else StopFlag()
    say = log or _quiet
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        logger.info("served planner: %s", line)

    time_limit, seed, partial, solves = search.time_limit, search.seed, search.partial, search.sweep_limit
    sims = None
    if simulate is not None and search.simulate_top > 0:
        sims = Simulations(simulate, simulation, objective, stop, say)
    elif search.simulate_top > 0:
        note(f"no simulator is installed (entry-point group {SIMULATORS_GROUP}): the plan is chosen by the "
             "served model's prediction alone")
    simulate_top = search.simulate_top if sims is not None else 0
    tm = ThroughputModel.for_cluster(spec, cluster)
    served = ServedModel(wl)
    ss = ServedSearch(cluster, spec, served, objective=objective, partial=partial, seed=seed, tm=tm, stop=stop, pool=24)

    # 1. max flow: heuristics and the MILP search (a quarter of the time)
    mf_search = SearchSettings(method="milp", time_limit=max(2.0, 0.25 * time_limit), stall_limit=max(2.0, 0.15 * time_limit),
                               seed=seed, partial=partial, position_fraction=search.position_fraction,
                               node_limit=search.node_limit, round_limit=search.round_limit)
    mf = plan(cluster, spec, mf_search, stop=stop)
    ss.seed_with([(mf.placement, "max-flow MILP")])
    from .heuristics import HEURISTICS, run_heuristic

    for name in HEURISTICS:
        try:
            p = run_heuristic(name, cluster, spec, seed=seed, tm=tm)  # each with its own links (Petals: partial)
        except PlanningError:
            continue
        if not p.exceed_profiled_max:
            ss.seed_with([(p, f"heuristic {name}")])
    say(f"max flow {mf.value:.1f} tokens/s; {ss.evaluations} plans scored")

    # 2. the position MILP with a KV floor and a minimum of layers per node (a third of the time)
    caps = Capacities.build(cluster, spec, tm)
    kv_tokens = {
        (n.id, k): tm.kv_capacity(cluster.machine(n.id).gpu, k) / k
        for n in cluster.nodes
        for k in range(1, caps.node_max_layers[n.id] + 1)
    }
    top = sum(tm.kv_capacity(cluster.machine(n.id).gpu, 1) for n in cluster.nodes if caps.node_max_layers[n.id] > 0) / spec.num_layers
    budget_end = time.monotonic() + 0.35 * time_limit
    per = max(MIN_SOLVE_S, 0.35 * time_limit / len(SWEEP))
    # nodes of one machine type in one region are alike to the position model (it does not see
    # links; the flow evaluation and the simulation do)
    classes: dict[str, list[int]] = {}
    for n in cluster.nodes:
        if caps.node_max_layers[n.id] > 0:
            classes.setdefault(f"{n.machine_type}@{n.region}", []).append(n.id)
    for j, (kmin, frac, dseed) in enumerate(SWEEP):
        if stop or (j > 0 and time.monotonic() >= budget_end) or (solves is not None and j >= solves):
            break
        res = PositionModel(caps, classes, time_limit=per, seed=seed + dseed, stop=stop, kv_tokens=kv_tokens,
                            kv_floor=frac * top, min_layers=kmin, node_limit=search.node_limit).solve()
        if res.layers is not None and res.objective > 0:
            tag = "" if dseed == 0 else f", solver seed +{dseed}"
            ss.offer(ss.evaluate(res.layers, f"position MILP (KV floor {frac:.0%}, >= {kmin} layers{tag})"))
    if not ss.pool:
        # the max-flow search's plan is verified (at worst the best heuristic's), whatever the
        # served model made of it
        pred = served.predict(mf.placement, tm=tm)
        ss.offer(Candidate(mf.placement, pred, objective.score_prediction(pred), "max-flow MILP"))
        note(f"the served model scored no plan of the search's; the max-flow search's plan ({mf.found_by}) is taken")
    best = ss.pool[0]
    say(f"position MILP sweep: best predicted {best.score:.1f} ({best.source})")

    # 3. local search on the prediction, leaving time for the simulations
    left = time_limit - (time.monotonic() - t0) - 0.25 * time_limit
    if left > 0 and not stop and search.step_limit != 0:
        ss.run(left, max_steps=search.step_limit)
    pool = ss.pool
    say(f"local search: {ss.evaluations} plans scored; best predicted {pool[0].score:.1f}")

    # 4. simulate the best distinct candidates; the maximum-flow plan is always one of them
    # the best of each origin first, each followed by the start it came from (the prediction
    # ranks families of plans less well than plans within one: it underrates how prompts convoy
    # decode batches down long chains, and a local search can climb its errors), then the best of
    # the rest, all at least 3 nodes apart
    chosen: list[Candidate] = []
    want = simulate_top - 1 if simulate_top >= 2 else 1
    order: list[Candidate] = []
    for c in sorted(ss.best_by_origin.values(), key=lambda c: -c.score):
        order.append(c)
        start = ss.starts.get(origin_of(c.source))
        if start is not None:
            order.append(start)
    # with a long window, up to SCREEN_MAX such candidates (every start and every origin's best)
    # are first screened on a SCREEN_WINDOW-s window, and the best `want` of those go on: a short
    # window is noisy (about +-8 %), the model's ranking off single24 much more so
    screen = simulate_top >= 2 and simulation.window > SCREEN_WINDOW
    order += [c for c in ss.starts.values() if all(c is not o for o in order)]
    heuristic_starts = [c for o, c in ss.starts.items() if o.startswith("heuristic ")]
    for c in [*order, *pool]:
        if len(chosen) >= (SCREEN_MAX if screen else want):
            break
        if c.placement.layers == mf.placement.layers or any(c is h for h in heuristic_starts):
            continue  # simulated anyway, below
        if all(_distance(c.placement, d.placement) >= 3 for d in chosen):
            chosen.append(c)
    if sims is not None and screen and len(chosen) > want:
        chosen = screen_candidates(chosen, want, sims)
    mf_cand = next((c for c in pool if c.source == "max-flow MILP"), None) or ss.evaluate(mf.placement.layers, "max-flow MILP")
    if simulate_top >= 2 and mf_cand is not None and all(c.placement.layers != mf_cand.placement.layers for c in chosen):
        chosen.append(mf_cand)
    if simulate_top >= 2:
        # every heuristic's own plan too: the model misprices some of them (Petals' partial links
        # on cluster42), and the plan returned should never serve worse than a baseline
        for origin, start in ss.starts.items():
            if origin.startswith("heuristic ") and all(start.placement is not c.placement for c in chosen):
                chosen.append(start)
    if not chosen:
        # the budget ran out before the search found a plan beyond its starts (seen under load):
        # the best predicted plan there is, a start's at worst
        chosen = [pool[0]]
        note(f"the search found no candidate beyond the max-flow and heuristic plans within its budget; "
             f"the best predicted of those ({pool[0].source}) is taken")
    rows = [
        Row(c.source, c.placement, c.prediction.max_flow, c.score, c.prediction.tpot, c.prediction.ttft)
        for c in chosen
    ]
    if sims is not None:
        for r in rows:
            if stop:
                break
            r.simulated = sims.run(r.placement)
            say(f"simulated {r.source}: {r.simulated['score']:.1f} (predicted {r.predicted:.1f})")
        # 5. refinement: neighbours of the chosen plan the model cannot rank, each simulated
        row = refine_rows(rows, ss, sims, refine=search.refine)
        row = second_seed_check(rows, row, sims)
    else:
        row = max(rows, key=lambda r: r.predicted)
    placement = row.placement.with_meta(
        objective=objective.plan_tag,
        predicted_decode_throughput=row.predicted,
        max_flow=row.max_flow,
        found_by=row.source,
        seed=seed,
        **({"simulated_decode_throughput": row.simulated["decode_throughput"]} if row.simulated else {}),
    )
    return ServedPlanResult(placement, row, rows, mf, wl, objective, time.monotonic() - t0, simulation.window, notes)


def screen_candidates(cands: list[Candidate], want: int, sims: Simulations) -> list[Candidate]:
    """The ``want`` candidates that serve best on a SCREEN_WINDOW-s simulated window, in their
    given order (ties: the earlier)."""
    short: list[tuple[float, int]] = []
    for k, c in enumerate(cands):
        if sims.stop:
            break
        got = sims.run(c.placement, window=SCREEN_WINDOW)
        short.append((float(got["score"]), k))
        sims.log(f"screened {c.source}: {got['score']:.1f} ({SCREEN_WINDOW:g}-s window; predicted {c.score:.1f})")
    keep = sorted(k for _, k in sorted(short, key=lambda x: (-x[0], x[1]))[:want])
    return [cands[k] for k in keep] if keep else cands[:want]


def refine_rows(rows: list[Row], search: ServedSearch, sims: Simulations, *, refine: int) -> Row:
    """Simulate up to ``refine`` neighbours (:func:`refinements`) of the simulated ``rows``,
    appending each to ``rows``; returns the row :func:`_select` picks in the end.

    Neighbours come from two bases, in turn: the current pick, and the best simulated plan that is
    a chain of stages when the pick is not one (stage order moves the simulated figure by several
    percent, 641-720 tok/s between orderings of one cluster42 plan, and only chains have stages to
    swap). A base is replaced when a neighbour becomes the pick or the best chain. Plans alike up
    to nodes of one type and region (:func:`_shape`) are simulated once.

    With a simulation window over SCREEN_WINDOW, each refinement is the best of up to REFINE_SCREEN
    neighbours of its base screened on that short window (by :func:`_select`'s rule: within
    NEAR_TIE of the best, the lowest TPOT); only it runs the full window."""
    say, stop = sims.log, sims.stop
    rng = random.Random(sims.settings.seed)
    L = search.model.num_layers
    seen = {_shape(r.placement) for r in rows}

    def best_chain() -> Row | None:
        chains = [r for r in rows if r.simulated is not None and stages(r.placement.layers, L) is not None]
        return max(chains, key=lambda r: r.simulated_score, default=None)

    bases: list[Row | None] = [None, None]
    moves: list[Iterator[tuple[str, Layers]] | None] = [None, None]

    def rebase() -> None:
        pick, chain = _select(rows), best_chain()
        want = [pick, chain if chain is not None and stages(pick.placement.layers, L) is None else None]
        for k, w in enumerate(want):
            if w is not bases[k]:
                bases[k] = w
                moves[k] = None if w is None else refinements(w, search.max_k, L, rng)

    screen = sims.settings.window > SCREEN_WINDOW
    batch = REFINE_SCREEN if screen else 1

    def neighbours(it: Iterator[tuple[str, Layers]], base: Row) -> list[Row]:
        got: list[Row] = []
        for desc, layers in it:
            cand = search.evaluate(layers, desc, partial=base.placement.partial)
            shape = None if cand is None else _shape(cand.placement)
            if cand is None or shape is None or shape in seen:
                continue
            seen.add(shape)
            got.append(Row(desc, cand.placement, cand.prediction.max_flow, cand.score, cand.prediction.tpot,
                           cand.prediction.ttft))
            if len(got) >= batch:
                break
        return got

    rebase()
    done = turn = 0
    while done < refine and not stop and any(m is not None for m in moves):
        k = turn % 2
        turn += 1
        it, base = moves[k], bases[k]
        if it is None or base is None:
            continue
        near = neighbours(it, base)
        if not near:
            moves[k] = None
            continue
        if len(near) > 1:
            for n in near:
                if stop:
                    break
                n.simulated = sims.run(n.placement, window=SCREEN_WINDOW)
                say(f"screened {n.source} (of {base.source}): {n.simulated['score']:.1f}, TPOT {_tpot(n):.3f} s "
                    f"({SCREEN_WINDOW:g}-s window)")
            if stop:
                break
        r = _select(near) if len(near) > 1 else near[0]
        done += 1
        r.source = f"refinement {done}: {r.source}"
        r.simulated = sims.run(r.placement)
        rows.append(r)
        say(f"simulated {r.source} (of {base.source}): {r.simulated['score']:.1f}, TPOT {_tpot(r):.3f} s")
        rebase()
    return _select(rows)


def second_seed_check(rows: list[Row], pick: Row, sims: Simulations) -> Row:
    """A close call against a baseline, checked on a second seed: when ``pick`` is not a
    heuristic's own plan and serves less than NEAR_TIE above the best of those, both are simulated
    again on the simulation's seed + 1 and the one with the higher mean of the two seeds is returned (a
    refinement of Petals' plan on cluster42 served 0.7 % more than Petals on one seed and 1-2 %
    less on two others)."""
    say, stop, seed = sims.log, sims.stop, sims.settings.seed
    bases = [r for r in rows if r.source.startswith("heuristic ") and r.simulated is not None]
    if stop or pick.simulated is None or not bases or any(pick is b for b in bases):
        return pick
    base = max(bases, key=lambda r: r.simulated_score)
    if pick.simulated_score >= (1 + NEAR_TIE) * base.simulated_score:
        return pick
    for r in (pick, base):
        if stop:
            return pick
        r.second_seed = float(sims.run(r.placement, seed=seed + 1)["score"])
        say(f"seed {seed + 1}: {r.source}: {r.second_seed:.1f} (seed {seed}: {r.simulated_score:.1f})")

    def mean(r: Row) -> float:
        return (r.simulated_score + (r.second_seed or 0.0)) / 2

    return pick if mean(pick) > mean(base) else base


def with_extra_node(cluster: ClusterSpec, template: int) -> ClusterSpec:
    """``cluster`` plus one node like ``template``: same machine type and region, a copy of each
    of its links, and a link to ``template`` itself like its fastest one."""
    import dataclasses

    from ..cluster.spec import Link, Node

    new_id = cluster.num_nodes
    t = cluster.nodes[template]
    links = list(cluster.links)
    fastest: Link | None = None
    for ln in cluster.links:
        if template in (ln.a, ln.b):
            a = new_id if ln.a == template else ln.a
            b = new_id if ln.b == template else ln.b
            links.append(Link(a, b, ln.bandwidth, ln.latency, ln.bidirectional))
            if ln.bidirectional and (fastest is None or ln.bandwidth > fastest.bandwidth):
                fastest = ln
    if fastest is not None:
        links.append(Link(template, new_id, fastest.bandwidth, fastest.latency, True))
    return dataclasses.replace(
        cluster, nodes=(*cluster.nodes, Node(new_id, t.machine_type, t.region)), links=tuple(links),
        name=f"{cluster.name}+{t.machine_type}",
    )


def explain(placement: Placement, workload: ServedWorkload | None = None, *, objective: Objective = THROUGHPUT,
            seconds_per_gpu: float = 5.0, seed: int = 0, max_steps: int | None = None) -> list[str]:
    """What limits ``placement`` (flow, KV on which nodes, latency on which stages) and which one
    more GPU would help most by ``objective``, by the served model: a short local search per GPU
    type, ``seconds_per_gpu`` of wall time, or ``max_steps`` steps when given (a bound on work)."""
    wl = workload or ServedWorkload()
    served = ServedModel(wl)
    pred = served.predict(placement)
    lines = [
        f"predicted: {pred.decode_throughput:.1f} decode tokens/s, TPOT {pred.tpot:.3f} s, TTFT {pred.ttft:.3f} s, "
        f"{pred.population:.0f} requests in flight ({wl.mode} workload)",
        f"max flow {pred.max_flow:.1f} tokens/s; compute saturates at {pred.compute_cap:.1f} decode tokens/s",
        f"limited by {pred.limit}: {pred.limit_detail}",
    ]
    lines += objective.explain_lines(pred)
    slow = sorted(pred.nodes, key=lambda x: -x.share * x.decode_stage_s)[:3]
    lines.append("slowest stages (share x time per token): " + ", ".join(
        f"node {x.node} {x.gpu} layers {x.layers[0]}-{x.layers[1]} {x.decode_stage_s:.3f} s (busy {x.util:.0%})" for x in slow))
    full = sorted(pred.nodes, key=lambda x: -x.kv_usage)[:3]
    lines.append("fullest KV: " + ", ".join(f"node {x.node} {x.gpu} {x.kv_usage:.0%}" for x in full))
    what = objective.noun
    gains = []
    cluster = placement.cluster
    seen: set[str] = set()
    for n in cluster.nodes:
        if n.machine_type in seen:
            continue
        seen.add(n.machine_type)
        bigger = with_extra_node(cluster, n.id)
        layers = {**placement.layers, bigger.num_nodes - 1: None}
        start = Placement.from_layers(bigger, placement.model, layers, partial=placement.partial, method="served",
                                      exceed_profiled_max=placement.exceed_profiled_max)
        s = ServedSearch(bigger, placement.model, served, objective=objective, seed=seed, partial=placement.partial)
        s.seed_with([(start, "plan")])
        if not s.pool:
            continue
        base = s.pool[0].score  # the plan as re-linked on the bigger cluster, before the search
        s.run(seconds_per_gpu if max_steps is None else math.inf, max_steps=max_steps)
        gains.append((s.pool[0].score - base, n.machine_type))
    gains.sort(reverse=True)
    if gains:
        lines.append(f"one more GPU (predicted {what} gained): " + ", ".join(f"{t} {g:+.1f}" for g, t in gains))
        if gains[0][0] > 0:
            lines.append(f"next GPU that would help most: {gains[0][1]}")
        else:
            lines.append("no one more GPU is predicted to help")
    return lines
