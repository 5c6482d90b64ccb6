"""What happens to a mask: find fully masked query rows, make a mask safe, clear rows.

Pure tensor functions; nothing here patches anything.

PyTorch uses two conventions for boolean masks:

* *keep* masks (``F.scaled_dot_product_attention``, transformers): ``True`` means
  "this query may attend to this key";
* *drop* masks (``nn.MultiheadAttention``, the fused native kernels): ``True``
  means "this key is masked out".

Float masks are additive in both: ``-inf`` masks a key, anything else (finite,
large negative, NaN) is a score bias and never counts as masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def fully_masked_rows(mask: Tensor, *, drop: bool = False) -> Tensor:
    """Boolean tensor of shape ``mask.shape[:-1]``: True where the row admits no key.

    ``drop`` selects the boolean convention (see module docstring). A float row is
    fully masked only when every entry is exactly ``-inf``; a NaN entry keeps the
    row "not fully masked" so NaN propagates exactly as without attnpatch.
    """
    if mask.dtype == torch.bool:
        return mask.all(-1) if drop else ~mask.any(-1)
    # One reduction pass; amax propagates NaN and NaN == -inf is False.
    return mask.amax(-1) == NEG_INF


def admit_rows(mask: Tensor, rows: Tensor, *, drop: bool = False) -> Tensor:
    """A new mask in which each row flagged in ``rows`` admits every key.

    Softmax over such a row is finite, so any kernel computes a finite (and
    meaningless) result there, which the caller then clears. Rows not flagged
    are copied unchanged, so their results stay bitwise identical.
    """
    flagged = rows.unsqueeze(-1)
    if mask.dtype == torch.bool:
        return mask & ~flagged if drop else mask | flagged
    return mask.masked_fill(flagged, 0.0)


def clear_rows(out: Tensor, rows: Tensor, fill: Tensor | None = None) -> Tensor:
    """``out`` with each flagged row replaced by ``fill`` (broadcast over the last dim) or 0.

    ``rows`` must broadcast against ``out.shape[:-1]``. ``masked_fill``/``where``
    pass zero gradient to the cleared rows, so they contribute nothing to any
    gradient upstream.
    """
    flagged = rows.unsqueeze(-1)
    if fill is None:
        return out.masked_fill(flagged, 0.0)
    return torch.where(flagged, fill.to(out.dtype), out)


def may_inspect_values(tensor: Tensor) -> bool:
    """Whether reading a value of ``tensor`` on the host is free and allowed here.

    True only for a plain CPU tensor outside ``torch.compile`` / export tracing:
    on CUDA it would add a host-device sync, and while tracing a data-dependent
    Python branch breaks ``fullgraph=True`` compilation.
    """
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )
