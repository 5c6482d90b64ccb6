"""Targets mha and transformer on their CUDA branch: nn.MultiheadAttention on
every path (the Python path with and without weights, the native fast path) and
the fused encoder layer. Modules run via functional_call, on fake parameters
or (the CPU general path) on their own, detached."""

import pytest
import torch
import torch.nn as nn

from .probe import BRANCHES, assert_no_new_host_reads, cuda_branch, fake_like, fake_mode, general_path

B, L, E, H = 2, 5, 16, 2
NATIVE_MHA = "aten._native_multi_head_attention.default"
ENCODER_LAYER = "aten._transformer_encoder_layer_fwd.default"
PYTHON_PATH = "aten._safe_softmax.default"  # the sanitised copy's softmax, or SDPA's


def _masks(kind, device):
    """(key_padding_mask, attn_mask) in nn.MultiheadAttention's convention, True = masked:
    left padding (row 0 of batch element 0 sees only a pad key) and causal."""
    positions = torch.arange(L, device=device)
    pad = torch.stack([positions < 2, positions < 0])  # (B, L): two pads in row 0
    causal = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    per_head = causal.expand(B * H, L, L)
    as_float = lambda m: torch.zeros(m.shape, device=device).masked_fill(m, float("-inf"))  # noqa: E731
    return {
        "padding": (pad, None),
        "causal": (None, causal),
        "padding+causal": (pad, causal),
        "float padding+causal": (as_float(pad), as_float(causal)),
        "per-head 3-D": (pad, per_head),
    }[kind]


KINDS = ["padding", "causal", "padding+causal", "float padding+causal", "per-head 3-D"]


def _mha_call(module, params, x, kind, need_weights, device):
    pad, attn = _masks(kind, device)
    return lambda: torch.func.functional_call(
        module, params, (x, x, x), dict(key_padding_mask=pad, attn_mask=attn, need_weights=need_weights)
    )


def _params(module, device):
    """Fake parameters and buffers on fake CUDA; the module's own, detached (so
    that no grad keeps the fast path away), on the CPU general path."""
    return fake_like(module, device) if device == "cuda" else module.state_dict()


@pytest.mark.parametrize(
    "kind", [kind for kind in KINDS if not kind.startswith("float")]
)  # float masks leave the fast path
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("branch", BRANCHES)
def test_mha_fast_path(branch, kind, need_weights):
    module = nn.MultiheadAttention(E, H, batch_first=True).eval()
    with cuda_branch(branch) as device:
        params = _params(module, device)
        x = torch.randn(B, L, E, device=device)
        unpatched, patched = assert_no_new_host_reads(
            _mha_call(module, params, x, kind, need_weights, device), "mha,sdpa"
        )
    assert NATIVE_MHA in patched.ops


# MHA's Python path cannot run on fake CUDA on a CPU-only build, with or without
# attnpatch: it calls Tensor.contiguous(), whose binding wants a real CUDA device
# (and training needs a CUDA generator for dropout, autograd a CUDA device guard).
# It runs here on fake CPU tensors, which attnpatch never reads either: the same
# branch as on CUDA.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_mha_python_path_on_fake_tensors(kind, need_weights, train):
    module = nn.MultiheadAttention(E, H, batch_first=True).train(train)
    with fake_mode():
        params = fake_like(module, "cpu", requires_grad=True)
        x = torch.randn(B, L, E, requires_grad=True)
        forward = _mha_call(module, params, x, kind, need_weights, "cpu")

        def step():
            out, weights = forward()
            return out, weights, torch.autograd.grad(out.sum(), [x, *params.values()])

        unpatched, patched = assert_no_new_host_reads(step, "mha,sdpa")
    assert NATIVE_MHA not in patched.ops


@pytest.mark.parametrize("kind", ["padding", "causal", "padding+causal"])
@pytest.mark.parametrize("branch", BRANCHES)
def test_encoder_layer_fused_kernel(branch, kind):
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()
    with cuda_branch(branch) as device:
        params = _params(layer, device)
        x = torch.randn(B, L, E, device=device)
        pad, causal = _masks(kind, device)
        run = lambda: torch.func.functional_call(layer, params, (x,), dict(src_mask=causal, src_key_padding_mask=pad))  # noqa: E731
        with torch.no_grad():
            unpatched, patched = assert_no_new_host_reads(run, "transformer")
    assert ENCODER_LAYER in patched.ops


def test_encoder_stack_counts_host_reads_on_real_tensors():
    """nn.TransformerEncoder checks its masks itself (torch.equal against a causal
    mask: a host read), which fake tensors cannot run; here the reads are counted
    on real tensors instead: attnpatch adds none to torch's own."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(B, L, E)
    pad, causal = _masks("padding+causal", "cpu")
    with torch.no_grad(), general_path():
        unpatched, patched = assert_no_new_host_reads(
            lambda: encoder(x, mask=causal, src_key_padding_mask=pad), "transformer"
        )
    assert ENCODER_LAYER in patched.ops
    assert unpatched.reads, "torch itself reads the mask here; the check compares against that"
