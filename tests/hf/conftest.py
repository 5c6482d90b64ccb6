import pytest

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")

import attnpatch  # noqa: E402


@pytest.fixture(autouse=True)
def _no_patch_leaks():
    """Every test starts and ends with attnpatch fully off."""
    attnpatch.remove()
    yield
    attnpatch.remove()
    assert all(entry["state"] == "off" for entry in attnpatch.status().values())
