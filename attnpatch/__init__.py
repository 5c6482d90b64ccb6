"""attnpatch: no NaN from fully masked attention rows, no garbage from right-padded generation.

    import attnpatch
    attnpatch.apply()              # process-wide, idempotent; attnpatch.remove() undoes it
    with attnpatch.patched(): ...  # scoped, nestable, thread-safe; also a decorator

or, with no code change, ``ATTNPATCH=1 python train.py``. The semantics are in
the README ("The contract"). Importing this package imports neither torch nor
transformers; each target is installed when the library it patches is imported.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from attnpatch import _patching
from attnpatch._patching import AttnPatchWarning, status

__version__ = "0.1.0"
__all__ = ["apply", "remove", "patched", "status", "targets", "AttnPatchWarning", "__version__"]

F = TypeVar("F", bound=Callable[..., Any])


def targets() -> list[str]:
    """Names of every known target (``ATTNPATCH=sdpa,mha`` picks among these)."""
    return sorted(_patching.TARGETS)


def apply(targets: str | Iterable[str] | None = None, **options: bool) -> None:
    """Turn attnpatch on for the whole process.

    ``targets`` picks targets by name (default: all); options switch single
    targets on or off by name, e.g. ``apply(hf_tokenizer=False)``. Calling it
    again replaces the selection; calling it twice with the same arguments is the
    same as once.
    """
    _patching.set_switch(_patching.resolve_targets(targets, **options))


def remove() -> None:
    """Turn the process-wide switch off. Targets held by open ``patched()`` scopes
    stay installed until those close; the rest are restored to the exact original
    objects."""
    _patching.set_switch(frozenset())


class patched:
    """Scoped activation: a context manager, a decorator, and ``start()``/``stop()``.

    Scopes nest and are counted across threads: a target stays installed while
    the switch or any open scope holds it. Exiting restores on exceptions too.
    """

    def __init__(self, targets: str | Iterable[str] | None = None, **options: bool) -> None:
        self._targets = _patching.resolve_targets(targets, **options)
        self._local = threading.local()  # per-thread stack depth of this object

    def start(self) -> patched:
        _patching.acquire(self._targets)
        self._local.depth = getattr(self._local, "depth", 0) + 1
        return self

    def stop(self) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            raise RuntimeError("attnpatch.patched.stop() called without a matching start()")
        self._local.depth = depth - 1
        _patching.release(self._targets)

    def __enter__(self) -> patched:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self:
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
