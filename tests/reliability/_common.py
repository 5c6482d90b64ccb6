"""Shared helpers for the reliability tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnpatch

SEQ = 4


def originals() -> dict:
    """The objects attnpatch patches, read while it is off."""
    attnpatch.remove()
    return {
        "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
        "F.multi_head_attention_forward": F.multi_head_attention_forward,
        "torch._native_multi_head_attention": torch._native_multi_head_attention,
        "torch._transformer_encoder_layer_fwd": torch._transformer_encoder_layer_fwd,
    }


def current() -> dict:
    return {
        "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
        "F.multi_head_attention_forward": F.multi_head_attention_forward,
        "torch._native_multi_head_attention": torch._native_multi_head_attention,
        "torch._transformer_encoder_layer_fwd": torch._transformer_encoder_layer_fwd,
    }


def assert_restored(saved: dict) -> None:
    now = current()
    for name, obj in saved.items():
        assert now[name] is obj, f"{name} is not the original object after remove()"


def left_pad(lengths, seq=SEQ) -> torch.Tensor:
    """(B, S) key_padding_mask, True = pad (left padding)."""
    return torch.arange(seq)[None, :] < (seq - torch.tensor(lengths))[:, None]


def causal(seq=SEQ) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool).triu(1)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN positions included."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a.masked_fill(na, 0), b.masked_fill(nb, 0))
