"""Transports: how host and workers hand messages to each other.

``base`` defines the :class:`Transport` interface; ``memory`` is the simulated network (virtual
time, bandwidth and latency from the cluster file).  The ZeroMQ transport lives in ``zmq`` (the
runtime issue) and is the only module that imports pyzmq.
"""

from .base import HOST, Handler, Transport, TransportError

__all__ = ["HOST", "Handler", "Transport", "TransportError"]
