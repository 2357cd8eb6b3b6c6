"""The simulator: the runtime's host and workers on a virtual-time loop (docs/original.md §8, §9).

``simulation`` assembles host, workers and the in-memory network; ``workloads`` makes queries
(offline lengths, online traces, CSV replay); ``feeders`` submits them; ``runner`` runs one
simulation; ``report`` computes its figures; ``cli`` is ``python -m sim``.  The runtime
(``helix_async``) never imports this package.
"""
