"""Test configuration: deterministic hypothesis runs (same examples every run)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "helix",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("helix")
