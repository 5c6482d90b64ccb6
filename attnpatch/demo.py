"""``python -m attnpatch.demo`` (``make demo``): the NaN without attnpatch, and the fix.

A batch of two sequences of length 5; the first is left-padded by 2 tokens. With
a causal mask, its queries 0 and 1 may only see pad keys, so their rows of
attention scores are all ``-inf`` and softmax turns them into NaN. Each
reproduction runs without attnpatch, then inside ``attnpatch.patched()``.
"""

from __future__ import annotations

import torch
from torch import nn

import attnpatch

EMBED, HEADS, SEQ = 16, 2, 5
PAD = torch.tensor([[True, True, False, False, False], [False] * 5])  # True = pad key
CAUSAL = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)  # True = may not attend
VALID = ~PAD  # here the fully masked query rows are exactly the pad positions


def describe_nan(name: str, t: torch.Tensor) -> str:
    """Where ``t`` (batch, position, ...) holds NaN: pad rows, and valid rows it spread to."""
    rows = t.isnan().flatten(2).any(-1)
    pad, valid = int(rows[PAD].sum()), int(rows[VALID].sum())
    return f"{name} NaN in {pad} pad + {valid} valid rows" if pad + valid else f"{name} finite"


def mha_need_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    x = torch.randn(2, SEQ, EMBED, requires_grad=True)
    out, weights = mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)  # need_weights=True is the default
    out[VALID].sum().backward()  # the loss ignores the pad rows
    return {"output": out.detach(), "weights": weights.detach(), "grad": x.grad}


def mha_fast_path() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True).eval()
    x = torch.randn(2, SEQ, EMBED)
    with torch.no_grad():  # eval + no_grad: PyTorch's fused native kernel
        out, _ = mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL, need_weights=False)
    return {"output": out}


def encoder_inference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, SEQ, EMBED)
    with torch.no_grad():
        return {"output": encoder(x, mask=CAUSAL, src_key_padding_mask=PAD)}


def show(title: str, reproduction) -> bool:
    before = reproduction()
    with attnpatch.patched():
        after = reproduction()
    print(title)
    print("  without attnpatch: " + ", ".join(describe_nan(k, v) for k, v in before.items()))
    print("  with attnpatch:    " + ", ".join(describe_nan(k, v) for k, v in after.items()))
    finite = all(bool(v.isfinite().all()) for v in after.values())
    # Whatever was finite without attnpatch must be bitwise the same with it.
    same = all(torch.equal(before[k][before[k].isfinite()], after[k][before[k].isfinite()]) for k in before)
    print(f"                     values that were finite before are bitwise identical: {same}")
    return finite and same


def main() -> int:
    print(f"torch {torch.__version__}, attnpatch {attnpatch.__version__}; "
          "batch of 2, row 0 left-padded by 2, causal mask\n")
    results = [
        show("nn.MultiheadAttention(need_weights=True), training, loss on valid rows only", mha_need_weights),
        show("nn.MultiheadAttention fast path (eval + no_grad)", mha_fast_path),
        show("nn.TransformerEncoder, 2 layers (eval + no_grad, fused kernel)", encoder_inference),
    ]
    print("\nok: attnpatch removed every NaN" if all(results) else "\nFAILED: NaN left with attnpatch on")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
