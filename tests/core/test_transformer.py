"""Target transformer (+ mha, sdpa underneath): nn.TransformerEncoderLayer,
nn.TransformerEncoder, nn.TransformerDecoderLayer and nn.Transformer."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch

from .helpers import causal_drop_mask, has_nan, left_padding, naive_sdpa

B, L, E, H, FF = 2, 5, 16, 2, 32
LENGTHS = [3, 5]


def _encoder(layers=2, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _x(seed=1):
    return torch.randn(B, L, E, generator=torch.Generator().manual_seed(seed))


def _masks(float_mask):
    causal, kpm = causal_drop_mask(L), left_padding(LENGTHS, L)
    if float_mask:
        causal = torch.zeros(L, L).masked_fill(causal, float("-inf"))
        kpm = torch.zeros(B, L).masked_fill(kpm, float("-inf"))
    return causal, kpm


def _safe_reference_mask():
    """What the fused kernel is given under attnpatch, built by hand: causal +
    padding per (batch, head), with fully masked rows admitting every key."""
    merged = causal_drop_mask(L)[None] | left_padding(LENGTHS, L)[:, None, :]
    merged = merged & ~merged.all(-1, keepdim=True)
    return merged.repeat_interleave(H, dim=0)  # (B*H, L, L)


@pytest.mark.parametrize("float_mask", [False, True])
@pytest.mark.parametrize("module", ["layer", "encoder"])
def test_inference_fast_path_no_nan_and_valid_rows_bitwise(float_mask, module):
    enc = _encoder().eval()
    net = enc.layers[0] if module == "layer" else enc
    x = _x()
    causal, kpm = _masks(float_mask)
    kwargs = dict(src_key_padding_mask=kpm)
    kwargs["src_mask" if module == "layer" else "mask"] = causal
    with torch.no_grad():
        unpatched = net(x, **kwargs)
        assert has_nan(unpatched), "the fused kernel shows the bug"
        with attnpatch.patched("transformer"):
            patched = net(x, **kwargs)
        reference_kwargs = {("src_mask" if module == "layer" else "mask"): _safe_reference_mask()}
        reference = net(x, **reference_kwargs)
    assert not has_nan(patched)
    valid = ~left_padding(LENGTHS, L)
    assert torch.equal(patched[valid], reference[valid])
    # attention cannot be zeroed inside the fused kernel: the layer's row is 0
    assert torch.equal(patched[~valid], torch.zeros_like(patched[~valid]))
    if module == "layer":  # one layer: the valid rows are finite without attnpatch too
        assert torch.equal(patched[valid], unpatched[valid])


def test_fused_kernel_is_still_used(monkeypatch):
    calls = []
    real = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = _encoder().eval()
    causal, kpm = _masks(False)
    with torch.no_grad(), attnpatch.patched("transformer"):
        enc(_x(), mask=causal, src_key_padding_mask=kpm)
    assert calls == [1, 1]


def test_training_path_with_nan_kernel_has_finite_gradients(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    enc = _encoder().train()
    x = _x().requires_grad_()
    causal, kpm = _masks(False)
    loss = enc(x, mask=causal, src_key_padding_mask=kpm)[~kpm].sum()
    loss.backward()
    assert has_nan(x.grad)
    x.grad = None
    enc.zero_grad()
    with attnpatch.patched():
        out = enc(x, mask=causal, src_key_padding_mask=kpm)
        out[~kpm].sum().backward()
    assert not has_nan(out, x.grad, *[p.grad for p in enc.parameters()])


@pytest.mark.parametrize("train", [True, False])
def test_decoder_layer_and_transformer_with_nan_kernel(monkeypatch, train):
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    torch.manual_seed(0)
    model = nn.Transformer(E, H, 1, 1, FF, dropout=0.0, batch_first=True).train(train)
    src, tgt = _x(1), _x(2).requires_grad_(train)
    causal, kpm = _masks(False)
    kwargs = dict(
        src_mask=causal,
        tgt_mask=causal,
        src_key_padding_mask=kpm,
        tgt_key_padding_mask=kpm,
        memory_key_padding_mask=kpm,
    )
    with torch.set_grad_enabled(train):
        assert has_nan(model(src, tgt, **kwargs))
        with attnpatch.patched():
            out = model(src, tgt, **kwargs)
            if train:
                out[~kpm].sum().backward()
    assert not has_nan(out)
    if train:
        assert not has_nan(tgt.grad, *[p.grad for p in model.parameters()])


def test_decoder_layer_directly(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=True)
    tgt, memory = _x(1), _x(2)
    causal, kpm = _masks(False)
    assert has_nan(layer(tgt, memory, tgt_mask=causal, tgt_key_padding_mask=kpm))
    with attnpatch.patched():
        out = layer(tgt, memory, tgt_mask=causal, tgt_key_padding_mask=kpm)
    assert not has_nan(out)


def test_inference_fast_path_row_masked_in_one_head_only():
    """A per-head src_mask ((B*H, L, S)) that masks a query row in one head but
    not the other: the fused layer mixes the heads, so the whole row is NaN
    without attnpatch; with it the row is 0 and every other row bitwise."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True).eval()
    x = torch.randn(B, L, E)
    mask = torch.zeros(B * H, L, L, dtype=torch.bool)
    mask[0, 1] = True  # batch 0, head 0, query 1: no key; head 1 sees every key
    kpm = torch.zeros(B, L, dtype=torch.bool)  # with it, the fused kernel gets the merged per-head mask
    with torch.no_grad():
        plain = layer(x, src_mask=mask, src_key_padding_mask=kpm)
        assert plain[0, 1].isnan().all() and not has_nan(plain[1])  # the bug, without attnpatch
        with attnpatch.patched("transformer"):
            out = layer(x, src_mask=mask, src_key_padding_mask=kpm)
    assert torch.equal(out[0, 1], torch.zeros(E))
    rows = torch.ones(B, L, dtype=torch.bool)
    rows[0, 1] = False
    assert torch.equal(out[rows], plain[rows])
