"""The serving runtime: the host and worker processes over ZeroMQ (``python -m helix_async host|worker``).

:mod:`.host_main` (the coordinator process: registration, assignment, the Python request API,
failures, shutdown), :mod:`.worker_main` (a compute node process: registration, executor, the
simulator's own ``Worker`` class on the real clock), :mod:`.commands` (their command lines, trace
replay), :mod:`.http_api` (the HTTP front door handed the host), :mod:`.serve` (host, workers and
front door on one machine).  The runtime may import :mod:`helix_async.frontend`, never the other
way.  Nothing here imports ``sim``; torch only in the executors.
"""
