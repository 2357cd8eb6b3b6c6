"""Node identities and the shapes built from them, importable by anyone (no dependencies).

A cluster has compute nodes ``0..N-1`` and a coordinator split, as in Helix, into a send side
(:data:`SOURCE`, where prompts enter) and a receive side (:data:`SINK`, where generated tokens
leave). Messages, routing, plans and the cluster description all name nodes this way.
"""

from __future__ import annotations

from typing import TypeAlias

__all__ = [
    "SOURCE",
    "SINK",
    "NodeRef",
    "LayerRange",
    "PlanLink",
    "Stage",
    "Route",
    "node_order",
    "link_key",
    "parse_link_key",
]

SOURCE = "source"  # coordinator, send side: prompts enter the cluster here
SINK = "sink"  # coordinator, receive side: generated tokens leave the cluster here

NodeRef: TypeAlias = int | str  # compute node id (0..N-1), SOURCE or SINK

LayerRange: TypeAlias = tuple[int, int]  # the layers [start, end) a node holds or a stage runs

PlanLink: TypeAlias = tuple[NodeRef, NodeRef]  # a directed connection u -> v that a plan uses

#: One compute stage of a request's route: (node id, first layer, end layer), running the layers
#: [start, end) on compute node ``node id`` (never SOURCE or SINK).
Stage: TypeAlias = tuple[int, int, int]

#: A request's route, as the router returns it, the host keeps it and work messages carry it: its
#: compute stages in pipeline order, consecutive in layers (stage i + 1 starts at the layer where
#: stage i ends), the first starting at layer 0 and the last ending at the model's last layer. The
#: source before the first stage and the sink after the last are implicit: the host sends the first
#: stage its work and the last stage's node always returns its result to the host.
Route: TypeAlias = tuple[Stage, ...]


def node_order(ref: NodeRef) -> tuple[int, int]:
    """Sort key putting SOURCE first, then compute nodes by id, then SINK."""
    if ref == SOURCE:
        return (0, 0)
    if ref == SINK:
        return (2, 0)
    return (1, int(ref))


def _parse_ref(text: str) -> NodeRef:
    text = text.strip()
    if text in (SOURCE, SINK):
        return text
    # ASCII digits only: str.isdigit() and int() also accept other scripts' digits
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ValueError(f"not a node id, {SOURCE!r} or {SINK!r}: {text[:40]!r}")
    return int(text)


def link_key(u: NodeRef, v: NodeRef) -> str:
    """String key of a directed link, e.g. ``"source->3"``, ``"3->7"``, ``"7->sink"``."""
    return f"{u}->{v}"


def parse_link_key(key: str) -> PlanLink:
    """Inverse of :func:`link_key`; raises ValueError for anything else."""
    if not isinstance(key, str):
        raise ValueError(f"not a link key (expected 'u->v'): {type(key).__name__}")
    a, sep, b = key.partition("->")
    if not sep:
        raise ValueError(f"not a link key (expected 'u->v'): {key[:40]!r}")
    return _parse_ref(a), _parse_ref(b)
