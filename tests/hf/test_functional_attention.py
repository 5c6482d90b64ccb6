"""attn_implementation="attnpatch_sdpa": tiny left-padded Llama and Qwen2 saved and
loaded back with it, with attnpatch never applied (the autouse fixture checks it).

On CPU torch's SDPA kernel already gives a fully masked row 0, so the bug is
shown with a NaN-producing stand-in for the GPU kernels, and the fix's own path
(the one CUDA takes) is forced with ``masks.FORCE_GENERAL_PATH``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM

import attnpatch
import attnpatch.transformers
from attnpatch import masks
from tests.core.helpers import has_nan
from tests.hf.helpers import left_padded, tiny_model
from tests.hf.test_attention import naive_sdpa

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]  # left-padded to width 6
IDS, MASK = left_padded(PROMPTS)
VALID, PADS = MASK.bool(), ~MASK.bool()
LABELS = IDS.masked_fill(PADS, -100)  # a loss that ignores the pads


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def saved(request, tmp_path_factory):
    """A tiny random model of each kind, saved as a checkpoint."""
    attnpatch.transformers.register()
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, "sdpa").save_pretrained(path)
    return path


def _load(path, attn):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model


def _run(model, train=False):
    """Logits, the attention output of every position per layer (o_proj's input)
    and, with ``train``, the loss and every parameter's gradient."""
    model.train(train)
    seen = []
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        for layer in model.model.layers
    ]
    try:
        with torch.set_grad_enabled(train):
            out = model(input_ids=IDS, attention_mask=MASK, labels=LABELS if train else None)
            grads = torch.autograd.grad(out.loss, list(model.parameters())) if train else ()
    finally:
        for hook in hooks:
            hook.remove()
    return out.logits.detach(), seen, [out.loss.detach()] if train else [], list(grads)


def _assert_pad_rows_zero(outputs):
    for out in outputs:
        assert torch.equal(out[PADS], torch.zeros_like(out[PADS]))


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training step"])
@pytest.mark.parametrize("general", [False, True], ids=["cpu path", "general path"])
def test_bitwise_sdpa(saved, monkeypatch, general, train):
    """With torch's own kernel: pad rows 0, everything else bitwise what the
    model computes with "sdpa" (forward, loss, gradients), on both paths."""
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", general)
    logits, _, loss, grads = _run(_load(saved, "sdpa"), train)
    got_logits, outputs, got_loss, got_grads = _run(_load(saved, "attnpatch_sdpa"), train)
    assert torch.equal(got_logits[VALID], logits[VALID])
    _assert_pad_rows_zero(outputs)
    for got, expected in zip(got_loss + got_grads, loss + grads):
        assert torch.equal(got, expected)
    assert not has_nan(got_logits, *got_grads)


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training step"])
def test_nan_kernel(saved, monkeypatch, train):
    """A kernel that gives a fully masked row NaN (as several GPU kernels do):
    "sdpa" spreads it to every logit and gradient; "attnpatch_sdpa" gives pad
    rows 0 and is bitwise the patched "sdpa"."""
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    plain = _load(saved, "sdpa")
    logits, _, _, grads = _run(plain, train)
    assert has_nan(logits, *grads), "the stand-in kernel shows the bug"
    got = _run(_load(saved, "attnpatch_sdpa"), train)
    with attnpatch.patched("hf_attention"):
        patched = _run(plain, train)
    assert not has_nan(got[0], *got[3])
    _assert_pad_rows_zero(got[1])
    for a, b in zip([got[0], *got[1], *got[2], *got[3]], [patched[0], *patched[1], *patched[2], *patched[3]]):
        assert torch.equal(a, b)


def test_nothing_is_patched(saved):
    original = modeling_utils.AttentionInterface._global_mapping["sdpa"]
    _run(_load(saved, "attnpatch_sdpa"))
    assert modeling_utils.AttentionInterface._global_mapping["sdpa"] is original
    assert original.__module__ == "transformers.integrations.sdpa_attention"
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert all(entry["state"] == "off" for entry in attnpatch.status().values())


def test_registers_only_when_asked():
    """In a fresh interpreter: importing attnpatch (and this module) registers
    nothing; register() adds the name to both registries, twice as once."""
    code = """
import transformers.masking_utils as masking, transformers.modeling_utils as modeling
import attnpatch, attnpatch.functional, attnpatch.transformers
functions, masks = modeling.AttentionInterface._global_mapping, masking.AttentionMaskInterface._global_mapping
assert "attnpatch_sdpa" not in functions and "attnpatch_sdpa" not in masks
before = dict(functions), dict(masks)
attnpatch.transformers.register(); attnpatch.transformers.register()
assert functions.pop("attnpatch_sdpa") is attnpatch.transformers.sdpa_attention_forward
assert masks.pop("attnpatch_sdpa") is masks["sdpa"]
assert (functions, masks) == before
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_set_attn_implementation(monkeypatch):
    attnpatch.transformers.register()
    model = tiny_model("llama", "sdpa")
    if not hasattr(model, "set_attn_implementation"):
        pytest.skip(f"transformers {transformers.__version__} has no set_attn_implementation")
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    assert has_nan(_run(model)[0])
    model.set_attn_implementation("attnpatch_sdpa")
    assert model.config._attn_implementation == "attnpatch_sdpa"
    logits, outputs, _, _ = _run(model)
    assert not has_nan(logits)
    _assert_pad_rows_zero(outputs)


@torch.no_grad()
def test_compiled(monkeypatch):
    """torch.compile(fullgraph=True) traces the fix into the graph, here around
    the NaN-producing stand-in kernel (dynamo reads no value, so the CPU
    kernel's own safety is not relied on)."""
    attnpatch.transformers.register()
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    model = tiny_model("llama", "attnpatch_sdpa")
    expected = model(input_ids=IDS, attention_mask=MASK).logits
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(input_ids=IDS, attention_mask=MASK).logits
    finally:
        torch._dynamo.reset()
    assert not has_nan(expected, got)
    torch.testing.assert_close(got, expected)
