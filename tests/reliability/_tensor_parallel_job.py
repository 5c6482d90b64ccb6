"""Tensor-parallel attention on ``torch.distributed.tensor`` (2 ranks, gloo, spawned).

q, k and v are DTensors sharded over heads (``Shard(1)``), the left-padded
causal mask is replicated. Each rank runs SDPA forward and backward without and
with attnpatch, on two kernels:

* ``math``: PyTorch's own math backend (``sdpa_kernel(SDPBackend.MATH)``). The
  default CPU backend cannot run DTensors on torch 2.13: its sharding is derived
  by tracing a decomposition for every combination of input placements, which
  does not finish in minutes, with or without attnpatch.
* ``nan``: a plain-softmax kernel installed where PyTorch's was, before
  attnpatch wraps it: NaN on a fully masked row, as several CUDA kernels give.

Then a tensor-parallel attention block as users build one: q/k/v projections
column-wise (so the heads come out sharded), the output projection row-wise,
on the NaN kernel.

Every rank also computes the same calls on plain tensors in its own process,
the 1-process result. Run by test_tensor_parallel.py as
``python _tensor_parallel_job.py OUT_DIR``; writes OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.core.helpers import left_padded_keep_mask, naive_sdpa, to_float_mask

WORLD, B, H, L, D = 2, 2, 4, 5, 8
LENGTHS = [3, 5]


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, L, D, generator=gen) for _ in range(3))


def attention(q, k, v, mask) -> dict:
    """Forward and backward of one SDPA call; results as plain full tensors."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    full = (lambda t: t.full_tensor()) if isinstance(out, DTensor) else (lambda t: t)
    result = {"out": full(out.detach()), "grads": [full(t.grad) for t in (q, k, v)]}
    if isinstance(out, DTensor):
        result["placements"] = [str(p) for p in out.placements]
    return result


class AttentionBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(H * D, H * D) for _ in range(4))

    def forward(self, x, mask):
        def heads(t):
            return t.view(B, L, H, D).transpose(1, 2)

        self.heads = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask
        )
        return self.o(self.heads.transpose(1, 2).reshape(B, L, H * D))


def block(module, mask) -> dict:
    x = torch.randn(B, L, H * D, generator=torch.Generator().manual_seed(1))
    out = module(x, mask)
    heads = module.heads
    if isinstance(heads, DTensor):
        # The row-wise projection returns its all-reduced output as an AsyncCollectiveTensor.
        return {
            "out": out.wait() if hasattr(out, "wait") else out,
            "heads": heads.full_tensor(),
            "placements": [str(p) for p in heads.placements],
        }
    return {"out": out, "heads": heads}


def run_block(mesh) -> dict:
    import attnpatch

    keep = left_padded_keep_mask(LENGTHS, L)
    column = ColwiseParallel(use_local_output=False)  # keep q/k/v as DTensors
    plan = {"q": column, "k": column, "v": column, "o": RowwiseParallel()}
    sharded = parallelize_module(AttentionBlock(), mesh, plan)
    mask = distribute_tensor(keep, mesh, [Replicate()])
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = naive_sdpa  # under the patch, as the kernel
    try:
        with torch.no_grad():
            case = {"unpatched": block(sharded, mask)}
            with attnpatch.patched("sdpa"):
                case["patched"] = block(sharded, mask)
                case["single"] = block(AttentionBlock(), keep)
    finally:
        F.scaled_dot_product_attention = original
    return case


def run_all(mesh) -> dict:
    import attnpatch

    q, k, v = inputs()
    keep = left_padded_keep_mask(LENGTHS, L)
    results = {}
    for kernel in ("math", "nan"):
        for mask_kind, mask in (("bool", keep), ("float", to_float_mask(keep))):
            dq, dk, dv = (distribute_tensor(t, mesh, [Shard(1)]) for t in (q, k, v))
            dmask = distribute_tensor(mask, mesh, [Replicate()])
            original = F.scaled_dot_product_attention
            if kernel == "nan":
                F.scaled_dot_product_attention = naive_sdpa  # under the patch, as the kernel
            try:
                with sdpa_kernel(SDPBackend.MATH):
                    case = {"unpatched": attention(dq, dk, dv, dmask)}
                    with attnpatch.patched("sdpa"):
                        case["patched"] = attention(dq, dk, dv, dmask)
                        case["single"] = attention(q, k, v, mask)
            finally:
                F.scaled_dot_product_attention = original
            results[f"{kernel}-{mask_kind}"] = case
    results["block"] = run_block(mesh)
    return results


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = run_all(init_device_mesh("cpu", (WORLD,)))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD, join=True)
