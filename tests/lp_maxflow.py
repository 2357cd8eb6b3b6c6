"""Max flow of a placement as a linear program in cvxpy, written from docs/original.md §6 only.

A test oracle for :mod:`helix_async.placement.flow`: it reads the :class:`Placement` (layers,
links, cluster, model) and never looks at :func:`~helix_async.placement.flow.build_flow_graph` or
anything else of the flow module, so a wrong capacity or a wrong rule there shows up as a
disagreement. It is formulated differently on purpose: one variable per placement link (no
node-split vertices); every node's NICs and compute are constraints on the sums of its link flows.

For the flow ``f_l`` on every link ``l = a -> b`` of the placement (tokens/s), with ``tau`` the bytes
of a token id and ``alpha`` the bytes of its activation:

* ``0 <= f_l <= bandwidth(a, b) / tau`` if ``a`` is the source or ``b`` the sink (token ids only),
  else ``bandwidth(a, b) / (tau + alpha)``;
* every compute node ``u``: ``in(u) == out(u)`` (conservation), ``in(u) <= tp(u)`` (the typical
  throughput of its GPU with its layer count; 0 when it holds no layers),
  ``in(u) <= nic_in(u) / tau`` if the source is its only inbound neighbour, else
  ``nic_in(u) / (tau + alpha)``, and ``out(u) <= nic_out(u) / tau`` if the sink is its only outbound
  neighbour, else ``nic_out(u) / (tau + alpha)``;
* the coordinator: ``out(source) <= coordinator_nic_out / tau``, ``in(sink) <= coordinator_nic_in / tau``;
* maximise ``out(source)``.

Solved with HiGHS through cvxpy. cvxpy is a test dependency only (``[dev]``); the package never
imports it.
"""

from __future__ import annotations

from typing import Any

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from helix_async.ids import SINK, SOURCE
from helix_async.model import ThroughputModel
from helix_async.placement import Placement

__all__ = ["max_flow_lp"]


def max_flow_lp(placement: Placement, tm: Any = None, solver: str = "HIGHS") -> float:
    """Max-flow value (tokens/s) of ``placement`` solved as the LP above.

    ``tm`` is anything with ``throughput(gpu, k, *, exceed_profiled_max)`` (tokens/s); by default the
    throughput model of the placement's whole cluster mix.
    """
    spec = placement.model_spec
    cluster = placement.cluster
    if tm is None:
        tm = ThroughputModel.for_cluster(spec, cluster)
    tau = float(spec.token_size)
    hop = float(spec.token_size + spec.activation_size)

    links = sorted(placement.links, key=repr)  # a fixed order, independent of set iteration
    if not links:
        return 0.0
    link_cap = []
    for a, b in links:
        arc = cluster.arc(a, b)
        if arc is None:
            raise ValueError(f"placement link {a}->{b} is not a link of cluster {cluster.name}")
        link_cap.append(arc.bandwidth / (tau if a == SOURCE or b == SINK else hop))

    nodes = sorted({x for link in links for x in link if x not in (SOURCE, SINK)})
    row = {u: j for j, u in enumerate(nodes)}
    preds: dict[Any, set[Any]] = {u: set() for u in nodes}
    succs: dict[Any, set[Any]] = {u: set() for u in nodes}
    for a, b in links:
        if b in preds:
            preds[b].add(a)
        if a in succs:
            succs[a].add(b)
    in_cap, out_cap = [], []
    for u in nodes:
        m = cluster.machine(u)
        r = placement.layers.get(u)
        tp = 0.0 if r is None else float(
            tm.throughput(m.gpu, r[1] - r[0], exceed_profiled_max=placement.exceed_profiled_max)
        )
        nic_in = m.nic_in / (tau if preds[u] == {SOURCE} else hop)
        nic_out = m.nic_out / (tau if succs[u] == {SINK} else hop)
        # in(u) == out(u), so the compute cap can sit on either side
        in_cap.append(min(tp, nic_in))
        out_cap.append(nic_out)

    # Clipping every capacity at an upper bound B of the max-flow value changes nothing (a max flow
    # without cycles carries at most its value on any link) and, scaled by B, keeps the numbers
    # O(1): NIC capacities of ~1e9 tokens/s would otherwise swamp flows of a few tokens/s.
    direct = sum(c for (a, b), c in zip(links, link_cap, strict=True) if a == SOURCE and b == SINK)
    bound = sum(in_cap) + direct
    bound = min(bound, cluster.coordinator_nic_out / tau, cluster.coordinator_nic_in / tau)
    if bound <= 0:
        return 0.0

    n, k = len(nodes), len(links)
    a_in = sp.lil_matrix((n, k))
    a_out = sp.lil_matrix((n, k))
    from_source = np.zeros(k)
    to_sink = np.zeros(k)
    for j, (a, b) in enumerate(links):
        if a == SOURCE:
            from_source[j] = 1.0
        else:
            a_out[row[a], j] = 1.0
        if b == SINK:
            to_sink[j] = 1.0
        else:
            a_in[row[b], j] = 1.0
    a_in, a_out = a_in.tocsr(), a_out.tocsr()

    def clip(xs: list[float]) -> np.ndarray:
        return np.minimum(np.asarray(xs, dtype=float), bound) / bound

    f = cp.Variable(k)
    constraints = [
        f >= 0,
        f <= clip(link_cap),
        from_source @ f <= clip([cluster.coordinator_nic_out / tau])[0],
        to_sink @ f <= clip([cluster.coordinator_nic_in / tau])[0],
    ]
    if n:
        constraints += [a_in @ f == a_out @ f, a_in @ f <= clip(in_cap), a_out @ f <= clip(out_cap)]
    problem = cp.Problem(cp.Maximize(from_source @ f), constraints)
    problem.solve(solver=solver)
    if problem.status != "optimal":
        raise RuntimeError(f"max-flow LP ended with status {problem.status}")
    return float(problem.value) * bound
