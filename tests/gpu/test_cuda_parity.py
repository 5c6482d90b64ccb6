"""GPU parity: every SDPA backend that accepts the case, fp32/fp16/bf16, and no
host-device synchronisation added by any patched call.

Skipped without CUDA. On a CUDA machine ``make cuda-report`` runs these with the
CUDA benchmarks and ``attnpatch doctor`` and writes the reports (device, versions,
date) under benchmarks/results/, to commit.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.gpu.host_syncs import run_adding_no_sync, under_attnpatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

B, H, L, D = 2, 4, 64, 64
LENGTHS = [40, 64]
TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _keep_mask(device):
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    real = torch.arange(L, device=device)[None] >= (L - torch.tensor(LENGTHS, device=device))[:, None]
    return causal[None, None] & real[:, None, None, :]


def _backends():
    from torch.nn.attention import SDPBackend

    names = ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]
    return [getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)]


def _reference(q, k, v, keep):
    q, k, v, keep = (t.detach().double().cpu() if t.is_floating_point() else t.cpu() for t in (q, k, v, keep))
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~keep, float("-inf"))
    rows = ~keep.any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(rows, 0), -1).masked_fill(rows, 0) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", _backends() if torch.cuda.is_available() else [None], ids=str)
@pytest.mark.parametrize("float_mask", [False, True])
@pytest.mark.parametrize("grad", [True, False], ids=["backward", "no backward"])  # no backward: the caller's mask
def test_sdpa_backend_parity(dtype, backend, float_mask, grad):
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    keep = _keep_mask("cuda")
    mask = torch.zeros(keep.shape, device="cuda", dtype=dtype).masked_fill(~keep, float("-inf")) if float_mask else keep
    rows = ~keep.any(-1).expand(B, H, L)
    with sdpa_kernel([backend]):
        try:
            unpatched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        except RuntimeError as exc:
            pytest.skip(f"{backend} does not accept this case: {exc}")

        def call():
            for t in (q, k, v):
                t.grad = None
            with torch.set_grad_enabled(grad):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                if grad:
                    out.float().sum().backward()
            return out

        patched = run_adding_no_sync(call, under_attnpatch(call, "sdpa"))
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))
    valid = ~rows
    finite = torch.isfinite(unpatched).all(-1) & valid
    torch.testing.assert_close(patched[finite], unpatched[finite], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(
        patched.double().cpu()[valid.cpu()],
        _reference(q, k, v, keep.expand(B, H, L, L))[valid.cpu()],
        atol=TOL[dtype],
        rtol=TOL[dtype],
    )
    if grad:
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()


def test_compiled_sdpa():
    """The fix traced into an inductor graph: rows 0, no host read at run time.
    Each patch state compiles its own graph (dynamo guards on it) before the check."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=gen) for _ in range(3))
    keep = _keep_mask("cuda")
    attend = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), fullgraph=True)

    def call():
        return attend(q, k, v, keep)

    unpatched = call()
    under_attnpatch(call, "sdpa")()  # compiles the patched graph outside the check
    patched = run_adding_no_sync(call, under_attnpatch(call, "sdpa"))
    rows = ~keep.any(-1).expand(B, H, L)
    assert rows.any()
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))
    finite = torch.isfinite(unpatched).all(-1) & ~rows
    assert torch.equal(patched[finite], unpatched[finite])


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_mha_cuda(need_weights, train):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(256, 8, batch_first=True, device="cuda").train(train)
    x = torch.randn(2, L, 256, device="cuda", requires_grad=train)
    kpm = torch.arange(L, device="cuda")[None] < (L - torch.tensor(LENGTHS, device="cuda"))[:, None]
    causal = torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)

    def call():
        x.grad = None
        with torch.set_grad_enabled(train):
            out, _ = m(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=need_weights)
            if train:
                out.sum().backward()
        return out

    out = run_adding_no_sync(call, under_attnpatch(call))
    assert torch.isfinite(out).all()
    assert torch.equal(out[kpm], m.out_proj.bias.expand(int(kpm.sum()), 256).to(out.dtype))
    if train:
        assert torch.isfinite(x.grad).all()


def test_transformer_encoder_cuda():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 8, 512, dropout=0.0, batch_first=True, device="cuda")
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    x = torch.randn(2, L, 256, device="cuda")
    kpm = torch.arange(L, device="cuda")[None] < (L - torch.tensor(LENGTHS, device="cuda"))[:, None]
    causal = torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)

    def call():
        with torch.no_grad():
            return enc(x, mask=causal, src_key_padding_mask=kpm)

    out = run_adding_no_sync(call, under_attnpatch(call))
    assert torch.isfinite(out).all()
