"""Issue 5.6: hypothesis over shapes, dtypes, mask kinds and every
nn.MultiheadAttention argument, checked against an independent float64
reference of the contract. Profiles (conftest.py): "ci" by default,
ATTNPATCH_HYPOTHESIS_PROFILE=long for thousands of examples."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from hypothesis import event, given, settings
from hypothesis import strategies as st

import attnpatch

PROFILE = settings.get_profile(os.environ.get("ATTNPATCH_HYPOTHESIS_PROFILE", "ci"))
NEG = float("-inf")


def reference(mha: nn.MultiheadAttention, q, k, v, attn_mask, kpm, average):
    """Float64 attention where a fully masked row (per head) has weights 0.
    Inputs in (L, B, E) layout; returns out (L, B, E), weights (B, H, L, S)."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    q, k, v = d(q), d(k), d(v)
    L, B, E = q.shape
    H, hd = mha.num_heads, E // mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = d(mha.in_proj_weight).chunk(3)
    else:
        wq, wk, wv = d(mha.q_proj_weight), d(mha.k_proj_weight), d(mha.v_proj_weight)
    bq, bk, bv = d(mha.in_proj_bias).chunk(3) if mha.in_proj_bias is not None else (0, 0, 0)
    q, k, v = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    S = k.shape[0]
    mask = torch.zeros(B, H, L, S, dtype=torch.float64)
    if attn_mask is not None:
        am = (
            attn_mask.double()
            if attn_mask.is_floating_point()
            else torch.zeros(attn_mask.shape, dtype=torch.float64).masked_fill(attn_mask, NEG)
        )
        mask = mask + (am.view(B, H, L, S) if am.dim() == 3 else am)
    if kpm is not None:
        km = (
            kpm.double()
            if kpm.is_floating_point()
            else torch.zeros(kpm.shape, dtype=torch.float64).masked_fill(kpm, NEG)
        )
        mask = mask + km.view(B, 1, 1, S)
    if mha.bias_k is not None:
        k = torch.cat([k, d(mha.bias_k).expand(1, B, E)])
        v = torch.cat([v, d(mha.bias_v).expand(1, B, E)])
        mask = torch.cat([mask, mask.new_zeros(B, H, L, 1)], -1)
    heads = lambda t: t.reshape(t.shape[0], B, H, hd).permute(1, 2, 0, 3)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, H, 1, hd)], 2)
        v = torch.cat([v, v.new_zeros(B, H, 1, hd)], 2)
        mask = torch.cat([mask, mask.new_zeros(B, H, L, 1)], -1)
    scores = (q @ k.transpose(-2, -1)) * hd**-0.5 + mask
    dead = (mask == NEG).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    out = (weights @ v).permute(2, 0, 1, 3).reshape(L, B, E)
    out = out @ d(mha.out_proj.weight).T + (d(mha.out_proj.bias) if mha.out_proj.bias is not None else 0)
    return out, weights, dead.squeeze(-1)  # dead: (B, H, L)


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([1, 2]))
    embed = heads * draw(st.sampled_from([2, 4]))
    batch, L = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    cross = draw(st.booleans())
    S = draw(st.integers(1, 5)) if cross else L
    kdim = draw(st.sampled_from([None, 3])) if cross else None
    vdim = draw(st.sampled_from([None, 5])) if cross else None
    c = dict(
        heads=heads,
        embed=embed,
        batch=batch,
        L=L,
        S=S,
        cross=cross,
        kdim=kdim,
        vdim=vdim,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        batch_first=draw(st.booleans()),
        unbatched=draw(st.booleans()) and batch == 1,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        train=draw(st.booleans()),
        grad=draw(st.sampled_from(["grad", "no_grad", "inference_mode"])),
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        attn=draw(st.sampled_from(["none", "bool", "float", "causal", "per_head_bool", "per_head_float"])),
        kpm=draw(st.sampled_from(["none", "bool", "float"])),
        seed=draw(st.integers(0, 2**16)),
    )
    # PyTorch drops a causal attn_mask for SDPA's is_causal (top-left aligned)
    # when it can; that ignores the extra bias_kv / zero-attn key column, so the
    # hint is only equivalent to the mask without those.
    plain = not (c["add_bias_kv"] or c["add_zero_attn"])
    c["is_causal"] = c["attn"] == "causal" and L == S and plain and draw(st.booleans())
    return c


def _masks(c, gen):
    B, H, L, S = c["batch"], c["heads"], c["L"], c["S"]
    drop_p = 0.5
    attn = None
    if c["attn"] in ("bool", "float", "per_head_bool", "per_head_float"):
        shape = (B * H, L, S) if c["attn"].startswith("per_head") else (L, S)
        drop = torch.rand(shape, generator=gen) < drop_p
        if shape[0] == B * H and B * H > 1:
            drop[0] = True  # a row masked in one head only (or all heads)
        attn = drop if "bool" in c["attn"] else torch.randn(shape, generator=gen).masked_fill(drop, NEG)
    elif c["attn"] == "causal":
        attn = torch.ones(L, S, dtype=torch.bool).triu(1)
    kpm = None
    if c["kpm"] != "none":
        pad = torch.arange(S)[None, :] < torch.randint(0, S + 1, (B, 1), generator=gen)  # left padding
        kpm = pad if c["kpm"] == "bool" else torch.zeros(B, S).masked_fill(pad, NEG)
    if c["unbatched"]:
        kpm = None if kpm is None else kpm[0]
        if attn is not None and attn.dim() == 3:
            attn = attn[:H]
    if attn is not None and attn.is_floating_point():
        attn = attn.to(c["dtype"])
    if kpm is not None and kpm.is_floating_point():
        kpm = kpm.to(c["dtype"])
    return attn, kpm


def _layout(t, c):
    """(L, B, E) -> the layout the module expects."""
    if c["unbatched"]:
        return t[:, 0]
    return t.transpose(0, 1) if c["batch_first"] else t


def _canonical(t, c):
    if t is None:
        return None
    if c["unbatched"]:
        return t.unsqueeze(1) if t.dim() == 2 else t
    return t.transpose(0, 1) if c["batch_first"] else t


@settings(PROFILE)
@given(cases())
def test_mha_contract(c):
    gen = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])
    mha = nn.MultiheadAttention(
        c["embed"],
        c["heads"],
        bias=c["bias"],
        add_bias_kv=c["add_bias_kv"],
        add_zero_attn=c["add_zero_attn"],
        kdim=c["kdim"],
        vdim=c["vdim"],
        batch_first=c["batch_first"],
        dtype=c["dtype"],
    ).train(c["train"])
    B, L, S, E = c["batch"], c["L"], c["S"], c["embed"]
    q = torch.randn(L, B, E, generator=gen, dtype=c["dtype"])
    k = torch.randn(S, B, c["kdim"] or E, generator=gen, dtype=c["dtype"]) if c["cross"] else q
    v = torch.randn(S, B, c["vdim"] or E, generator=gen, dtype=c["dtype"]) if c["cross"] else q
    attn, kpm = _masks(c, gen)
    grad = c["grad"] == "grad"
    inputs = [_layout(t, c) for t in (q, k, v)]
    if grad:
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        if not c["cross"]:
            inputs = [inputs[0]] * 3
    kwargs = dict(
        key_padding_mask=kpm,
        attn_mask=attn,
        need_weights=c["need_weights"],
        average_attn_weights=c["average"],
        is_causal=c["is_causal"],
    )
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[c["grad"]]

    def run():
        with ctx():
            return mha(*inputs, **kwargs)

    try:
        bug_out, bug_w = run()
    except Exception as exc:
        with attnpatch.patched():
            try:
                run()
            except Exception as exc2:  # noqa: BLE001
                assert (type(exc2), str(exc2)) == (type(exc), str(exc))
                event("rejected by PyTorch (same error under the patch)")
                return
        raise AssertionError(f"patched call succeeded where unpatched raised {exc!r}") from exc
    with attnpatch.patched():
        out, w = run()

    # Reference (float64, contract semantics) in canonical (L, B, E) layout.
    ref_attn = attn
    ref_kpm = kpm.unsqueeze(0) if (kpm is not None and c["unbatched"]) else kpm
    ref_out, ref_w, dead = reference(mha, q, k, v, ref_attn, ref_kpm, c["average"])
    out_c = _canonical(out, c).detach()
    bug_c = _canonical(bug_out, c).detach()
    all_dead = dead.all(1).T  # (L, B)
    event("some rows fully masked" if bool(all_dead.any()) else "no fully masked row")
    event(f"rows masked in some heads only: {bool((dead.any(1) & ~dead.all(1)).any())}")
    event(f"NaN without attnpatch: {bool(torch.isnan(bug_c).any())}")

    assert torch.isfinite(out_c).all()
    torch.testing.assert_close(out_c.double(), ref_out, rtol=1e-4, atol=1e-5)
    fill = mha.out_proj.bias.detach() if mha.out_proj.bias is not None else torch.zeros(E, dtype=c["dtype"])
    assert torch.equal(out_c[all_dead], fill.expand(int(all_dead.sum()), E))
    valid = ~dead.any(1).T
    finite_before = torch.isfinite(bug_c).all(-1)
    assert torch.equal(out_c[valid & finite_before], bug_c[valid & finite_before])
    if c["need_weights"]:
        wc = w.detach() if not c["unbatched"] else w.detach().unsqueeze(0)
        ref_wc = ref_w.mean(1) if c["average"] else ref_w
        assert torch.isfinite(wc).all()
        torch.testing.assert_close(wc.double(), ref_wc, rtol=1e-4, atol=1e-5)
        if c["average"]:
            assert torch.equal(wc.transpose(0, 1)[all_dead], torch.zeros_like(wc.transpose(0, 1)[all_dead]))
        else:
            zeros = wc[dead]
            assert torch.equal(zeros, torch.zeros_like(zeros))
        bw = bug_w.detach() if not c["unbatched"] else bug_w.detach().unsqueeze(0)
        if c["average"]:
            keep = valid.T & torch.isfinite(bw).all(-1)
            assert torch.equal(wc[keep], bw[keep])
    if grad:
        loss = out.double().sum()
        loss.backward()
        for t in [*inputs, *mha.parameters()]:
            if t.grad is not None:
                assert torch.isfinite(t.grad).all()
