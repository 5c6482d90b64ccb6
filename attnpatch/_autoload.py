"""Imported by ``attnpatch.pth`` at interpreter start-up when ``ATTNPATCH`` is set.

``ATTNPATCH=1`` (or ``all``) turns every default target on; a comma list such
as ``ATTNPATCH=sdpa,mha`` picks targets, and ``ATTNPATCH=1,softmax`` adds an
opt-in one. The variable is inherited by every child
process, so torchrun workers, spawned DataLoader workers and subprocesses are
covered too. Nothing heavy is imported here: targets install when torch or
transformers are imported.
"""

import os
import warnings

import attnpatch
from attnpatch._patching import AttnPatchWarning

_value = os.environ.get("ATTNPATCH", "").strip()
try:
    attnpatch.apply(None if _value.lower() in ("1", "all", "true", "yes", "on") else _value)
except (TypeError, ValueError) as exc:  # a typo in the variable must not kill the interpreter
    warnings.warn(f"attnpatch: ignoring ATTNPATCH={_value!r}: {exc}", AttnPatchWarning, stacklevel=1)
