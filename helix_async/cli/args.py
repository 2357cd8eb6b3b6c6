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
    from ..settings import KVExpectation

__all__ = [
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_LEVELS",
    "MAX_COUNT",
    "MAX_MESSAGE",
    "MAX_NODE_ID",
    "MAX_NUMBER",
    "MAX_NUMBER_TEXT",
    "MAX_PORT",
    "MAX_SECONDS",
    "MAX_SEED",
    "PLOT_SUFFIXES",
    "Parser",
    "endpoint",
    "finite",
    "int_at_least",
    "int_in",
    "kv_expectation",
    "log_level",
    "nonnegative",
    "nonnegative_int",
    "nonnegative_seconds",
    "node_id",
    "number_in",
    "one_line",
    "option_type",
    "output_file",
    "pair",
    "parse_weights",
    "plot_path",
    "port",
    "positive",
    "positive_int",
    "seconds",
    "seed",
    "slo",
    "weights",
]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

T = TypeVar("T")


#: The largest value any real-valued flag takes (rates, sizes, scales): past it a value is a typo or
#: hostile, and products of such values (a rate times a duration) stay far from float overflow.
MAX_NUMBER = 1e15
#: The longest time any flag takes, seconds (about 31.7 years): within SCIP's ``limits/time``
#: (at most 1e20) and Python's ``threading.TIMEOUT_MAX`` (about 9.2e9 s on Linux), so every wait
#: and every solver limit takes it.
MAX_SECONDS = 1e9
#: The largest count any integer flag takes: a signed 64-bit integer (SCIP's node limit is one).
MAX_COUNT = 2**63 - 1
#: Seeds are unsigned 64-bit integers, as ``torch.manual_seed`` and the wire take them.
MAX_SEED = 2**64 - 1
#: Node ids fit a C ``int`` (cluster files number nodes 0..n-1).
MAX_NODE_ID = 2**31 - 1
#: Ports.
MAX_PORT = 65535
#: The most characters a number on the command line may have: a 5,000-digit integer is refused
#: before Python converts it (which is quadratic, and refused past 4,300 digits anyway).
MAX_NUMBER_TEXT = 64


def _number_text(text: str, what: str) -> str:
    s = text.strip()
    if len(s) > MAX_NUMBER_TEXT:
        raise argparse.ArgumentTypeError(f"expected {what}, got {len(s)} characters (at most {MAX_NUMBER_TEXT})")
    return s


def finite(text: str) -> float:
    """A finite number."""
    s = _number_text(text, "a number")
    try:
        value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def number_in(low: float, high: float, *, low_open: bool = False, unit: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    u = f" {unit}" if unit else ""

    def convert(text: str) -> float:
        value = finite(text)
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}{u}, got {text!r}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}{u}, got {text!r}")
        return value

    convert.__name__ = "number"  # argparse names the type in some messages
    return convert


def int_in(low: int, high: int, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]``; text longer than :data:`MAX_NUMBER_TEXT`
    is refused before it is converted."""

    def convert(text: str) -> int:
        s = _number_text(text, what)
        try:
            value = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what} >= {low}, got {text!r}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be {what} <= {high}, got {text!r}")
        return value

    convert.__name__ = "integer"
    return convert


#: A finite number > 0 (up to :data:`MAX_NUMBER`).
positive = number_in(0.0, MAX_NUMBER, low_open=True)
#: A finite number >= 0 (up to :data:`MAX_NUMBER`).
nonnegative = number_in(0.0, MAX_NUMBER)
#: Seconds of a limit or a wait: > 0 and at most :data:`MAX_SECONDS`.
seconds = number_in(0.0, MAX_SECONDS, low_open=True, unit="s")
#: Seconds, 0 allowed.
nonnegative_seconds = number_in(0.0, MAX_SECONDS, unit="s")
#: An integer >= 1 (up to :data:`MAX_COUNT`).
positive_int = int_in(1, MAX_COUNT)
#: An integer >= 0 (up to :data:`MAX_COUNT`).
nonnegative_int = int_in(0, MAX_COUNT)
#: A seed: an integer in [0, 2**64 - 1].
seed = int_in(0, MAX_SEED, "an integer seed")
#: A node id: an integer in [0, 2**31 - 1].
node_id = int_in(0, MAX_NODE_ID, "a node id")
#: A TCP port (0: any free one).
port = int_in(0, MAX_PORT, "a port")


def int_at_least(text: str, low: int) -> int:
    """An integer in ``[low, MAX_COUNT]``."""
    return int_in(low, MAX_COUNT)(text)


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


#: The largest output ratio ``--kv`` takes (the expected remaining output, in mean output lengths).
MAX_KV_RATIO = 10.0


def kv_expectation(text: str) -> KVExpectation:
    """``--kv HWM,RATIO``: the fill limit in (0, 1] and the output ratio in [0, 10]
    (:class:`~helix_async.settings.KVExpectation`)."""
    from ..settings import KVExpectation

    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected HWM,RATIO (two numbers), got {text[:80]!r}")
    hwm, ratio = (finite(p.strip()) for p in parts)
    if not 0 < hwm <= 1:
        raise argparse.ArgumentTypeError(f"HWM must lie in (0, 1], got {hwm!r}")
    if not 0 <= ratio <= MAX_KV_RATIO:
        raise argparse.ArgumentTypeError(f"RATIO must lie in [0, {MAX_KV_RATIO:g}], got {ratio!r}")
    return KVExpectation(hwm, ratio)


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
        if weight > MAX_NUMBER:
            raise ValueError(f"the number after {name!r} must be <= {MAX_NUMBER:g}, got {val!r}")
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


def endpoint(text: str) -> str:
    """A ZeroMQ address (``--listen``, ``--bind``, ``--connect``, ``--advertise``): a ``tcp://``
    one must end in ``:PORT`` (at most 5 digits, <= 65535) or ``:*`` (any free port), before any
    ``#curve=`` key; ZeroMQ itself would bind a port out of range somewhere else, or not at all.
    Other transports (``ipc://``, ``inproc://``) are left to ZeroMQ."""
    base = text.partition("#")[0]
    if base.startswith("tcp://"):
        host, sep, port = base[len("tcp://"):].rpartition(":")
        ok_port = port == "*" or (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= MAX_PORT)
        if not sep or not host or not ok_port:
            shown = text if len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"
            raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT (PORT <= {MAX_PORT} or *), got {shown!r}")
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
