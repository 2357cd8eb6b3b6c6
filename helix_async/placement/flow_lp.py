"""Max flow as a linear program in cvxpy: an independent second backend to cross-check networkx.

The same graph as :func:`helix_async.flow.build_flow_graph`, written as the textbook LP
(maximise the flow out of the source subject to capacities and conservation) and solved with
HiGHS through cvxpy. Slower than networkx; used by tests and for comparisons, never on a hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .flow import build_flow_graph

if TYPE_CHECKING:
    from .model import ThroughputModel
    from .placement import Placement


def max_flow_lp(placement: Placement, tm: ThroughputModel | None = None, solver: str = "HIGHS") -> float:
    """Max-flow value (tokens/s) of ``placement`` solved as an LP with cvxpy (HiGHS by default)."""
    import cvxpy as cp
    import numpy as np

    g = build_flow_graph(placement, tm)
    edges = list(g.edges(data="capacity"))
    index = {v: i for i, v in enumerate(g.nodes)}
    n, m = len(index), len(edges)
    if m == 0:
        return 0.0
    cap = np.array([float(c) for _, _, c in edges])
    # No flow exceeds the sum of the compute edges' capacities, so larger capacities (NICs of
    # 1e10 B/s) are clipped to it; then scale to O(1): otherwise a node's few hundred tokens/s
    # would sit below the solver's feasibility tolerance relative to the NIC numbers.
    compute = [float(c) for u, v, c in edges if str(u).endswith("_start") and str(v).endswith("_end")]
    scale = max(sum(compute), 1e-9)
    cap = np.minimum(cap, scale)
    inc = np.zeros((n, m))
    for j, (u, v, _) in enumerate(edges):
        inc[index[u], j] -= 1.0
        inc[index[v], j] += 1.0
    inner = [index[v] for v in g.nodes if v not in ("source", "sink")]
    f = cp.Variable(m)
    out_of_source = [j for j, (u, _, _) in enumerate(edges) if u == "source"]
    constraints = [f >= 0, f <= cap / scale]
    if inner:
        constraints.append(inc[inner, :] @ f == 0)
    problem = cp.Problem(cp.Maximize(cp.sum(f[out_of_source])), constraints)
    problem.solve(solver=solver)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"max-flow LP ended with status {problem.status}")
    return float(problem.value) * scale
