"""Issue 9.4: exported models keep the fix. ``torch.export.export`` and
``torch.onnx.export(..., dynamo=True)`` of SDPA with a padded mask,
``nn.MultiheadAttention``, ``nn.TransformerEncoder`` and a tiny left-padded Llama,
exported while attnpatch is on, give the contract's answer (0, not NaN, on fully
masked rows) when the exported program runs, and in ONNX Runtime on CPU, with
attnpatch no longer active. Exported without attnpatch, they give NaN or wrong
rows where that is so; where torch's own CPU kernel already gives 0, the test
says so.

While exporting, attnpatch never looks at values (``may_inspect_values`` is False
under tracing), so the fix is traced into the graph as ordinary ops (``any``/``all``,
``masked_fill``, ``aten._safe_softmax``), also where eager CPU calls pass straight
through to torch's own safe kernel: the exported program is safe on any runtime.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch
from attnpatch.targets import torch_sdpa
from tests.core.helpers import causal_drop_mask, left_padded_keep_mask, left_padding
from tests.torch_baseline import unpatched_or_skip

B, L, E, H = 2, 5, 16, 2
LENGTHS = [3, 5]  # batch 0 is left-padded by 2
FIX_REDUCTIONS = ("amax", "amin", "any", "all", "sum")  # how the fix finds fully masked rows: one per fixed call
FIX_OPS = (*FIX_REDUCTIONS, "_safe_softmax")  # what the fix adds to a graph


class SDPA(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MHA(nn.Module):
    """need_weights=True, the default: NaN without attnpatch on CPU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        nn.init.normal_(self.attn.out_proj.bias)

    def forward(self, x, key_padding_mask, attn_mask):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, key_padding_mask, attn_mask):
        return self.encoder(x, mask=attn_mask, src_key_padding_mask=key_padding_mask, is_causal=False)


class Llama(nn.Module):
    def __init__(self, attn):
        super().__init__()
        from tests.hf.helpers import tiny_model

        self.model = tiny_model("llama", attn)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _torch_cpu_kernel_is_safe() -> bool:
    return torch_sdpa._check_cpu_kernels(torch.float32)


def _llama_case(attn):
    pytest.importorskip("transformers", reason="the Llama case needs transformers")
    import transformers.masking_utils as masking_utils

    from tests.hf.helpers import left_padded

    if not getattr(masking_utils, "_is_torch_greater_or_equal_than_2_6", True):
        pytest.skip(
            f"on torch {torch.__version__} transformers builds masks with torch.vmap, which this "
            "torch's export cannot trace, with or without attnpatch (and a failed attempt leaves "
            "vmap's state behind for the tests after it)"
        )

    ids, mask = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    return Llama(attn), (ids, mask), (1, slice(0, 3))


# name -> () -> (module, inputs, index of the fully masked rows in the output)
CASES = {
    "sdpa": lambda: (
        SDPA(),
        (
            *(torch.randn(B, H, L, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)),
            left_padded_keep_mask(LENGTHS, L),
        ),
        (0, slice(None), slice(0, 2)),
    ),
    "mha": lambda: (MHA(), (torch.randn(B, L, E), left_padding(LENGTHS, L), causal_drop_mask(L)), (0, slice(0, 2))),
    "encoder": lambda: (
        Encoder(),
        (torch.randn(B, L, E), left_padding(LENGTHS, L), causal_drop_mask(L)),
        (0, slice(0, 2)),
    ),
    "llama-sdpa": lambda: _llama_case("sdpa"),
    "llama-eager": lambda: _llama_case("eager"),
}

# What the unpatched export gives when torch's program runs on CPU: NaN, wrong
# (finite, but not the contract's answer), or already right.
UNPATCHED_EXPORT = {
    "sdpa": "right if torch's CPU kernel is safe",  # torch's CPU SDPA gives fully masked rows 0
    "mha": "nan",  # softmax over a row of -inf
    "encoder": "right if torch's CPU kernel is safe",  # need_weights=False: SDPA inside
    "llama-sdpa": "right if torch's CPU kernel is safe",
    "llama-eager": "wrong",  # transformers' lowest-value mask: pad rows are averages of the pad keys
}


@functools.cache
def _case(name):
    module, inputs, pad_rows = CASES[name]()
    module.eval()
    with attnpatch.patched():
        # Eager, under the contract. Grad mode on: export traces the Python path
        # of nn.MultiheadAttention / nn.TransformerEncoderLayer, never their fused
        # inference kernels, so the reference takes that path too.
        expected = module(*inputs).detach()
    return module, inputs, pad_rows, expected


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the ONNX exporter reports every step
        yield
        logging.disable(level)


def _export(module, inputs, patched):
    with attnpatch.patched() if patched else contextlib.nullcontext():
        return torch.export.export(module, inputs)


@functools.cache
def _unpatched_program(name):
    """The case exported without attnpatch; where this torch cannot export it
    at all, the test skips and says so."""
    module, inputs, _, _ = _case(name)
    return unpatched_or_skip(lambda: _export(module, inputs, patched=False), "torch.export of this case")


def _graph_op_names(program) -> list:
    return [
        getattr(node.target, "__name__", str(node.target)).split(".")[0]
        for node in program.graph.nodes
        if node.op == "call_function"
    ]


def _graph_ops(program) -> set:
    return set(_graph_op_names(program))


def _is_right(out, expected) -> bool:
    return bool(torch.isfinite(out).all()) and torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def _check_patched(name, out, expected, pad_rows, exact):
    module = _case(name)[0]
    assert torch.isfinite(out).all()
    if exact:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if name == "sdpa":
        assert torch.equal(out[pad_rows], torch.zeros_like(out[pad_rows]))
    elif name == "mha":  # out_proj(0): the bias
        torch.testing.assert_close(
            out[pad_rows],
            module.attn.out_proj.bias.detach().expand_as(out[pad_rows]),
            rtol=0,
            atol=0 if exact else 1e-6,
        )


@pytest.mark.parametrize("name", ["sdpa", "encoder", "llama-sdpa"])
def test_exported_graph_has_the_fix_once_per_sdpa_call(name):
    """Export's tracing modes hand the fix's own kernel call back through the
    patched SDPA; fixed again each time, an exported SDPA call carried 3 to 4
    copies of the fix (torch 2.5: 3, 2.13: 4), each a pass over the mask and
    one over the output, in torch and in ONNX Runtime."""
    module, inputs, _, _ = _case(name)
    plain = collections.Counter(_graph_op_names(_unpatched_program(name)))
    ops = collections.Counter(_graph_op_names(_export(module, inputs, patched=True)))
    calls = sum(count for op, count in ops.items() if "scaled_dot_product" in op)
    assert calls > 0, ops
    # Reductions the model's own code makes (a mask builder's) are in both graphs.
    assert sum(ops[op] - plain[op] for op in FIX_REDUCTIONS) == calls, (ops, plain)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_export(name):
    module, inputs, pad_rows, expected = _case(name)
    plain_program = _unpatched_program(name)
    patched_program = _export(module, inputs, patched=True)
    assert set(FIX_OPS) & _graph_ops(patched_program), "the fix is not in the exported graph"

    plain = plain_program.module()(*inputs)
    expectation = UNPATCHED_EXPORT[name]
    if expectation == "nan":
        assert torch.isnan(plain).any()  # the bug, first
    elif expectation == "wrong":
        assert torch.isfinite(plain).all() and not _is_right(plain, expected)
    elif _torch_cpu_kernel_is_safe():
        # Already right on CPU: torch's own CPU kernel gives fully masked rows 0. The
        # same program on another device or runtime need not be (see the ONNX test).
        assert _is_right(plain, expected)
    # Exported without attnpatch, a program is not fixed by turning attnpatch on
    # when it runs: it calls aten ops, not the functions attnpatch wraps.
    with attnpatch.patched():
        assert torch.equal(plain_program.module()(*inputs).nan_to_num(), plain.nan_to_num())

    # attnpatch is off now: the program itself carries the fix.
    _check_patched(name, patched_program.module()(*inputs).detach(), expected, pad_rows, exact=True)


def _onnx_runtime_output(module, inputs, patched):
    ort = pytest.importorskip("onnxruntime", reason="ONNX tests need the 'export' extra (onnxruntime)")
    pytest.importorskip("onnx", reason="ONNX tests need the 'export' extra (onnx)")
    pytest.importorskip("onnxscript", reason="ONNX tests need the 'export' extra (onnxscript)")
    with attnpatch.patched() if patched else contextlib.nullcontext():
        program = torch.onnx.export(module, inputs, dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_runtime(name):
    module, inputs, pad_rows, expected = _case(name)
    plain = unpatched_or_skip(
        lambda: _onnx_runtime_output(module, inputs, patched=False),
        "this case through torch.onnx.export and ONNX Runtime",
    )
    # The bug, first: exported without attnpatch, ONNX Runtime's CPU kernels give
    # NaN (softmax over a row of -inf) or a finite but wrong row.
    assert not _is_right(plain, expected)
    _check_patched(name, _onnx_runtime_output(module, inputs, patched=True), expected, pad_rows, exact=False)
