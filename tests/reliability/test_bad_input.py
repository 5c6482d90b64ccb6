"""Issue 5.5: wrong calls. For each, the patched call raises exactly what the
unpatched call raises (type and message), or returns exactly the same result
(NaN positions included). Never a new error, never a different answer."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch

from ._common import same

NEG = float("-inf")
B, H, L, D = 2, 2, 4, 8


def _outcome(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001
            return ("raised", type(exc), str(exc))
    result = result if isinstance(result, tuple) else (result,)
    return ("returned", tuple(None if r is None else r.detach() for r in result))


def _assert_same_outcome(fn):
    unpatched = _outcome(fn)
    with attnpatch.patched():
        patched = _outcome(fn)
    assert patched[0] == unpatched[0], (unpatched, patched)
    if unpatched[0] == "raised":
        assert patched == unpatched
    else:
        for a, b in zip(patched[1], unpatched[1]):
            if a is not None and a.device.type == "meta":
                assert b.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype
                continue
            assert (a is None and b is None) or same(a, b)
    return unpatched


def _nan_mask(shape):
    """A NaN entry next to -inf entries, no fully masked row: NaN must propagate
    exactly as without attnpatch (a NaN row is not a masked row)."""
    mask = torch.zeros(shape)
    mask[..., 0, 1:] = NEG
    mask[..., 0, 0] = float("nan")
    mask[..., 1, 1] = float("nan")
    return mask


def _qkv(batch=B, lq=L, lk=L):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, H, lq, D, generator=gen),
        torch.randn(batch, H, lk, D, generator=gen),
        torch.randn(batch, H, lk, D, generator=gen),
    )


SDPA_CASES = {
    "mask-wrong-shape": lambda: dict(attn_mask=torch.ones(3, 3, dtype=torch.bool)),
    "mask-wrong-last-dim": lambda: dict(attn_mask=torch.ones(B, 1, L, L + 1, dtype=torch.bool)),
    "mask-int-dtype": lambda: dict(attn_mask=torch.ones(L, L, dtype=torch.long)),
    "mask-float64": lambda: dict(attn_mask=torch.zeros(L, L, dtype=torch.float64).fill_diagonal_(NEG)),
    "mask-fp16-all-inf-row": lambda: dict(
        attn_mask=torch.zeros(L, L, dtype=torch.float16).index_fill_(0, torch.tensor([0]), NEG)
    ),
    "mask-nan": lambda: dict(attn_mask=_nan_mask((L, L))),
    "mask-list": lambda: dict(attn_mask=[[True] * L] * L),
    "mask-float-scalar": lambda: dict(attn_mask=0.5),
    "mask-with-is_causal": lambda: dict(attn_mask=torch.ones(L, L, dtype=torch.bool), is_causal=True),
    "empty-batch": lambda: dict(qkv=_qkv(batch=0), attn_mask=torch.zeros(0, 1, L, L, dtype=torch.bool)),
    "zero-length-query": lambda: dict(qkv=_qkv(lq=0), attn_mask=torch.zeros(0, L, dtype=torch.bool)),
    "zero-length-keys": lambda: dict(qkv=_qkv(lk=0), attn_mask=torch.zeros(L, 0, dtype=torch.bool)),
    "zero-length-keys-float": lambda: dict(qkv=_qkv(lk=0), attn_mask=torch.zeros(L, 0)),
    "q-k-dtype-mismatch": lambda: dict(
        qkv=(_qkv()[0].double(), *_qkv()[1:]), attn_mask=torch.zeros(L, L, dtype=torch.bool)
    ),
    "q-meta-mask-cpu": lambda: dict(
        qkv=tuple(t.to("meta") for t in _qkv()), attn_mask=torch.zeros(L, L, dtype=torch.bool)
    ),
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa(case):
    spec = SDPA_CASES[case]()
    q, k, v = spec.pop("qkv", None) or _qkv()
    _assert_same_outcome(lambda: F.scaled_dot_product_attention(q, k, v, **spec))


def _kpm(batch=B, s=L, pad=L - 1):
    kpm = torch.zeros(batch, s, dtype=torch.bool)
    if batch and s:
        kpm[0, :pad] = True
    return kpm


def _causal(lq=L, s=L):
    return torch.ones(lq, s, dtype=torch.bool).triu(1)


MHA_CASES = {
    "attn-mask-wrong-shape": lambda: dict(attn_mask=torch.ones(3, 3, dtype=torch.bool)),
    "attn-mask-3d-wrong-heads": lambda: dict(attn_mask=torch.ones(3 * B, L, L, dtype=torch.bool)),
    "kpm-wrong-shape": lambda: dict(key_padding_mask=torch.ones(B, L + 1, dtype=torch.bool)),
    "attn-mask-int": lambda: dict(attn_mask=torch.ones(L, L, dtype=torch.long)),
    "kpm-int": lambda: dict(key_padding_mask=torch.ones(B, L, dtype=torch.long)),
    "attn-mask-float64": lambda: dict(attn_mask=torch.zeros(L, L, dtype=torch.float64).fill_diagonal_(NEG)),
    # (meta inputs with CPU masks: PyTorch returns CPU weights of uninitialised
    # memory there, different from run to run, so nothing can be compared)
    "inputs-and-masks-meta": lambda: dict(
        device="meta", attn_mask=_causal().to("meta"), key_padding_mask=_kpm().to("meta")
    ),
    "attn-mask-nan": lambda: dict(attn_mask=_nan_mask((L, L)), key_padding_mask=_kpm()),
    "kpm-float-nan-inf": lambda: dict(
        key_padding_mask=torch.tensor([[NEG, 0.0, NEG, 0.0], [0.0, float("nan"), 0.0, 0.0]])
    ),
    "kpm-list": lambda: dict(key_padding_mask=[[True] * L] * B),
    "attn-mask-list": lambda: dict(attn_mask=[[True] * L] * L),
    "is-causal-without-mask": lambda: dict(is_causal=True),
    "bool-and-float-masks": lambda: dict(attn_mask=torch.zeros(L, L).fill_diagonal_(NEG), key_padding_mask=_kpm(pad=1)),
    "empty-batch": lambda: dict(batch=0, key_padding_mask=_kpm(0), attn_mask=_causal()),
    "zero-length-sequence": lambda: dict(lq=0, lk=0, key_padding_mask=_kpm(B, 0), attn_mask=_causal(0, 0)),
    "zero-length-keys": lambda: dict(lk=0, key_padding_mask=_kpm(B, 0), attn_mask=_causal(L, 0)),
    "query-wrong-embed": lambda: dict(embed=D + 1),
}


@pytest.mark.parametrize("mode", ["train", "eval-no_grad"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_module(case, mode):
    spec = MHA_CASES[case]()
    batch, lq, lk, embed = spec.pop("batch", B), spec.pop("lq", L), spec.pop("lk", L), spec.pop("embed", D)
    device = spec.pop("device", "cpu")
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=True).train(mode == "train").to(device)
    q, kv = torch.randn(batch, lq, embed).to(device), torch.randn(batch, lk, embed).to(device)

    def call():
        with torch.no_grad() if mode != "train" else torch.enable_grad():
            return mha(q, kv, kv, **spec) if lq != lk or lq == 0 else mha(q, q, q, **spec)

    _assert_same_outcome(call)


ENCODER_CASES = {
    "src-mask-wrong-shape": lambda: dict(src_mask=torch.ones(3, 3, dtype=torch.bool)),
    "kpm-wrong-shape": lambda: dict(src_key_padding_mask=torch.ones(B, L + 1, dtype=torch.bool)),
    "src-mask-int": lambda: dict(src_mask=torch.ones(L, L, dtype=torch.long)),
    "kpm-int": lambda: dict(src_key_padding_mask=torch.ones(B, L, dtype=torch.long)),
    "inputs-meta-masks-cpu": lambda: dict(device="meta", src_mask=_causal(), src_key_padding_mask=_kpm()),
    "src-mask-nan": lambda: dict(src_mask=_nan_mask((L, L)), src_key_padding_mask=_kpm()),
    "kpm-list": lambda: dict(src_key_padding_mask=[[True] * L] * B),
    "empty-batch": lambda: dict(batch=0, src_mask=_causal(), src_key_padding_mask=_kpm(0)),
    "zero-length-sequence": lambda: dict(lq=0, src_mask=_causal(0, 0), src_key_padding_mask=_kpm(B, 0)),
    "is-causal-with-wrong-mask": lambda: dict(src_mask=torch.zeros(L, L, dtype=torch.bool), is_causal=True),
}


@pytest.mark.parametrize("mode", ["train", "eval-no_grad"])
@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_transformer_encoder_layer(case, mode):
    spec = ENCODER_CASES[case]()
    batch, lq, device = spec.pop("batch", B), spec.pop("lq", L), spec.pop("device", "cpu")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 16, dropout=0.0, batch_first=True).train(mode == "train").to(device)
    x = torch.randn(batch, lq, D).to(device)

    def call():
        with torch.no_grad() if mode != "train" else torch.enable_grad():
            return layer(x, **spec)

    _assert_same_outcome(call)


def test_catalogue_reaches_the_patch():
    """The catalogue is not all rejected before attnpatch can act: a few of its
    calls do give NaN without attnpatch and are fixed with it (so a broken
    wrapper that changed them would show above)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    x = torch.randn(B, L, D)
    assert torch.isnan(mha(x, x, x, attn_mask=_causal(), key_padding_mask=_kpm())[0]).any()
    with attnpatch.patched():
        assert not torch.isnan(mha(x, x, x, attn_mask=_causal(), key_padding_mask=_kpm())[0]).any()
    # and the NaN cases of the catalogue do carry NaN (which attnpatch must keep)
    assert torch.isnan(mha(x, x, x, **MHA_CASES["attn-mask-nan"]())[0]).any()
