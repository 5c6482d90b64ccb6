"""Target ``transformer``: the fused inference kernel of ``nn.TransformerEncoderLayer``
(and so of ``nn.TransformerEncoder`` and ``nn.Transformer``'s encoder).

Knows torch 2.4 - 2.13. The training/grad path of these layers runs through
``nn.MultiheadAttention`` and is covered by the ``mha`` target; decoder layers
have no fused path. ``torch._transformer_encoder_layer_fwd`` computes attention,
residual, norms and feed-forward in one kernel, so a row's attention cannot be
set to 0 from outside it. The kernel is given a mask in which fully masked rows
admit every key: those rows come out finite instead of NaN, no NaN reaches the
next layer, and every other row is bitwise what the kernel computes for it.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from attnpatch import masks
from attnpatch._patching import PatchPoint
from attnpatch.targets import get_arg, with_arg

MASK, MASK_TYPE = 18, 19


def _encoder_layer_wrapper(wrapped: Callable[..., Tensor], instance: Any, args: tuple, kwargs: dict) -> Any:
    mask = get_arg(args, kwargs, MASK, "mask")
    if not POINT.enabled or not isinstance(mask, Tensor):
        return wrapped(*args, **kwargs)
    try:
        if get_arg(args, kwargs, MASK_TYPE, "mask_type") not in (0, 1, 2) or mask.shape[-1] == 0:
            return wrapped(*args, **kwargs)
        rows = masks.fully_masked_rows(mask, drop=True)
        if masks.may_inspect_values(mask) and not rows.any():
            return wrapped(*args, **kwargs)
        args, kwargs = with_arg(args, kwargs, MASK, "mask", masks.admit_rows(mask, rows, drop=True))
    except Exception:  # noqa: BLE001 - malformed input: let PyTorch raise its own error
        pass
    return wrapped(*args, **kwargs)


POINT = PatchPoint("torch", "_transformer_encoder_layer_fwd", _encoder_layer_wrapper)
POINTS = [POINT]
