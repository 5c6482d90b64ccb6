"""The fix without patching: torch's attention functions with the contract's
semantics, for code that may not change global state (a library, a team whose
rules forbid monkey-patching).

    from attnpatch import functional as AF

    out = AF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    mha = AF.MultiheadAttention(embed_dim, num_heads, batch_first=True)

Each function is torch's own function with the very wrapper that the patched
target puts in torch's place, held here instead of installed: a call is
bitwise the patched call, and it calls torch's original kernels whether
attnpatch is on or off (the fix never runs twice). Importing this module
patches nothing and installs no hook.

The functions are wrapt proxies of torch's functions, so torch.compile,
torch.export and the ONNX exporter see the torch function they stand for (one
node in the graph, into which the fix is traced), and fake and meta tensors
and ``torch.func`` transforms take the paths the patched targets take.
A ``TorchFunctionMode`` (``torch.device(...)``, ``torch.set_default_device``)
gets the call with ``func`` = the function here, which compares equal to
torch's, and its call back gets the fix. A tensor subclass with its own
``__torch_function__`` gets torch's function, as without attnpatch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import wrapt
from torch import nn

from attnpatch.targets import (
    copy_with_globals,
    dispatch_overrides,
    namespace_copy,
    torch_mha,
    torch_sdpa,
    torch_softmax,
)

__all__ = ["scaled_dot_product_attention", "multi_head_attention_forward", "softmax", "MultiheadAttention"]


class _Fixed(wrapt.FunctionWrapper):
    """torch's function with attnpatch's fix around it. Copies and pickles as
    itself, found by name in this module, never as the torch function it wraps
    (a proxy would otherwise copy as the unfixed one, or refuse to)."""

    def __copy__(self) -> _Fixed:
        return self

    def __deepcopy__(self, memo: dict) -> _Fixed:
        return self

    _self_name: str  # the name this module holds it under

    def __reduce_ex__(self, protocol: Any) -> tuple[Callable[[str], Any], tuple[str]]:
        return _by_name, (self._self_name,)


def _by_name(name: str) -> Any:
    return globals()[name]


def _fixed(name: str, original: Callable[..., Any], wrapper: Callable[..., Any]) -> _Fixed:
    """``original`` called through the patched target's ``wrapper``.

    Under a TorchFunctionMode the patched target relies on the mode calling back
    through the patched name; here nothing is patched, so the mode is handed this
    function instead, and its call back (with the mode popped) runs the fix.
    While torch.compile or export traces, their modes are not the caller's: the
    target's wrapper runs, and the fix is traced into the graph."""

    def call(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        if torch._C._is_torch_function_mode_enabled() and not torch.compiler.is_compiling():
            return dispatch_overrides(function, args, kwargs)
        return wrapper(wrapped, instance, args, kwargs)

    function = _Fixed(original, call)
    function._self_name = name
    return function


# Each carries torch's name, signature and docstring (a proxy hands them through;
# setting one would set torch's).

# F.scaled_dot_product_attention: a query row whose attn_mask admits no key gives
# output 0 and a zero, finite gradient; every other row is bitwise torch's.
scaled_dot_product_attention = _fixed("scaled_dot_product_attention", torch_sdpa.TORCH_SDPA, torch_sdpa._wrapper)

# F.multi_head_attention_forward: a fully masked query row gets weights 0 and
# output out_proj(0), its bias; every other row is bitwise torch's.
multi_head_attention_forward = _fixed(
    "multi_head_attention_forward", torch_mha.TORCH_MHA_FORWARD, torch_mha._mha_forward_wrapper
)

# F.softmax with the opt-in softmax target's semantics: over the last dim of a
# float tensor, a row of all -inf gives 0 and a zero gradient
# (aten._safe_softmax); every other row is bitwise softmax's, NaN input still
# NaN. Any other dim is plain F.softmax.
softmax = _fixed("softmax", inspect.unwrap(F.softmax), torch_softmax._softmax_wrapper(dim_at=1, dtype_at=3))

# The fused inference kernel of nn.MultiheadAttention, for MultiheadAttention below.
_native_multi_head_attention = _fixed(
    "_native_multi_head_attention",
    torch._C._VariableFunctions._native_multi_head_attention,
    torch_mha._native_mha_wrapper,
)


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same arguments, parameters and state dict) under
    the contract, on every path: training, ``need_weights`` True and False,
    ``batch_first``, and the fused inference fast path.

    Its ``forward`` is torch's own code, run with ``F.multi_head_attention_forward``
    and ``torch._native_multi_head_attention`` bound to the fixed functions of
    this module: every call is bitwise the patched module's."""

    forward = copy_with_globals(
        nn.MultiheadAttention.forward,
        F=namespace_copy(F, multi_head_attention_forward=multi_head_attention_forward),
        torch=namespace_copy(torch, _native_multi_head_attention=_native_multi_head_attention),
    )
