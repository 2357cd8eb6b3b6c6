"""What the served planner maximises: one table of objectives (docs/planner.md).

An :class:`Objective` scores a plan twice, the same way: on the served model's prediction
(:class:`~helix_async.placement.served.ServedPrediction`, while searching) and on a simulation's
report (the simulator's JSON report, when candidates are simulated). It also says what the
simulation must measure for it (:attr:`Objective.slo`) and labels itself for people.

:data:`OBJECTIVES` maps a name to an :class:`ObjectiveEntry`: the factory and the options it takes,
each an option of ``plan`` (``--slo`` for goodput). The command line adds one flag per option and
builds the objective whose options were given (:func:`make_objective`). A new objective (cost,
a latency percentile) is one class and one entry here, and its test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .served import SLO, ServedPrediction, parse_slo

__all__ = [
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "THROUGHPUT",
    "Goodput",
    "Objective",
    "ObjectiveEntry",
    "ObjectiveOption",
    "Throughput",
    "make_objective",
    "objective_options",
]


class Objective(ABC):
    """A served objective: higher scores are better; both scores are in :attr:`unit`."""

    #: the registry name (:data:`OBJECTIVES`)
    name: ClassVar[str]
    #: the unit of both scores, for people
    unit: ClassVar[str] = "decode tokens/s"

    @property
    def slo(self) -> SLO | None:
        """The SLO the simulation must count goodput under for :meth:`score_report` (the report's
        ``goodput`` entry); None when the objective needs no such count."""
        return None

    @property
    @abstractmethod
    def label(self) -> str:
        """What a score is, as a column of the candidates' table (``decode tok/s``)."""

    @property
    def noun(self) -> str:
        """What a score is, in a sentence (``explain``: "one more GPU (predicted <noun> gained)")."""
        return self.unit

    @property
    def condition(self) -> str:
        """The objective's parameters, for a heading ("SLO ttft=2,tpot=0.5"); empty when it has none."""
        return ""

    @property
    def plan_tag(self) -> str:
        """The ``objective`` a plan file records for a plan chosen by this objective."""
        return "served" if not self.condition else f"{self.name} {self.condition}"

    @abstractmethod
    def score_prediction(self, prediction: ServedPrediction) -> float:
        """The score of a plan by the served model's prediction."""

    @abstractmethod
    def score_report(self, report: Mapping[str, Any]) -> float:
        """The score of a plan by a simulation's report (``sim.report.build_report``'s keys,
        ``goodput`` included when :attr:`slo` is set)."""

    def explain_lines(self, prediction: ServedPrediction) -> list[str]:
        """Lines ``explain`` adds about this objective (beyond the prediction's own figures)."""
        return []


@dataclass(frozen=True)
class Throughput(Objective):
    """Decode throughput: tokens generated per second, every request counted."""

    name: ClassVar[str] = "throughput"

    @property
    def label(self) -> str:
        return "decode tok/s"

    def score_prediction(self, prediction: ServedPrediction) -> float:
        return prediction.decode_throughput

    def score_report(self, report: Mapping[str, Any]) -> float:
        return float(report["decode_throughput"])


@dataclass(frozen=True)
class Goodput(Objective):
    """SLO goodput: the decode throughput of requests whose TTFT and mean TPOT meet ``slo``."""

    name: ClassVar[str] = "goodput"
    target: SLO

    @property
    def slo(self) -> SLO:
        return self.target

    @property
    def label(self) -> str:
        return f"goodput ({self.target})"

    @property
    def noun(self) -> str:
        return "goodput"

    @property
    def condition(self) -> str:
        return f"SLO {self.target}"

    @property
    def plan_tag(self) -> str:
        return f"goodput {self.target}"

    def score_prediction(self, prediction: ServedPrediction) -> float:
        return prediction.goodput(self.target)

    def score_report(self, report: Mapping[str, Any]) -> float:
        return float(report["goodput"]["decode_throughput"])

    def explain_lines(self, prediction: ServedPrediction) -> list[str]:
        return [f"goodput under {self.target}: {prediction.goodput(self.target):.1f} decode tokens/s"]


#: The default objective's one instance (objectives are frozen values).
THROUGHPUT = Throughput()


@dataclass(frozen=True)
class ObjectiveOption:
    """One parameter of an objective, given as ``--<name>`` on the command line.

    parse: text -> value; a ValueError whose message starts ``--<name>: `` names what is wrong.
    """

    name: str
    parse: Callable[[str], Any]
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registry entry: ``factory(**options)`` builds the objective from its options' values."""

    factory: Callable[..., Objective]
    options: tuple[ObjectiveOption, ...] = ()
    help: str = ""


#: name -> entry. An objective with options is chosen by giving them; the one without is the default.
OBJECTIVES: dict[str, ObjectiveEntry] = {
    "throughput": ObjectiveEntry(lambda: THROUGHPUT, help="decode tokens/s (the default)"),
    "goodput": ObjectiveEntry(
        lambda slo: Goodput(slo),
        (ObjectiveOption("slo", parse_slo, "ttft=S,tpot=S",
                         "served: maximise goodput, the decode throughput of requests meeting both limits"),),
        help="decode tokens/s of requests meeting an SLO",
    ),
}
DEFAULT_OBJECTIVE = "throughput"


def objective_options() -> list[ObjectiveOption]:
    """Every objective's options, in table order (each name once: the flags they become)."""
    seen: dict[str, ObjectiveOption] = {}
    for entry in OBJECTIVES.values():
        for opt in entry.options:
            seen.setdefault(opt.name, opt)
    return list(seen.values())


def make_objective(given: Mapping[str, Any]) -> Objective:
    """The objective whose options are given (option name -> value; None counts as not given), or
    the default one when none is. ConfigError naming the flags when the options given belong to
    two objectives or leave one of an objective's options out."""
    named = {k for k, v in given.items() if v is not None}
    unknown = named - {o.name for o in objective_options()}
    if unknown:
        raise ConfigError("<argument>", ", ".join(sorted(unknown)), "not an option of any objective")
    if not named:
        return OBJECTIVES[DEFAULT_OBJECTIVE].factory()
    chosen = [(name, e) for name, e in OBJECTIVES.items() if e.options and named & {o.name for o in e.options}]
    if len(chosen) > 1:
        flags = ", ".join(o.flag for _, e in chosen for o in e.options if o.name in named)
        raise ConfigError("<argument>", flags, f"select different objectives ({', '.join(n for n, _ in chosen)}): give one")
    name, entry = chosen[0]
    missing = [o.flag for o in entry.options if o.name not in named]
    if missing:
        raise ConfigError("<argument>", ", ".join(missing), f"the {name} objective needs it too")
    return entry.factory(**{o.name: given[o.name] for o in entry.options})
