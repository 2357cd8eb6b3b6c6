"""Unit expressions of the original Helix files (``1000 * mbps``, ``1 * MilliSec``, ``16 * GB``).

:func:`eval_unit_expr` evaluates them with a small whitelisting evaluator (numbers, unit names,
``+ - * /``), never with :func:`eval`.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from fractions import Fraction
from types import MappingProxyType

from ..errors import ConfigError

__all__ = ["UNITS", "eval_unit_expr"]

# Unit multipliers of the original files (docs/original.md §0). Exact fractions, so that "14.2 * mbps" gives
# exactly the float 14200000.0 that the TOML conversions store (float arithmetic would be off by an ulp).
UNITS: Mapping[str, Fraction] = MappingProxyType(
    {
        "kbps": Fraction(10**3),
        "mbps": Fraction(10**6),
        "gbps": Fraction(10**9),
        "KB": Fraction(10**3),
        "MB": Fraction(10**6),
        "GB": Fraction(10**9),
        "Byte": Fraction(1),
        "Sec": Fraction(1),
        "MilliSec": Fraction(1, 1000),
    }
)



_MAX_EXPR_LEN = 200  # the original files never need more; bounds the work on hostile input


def eval_unit_expr(text: str, *, source: str = "<argument>", field: str = "") -> float:
    """Evaluate a Helix unit expression such as ``"12.5 * mbps"`` to a float (bytes, bytes/s or s).

    Only numeric literals, the unit names of :data:`UNITS`, unary ``+``/``-`` and binary ``+ - * /`` are
    accepted; anything else (calls, attributes, other names, ``**``) raises :class:`ConfigError`. The
    arithmetic is exact (fractions) and rounded once at the end, so ``14.2 * mbps == 14200000.0``.
    """
    if not isinstance(text, str):
        raise ConfigError(source, field, f"expected an expression string, got {text!r}")
    stripped = text.strip()
    if not stripped:
        raise ConfigError(source, field, "empty value")
    if len(stripped) > _MAX_EXPR_LEN:
        raise ConfigError(source, field, f"expression longer than {_MAX_EXPR_LEN} characters")
    try:
        tree = ast.parse(stripped, mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(source, field, f"cannot parse {stripped!r} as a unit expression") from exc

    def reject(node: ast.AST) -> ConfigError:
        return ConfigError(
            source,
            field,
            f"unsupported expression {ast.unparse(node)!r} in {stripped!r} "
            f"(allowed: numbers, {', '.join(UNITS)}, + - * /)",
        )

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise ConfigError(source, field, f"number out of range in {stripped!r}")
                # repr() gives the shortest decimal that round-trips, i.e. the literal as written.
                return Fraction(repr(value))
            assert isinstance(value, int)
            return Fraction(value)
        if isinstance(node, ast.Name) and node.id in UNITS:
            return UNITS[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            val = ev(node.operand)
            return -val if isinstance(node.op, ast.USub) else val
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ConfigError(source, field, f"division by zero in {stripped!r}")
            return left / right
        raise reject(node)

    result = ev(tree)
    try:
        return float(result)
    except OverflowError as exc:
        raise ConfigError(source, field, f"value out of range in {stripped!r}") from exc

