"""One module per patch target. Each defines ``POINTS`` (what it wraps) and says
which library versions it knows. Which module owns which target: see
``attnpatch._patching.TARGETS``."""

from __future__ import annotations

import contextvars
import sys
import types
from collections.abc import Callable
from typing import Any


def get_arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """The argument a call passed at ``index`` or as ``name``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def copy_with_globals(function: Callable[..., Any], **overrides: Any) -> Callable[..., Any]:
    """A copy of a plain Python function that runs the very same code, but finds
    some global names bound to other objects. Used to put a safe softmax inside
    PyTorch's and transformers' own attention code: same code, so every row the
    change does not touch is bitwise what the original computes."""
    copy = types.FunctionType(
        function.__code__,
        dict(function.__globals__, **overrides),
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    return copy


def namespace_copy(source: types.ModuleType, name: str | None = None, **overrides: Any) -> types.ModuleType:
    """A module holding what ``source`` holds, with ``overrides`` in place of some
    names (named ``name``, or as ``source``): the globals a ``copy_with_globals``
    copy sees as, say, ``torch.nn``."""
    copy = types.ModuleType(name or source.__name__)
    copy.__dict__.update(vars(source))
    copy.__dict__.update(overrides)
    return copy


def call_with(
    variable: contextvars.ContextVar, value: Any, function: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``function(*args, **kwargs)`` with ``variable`` set to ``value`` while it runs."""
    token = variable.set(value)
    try:
        return function(*args, **kwargs)
    finally:
        variable.reset(token)


def with_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with one argument replaced where the caller put it, so the
    wrapped function sees the same call shape (and raises the same errors)."""
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}


def overrides_engaged(args: tuple, kwargs: dict) -> bool:
    """Whether torch's override protocol takes part in this call: an argument
    whose type defines ``__torch_function__`` (``CausalBias``, a NestedTensor, a
    user's subclass), or an active ``TorchFunctionMode`` (``torch.device(...)``,
    export's tracing mode). A patched torch entry point then calls the original
    untouched, so every handler sees exactly the call it sees without
    attnpatch; when a handler calls back with plain tensors (or with its mode
    popped), that call comes through the patched entry point and gets the fix.
    DTensor, FakeTensor and Parameter do not take part (their
    ``__torch_function__`` is disabled): they go through the fix itself.

    Never while torch.compile or export traces: their tracing modes are not the
    caller's, and the fix must be traced into the graph."""
    return torch._C._has_torch_function(args + tuple(kwargs.values()) if kwargs else args) and (
        not torch.compiler.is_compiling()
    )


def dispatch_overrides(public: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Hand a call that engages the override protocol to it, as PyTorch's own
    code does, with ``func`` = ``public``: the patched name (for a builtin whose
    C++ binding would hand handlers an unpatched object we cannot replace, so
    that the handler's call back still comes through attnpatch)."""
    relevant = args + tuple(kwargs.values()) if kwargs else args
    return torch.overrides.handle_torch_function(public, relevant, *args, **kwargs)


def subclass_arguments(args: tuple, kwargs: dict) -> bool:
    """``overrides_engaged`` without the modes, for functions that are not a unit
    of torch's dispatch (transformers' attention functions): an active mode sees
    each torch call inside them anyway, the fix's included (that is how an
    export records it), but a subclass argument must see only the calls it sees
    without attnpatch."""
    values = args + tuple(kwargs.values()) if kwargs else args
    return any(
        type(value) is not torch.Tensor and getattr(type(value), "__torch_function__", _DISABLED) is not _DISABLED
        for value in values
        if isinstance(value, torch.Tensor)
    )


class _TargetsPackage(types.ModuleType):
    """This package is also ``attnpatch.targets()``, the public function: importing
    a submodule binds the package to the parent's attribute of the same name,
    over the function, so the package answers the call itself."""

    def __call__(self) -> list[str]:
        from attnpatch._patching import TARGETS

        return sorted(TARGETS)


sys.modules[__name__].__class__ = _TargetsPackage


# torch last: when transformers is imported first, this package is imported
# before torch, and torch's own import then installs the torch targets, which
# import the names above from this (still initialising) module.
import torch  # noqa: E402

_DISABLED = torch._C._disabled_torch_function_impl
