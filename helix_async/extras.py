"""Optional dependencies, imported only where they are used, with a one-line error naming the extra.

The base install is what a worker and the host need to serve and to re-plan flows (numpy, msgpack,
pyzmq, uvloop, networkx). The MILP planner (SCIP), plots and the torch executor come with extras:
``pip install 'helix_async[plan]'``, ``[plots]``, ``[torch]`` (or ``[all]``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``; MissingExtraError naming ``pip install 'helix_async[extra]'`` if absent."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        if exc.name is not None and exc.name != top and not exc.name.startswith(top + "."):
            raise  # the module is there but one of its own imports failed: show that, unchanged
        raise MissingExtraError(
            f"{module} is not installed; install the {extra!r} extra: pip install 'helix_async[{extra}]'"
        ) from None
