"""Plan files (TOML or JSON) and import of the original Helix solution files.

A plan file is self-contained: it embeds its cluster, so it can be read without anything else.

TOML layout (a ``.json`` file holds the same document as JSON)::

    [plan]                      # model, method, partial, exceed_profiled_max, num_layers, then meta values
    model = "llama2-70b"        #   (max_flow, upper_bound, gap, ... whatever the planner recorded)
    method = "ilp"
    partial = false
    exceed_profiled_max = false
    num_layers = 80
    max_flow = 1289.56

    [cluster]                   # cluster_to_toml_dict(spec): meta, coordinator, machine_types,
    ...                         #   nodes, links

    [[nodes]]                   # one per cluster node; layers absent (or []) = unused
    id = 0
    type = "L4"                 # informational; checked against the cluster when present
    layers = [7, 11]            # [start, end)

    [[links]]                   # the directed links the plan uses
    src = "source"              # "source" or a node id
    dst = 17                    # a node id or "sink"

    [flow]                      # optional: FlowPlan.to_dict() of the plan's max flow

Meta values that are None are not written (TOML has no null); tuples come back as lists;
infinite and NaN floats are kept (JSON files then use Python's ``Infinity``/``NaN`` extension).

Every read runs :func:`~helix_async.placement.core.verify`; a plan that fails is never written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from .. import fileio
from ..cluster import ClusterSpec, cluster_from_toml_dict, cluster_to_toml_dict, load_cluster
from ..errors import ConfigError, PlacementError
from ..flowplan import FlowPlan
from ..ids import SINK, SOURCE, NodeRef
from ..ini import ascii_int, ini_get, ini_list, read_ini
from ..model import get_model
from .core import Placement, arc_kind, clean_arcs, verify

__all__ = [
    "SHIPPED_LAYOUTS",
    "import_helix_solution",
    "load_shipped_layout",
    "placement_from_dict",
    "placement_to_dict",
    "read_flow",
    "read_placement",
    "write_placement",
]

_PLAN_FIELDS = ("model", "method", "partial", "exceed_profiled_max", "num_layers", "force")
_TOP_KEYS = ("plan", "cluster", "nodes", "links", "flow")
_LAYOUT_DIR = Path(__file__).resolve().parent.parent / "data" / "layouts" / "single24_llama70b"


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _ref_out(ref: NodeRef) -> str | int:
    return ref if isinstance(ref, str) else int(ref)


def _meta_value(key: str, value: Any) -> Any:
    """A TOML/JSON-friendly copy of a meta value (tuples -> lists); raises on what TOML cannot hold."""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):  # inf and nan included: TOML has both, Python's json reads them back
        return value
    if isinstance(value, Mapping):
        return {str(k): _meta_value(f"{key}.{k}", v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_meta_value(f"{key}[]", v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _meta_value(key, value.item())
    raise ValueError(f"meta[{key!r}] = {value!r} cannot be written to a plan file")


def placement_to_dict(placement: Placement, flow: FlowPlan | None = None) -> dict[str, Any]:
    """The plan-file document of ``placement`` (verifies it first; raises PlacementError if invalid)."""
    verify(placement)
    plan: dict[str, Any] = {
        "model": placement.model,
        "method": placement.method,
        "partial": bool(placement.partial),
        "exceed_profiled_max": bool(placement.exceed_profiled_max),
        "num_layers": placement.num_layers,
    }
    for key, value in placement.meta.items():
        if key in _PLAN_FIELDS:
            raise ValueError(f"meta key {key!r} clashes with a [plan] field")
        if value is not None:
            plan[str(key)] = _meta_value(str(key), value)
    nodes: list[dict[str, Any]] = []
    for node in placement.cluster.nodes:
        entry: dict[str, Any] = {"id": node.id, "type": node.machine_type}
        r = placement.layers.get(node.id)
        if r is not None:
            entry["layers"] = [int(r[0]), int(r[1])]
        nodes.append(entry)
    doc: dict[str, Any] = {
        "plan": plan,
        "cluster": cluster_to_toml_dict(placement.cluster),
        "nodes": nodes,
        "links": [{"src": _ref_out(u), "dst": _ref_out(v)} for u, v in placement.links],
    }
    if flow is not None:
        doc["flow"] = flow.to_dict()
    return doc


def write_placement(
    placement: Placement, path: str | os.PathLike[str], *, flow: FlowPlan | None = None
) -> Path:
    """Verify ``placement`` and write it to ``path`` (TOML, or JSON when the suffix is ``.json``).

    Raises PlacementError (nothing is written) when the plan is invalid.
    """
    doc = placement_to_dict(placement, flow)
    p = Path(path)
    if p.suffix.lower() == ".json":
        text = json.dumps(doc, indent=1) + "\n"
    else:
        text = tomli_w.dumps(doc)
    return fileio.atomic_write_text(p, text, "plan file")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _load_doc(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    src = str(Path(path))
    text = fileio.read_text(path, "plan file")
    fmt = "json" if Path(path).suffix.lower() == ".json" else "toml"
    return fileio.parse_document(text, src, fmt), src


def _verified(placement: Placement, where: str) -> Placement:
    """Run ``verify``; a failure names ``where`` (the file) in front of the problems."""
    try:
        verify(placement)
    except PlacementError as exc:
        raise PlacementError(exc.problems, where) from None
    return placement


def placement_from_dict(doc: Mapping[str, Any], source: str = "<dict>") -> Placement:
    """Build and verify a placement from a plan document (see the module doc).

    Raises ConfigError(source, field, message) for malformed input and PlacementError for a
    well-formed but invalid plan.
    """
    src = source
    fileio.no_unknown_keys(src, "", doc, _TOP_KEYS)
    plan = fileio.table_field(src, "plan", fileio.required_field(src, "", doc, "plan"))
    model = fileio.str_field(src, "plan.model", fileio.required_field(src, "plan", plan, "model"))
    del plan["model"]
    try:
        spec = get_model(model)
    except ConfigError as exc:
        raise ConfigError(src, "plan.model", exc.message) from None
    method = fileio.name_field(src, "plan.method", plan.pop("method", "manual"))
    partial = fileio.bool_field(src, "plan.partial", plan.pop("partial", False))
    if "force" in plan:  # the name files written before 0.1 used for the same flag
        if "exceed_profiled_max" in plan:
            raise ConfigError(src, "plan.force", "old name of plan.exceed_profiled_max; give only one of them")
        plan["exceed_profiled_max"] = plan.pop("force")
    exceed_profiled_max = fileio.bool_field(src, "plan.exceed_profiled_max", plan.pop("exceed_profiled_max", False))
    if "num_layers" in plan:
        nl = fileio.int_field(src, "plan.num_layers", plan.pop("num_layers"))
        if nl != spec.num_layers:
            raise ConfigError(
                src, "plan.num_layers", f"is {fileio.short_repr(nl)} but model {spec.name} has {spec.num_layers} layers"
            )
    meta = plan  # everything else in [plan]

    ctab = fileio.table_field(src, "cluster", fileio.required_field(src, "", doc, "cluster"))
    try:
        cluster: ClusterSpec = cluster_from_toml_dict(ctab, src)
    except ConfigError as exc:
        raise ConfigError(src, f"cluster.{exc.field}" if exc.field else "cluster", exc.message) from None
    n = cluster.num_nodes

    layers: dict[int, tuple[int, int] | None] = {i: None for i in range(n)}
    seen: set[int] = set()
    for k, raw in enumerate(fileio.array_field(src, "nodes", doc.get("nodes", []))):
        where = f"nodes[{k}]"
        entry = fileio.table_field(src, where, raw)
        fileio.no_unknown_keys(src, where, entry, ("id", "type", "layers"))
        node = fileio.node_ref_field(src, f"{where}.id", fileio.required_field(src, where, entry, "id"), n, ())
        assert isinstance(node, int)
        if node in seen:
            raise ConfigError(src, f"{where}.id", f"node {node} is listed twice")
        seen.add(node)
        if "type" in entry and entry["type"] != cluster.nodes[node].machine_type:
            raise ConfigError(
                src,
                f"{where}.type",
                f"node {node} is a {cluster.nodes[node].machine_type} in the cluster, not {fileio.short_repr(entry['type'])}",
            )
        r = entry.get("layers", [])
        if not isinstance(r, list):
            raise ConfigError(src, f"{where}.layers", f"must be [start, end] or [], got {fileio.short_repr(r)}")
        if not r:
            continue
        if len(r) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in r):
            raise ConfigError(src, f"{where}.layers", f"must be [start, end] with integers, got {fileio.short_repr(r)}")
        if not 0 <= r[0] < r[1] <= spec.num_layers:
            raise ConfigError(
                src,
                f"{where}.layers",
                f"[{r[0]}, {r[1]}) is not a non-empty range within [0, {spec.num_layers})",
            )
        layers[node] = (r[0], r[1])

    links: list[tuple[NodeRef, NodeRef]] = []
    seen_links: set[tuple[NodeRef, NodeRef]] = set()
    for k, raw in enumerate(fileio.array_field(src, "links", doc.get("links", []))):
        where = f"links[{k}]"
        entry = fileio.table_field(src, where, raw)
        fileio.no_unknown_keys(src, where, entry, ("src", "dst"))
        u = fileio.node_ref_field(src, f"{where}.src", fileio.required_field(src, where, entry, "src"), n, (SOURCE,))
        v = fileio.node_ref_field(src, f"{where}.dst", fileio.required_field(src, where, entry, "dst"), n, (SINK,))
        if u == SOURCE and v == SINK:
            raise ConfigError(src, where, "a link cannot join the source to the sink")
        if (u, v) in seen_links:
            raise ConfigError(src, where, f"link {u}->{v} is listed twice")
        seen_links.add((u, v))
        links.append((u, v))

    if "flow" in doc:
        _flow_from(src, doc["flow"])  # validated, not part of the placement

    placement = Placement(
        cluster=cluster,
        model=spec.reference,
        layers=layers,
        links=tuple(links),
        partial=partial,
        method=method,
        exceed_profiled_max=exceed_profiled_max,
        meta=meta,
    )
    return _verified(placement, f"{src}: {method} placement")


def _flow_from(src: str, raw: Any) -> FlowPlan:
    try:
        return FlowPlan.from_dict(fileio.table_field(src, "flow", raw))
    except ValueError as exc:
        raise ConfigError(src, "flow", f"malformed flow summary: {exc}") from None


def read_placement(path: str | os.PathLike[str]) -> Placement:
    """Read a plan file (TOML, or JSON for ``.json``) and verify it.

    Raises ConfigError naming the file and the field for malformed input, PlacementError for a plan
    that fails verification.
    """
    doc, src = _load_doc(path)
    return placement_from_dict(doc, src)


def read_flow(path: str | os.PathLike[str]) -> FlowPlan | None:
    """The ``[flow]`` summary stored in a plan file, or None if it has none."""
    doc, src = _load_doc(path)
    if "flow" not in doc:
        return None
    return _flow_from(src, doc["flow"])


# --------------------------------------------------------------------------------------------------
# Original Helix files (docs/original.md §2.5, §2.6, §5.5)
# --------------------------------------------------------------------------------------------------

_NODE_NAME = re.compile(r"compute_node_(\d+)\Z")


def _node_id(src: str, where: str, name: str, offset: int, n: int) -> int:
    m = _NODE_NAME.match(name.strip())
    k = None if m is None else ascii_int(m.group(1))
    if k is None:
        raise ConfigError(src, where, f"not a compute node name (compute_node_<k>): {fileio.short_repr(name)}")
    node = k - offset
    if not 0 <= node < n:
        raise ConfigError(
            src, where, f"{name} is node {node} with offset {offset}; the cluster has nodes 0..{n - 1}"
        )
    return node


def _endpoint(src: str, where: str, name: str, offset: int, n: int) -> NodeRef:
    name = name.strip().strip("'\"")
    if name in (SOURCE, SINK):
        return name
    return _node_id(src, where, name, offset, n)


def import_helix_solution(
    sol_ini: str | os.PathLike[str],
    simulator_cluster_ini: str | os.PathLike[str],
    cluster: ClusterSpec,
    model: str,
    *,
    method: str | None = None,
    exceed_profiled_max: bool = False,
) -> Placement:
    """A placement from an original Helix solution file and its ``simulator_cluster.ini``.

    Layers come from ``[Solution] compute_node_<i+offset>=[...]`` (contiguous lists, [] = unused) for
    the nodes listed in ``[ComputeNodes]`` (others are unused); the links are exactly the file's
    ``[Links]`` (each section's ``in=``/``out=``). The original cleans dead links in one pass only; if
    links remain that lie on no source->sink path they are dropped to a fixpoint and counted in
    ``meta["dropped_links"]``. ``partial`` is set when any link is a partial-inference link.
    ``method`` defaults to the solution file's name without ``_sol``/``_solution_file``. The result is
    verified (PlacementError if invalid); malformed files raise ConfigError.
    """
    sol_path, sim_path = Path(sol_ini), Path(simulator_cluster_ini)
    ssrc, csrc = str(sol_path), str(sim_path)
    spec = get_model(model)
    n = cluster.num_nodes
    L = spec.num_layers

    sol, _ = read_ini(sol_path)
    raw_offset = ini_get(sol, ssrc, "Settings", "offset").strip()
    offset = ascii_int(raw_offset.removeprefix("-"))
    if offset is None:
        raise ConfigError(ssrc, "[Settings].offset", f"must be an integer, got {fileio.short_repr(raw_offset)}")
    if raw_offset.startswith("-"):
        offset = -offset
    if not sol.has_section("Solution"):
        raise ConfigError(ssrc, "[Solution]", "missing required section")
    solution: dict[int, tuple[int, int] | None] = {}
    for name, text in sol.items("Solution"):
        where = f"[Solution].{name}"
        node = _node_id(ssrc, where, name, offset, n)
        ids = ini_list(text, ssrc, where)
        if not ids:
            solution[node] = None
            continue
        if any(isinstance(x, bool) or not isinstance(x, int) for x in ids):
            raise ConfigError(ssrc, where, "layer ids must be integers")
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ConfigError(ssrc, where, f"layers are not contiguous ascending: {ids}")
        s, e = ids[0], ids[-1] + 1
        if not 0 <= s < e <= L:
            raise ConfigError(ssrc, where, f"layers [{s}, {e}) not within [0, {L}) of {spec.name}")
        solution[node] = (s, e)

    sim, _ = read_ini(sim_path)
    names = ini_list(ini_get(sim, csrc, "ComputeNodes", "names"), csrc, "[ComputeNodes].names")
    present: set[int] = set()
    for k, name in enumerate(names):
        if not isinstance(name, str):
            raise ConfigError(csrc, f"[ComputeNodes].names[{k}]", f"must be a string, got {fileio.short_repr(name)}")
        present.add(_node_id(csrc, f"[ComputeNodes].names[{k}]", name, offset, n))
    layers: dict[int, tuple[int, int] | None] = {
        i: (solution.get(i) if i in present else None) for i in range(n)
    }

    link_names = ini_list(ini_get(sim, csrc, "Links", "names"), csrc, "[Links].names")
    links: list[tuple[NodeRef, NodeRef]] = []
    for k, lname in enumerate(link_names):
        if not isinstance(lname, str):
            raise ConfigError(csrc, f"[Links].names[{k}]", f"must be a string, got {fileio.short_repr(lname)}")
        u = _endpoint(csrc, f"[{lname}].in", ini_get(sim, csrc, lname, "in"), offset, n)
        v = _endpoint(csrc, f"[{lname}].out", ini_get(sim, csrc, lname, "out"), offset, n)
        if u == SINK or v == SOURCE or u == v:
            raise ConfigError(csrc, f"[{lname}]", f"not a usable direction: {u} -> {v}")
        for end in (u, v):
            if isinstance(end, int) and end not in present:
                raise ConfigError(csrc, f"[{lname}]", f"node {end} is not listed in [ComputeNodes]")
        if (u, v) not in links:
            links.append((u, v))

    kept = clean_arcs(links)
    partial = any(arc_kind(layers, u, v, L) == "partial" for u, v in kept)
    if method is None:
        stem = sol_path.stem
        for suffix in ("_solution_file", "_sol"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        method = stem or "imported"
    meta: dict[str, Any] = {"imported_from": sol_path.name, "simulator_cluster": sim_path.name}
    if len(kept) != len(links):
        meta["dropped_links"] = len(links) - len(kept)
    placement = Placement(
        cluster=cluster,
        model=spec.reference,
        layers=layers,
        links=kept,
        partial=partial,
        method=method,
        exceed_profiled_max=exceed_profiled_max,
        meta=meta,
    )
    return _verified(placement, f"{ssrc}: imported {method} placement")


# name -> (directory, cluster, exceed_profiled_max)
SHIPPED_LAYOUTS: dict[str, tuple[str, str, bool]] = {
    "ilp": ("ilp", "single24", False),
    "petals": ("petals", "single24", False),
    "swarm": ("swarm", "single24", False),
    "homogeneous": ("homogeneous", "single24", False),
    "ilp_artifact": ("ilp_artifact", "single24", False),
    "separate_a100": ("separate_a100", "single_a100", True),
    "separate_l4": ("separate_l4", "single_l4", True),
    "separate_t4": ("separate_t4", "single_t4", True),
}


def load_shipped_layout(name: str) -> Placement:
    """One of the shipped LLaMA-2-70B layouts of the original (``SHIPPED_LAYOUTS``).

    ``ilp``, ``petals``, ``swarm``, ``homogeneous`` and ``ilp_artifact`` are placements on
    single24; ``separate_{a100,l4,t4}`` are the hand-made per-type pipelines on the sub-clusters
    ``single_{a100,l4,t4}`` (forced layer counts).
    """
    if name not in SHIPPED_LAYOUTS:
        raise ConfigError(
            "<argument>", "layout", f"unknown shipped layout {name!r}; known: {', '.join(SHIPPED_LAYOUTS)}"
        )
    directory, cluster_name, exceed_profiled_max = SHIPPED_LAYOUTS[name]
    d = _LAYOUT_DIR / directory
    sols = sorted(d.glob("*_sol.ini")) + sorted(d.glob("*_solution_file.ini"))
    sims = sorted(d.glob("*simulator_cluster.ini"))
    if len(sols) != 1 or len(sims) != 1:
        raise ConfigError(str(d), "", "expected one solution file and one simulator_cluster.ini")
    method = "separate" if name.startswith("separate_") else ("ilp" if name == "ilp_artifact" else name)
    p = import_helix_solution(
        sols[0], sims[0], load_cluster(cluster_name), "llama2-70b", method=method, exceed_profiled_max=exceed_profiled_max
    )
    return p.with_meta(layout=f"single24_llama70b/{name}")
