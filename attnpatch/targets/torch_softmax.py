"""Target ``softmax`` (opt-in): softmax over the last dimension, for hand-written attention.

Code that builds its own attention (``scores.masked_fill(mask, float("-inf")).softmax(-1)``)
gets NaN from a fully masked row, and no attention kernel is involved that the
other targets could fix. This target gives ``torch.nn.functional.softmax``,
``torch.softmax`` and ``torch.Tensor.softmax`` over the last dimension the
semantics of ``aten._safe_softmax`` (``masks.safe_softmax``): a row of all
``-inf`` gives 0 and a zero gradient; every other row is bitwise softmax's, NaN
input still gives NaN. Other dimensions, ``dim=None``, non-float and empty
inputs, and calls that engage torch's ``__torch_function__`` protocol pass
through untouched.

Off by default and never part of ``ATTNPATCH=1``: it changes a function used far
outside attention (classifier heads, losses), where a row of all ``-inf`` may be
meant to give NaN, and it costs every softmax call a little (README, "Cost").
Turn it on by name: ``attnpatch.apply(softmax=True)``, ``ATTNPATCH=1,softmax``.

Knows torch 2.4 - 2.13. Not reached: code that bound the function to another
name before ``apply()`` (``from torch.nn.functional import softmax``),
``log_softmax``, ``torch.special.softmax``, TorchScript.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnpatch import masks
from attnpatch._patching import PatchPoint
from attnpatch.targets import get_arg


def _has_own_dispatch(input: Tensor) -> bool:
    """A tensor subclass with ``__torch_function__`` gets PyTorch's own dispatch.
    (Not an active TorchFunctionMode: ``torch.softmax`` and ``Tensor.softmax`` are
    builtins that hand a mode the original function, so passing through would
    skip the fix for good; under a mode, the calls the safe softmax makes are
    ordinary ones the mode sees. FakeTensor, FunctionalTensor and other tracing
    tensors have ``__torch_function__`` disabled and take the safe path.)"""
    return type(input) is not Tensor and getattr(type(input), "__torch_function__", None) is not _DISABLED


_DISABLED = torch._C._disabled_torch_function_impl


def _is_last_dim_of_float(input: Any, dim: Any, dtype: Any) -> bool:
    return (
        isinstance(input, Tensor)
        and not _has_own_dispatch(input)
        and isinstance(dim, int)
        and (dtype is None or isinstance(dtype, torch.dtype))
        and input.dim() > 0
        and dim in (-1, input.dim() - 1)
        and input.is_floating_point()
        and input.numel() > 0
    )


class _Running(threading.local):
    """Set while this thread computes a safe softmax. A softmax called beneath it
    is PyTorch's own decomposition of ``aten._safe_softmax`` (fake tensors,
    torch.compile tracing), which must run as it is."""

    active = False


_running = _Running()


def _softmax_wrapper(dim_at: int, dtype_at: int, method: bool = False) -> Callable[..., Any]:
    """Wrapper for a softmax taking ``dim`` and ``dtype`` at these positions;
    ``method``: ``Tensor.softmax``, whose input is the bound tensor."""
    known = {"dim", "dtype", "_stacklevel"} | (set() if method else {"input"})

    def wrapper(wrapped: Callable[..., Tensor], instance: Any, args: tuple, kwargs: dict) -> Any:
        input = instance if method else get_arg(args, kwargs, 0, "input")
        dim, dtype = get_arg(args, kwargs, dim_at, "dim"), get_arg(args, kwargs, dtype_at, "dtype")
        if _running.active or not _is_last_dim_of_float(input, dim, dtype) or not known.issuperset(kwargs):
            return wrapped(*args, **kwargs)  # PyTorch's own answer (or its own error)
        _running.active = True
        try:
            return masks.safe_softmax(input, dim, dtype=dtype)
        finally:
            _running.active = False

    return wrapper


POINTS = [
    PatchPoint("torch.nn.functional", "softmax", _softmax_wrapper(dim_at=1, dtype_at=3)),
    PatchPoint("torch", "softmax", _softmax_wrapper(dim_at=1, dtype_at=2)),
    PatchPoint("torch", "Tensor.softmax", _softmax_wrapper(dim_at=0, dtype_at=1, method=True)),
]
