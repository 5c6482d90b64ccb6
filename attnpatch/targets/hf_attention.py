"""Target ``hf_attention``: the attention functions transformers models dispatch through.

Knows transformers 4.57 and 5.x (tested: 4.57.6, 5.24.0). In both, an attention
module (``LlamaAttention``, ``Qwen2Attention``, ...) projects q/k/v and then calls
an attention *function*, looked up at call time:

* ``sdpa`` and ``flex_attention``: entries of the dict
  ``AttentionInterface._global_mapping`` in ``transformers.modeling_utils``, shared
  by every model. We replace the entries (not the module-level function names:
  the dict already holds the function objects). A fully masked query row (a left
  pad) is given a key, so any kernel computes something finite there, and its
  output row is then set to exactly 0. A boolean mask passes through when the
  SDPA call it leads to is fixed anyway (attnpatch's ``sdpa`` target, or
  torch's CPU kernel). Flex with a ``BlockMask`` (what transformers builds for
  it) already gives 0 there and passes through.
* ``eager``: the module-level ``eager_attention_forward`` of every model file
  (``transformers.models.*.modeling_*``), found as transformers imports it
  (``PointFamily``), among them Llama's and Qwen2's. Those of Llama's shape
  (``_not_llama_shaped``: 346 of the 356 that exist in 5.24, 162 of 164 in 4.57) are patched; the rest are
  skipped quietly, and ``attnpatch status`` says why. We call a copy of the
  model's *own* function whose ``nn.functional.softmax`` is
  ``aten._safe_softmax`` (0 for a row of ``-inf``), with the fully masked rows
  of the mask set to ``-inf``. So the returned weights are the very tensor the
  output was computed from (tests call ``retain_grad()`` on them), padded rows
  have weights 0 and output 0, and every other row is bitwise unchanged.

"Fully masked" here includes rows filled with the dtype's lowest finite value,
the marker transformers' eager masks use (``masks.hf_fully_masked_rows``).

Not patched, on purpose: ``nn.Module`` classes' ``forward`` (a wrapt wrapper there
breaks torch.compile's guards on torch 2.13); the per-implementation classes
(``LlamaSdpaAttention``, ``LlamaFlashAttention2``), which transformers removed in
4.48, before the supported range; flash-attention entries (they take no 4-D mask:
padding is removed before the kernel); paged entries (continuous batching, no
pad rows); the mask builders of ``transformers.masking_utils``: with torch >= 2.5
both versions leave pad rows fully masked, which is what lets the functions
above find them.
"""

from __future__ import annotations

import dis
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnpatch import masks
from attnpatch._patching import PatchPoint, PlainFunctionPoint, PointFamily, Skip
from attnpatch.targets import copy_with_globals, get_arg, namespace_copy, subclass_arguments, torch_sdpa, with_arg

MASK = 4  # attention_mask: (module, query, key, value, attention_mask, ...)


# --- sdpa / flex: entries of AttentionInterface._global_mapping -----------------


def zero_padded_rows(key: str) -> Callable[..., Any]:
    """Wrapper for the function of entry ``key``, returning ``(output (B, L, H, D), extra)``.
    ``attnpatch.transformers`` registers the same wrapper around transformers'
    own sdpa function as the ``attnpatch_sdpa`` implementation."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        mask = get_arg(args, kwargs, MASK, "attention_mask")
        if not isinstance(mask, Tensor) or mask.ndim != 4 or subclass_arguments(args, kwargs):
            return wrapped(*args, **kwargs)  # no mask, a BlockMask (already safe), or a subclass's call
        if not (mask.dtype == torch.bool or mask.is_floating_point()) or mask.shape[-1] == 0:
            return wrapped(*args, **kwargs)
        if key == "sdpa" and mask.dtype == torch.bool and _sdpa_fixes_it(get_arg(args, kwargs, 1, "query")):
            return wrapped(*args, **kwargs)  # the SDPA call it makes gives these rows 0
        rows = masks.hf_fully_masked_rows(mask)  # (B, H or 1, L)
        if masks.may_inspect_values(mask) and not rows.any():
            return wrapped(*args, **kwargs)  # common case on CPU: nothing to fix
        args, kwargs = with_arg(args, kwargs, MASK, "attention_mask", masks.admit_rows(mask, rows))
        output, *rest = wrapped(*args, **kwargs)
        return (masks.clear_rows(output, rows.transpose(1, 2)), *rest)

    return wrapper


def _sdpa_fixes_it(query: Any) -> bool:
    """Whether the SDPA call transformers' sdpa function makes gives an all-False
    row output 0 by itself: attnpatch's own ``sdpa`` target is installed (the
    same fix one call down; doing it here too would double its passes), or the
    call lands in torch's CPU kernel, known safe (``torch_sdpa`` checks that once
    per dtype)."""
    kernel = F.scaled_dot_product_attention
    if torch_sdpa.POINT.handle is not None and kernel is torch_sdpa.POINT.handle:
        return True
    return torch_sdpa._kernel_is_safe(kernel, query)


def _entry(key: str) -> PlainFunctionPoint:
    return PlainFunctionPoint(
        "transformers.modeling_utils", "AttentionInterface._global_mapping", zero_padded_rows(key), key=key
    )


# --- eager: each model file's eager_attention_forward ---------------------------


# torch.nn as the eager functions see it: the same, except functional.softmax.
SAFE_NN = namespace_copy(
    torch.nn,
    "attnpatch.safe_nn",
    functional=namespace_copy(F, "attnpatch.safe_nn.functional", softmax=masks.safe_softmax),
)


def _eager_point(module_name: str, optional: bool = True) -> PlainFunctionPoint:
    point = PlainFunctionPoint(module_name, "eager_attention_forward", optional=optional)

    def prepare(original: Any) -> Callable[..., Any]:
        if type(original) is not types.FunctionType or original.__globals__.get("nn") is not torch.nn:
            raise Skip(f"{point.qualname} is not transformers' plain function; attnpatch leaves it alone")
        why = _not_llama_shaped(original)
        if why:
            raise Skip(f"{point.qualname} {why}; attnpatch leaves it alone")
        return _eager_wrapper(copy_with_globals(original, nn=SAFE_NN))

    point.prepare = prepare
    return point


LLAMA_ARGUMENTS = ("module", "query", "key", "value", "attention_mask")


def _not_llama_shaped(function: types.FunctionType) -> str:
    """Why ``function`` is not an eager attention function of Llama's shape, or "".

    Llama's shape: ``(module, query, key, value, attention_mask, ...)``, and every
    softmax it computes is ``nn.functional.softmax`` (the name the copy rebinds).
    A softmax reached any other way (``F.softmax``, ``torch.softmax``, a method)
    would stay unsafe in the copy and turn the rows we set to ``-inf`` into NaN."""
    code = function.__code__
    if code.co_varnames[: min(code.co_argcount, 5)] != LLAMA_ARGUMENTS:
        return f"takes {code.co_varnames[: code.co_argcount]}, not {LLAMA_ARGUMENTS + ('...',)}"
    if any(isinstance(const, types.CodeType) for const in code.co_consts):
        return "defines nested functions"
    names = [i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_ATTR", "LOAD_METHOD")]
    softmaxes = [i for i, name in enumerate(names) if name == "softmax"]
    if not softmaxes:
        return "calls no softmax"
    if any(names[i - 2 : i] != ["nn", "functional"] for i in softmaxes):
        return "computes a softmax other than nn.functional.softmax"
    return ""


def _eager_wrapper(safe_copy: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        mask = get_arg(args, kwargs, MASK, "attention_mask")
        # Eager adds the mask to the scores: only float masks mean anything there.
        if not isinstance(mask, Tensor) or not mask.is_floating_point() or mask.shape[-1] == 0:
            return wrapped(*args, **kwargs)
        if subclass_arguments(args, kwargs):
            return wrapped(*args, **kwargs)
        rows = masks.hf_fully_masked_rows(mask)
        if masks.may_inspect_values(mask) and not rows.any():
            return wrapped(*args, **kwargs)
        # A row of -inf scores is what the safe softmax turns into weights of 0.
        safe_mask = mask.masked_fill(rows.unsqueeze(-1), masks.NEG_INF)
        args, kwargs = with_arg(args, kwargs, MASK, "attention_mask", safe_mask)
        return safe_copy(*args, **kwargs)

    return wrapper


# Every model file's eager_attention_forward, found as transformers imports it.
# Llama's and Qwen2's are listed up front: `attnpatch status` shows them before
# they load, and a version in which they stop fitting warns.
EAGER_MODULES = "transformers.models.*.modeling_*"
EAGER = PointFamily(EAGER_MODULES, "eager_attention_forward", _eager_point)

POINTS: list[PatchPoint] = [
    _entry("sdpa"),
    _entry("flex_attention"),
    _eager_point("transformers.models.llama.modeling_llama", optional=False),
    _eager_point("transformers.models.qwen2.modeling_qwen2", optional=False),
]
FAMILIES = [EAGER]
