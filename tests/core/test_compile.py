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


def _traced(fn, *args):
    """``fn(*args)`` compiled under attnpatch, and the aten calls (graph nodes) of
    the graph that AOT autograd hands the compiler (the graph inductor would
    compile)."""
    from torch._dynamo.backends.common import aot_autograd

    nodes = []

    def record(graph_module, example_inputs):
        nodes.extend(node for node in graph_module.graph.nodes
                     if node.op == "call_function" and str(node.target).startswith("aten."))
        return graph_module

    out = compiled_under_patch(lambda: torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))(*args))
    return out, nodes


def _traced_ops(fn, *args):
    """How often each aten op occurs in the graph of ``_traced``."""
    return collections.Counter(str(node.target).split(".")[1] for node in _traced(fn, *args)[1])


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


@torch.no_grad()
@pytest.mark.parametrize("keys", [8, 1 << 16])
def test_compiled_key_count_is_int16_only_where_a_row_fits(keys):
    """Under torch.compile a bool row's keys are counted in int16 (inductor's CPU
    code for it is about twice as fast as for int32) where the running torch can
    tell compiling from exporting (ONNX has no int16 sum). A row of 2**16
    admitted keys counts 0 in int16, which reads "fully masked": it would be
    cleared, so such rows are counted in int32."""
    q, kv = torch.randn(1, 1, 2, 8), torch.randn(1, 1, keys, 8)
    keep = torch.ones(1, 1, 2, keys, dtype=torch.bool)
    keep[..., 1, :] = False
    fn = lambda q: F.scaled_dot_product_attention(q, kv, kv, attn_mask=keep)  # noqa: E731
    expected = fn(q)
    got, nodes = _traced(fn, q)
    counts = [node.kwargs.get("dtype") for node in nodes if str(node.target).startswith("aten.sum.")]
    assert torch.equal(got[..., 0, :], expected[..., 0, :])
    assert torch.equal(got[..., 1, :], torch.zeros(1, 1, 8))
    fits = keys < 1 << 15 and hasattr(torch.compiler, "is_exporting")
    assert counts == [torch.int16 if fits else torch.int32]
