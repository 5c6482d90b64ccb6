"""Target hf_attention: left-padded forwards through eager, sdpa and flex attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_utils as modeling_utils

import attnpatch
from tests.hf.helpers import left_padded, tiny_model
from tests.torch_baseline import compiled_under_patch, unpatched_or_skip

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]  # left-padded to width 6
IDS, MASK = left_padded(PROMPTS)
VALID, PADS = MASK.bool(), ~MASK.bool()


def forward(model, **kwargs):
    """Logits and, per layer, the attention output of every position (o_proj's input)."""
    seen = []
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        for layer in model.model.layers
    ]
    try:
        out = model(input_ids=IDS, attention_mask=MASK, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen


def naive_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Plain-softmax attention: NaN on a fully masked row, like several CUDA kernels."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], 1)
    scores = (query @ key.transpose(-2, -1)) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, -1) @ value


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_left_padded_forward(kind, attn, monkeypatch):
    model = tiny_model(kind, attn)
    plain, _ = forward(model)
    with attnpatch.patched():
        patched, outputs = forward(model)
    # Valid positions: bitwise what transformers computes. Pad positions: attention output exactly 0.
    assert torch.equal(patched.logits[VALID], plain.logits[VALID])
    assert torch.isfinite(patched.logits).all()
    for out in outputs:
        assert torch.equal(out[PADS], torch.zeros_like(out[PADS]))

    if attn == "sdpa":
        # A kernel that gives NaN on fully masked rows, installed before the patch.
        monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
        assert torch.isnan(forward(model)[0].logits).any()  # the bug, without attnpatch
        with attnpatch.patched("hf_attention"):
            patched, outputs = forward(model)
        assert torch.isfinite(patched.logits).all()
        torch.testing.assert_close(patched.logits[VALID], plain.logits[VALID])
        for out in outputs:
            assert torch.equal(out[PADS], torch.zeros_like(out[PADS]))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_eager_weights_are_what_the_output_was_computed_from(kind):
    model = tiny_model(kind, "eager")
    with attnpatch.patched():
        out = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
        for weights in out.attentions:
            weights.retain_grad()
        out.logits[VALID].sum().backward()
    for weights in out.attentions:
        pad_rows = weights.transpose(1, 2)[PADS]  # (pads, heads, keys)
        assert torch.equal(pad_rows, torch.zeros_like(pad_rows))
        assert weights.grad is not None and torch.isfinite(weights.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_eager_custom_neg_inf_mask(dtype):
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama", "eager")
    attention = model.model.layers[0].self_attn
    q, k, v = (torch.randn(3, 4, 6, 8, dtype=dtype) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # 2 key/value heads, grouped
    keep = MASK.bool()[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    plain, _ = modeling_llama.eager_attention_forward(attention, q, k, v, mask, scaling=0.35)
    with attnpatch.patched("hf_attention"):
        out, weights = modeling_llama.eager_attention_forward(attention, q, k, v, mask, scaling=0.35)
    assert torch.isnan(plain).any()  # the bug, without attnpatch
    assert torch.equal(out[VALID], plain[VALID])
    assert torch.equal(out[PADS], torch.zeros_like(out[PADS]))
    assert torch.isfinite(weights).all()


@torch.no_grad()
def test_flex_attention_passes_through():
    """transformers gives flex a BlockMask, under which flex already gives pad rows 0
    (on CPU this test cannot fail without attnpatch: it guards that the patched
    dispatch keeps flex exact). Calling flex directly with a float tensor mask
    aborts inside torch 2.13's CPU flex kernel, so that path is not tested here."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_model("llama", "flex_attention")
    plain, _ = unpatched_or_skip(lambda: forward(model), "transformers' flex_attention on CPU")
    with attnpatch.patched():
        patched, outputs = forward(model)
    assert torch.equal(patched.logits[VALID], plain.logits[VALID])
    for out in outputs:
        assert torch.equal(out[PADS], torch.zeros_like(out[PADS]))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_compiled_llama_under_patch(attn):
    model = tiny_model("llama", attn)
    inputs = dict(input_ids=IDS, attention_mask=MASK, output_attentions=attn == "eager")
    with attnpatch.patched():
        reference = model(**inputs)
    out = compiled_under_patch(lambda: torch.compile(model, fullgraph=True, backend="eager")(**inputs))
    torch.testing.assert_close(out.logits, reference.logits)
    if attn == "eager":
        for weights in out.attentions:
            pad_rows = weights.transpose(1, 2)[PADS]
            assert torch.equal(pad_rows, torch.zeros_like(pad_rows))


def test_status_names_every_point():
    import transformers.models.llama.modeling_llama  # noqa: F401

    attnpatch.apply()
    points = {p["target"]: p["state"] for p in attnpatch.status()["hf_attention"]["points"]}
    assert points["transformers.modeling_utils.AttentionInterface._global_mapping['sdpa']"] == "installed"
    assert points["transformers.models.llama.modeling_llama.eager_attention_forward"] == "installed"
    attnpatch.remove()
    assert modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"].__module__ == "transformers.integrations.sdpa_attention"
    assert type(modeling_utils.AttentionInterface._global_mapping["sdpa"]).__name__ == "function"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_a_torch_function_mode_keeps_the_fix(attn):
    """transformers' attention functions are plain Python: a mode sees each torch
    call inside them, the fix's included (that is how an export records it)."""
    model = tiny_model("llama", attn)
    with attnpatch.patched():
        outside, _ = forward(model)
        with torch.device("cpu"):  # a TorchFunctionMode
            inside, outputs = forward(model)
    assert torch.equal(inside.logits, outside.logits)
    for out in outputs:
        assert torch.equal(out[PADS], torch.zeros_like(out[PADS]))


@torch.no_grad()
def test_sdpa_function_with_an_eager_style_float_mask():
    """transformers' sdpa attention function given a 4-D float mask that marks a
    pad query's keys with the dtype's lowest value (the eager masks' marker, and
    what a caller's own 4-D mask may hold): torch's kernel averages over them
    (finite garbage); with attnpatch the row is 0, every other row bitwise."""
    module = tiny_model("llama", "sdpa").model.layers[0].self_attn
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, :, 0] = torch.finfo(mask.dtype).min

    def attention():  # looked up at call time, as transformers does
        sdpa = modeling_utils.AttentionInterface._global_mapping["sdpa"]
        return sdpa(module, q, k, v, mask, dropout=0.0, scaling=8**-0.5)[0]  # (B, L, H, D)

    plain = attention()
    assert plain[0, 0].ne(0).any()  # the bug, without attnpatch
    with attnpatch.patched():
        out = attention()
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    assert torch.equal(out[0, 1:], plain[0, 1:]) and torch.equal(out[1], plain[1])
