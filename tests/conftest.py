import os
import sys
import zlib

import pytest
from hypothesis import HealthCheck, settings

import attnpatch

# ATTNPATCH_HYPOTHESIS_PROFILE=long runs thousands of examples per property test.
settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
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


@pytest.fixture(autouse=True)
def _torch_seed(request):
    """Every test starts from its own torch seed, whatever ran before it: torch's
    global generator (seeded at random per process) is not carried from test to
    test, so a test's values do not depend on which tests ran before it. Under
    pytest-randomly the seed also follows ``--randomly-seed``, so that a failure
    is replayed by passing the seed the run printed."""
    torch = sys.modules.get("torch")
    if torch is not None:
        base = request.config.getoption("randomly_seed", None)
        base = base if isinstance(base, int) else 0
        seed = (base + zlib.crc32(request.node.nodeid.encode())) % 2**63
        # Not torch.manual_seed: it imports torch._dynamo on first use, which a
        # pytester fixture set up before this one would then drop from
        # sys.modules at teardown (its snapshot), and importing it again fails.
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed of a failed run at its end, also under ``-q`` (where pytest prints no
    header): the test order and every test's random seeds follow from it."""
    seed = config.getoption("randomly_seed", None)
    if exitstatus not in (0, 5) and isinstance(seed, int):
        terminalreporter.write_line(
            f"to replay this test order and these seeds, run pytest with --randomly-seed={seed}"
        )
