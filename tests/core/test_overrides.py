"""torch's override protocol (``__torch_function__`` subclasses and modes) sees
exactly what it sees without attnpatch, and the fix still reaches the call back.

PyTorch's own attention-bias API is such a subclass: ``CausalBias`` recognises
the SDPA call by ``func is torch.nn.functional.scaled_dot_product_attention``.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import bias as attention_bias
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.overrides import TorchFunctionMode

import attnpatch

from .helpers import causal_drop_mask, has_nan, left_padding

SHAPES = [(4, 8), (8, 4), (6, 6)]  # (L, S): fewer, more and as many queries as keys


def _qkv(seq_q, seq_kv, requires_grad=False):
    torch.manual_seed(0)
    q = torch.randn(2, 3, seq_q, 8, requires_grad=requires_grad)
    k = torch.randn(2, 3, seq_kv, 8, requires_grad=requires_grad)
    v = torch.randn(2, 3, seq_kv, 8, requires_grad=requires_grad)
    return q, k, v


def _attend(bias, q, k, v, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower-right with L > S warns "will produce NaNs"
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias(q.shape[-2], k.shape[-2]), **kwargs)


@pytest.mark.parametrize("seq_q, seq_kv", SHAPES)
@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right])
def test_causal_bias_gives_pytorchs_own_result(bias, seq_q, seq_kv):
    q, k, v = _qkv(seq_q, seq_kv, requires_grad=True)
    expected = _attend(bias, q, k, v)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    with attnpatch.patched():
        got = _attend(bias, q, k, v)
        grads = torch.autograd.grad(got.sum(), (q, k, v))
    assert type(got) is type(expected)
    assert torch.equal(got, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right])
def test_causal_bias_with_is_causal_raises_pytorchs_error(bias):
    q, k, v = _qkv(4, 8)
    with pytest.raises(ValueError) as unpatched:
        _attend(bias, q, k, v, is_causal=True)
    with attnpatch.patched(), pytest.raises(ValueError) as patched:
        _attend(bias, q, k, v, is_causal=True)
    assert str(patched.value) == str(unpatched.value)


def _nan_efficient_kernel(query, key, value, *args, custom_mask_type=None, scale=None, **kwargs):
    """A stand-in for CUDA's memory-efficient kernel that CausalBias calls directly
    for lower-right masks: (B, L, H, D) layout, NaN on rows that see no key."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    seq_q, seq_kv = q.shape[-2], k.shape[-2]
    keep = torch.ones(seq_q, seq_kv, dtype=torch.bool).tril(seq_kv - seq_q)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    out = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v
    return (out.transpose(1, 2), None, None, None)


def test_lower_right_bias_rows_without_keys_are_zero_on_the_direct_kernel_path(monkeypatch):
    """With L > S, lower-right leaves the first L - S queries no key. PyTorch warns
    it "will produce NaNs" where it calls the fused kernel directly (CUDA). The
    output rows are cleared after the kernel; its backward is the kernel's own
    (README, Limits), so this checks the forward."""
    monkeypatch.setattr(attention_bias, "can_use_flash_attention", lambda params, debug=False: False)
    monkeypatch.setattr(attention_bias, "can_use_efficient_attention", lambda params, debug=False: True)
    monkeypatch.setattr(torch.ops.aten, "_efficient_attention_forward", _nan_efficient_kernel)
    q, k, v = _qkv(8, 4)
    expected = _attend(causal_lower_right, q, k, v)
    assert expected[:, :, :4].isnan().all()  # the bug, without attnpatch
    with attnpatch.patched():
        got = _attend(causal_lower_right, q, k, v)
    assert torch.equal(got[:, :, :4], torch.zeros_like(got[:, :, :4]))
    assert torch.equal(got[:, :, 4:], expected[:, :, 4:])


class _Recorder(TorchFunctionMode):
    """Records every call the protocol hands it, and whether ``func`` is the
    object the public name has at that moment."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        self.calls.append((name, func is getattr(F, name, func) or func is getattr(torch, name, func)))
        return func(*args, **(kwargs or {}))


def _mha_call():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    pad = left_padding([3, 5], 5)
    return mha, x, pad


def test_a_mode_sees_the_same_calls_and_the_fix_still_applies():
    mha, x, pad = _mha_call()
    with _Recorder() as unpatched:
        expected, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=causal_drop_mask(5))
    assert has_nan(expected)  # the bug, under a mode too
    with attnpatch.patched(), _Recorder() as patched:
        got, weights = mha(x, x, x, key_padding_mask=pad, attn_mask=causal_drop_mask(5))
    assert patched.calls == unpatched.calls
    assert ("multi_head_attention_forward", True) in patched.calls
    assert not has_nan(got, weights)
    assert torch.equal(got[~pad], expected[~pad])


def test_sdpa_under_a_mode_receives_the_public_function():
    q, k, v = _qkv(4, 4)
    keep = torch.tensor([[False] * 4, [True, False, False, False], [True] * 4, [True] * 4])
    with _Recorder() as unpatched:
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    with attnpatch.patched(), _Recorder() as patched:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert patched.calls == unpatched.calls == [("scaled_dot_product_attention", True)]
    assert torch.equal(got, expected)


def test_the_device_context_manager_keeps_the_fix():
    """``with torch.device(...)`` is a TorchFunctionMode users wrap whole scripts in."""
    mha, x, pad = _mha_call()
    with attnpatch.patched():
        outside, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=causal_drop_mask(5))
        with torch.device("cpu"):
            inside, weights = mha(x, x, x, key_padding_mask=pad, attn_mask=causal_drop_mask(5))
    assert not has_nan(inside, weights)
    assert torch.equal(inside, outside)


class _Logged(torch.Tensor):
    """A user's subclass: logs each torch function it takes part in."""

    log: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.log.append(getattr(func, "__name__", repr(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_subclass_sees_the_same_calls_and_result_type():
    mha, x, pad = _mha_call()
    logged = x.detach().as_subclass(_Logged)
    _Logged.log = []
    expected, _ = mha(logged, logged, logged, key_padding_mask=pad, attn_mask=causal_drop_mask(5))
    unpatched_log, _Logged.log = _Logged.log, []
    with attnpatch.patched():
        got, weights = mha(logged, logged, logged, key_padding_mask=pad, attn_mask=causal_drop_mask(5))
    assert _Logged.log == unpatched_log
    assert has_nan(expected)
    assert type(got) is type(expected) is _Logged
    assert not has_nan(got, weights)  # the handler's call back got the fix
    assert torch.equal(got.as_subclass(torch.Tensor)[~pad], expected.as_subclass(torch.Tensor)[~pad])


def test_nested_jagged_sdpa_as_without_attnpatch():
    """NestedTensor's handler recognises SDPA by ``func is torch._C._nn.scaled_dot_product_attention``."""
    torch.manual_seed(0)
    rows = [torch.randn(3, 2, 8), torch.randn(5, 2, 8)]
    q = torch.nested.as_nested_tensor(rows, layout=torch.jagged).transpose(1, 2)
    try:
        expected = F.scaled_dot_product_attention(q, q, q)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch cannot run jagged SDPA on CPU without attnpatch either: {exc}")
    with attnpatch.patched():
        got = F.scaled_dot_product_attention(q, q, q)
    assert type(got) is type(expected)
    for got_row, expected_row in zip(got.unbind(), expected.unbind()):
        assert torch.equal(got_row, expected_row)


def test_both_names_get_one_wrapper_and_are_restored():
    original = F.scaled_dot_product_attention
    assert torch._C._nn.scaled_dot_product_attention is original
    with attnpatch.patched("sdpa"):
        assert F.scaled_dot_product_attention is not original
        assert torch._C._nn.scaled_dot_product_attention is F.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original
    assert torch._C._nn.scaled_dot_product_attention is original


def test_the_native_fast_path_kernel_under_a_mode_calls_back_into_the_fix():
    """PyTorch's binding would hand a mode ``torch._C._VariableFunctions``'
    kernel, which attnpatch cannot replace; it hands the patched name instead,
    so the mode's call back is fixed (this is how AOT tracing records it)."""
    mha, x, pad = _mha_call()
    mha.eval()
    args = (
        x.detach(),
        x.detach(),
        x.detach(),
        mha.embed_dim,
        mha.num_heads,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.out_proj.weight,
        mha.out_proj.bias,
        (causal_drop_mask(5) | pad[:, None, None, :]).expand(2, 2, 5, 5),
    )
    with torch.no_grad():
        with _Recorder() as unpatched:
            expected, _ = torch._native_multi_head_attention(*args, need_weights=False, mask_type=2)
        assert has_nan(expected)
        with attnpatch.patched(), _Recorder() as patched:
            got, _ = torch._native_multi_head_attention(*args, need_weights=False, mask_type=2)
    assert [name for name, _ in patched.calls] == [name for name, _ in unpatched.calls]
    assert ("_native_multi_head_attention", True) in patched.calls
    assert not has_nan(got)
    assert torch.equal(got[~pad], expected[~pad])
