import os

import pytest
from hypothesis import HealthCheck, settings

import attnpatch

# ATTNPATCH_HYPOTHESIS_PROFILE=long runs thousands of examples per property test.
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
    """Every test starts and ends with attnpatch fully off (a point another
    library displaced stays 'displaced': that is the state it reports)."""
    attnpatch.remove()
    yield
    attnpatch.remove()
    assert all(
        entry["holders"] == 0 and entry["state"] in ("off", "displaced") or entry["state"] == "off"
        for entry in attnpatch.status().values()
    )
