"""Test configuration: deterministic hypothesis runs (same examples every run); the shared
``loop`` fixture (a fresh VirtualTimeLoop, closed afterwards)."""

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from helix_async.vloop import VirtualTimeLoop

settings.register_profile(
    "helix",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("helix")


@pytest.fixture
def loop() -> Iterator[VirtualTimeLoop]:
    lp = VirtualTimeLoop()
    try:
        yield lp
    finally:
        lp.close()
