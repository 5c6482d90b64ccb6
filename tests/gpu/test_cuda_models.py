"""On CUDA: tiny left-padded Llama and Qwen2 (forward and a training step) and a
compiled SDPA call. Pad rows 0, every valid row as the same call computes it
without attnpatch, and no host-device synchronisation added (see host_syncs).

Skipped without CUDA; ``make cuda-report`` runs them on a CUDA machine.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.host_syncs import run_adding_no_sync, under_attnpatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]  # left-padded to width 6


def _model_and_batch(kind, attn):
    pytest.importorskip("transformers", reason="needs transformers")
    from tests.hf.helpers import left_padded, tiny_model

    ids, mask = (t.cuda() for t in left_padded(PROMPTS))
    return tiny_model(kind, attn).cuda(), ids, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_forward(kind, attn):
    model, ids, mask = _model_and_batch(kind, attn)
    attention_outputs = []  # per layer, o_proj's input: the attention output of every position
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args: attention_outputs.append(args[0]))

    def call():
        attention_outputs.clear()
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    unpatched = call()
    patched = run_adding_no_sync(call, under_attnpatch(call))
    valid, pads = mask.bool(), ~mask.bool()
    assert torch.isfinite(patched).all()
    for out in attention_outputs:
        assert torch.equal(out[pads], torch.zeros_like(out[pads]))
    # Where the kernel left transformers' own result finite, attnpatch keeps it bitwise.
    finite = torch.isfinite(unpatched).all(-1) & valid
    assert torch.equal(patched[finite], unpatched[finite])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_left_padded_training_step(kind):
    model, ids, mask = _model_and_batch(kind, "sdpa")
    model.train()
    valid = mask.bool()[..., None]

    def call():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        # where, not a boolean index: an index would itself read the mask on the host.
        torch.where(valid, logits, 0.0).float().sum().backward()
        return logits

    run_adding_no_sync(call, under_attnpatch(call))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_compiled_sdpa():
    """The fix traced into an inductor graph: rows 0, no host read at run time.
    Each patch state compiles its own graph (dynamo guards on it) before the check."""
    batch, heads, length, dim = 2, 4, 64, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, device="cuda", generator=gen) for _ in range(3))
    real = torch.arange(length, device="cuda")[None] >= torch.tensor([length - 40, 0], device="cuda")[:, None]
    keep = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None] & real[:, None, None, :]
    attend = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), fullgraph=True)

    def call():
        return attend(q, k, v, keep)

    unpatched = call()
    under_attnpatch(call, "sdpa")()  # compiles the patched graph outside the check
    patched = run_adding_no_sync(call, under_attnpatch(call, "sdpa"))
    rows = ~keep.any(-1).expand(batch, heads, length)
    assert rows.any()
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))
    finite = torch.isfinite(unpatched).all(-1) & ~rows
    assert torch.equal(patched[finite], unpatched[finite])
