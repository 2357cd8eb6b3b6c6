"""helix_async: serve LLMs over heterogeneous, geo-distributed GPU clusters.

Placement by MILP (PySCIPOpt) and heuristics, max-flow routing weights, IWRR request routing,
and one asyncio host/worker codebase that runs in real time (ZeroMQ) or virtual time (simulator).
Follows Helix (Mei et al., ASPLOS'25, arXiv 2406.01566).
"""

__version__ = "0.1.0"
