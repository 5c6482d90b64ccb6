import os

import pytest
from hypothesis import HealthCheck, settings

import attnpatch

settings.register_profile(
    "ci", max_examples=120, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=5000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("ATTNPATCH_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _no_patch_leaks():
    """Every test starts and ends with attnpatch fully off."""
    attnpatch.remove()
    yield
    attnpatch.remove()
    assert all(entry["state"] in ("off", "displaced") or entry["holders"] == 0 for entry in attnpatch.status().values())
