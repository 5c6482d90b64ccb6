"""Target ``hf_generate``: right-padded batches given to ``generate()`` are re-aligned
to left padding.

Knows transformers 4.57 and 5.x (tested: 4.57.6, 5.24.0): one patch point,
``GenerationMixin.generate`` in ``transformers.generation.utils`` (every model's
``generate``; not an ``nn.Module`` method, so torch.compile's guards are not
involved).

A decoder-only model continues each row after its last token, so a right-padded
row continues after its pads. When the batch is right-padded, each row is rotated
so that its pads come first: ``input_ids``, ``attention_mask``, ``inputs_embeds``
and every other tensor argument shaped ``(batch, tokens, ...)`` move identically.
The call is then exactly the left-padded call, and its result is returned as is
(prompts in the output are left-padded).

Padding is read from ``attention_mask``; with none, from the run of
``pad_token_id`` that ends each row, also when the pad is an eos token (where
transformers cannot infer the mask: we then pass the mask we read). Left-padded,
unpadded and holed batches, calls with a ``past_key_values`` cache and
encoder-decoder models pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnpatch import masks
from attnpatch._patching import PatchPoint, logger

_logged = False  # the re-alignment is logged once per process


def _pad_token_ids(model: Any, kwargs: dict) -> list[int] | None:
    pad = kwargs.get("pad_token_id")
    if pad is None:
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        pad = getattr(config, "pad_token_id", None)
    if pad is None:
        return None
    if isinstance(pad, Tensor):
        pad = pad.tolist()
    return [int(p) for p in pad] if isinstance(pad, (list, tuple)) else [int(pad)]


def _realigned_call(model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The generate() arguments with right padding moved to the left, or None to
    leave the call untouched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if kwargs.get("past_key_values") is not None:
        return None  # continuing from a cache: the prompt layout is fixed already
    inputs = args[0] if args else kwargs.get("inputs")
    if isinstance(inputs, Tensor) and getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None  # e.g. pixel or audio inputs
    input_ids = inputs if isinstance(inputs, Tensor) else kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    reference = input_ids if isinstance(input_ids, Tensor) else embeds
    if not isinstance(reference, Tensor) or reference.ndim < 2 or reference.shape[1] < 2:
        return None
    batch, tokens = reference.shape[:2]

    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (batch, tokens):
            return None
        lengths = masks.right_padding_lengths(attention_mask)
    else:
        pad_ids = _pad_token_ids(model, kwargs)
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or pad_ids is None:
            return None
        lengths = masks.trailing_pad_lengths(input_ids, pad_ids)
    if lengths is None:
        return None

    shifts = tokens - lengths

    def move(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (batch, tokens):
            return masks.shift_right(value, shifts)
        return value

    args = tuple(move(value) if i == 0 else value for i, value in enumerate(args))
    kwargs = {name: move(value) for name, value in kwargs.items()}
    if attention_mask is None:
        positions = torch.arange(tokens, device=reference.device)
        kwargs["attention_mask"] = (positions >= shifts.to(reference.device).unsqueeze(-1)).long()
    return args, kwargs


def _generate_wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    global _logged
    realigned = _realigned_call(instance, args, kwargs)
    if realigned is None:
        return wrapped(*args, **kwargs)
    if not _logged:
        _logged = True
        logger.warning(
            "attnpatch: generate() got a right-padded batch for a decoder-only model; "
            "it was re-aligned to left padding (prompts in the output are left-padded)."
        )
    return wrapped(*realigned[0], **realigned[1])


POINT = PatchPoint("transformers.generation.utils", "GenerationMixin.generate", _generate_wrapper)
POINTS = [POINT]
