"""Test configuration: deterministic hypothesis runs (same examples every run); the shared
``loop`` fixture (a fresh VirtualTimeLoop, closed afterwards); a user profile directory of the
suite's own (empty), so a developer's measured profiles never change what a test sees."""

import os
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# before helix_async.envs is imported (it reads the environment once); started processes inherit it
os.environ["HELIX_PROFILE_DIR"] = tempfile.mkdtemp(prefix="helix-test-profiles-")

from helix_async.vloop import VirtualTimeLoop  # noqa: E402

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
