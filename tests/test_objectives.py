"""The planner's objectives: one table; each scores a prediction and a simulated report alike,
labels itself, and is chosen on the command line by giving its options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from helix_async.cli import main
from helix_async.errors import ConfigError
from helix_async.placement.io import load_shipped_layout
from helix_async.placement.objectives import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    THROUGHPUT,
    Goodput,
    Objective,
    make_objective,
    objective_options,
)
from helix_async.placement.served import SLO, ServedModel, predict
from helix_async.placement.served_search import ServedSearch
from helix_async.settings import SimulationSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: A valid text for every objective option (a new option adds its own here).
EXAMPLES = {"slo": "ttft=3,tpot=1.5"}


def _built(name: str) -> Objective:
    entry = OBJECTIVES[name]
    return entry.factory(**{o.name: o.parse(EXAMPLES[o.name]) for o in entry.options})


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_entry_builds_its_objective_and_labels_it(name: str) -> None:
    obj = _built(name)
    assert isinstance(obj, Objective) and obj.name == name
    assert obj.label and obj.unit and obj.noun and obj.plan_tag
    # chosen on the command line by giving its options (the default: by giving none)
    given = {o.name: o.parse(EXAMPLES[o.name]) for o in OBJECTIVES[name].options}
    assert make_objective(given) == obj
    assert (not given) == (name == DEFAULT_OBJECTIVE)


def test_options_are_flags_of_plan_and_have_one_name_each(capsys: pytest.CaptureFixture[str]) -> None:
    names = [o.name for e in OBJECTIVES.values() for o in e.options]
    assert len(names) == len(set(names)) == len(objective_options())
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in objective_options():
        assert opt.flag in text and opt.metavar in text


def test_throughput_and_goodput_score_what_the_prediction_and_the_report_say() -> None:
    pred = predict(load_shipped_layout("ilp"))
    slo = SLO(3.0, 1.5)
    assert THROUGHPUT.score_prediction(pred) == pred.decode_throughput
    assert Goodput(slo).score_prediction(pred) == pred.goodput(slo)
    report: dict[str, Any] = {"decode_throughput": 120.0, "goodput": {"decode_throughput": 80.0}}
    assert THROUGHPUT.score_report(report) == 120.0 and Goodput(slo).score_report(report) == 80.0
    # goodput asks the simulation to count it under its SLO; throughput asks for nothing
    assert Goodput(slo).slo == slo and THROUGHPUT.slo is None
    assert THROUGHPUT.plan_tag == "served" and Goodput(slo).plan_tag == "goodput ttft=3,tpot=1.5"
    assert THROUGHPUT.label == "decode tok/s" and Goodput(slo).label == "goodput (ttft=3,tpot=1.5)"
    assert Goodput(slo).explain_lines(pred) == [f"goodput under ttft=3,tpot=1.5: {pred.goodput(slo):.1f} decode tokens/s"]
    assert THROUGHPUT.explain_lines(pred) == []


def test_make_objective_names_what_does_not_fit() -> None:
    assert make_objective({}) is THROUGHPUT and make_objective({"slo": None}) is THROUGHPUT
    assert make_objective({"slo": SLO(1.0, 1.0)}) == Goodput(SLO(1.0, 1.0))
    with pytest.raises(ConfigError, match="not an option of any objective"):
        make_objective({"price": 3.0})


def test_the_search_maximises_the_objective_it_is_given() -> None:
    p = load_shipped_layout("ilp")
    slo = SLO(3.0, 1.5)
    for obj in (THROUGHPUT, Goodput(slo)):
        s = ServedSearch(p.cluster, p.model, ServedModel(), objective=obj, seed=0, pool=4)
        s.seed_with([(p, "ilp")])
        cand = s.pool[0]
        assert cand.score == obj.score_prediction(cand.prediction)


def test_a_simulation_is_scored_by_the_objective() -> None:
    from helix_async.placement.served_plan import Simulations
    from sim.planning import simulate_candidate

    p = load_shipped_layout("ilp")
    settings = SimulationSettings(window=30.0)
    loose = Simulations(simulate_candidate, settings, Goodput(SLO(1e6, 1e6))).run(p)
    plain = Simulations(simulate_candidate, settings).run(p)
    tight = Simulations(simulate_candidate, settings, Goodput(SLO(0.01, 0.01))).run(p)
    assert plain["score"] == plain["decode_throughput"] > 0
    assert loose["score"] == pytest.approx(plain["decode_throughput"]) and tight["score"] == 0.0
