"""Reading the original Helix INI files: one parser setup and the checks their readers share.

The original system keeps clusters, machine profiles and solutions in INI files whose values are
Python literals (``[1, 2]``, ``'A100'``) or unit expressions (``1000 * mbps``). The cluster importer
(:mod:`helix_async.cluster.helix_ini`) and the solution importer
(:mod:`helix_async.placement.io`) both read them through this module.
"""

from __future__ import annotations

import ast
import configparser
import os
from typing import Any

from .errors import ConfigError
from .fileio import read_text
from .ids import SINK, SOURCE, NodeRef

__all__ = ["read_ini", "parse_ini", "ini_get", "ini_literal", "ini_list", "ascii_int", "ini_endpoint"]

_MAX_LITERAL_LEN = 100_000  # the longest list in a shipped file is a few hundred characters


def parse_ini(text: str, src: str) -> configparser.ConfigParser:
    """A parser over ``text``: no interpolation, duplicate sections or options refused, option
    names kept as written; ConfigError naming ``src`` for malformed INI."""
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"), strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep option names as written
    try:
        parser.read_string(text, source=src)
    except configparser.Error as exc:
        raise ConfigError(src, "", f"invalid INI: {str(exc).splitlines()[0]}") from None
    return parser


def read_ini(path: str | os.PathLike[str]) -> tuple[configparser.ConfigParser, str]:
    """Parse the INI file ``path`` (a regular UTF-8 file, size-capped); returns (parser, text)."""
    text = read_text(path, "INI file")
    return parse_ini(text, os.fspath(path)), text


def ini_get(parser: configparser.ConfigParser, src: str, section: str, option: str) -> str:
    """The raw value of ``[section] option``; ConfigError naming what is missing."""
    if not parser.has_section(section):
        raise ConfigError(src, f"[{section}]", "missing required section")
    if not parser.has_option(section, option):
        raise ConfigError(src, f"[{section}].{option}", "missing required field")
    return parser.get(section, option)


def ini_literal(value: str, src: str, where: str) -> Any:
    """``value`` read as a Python literal (never evaluated as code)."""
    text = value.strip()
    if len(text) > _MAX_LITERAL_LEN:
        raise ConfigError(src, where, f"value longer than {_MAX_LITERAL_LEN} characters")
    try:
        return ast.literal_eval(text)
    except Exception:  # literal_eval also raises TypeError, MemoryError, RecursionError
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError(src, where, f"cannot parse {shown!r} as a literal") from None


def ini_list(value: str, src: str, where: str) -> list[Any]:
    """``value`` read as a list literal."""
    out = ini_literal(value, src, where)
    if not isinstance(out, list):
        raise ConfigError(src, where, f"must be a list, got {value.strip()!r}")
    return out


_MAX_ID_DIGITS = 18  # node ids and offsets; also keeps int() below its digit limit (a ValueError)


def ascii_int(token: str) -> int | None:
    """``token`` as a non-negative integer when it is made of at most 18 ASCII digits, else None.

    ``str.isdigit`` and ``int`` also accept superscripts and other scripts' digits (``'¹'``,
    ``'١'``); a node id in a file never does, nor has it thousands of digits (which ``int`` would
    refuse with a ValueError).
    """
    if token and len(token) <= _MAX_ID_DIGITS and token.isascii() and token.isdigit():
        return int(token)
    return None


def ini_endpoint(token: str) -> NodeRef | None:
    """A link end in a section name (``Link-source-3``): SOURCE, SINK or a node id; None otherwise."""
    if token in (SOURCE, SINK):
        return token
    return ascii_int(token)
