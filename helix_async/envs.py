"""The one reader of ``os.environ``.

Every variable the package understands is declared here with its type, default and meaning.
Other modules import the values from this module; nothing else touches ``os.environ``.
"""

from __future__ import annotations

import os


def _flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() not in ("0", "false", "no", "off")


# Force the pure-Python twins of every compiled module (also skips building them in setup.py).
HELIX_NO_EXTENSIONS: bool = _flag("HELIX_NO_EXTENSIONS")

# Default log level for the CLI when --log-level is not given (DEBUG, INFO, WARNING, ...).
HELIX_LOG_LEVEL: str = os.environ.get("HELIX_LOG_LEVEL", "WARNING")

# Directory for plans, reports and logs written by the CLI when no --out is given.
HELIX_OUT_DIR: str = os.environ.get("HELIX_OUT_DIR", "out")

# Directory of the profiles measured on this machine (``profile`` writes <dir>/<model key>/ there;
# the planner and simulator read them before the shipped and analytical ones).
HELIX_PROFILE_DIR: str = os.environ.get("HELIX_PROFILE_DIR", os.path.join(HELIX_OUT_DIR, "profiles"))
