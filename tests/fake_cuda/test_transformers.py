"""Target hf_attention on its CUDA branch: transformers' sdpa, eager and flex
attention inside tiny left-padded Llama and Qwen2 models, forward and a training
step.

Not on fake *CUDA* tensors: on a CPU-only build of torch, transformers' mask
builder and its attention functions themselves fail there with or without
attnpatch (indexing with None, ``.contiguous()``: their Python bindings want a
real CUDA device), and autograd cannot record fake CUDA tensors. Fake CPU
tensors take the same branch of attnpatch (it never reads a fake tensor), and
real CPU tensors take it with the general path forced."""

import pytest
import torch

import attnpatch

from .probe import assert_no_new_host_reads, fake_like, fake_mode, general_path

transformers = pytest.importorskip("transformers", reason="needs transformers")

from tests.hf.helpers import left_padded, tiny_model  # noqa: E402
from tests.torch_baseline import unpatched_or_skip  # noqa: E402

IDS, MASK = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]])
B, T = IDS.shape


def _step(model, params, ids, mask, train):
    def run():
        logits = torch.func.functional_call(model, params, (ids,), dict(attention_mask=mask)).logits
        if not train:
            return logits
        return logits, torch.autograd.grad(logits.float().sum(), [p for p in params.values() if p.requires_grad])

    return run


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training step"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_model_on_fake_tensors(kind, attn, train):
    model = tiny_model(kind, attn).train(train)
    with fake_mode():
        params = fake_like(model, "cpu", requires_grad=train)
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.ones(B, T, dtype=torch.long)
        with torch.set_grad_enabled(train):
            assert_no_new_host_reads(_step(model, params, ids, mask, train), "")


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training step"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_model_general_path_on_real_tensors(kind, attn, train):
    """Real left-padded inputs: transformers reads its padding mask on the host
    itself; attnpatch adds no read to those."""
    model = tiny_model(kind, attn).train(train)
    params = {name: p.detach().requires_grad_(train) for name, p in model.named_parameters()}
    with general_path(), torch.set_grad_enabled(train):
        unpatched, _ = assert_no_new_host_reads(_step(model, params, IDS, MASK, train), "")
    assert unpatched.reads, "transformers reads the padding mask itself; the check compares against that"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_flex_attention_is_passed_through_untouched(kind, monkeypatch):
    """Flex cannot be recorded op by op (it compiles itself, and torch.compile
    refuses to run under a TorchDispatchMode), nor run on fake tensors. It needs
    no recording: transformers gives it a BlockMask, and attnpatch's flex entry
    hands such a call on without a single tensor operation, so it can add no
    host read. Shown by making every mask function of attnpatch fail. (Forward
    only: torch's flex has no backward on CPU.)"""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from attnpatch import masks

    model = tiny_model(kind, "flex_attention")
    params = {name: p.detach() for name, p in model.named_parameters()}
    expected = unpatched_or_skip(_step(model, params, IDS, MASK, False), "flex attention on CPU")

    def untouchable(*args, **kwargs):
        raise AssertionError("attnpatch worked on a flex call")

    for name in ("fully_masked_rows", "hf_fully_masked_rows", "admit_rows", "clear_rows", "rows_and_safe_mask"):
        monkeypatch.setattr(masks, name, untouchable)
    with general_path(), attnpatch.patched():
        got = _step(model, params, IDS, MASK, False)()
    assert torch.equal(got, expected)
