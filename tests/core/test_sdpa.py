"""Target sdpa: F.scaled_dot_product_attention with fully masked rows.

torch's CPU kernels already return 0 there, but several CUDA kernels return
NaN; ``naive_sdpa`` stands in for those kernels underneath the patch."""

import pytest
import torch
import torch.nn.functional as F

import attnpatch

from .helpers import has_nan, left_padded_keep_mask, naive_sdpa, reference_attention, to_float_mask

B, H, L, D = 2, 2, 5, 8


def _qkv(seed=0, dtype=torch.float32, requires_grad=False, kv_heads=H):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=gen, dtype=dtype)
    k = torch.randn(B, kv_heads, L, D, generator=gen, dtype=dtype)
    v = torch.randn(B, kv_heads, L, D, generator=gen, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.fixture
def nan_kernel(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)


@pytest.mark.parametrize("float_mask", [False, True])
def test_nan_kernel_gives_zero_rows_and_identical_valid_rows(nan_kernel, float_mask):
    keep = left_padded_keep_mask([3, 5], L)
    mask = to_float_mask(keep) if float_mask else keep
    q, k, v = _qkv()
    unpatched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert has_nan(unpatched), "the stand-in kernel must show the bug"
    with attnpatch.patched("sdpa"):
        patched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = ~keep.any(-1).expand(B, H, L)
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))
    assert torch.equal(patched[~rows], unpatched[~rows])


def test_nan_kernel_gradients_finite_and_zero_from_masked_rows(nan_kernel):
    keep = left_padded_keep_mask([3, 5], L)
    q, k, v = _qkv(requires_grad=True)
    with attnpatch.patched("sdpa"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    out.sum().backward()
    assert not has_nan(q.grad, k.grad, v.grad)
    rows = ~keep.any(-1).expand(B, H, L)
    assert torch.equal(q.grad[rows], torch.zeros_like(q.grad[rows]))
    # keys/values only receive gradient from rows that may see them
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q2, k2, v2, keep.expand(B, H, L, L))
    ref.sum().backward()
    torch.testing.assert_close(v.grad, v2.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad, k2.grad.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, 0.0, False, scale=0.3), id="positional+scale"
        ),
        pytest.param(
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3), id="keyword+scale"
        ),
        pytest.param(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, :, :, :]), id="view"),
    ],
)
def test_call_shapes_are_preserved(nan_kernel, call):
    keep = left_padded_keep_mask([2, 5], L)
    q, k, v = _qkv()
    unpatched = call(q, k, v, keep)
    with attnpatch.patched("sdpa"):
        patched = call(q, k, v, keep)
    rows = ~keep.any(-1).expand(B, H, L)
    assert torch.equal(patched[~rows], unpatched[~rows])
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))


@pytest.mark.parametrize("mask_shape", [(L, L), (H, L, L), (B, 1, L, L), (B, H, L, L), (B, 1, 1, L)])
def test_broadcast_mask_shapes(nan_kernel, mask_shape):
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(mask_shape, generator=gen) < 0.4
    keep[..., 0, :] = False
    q, k, v = _qkv()
    with attnpatch.patched("sdpa"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    full = keep.expand(B, H, L, L)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, full), atol=1e-5, rtol=1e-5)


def test_enable_gqa():
    keep = left_padded_keep_mask([3, 5], L)
    q, k, v = _qkv(kv_heads=1)
    unpatched = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    with attnpatch.patched("sdpa"):
        patched = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    rows = ~keep.any(-1).expand(B, H, L)
    assert torch.equal(patched[~rows], unpatched[~rows])
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))


def test_dropout_draws_the_same_random_numbers():
    keep = left_padded_keep_mask([3, 5], L)
    q, k, v = _qkv()
    torch.manual_seed(7)
    unpatched = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.5)
    with attnpatch.patched("sdpa"):
        torch.manual_seed(7)
        patched = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.5)
    rows = ~keep.any(-1).expand(B, H, L)
    assert torch.equal(patched[~rows], unpatched[~rows])
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="no-mask"),
        pytest.param({"is_causal": True}, id="is_causal"),
        pytest.param({"attn_mask": torch.full((L, L), -1e9).triu(1)}, id="large-negative"),
        pytest.param({"attn_mask": torch.randn(L, L)}, id="finite-bias"),
    ],
)
def test_rows_finite_without_attnpatch_are_untouched(nan_kernel, kwargs):
    q, k, v = _qkv()
    unpatched = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with attnpatch.patched("sdpa"):
        patched = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(patched, unpatched)


def test_nan_in_inputs_propagates_exactly():
    keep = left_padded_keep_mask([3, 5], L)
    q, k, v = _qkv()
    v[1, 0, 2, 0] = float("nan")
    unpatched = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    with attnpatch.patched("sdpa"):
        patched = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.equal(patched.isnan(), unpatched.isnan()) and has_nan(patched)
    finite = ~unpatched.isnan()
    assert torch.equal(patched[finite], unpatched[finite])


def test_caller_mask_not_mutated(nan_kernel):
    keep = left_padded_keep_mask([3, 5], L)
    before = keep.clone()
    q, k, v = _qkv()
    with attnpatch.patched("sdpa"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.equal(keep, before)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool)),
            id="shape",
        ),
        pytest.param(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(L, L, dtype=torch.int64)),
            id="dtype",
        ),
        pytest.param(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(L, L, dtype=torch.float64)),
            id="float-dtype",
        ),
        pytest.param(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask="mask"), id="not-a-tensor"),
    ],
)
def test_bad_input_raises_pytorchs_own_error(bad):
    q, k, v = _qkv()
    with pytest.raises(Exception) as unpatched:
        bad(q, k, v)
    with attnpatch.patched("sdpa"), pytest.raises(type(unpatched.value)) as patched:
        bad(q, k, v)
    assert str(patched.value) == str(unpatched.value)
