"""One training step of a tiny left-padded Llama (eager attention) under FSDP2
(``torch.distributed.fsdp.fully_shard``, gloo, 2 spawned ranks). It never imports
or calls attnpatch to activate it: only ``ATTNPATCH`` in the environment (the
.pth hook) can. Run by test_tensor_parallel.py as

    python _fsdp_job.py OUT_DIR

Writes OUT_DIR/rank{r}.pt per rank and OUT_DIR/single.pt for the same step in
one process (same data, with the two ranks' gradients averaged and summed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.hf.helpers import left_padded, tiny_model

WORLD = 2
PROMPTS = [[[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[14, 15], [16, 17, 18, 19, 20]]]  # per rank


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = left_padded(PROMPTS[rank])
    return ids, mask, ids.masked_fill(mask == 0, -100)


def make_model() -> torch.nn.Module:
    return tiny_model("llama", "eager").train()


def step(model: torch.nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one left-padded batch, backward done; and, per layer, the attention
    output (o_proj's input) at the pad positions."""
    ids, mask, labels = batch(rank)
    seen = []
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        for layer in model.model.layers
    ]
    try:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()
    pads = mask == 0
    return loss.detach(), torch.stack([out[pads] for out in seen])


def probe() -> dict:
    import attnpatch  # only to report what the environment activated

    return {"env": os.environ.get("ATTNPATCH"), "hf_attention": attnpatch.status()["hf_attention"]["state"]}


def worker(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # before torch 2.6, FSDP2 lived here
        from torch.distributed._composable.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = make_model()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss, pad_outputs = step(model, rank)
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        torch.save(
            {
                "loss": loss,
                "grads": grads,
                "pad_outputs": pad_outputs,
                "probe": probe(),
                "sharded": type(next(model.parameters())).__name__,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def single(out_dir: str) -> None:
    """The same step in one process, and the ranks' gradients combined as FSDP2's
    reduce-scatter may: their mean (as documented), or their sum (torch 2.7 and 2.8 over
    gloo, with or without attnpatch)."""
    torch.set_num_threads(1)
    model = make_model()
    losses, per_rank = [], []
    for rank in range(WORLD):
        model.zero_grad()
        losses.append(step(model, rank)[0])
        per_rank.append({name: p.grad.clone() for name, p in model.named_parameters()})
    summed = {name: per_rank[0][name] + per_rank[1][name] for name in per_rank[0]}
    reductions = {"mean": {name: grad / WORLD for name, grad in summed.items()}, "sum": summed}
    torch.save({"losses": losses, "reductions": reductions, "probe": probe()}, os.path.join(out_dir, "single.pt"))


if __name__ == "__main__":
    out = sys.argv[1]
    mp.spawn(worker, args=(out,), nprocs=WORLD, join=True)
    single(out)
