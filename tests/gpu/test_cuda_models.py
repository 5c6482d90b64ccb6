"""On CUDA: tiny left-padded Llama and Qwen2, forward and a training step. Pad
rows 0, every valid row as the same call computes it without attnpatch, and no
host-device synchronisation added (see host_syncs).

Skipped without CUDA; ``make cuda-report`` runs them on a CUDA machine.
"""

import pytest
import torch

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
