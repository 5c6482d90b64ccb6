"""Target mha: nn.MultiheadAttention on every path (Python path with and without
weights, the native inference fast path), per the contract."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch

from .helpers import causal_drop_mask, has_nan, left_padding, naive_sdpa

B, L, E, H = 2, 5, 16, 2
LENGTHS = [3, 5]  # row 0 is left-padded by 2


def _mha(seed=0, **kwargs):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, **kwargs)
    if m.out_proj.bias is not None:
        nn.init.normal_(m.out_proj.bias)  # non-zero, so "row == bias" means something
    return m


def _input(batch_first=True, seed=1, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=gen)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    return x.requires_grad_(requires_grad)


def _masked_query_rows():
    """(B, L): query rows that see only pad keys under causal + left padding."""
    return left_padding(LENGTHS, L)  # with causal masking, exactly the pad queries


def _bias_rows(m):
    return m.out_proj.bias if m.out_proj.bias is not None else torch.zeros(E)


def _run(m, x, **kwargs):
    return m(x, x, x, key_padding_mask=left_padding(LENGTHS, L), attn_mask=causal_drop_mask(L), **kwargs)


@pytest.mark.parametrize("batch_first,train", list(itertools.product([True, False], [True, False])))
def test_need_weights_default_reproduction_fixed(batch_first, train):
    m = _mha(batch_first=batch_first).train(train)
    x = _input(batch_first, requires_grad=True)
    out_u, w_u = _run(m, x)
    assert has_nan(out_u, w_u), "without attnpatch this is the bug"
    out_u.sum().backward()
    assert has_nan(x.grad)

    x.grad = None
    m.zero_grad()
    with attnpatch.patched("mha"):
        out, w = _run(m, x)
        out.sum().backward()
    assert not has_nan(out, w, x.grad, *[p.grad for p in m.parameters()])

    rows = _masked_query_rows()
    out_b = out if batch_first else out.transpose(0, 1)
    out_ub = out_u if batch_first else out_u.transpose(0, 1)
    assert torch.equal(out_b[rows], _bias_rows(m).expand(int(rows.sum()), E))
    assert torch.equal(out_b[~rows], out_ub[~rows]), "valid rows must be bitwise unchanged"
    assert torch.equal(w[rows], torch.zeros_like(w[rows]))
    assert torch.equal(w[~rows], w_u[~rows])


def test_need_weights_true_equals_need_weights_false_forward_and_backward():
    m = _mha(batch_first=True)
    x1 = _input(requires_grad=True)
    x2 = _input(requires_grad=True)
    with attnpatch.patched("mha"):
        out1, _ = _run(m, x1, need_weights=True)
        out1.square().sum().backward()
        grads1 = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        out2, _ = _run(m, x2, need_weights=False)
        out2.square().sum().backward()
        grads2 = [p.grad.clone() for p in m.parameters()]
    rows = _masked_query_rows()
    assert torch.equal(out1[rows], out2[rows])
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(x1.grad, x2.grad)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2)
    # pad positions are masked keys for every query, so no gradient reaches them at all
    assert torch.equal(x1.grad[rows], torch.zeros_like(x1.grad[rows]))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_fast_path_fixed(need_weights, grad_mode):
    m = _mha(batch_first=True).eval()
    x = _input()
    ctx = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    with ctx():
        out_u, w_u = _run(m, x, need_weights=need_weights)
        assert has_nan(out_u)
        with attnpatch.patched("mha"):
            out, w = _run(m, x, need_weights=need_weights)
    rows = _masked_query_rows()
    assert not has_nan(out, w)
    assert torch.equal(out[rows], m.out_proj.bias.expand(int(rows.sum()), E))
    assert torch.equal(out[~rows], out_u[~rows])
    if need_weights:
        assert torch.equal(w[rows], torch.zeros_like(w[rows]))
        assert torch.equal(w[~rows], w_u[~rows])


def test_fast_path_is_still_taken(monkeypatch):
    """Inference keeps PyTorch's native kernel (called with a safe mask)."""
    calls = []
    real = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = _mha(batch_first=True).eval()
    with torch.no_grad(), attnpatch.patched("mha"):
        _run(m, _input(), need_weights=False)
    assert calls == [1]


def _reference(m, x, key_padding_mask, attn_mask, batch_first, **kwargs):
    """Float64, need_weights=False Python path without attnpatch: PyTorch's own
    CPU semantics for fully masked rows (output out_proj(0))."""
    ref = nn.MultiheadAttention(
        E,
        H,
        batch_first=batch_first,
        bias=m.in_proj_bias is not None,
        kdim=m.kdim,
        vdim=m.vdim,
        add_bias_kv=m.bias_k is not None,
        add_zero_attn=m.add_zero_attn,
    ).double()
    ref.load_state_dict(m.state_dict())
    ref.train()  # dropout is 0; train() avoids the fast path
    xd = x.detach().double()
    mask = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    kpm = (
        key_padding_mask.double()
        if key_padding_mask is not None and key_padding_mask.is_floating_point()
        else key_padding_mask
    )
    return ref(xd, xd, xd, key_padding_mask=kpm, attn_mask=mask, need_weights=False, **kwargs)[0]


CASES = {
    "bool-both": lambda: (left_padding(LENGTHS, L), causal_drop_mask(L)),
    "float-both": lambda: (
        torch.zeros(B, L).masked_fill(left_padding(LENGTHS, L), float("-inf")),
        torch.zeros(L, L).masked_fill(causal_drop_mask(L), float("-inf")),
    ),
    "kpm-fully-padded-element": lambda: (torch.tensor([[True] * L, [False] * L]), None),
    "attn-mask-only": lambda: (
        None,
        torch.ones(L, L, dtype=torch.bool).triu(0),
    ),  # row i sees nothing left of i... all of row 0.. masked
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("train,grad", [(True, True), (False, True), (False, False)])
def test_matches_float64_reference(case, need_weights, average, train, grad):
    kpm, attn_mask = CASES[case]()
    m = _mha(batch_first=True).train(train)
    m.dropout = 0.0
    x = _input(requires_grad=grad)
    with torch.set_grad_enabled(grad), attnpatch.patched("mha"):
        out, w = m(
            x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights, average_attn_weights=average
        )
    assert not has_nan(out, w)
    expected = _reference(m, x, kpm, attn_mask, True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if need_weights:
        sums = w.sum(-1)
        assert torch.all((sums == 0) | ((sums - 1).abs() < 1e-5))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_per_head_mask_row_masked_in_some_heads_only(train, need_weights, average):
    attn_mask = torch.zeros(B * H, L, L, dtype=torch.bool)
    attn_mask[0, 1, :] = True  # batch 0, head 0, query 1: nothing to see
    attn_mask[3, :, :] = True  # batch 1, head 1: every query fully masked
    m = _mha(batch_first=True).train(train)
    m.dropout = 0.0
    x = _input()
    with torch.no_grad():
        with attnpatch.patched("mha"):
            out, w = m(x, x, x, attn_mask=attn_mask, need_weights=need_weights, average_attn_weights=average)
    assert not has_nan(out, w)
    torch.testing.assert_close(out.double(), _reference(m, x, None, attn_mask, True), atol=1e-5, rtol=1e-5)
    if need_weights and not average:
        head_rows = attn_mask.view(B, H, L, L).all(-1)
        assert torch.equal(w[head_rows], torch.zeros_like(w[head_rows]))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(batch_first=False), id="seq-first"),
        pytest.param(dict(bias=False), id="no-bias"),
        pytest.param(dict(kdim=8, vdim=12), id="kdim-vdim"),
        pytest.param(dict(add_bias_kv=True), id="bias-kv"),
        pytest.param(dict(add_zero_attn=True), id="zero-attn"),
    ],
)
def test_module_variants(kwargs):
    m = _mha(**kwargs)
    m.dropout = 0.0
    batch_first = kwargs.get("batch_first", False)
    gen = torch.Generator().manual_seed(3)
    shape = (B, L) if batch_first else (L, B)
    q = torch.randn(*shape, E, generator=gen, requires_grad=True)
    k = torch.randn(*shape, kwargs.get("kdim", E), generator=gen)
    v = torch.randn(*shape, kwargs.get("vdim", E), generator=gen)
    kpm, am = left_padding(LENGTHS, L), causal_drop_mask(L)
    with attnpatch.patched("mha"):
        out, w = m(q, k, v, key_padding_mask=kpm, attn_mask=am)
        out.sum().backward()
    assert not has_nan(out, w, q.grad)
    out_nw, _ = m(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    torch.testing.assert_close(out, out_nw)  # PyTorch's own need_weights=False semantics


def test_unbatched_input():
    m = _mha()
    x = torch.randn(L, E, requires_grad=True)
    kpm = torch.tensor([True, True, False, False, False])
    with attnpatch.patched("mha"):
        out, w = m(x, x, x, key_padding_mask=kpm, attn_mask=causal_drop_mask(L))
        out.sum().backward()
    assert not has_nan(out, w, x.grad)
    assert torch.equal(out[:2], m.out_proj.bias.expand(2, E))


def test_is_causal_hint():
    m = _mha(batch_first=True)
    x = _input()
    with attnpatch.patched("mha"):
        out, w = _run(m, x, is_causal=True)
    assert not has_nan(out, w)
    rows = _masked_query_rows()
    assert torch.equal(out[rows], m.out_proj.bias.expand(int(rows.sum()), E))


def test_need_weights_false_with_nan_kernel(monkeypatch):
    """With only the mha target on, its SDPA call is sanitised too."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    m = _mha(batch_first=True)
    x = _input(requires_grad=True)
    assert has_nan(_run(m, x, need_weights=False)[0])
    with attnpatch.patched("mha"):
        out, _ = _run(m, x, need_weights=False)
        out.sum().backward()
    assert not has_nan(out, x.grad)
    rows = _masked_query_rows()
    assert torch.equal(out[rows], m.out_proj.bias.expand(int(rows.sum()), E))


def test_large_negative_float_mask_untouched():
    m = _mha(batch_first=True)
    x = _input()
    kpm = torch.zeros(B, L).masked_fill(left_padding(LENGTHS, L), -1e9)
    am = torch.zeros(L, L).masked_fill(causal_drop_mask(L), -1e9)
    out_u, w_u = m(x, x, x, key_padding_mask=kpm, attn_mask=am)
    with attnpatch.patched("mha"):
        out, w = m(x, x, x, key_padding_mask=kpm, attn_mask=am)
    assert torch.equal(out, out_u) and torch.equal(w, w_u)


def test_torchscript_compiles_while_patched():
    """Scripting must work with the patch on (scripted code runs PyTorch's own,
    unpatched kernels). Fresh subclasses force TorchScript to compile anew
    rather than reuse a type compiled before the patch."""

    class FreshMHA(nn.MultiheadAttention):
        pass

    class FreshLayer(nn.TransformerEncoderLayer):
        pass

    x = _input()
    kpm, am = left_padding(LENGTHS, L), causal_drop_mask(L)
    with attnpatch.patched():
        mha = torch.jit.script(FreshMHA(E, H, batch_first=True))
        layer = torch.jit.script(FreshLayer(E, H, 32, batch_first=True))
        out, _ = mha(x, x, x, key_padding_mask=kpm, attn_mask=am)
        layer(x, src_mask=am, src_key_padding_mask=kpm)
    assert has_nan(out), "scripted code is out of attnpatch's reach (documented)"
