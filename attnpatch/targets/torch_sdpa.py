"""Target ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (and its
other name, ``torch._C._nn.scaled_dot_product_attention``, with the same wrapper).

Knows torch 2.5 - 2.15 (signature ``query, key, value, attn_mask, dropout_p,
is_causal, scale, enable_gqa``). ``is_causal`` alone never masks a whole row, so
only calls with an ``attn_mask`` are touched: their fully masked output rows are
set to exactly 0. When a backward will run through the call, those rows are
first given a key (finite softmax in any kernel, so no 0 * NaN reaches the
key and value gradients); without one, the kernel keeps the caller's mask, as
every SDPA kernel computes a row from that row alone.

PyTorch's own CPU kernels (math and flash; torch 2.13 does) already give such rows
output 0 and zero, finite gradients. Where a check at first use confirms that for
the running torch, eager calls of the real kernel on plain CPU tensors pass
straight through: the contract holds and the call costs nothing extra.

A call that engages torch's override protocol (a ``__torch_function__`` subclass
such as PyTorch's ``CausalBias``, or a ``TorchFunctionMode``) runs the original
untouched; the handler's call back comes through here with plain tensors.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from attnpatch import masks
from attnpatch._patching import PatchPoint
from attnpatch.targets import call_with, get_arg, overrides_engaged, with_arg

ATTN_MASK = 3  # positional index of attn_mask
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # the kernel entry point itself
_safe_cpu_dtypes: dict[torch.dtype, bool] = {}  # decided by _check_cpu_kernels() on first use

# True while the kernel call of a fix is being traced (torch.compile's AOT pass,
# torch.export). The tracers' torch-function modes hand that call back through
# the patched name; without this it would be fixed again, once per mode (seen:
# 3 to 4 copies of the fix per SDPA call in an exported graph).
_tracing_kernel_call: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "attnpatch_tracing_sdpa_kernel_call", default=False
)


def _check_cpu_kernels(dtype: torch.dtype) -> bool | None:
    """Whether both CPU SDPA backends of this torch (math, flash) give a fully
    masked row output 0, finite gradients and a zero gradient to its query, in
    ``dtype``; None when the check could not run (nothing is then cached).

    It runs once per dtype, at the first masked call, in a thread of its own:
    grad mode, tracers (``torch.jit.trace``), torch-function and dispatch modes,
    autocast and saved-tensor hooks are per thread, so none of the caller's sees
    its forward and backward, and its inputs come from a generator of its own,
    so the caller's random stream is untouched."""
    backends = (
        torch.ops.aten._scaled_dot_product_attention_math.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    )
    verdict: list[bool] = []
    checker = threading.Thread(
        target=lambda: verdict.append(_cpu_kernels_zero_masked_rows(backends, dtype)),
        name="attnpatch-sdpa-kernel-check",
        daemon=True,
    )
    try:
        checker.start()
        checker.join()
    except RuntimeError:  # no thread can start (interpreter shutting down): undecided
        return None
    return verdict[0] if verdict else None


def _cpu_kernels_zero_masked_rows(backends: tuple[Any, ...], dtype: torch.dtype) -> bool:
    """The check itself (``_check_cpu_kernels``). SDPA turns a bool mask into this
    float mask before either backend runs. The backend ops are called directly:
    ``sdpa_kernel`` would change process-wide flags under other threads' feet."""
    cpu = torch.device("cpu")
    keep = torch.tensor([[False, False, False], [True, False, False], [True, True, True]], device=cpu)
    generator = torch.Generator(device=cpu).manual_seed(0)
    try:
        mask = torch.zeros(3, 3, dtype=dtype, device=cpu).masked_fill(~keep, masks.NEG_INF)
        for backend in backends:
            q, k, v = (
                torch.randn(1, 2, 3, 8, generator=generator, device=cpu).to(dtype).requires_grad_() for _ in range(3)
            )
            out = backend(q, k, v, attn_mask=mask)[0]
            out.sum().backward()
            grads = [t.grad for t in (q, k, v)]
            if not (
                bool((out[:, :, 0] == 0).all())
                and all(grad is not None and bool(grad.isfinite().all()) for grad in grads)
                and bool((grads[0][:, :, 0] == 0).all())  # type: ignore[index]
            ):
                return False
    except Exception:  # noqa: BLE001 - a backend that cannot run here proves nothing
        return False
    return True


def _kernel_is_safe(sdpa: Callable[..., Tensor], query: Any) -> bool:
    """Whether this call is an eager call of torch's own CPU kernel, known safe."""
    if not (
        sdpa is TORCH_SDPA and isinstance(query, Tensor) and masks.may_inspect_values(query) and not query.is_nested
    ):
        return False
    safe = _safe_cpu_dtypes.get(query.dtype)
    if safe is None:
        safe = query.is_floating_point() and _check_cpu_kernels(query.dtype)
        if safe is None:
            return False  # undecided: the general path, which is right on any kernel
        _safe_cpu_dtypes[query.dtype] = safe
    return safe


def safe_sdpa(sdpa: Callable[..., Tensor], args: tuple, kwargs: dict, *, mask_is_own: bool = False) -> Any:
    """Call ``sdpa(*args, **kwargs)`` so that fully masked query rows give 0.

    ``mask_is_own``: the mask is a temporary of the calling PyTorch function,
    held by no user, so it may be made safe in place."""
    if overrides_engaged(args, kwargs):
        return _lower_right_bias_rows_cleared(sdpa(*args, **kwargs), args, kwargs)
    mask = get_arg(args, kwargs, ATTN_MASK, "attn_mask")
    if not isinstance(mask, Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        return sdpa(*args, **kwargs)  # no mask, or one PyTorch will reject itself
    # Where dynamo traces this code itself (behind another library's Python
    # function in SDPA's place: _patching._replacement), nothing is handed back,
    # and reading a context variable would break the graph.
    if not torch.compiler.is_dynamo_compiling() and _tracing_kernel_call.get():
        return sdpa(*args, **kwargs)  # the traced fix's own kernel call, handed back by a tracer
    try:
        fix = _fix_for(sdpa, args, kwargs, mask, mask_is_own)
    except Exception:  # noqa: BLE001 - malformed input: let PyTorch raise its own error
        fix = None
    # The kernel runs once, outside the try: an exception of its own (an error,
    # or activation checkpointing's signal to stop recomputing) is the caller's.
    if fix is None:
        return sdpa(*args, **kwargs)
    rows, args, kwargs = fix
    return masks.clear_result_rows(_kernel_call(sdpa, args, kwargs), rows, keepdim=True)


def _fix_for(
    sdpa: Callable[..., Tensor], args: tuple, kwargs: dict, mask: Tensor, mask_is_own: bool
) -> tuple[Tensor, tuple, dict] | None:
    """The fully masked rows and the arguments to call the kernel with, or None
    when the call needs no change."""
    query = get_arg(args, kwargs, 0, "query")
    if _kernel_is_safe(sdpa, query):
        return None
    key = get_arg(args, kwargs, 1, "key")
    if mask.shape[-1] == 0 or key.shape[-2] == 0:
        return None  # no keys at all: PyTorch's own answer
    # Every SDPA kernel computes a query row from that row alone, so without a
    # backward the NaN of a fully masked row stays there and is cleared after;
    # only a backward (0 * NaN in the key/value gradients) needs the safe mask.
    value = get_arg(args, kwargs, 2, "value")
    backward = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad or mask.requires_grad
    )
    rows, kernel_mask = masks.rows_and_safe_mask(mask, admit=backward, keepdim=True, in_place=mask_is_own)
    if kernel_mask is None:
        return None  # common case on CPU: nothing to fix
    if kernel_mask is not mask:
        args, kwargs = with_arg(args, kwargs, ATTN_MASK, "attn_mask", kernel_mask)
    return rows, args, kwargs


def _kernel_call(sdpa: Callable[..., Tensor], args: tuple, kwargs: dict) -> Tensor:
    # Only a tracer running real Python hands the call back; in eager the flag
    # would cost a context-variable write per call, and code that dynamo itself
    # traces symbolically must not touch it.
    if not torch.compiler.is_compiling() or torch.compiler.is_dynamo_compiling():
        return sdpa(*args, **kwargs)
    return call_with(_tracing_kernel_call, True, sdpa, *args, **kwargs)


def _lower_right_bias_rows_cleared(out: Any, args: tuple, kwargs: dict) -> Any:
    """PyTorch's ``causal_lower_right`` bias with more queries than keys leaves
    the first ``L - S`` query rows with no key. Where its handler calls back
    with a materialised mask, the fix already ran; where it calls a fused kernel
    directly (CUDA), those rows are NaN, so they are cleared here."""
    mask = get_arg(args, kwargs, ATTN_MASK, "attn_mask")
    if not (isinstance(mask, CausalBias) and isinstance(out, Tensor) and type(out) is Tensor):
        return out
    empty_rows = mask.seq_len_q - mask.seq_len_kv
    if mask.variant != CausalVariant.LOWER_RIGHT or empty_rows <= 0 or out.shape[-2] != mask.seq_len_q:
        return out
    rows = torch.arange(mask.seq_len_q, device=out.device) < empty_rows
    return masks.clear_result_rows(out, rows)


def _wrapper(wrapped: Callable[..., Tensor], instance: Any, args: tuple, kwargs: dict) -> Any:
    return safe_sdpa(wrapped, args, kwargs)


# torch._C._nn's name is the one PyTorch passes to __torch_function__ handlers as
# ``func``; with the same wrapper there, ``func is F.scaled_dot_product_attention``
# holds in a handler (CausalBias's check) as it does without attnpatch.
POINT = PatchPoint(
    "torch.nn.functional",
    "scaled_dot_product_attention",
    _wrapper,
    aliases=(("torch._C._nn", "scaled_dot_product_attention"),),
)
POINTS = [POINT]
