"""Target ``mha``: every path of ``nn.MultiheadAttention``.

Knows torch 2.5 - 2.15. Two patch points, both module-level functions (a wrapt
wrapper on an ``nn.Module`` class's ``forward`` breaks dynamo's guards, so the
module classes themselves are never touched):

* ``torch.nn.functional.multi_head_attention_forward`` (training, grad, and every
  case the fast path declines). We run a copy of PyTorch's *own* function object
  (same code, so valid rows are bitwise identical; built once, on import, and
  shared with ``attnpatch.functional``) whose global ``softmax`` is
  ``aten._safe_softmax`` (0 for an all ``-inf`` row, with a finite backward) and
  whose ``scaled_dot_product_attention`` is the sanitised one. A fully masked
  row, even in only some heads, then has weights 0 and attention output 0, so
  the returned row is ``out_proj(0)``: its bias.
* ``torch._native_multi_head_attention`` (the inference fast path). The kernel
  gets a mask whose fully masked rows admit a key; those output rows are then
  set to ``out_proj.bias`` and their weight rows to 0. Rows masked in only some
  heads (possible with a per-head 3-D ``attn_mask``) cannot be fixed from outside
  the fused kernel, so they alone are recomputed on the Python path above.
"""

from __future__ import annotations

import contextvars
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnpatch import masks
from attnpatch._patching import PatchPoint, Skip
from attnpatch.targets import (
    call_with,
    copy_with_globals,
    dispatch_overrides,
    get_arg,
    overrides_engaged,
    torch_sdpa,
    with_arg,
)

MASK, NEED_WEIGHTS, AVERAGE, MASK_TYPE = 9, 10, 11, 12  # _native_multi_head_attention
PROJ_BIAS = 8
MHA_KEY_PADDING_MASK, MHA_ATTN_MASK = 14, 16  # multi_head_attention_forward


# Storages of the masks the caller of the running nn.MultiheadAttention call
# passed (None outside one): a mask MHA hands to SDPA that shares none of them is
# one MHA built during the call (merged from both masks, or converted from bool).
_callers_mask_storages: contextvars.ContextVar[frozenset[int] | None] = contextvars.ContextVar(
    "attnpatch_mha_callers_mask_storages", default=None
)


def _sanitised_sdpa(*args: Any, **kwargs: Any) -> Tensor:
    kernel = F.scaled_dot_product_attention
    if torch_sdpa.POINT.handle is not None and kernel is torch_sdpa.POINT.handle:
        kernel = kernel.__wrapped__  # the sdpa target's own wrapper would fix it again
    mask = get_arg(args, kwargs, torch_sdpa.ATTN_MASK, "attn_mask")
    return torch_sdpa.safe_sdpa(kernel, args, kwargs, mask_is_own=_built_by_mha(mask))


def _built_by_mha(mask: Any) -> bool:
    """Whether ``mask`` is a temporary MHA built during this call, which no one
    else holds: making it safe in place then saves a copy of a (B, H, L, S) mask.
    (Storages are recorded only for eager calls with plain, non-meta masks, and
    MHA derives its mask from those.)"""
    callers = _callers_mask_storages.get()
    return (
        callers is not None
        and masks.is_plain(mask)
        and not mask.requires_grad
        and mask.untyped_storage().data_ptr() not in callers
    )


def _mask_storages(args: tuple, kwargs: dict) -> frozenset[int] | None:
    """Where the masks the caller passed keep their data; None when one of them
    has no data to point at (fake, functional or meta tensors: tracing, where
    dynamo also runs this call on fake tensors; a ``torch.func`` transform's
    wrapper) or is a subclass."""
    if torch.compiler.is_compiling():
        return None
    storages = set()
    for index, name in ((MHA_KEY_PADDING_MASK, "key_padding_mask"), (MHA_ATTN_MASK, "attn_mask")):
        mask = get_arg(args, kwargs, index, name)
        if mask is None:
            continue
        if not masks.is_plain(mask) or mask.is_meta:
            return None
        storages.add(mask.untyped_storage().data_ptr())
    return frozenset(storages)


def _safe_copy(original: Callable[..., Any]) -> Callable[..., Any] | None:
    """The copy of torch's own function that runs the fix; None when ``original``
    is not torch's plain function (another library's replacement without a
    ``__wrapped__``), whose copy would not reach torch's softmax."""
    if type(original) is not types.FunctionType or original.__module__ != "torch.nn.functional":
        return None
    return copy_with_globals(
        original,
        softmax=masks.safe_softmax,
        scaled_dot_product_attention=_sanitised_sdpa,
        # Re-dispatch from __torch_function__ handling (used by torch.compile's
        # tracing modes) must come back to the sanitised copy, not the original
        # (which is what F.multi_head_attention_forward is while attnpatch is off).
        multi_head_attention_forward=_dispatch_again,
    )


def _dispatch_again(*args: Any, **kwargs: Any) -> Any:
    # Only ever called from that copy, so it exists.
    return _safe_mha_forward(*args, **kwargs)  # type: ignore[misc]


# torch's own function (under any wrappers that name what they wrap, attnpatch's
# included) and its safe copy, which the patched target and attnpatch.functional
# both run. Built on import, before any attnpatch wrapper exists.
TORCH_MHA_FORWARD = inspect.unwrap(F.multi_head_attention_forward)
_safe_mha_forward = _safe_copy(TORCH_MHA_FORWARD)


def _prepare_mha_forward(original: Any) -> Callable[..., Any]:
    if original is not TORCH_MHA_FORWARD or _safe_mha_forward is None:
        raise Skip(
            "torch.nn.functional.multi_head_attention_forward is already wrapped by "
            f"something else ({type(original).__name__} {getattr(original, '__module__', '?')}."
            f"{getattr(original, '__qualname__', '?')}); attnpatch leaves it alone"
        )
    return _mha_forward_wrapper


def _mha_forward_wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    if _safe_mha_forward is None or overrides_engaged(args, kwargs):
        # The original hands the call to the handlers with func =
        # F.multi_head_attention_forward (this wrapper), as without attnpatch.
        return wrapped(*args, **kwargs)
    storages = _mask_storages(args, kwargs)
    if storages is None:
        return _safe_mha_forward(*args, **kwargs)
    return call_with(_callers_mask_storages, storages, _safe_mha_forward, *args, **kwargs)


def _native_mha_wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    mask = get_arg(args, kwargs, MASK, "mask")
    if not isinstance(mask, Tensor):
        return wrapped(*args, **kwargs)
    if overrides_engaged(args, kwargs):
        return dispatch_overrides(torch._native_multi_head_attention, args, kwargs)
    mask_type = get_arg(args, kwargs, MASK_TYPE, "mask_type")
    need_weights = get_arg(args, kwargs, NEED_WEIGHTS, "need_weights", True)
    average = get_arg(args, kwargs, AVERAGE, "average_attn_weights", True)
    bias = get_arg(args, kwargs, PROJ_BIAS, "proj_bias")
    try:
        fix = masks.rows_and_kernel_mask(mask, drop=True) if mask_type in (0, 1, 2) and mask.shape[-1] else None
        if fix is not None:
            head_rows, kernel_mask = fix
            per_head_rows = masks.native_rows_per_head(head_rows, mask_type)
            rows = per_head_rows.amin(1)  # masked in every head (amin: bool all() over a middle dim is slow on CPU)
            per_head = mask_type == 2 and mask.shape[1] > 1 and mask.stride(1) != 0
    except Exception:  # noqa: BLE001 - malformed input: let PyTorch raise its own error
        fix = None
    if fix is None:  # the kernel runs once, outside the try: its own errors are the caller's
        return wrapped(*args, **kwargs)
    call_args, call_kwargs = with_arg(args, kwargs, MASK, "mask", kernel_mask)
    out, weights = wrapped(*call_args, **call_kwargs)
    # The fast path runs without autograd, so its fresh results are fixed in place.
    out = masks.clear_result_rows(out, rows, bias)
    if need_weights:
        weights = masks.clear_result_rows(weights, rows if average else per_head_rows)
    if per_head and masks.may_inspect_values(mask):
        # Rows masked in some heads only: NaN without attnpatch, and the fused
        # kernel cannot zero one head of a row. Recompute just those (CPU, where
        # looking is free). On CUDA this would need a host sync or a second full
        # pass, so there they stay finite but not zero in the masked heads.
        some_heads = head_rows.amax(1) & ~rows
        if some_heads.any():
            slow_out, slow_weights = _python_path(args, kwargs, mask, need_weights, average)
            out = torch.where(some_heads.unsqueeze(-1), slow_out, out)
            if need_weights and slow_weights is not None:
                flags = some_heads if average else some_heads.unsqueeze(1)
                weights = torch.where(flags.unsqueeze(-1), slow_weights, weights)
    return out, weights


def _python_path(
    args: tuple, kwargs: dict, mask: Tensor, need_weights: bool, average: bool
) -> tuple[Tensor, Tensor | None]:
    """The same attention computed by the sanitised Python path (batch_first)."""
    names = ("query", "key", "value", "embed_dim", "num_head", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias")
    q, k, v, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias = (
        get_arg(args, kwargs, i, name) for i, name in enumerate(names)
    )
    batch, heads, tgt_len, src_len = mask.shape
    forward = _safe_mha_forward or F.multi_head_attention_forward
    out, weights = forward(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        embed_dim,
        num_heads,
        qkv_weight,
        qkv_bias,
        None,
        None,
        False,
        0.0,
        proj_weight,
        proj_bias,
        training=False,
        need_weights=need_weights,
        average_attn_weights=average,
        attn_mask=mask.reshape(batch * heads, tgt_len, src_len),
    )
    return out.transpose(0, 1), weights


MHA_FORWARD = PatchPoint("torch.nn.functional", "multi_head_attention_forward", prepare=_prepare_mha_forward)
NATIVE_MHA = PatchPoint("torch", "_native_multi_head_attention", _native_mha_wrapper)
POINTS = [MHA_FORWARD, NATIVE_MHA]
