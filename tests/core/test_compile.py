"""torch.compile(fullgraph=True) of code using the patched ops works and matches
eager (where the same torch can compile the case without attnpatch)."""

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch
from tests.torch_baseline import compiled_under_patch, unpatched_or_skip

from .helpers import causal_drop_mask, has_nan, left_padded_keep_mask, left_padding, naive_sdpa, to_float_mask

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
    _compiled_equals_eager(
        lambda x: enc(x, mask=am, src_key_padding_mask=kpm), torch.randn(B, L, E), backend="inductor"
    )


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
        nodes.extend(
            node
            for node in graph_module.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("aten.")
        )
        return graph_module

    out = compiled_under_patch(
        lambda: torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))(*args)
    )
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


def _forwarding_sdpa(*args, **kwargs):
    """Another library's attention that forwards every argument (no defaults)."""
    return naive_sdpa(*args, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("replacement", [naive_sdpa, _forwarding_sdpa], ids=["with defaults", "forwarding *args"])
def test_sdpa_replaced_by_a_python_function_is_fixed_when_compiled(monkeypatch, replacement):
    """A library's Python function put in F.scaled_dot_product_attention's place
    before attnpatch (as SageAttention's users do), here one that gives a fully
    masked row NaN. dynamo traced a wrapt proxy of such a function as the
    function itself: the compiled call ran unfixed (NaN), or, with defaults in
    the signature, failed on dynamo's own guards (AssertionError). Removal puts
    the library's function back."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", replacement)
    keep = left_padded_keep_mask(LENGTHS, L)
    q = torch.randn(B, H, L, 8)
    fn = lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=keep)  # noqa: E731
    unpatched = unpatched_or_skip(lambda: torch.compile(fn, fullgraph=True, backend="aot_eager")(q), "this compile")
    assert has_nan(unpatched), "the stand-in kernel shows the bug"
    got = compiled_under_patch(lambda: torch.compile(fn, fullgraph=True, backend="aot_eager")(q), "sdpa")
    rows = keep.logical_not().all(-1).expand(B, H, L)
    assert torch.equal(got[rows], torch.zeros_like(got[rows]))
    assert torch.equal(got[~rows], unpatched[~rows])
    assert F.scaled_dot_product_attention is replacement


def _calls_of_growing_length(attend, float_mask, grad):
    """``attend`` on three sequence lengths, each batch with one left-padded row:
    per call, (output, query gradient, fully masked rows)."""
    results = []
    for seq_len, lengths in [(8, [3, 8]), (12, [5, 12]), (16, [9, 16])]:
        gen = torch.Generator().manual_seed(seq_len)
        q, k, v = (torch.randn(B, H, seq_len, 8, generator=gen).requires_grad_(grad) for _ in range(3))
        keep = left_padded_keep_mask(lengths, seq_len)
        out = attend(q, k, v, to_float_mask(keep) if float_mask else keep)
        if grad:
            out.sum().backward()
        results.append((out.detach(), q.grad, keep.logical_not().all(-1).expand(out.shape[:-1])))
    return results


@pytest.mark.parametrize(
    ("dynamic", "backend", "grad"),
    [(None, "aot_eager", True), (True, "aot_eager", True), (None, "inductor", False)],
    ids=["automatic dynamic, backward", "dynamic=True, backward", "automatic dynamic, inductor"],
)
@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
def test_lengths_that_change_between_calls(monkeypatch, dynamic, backend, grad, float_mask):
    """Sequence lengths that change from call to call: torch.compile recompiles
    once with symbolic shapes (automatic dynamic, its default) or traces them so
    from the start. The fix is traced with symbolic shapes: as many graphs as
    without attnpatch, fully masked rows 0 (with a NaN-producing kernel
    underneath), the others as unpatched; gradients finite, 0 in those rows."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    attend = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731

    def compile_and_run():
        counters.clear()
        compiled = torch.compile(attend, fullgraph=True, backend=backend, dynamic=dynamic)
        return _calls_of_growing_length(compiled, float_mask, grad), counters["stats"]["unique_graphs"]

    unpatched, graphs = unpatched_or_skip(compile_and_run, "this compile")
    assert has_nan(*(out for out, _, _ in unpatched)), "the stand-in kernel shows the bug"
    patched, patched_graphs = compiled_under_patch(compile_and_run, "sdpa")
    assert patched_graphs == graphs
    for (out, q_grad, rows), (expected, expected_grad, _) in zip(patched, unpatched):
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        torch.testing.assert_close(out[~rows], expected[~rows], atol=1e-6, rtol=1e-6)
        if grad:
            assert not has_nan(q_grad)
            assert torch.equal(q_grad[rows], torch.zeros_like(q_grad[rows]))
            torch.testing.assert_close(q_grad[~rows], expected_grad[~rows], atol=1e-6, rtol=1e-6)
