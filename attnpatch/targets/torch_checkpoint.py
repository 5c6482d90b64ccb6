"""Companion ``checkpoint`` (installed while any target is; not a target itself):
activation checkpointing recomputes a forward with the attnpatch state that
forward ran under.

``torch.utils.checkpoint`` runs a checkpointed function twice: in forward, its
activations dropped, and again when backward needs them. A ``patched()`` scope
may close in between (``with attnpatch.patched(): loss = model(x)``, then
``loss.backward()``): the recomputation would then run unpatched, giving
non-finite gradients, or a ``CheckpointError`` where it saves other tensors
than its forward did. Here the function is handed on wrapped in
``_patching.replaying``, which runs it under the targets installed when it was
first called.

Both modes reach the function through a module global looked up at each call:
``CheckpointFunction`` (``use_reentrant=True``) and the non-reentrant generator
(``use_reentrant=False``; ``GENERATORS``). Patching those reaches every caller,
also one that bound ``checkpoint`` itself before attnpatch was on
(transformers' ``gradient_checkpointing_enable()``, ``checkpoint_wrapper``,
``checkpoint_sequential``), and the composable ``checkpoint(module)`` API,
which imported the generator by name (patched there too). torch.compile never calls
them: it traces checkpointed code into its graph, fix included.

Knows torch 2.5 - 2.15.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.utils.checkpoint as torch_checkpoint

from attnpatch._patching import ObjectPoint, PatchPoint, replaying


def _with_state(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    function, *rest = args
    return wrapped(replaying(function), *rest, **kwargs)


TORCH_CHECKPOINT_FUNCTION = torch_checkpoint.CheckpointFunction  # read before it is patched


class CheckpointFunction(TORCH_CHECKPOINT_FUNCTION):
    # torch's CheckpointFunction, its function run under the state of its
    # forward (its backward, inherited, calls ctx.run_function: the replaying
    # one). Named as torch's, so that it prints, pickles (by that name) and names
    # its backward nodes (CheckpointFunctionBackward) as torch's does.
    __module__ = TORCH_CHECKPOINT_FUNCTION.__module__
    __doc__ = TORCH_CHECKPOINT_FUNCTION.__doc__

    @staticmethod
    def forward(ctx: Any, run_function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        return TORCH_CHECKPOINT_FUNCTION.forward(ctx, replaying(run_function), preserve_rng_state, *args)


# The non-reentrant generator: ``_checkpoint_without_reentrant_generator`` up to
# torch 2.14, ``..._impl`` from 2.15 (the old name stays as a shim calling it);
# also where the composable ``checkpoint(module)`` API (FSDP2's) imported it by name.
GENERATORS = ("_checkpoint_without_reentrant_generator", "_checkpoint_without_reentrant_generator_impl")
POINTS: list[PatchPoint] = [
    *(
        PatchPoint(module, name, _with_state, optional=True)
        for module in ("torch.utils.checkpoint", "torch.distributed._composable.checkpoint_activation")
        for name in GENERATORS
    ),
    ObjectPoint("torch.utils.checkpoint", "CheckpointFunction", prepare=lambda _original: CheckpointFunction),
]
