"""One module per patch target. Each defines ``POINTS`` (what it wraps) and says
which library versions it knows. Which module owns which target: see
``attnpatch._patching.TARGETS``."""

from __future__ import annotations

import types
from typing import Any, Callable


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
        function.__code__, dict(function.__globals__, **overrides), function.__name__,
        function.__defaults__, function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    return copy


def with_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with one argument replaced where the caller put it, so the
    wrapped function sees the same call shape (and raises the same errors)."""
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}
