"""Target ``hf_tokenizer``: tokenizers loaded while attnpatch is active pad on the left.

Knows transformers 4.57 and 5.x (tested: 4.57.6, 5.24.0): one patch point, the
classmethod ``PreTrainedTokenizerBase.from_pretrained`` in
``transformers.tokenization_utils_base``, through which every tokenizer class and
``AutoTokenizer`` load. A ``padding_side`` the caller passes wins; otherwise the
load gets ``padding_side="left"``, which overrides the saved tokenizer config.
Tokenizers loaded before ``apply()`` or after ``remove()`` are as transformers
makes them. ``attnpatch.apply(hf_tokenizer=False)`` turns this target off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attnpatch._patching import PatchPoint


def _from_pretrained_wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    if "padding_side" not in kwargs:
        kwargs = {**kwargs, "padding_side": "left"}
    return wrapped(*args, **kwargs)


POINT = PatchPoint(
    "transformers.tokenization_utils_base", "PreTrainedTokenizerBase.from_pretrained", _from_pretrained_wrapper
)
POINTS = [POINT]
