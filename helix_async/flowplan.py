"""The flows the host routes by: a plain, serialisable value with no graph library behind it.

A :class:`FlowPlan` is what a max-flow analysis of a placement produces
(:func:`helix_async.placement.flow.max_flow`) and what the host and the routers read: the flow on
every link of the plan (its routing weight), every node's compute flow and the capacities. Plan
files store it in their ``[flow]`` table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .ids import NodeRef, PlanLink, link_key, node_order, parse_link_key

__all__ = ["FlowPlan"]


@dataclass(frozen=True)
class FlowPlan:
    """The max flow of a placement and its routing weights (all tokens/s).

    ``link_flows[(u, v)]`` is the flow on placement link u->v (the routing weight), ``link_capacity``
    that link's capacity; ``node_flows[i]`` the flow through node i's compute edge and
    ``node_capacity[i]`` its capacity (typical throughput), for every node holding layers.
    ``max_compute_throughput`` is the cluster's upper bound on any plan's max flow (docs/original.md §3.5).
    """

    value: float
    link_flows: dict[PlanLink, float] = field(default_factory=dict)
    node_flows: dict[int, float] = field(default_factory=dict)
    node_capacity: dict[int, float] = field(default_factory=dict)
    link_capacity: dict[PlanLink, float] = field(default_factory=dict)
    max_compute_throughput: float = math.nan

    def weights(self, u: NodeRef) -> list[tuple[NodeRef, float]]:
        """(next hop, flow) for every link leaving ``u``: node ids ascending, the sink last."""
        out = [(v, f) for (a, v), f in self.link_flows.items() if a == u]
        out.sort(key=lambda vf: node_order(vf[0]))
        return out

    def in_weights(self, v: NodeRef) -> list[tuple[NodeRef, float]]:
        """(previous hop, flow) for every link entering ``v``: the source first, then ids ascending."""
        out = [(u, f) for (u, b), f in self.link_flows.items() if b == v]
        out.sort(key=lambda uf: node_order(uf[0]))
        return out

    def utilisation(self, node: int) -> float:
        """Flow over capacity of a node's compute (0.0 for a node without capacity)."""
        cap = self.node_capacity.get(node, 0.0)
        return self.node_flows.get(node, 0.0) / cap if cap > 0 else 0.0

    def link_utilisation(self, u: NodeRef, v: NodeRef) -> float:
        cap = self.link_capacity.get((u, v), 0.0)
        return self.link_flows.get((u, v), 0.0) / cap if cap > 0 else 0.0

    @property
    def efficiency(self) -> float:
        """value / max_compute_throughput."""
        u = self.max_compute_throughput
        return self.value / u if u and u > 0 and not math.isnan(u) else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A TOML/JSON-friendly dict (link keys "u->v", node keys "i"); see :meth:`from_dict`."""
        links = sorted(self.link_flows, key=lambda a: (node_order(a[0]), node_order(a[1])))
        cap_links = sorted(self.link_capacity, key=lambda a: (node_order(a[0]), node_order(a[1])))
        d: dict[str, Any] = {
            "value": float(self.value),
            "link_flows": {link_key(*a): float(self.link_flows[a]) for a in links},
            "node_flows": {str(i): float(self.node_flows[i]) for i in sorted(self.node_flows)},
            "node_capacity": {str(i): float(self.node_capacity[i]) for i in sorted(self.node_capacity)},
            "link_capacity": {link_key(*a): float(self.link_capacity[a]) for a in cap_links},
        }
        if not math.isnan(self.max_compute_throughput):
            d["max_compute_throughput"] = float(self.max_compute_throughput)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowPlan:
        """Inverse of :meth:`to_dict`; ValueError naming the entry for malformed input.

        Flows and capacities must be finite numbers >= 0, link keys ``u->v`` and node keys ASCII
        node ids (a value from a file is checked, never trusted).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"must be a table, got {type(d).__name__}")
        unknown = set(d) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown field {sorted(map(str, unknown))[0]!r} (expected one of: {', '.join(_FIELDS)})")
        if "value" not in d:
            raise ValueError("value: missing required field")
        mct = d.get("max_compute_throughput")
        return cls(
            value=_amount("value", d["value"]),
            link_flows=_entries(d, "link_flows", _link),
            node_flows=_entries(d, "node_flows", _node),
            node_capacity=_entries(d, "node_capacity", _node),
            link_capacity=_entries(d, "link_capacity", _link),
            max_compute_throughput=math.nan if mct is None else _amount("max_compute_throughput", mct),
        )


_FIELDS = ("value", "link_flows", "node_flows", "node_capacity", "link_capacity", "max_compute_throughput")


def _amount(where: str, value: Any) -> float:
    """A finite number >= 0 (tokens/s)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: must be a number (tokens/s), got {type(value).__name__}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{where}: out of range (tokens/s)") from None
    if not (math.isfinite(out) and out >= 0):
        raise ValueError(f"{where}: must be finite and >= 0 tokens/s, got {out!r}")
    return out


def _link(key: str) -> PlanLink:
    return parse_link_key(key)


def _node(key: str) -> int:
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18):
        raise ValueError(f"not a compute node id: {key[:40]!r}")
    return int(key)


def _entries(d: Mapping[str, Any], name: str, parse_key: Callable[[str], Any]) -> dict[Any, float]:
    table = d.get(name, {})
    if not isinstance(table, Mapping):
        raise ValueError(f"{name}: must be a table, got {type(table).__name__}")
    out: dict[Any, float] = {}
    for key, value in table.items():
        try:
            parsed = parse_key(key)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        out[parsed] = _amount(f"{name}.{key[:40]}", value)
    return out
