"""Target ``transformer``: the fused inference kernel of ``nn.TransformerEncoderLayer``
(and so of ``nn.TransformerEncoder`` and ``nn.Transformer``'s encoder).

Knows torch 2.5 - 2.15. The training/grad path of these layers runs through
``nn.MultiheadAttention`` and is covered by the ``mha`` target; decoder layers
have no fused path. ``torch._transformer_encoder_layer_fwd`` computes attention,
residual, norms and feed-forward in one kernel, so a row's attention cannot be
set to 0 from outside it; instead the layer's whole output row is set to 0.
On CPU (where the rows can be looked at for free) the kernel runs on the
caller's mask and the rows it made NaN are zeroed after it; elsewhere it is
given a mask in which fully masked rows admit every key (finite rows), and
those rows are zeroed after it as well. Either way no NaN reaches the next
layer, and every other row is bitwise what the kernel computes for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnpatch import masks
from attnpatch._patching import PatchPoint
from attnpatch.targets import dispatch_overrides, get_arg, overrides_engaged, with_arg

MASK, MASK_TYPE = 18, 19


def _encoder_layer_wrapper(wrapped: Callable[..., Tensor], instance: Any, args: tuple, kwargs: dict) -> Any:
    mask = get_arg(args, kwargs, MASK, "mask")
    if not isinstance(mask, Tensor):
        return wrapped(*args, **kwargs)
    if overrides_engaged(args, kwargs):
        return dispatch_overrides(torch._transformer_encoder_layer_fwd, args, kwargs)
    mask_type = get_arg(args, kwargs, MASK_TYPE, "mask_type")
    try:
        fix = masks.rows_and_kernel_mask(mask, drop=True) if mask_type in (0, 1, 2) and mask.shape[-1] else None
    except Exception:  # noqa: BLE001 - malformed input: let PyTorch raise its own error
        fix = None
    if fix is None:  # the kernel runs once, outside the try: its own errors are the caller's
        return wrapped(*args, **kwargs)
    rows, kernel_mask = fix
    call_args, call_kwargs = with_arg(args, kwargs, MASK, "mask", kernel_mask)
    return masks.clear_result_rows(wrapped(*call_args, **call_kwargs), _rows_with_nan(rows, mask_type))


def _rows_with_nan(head_rows: Tensor, mask_type: int) -> Tensor:
    """(B, L)-broadcastable flags of the output rows a fully masked row makes NaN:
    masked in any head (the output projection mixes the heads of a row)."""
    return masks.native_rows_per_head(head_rows, mask_type).amax(1)


POINT = PatchPoint("torch", "_transformer_encoder_layer_fwd", _encoder_layer_wrapper)
POINTS = [POINT]
