"""The general path (CUDA's and torch.compile's: no value read on the host),
forced on CPU with ``masks.FORCE_GENERAL_PATH``, is exact: with a NaN-producing
kernel underneath, fully masked rows are 0 and every other row is bitwise the
unpatched one, in forward and backward; and for every target it returns bitwise
what the CPU path (checked against the contract by the other tests) returns."""

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch
from attnpatch import masks

from .helpers import causal_drop_mask, has_nan, left_padded_keep_mask, left_padding, naive_sdpa, to_float_mask

B, H, L, D, E = 2, 2, 5, 8, 16
BITWISE_FROM = masks._BITWISE_FROM
LENGTHS = [3, 5]


@pytest.fixture(params=["masked_fill_", "bitwise"])
def general(request, monkeypatch):
    """The general path, with each way it clears a result in place (outputs this
    small take masked_fill_; large ones, the bitwise multiply)."""
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", True)
    monkeypatch.setattr(masks, "_BITWISE_FROM", 0 if request.param == "bitwise" else 1 << 40)


def _qkv(grad, q_len=L):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=gen).requires_grad_(grad) for n in (q_len, L, L)]


def _keep(shape):
    """A keep mask of ``shape`` with fully masked rows."""
    if shape == (L, L):
        return torch.ones(L, L, dtype=torch.bool).tril(-1)  # row 0 admits no key
    if shape == (B, 1, 1, L):  # one decode step: batch element 0 is all padding
        return torch.stack([torch.arange(L) < 0, torch.arange(L) >= 2]).view(B, 1, 1, L)
    keep = left_padded_keep_mask(LENGTHS, L)
    if shape == (B, H, L, L):
        keep = keep.expand(B, H, L, L).clone()
        keep[1, 1, 3] = False  # a row masked in one head only
    return keep


@pytest.mark.parametrize("grad", [False, True], ids=["no backward", "backward"])
@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("shape", [(B, 1, L, L), (L, L), (B, H, L, L), (B, 1, 1, L)], ids=str)
def test_sdpa_with_nan_kernel(monkeypatch, general, shape, float_mask, grad):
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    keep = _keep(shape)
    mask = to_float_mask(keep) if float_mask else keep
    q, k, v = _qkv(grad, keep.shape[-2])
    unpatched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = keep.logical_not().all(-1).expand(B, H, keep.shape[-2])
    assert has_nan(unpatched), "the stand-in kernel shows the bug"
    with attnpatch.patched("sdpa"):
        patched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))
    assert torch.equal(patched[~rows], unpatched[~rows])
    if grad:
        patched.sum().backward()
        assert not has_nan(q.grad, k.grad, v.grad)
        assert torch.equal(q.grad[rows], torch.zeros_like(q.grad[rows]))


def _both_paths(run):
    """``run()`` patched on the CPU path and on the general path (results cleared
    bitwise, as large ones are; the ``general`` fixture's tests take both ways)."""
    with attnpatch.patched():
        cpu = run()
        masks.FORCE_GENERAL_PATH, masks._BITWISE_FROM = True, 0
        try:
            general = run()
        finally:
            masks.FORCE_GENERAL_PATH, masks._BITWISE_FROM = False, BITWISE_FROM
    return cpu, general


def _assert_same(cpu, general):
    cpu, general = torch.utils._pytree.tree_leaves(cpu), torch.utils._pytree.tree_leaves(general)
    assert len(cpu) == len(general)
    for a, b in zip(cpu, general):
        if a is None:
            assert b is None
            continue
        assert not has_nan(b)
        assert torch.equal(a, b)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval", "fast path"])
@pytest.mark.parametrize("per_head", [False, True])
def test_mha_general_path_equals_cpu_path(mode, need_weights, per_head):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).train(mode == "train")
    x = torch.randn(B, L, E, requires_grad=mode != "fast path")
    pad, causal = left_padding(LENGTHS, L), causal_drop_mask(L)
    attn = causal.expand(B * H, L, L) if per_head else causal

    def run():
        with torch.set_grad_enabled(mode != "fast path"):
            out, weights = mha(x, x, x, key_padding_mask=pad, attn_mask=attn, need_weights=need_weights)
            if mode == "fast path":
                return out, weights
            return out, weights, torch.autograd.grad(out.sum(), [x, *mha.parameters()])

    _assert_same(*_both_paths(run))


def test_encoder_general_path_equals_cpu_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(B, L, E)
    pad, causal = left_padding(LENGTHS, L), causal_drop_mask(L)

    def run():
        with torch.no_grad():
            return encoder(x, mask=causal, src_key_padding_mask=pad)

    _assert_same(*_both_paths(run))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train", [False, True])
def test_tiny_models_general_path_equals_cpu_path(attn, train):
    pytest.importorskip("transformers")
    from tests.hf.helpers import left_padded, tiny_model

    ids, mask = left_padded([[5, 6, 7, 8], [9, 10], [11]])
    model = tiny_model("llama", attn)

    def run():
        with torch.set_grad_enabled(train):
            logits = model(input_ids=ids, attention_mask=mask).logits
            if not train:
                return logits
            return logits, torch.autograd.grad(logits.sum(), list(model.parameters()))

    _assert_same(*_both_paths(run))


@pytest.mark.parametrize("given", ["attn_mask", "key_padding_mask", "both"])
def test_mha_training_with_nan_kernel_never_changes_the_callers_masks(monkeypatch, general, given):
    """MHA's SDPA path (need_weights=False) with a NaN kernel underneath. A mask
    MHA merges during the call is made safe in place; the caller's own masks,
    which MHA may hand to SDPA as views, must come back unchanged."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, bias=False)
    x = torch.randn(B, L, E, requires_grad=True)
    attn = to_float_mask(torch.ones(L, L, dtype=torch.bool).tril(-1)) if given != "key_padding_mask" else None
    pad = torch.zeros(B, L).masked_fill(left_padding([0, 5] if given == "key_padding_mask" else LENGTHS, L), -torch.inf)
    pad = pad if given != "attn_mask" else None
    given_masks = [m for m in (attn, pad) if m is not None]
    before = [m.clone() for m in given_masks]
    combined = (attn if attn is not None else 0) + (pad[:, None, :] if pad is not None else torch.zeros(B, 1, L))
    rows = (combined == -torch.inf).all(-1).expand(B, L)  # queries with no key

    def step():
        out, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=attn, need_weights=False)
        grads = torch.autograd.grad(out.sum(), [x, *mha.parameters()])
        return out, grads

    assert has_nan(*step()[1]), "the stand-in kernel shows the bug"
    with attnpatch.patched("mha"):
        out, grads = step()
    assert rows.any()
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))  # out_proj(0) without a bias
    assert not has_nan(out, *grads)
    for mask, saved in zip(given_masks, before):
        assert torch.equal(mask, saved), "the caller's mask was changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_shared_by_the_layers_of_a_forward_costs_later_calls_one_pass(monkeypatch, dtype):
    """Every layer of a forward passes the same mask: the first SDPA call finds
    its rows and builds the kept-row flags, in the integer dtype that multiplies
    the output's bits; each later call dispatches exactly what the unpatched call
    and that one multiply by hand do (no pass over the mask, no cast of the flags)."""
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", True)
    monkeypatch.setattr(masks, "_BITWISE_FROM", 0)
    q, k, v = (t.to(dtype) for t in _qkv(False))
    mask = _keep((B, 1, L, L))
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    kept = mask.any(-1, keepdim=True).to(bits)

    def ops_of(call):
        # The profiler, not a dispatch mode: it also sees the ops a kernel runs
        # below the dispatcher's Python key, such as the copy that casts an operand.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            call()
        return collections.Counter(event.name for event in profile.events())

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    by_hand = ops_of(lambda: sdpa().view(bits).mul_(kept))
    with attnpatch.patched("sdpa"):
        first, later = ops_of(sdpa), ops_of(sdpa)
    assert "aten::amax" in first - by_hand
    assert later == by_hand
