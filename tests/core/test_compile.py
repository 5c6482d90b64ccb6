"""torch.compile(fullgraph=True) of code using the patched ops works and matches
eager (where the same torch can compile the case without attnpatch)."""

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch

from tests.torch_baseline import compiled_under_patch
from .helpers import causal_drop_mask, has_nan, left_padded_keep_mask, left_padding

B, L, E, H = 2, 5, 16, 2
LENGTHS = [3, 5]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_equals_eager(fn, *args, backend="aot_eager"):
    with attnpatch.patched():
        expected = fn(*args)
    got = compiled_under_patch(lambda: torch.compile(fn, fullgraph=True, backend=backend)(*args))
    assert not has_nan(got)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    return got


def test_sdpa():
    keep = left_padded_keep_mask(LENGTHS, L)
    q = torch.randn(B, H, L, 8)
    out = _compiled_equals_eager(lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=keep), q)
    assert torch.equal(out[0, :, :2], torch.zeros(H, 2, 8))


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_training_path_and_backward(need_weights):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=True)
    kpm, am = left_padding(LENGTHS, L), causal_drop_mask(L)
    x = torch.randn(B, L, E, requires_grad=True)

    def fn(x):
        return m(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)[0]

    out = _compiled_equals_eager(fn, x)
    with attnpatch.patched():
        out.sum().backward()
    assert not has_nan(x.grad)


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@torch.no_grad()
def test_encoder_inference_inductor():
    enc = _encoder()
    kpm, am = left_padding(LENGTHS, L), causal_drop_mask(L)
    _compiled_equals_eager(lambda x: enc(x, mask=am, src_key_padding_mask=kpm), torch.randn(B, L, E), backend="inductor")


@torch.no_grad()
def test_mha_fast_path():
    mha = _encoder().layers[0].self_attn
    kpm, am = left_padding(LENGTHS, L), causal_drop_mask(L)
    fn = lambda x: mha(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]  # noqa: E731
    _compiled_equals_eager(fn, torch.randn(B, L, E))


def _traced_ops(fn, *args):
    """How often each aten op occurs in the graph that AOT autograd hands the
    compiler for ``fn`` (the graph inductor would compile), under attnpatch."""
    from torch._dynamo.backends.common import aot_autograd

    ops = collections.Counter()

    def count(graph_module, example_inputs):
        ops.update(str(node.target).split(".")[1] for node in graph_module.graph.nodes if node.op == "call_function"
                   and str(node.target).startswith("aten."))
        return graph_module

    compiled_under_patch(lambda: torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=count))(*args))
    return ops


@torch.no_grad()
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_sdpa_fix_is_traced_once(mask_dtype):
    """One pass over the mask and one over the output per SDPA call. AOT
    tracing's torch-function mode hands the fix's own kernel call back through
    the patched SDPA; fixed again there (torch 2.13 does), the graph carried
    the fix twice."""
    keep = left_padded_keep_mask(LENGTHS, L)
    mask = keep if mask_dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    q = torch.randn(B, H, L, 8)
    fn = lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)  # noqa: E731
    ops = _traced_ops(fn, q)
    assert sum(ops[name] for name in ("any", "all", "amax", "amin", "sum")) == 1, ops
    assert ops["masked_fill"] == 1, ops
    _compiled_equals_eager(fn, q)
