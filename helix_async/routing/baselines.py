"""Per-hop baseline schedulers of the Helix paper (Swarm, Random, Shortest-queue), pure Python.

Each policy lives at one sending node (the source or a compute node) and picks one of its
out-links from local state only, when a request is about to be sent (docs/original.md §7.3-7.5). Common
interface::

    choose(free: Sequence[bool] | None = None, queue_len: Mapping | Callable | None = None) -> int

``free[i]`` says whether out-link ``i`` can take a transmission now (None: all free);
``queue_len`` gives the inbound queue length of a receiver (the node at the far end of a link) as a
mapping or a callable, keyed by the receiver as listed in ``out_links``. The result is a link index,
or -1 when the policy picks nothing now.

Randomness comes from each policy's own ``random.Random(seed)``, never the global RNG, so a
scheduler's draws cannot shift the query mix of a run (docs/original.md §12.2 item 15). Each random
choice consumes exactly one ``shuffle`` of the link indices, whatever ``free`` says, so the stream
of draws depends only on the number of calls.

``seed`` is a required keyword argument of :class:`RandomPolicy` and :class:`ShortestQueuePolicy`:
with a shared default every node drew the same random stream (docs/original.md §12.3 item 19). A caller
derives one seed per node from the run's seed, e.g. ``seed=node_seed(run_seed, node)``
(:func:`node_seed`: deterministic across processes and platforms, independent of
``PYTHONHASHSEED``).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import operator
import random
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeAlias

from ..ids import SINK, NodeRef

# Keyed by receiver (a NodeRef); Any because Mapping is invariant in its key type.
QueueLen: TypeAlias = Mapping[Any, int] | Callable[[Any], int]

__all__ = ["QueueLen", "RandomPolicy", "ShortestQueuePolicy", "SwarmPolicy", "node_seed"]


def node_seed(run_seed: int, node: NodeRef) -> int:
    """A per-node RNG seed (0 <= seed < 2**64) derived from a run's seed and a node.

    node: a compute node id, or SOURCE / SINK. Deterministic: the first 8 bytes (big-endian) of
    the BLAKE2b digest of ``"helix-node-seed/<run_seed>/<kind>/<node>"`` -- never Python's
    ``hash()``, which is salted per process -- so a run replays exactly, and distinct nodes (or
    run seeds) get unrelated streams.
    """
    rs = operator.index(run_seed)
    if isinstance(node, str):
        key = f"helix-node-seed/{rs}/ref/{node}"
    elif isinstance(node, bool):
        raise TypeError(f"node must be a node id (int) or SOURCE / SINK, got {node!r}")
    else:
        key = f"helix-node-seed/{rs}/node/{operator.index(node)}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _links(out_links: Sequence[NodeRef]) -> tuple[NodeRef, ...]:
    links = tuple(out_links)
    if len(set(links)) != len(links):
        raise ValueError(f"out_links must be distinct, got {links!r}")
    return links


def _free(free: Sequence[object] | None, n: int) -> Sequence[object] | None:
    if free is not None and len(free) != n:
        raise ValueError(f"free has {len(free)} entries for {n} out-links")
    return free


class SwarmPolicy:
    """SWARM-parallelism style choice: the link with the least accumulated expected delay.

    out_links: receivers of this node's links; eps: initial delay estimate (seconds) of every link;
    alpha: weight of a new observation in the exponential moving average.

    A min-heap holds ``(priority, link index)``, all priorities ``eps`` at first. ``choose`` pops the
    minimum (the lowest index on a tie), pushes it back with ``priority + ema[link]`` and returns it;
    it ignores ``free`` and ``queue_len`` because a Swarm node assigns at send time and the request
    then waits in that link's FIFO (§7.3). ``observe(link, delta_t)`` folds in one measured delay:
    ``ema = alpha * delta_t + (1 - alpha) * ema``, with ``1 - alpha`` computed in decimal so that
    alpha = 0.8 keeps exactly the original's 0.2.
    """

    __slots__ = ("_links", "_alpha", "_keep", "_ema", "_heap")

    def __init__(self, out_links: Sequence[NodeRef], eps: float = 0.05, alpha: float = 0.8) -> None:
        self._links = _links(out_links)
        eps = float(eps)
        alpha = float(alpha)
        if not (eps >= 0.0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
        self._alpha = alpha
        self._keep = float(Decimal(1) - Decimal(repr(alpha)))
        self._ema = [eps] * len(self._links)
        self._heap = [(eps, i) for i in range(len(self._links))]
        heapq.heapify(self._heap)

    @property
    def out_links(self) -> tuple[NodeRef, ...]:
        return self._links

    @property
    def ema(self) -> tuple[float, ...]:
        """Delay estimate (seconds) per link."""
        return tuple(self._ema)

    def heap(self) -> list[tuple[float, int]]:
        """The (priority, link index) entries in pop order (a sorted copy)."""
        return sorted(self._heap)

    def choose(self, free: Sequence[bool] | None = None, queue_len: QueueLen | None = None) -> int:
        """The link with the least priority (-1 when the node has no links); see the class doc."""
        if not self._heap:
            return -1
        p, i = heapq.heappop(self._heap)
        heapq.heappush(self._heap, (p + self._ema[i], i))
        return i

    def observe(self, link: int, delta_t: float) -> None:
        """Fold in one delay (seconds of loop time from send to arrival at the receiver's queue)."""
        if not 0 <= link < len(self._links):
            raise IndexError(f"link {link} out of range 0..{len(self._links) - 1}")
        delta_t = float(delta_t)
        if not (delta_t >= 0.0 and math.isfinite(delta_t)):
            raise ValueError(f"delta_t must be a finite float >= 0 (seconds), got {delta_t!r}")
        self._ema[link] = self._alpha * delta_t + self._keep * self._ema[link]


class RandomPolicy:
    """The "naive" baseline: a uniformly random free link (§7.4).

    out_links: receivers of this node's links; seed (keyword, required): seed of the policy's own
    RNG, one per node (see :func:`node_seed`). Each call shuffles the link indices once and
    returns the first free one (-1 when none is free).
    """

    __slots__ = ("_links", "_rng")

    def __init__(self, out_links: Sequence[NodeRef], *, seed: int) -> None:
        self._links = _links(out_links)
        self._rng = random.Random(operator.index(seed))

    @property
    def out_links(self) -> tuple[NodeRef, ...]:
        return self._links

    def choose(self, free: Sequence[bool] | None = None, queue_len: QueueLen | None = None) -> int:
        ok = _free(free, len(self._links))
        order = list(range(len(self._links)))
        self._rng.shuffle(order)
        for i in order:
            if ok is None or ok[i]:
                return i
        return -1


class ShortestQueuePolicy:
    """A random free link among those whose receiver has the shortest inbound queue (§7.5).

    out_links: receivers of this node's links; seed (keyword, required): seed of the policy's own
    RNG, one per node (see :func:`node_seed`).

    The minimum is taken over *all* receivers, as in the original: when every shortest-queue
    receiver's link is busy the policy returns -1 and the request waits, rather than going to a
    longer queue. The sink's queue length is 0 unless ``queue_len`` gives one, so a sink neighbour
    counts as shortest. Ties are broken by one shuffle per call (one draw stream per policy).

    Fixed quirk: the original stops scanning at the first sink link, so neighbours listed after it
    are never considered and the minimum ignores them; here every neighbour is scanned.
    """

    __slots__ = ("_links", "_rng")

    def __init__(self, out_links: Sequence[NodeRef], *, seed: int) -> None:
        self._links = _links(out_links)
        self._rng = random.Random(operator.index(seed))

    @property
    def out_links(self) -> tuple[NodeRef, ...]:
        return self._links

    def _lengths(self, queue_len: QueueLen | None) -> list[int]:
        if queue_len is None:
            return [0] * len(self._links)
        out = []
        for y in self._links:
            if callable(queue_len):
                out.append(int(queue_len(y)))
            elif y == SINK:
                out.append(int(queue_len.get(y, 0)))
            else:
                out.append(int(queue_len[y]))
        return out

    def choose(self, free: Sequence[bool] | None = None, queue_len: QueueLen | None = None) -> int:
        ok = _free(free, len(self._links))
        order = list(range(len(self._links)))
        self._rng.shuffle(order)
        if not order:
            return -1
        lengths = self._lengths(queue_len)
        shortest = min(lengths)
        for i in order:
            if lengths[i] == shortest and (ok is None or ok[i]):
                return i
        return -1
