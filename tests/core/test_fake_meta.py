"""Issue 9.3: fake and meta tensors. Every target runs on ``torch.device("meta")``
(model init and forward) and under ``FakeTensorMode`` (what torch.compile and
torch.export trace with) with no data-dependent operation and no error, and
gives the output shapes, dtypes and devices that PyTorch gives without attnpatch.

Neither kind of tensor has values: reading one (``bool(t.any())``, ``.item()``,
``nonzero()``) raises, so a call that finishes took no data-dependent branch. The
aten ops each run dispatches show that the fix ran (it finds fully masked rows
with ``amax``/``amin`` and zeroes weights with ``aten._safe_softmax``), not a
pass-through.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import attnpatch

from .helpers import causal_drop_mask, left_padded_keep_mask, left_padding, to_float_mask

B, L, E, H = 2, 5, 16, 2
LENGTHS = [3, 5]


def _sdpa(float_mask: bool, grad: bool):
    q, k, v = (torch.randn(B, H, L, 8, requires_grad=grad) for _ in range(3))
    keep = left_padded_keep_mask(LENGTHS, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=to_float_mask(keep) if float_mask else keep)
    if grad:
        out.sum().backward()
        return out, q.grad, k.grad, v.grad
    return (out,)


def _mha(need_weights: bool, fast_path: bool):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).train(not fast_path)
    x = torch.randn(B, L, E, requires_grad=not fast_path)
    with torch.no_grad() if fast_path else contextlib.nullcontext():
        out, weights = mha(
            x, x, x, key_padding_mask=left_padding(LENGTHS, L), attn_mask=causal_drop_mask(L), need_weights=need_weights
        )
    if fast_path:
        return out, weights
    out.sum().backward()
    return out, weights, x.grad


def _encoder(fast_path: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(not fast_path)
    x = torch.randn(B, L, E)
    with torch.no_grad() if fast_path else contextlib.nullcontext():
        # is_causal given: left to guess, PyTorch compares the mask with a causal one
        # (a data-dependent branch of its own).
        return (encoder(x, mask=causal_drop_mask(L), src_key_padding_mask=left_padding(LENGTHS, L), is_causal=False),)


CASES = {
    "sdpa-bool": lambda: _sdpa(False, False),
    "sdpa-float-backward": lambda: _sdpa(True, True),
    "mha-need-weights-backward": lambda: _mha(True, False),
    "mha-no-weights-backward": lambda: _mha(False, False),
    "mha-fast-path": lambda: _mha(False, True),
    "mha-fast-path-weights": lambda: _mha(True, True),
    "encoder-fused": lambda: _encoder(True),
    "encoder-training": lambda: _encoder(False),
}


@contextlib.contextmanager
def _on(where: str):
    """Every tensor made inside is a meta tensor, or a fake CPU tensor."""
    if where == "meta":
        with torch.device("meta"):
            yield
    else:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield


def _signature(results) -> list:
    return [None if t is None else (type(t), t.shape, t.dtype, t.device) for t in results]


class _OpLog(TorchDispatchMode):
    """Counts the aten ops dispatched under it (inside the fake mode, if any)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


FIX_OPS = ("amax", "amin", "any", "all", "sum", "_safe_softmax")  # what the fix adds: finding rows, safe softmax


def _run(case, where: str, patched: bool) -> tuple[list, Counter]:
    log = _OpLog()
    try:
        with _on(where), log, attnpatch.patched() if patched else contextlib.nullcontext():
            return _signature(case()), log.ops
    except Exception as exc:
        if patched:
            raise
        pytest.skip(
            f"without attnpatch, torch/transformers cannot run this on {where} tensors: {type(exc).__name__}: {exc}"
        )


@pytest.mark.parametrize("where", ["meta", "fake"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_targets(name, where):
    expected, plain_ops = _run(CASES[name], where, patched=False)
    got, patched_ops = _run(CASES[name], where, patched=True)
    assert got == expected
    assert any(patched_ops[op] > plain_ops[op] for op in FIX_OPS), "the fix did not run"
    if where == "fake":
        assert all(kind is FakeTensor for kind, *_ in filter(None, got))


# --- transformers' attention functions and a tiny Llama -------------------------
# Not here: flex_attention. transformers hands it a BlockMask, which attnpatch
# passes through untouched; torch 2.13's FlexAttention itself refuses meta
# tensors and, given a tensor mask, crashes the process under FakeTensorMode.


def _hf_attention(kind: str):
    from transformers import LlamaConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    module = modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    q = torch.randn(B, 4, L, 8, requires_grad=True)
    k, v = (torch.randn(B, 2, L, 8, requires_grad=True) for _ in range(2))
    keep = left_padded_keep_mask(LENGTHS, L)
    if kind == "eager":
        # transformers' eager masks mark a masked key with the dtype's lowest value.
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        function = modeling_llama.eager_attention_forward
    else:
        mask, function = keep, ALL_ATTENTION_FUNCTIONS["sdpa"]
    out, weights = function(module, q, k, v, mask, scaling=8**-0.5, dropout=0.0)
    out.sum().backward()
    return out, weights, q.grad, k.grad, v.grad


def _llama(attn: str):
    from tests.hf.helpers import left_padded, tiny_model

    model = tiny_model("llama", attn).train()
    ids, mask = left_padded([[5, 6, 7, 8, 9], [10, 11]])
    ids, mask = ids.to(torch.get_default_device()), mask.to(torch.get_default_device())
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.logits, out.loss, model.model.layers[0].self_attn.q_proj.weight.grad


HF_CASES = {
    "sdpa-function": lambda: _hf_attention("sdpa"),
    "eager-function": lambda: _hf_attention("eager"),
    "llama-eager": lambda: _llama("eager"),
    "llama-sdpa": lambda: _llama("sdpa"),
}


@pytest.mark.parametrize("where", ["meta", "fake"])
@pytest.mark.parametrize("name", list(HF_CASES))
def test_transformers_targets(name, where):
    pytest.importorskip("transformers", reason="needs transformers")
    expected, plain_ops = _run(HF_CASES[name], where, patched=False)
    got, patched_ops = _run(HF_CASES[name], where, patched=True)
    assert got == expected
    assert any(patched_ops[op] > plain_ops[op] for op in FIX_OPS), "the fix did not run"
    if where == "fake":
        assert all(kind is FakeTensor for kind, *_ in filter(None, got))
