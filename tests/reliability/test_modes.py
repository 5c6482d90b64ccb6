"""Issue 5.3: torch.compile(fullgraph=True), inference_mode, autocast, reduced and
double precision, deterministic algorithms, and TorchScript.

What the patch reaches: eager calls in every grad mode (grad, no_grad,
inference_mode), autocast, any float dtype, deterministic mode, and
torch.compile (dynamo traces through the wrappers without a graph break).
What it cannot reach: TorchScript. Scripted code binds aten ops and its own
compiled copy of F.multi_head_attention_forward at script time, so a scripted
module runs PyTorch's unpatched kernels; it still runs, unchanged, with the
patch on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch
from tests.torch_baseline import compiled_under_patch

from ..core.helpers import naive_sdpa
from ._common import causal, left_pad, same

DIM, HEADS = 8, 2
KPM = left_pad([1, 4])  # row 0: queries 0..2 see only pad keys under the causal mask
MASK = causal()
MASKED = torch.zeros(2, 4, dtype=torch.bool)
MASKED[0, :3] = True
VALID = ~MASKED


class Small(nn.Module):
    """MHA (need_weights=True) feeding a TransformerEncoderLayer."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(DIM, HEADS, 16, dropout=0.0, batch_first=True)

    def forward(self, x, kpm, mask):
        a, w = self.attn(x, x, x, key_padding_mask=kpm, attn_mask=mask)
        return self.enc(x + a, src_mask=mask, src_key_padding_mask=kpm), a, w


def _small(dtype=torch.float32):
    torch.manual_seed(0)
    return Small().to(dtype), torch.randn(2, 4, DIM, dtype=dtype)


def _check_mha_contract(a, w, bias):
    """Masked rows: exactly out_proj.bias and weight rows exactly 0; all finite."""
    assert torch.isfinite(a).all() and torch.isfinite(w).all()
    assert torch.equal(a[MASKED], bias.expand(int(MASKED.sum()), -1).to(a.dtype))
    assert torch.equal(w[MASKED], torch.zeros_like(w[MASKED]))


@pytest.fixture
def graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_compile_fullgraph_aot_eager_equals_eager(graph_breaks):
    model, x = _small()
    attnpatch.apply()
    x_eager = x.clone().requires_grad_()
    eager = model(x_eager, KPM, MASK)
    eager[0][VALID].sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()] + [x_eager.grad]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x_comp = x.clone().requires_grad_()
    out = compiled(x_comp, KPM, MASK)
    out[0][VALID].sum().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x_comp.grad]

    assert not graph_breaks["graph_break"]
    _check_mha_contract(out[1], out[2], model.attn.out_proj.bias.detach())
    for a, b in zip(out, eager):
        assert torch.equal(a, b)
    for a, b in zip(grads, eager_grads):
        assert torch.isfinite(a).all() and torch.equal(a, b)

    # eval + no_grad: eager takes the fused fast paths, compiled the Python path.
    model.eval()
    with torch.no_grad():
        eager, out = model(x, KPM, MASK), compiled(x, KPM, MASK)
    _check_mha_contract(out[1], out[2], model.attn.out_proj.bias)
    for a, b in zip(out, eager):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_inductor(graph_breaks):
    model, x = _small()
    with attnpatch.patched():
        eager = model(x, KPM, MASK)
    out = compiled_under_patch(lambda: torch.compile(model, fullgraph=True)(x, KPM, MASK))
    assert not graph_breaks["graph_break"]
    _check_mha_contract(out[1], out[2], model.attn.out_proj.bias.detach())
    for a, b in zip(out, eager):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _hf_targets_ready() -> bool:
    from attnpatch.targets import hf_attention

    return hf_attention.POINTS != []


def test_compile_tiny_hf_model(graph_breaks):
    """Real kernels (a Python stand-in for a NaN kernel under a wrapt wrapper is
    inlined by dynamo, bypassing the wrapper, so it cannot be used here)."""
    transformers = pytest.importorskip("transformers")
    if not _hf_targets_ready():
        pytest.skip("attnpatch.targets.hf_attention is still a placeholder")
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        unpatched = model(input_ids=ids, attention_mask=am).logits
        with attnpatch.patched():
            eager = model(input_ids=ids, attention_mask=am).logits
        out = compiled_under_patch(
            lambda: torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=am).logits
        )
    assert not graph_breaks["graph_break"]
    assert torch.isfinite(eager).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    valid = am.bool()
    assert torch.equal(eager[valid], unpatched[valid])  # real tokens: bitwise the unpatched model


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_grad_modes(mode, train):
    model, x = _small()
    model.train(train)
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        bug = model(x, KPM, MASK)
        with attnpatch.patched():
            out = model(x, KPM, MASK)
    assert any(torch.isnan(t).any() for t in bug), "the bug must show without attnpatch"
    _check_mha_contract(out[1], out[2], model.attn.out_proj.bias)
    assert torch.isfinite(out[0]).all()
    for a, b in zip(out[1:], bug[1:]):  # MHA output and weights: valid rows bitwise
        assert torch.equal(a[VALID], b[VALID])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fast", [False, True], ids=["python-path", "fast-path"])
def test_dtypes(dtype, fast):
    model, x = _small(dtype)
    mha = model.attn.train(not fast)
    x.requires_grad_(not fast)
    with torch.no_grad() if fast else torch.enable_grad():
        bug_a, bug_w = mha(x, x, x, key_padding_mask=KPM, attn_mask=MASK)
        with attnpatch.patched():
            a, w = mha(x, x, x, key_padding_mask=KPM, attn_mask=MASK)
    assert torch.isnan(bug_a).any()
    assert a.dtype == dtype
    _check_mha_contract(a.detach(), w.detach(), mha.out_proj.bias.detach())
    assert torch.equal(a[VALID], bug_a[VALID]) and torch.equal(w[VALID], bug_w[VALID])
    if not fast:
        a[VALID].sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in mha.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sdpa_dtypes_with_nan_kernel(dtype, monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 8, dtype=dtype) for _ in range(3))
    keep = ~KPM[:, None, None, :] & ~MASK[None, None]
    bug = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    with attnpatch.patched("sdpa"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    rows = ~keep.any(-1).expand(2, 2, 4)
    assert torch.isnan(bug).any()
    assert out.dtype == dtype
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.equal(out[~rows], bug[~rows])


def test_autocast_cpu_bf16():
    model, x = _small()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bug_a, bug_w = model.attn(x, x, x, key_padding_mask=KPM, attn_mask=MASK)
        with attnpatch.patched():
            a, w = model.attn(x, x, x, key_padding_mask=KPM, attn_mask=MASK)
            out = model(x, KPM, MASK)
    assert torch.isnan(bug_a).any()
    assert a.dtype == bug_a.dtype
    assert torch.equal(a[VALID], bug_a[VALID]) and torch.equal(w[VALID], bug_w[VALID])
    _check_mha_contract(a.detach(), w.detach(), model.attn.out_proj.bias.detach().to(a.dtype))
    out[0].float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_deterministic_algorithms():
    model, x = _small()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            model.zero_grad()
            xi = x.clone().requires_grad_()
            with attnpatch.patched():
                out = model(xi, KPM, MASK)
            out[0].sum().backward()
            results.append([*out, xi.grad, *(p.grad.clone() for p in model.parameters())])
    finally:
        torch.use_deterministic_algorithms(before)
    _check_mha_contract(results[0][1].detach(), results[0][2].detach(), model.attn.out_proj.bias.detach())
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.equal(a, b)


class MyAttention(nn.MultiheadAttention):
    """A user subclass whose own forward calls F.multi_head_attention_forward."""

    def forward(self, x: torch.Tensor, kpm: torch.Tensor, mask: torch.Tensor):  # type: ignore[override]
        q = x.transpose(0, 1)
        out, w = F.multi_head_attention_forward(
            q,
            q,
            q,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            None,
            None,
            False,
            0.0,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=kpm,
            need_weights=True,
            attn_mask=mask,
        )
        return out.transpose(0, 1) * 2.0, w


def _scripted_cases():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
    enc = nn.TransformerEncoderLayer(DIM, HEADS, 16, dropout=0.0, batch_first=True)
    sub = MyAttention(DIM, HEADS, batch_first=True)
    return {
        "mha": (mha, lambda m, x: m(x, x, x, key_padding_mask=KPM, attn_mask=MASK)),
        "encoder_layer": (enc, lambda m, x: m(x, src_mask=MASK, src_key_padding_mask=KPM)),
        "subclass": (sub, lambda m, x: m(x, KPM, MASK)),
    }


@pytest.mark.parametrize("name", ["mha", "encoder_layer", "subclass"])
@pytest.mark.parametrize("train", [False, True], ids=["eval-no_grad", "train"])
def test_torchscript_runs_unchanged(name, train):
    """Scripted modules are out of reach: with the patch on (scripted before or
    after it was applied) they give exactly what they give without it."""
    module, call = _scripted_cases()[name]
    module.train(train)
    x = torch.randn(2, 4, DIM)
    with torch.no_grad() if not train else torch.enable_grad():
        scripted_before = torch.jit.script(module)
        reference = call(scripted_before, x)
        eager_bug = call(module, x)
        with attnpatch.patched():
            scripted_during = torch.jit.script(module)
            results = [call(scripted_before, x), call(scripted_during, x)]
            eager_patched = call(module, x)

    def flatten(r):
        return list(r) if isinstance(r, tuple) else [r]

    for result in results:
        for a, b in zip(flatten(result), flatten(reference)):
            assert same(a.detach(), b.detach())
    # ...while the same module run eagerly is patched (the patch was live).
    for a, _ in zip(flatten(eager_patched), flatten(eager_bug)):
        assert torch.isfinite(a).all()
    for a, b in zip(flatten(eager_bug), flatten(reference)):
        assert same(a.detach(), b.detach())
