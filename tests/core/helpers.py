"""Shared builders for the torch tests: left-padded causal masks and a float64
reference of attention under the contract's semantics."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def left_padded_keep_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    """(B, 1, L, L) SDPA-convention mask: causal and left padding. The pad queries
    of a row see only pad keys, so their rows are fully masked."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    real_keys = torch.arange(seq_len)[None, :] >= (seq_len - torch.tensor(lengths))[:, None]
    return causal[None, None] & real_keys[:, None, None, :]


def left_padding(lengths: list[int], seq_len: int) -> torch.Tensor:
    """(B, S) key_padding_mask in nn.MultiheadAttention's convention (True = pad)."""
    return torch.arange(seq_len)[None, :] < (seq_len - torch.tensor(lengths))[:, None]


def causal_drop_mask(seq_len: int) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)


def to_float_mask(keep: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))


def reference_attention(q, k, v, keep, scale=None):
    """Float64 attention where a row with no admitted key outputs 0."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    rows = ~keep.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(rows, 0.0), -1).masked_fill(rows, 0.0)
    return weights @ v


def naive_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Plain-softmax attention, NaN on an all -inf row (like several CUDA kernels)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, -1) @ value


@contextlib.contextmanager
def nan_kernel_under_patch(monkeypatch):
    """Put naive_sdpa where torch's kernel was, *before* attnpatch wraps it."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    yield naive_sdpa


def has_nan(*tensors) -> bool:
    return any(bool(torch.isnan(t).any()) for t in tensors if t is not None)
