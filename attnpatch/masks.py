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

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

NEG_INF = float("-inf")


def fully_masked_rows(mask: Tensor, *, drop: bool = False, keepdim: bool = False) -> Tensor:
    """Boolean tensor of shape ``mask.shape[:-1]`` (``keepdim``: with the last dim
    kept as 1): True where the row admits no key.

    ``drop`` selects the boolean convention (see module docstring). A float row is
    fully masked only when every entry is exactly ``-inf``; a NaN entry keeps the
    row "not fully masked" so NaN propagates exactly as without attnpatch.
    """
    if mask.dtype == torch.bool:
        if _common_ops_only(mask):
            # A count, not any/all: inductor's CPU code for any/all over bool
            # widens every element to int64 (the compiled fix at B=8, L=512:
            # 8.3 against 6.8 ms). An empty row counts no key: fully masked.
            count = mask.sum(-1, keepdim, dtype=_count_dtype(mask))
            return count == mask.shape[-1] if drop else count == 0
        if _packs_into_int32(mask):
            # CPU reductions over bool are byte at a time; over int32 words they
            # are vectorised (about 100x faster). A bool byte is 0 or 1, so a row
            # is all False when every word is 0 and all True when every word is
            # 0x01010101, the largest word a bool row can hold.
            words = mask.view(torch.int32)
            return words.amin(-1, keepdim) == _ALL_TRUE_WORD if drop else words.amax(-1, keepdim) == 0
        # amax/amin over bool run about 4x faster than any/all on CPU (see
        # _common_ops_only for where they cannot run). Empty rows: all() is True.
        # logical_not, not ~: torch's Python binding of ~ wants a real device, so
        # it fails on fake CUDA tensors (the tests' stand-in for a GPU).
        if mask.shape[-1] == 0:
            return mask.all(-1, keepdim) if drop else mask.any(-1, keepdim).logical_not()
        return mask.amin(-1, keepdim) if drop else mask.amax(-1, keepdim).logical_not()
    if _common_ops_only(mask):
        return (mask == NEG_INF).all(-1, keepdim)
    # One reduction pass; amax propagates NaN and NaN == -inf is False.
    return mask.amax(-1, keepdim) == NEG_INF


_is_exporting: Callable[[], bool] | None = getattr(torch.compiler, "is_exporting", None)


def _count_dtype(mask: Tensor) -> torch.dtype:
    """The dtype of a bool row's key count: int16 where a row cannot overflow it,
    except in a graph being exported (ONNX has no int16 sum) or where the running
    torch cannot tell export apart. Counting bool in int16 is the faster count:
    inductor's CPU code widens bool 16 lanes at a time into int16, 8 into int32
    (the compiled count at B=8, L=S=512: 1.8-2.0 against 3.2-3.6 ms), and an
    eager CPU sum is faster too (0.23 against 1.0 ms)."""
    if _is_exporting is None or _is_exporting() or mask.shape[-1] >= 1 << 15 or jit_tracing():
        return torch.int32
    return torch.int16


def is_plain(tensor: Tensor) -> bool:
    """Whether ``tensor`` is an ordinary tensor: not a subclass (a DTensor, the
    fake and functional tensors of tracing) and not the wrapper of a ``torch.func``
    transform (``vmap``, ``grad``, ``jacrev``...). Those wrappers pass for
    ``torch.Tensor``, but they have no storage, cannot be read on the host
    under ``vmap`` and cannot run an autograd.Function without ``setup_context``.
    While torch.compile traces, the type alone decides: dynamo cannot call the
    wrapper check (a graph break), and every caller treats tracing apart."""
    return type(tensor) is torch.Tensor and (torch.compiler.is_compiling() or not _is_functorch_wrapped(tensor))


def is_plain_in_eager(tensor: Tensor) -> bool:
    """``is_plain(tensor)`` and no tracer records the call (``is_traced``): the
    tensor holds real values that may be looked at, cached and changed in place."""
    return (
        type(tensor) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not _jit_is_tracing()  # is_traced(), spelled out: this runs on every masked call
        and not _is_functorch_wrapped(tensor)
    )


def is_traced() -> bool:
    """Whether a tracer records this call into a graph that runs later, on other
    inputs: torch.compile and export (dynamo, AOT), or ``torch.jit.trace`` (and the
    TorchScript-based ONNX exporter, which traces with it). Then no value may
    steer a branch, nothing cached from an eager call may be baked in, and the fix
    is recorded as ordinary ops (ONNX has no ``view(dtype)`` or int16 sum)."""
    return torch.compiler.is_compiling() or jit_tracing()


def jit_tracing() -> bool:
    """``torch.jit.trace`` is recording. Never asked while dynamo traces (it cannot
    call this C function without a graph break, and never runs under jit.trace)."""
    return not torch.compiler.is_compiling() and _jit_is_tracing()


_jit_is_tracing: Callable[[], bool] = torch._C._is_tracing


def forward_ad_active() -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad.dual_level``) is on:
    tensors may carry tangents, which in-place tricks on a result and a custom
    autograd.Function without a ``jvp`` would break; torch's own ops carry them."""
    return _forward_ad._current_level >= 0


_is_functorch_wrapped: Callable[[Tensor], bool] = torch._C._functorch.is_functorch_wrapped_tensor


def _common_ops_only(tensor: Tensor) -> bool:
    """Whether ``tensor`` gets only the ops every supported torch can run on it:
    anything not ``is_plain`` (a DTensor, whose ops need sharding rules: torch 2.5
    has none for ``amax``/``amin`` or an in-place ``masked_fill_``; the functional
    and fake tensors of AOT tracing; a ``torch.func`` wrapper) or anything while
    dynamo traces (inductor in torch 2.5 cannot lower ``amax`` over bool). Plain
    tensors in eager get the faster formulations."""
    return not is_plain_in_eager(tensor)


_ALL_TRUE_WORD = 0x01010101
_WORDS_FROM = 1 << 16  # bytes: below this, one op fewer beats the faster reduction


def _packs_into_int32(mask: Tensor) -> bool:
    """Whether ``mask.view(torch.int32)`` is allowed and pays: rows of whole,
    aligned words in a mask large enough. Asked only of a plain tensor in eager
    (``storage_offset()`` breaks dynamo's graph, and inductor in torch 2.5
    cannot lower a dtype view of bool)."""
    return (
        mask.dim() > 0
        and mask.numel() >= _WORDS_FROM
        and mask.shape[-1] % 4 == 0
        and mask.stride(-1) == 1
        and mask.storage_offset() % 4 == 0
        and all(stride % 4 == 0 for stride in mask.stride()[:-1])
    )


def admit_rows(
    mask: Tensor, rows: Tensor, *, drop: bool = False, keepdim: bool = False, in_place: bool = False
) -> Tensor:
    """A new mask in which each row flagged in ``rows`` admits a key (``keepdim``:
    ``rows`` has the mask's last dim kept as 1). ``in_place``: a float mask no
    caller holds is changed itself.

    Softmax over such a row is finite, so any kernel computes a finite (and
    meaningless) result there, which the caller then clears; its gradient is
    cleared with it, so which keys are admitted does not matter. A float mask
    admits only its first key: a copy (or nothing) and a write to one column
    cost less than an elementwise pass that rewrites every entry. A boolean mask
    admits every key, in one logical op (ONNX Runtime has no boolean Where, so
    a column write would not export). Rows not flagged are copied unchanged, so
    their results stay bitwise identical.
    """
    flagged = rows if keepdim else rows.unsqueeze(-1)
    if mask.dtype == torch.bool:
        return mask & flagged.logical_not() if drop else mask | flagged
    if _common_ops_only(mask):
        return mask.masked_fill(flagged, 0.0)
    safe = mask if in_place else mask.clone()
    safe[..., :1].masked_fill_(flagged, 0.0)
    return safe


def clear_rows(out: Tensor, rows: Tensor, fill: Tensor | None = None, *, keepdim: bool = False) -> Tensor:
    """``out`` with each flagged row replaced by ``fill`` (broadcast over the last dim) or 0.

    ``rows`` must broadcast against ``out.shape[:-1]`` (``keepdim``: against
    ``out``, its last dim 1). ``masked_fill``/``where`` pass zero gradient to
    the cleared rows, so they contribute nothing to any gradient upstream.
    """
    flagged = rows if keepdim else rows.unsqueeze(-1)
    if fill is None:
        # masked_fill, not where: a DTensor result keeps ``out``'s placement (on
        # torch 2.6 a where follows its replicated condition and gathers ``out``).
        return out.masked_fill(flagged, 0.0)
    return torch.where(flagged, fill.to(out.dtype), out)


def clear_result_rows(out: Tensor, rows: Tensor, fill: Tensor | None = None, *, keepdim: bool = False) -> Tensor:
    """``clear_rows`` for a result the caller does not hold yet (a kernel's fresh
    output): in place when autograd is not recording it, which saves a copy of
    the whole output. With autograd recording, the kernel may have saved ``out``
    for its backward, so it is cleared out of place."""
    if (out.requires_grad and torch.is_grad_enabled()) or not is_plain(out) or jit_tracing() or forward_ad_active():
        return clear_rows(out, rows, fill, keepdim=keepdim)
    if may_inspect_values(out):
        # On CPU a boolean index writes just the flagged rows (given a whole row
        # as the value); masked_fill_ and where walk every element.
        value = torch.zeros(out.shape[-1], dtype=out.dtype, device=out.device) if fill is None else fill.to(out.dtype)
        out[(rows[..., 0] if keepdim else rows).expand(out.shape[:-1])] = value
        return out
    flagged = rows if keepdim else rows.unsqueeze(-1)
    if fill is None:
        if out.numel() >= _BITWISE_FROM and out.is_floating_point() and not torch.compiler.is_compiling():
            bits = out.view(_SAME_WIDTH_INT[out.element_size()])
            bits.mul_(_kept_rows(rows, keepdim, bits.dtype))
            return out
        return out.masked_fill_(flagged, 0.0)
    return torch.where(flagged, fill.to(out.dtype), out, out=out)


# Clearing rows in place, eager: the output's bits, viewed as integers of the same
# width, are multiplied by 0 in a flagged row and by 1 elsewhere. That is exact
# (+0.0 whatever the row held, NaN included; every other row's bits untouched) and
# one vectorised pass on every device, where CPU's masked_fill_ walks element by
# element (1.6 ms against 0.2 ms on an 8x16x128x64 float32 output).
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITWISE_FROM = 1 << 12  # elements: from here the multiply is faster (CPU: 5.9 vs 3.9 us at 4096, 2.7 vs 3.5 at 256)
# (weak reference to rows, keepdim, kept rows) for the last rows cleared:
# rows_and_safe_mask hands every layer of a forward the same rows tensor, so the
# kept rows are built once per forward and each call is one kernel, as masked_fill_ is.
# They are held in the integer dtype they multiply: a bool operand would be cast
# to it by a copy on every call (CPU: 5.4 against 3.5 us on an 8x16x1x64 output).
_last_kept_rows: tuple[Any, ...] = (None, None, None)


def _kept_rows(rows: Tensor, keepdim: bool, dtype: torch.dtype) -> Tensor:
    global _last_kept_rows
    ref, last_keepdim, kept = _last_kept_rows
    if ref is not None and ref() is rows and last_keepdim == keepdim and kept.dtype == dtype:
        return kept
    flagged = rows if keepdim else rows.unsqueeze(-1)
    kept = torch.logical_not(flagged, out=torch.empty_like(flagged, dtype=dtype))
    _last_kept_rows = (weakref.ref(rows), keepdim, kept)
    return kept


# (drop, keepdim) -> [weak reference to a mask, its _version, rows, safe mask].
# One entry per convention and caller: the layers of one forward pass reuse one mask tensor,
# so the first layer pays for the mask pass and the others look it up. The
# entry goes when its mask is freed. The safe mask is built on first demand.
_last_mask: dict[tuple[bool, bool], list[Any]] = {}
_UNBUILT = object()


def rows_and_safe_mask(
    mask: Tensor, *, drop: bool = False, admit: bool = True, keepdim: bool = False, in_place: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``fully_masked_rows(mask)`` and ``admit_rows(mask, rows)``; the safe mask is
    ``None`` when the rows could be looked at (``may_inspect_values``) and none is
    fully masked, so the call needs no change.

    ``admit=False`` is for a kernel whose result rows are computed row by row and
    through which no backward will run: the NaN it may give a fully masked row
    stays in that row, which the caller overwrites, so the kernel gets ``mask``
    itself and no safe mask (a pass over the whole mask) is built.

    ``in_place=True`` is for a mask that only the caller's callee holds (one
    ``nn.MultiheadAttention`` built during the call): the safe mask is the mask
    itself, changed in place, which saves a copy of the whole mask.

    The answer for the last mask seen is kept, keyed on the tensor's identity and
    its version counter (bumped by every in-place change), and the mask itself
    is only weakly held. Not cached: tensor subclasses, masks that require grad
    (the safe mask would carry a stale graph), inference tensors (no version
    counter) and anything while torch.compile traces.
    """
    cacheable = not in_place and is_plain_in_eager(mask) and not mask.requires_grad and not mask.is_inference()
    key = (drop, keepdim)
    entry = _last_mask.get(key) if cacheable else None
    if entry is None or entry[0]() is not mask or entry[1] != mask._version:
        rows = fully_masked_rows(mask, drop=drop, keepdim=keepdim)
        entry = [None, 0, rows, None if may_inspect_values(mask) and not rows.any() else _UNBUILT]
        if cacheable:
            entry[:2] = weakref.ref(mask, _forget_entry(key)), mask._version
            _last_mask[key] = entry
    rows, safe = entry[2], entry[3]
    if safe is None or not admit:
        return rows, None if safe is None else mask
    if safe is _UNBUILT:
        safe = entry[3] = admit_rows(mask, rows, drop=drop, keepdim=keepdim, in_place=in_place)
    return rows, safe


def _forget_entry(key: tuple[bool, bool]) -> Callable[[weakref.ref], None]:
    """Callback for when a cached mask dies: drop its entry with it, so that a
    safe mask never outlives the mask it was made from (no memory held between
    calls for masks built afresh each time)."""

    def forget(ref: weakref.ref) -> None:
        entry = _last_mask.get(key)
        if entry is not None and entry[0] is ref:
            _last_mask.pop(key, None)

    return forget


def native_rows_per_head(head_rows: Tensor, mask_type: int) -> Tensor:
    """``fully_masked_rows`` of a mask given to PyTorch's native MHA / encoder-layer
    kernels, as (B, H, L)-broadcastable flags. ``mask_type`` says its layout:
    0 an (L, S) attn_mask, 1 a (B, S) key padding mask (a fully padded batch
    element masks every query), 2 a merged (B, H, L, S) mask."""
    if mask_type == 0:
        return head_rows.view(1, 1, -1)
    if mask_type == 1:
        return head_rows.view(-1, 1, 1)
    return head_rows


def rows_and_kernel_mask(mask: Tensor, *, drop: bool = False) -> tuple[Tensor, Tensor] | None:
    """For a fused kernel whose steps after the softmax are row by row (native
    MHA, the encoder layer): the fully masked rows, and the mask to call it with.
    None when nothing needs fixing.

    Where values can be looked at (CPU), the kernel keeps the caller's mask: the
    NaN of a fully masked row stays in that row, which the caller overwrites, and
    no copy of a (B, H, L, S) mask is made. Elsewhere it gets the safe mask.
    """
    if may_inspect_values(mask):
        rows = fully_masked_rows(mask, drop=drop)
        return (rows, mask) if rows.any() else None
    rows, safe = rows_and_safe_mask(mask, drop=drop)
    return rows, mask if safe is None else safe


# True makes every call take the general path, the one CUDA and torch.compile
# take, on CPU too: no value is read on the host and torch's CPU kernels are not
# trusted. For the tests and benchmarks of that path; process-wide, not per thread.
FORCE_GENERAL_PATH = False


def may_inspect_values(tensor: Tensor) -> bool:
    """Whether reading a value of ``tensor`` on the host is free and allowed here.

    True only for a plain CPU tensor (``is_plain``) outside ``torch.compile`` /
    export tracing (and unless ``FORCE_GENERAL_PATH``): on CUDA it would add a
    host-device sync, and while tracing (or under ``vmap``) a data-dependent
    Python branch breaks ``fullgraph=True`` compilation (or raises).
    """
    return (
        not FORCE_GENERAL_PATH
        and is_plain_in_eager(tensor)  # first: is_cpu dispatches an op on a subclass
        and tensor.is_cpu  # cheaper than tensor.device.type, which builds a device object
    )


def safe_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
    """``F.softmax`` (same signature, so it can stand in for it inside PyTorch's
    and transformers' own attention code) with ``aten._safe_softmax`` semantics:
    a row of all ``-inf`` gives weights 0 and a zero, finite gradient; every
    other row is bitwise softmax's."""
    if dim is None:
        return F.softmax(input, dim, _stacklevel, dtype)
    if dim in (-1, input.dim() - 1) and input.numel() > 0 and is_plain_in_eager(input) and not forward_ad_active():
        zero_rows = _zero_all_masked_rows if may_inspect_values(input) else _clear_all_masked_rows
        if input.requires_grad and torch.is_grad_enabled():
            return _ZeroRowsSoftmax.apply(input, dtype, zero_rows)
        return zero_rows(_softmax(input, -1, dtype=dtype), input)
    if jit_tracing():
        # The TorchScript-based ONNX exporter has no symbolic for aten._safe_softmax.
        return composite_safe_softmax(input, dim, dtype)
    return _traceable_safe_softmax(input, dim, dtype)


def composite_safe_softmax(input: Tensor, dim: int, dtype: Any = None) -> Tensor:
    """``aten._safe_softmax`` from plain ops, for a torch that lacks the op: an all
    ``-inf`` row is turned into a row of zeros before the softmax (so its
    backward is finite) and its output set to 0 after it (so its gradient is
    exactly zero); every other row goes through softmax untouched."""
    all_masked = (input == NEG_INF).all(dim, keepdim=True)
    return _softmax(input.masked_fill(all_masked, 0), dim, dtype=dtype).masked_fill(all_masked, 0)


def _aten_safe_softmax(input: Tensor, dim: int, dtype: Any = None) -> Tensor:
    # The aten op (not torch._safe_softmax) so that dynamo can trace it.
    return torch.ops.aten._safe_softmax.default(input, dim, dtype)


# torch.softmax itself, which the opt-in ``softmax`` target replaces by a
# function that calls back in here.
_softmax = torch._C._VariableFunctions.softmax


def _zero_all_masked_rows(out: Tensor, input: Tensor) -> Tensor:
    """Set to 0, in place, the rows of the softmax ``out`` whose ``input`` row is
    all ``-inf`` (their weights came out NaN). Only rows whose first weight is
    NaN are looked at: NaN from NaN or ``+inf`` scores stays, as in softmax."""
    nan_rows = out.select(-1, 0).isnan()
    if nan_rows.any():
        index = nan_rows.nonzero(as_tuple=True)
        all_masked = input[index].amax(-1) == NEG_INF
        out[tuple(i[all_masked] for i in index)] = 0
    return out


def _clear_all_masked_rows(out: Tensor, input: Tensor) -> Tensor:
    """``_zero_all_masked_rows`` without reading a value on the host (CUDA): one
    reduction finds the all ``-inf`` rows (amax propagates NaN, so a row with a
    NaN score keeps its NaN, as in softmax) and they are cleared in place. The
    aten op spends a compare, a bool reduction and a ``where`` on it, and one
    more ``where`` in the backward."""
    return clear_result_rows(out, input.amax(-1, keepdim=True) == NEG_INF, keepdim=True)


# What torch.compile, tensor subclasses and torch.func transforms use: torch's own
# op where this torch has it, the composite otherwise (a capability check, not a
# version check).
_traceable_safe_softmax: Callable[..., Tensor] = (
    _aten_safe_softmax if hasattr(torch.ops.aten, "_safe_softmax") else composite_safe_softmax
)


class _ZeroRowsSoftmax(torch.autograd.Function):
    """``aten._safe_softmax`` over the last dim, in eager, for the cost of a plain
    softmax and ``zero_rows`` (``_zero_all_masked_rows`` on CPU, where only rows
    whose first weight came out NaN are looked at; ``_clear_all_masked_rows``
    elsewhere). The backward is softmax's own, on the saved output, so it
    matches ``_safe_softmax`` (and, saved as an output, it is differentiable
    again for double backward); its all ``-inf`` rows get exactly 0, as their
    output is 0."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, dtype: Any, zero_rows: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        out = zero_rows(_softmax(input, -1, dtype=dtype), input)
        ctx.save_for_backward(out)
        ctx.input_dtype = input.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (out,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, -1, ctx.input_dtype), None, None


# --- transformers conventions -------------------------------------------------
# transformers' mask builders mark a masked key with the dtype's lowest finite
# value (eager masks) as well as with False (SDPA masks) or -inf (custom masks),
# and a generate() batch describes its padding with a (batch, tokens) 0/1 mask.


def hf_fully_masked_rows(mask: Tensor) -> Tensor:
    """Like ``fully_masked_rows`` for a keep-convention mask, but a float row also
    counts as fully masked when every entry is ``-inf`` or the dtype's lowest
    finite value: for transformers both mean "this key is masked"."""
    if mask.dtype == torch.bool:
        return fully_masked_rows(mask)
    lowest = torch.finfo(mask.dtype).min
    if _common_ops_only(mask):
        return (mask <= lowest).all(-1)
    # amax propagates NaN, and NaN <= lowest is False: a NaN row stays as it is.
    return mask.amax(-1) <= lowest


def right_padding_lengths(attention_mask: Tensor) -> Tensor | None:
    """Per row, the number of real tokens of a right-padded (batch, tokens) mask.

    None unless every row is a run of kept tokens followed by a run of padding and
    at least one row is padded: left padding, holes and unpadded batches are not
    right padding. Reads values (one host sync): for generate(), not hot paths.
    """
    keep = attention_mask != 0
    lengths = keep.sum(-1)
    positions = torch.arange(keep.shape[-1], device=keep.device)
    if not torch.equal(keep, positions < lengths.unsqueeze(-1)):
        return None
    padded = (lengths > 0) & (lengths < keep.shape[-1])
    return lengths if bool(padded.any()) else None


def trailing_pad_lengths(input_ids: Tensor, pad_token_ids: list[int]) -> Tensor | None:
    """Per row, the number of tokens before the run of pad tokens that ends the row.

    None when no row ends with a pad, or when any row starts with one (left
    padding, or a row of nothing but pads: not ours to guess).
    """
    is_pad = torch.isin(input_ids, torch.tensor(pad_token_ids, device=input_ids.device))
    if bool(is_pad[:, 0].any()):
        return None
    # Every row starts with a real token, so the flipped argmax finds the last one.
    trailing = (~is_pad).flip(-1).int().argmax(-1)
    return input_ids.shape[-1] - trailing if bool((trailing > 0).any()) else None


def shift_right(tensor: Tensor, shifts: Tensor) -> Tensor:
    """``tensor`` with row ``b`` rotated ``shifts[b]`` places to the right along dim 1
    (the tokens that fall off the end come back at the front). Moves values, never
    computes them, so the moved tokens are bitwise the same."""
    batch, tokens = tensor.shape[:2]
    index = (torch.arange(tokens, device=tensor.device) - shifts.to(tensor.device).unsqueeze(-1)) % tokens
    index = index.view(batch, tokens, *[1] * (tensor.ndim - 2)).expand_as(tensor)
    return tensor.gather(1, index)
