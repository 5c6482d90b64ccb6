"""torch.func transforms over patched attention: per-sample gradients
(``vmap(grad(...))``, what differential-privacy training runs) and plain ``vmap``.
The transforms wrap each tensor in one that passes for ``torch.Tensor`` but has
no storage and cannot be read on the host; attnpatch must fix the NaN there too,
and give each sample what it gives that sample alone."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import attnpatch
from attnpatch import masks

from .helpers import causal_drop_mask, left_padded_keep_mask, left_padding, nan_kernel_under_patch

L, E, H = 6, 8, 2
LENGTHS = [6, 4, 2]  # the second and third sample's pad queries see only pad keys


@pytest.fixture(params=["cpu path", "general path"])
def path(request, monkeypatch):
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", request.param == "general path")
    return request.param


def _mha_case(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    params = {name: p.detach() for name, p in mha.named_parameters()}
    x = torch.randn(len(LENGTHS), L, E)
    padding = left_padding(LENGTHS, L)

    def loss(params, x, padding):
        out, _ = functional_call(
            mha,
            params,
            (x[None], x[None], x[None]),
            {"key_padding_mask": padding[None], "attn_mask": causal_drop_mask(L), "need_weights": need_weights},
        )
        return (out[0] * (~padding)[:, None]).sum()  # a loss that ignores the pad rows

    return loss, params, x, padding


def _per_sample(loss, params, x, padding):
    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, padding)
    one_by_one = [grad(loss)(params, x[i], padding[i]) for i in range(len(LENGTHS))]
    return batched, one_by_one


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_per_sample_gradients(path, need_weights):
    loss, params, x, padding = _mha_case(need_weights)
    plain, _ = _per_sample(loss, params, x, padding)
    if need_weights:  # the bug: 0 * NaN reaches every parameter of the padded samples
        assert any(g[1:].isnan().any() for g in plain.values())
    with attnpatch.patched():
        fixed, one_by_one = _per_sample(loss, params, x, padding)
    for name, g in fixed.items():
        assert g.isfinite().all(), name
        assert torch.equal(g[0], plain[name][0]), name  # the sample without padding: as unpatched
        for i, alone in enumerate(one_by_one):
            torch.testing.assert_close(g[i], alone[name], msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}")
        if not need_weights and path == "cpu path":
            assert torch.equal(g, plain[name]), name  # torch's CPU kernel was right already


def test_mha_forward_under_vmap(path):
    loss, params, x, padding = _mha_case(True)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    mha.load_state_dict(params)

    def forward(x, padding):
        return mha(x[None], x[None], x[None], key_padding_mask=padding[None], attn_mask=causal_drop_mask(L))[0][0]

    plain = vmap(forward)(x, padding)
    with attnpatch.patched():
        fixed = vmap(forward)(x, padding)
    pad_queries = padding  # left padding with a causal mask: exactly the pad queries see no key
    assert plain[pad_queries].isnan().all()
    assert torch.equal(fixed[~pad_queries], plain[~pad_queries])
    assert torch.equal(fixed[pad_queries], mha.out_proj.bias.detach().expand(int(pad_queries.sum()), E))


def test_sdpa_per_sample_gradients_with_nan_kernel(monkeypatch, path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(len(LENGTHS), H, L, 4) for _ in range(3))
    keep = left_padded_keep_mask(LENGTHS, L)[:, 0]  # (B, L, L): one per sample
    valid = keep.any(-1)

    def loss(q, k, v, keep, valid):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return (out * valid[:, None]).sum()

    def per_sample():
        return vmap(grad(loss, argnums=(0, 1, 2)))(q, k, v, keep, valid)

    with nan_kernel_under_patch(monkeypatch):
        plain = per_sample()
        assert any(g[1:].isnan().any() for g in plain)  # a kernel that gives NaN (several CUDA ones do)
        with attnpatch.patched():
            fixed = per_sample()
            one_by_one = [grad(loss, argnums=(0, 1, 2))(q[i], k[i], v[i], keep[i], valid[i]) for i in range(3)]
    for which, g, unpatched in zip("qkv", fixed, plain):
        assert g.isfinite().all(), which
        assert torch.equal(g[0], unpatched[0]), which  # the sample without padding: as unpatched
        for i, alone in enumerate(one_by_one):
            torch.testing.assert_close(g[i], alone["qkv".index(which)])
    for i in range(3):  # a pad query sees no key: its gradient is exactly zero
        assert torch.equal(fixed[0][i][:, ~valid[i]], torch.zeros_like(fixed[0][i][:, ~valid[i]]))
