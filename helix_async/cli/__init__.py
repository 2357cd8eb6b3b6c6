"""Command line: ``python -m helix_async <command> ...``.

``main(argv) -> int`` is the entry point; ``__main__`` only calls it. Bad input (a ConfigError,
PlacementError or PlanningError) prints one line to stderr and exits 2, without a traceback.

One module per command group (:mod:`.cluster`, :mod:`.plan`, :mod:`.flow`, :mod:`.profile`,
:mod:`.demo`; the runtime's commands add their own parsers), and :mod:`.args`, the argument types
and parser shared with ``python -m sim``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .. import envs
from ..errors import HelixError
from . import cluster, demo, flow, plan, profile, replan
from .args import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    LOG_LEVELS,
    Parser,
    log_level,
    one_line,
    pair,
    positive,
    positive_int,
)

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "build_parser", "dispatch", "entry", "main"]

log = logging.getLogger("helix_async.cli")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    p = Parser(
        prog="python -m helix_async",
        description="Plan, simulate and serve LLMs over heterogeneous GPU clusters (after Helix, ASPLOS'25).",
    )
    p.add_argument(
        "--log-level", type=log_level, default=None, help=f"logging level (default {envs.HELIX_LOG_LEVEL})"
    )
    sub = p.add_subparsers(dest="command", required=True)
    cluster.add_parser(sub)
    plan.add_parser(sub)
    flow.add_parser(sub)
    replan.add_parser(sub)
    profile.add_parser(sub)

    from ..runtime.commands import add_parsers

    add_parsers(sub, positive_int, positive, pair)
    from ..runtime.serve import add_parser as add_serve_parser

    add_serve_parser(sub, positive_int, positive)
    from ..frontend.bench_serve import add_parser as add_bench_serve_parser

    add_bench_serve_parser(sub, positive)
    from ..runtime.launch import add_parser as add_launch_parser

    add_launch_parser(sub, positive)
    demo.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input, after one ``error:`` line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # a usage error (one line, see Parser) or --help
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    level = args.log_level or envs.HELIX_LOG_LEVEL.strip().upper()
    if level not in LOG_LEVELS:
        print(f"error: HELIX_LOG_LEVEL: unknown level {one_line(repr(envs.HELIX_LOG_LEVEL))} "
              f"(choose from {', '.join(LOG_LEVELS)})", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return dispatch(args.handler, args)


def dispatch(handler: Any, args: argparse.Namespace) -> int:
    """Run a command handler; bad input (HelixError, OSError) becomes one ``error:`` line and
    exit 2, Ctrl-C exit 130. Shared with ``python -m sim``."""
    try:
        return int(handler(args))
    except HelixError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
