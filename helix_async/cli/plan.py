"""``plan``: a layer placement for what it serves (the default) or for max flow, written to a file.

The flags build the planners' settings (:class:`~helix_async.settings.SearchSettings`,
:class:`~helix_async.settings.SimulationSettings`) and the served objective (one flag per option
of each objective in :data:`~helix_async.placement.objectives.OBJECTIVES`); a flag left out
takes the settings' default, and a flag the chosen method or objective ignores is named in a note.
The served planner's simulator is the installed one (:mod:`helix_async.placement.simulator`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import envs
from ..errors import ConfigError
from ..settings import SEMANTICS, SearchSettings, SimulationSettings
from .args import (
    EXIT_OK,
    MAX_SECONDS,
    model_ref,
    nonnegative,
    nonnegative_int,
    number_in,
    option_type,
    plot_path,
    positive_int,
    seconds,
    seed,
)

#: The plan's candidate simulations: the window and the offered load they take (as ``python -m sim``:
#: one simulated day, 1e7 tokens/s).
MAX_SIM_WINDOW = 86_400.0
MAX_SIM_RATE = 1e7

if TYPE_CHECKING:
    from ..cluster import ClusterSpec
    from ..placement import Placement
    from ..placement.served import ServedWorkload

__all__ = ["PlanBar", "add_parser", "cmd_plan", "search_settings", "simulation_settings"]

_SEARCH = SearchSettings()
_SIMULATION = SimulationSettings()
#: The MILP search's flags (SearchSettings fields; None on the command line: not given).
SEARCH_FLAGS = ("time_limit", "stall_limit", "gap_limit", "prune", "node_limit", "round_limit", "sweep_limit",
                "step_limit")
#: Flags of the max-flow objective only.
MAXFLOW_FLAGS = ("stall_limit", "gap_limit", "prune")
#: The served objective's flags (None on the command line: not given, so that a flag the chosen
#: objective ignores can be named).
SERVED_FLAGS = ("simulate_top", "refine", "sim_workload", "sim_rate", "sim_window", "sim_semantics")


def add_parser(sub: Any) -> None:
    """The ``plan`` command, on ``sub`` (argparse sub-parsers)."""
    from ..placement.objectives import objective_options
    from ..placement.search import METHODS

    wl = _SIMULATION.workload
    pl = sub.add_parser("plan", help="plan a layer placement (MILP search or a heuristic)")
    pl.add_argument("--cluster", default="single24", help="builtin name or path (default %(default)s)")
    pl.add_argument("--model", default="llama2-70b", type=model_ref,
                    help="NAME, a checkpoint directory or a FILE.gguf (default %(default)s)")
    pl.add_argument("--method", default=_SEARCH.method, choices=METHODS, help="planner (default %(default)s)")
    pl.add_argument("--time-limit", type=seconds, default=None,
                    help=f"milp: seconds of search, at most {MAX_SECONDS:g} (default {_SEARCH.time_limit:g})")
    pl.add_argument("--stall-limit", type=seconds, default=None,
                    help=f"milp: stop after this many seconds without improvement, at most {MAX_SECONDS:g} "
                    f"(default {_SEARCH.stall_limit:g})")
    pl.add_argument("--gap-limit", type=nonnegative, default=None,
                    help=f"milp: stop at this relative gap to the bound, e.g. 0.01 (default {_SEARCH.gap_limit:g})")
    pl.add_argument("--node-limit", type=positive_int, default=None, metavar="N",
                    help="milp: at most N branch-and-bound nodes per MILP solve (a bound on work; default: none)")
    pl.add_argument("--round-limit", type=nonnegative_int, default=None, metavar="N",
                    help="milp: at most N LNS neighbourhoods in the max-flow search (a bound on work; default: none)")
    pl.add_argument("--sweep-limit", type=nonnegative_int, default=None, metavar="N",
                    help="served: at most N position-MILP solves in the sweep over KV floors (a bound on work; "
                    "default: none)")
    pl.add_argument("--step-limit", type=nonnegative_int, default=None, metavar="N",
                    help="served: at most N local-search steps, and N per GPU type for --explain (a bound on work; "
                    "with the node, round and sweep limits the plan does not depend on the machine's speed; "
                    "default: none)")
    pl.add_argument("--seed", type=seed, default=None,
                    help=f"seed of the search and of petals/swarm/homogeneous (default {_SEARCH.seed})")
    pl.add_argument("--partial", action="store_true",
                    help="milp: allow partial inference links (petals always uses them)")
    pl.add_argument("--prune", type=positive_int, default=None, metavar="K",
                    help="milp: neighbourhoods keep each node's K fastest links plus the incumbent's")
    pl.add_argument("--out", default=None, help="plan file to write (.toml or .json; default out/plan.toml)")
    pl.add_argument("--plot", type=plot_path, default=None, help="picture of the placement coloured by flow (.png, .pdf, .svg)")
    pl.add_argument("--quiet", action="store_true", help="no progress lines")
    pl.add_argument("--progress", action="store_true",
                    help="milp: a progress bar over the time limit with the incumbent and the gap, instead of lines")
    pl.add_argument("--objective", choices=("served", "maxflow"), default="served",
                    help="milp: served (default) = what the plan serves: the served model's decode throughput, "
                    "then the best candidates simulated; maxflow = Helix's objective")
    for opt in objective_options():
        pl.add_argument(opt.flag, type=option_type(opt.parse, opt.flag), default=None, metavar=opt.metavar, help=opt.help)
    pl.add_argument("--simulate-top", type=nonnegative_int, default=None, metavar="K",
                    help="served: simulate K plans (the best distinct candidates and, from K = 2, the max-flow "
                    "plan; the heuristics' plans are simulated as well) and keep the one that serves best (0: trust "
                    f"the prediction; default {_SEARCH.simulate_top}). The simulations run after the search's share "
                    "of --time-limit")
    pl.add_argument("--refine", type=nonnegative_int, default=None, metavar="K",
                    help="served: after the candidates, simulate up to K neighbours of the best one that the model "
                    "cannot rank (stages of a chain swapped; the least busy node moved to the range whose KV filled "
                    f"most), keeping what serves best (default {_SEARCH.refine}; 0: none)")
    pl.add_argument("--sim-workload", choices=("offline", "online"), default=None,
                    help=f"served: the workload candidates are predicted and simulated on (default {wl.mode})")
    pl.add_argument("--sim-rate", type=number_in(0.0, MAX_SIM_RATE, low_open=True, unit="tokens/s"), default=None,
                    help=f"served, online workload: tokens/s offered (default {wl.rate})")
    pl.add_argument("--sim-window", type=number_in(0.0, MAX_SIM_WINDOW, low_open=True, unit="simulated s"),
                    default=None,
                    help=f"served: seconds of each candidate's simulation window (default {_SIMULATION.window})")
    pl.add_argument("--sim-semantics", choices=SEMANTICS, default=None,
                    help="served: simulate candidates with the original simulator's semantics (helix, as `sim run "
                    f"--compat helix`) or with ours (default {_SIMULATION.semantics})")
    pl.add_argument("--explain", action="store_true",
                    help="say what limits the plan (flow, KV on which nodes, latency on which stages) and which GPU "
                    "would help most")
    pl.set_defaults(handler=cmd_plan)


def search_settings(args: argparse.Namespace) -> SearchSettings:
    """The search the flags ask for: SearchSettings' defaults for every flag not given."""
    given = {k: getattr(args, k) for k in (*SEARCH_FLAGS, "simulate_top", "refine") if getattr(args, k) is not None}
    seed = _SEARCH.seed if args.seed is None else args.seed
    return dataclasses.replace(_SEARCH, method=args.method, seed=seed, partial=args.partial, **given)


def simulation_settings(args: argparse.Namespace, seed: int) -> SimulationSettings:
    """How the served planner simulates, from the flags (defaults: SimulationSettings'); ``seed``:
    the search's, so that one ``--seed`` fixes both."""
    wl = _SIMULATION.workload
    workload = dataclasses.replace(
        wl,
        mode=wl.mode if args.sim_workload is None else args.sim_workload,
        rate=wl.rate if args.sim_rate is None else args.sim_rate,
    )
    return dataclasses.replace(
        _SIMULATION,
        workload=workload,
        window=_SIMULATION.window if args.sim_window is None else args.sim_window,
        seed=seed,
        semantics=_SIMULATION.semantics if args.sim_semantics is None else args.sim_semantics,
    )


def _flags(names: Any) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in sorted(names))


def cmd_plan(args: argparse.Namespace) -> int:
    from ..cluster import load_cluster
    from ..extras import require
    from ..fileio import check_output_path
    from ..placement.flow import max_flow
    from ..placement.heuristics import SEEDED_HEURISTICS
    from ..placement.io import write_placement
    from ..placement.objectives import objective_options
    from ..placement.search import plan
    from ..signals import SignalStop, StopFlag

    given = {k for k in SEARCH_FLAGS if getattr(args, k) is not None}
    if args.partial:
        given.add("partial")
    if args.method != "milp" and given:
        verb = "applies" if len(given) == 1 else "apply"
        print(f"note: {_flags(given)} only {verb} to --method milp; ignored for {args.method}", file=sys.stderr)
    if args.seed is not None and args.method != "milp" and args.method not in SEEDED_HEURISTICS:
        print(f"note: --seed does not change {args.method} (it draws nothing at random); ignored", file=sys.stderr)
    search = search_settings(args)
    simulation = simulation_settings(args, search.seed)
    if args.out is None:
        default_out = Path(envs.HELIX_OUT_DIR) / "plan.toml"
        default_out.parent.mkdir(parents=True, exist_ok=True)
    out = check_output_path(default_out if args.out is None else args.out, "plan file")
    if args.plot:
        check_output_path(args.plot, "plot", "--plot")
        require("matplotlib", "plots")  # fail before the search, not after it
    served = args.method == "milp" and args.objective == "served"
    options = {o.name: getattr(args, o.name) for o in objective_options()}
    named = [o.flag for o in objective_options() if options[o.name] is not None]
    if named and not served:
        raise ConfigError("<argument>", ", ".join(named), "applies to --objective served (with --method milp)")
    if args.method == "milp":
        require("pyscipopt", "plan")
    served_given = {k for k in SERVED_FLAGS if getattr(args, k) is not None}
    if not served:
        # --explain predicts on the named workload under either objective
        unused = served_given - ({"sim_workload", "sim_rate"} if args.explain else set())
        if unused:
            print(f"note: {_flags(unused)} only apply to the served objective; ignored", file=sys.stderr)
    spec = load_cluster(args.cluster)
    if served:
        ignored = [f"--{k.replace('_', '-')}" for k in MAXFLOW_FLAGS if k in given]
        ignored += ["--progress"] if args.progress else []
        if ignored:
            print(f"note: {', '.join(ignored)} only apply to --objective maxflow; ignored", file=sys.stderr)
        return _plan_served(args, spec, out, search, simulation, options)

    def on_improve(placement: Placement, value: float) -> None:
        write_placement(placement, out)

    t0 = time.monotonic()
    bar = PlanBar(search.time_limit, t0) if args.progress and args.method == "milp" else None

    def progress(ev: dict[str, Any]) -> None:
        if bar is not None:
            bar.event(ev)
            return
        if args.quiet:
            return
        print(
            f"[{ev['elapsed']:7.1f}s] incumbent {ev['incumbent']:10.3f}  bound {ev['bound']:10.3f}  "
            f"gap {100 * ev['gap']:6.2f}%  ({ev['event']}: {ev['source']})",
            file=sys.stderr,
            flush=True,
        )

    try:
        with SignalStop(StopFlag()) as stop:
            result = plan(spec, args.model, search, on_improve=on_improve, progress=progress, stop=stop)
    finally:
        if bar is not None:
            bar.close()
    flow = max_flow(result.placement)
    write_placement(result.placement, out, flow=flow)
    print(f"planned {result.placement.model} on {spec.name} with {args.method} in {time.monotonic() - t0:.1f} s "
          f"(stopped: {result.stopped}; best found by {result.found_by})")
    if result.heuristics:
        print("heuristics (max flow, tokens/s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.heuristics.items()))
    print(f"max compute throughput: {result.max_compute_throughput:.2f} tokens/s")
    print(f"max flow: {result.value:.4f} tokens/s")
    print(f"upper bound: {result.upper_bound:.4f} tokens/s ({result.bound_source}); gap {100 * result.gap:.2f}%")
    print(f"plan written to {out}")
    if args.explain:
        from ..model import profile_notes
        from ..placement.served_plan import explain

        for line in profile_notes(result.placement.model_spec, spec) + explain(
                result.placement, simulation.workload, seed=search.seed, max_steps=search.step_limit):
            print("explain: " + line)
    if args.plot:
        from ..plots import plot_placement

        plot_placement(result.placement, flow, args.plot)
        print(f"plot written to {args.plot}")
    return EXIT_OK


def _plan_served(args: argparse.Namespace, spec: ClusterSpec, out: Path, search: SearchSettings,
                 simulation: SimulationSettings, options: dict[str, Any]) -> int:
    from ..model import profile_notes
    from ..placement.flow import max_flow
    from ..placement.io import write_placement
    from ..placement.objectives import make_objective
    from ..placement.served_plan import explain, plan_served
    from ..placement.simulator import find_simulator
    from ..signals import SignalStop, StopFlag

    t0 = time.monotonic()
    objective = make_objective(options)
    wl = simulation.workload
    seed = search.seed

    def say(line: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - t0:7.1f}s] {line}", file=sys.stderr, flush=True)

    with SignalStop(StopFlag()) as stop:
        res = plan_served(spec, args.model, search=search, simulation=simulation, objective=objective,
                          simulate=find_simulator(), stop=stop, log=say)
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    flow = max_flow(res.placement)
    write_placement(res.placement, out, flow=flow)
    condition = f", {objective.condition}" if objective.condition else ""
    print(f"planned {res.placement.model} on {spec.name} for the served objective in {res.seconds:.1f} s "
          f"({wl.mode} workload{condition})")
    head = f"{'candidate':<52} {'max flow':>9} {'predicted':>10} {'pred TPOT':>9} {'simulated':>10} {'sim TPOT':>9}"
    print(f"candidates ({objective.label}; simulated: {res.sim_window:g}-s window, seed {seed}, "
          f"{simulation.semantics} semantics):")
    print(head)
    for r in res.rows:
        sim = r.simulated
        mark = "*" if r is res.row else " "
        print(f"{mark}{r.source[:51]:<51} {r.max_flow:9.1f} {r.predicted:10.1f} {r.predicted_tpot:9.3f} "
              + (f"{sim['score']:10.1f} " if sim else f"{'-':>10} ")
              + (f"{sim['tpot_mean']:9.3f}" if sim and sim["tpot_mean"] is not None else f"{'-':>9}"))
    for r in res.rows:
        if r.second_seed is not None:
            print(f"{'*' if r is res.row else ' '}{r.source[:51]} on seed {seed + 1}: {r.second_seed:.1f} "
                  f"(a close call against a baseline, decided by the mean of two seeds)")
    print(f"max flow: {flow.value:.4f} tokens/s")
    print(f"max-flow upper bound (a bound on max flow, not on the served objective): {res.maxflow.upper_bound:.4f} "
          f"tokens/s ({res.maxflow.bound_source})")
    print(f"plan written to {out}")
    if args.explain:
        for line in profile_notes(res.placement.model_spec, spec) + explain(
                res.placement, wl, objective=objective, seed=seed, max_steps=search.step_limit):
            print("explain: " + line)
    if args.plot:
        from ..plots import plot_placement

        plot_placement(res.placement, flow, args.plot, title_extra=_explain_title(res.placement, wl))
        print(f"plot written to {args.plot}")
    return EXIT_OK


def _explain_title(placement: Placement, wl: ServedWorkload) -> str:
    from ..placement.served import ServedModel

    p = ServedModel(wl).predict(placement)
    return f"predicted {p.decode_throughput:.0f} decode tok/s; limited by {p.limit}"


class PlanBar:
    """``plan --progress``: a tqdm bar over the search's time limit (it may stop sooner), showing the
    incumbent and the gap; a display thread advances it between the search's events."""

    def __init__(self, time_limit: float, t0: float) -> None:
        import threading

        from tqdm import tqdm

        self._t0 = t0
        self._now = time.monotonic
        self._total = max(1, round(time_limit))
        self._bar = tqdm(total=self._total, unit="s", desc="planning", file=sys.stderr, leave=False,
                         dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s{postfix}")
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True, name="plan-progress")
        self._thread.start()

    def _advance(self) -> None:
        n = min(self._total, int(self._now() - self._t0))
        if n > self._bar.n:
            self._bar.update(n - self._bar.n)

    def _tick(self) -> None:
        while not self._done.wait(0.5):
            with self._lock:
                self._advance()

    def event(self, ev: dict[str, Any]) -> None:
        """Show a search event (its incumbent, bound and gap)."""
        with self._lock:
            self._bar.set_postfix_str(f"max flow {ev['incumbent']:.1f}, bound {ev['bound']:.1f}, gap {100 * ev['gap']:.1f}%",
                                      refresh=False)
            self._advance()
            self._bar.refresh()

    def close(self) -> None:
        """Stop the display thread and remove the bar."""
        self._done.set()
        self._thread.join(timeout=2)
        self._bar.close()
