"""The tier's check fails when a host read enters the hot path, or when the fix
silently stops running: shown by planting each one deliberately."""

import pytest
import torch
import torch.nn.functional as F

from attnpatch import masks

from .probe import BRANCHES, assert_no_new_host_reads, cuda_branch, fake_mode, general_path


def _sdpa_call(device):
    """A call with a mask built afresh each time (so no cached answer hides the path)."""
    q = torch.randn(2, 2, 4, 8, device=device)
    return lambda: F.scaled_dot_product_attention(
        q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool, device=device).tril(-1)
    )


def _plant_item(monkeypatch):
    """``rows.any().item()`` in row detection, inside the wrapper's try: on fake
    tensors it raises and the wrapper falls back, so only the record shows it."""
    original = masks.fully_masked_rows

    def with_host_read(mask, **kwargs):
        rows = original(mask, **kwargs)
        rows.any().item()
        return rows

    monkeypatch.setattr(masks, "fully_masked_rows", with_host_read)


def _plant_boolean_index(monkeypatch):
    """A boolean index where the output is cleared, read then written: the size
    of ``out[flagged]`` is the number of flagged rows, a hidden nonzero() on any
    torch. (Writing a scalar alone, ``out[flagged] = 0.0``, is no host read on
    torch 2.15, which runs it as masked_fill_.)"""

    def clear(out, rows, fill=None, keepdim=False):
        flagged = (rows[..., 0] if keepdim else rows).expand(out.shape[:-1])
        out[flagged] = torch.zeros_like(out[flagged])
        return out

    monkeypatch.setattr(masks, "clear_result_rows", clear)


@pytest.mark.parametrize("plant", [_plant_item, _plant_boolean_index], ids=["item", "boolean-index"])
@pytest.mark.parametrize("device", BRANCHES)
def test_check_fails_on_a_host_read(monkeypatch, plant, device):
    if device == "fake-cuda":
        with fake_mode():
            run = _sdpa_call("cuda")
            assert_no_new_host_reads(run, "sdpa")  # clean before planting
            plant(monkeypatch)
            with pytest.raises((AssertionError, RuntimeError)) as failure:
                assert_no_new_host_reads(run, "sdpa")
    else:
        run = _sdpa_call("cpu")
        with general_path():
            assert_no_new_host_reads(run, "sdpa")
            plant(monkeypatch)
            with pytest.raises(AssertionError) as failure:
                assert_no_new_host_reads(run, "sdpa")
    if failure.type is AssertionError:
        assert "added host reads" in str(failure.value)


@pytest.mark.parametrize("branch", BRANCHES)
def test_check_fails_when_the_fix_falls_back(monkeypatch, branch):
    def broken(*args, **kwargs):
        raise RuntimeError("e.g. an op the device does not support")

    with cuda_branch(branch) as device:
        run = _sdpa_call(device)
        assert_no_new_host_reads(run, "sdpa")  # the fix runs before breaking it
        monkeypatch.setattr(masks, "fully_masked_rows", broken)
        with pytest.raises(AssertionError, match="did not run"):
            assert_no_new_host_reads(run, "sdpa")
