"""The fix without patching, for transformers: an attention implementation.

    import attnpatch.transformers
    attnpatch.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnpatch_sdpa")

``attnpatch_sdpa`` is transformers' own ``sdpa`` attention with the fix the
patched ``hf_attention`` target gives it (the same wrapper, around the same
function): a fully masked query row (a left pad) gives attention output 0, and
every other row is bitwise what ``sdpa`` computes. The model builds the masks
it builds for ``sdpa``. It reaches every model that dispatches its attention
through transformers' ``AttentionInterface`` (Llama, Qwen2, Mistral, Gemma, ...).

``register()`` adds the name to transformers' registries of attention functions
and mask builders, as transformers documents for a custom implementation; it
changes nothing else. Importing ``attnpatch`` or this module registers nothing.
Knows transformers 4.57 and 5.x.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.integrations import sdpa_attention
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from attnpatch.targets import hf_attention

__all__ = ["SDPA", "register", "sdpa_attention_forward"]

SDPA = "attnpatch_sdpa"

_fix_sdpa = hf_attention.zero_padded_rows("sdpa")
# transformers' own function, also where attnpatch's hf_attention target has put
# its replacement under that name (the replacement names what it wraps).
_transformers_sdpa = inspect.unwrap(sdpa_attention.sdpa_attention_forward)


def sdpa_attention_forward(*args: Any, **kwargs: Any) -> Any:
    """transformers' ``sdpa_attention_forward`` (same signature: ``module, query,
    key, value, attention_mask, ...``) under the contract."""
    return _fix_sdpa(_transformers_sdpa, None, args, kwargs)


def register() -> None:
    """Make ``attn_implementation="attnpatch_sdpa"`` known to transformers (in
    ``from_pretrained``, ``from_config``, ``set_attn_implementation``). Calling
    it again changes nothing."""
    AttentionInterface.register(SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(SDPA, sdpa_mask)
