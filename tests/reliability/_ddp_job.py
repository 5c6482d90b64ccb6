"""A tiny DDP training job (gloo, 2 ranks, spawned) on nn.MultiheadAttention and
nn.TransformerEncoder with causal + left padding. It never imports or calls
attnpatch to activate it: only ``ATTNPATCH`` in the environment (the .pth hook)
can. Run as a script by test_distributed.py:

    python _ddp_job.py OUT_DIR

Writes OUT_DIR/rank{r}.pt per rank and OUT_DIR/single.pt for the same training
run in one process (same data, gradients averaged over the two shards exactly as
DDP averages them).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD, STEPS, VOCAB, DIM, HEADS, SEQ = 2, 3, 11, 8, 2, 5
LENGTHS = [[2, 5], [3, 4]]  # per rank: real tokens of each left-padded row


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)  # need_weights=True by default
        layer = nn.TransformerEncoderLayer(DIM, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        x = self.embed(tokens)
        a, _ = self.attn(x, x, x, attn_mask=causal, key_padding_mask=pad)
        x = x + a
        x = self.encoder(x, mask=causal, src_key_padding_mask=pad)
        return self.head(x)


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(1, VOCAB, (len(LENGTHS[rank]), SEQ), generator=gen)
    pad = torch.arange(SEQ)[None, :] < (SEQ - torch.tensor(LENGTHS[rank]))[:, None]
    tokens = tokens.masked_fill(pad, 0)
    targets = torch.randint(0, VOCAB, tokens.shape, generator=gen).masked_fill(pad, -100)
    return tokens, pad, targets


def loss_of(model: nn.Module, rank: int) -> torch.Tensor:
    tokens, pad, targets = shard(rank)
    logits = model(tokens, pad)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def eval_output(model: nn.Module, rank: int) -> torch.Tensor:
    """Inference fast paths (native MHA kernel, fused encoder layer)."""
    model.eval()
    tokens, pad, _ = shard(rank)
    with torch.no_grad():
        out = model(tokens, pad)
    model.train()
    return out


def probe() -> dict:
    import attnpatch  # only to report what the environment activated

    return {
        "pid": os.getpid(),
        "env": os.environ.get("ATTNPATCH"),
        "states": {k: v["state"] for k, v in attnpatch.status().items()},
    }


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, grads = [], []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = loss_of(model, rank)
            loss.backward()
            losses.append(loss.detach().clone())
            grads.append({n: p.grad.clone() for n, p in model.module.named_parameters()})
            opt.step()
        torch.save(
            {
                "losses": losses,
                "grads": grads,
                "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
                "eval": eval_output(model.module, rank),
                "probe": probe(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def single(out_dir: str) -> None:
    """The same run in one process: DDP's averaged gradient is g0 / 2 + g1 / 2."""
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [[], []], []
    for _ in range(STEPS):
        per_rank = []
        for rank in range(WORLD):
            opt.zero_grad()
            loss = loss_of(model, rank)
            loss.backward()
            losses[rank].append(loss.detach().clone())
            per_rank.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for n, p in model.named_parameters():
            p.grad = per_rank[0][n] / WORLD + per_rank[1][n] / WORLD
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    torch.save(
        {
            "losses": losses,
            "grads": grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "eval": [eval_output(model, r) for r in range(WORLD)],
            "probe": probe(),
        },
        os.path.join(out_dir, "single.pt"),
    )


if __name__ == "__main__":
    out = sys.argv[1]
    mp.spawn(worker, args=(out,), nprocs=WORLD, join=True)
    single(out)
