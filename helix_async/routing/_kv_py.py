"""KV-cache expectation (admission control): the pure-Python specification.

``ext/_routing.pyx`` holds the compiled twin (``KVTracker``); both keep the same integers and
return the same floats (same operation order; checked by a hypothesis test).

Semantics (docs/original.md §7.2). Every compute node has a KV capacity ``total`` (token x layer
entries), an ``avail`` count (initially ``total``) and its layer range ``[a, b)``. A query with
``n`` input tokens is expected to hold ``E(n) = int(n + avg_output_len * output_ratio)`` tokens
(``avg_output_len`` = 240, the dataset constant):

* ``kv_fill_limit`` (the original's ``hwm``, high-water mark; 0.85 offline): the fraction (0..1) of
  a node's KV capacity that admission may fill with expected usage;
* ``can_add(node, n)``: ``avail - E(n) * (b - a) >= (1 - kv_fill_limit) * total``, i.e. the
  node's reserved entries plus the query's would stay within ``kv_fill_limit * total`` -- with the
  node's *full* layer count even when the query runs only part of its layers (as the original does);
* ``reserve(request_id, [(node, layers_run), ...], n)`` takes ``E(n) * layers_run`` from each node
  and remembers exactly what it took; ``release(request_id)`` gives that back. Reserving an id twice,
  or more than a node has, raises ``ValueError`` and changes nothing; releasing an id that holds no
  reservation raises ``KeyError`` (a double release is a bookkeeping bug, never silently ignored);
* ``bottleneck_usage()``: for each layer, ``1 - sum(avail/(b-a)) / sum(total/(b-a))`` over the nodes
  holding it; the maximum over the layers (0.0 when no node holds a layer).

Counts are Python ints (C ``long long`` in the twin); the one float comparison,
``int >= float``, is exact in both because every count is below 2**53 (checked).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model import ThroughputModel
    from ..placement.core import Placement

# Counts must stay exactly representable as doubles so that int-vs-float comparisons agree
# between Python (exact) and C (convert, then compare).
MAX_COUNT = 2**52
# Largest accepted input length (tokens) and expected output (avg_output_len * output_ratio), and
# largest layer index: together they keep E(n) * layers (< 2**33 * 2**16) far below MAX_COUNT.
MAX_INPUT_LEN = 2**32
MAX_LAYERS = 2**16


def _as_count(value: object, what: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got {v}")
    return v


def check_kv_params(
    kv_fill_limit: float, output_ratio: float, avg_output_len: int
) -> tuple[float, float, int]:
    """Validated (kv_fill_limit, output_ratio, avg_output_len); shared by both twins."""
    kv_fill_limit = float(kv_fill_limit)
    output_ratio = float(output_ratio)
    if not 0.0 <= kv_fill_limit <= 1.0:
        raise ValueError(f"kv_fill_limit must lie in [0, 1], got {kv_fill_limit!r}")
    if not (output_ratio >= 0.0 and math.isfinite(output_ratio)):
        raise ValueError(f"output_ratio must be a finite float >= 0, got {output_ratio!r}")
    avg = _as_count(avg_output_len, "avg_output_len", 0, MAX_INPUT_LEN)
    if not avg * output_ratio <= MAX_INPUT_LEN:
        raise ValueError(f"avg_output_len * output_ratio must be at most {MAX_INPUT_LEN}")
    return kv_fill_limit, output_ratio, avg


def check_kv_nodes(
    capacity: Mapping[int, int], layers: Mapping[int, tuple[int, int]], num_layers: int | None
) -> tuple[list[int], list[int], list[tuple[int, int]], int]:
    """(node ids ascending, capacities, layer ranges, num_layers), validated; shared by both twins."""
    if set(capacity) != set(layers):
        raise ValueError(
            "capacity and layers must name the same nodes; "
            f"only in capacity: {sorted(set(capacity) - set(layers))}, "
            f"only in layers: {sorted(set(layers) - set(capacity))}"
        )
    nodes = sorted(_as_count(u, "node id", 0, MAX_COUNT) for u in capacity)
    caps = [_as_count(capacity[u], f"KV capacity of node {u}") for u in nodes]
    ranges: list[tuple[int, int]] = []
    for u in nodes:
        a, b = layers[u]
        a = _as_count(a, f"first layer of node {u}", 0, MAX_LAYERS)
        b = _as_count(b, f"end layer of node {u}", 0, MAX_LAYERS)
        if not a < b:
            raise ValueError(f"node {u} needs a non-empty layer range [a, b), got [{a}, {b})")
        ranges.append((a, b))
    top = max((b for _, b in ranges), default=0)
    if num_layers is None:
        L = top
    else:
        L = _as_count(num_layers, "num_layers", 0, MAX_LAYERS)
        if L < top:
            raise ValueError(f"num_layers {L} is below a node's end layer {top}")
    return nodes, caps, ranges, L


class KVTracker:
    """Expected KV usage per compute node (token x layer entries).

    capacity: node id -> KV capacity (token x layer entries); layers: node id -> [a, b);
    kv_fill_limit: the fraction (0..1) of a node's KV capacity that the expected usage of admitted
    queries may fill (a query is admitted to a node only while that stays within
    ``kv_fill_limit * capacity``); output_ratio: the share of ``avg_output_len`` (tokens) a query
    is expected to generate; num_layers: the model's layer count (default: the largest end layer).
    """

    __slots__ = (
        "_nodes",
        "_index",
        "_total",
        "_avail",
        "_a",
        "_b",
        "_k",
        "_thr",
        "_extra",
        "_fill",
        "_ratio",
        "_avg",
        "_L",
        "_resv",
    )

    def __init__(
        self,
        capacity: Mapping[int, int],
        layers: Mapping[int, tuple[int, int]],
        *,
        kv_fill_limit: float,
        output_ratio: float,
        avg_output_len: int = 240,
        num_layers: int | None = None,
    ) -> None:
        self._fill, self._ratio, self._avg = check_kv_params(kv_fill_limit, output_ratio, avg_output_len)
        nodes, caps, ranges, self._L = check_kv_nodes(capacity, layers, num_layers)
        self._nodes = tuple(nodes)
        self._index = {u: i for i, u in enumerate(nodes)}
        self._total = caps
        self._avail = list(caps)
        self._a = [a for a, _ in ranges]
        self._b = [b for _, b in ranges]
        self._k = [b - a for a, b in ranges]
        self._thr = [(1.0 - self._fill) * t for t in caps]
        self._extra = self._avg * self._ratio
        self._resv: dict[Hashable, tuple[tuple[int, int], ...]] = {}

    @classmethod
    def from_placement(
        cls,
        placement: Placement,
        *,
        kv_fill_limit: float,
        output_ratio: float,
        tm: ThroughputModel | None = None,
        avg_output_len: int | None = None,
    ) -> KVTracker:
        """A tracker over the nodes of ``placement`` that hold layers (see :func:`placement_kv_inputs`).

        avg_output_len defaults to the dataset constant (240 tokens).
        """
        capacity, layers, L = placement_kv_inputs(placement, tm)
        if avg_output_len is None:
            from ..model import dataset_constants

            avg_output_len = dataset_constants().avg_output_len
        return cls(
            capacity,
            layers,
            kv_fill_limit=kv_fill_limit,
            output_ratio=output_ratio,
            avg_output_len=avg_output_len,
            num_layers=L,
        )

    # ---- parameters and read-outs -----------------------------------------------------------------

    @property
    def nodes(self) -> tuple[int, ...]:
        """Tracked compute nodes, ascending."""
        return self._nodes

    @property
    def kv_fill_limit(self) -> float:
        """Fraction (0..1) of each node's KV capacity that admitted queries' expected usage may fill."""
        return self._fill

    @property
    def output_ratio(self) -> float:
        return self._ratio

    @property
    def avg_output_len(self) -> int:
        return self._avg

    @property
    def num_layers(self) -> int:
        return self._L

    def _i(self, node: int) -> int:
        try:
            return self._index[node]
        except (KeyError, TypeError):
            raise KeyError(f"node {node!r} is not tracked by this KVTracker") from None

    def total(self, node: int) -> int:
        """KV capacity of ``node`` (token x layer entries)."""
        return self._total[self._i(node)]

    def available(self, node: int) -> int:
        """Entries of ``node`` not reserved (token x layer entries)."""
        return self._avail[self._i(node)]

    def layer_range(self, node: int) -> tuple[int, int]:
        i = self._i(node)
        return (self._a[i], self._b[i])

    def snapshot(self) -> tuple[tuple[int, int], ...]:
        """(node, available) for every node, ascending."""
        return tuple(zip(self._nodes, self._avail, strict=True))

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._resv

    def __len__(self) -> int:
        """Number of live reservations."""
        return len(self._resv)

    def reserved(self, request_id: Hashable) -> tuple[tuple[int, int], ...]:
        """(node, entries) taken by ``request_id``'s reservation (KeyError if none)."""
        return tuple((self._nodes[i], amt) for i, amt in self._resv[request_id])

    # ---- the rules ---------------------------------------------------------------------------------

    def expected_len(self, n: int) -> int:
        """E(n) = int(n + avg_output_len * output_ratio): tokens a query of n input tokens is expected to hold."""
        n = _as_count(n, "input length", 0, MAX_INPUT_LEN)
        return int(n + self._extra)

    def can_add(self, node: int, n: int) -> bool:
        """Whether a query of ``n`` input tokens fits ``node`` now: its expected KV (over the node's
        full layer count) added to what is reserved stays within ``kv_fill_limit`` of the capacity."""
        i = self._i(node)
        e = self.expected_len(n)
        return self._avail[i] - e * self._k[i] >= self._thr[i]

    def can_ever_add(self, node: int, n: int) -> bool:
        """Whether it would fit ``node`` with nothing reserved (a static feasibility test)."""
        i = self._i(node)
        e = self.expected_len(n)
        return self._total[i] - e * self._k[i] >= self._thr[i]

    def reserve(self, request_id: Hashable, stages: Iterable[tuple[int, int]], n: int) -> None:
        """Take ``E(n) * layers_run`` entries on each (node, layers_run) of ``stages``.

        layers_run: 1..(b - a) for that node; a node may appear once. Raises ValueError (and
        changes nothing) when the id already holds a reservation or a node lacks the entries.
        """
        if request_id in self._resv:
            raise ValueError(f"request {request_id!r} already holds a KV reservation")
        e = self.expected_len(n)
        taken: list[tuple[int, int]] = []
        seen: set[int] = set()
        for node, layers_run in stages:
            i = self._i(node)
            if i in seen:
                raise ValueError(f"node {node} appears twice in the stages of request {request_id!r}")
            seen.add(i)
            k = _as_count(layers_run, f"layers run on node {node}", 1, self._k[i])
            amt = e * k
            if self._avail[i] - amt < 0:
                raise ValueError(
                    f"node {node} has {self._avail[i]} KV entries free, request {request_id!r} needs {amt}"
                )
            taken.append((i, amt))
        for i, amt in taken:
            self._avail[i] = self._avail[i] - amt
        self._resv[request_id] = tuple(taken)

    def release(self, request_id: Hashable) -> None:
        """Give back exactly what ``request_id`` reserved (KeyError when it holds nothing)."""
        try:
            taken = self._resv.pop(request_id)
        except KeyError:
            raise KeyError(f"request {request_id!r} holds no KV reservation") from None
        for i, amt in taken:
            self._avail[i] = self._avail[i] + amt

    def bottleneck_usage(self) -> float:
        """Max over layers of the reserved share of the KV entries that hold that layer (0..1)."""
        worst = 0.0
        n = len(self._nodes)
        for layer in range(self._L):
            free = 0.0
            tot = 0.0
            for i in range(n):
                if self._a[i] <= layer < self._b[i]:
                    free = free + self._avail[i] / self._k[i]
                    tot = tot + self._total[i] / self._k[i]
            if tot > 0.0:
                usage = 1.0 - free / tot
                if usage > worst:
                    worst = usage
        return worst

    def __repr__(self) -> str:
        return (
            f"KVTracker(nodes={len(self._nodes)}, reservations={len(self._resv)}, kv_fill_limit={self._fill})"
        )


def placement_kv_inputs(
    placement: Placement, tm: ThroughputModel | None = None
) -> tuple[dict[int, int], dict[int, tuple[int, int]], int]:
    """(KV capacity per node, layer range per node, num_layers) of a placement's nodes with layers.

    Capacities come from the throughput model (profiled vLLM blocks, extended past the profiled
    layer maximum for forced layouts); ``tm`` defaults to the model of the placement's cluster.
    """
    from ..model import ThroughputModel

    if tm is None:
        tm = ThroughputModel.for_cluster(placement.model_spec, placement.cluster)
    capacity: dict[int, int] = {}
    layers: dict[int, tuple[int, int]] = {}
    for u, r in placement.layers.items():
        if r is None:
            continue
        capacity[u] = int(tm.kv_capacity(placement.cluster.machine(u).gpu, r[1] - r[0]))
        layers[u] = (int(r[0]), int(r[1]))
    return capacity, layers, placement.num_layers
