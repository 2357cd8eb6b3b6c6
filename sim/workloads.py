"""The workloads the simulator serves: :mod:`helix_async.workloads` (the runtime's host serves the
same ones, and the runtime never imports ``sim``), re-exported here under their simulator name."""

from helix_async.workloads import *  # noqa: F403
from helix_async.workloads import __all__  # noqa: F401
