"""Logger ``attnpatch`` and AttnPatchWarning: one warning when a target cannot be
installed, never one per call."""

import logging
import warnings

import pytest

import attnpatch
from attnpatch import AttnPatchWarning
from tests.fake_target import fake_target


def test_a_target_that_cannot_be_installed_warns_once_and_says_why():
    with fake_target(missing=True) as (name, _):
        with pytest.warns(AttnPatchWarning, match="not found in this version") as first:
            attnpatch.apply([name])
        assert len([w for w in first if w.category is AttnPatchWarning]) == 1
        assert attnpatch.status()[name]["state"] == "skipped"
        assert "not found in this version" in attnpatch.status()[name]["points"][0]["note"]
        attnpatch.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second warning would raise here
            attnpatch.apply([name])
            with attnpatch.patched([name]):
                pass
            attnpatch.remove()


def test_patched_calls_never_warn_or_log():
    torch = pytest.importorskip("torch")
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    pad = torch.tensor([[True, True, False, False], [False] * 4])
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record) if record.levelno >= logging.INFO else None
    logging.getLogger("attnpatch").addHandler(handler)
    try:
        with attnpatch.patched():
            mha(x, x, x, key_padding_mask=pad, attn_mask=causal)  # first call: one-time setup may log
            records.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for _ in range(5):
                    out, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=causal)
                    assert not out.isnan().any()
    finally:
        logging.getLogger("attnpatch").removeHandler(handler)
    assert records == []


def test_wrapper_of_an_installed_fake_target_works_and_is_removed():
    # Guards the helper itself: the tests above would pass vacuously if the
    # fake target never installed.
    with fake_target(missing=False) as (name, library):
        original = library.function
        with attnpatch.patched([name]):
            assert library.function(1) == 20
        assert library.function is original
