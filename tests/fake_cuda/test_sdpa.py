"""Target sdpa on its CUDA branch: fake CUDA tensors, and real CPU tensors with
the general path forced. No host read added, same result shape/dtype/device.
Numerics of this branch: tests/core/test_general_path.py."""

import pytest
import torch
import torch.nn.functional as F

from .probe import BRANCHES, assert_no_new_host_reads, cuda_branch, fake_mode, general_path

B, H, L, S, D = 2, 4, 5, 6, 8
MASK_SHAPES = [(L, S), (1, S), (H, L, S), (B, 1, L, S), (B, H, L, S), (1, H, 1, S), (B, 1, 1, S), (1, 1, L, S)]


def _mask(shape, kind, device, dtype):
    keep = torch.ones(shape, dtype=torch.bool, device=device).tril(-1)  # row 0 of every (L, S) block admits nothing
    if kind == "bool":
        return keep
    if kind == "float":
        return torch.zeros(shape, device=device, dtype=dtype).masked_fill(keep.logical_not(), float("-inf"))
    return keep.expand(B, H, *shape[-2:])  # an expanded (stride 0) view


@pytest.mark.parametrize("kind", ["bool", "float", "expanded"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("branch", BRANCHES)
def test_forward(branch, shape, kind, dtype):
    with cuda_branch(branch) as device:
        q = torch.randn(B, H, L, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(2))
        mask = _mask(shape, kind, device, dtype)
        assert_no_new_host_reads(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "sdpa")


@pytest.mark.parametrize("call", ["positional", "gqa", "scale+dropout"])
@pytest.mark.parametrize("branch", BRANCHES)
def test_call_shapes(branch, call):
    with cuda_branch(branch) as device:
        q = torch.randn(B, H, L, D, device=device)
        kv_heads = 2 if call == "gqa" else H
        k, v = (torch.randn(B, kv_heads, S, D, device=device) for _ in range(2))
        mask = _mask((B, 1, L, S), "bool", device, None)
        run = {
            "positional": lambda: F.scaled_dot_product_attention(q, k, v, mask, 0.0, False),
            "gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "scale+dropout": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
        }[call]
        assert_no_new_host_reads(run, "sdpa")


def _train_step(q, k, v, mask):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.float().sum().backward()
    return out, q.grad, k.grad, v.grad


# Autograd cannot record a fake CUDA tensor on a CPU-only build of torch (its
# device guard aborts the process), so the training steps run on fake CPU
# tensors: attnpatch never reads a fake tensor, so they take the CUDA branch.
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(L, S), (B, 1, L, S), (B, H, L, S)], ids=str)
def test_fake_training_step(shape, kind):
    with fake_mode():
        q = torch.randn(B, H, L, D, requires_grad=True)
        k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(2))
        mask = _mask(shape, kind, "cpu", torch.float32)

        def step():
            for t in (q, k, v):
                t.grad = None
            return _train_step(q, k, v, mask)

        assert_no_new_host_reads(step, "sdpa")


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_real_tensors_general_path(kind, grad):
    """The same call on real tensors: fake tensors stand in for CUDA, but here
    each aten op that runs is the real one (bitwise results: test_general_path)."""
    q = torch.randn(B, H, L, D, requires_grad=grad)
    k, v = (torch.randn(B, H, S, D, requires_grad=grad) for _ in range(2))
    mask = _mask((B, 1, L, S), kind, "cpu", torch.float32)
    run = (
        (lambda: _train_step(q, k, v, mask))
        if grad
        else (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    )
    with general_path():
        assert_no_new_host_reads(run, "sdpa")
