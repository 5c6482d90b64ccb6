"""Target ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.

Knows torch 2.4 - 2.13 (signature ``query, key, value, attn_mask, dropout_p,
is_causal, scale, enable_gqa``). ``is_causal`` alone never masks a whole row, so
only calls with an ``attn_mask`` are touched: fully masked rows are given every
key (finite softmax in any kernel), and their output rows are set to exactly 0.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from attnpatch import masks
from attnpatch._patching import PatchPoint
from attnpatch.targets import get_arg, with_arg

ATTN_MASK = 3  # positional index of attn_mask


def safe_sdpa(sdpa: Callable[..., Tensor], args: tuple, kwargs: dict) -> Any:
    """Call ``sdpa(*args, **kwargs)`` so that fully masked query rows give 0."""
    mask = get_arg(args, kwargs, ATTN_MASK, "attn_mask")
    if not isinstance(mask, Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        return sdpa(*args, **kwargs)  # no mask, or one PyTorch will reject itself
    try:
        key = get_arg(args, kwargs, 1, "key")
        if mask.shape[-1] == 0 or key.shape[-2] == 0:
            return sdpa(*args, **kwargs)  # no keys at all: PyTorch's own answer
        rows = masks.fully_masked_rows(mask)
        if masks.may_inspect_values(mask) and not rows.any():
            return sdpa(*args, **kwargs)  # common case on CPU: nothing to fix
        safe_args, safe_kwargs = with_arg(args, kwargs, ATTN_MASK, "attn_mask", masks.admit_rows(mask, rows))
    except Exception:  # noqa: BLE001 - malformed input: let PyTorch raise its own error
        return sdpa(*args, **kwargs)
    return masks.clear_rows(sdpa(*safe_args, **safe_kwargs), rows)


def _wrapper(wrapped: Callable[..., Tensor], instance: Any, args: tuple, kwargs: dict) -> Any:
    if not POINT.enabled:
        return wrapped(*args, **kwargs)
    return safe_sdpa(wrapped, args, kwargs)


POINT = PatchPoint("torch.nn.functional", "scaled_dot_product_attention", _wrapper)
POINTS = [POINT]
