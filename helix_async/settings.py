"""Settings objects: each owns its defaults, once.

The CLI builds these from its flags and passes them down; library code takes a settings object
instead of restating a default or a long keyword list. A settings object is a frozen value: to
change one field, ``dataclasses.replace`` it.

Sections below belong to the parts that read them (KV expectation: admission, planner and
simulator alike; search: the planners; simulation: the served planner's simulations and the
simulator's CLI; worker and host: the runtime's processes).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["KVExpectation", "KV_OFFLINE", "KV_ONLINE", "kv_for_mode"]


# --- KV expectation (admission) -------------------------------------------------------------------


class KVExpectation(NamedTuple):
    """The host's KV expectation at admission (docs/runtime.md, "Admission").

    fill_limit: the share of a node's KV cache that admitted work may be expected to fill (0, 1].
    output_ratio: the share of a request's output the admission expects it to still generate,
    as a fraction of the mean output length (0 < ratio).

    A NamedTuple, so it unpacks as the ``(fill limit, ratio)`` pair the routers take.
    """

    fill_limit: float
    output_ratio: float

    def __str__(self) -> str:
        return f"{self.fill_limit:g},{self.output_ratio:g}"


#: Offline (a population kept topped up): fill to 85 % and expect every admitted request to reach
#: the mean output length; the original's offline setting (docs/original.md, KV expectation).
KV_OFFLINE = KVExpectation(0.85, 1.0)
#: Online (arrivals at a rate): fill to 90 %, expect 60 % of the mean output; the original's online
#: setting, and the runtime host's default.
KV_ONLINE = KVExpectation(0.9, 0.6)


def kv_for_mode(mode: str) -> KVExpectation:
    """The default KV expectation of a workload mode (``offline`` or ``online``)."""
    if mode == "offline":
        return KV_OFFLINE
    if mode == "online":
        return KV_ONLINE
    raise ValueError(f"workload mode must be offline or online, got {mode!r}")
