"""One module per patch target. Each defines ``POINTS`` (what it wraps) and says
which library versions it knows. Which module owns which target: see
``attnpatch._patching.TARGETS``."""

from __future__ import annotations

from typing import Any

MISSING: Any = object()


def get_arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """The argument a call passed at ``index`` or as ``name``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def with_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with one argument replaced where the caller put it, so the
    wrapped function sees the same call shape (and raises the same errors)."""
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}
