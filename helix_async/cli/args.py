"""The command lines' shared argument types and parser: ``python -m helix_async`` and ``python -m sim``.

Each type is an argparse ``type=``: it returns the value or raises ``ArgumentTypeError`` with a
message that names what is wrong (argparse adds the flag). :class:`Parser` prints a usage error as
one line and exits :data:`EXIT_USAGE`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

if TYPE_CHECKING:
    from ..placement.served import SLO

__all__ = [
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_LEVELS",
    "MAX_MESSAGE",
    "PLOT_SUFFIXES",
    "Parser",
    "finite",
    "int_at_least",
    "log_level",
    "nonnegative",
    "nonnegative_int",
    "one_line",
    "option_type",
    "output_file",
    "pair",
    "parse_weights",
    "plot_path",
    "positive",
    "positive_int",
    "slo",
    "weights",
]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

T = TypeVar("T")


def finite(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive(text: str) -> float:
    """A finite number > 0 (seconds of a limit)."""
    value = finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative(text: str) -> float:
    """A finite number >= 0."""
    value = finite(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def int_at_least(text: str, low: int) -> int:
    """An integer >= ``low``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return int_at_least(text, 0)


#: Logging levels ``--log-level`` (and ``HELIX_LOG_LEVEL``) accept.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """One of :data:`LOG_LEVELS`, any case; returned upper-case."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown level {text!r} (choose from {', '.join(LOG_LEVELS)})")
    return level


def pair(text: str) -> tuple[float, float]:
    """Parse "AVG" or "AVG,VAR" (finite numbers, scientific notation allowed)."""
    parts = text.split(",")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected AVG or AVG,VAR, got {text!r}")
    vals = [finite(p) for p in parts]
    return (vals[0], vals[1] if len(vals) == 2 else 0.0)


def parse_weights(text: str) -> dict[str, float]:
    """Parse "A100:4,L4:8,T4:12" into finite, non-negative weights; ValueError saying what is wrong."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, val = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"expected TYPE:NUMBER[,TYPE:NUMBER...], got {text!r}")
        try:
            weight = float(val)
        except ValueError:
            raise ValueError(f"the number after {name!r} is not a number: {val!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"the number after {name!r} must be finite and >= 0, got {val!r}")
        out[name] = weight
    return out


def weights(text: str) -> dict[str, float]:
    """:func:`parse_weights` for argparse."""
    try:
        return parse_weights(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The picture formats ``--plot`` writes.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def plot_path(text: str) -> str:
    """A file name ending in one of :data:`PLOT_SUFFIXES`."""
    if Path(text).suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"expected a {'/'.join(PLOT_SUFFIXES)} file name, got {text!r}")
    return text


def output_file(text: str) -> str:
    """A file the command will write (``--json``, ``--url-file``, ...): a new name in an existing
    folder or a writable regular file. A symbolic link, a folder, a device or FIFO is refused now,
    before any work; the write itself is atomic and never follows a link
    (:func:`helix_async.fileio.atomic_write_text`)."""
    from ..errors import ConfigError
    from ..fileio import check_output_path

    try:
        check_output_path(text, "file")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc.source}: {exc.message}") from None
    return text


def option_type(parse: Callable[[str], T], flag: str) -> Callable[[str], T]:
    """``parse`` (text -> value, ValueError naming what is wrong) as an argparse type for ``flag``:
    its message without a leading ``<flag>: `` (argparse names the flag itself)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None

    return convert


def slo(text: str) -> SLO:
    """``--slo ttft=S,tpot=S`` (seconds)."""
    from ..placement.served import parse_slo

    return option_type(parse_slo, "--slo")(text)


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line ``error: <command>: <message>``, exit 2.

    (argparse's own format is a usage block and then the message; ``--help`` still shows usage.)
    Sub-command parsers are made with the parent's class, so they inherit this.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {one_line(f'{self.prog}: {message}')} (see {self.prog} --help)\n")


#: The longest message :func:`one_line` passes whole (characters).
MAX_MESSAGE = 500


def model_ref(text: str) -> str:
    """``--model``: a built-in name, a packaged model, a checkpoint directory or a GGUF file
    (docs/models.md), resolved now so a model that is not there, or not one we can serve, is one
    line at the command line; returns the text (commands resolve it again, from the cache)."""
    from ..errors import ConfigError
    from ..models import resolve_model

    try:
        resolve_model(text, "--model")
    except ConfigError as exc:
        where = exc.source if exc.source not in ("<argument>", text) else repr(text)
        field = f" {exc.field}:" if exc.field not in ("--model", "model", "") else ""
        raise argparse.ArgumentTypeError(f"{where}:{field} {exc.message}") from None
    return text


def one_line(text: str) -> str:
    """``text`` as one plain line: control characters (newlines, ESC, ...) escaped, and the middle
    of an over-long message (a 5,000-character file name) cut out."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > MAX_MESSAGE:
        half = MAX_MESSAGE // 2 - 10
        text = f"{text[:half]} ... ({len(text) - 2 * half} characters) ... {text[-half:]}"
    return text
