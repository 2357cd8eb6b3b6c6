"""The serving runtime: the host and worker processes over ZeroMQ (``python -m helix_async host|worker``).

:mod:`.host_main` (the coordinator process: registration, assignment, the Python request API,
trace replay, failures, shutdown), :mod:`.worker_main` (a compute node process: registration,
executor, the simulator's own ``Worker`` class on the real clock), :mod:`.commands` (their command
lines).  Nothing here imports ``sim``; torch only in the executors.
"""
