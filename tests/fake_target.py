"""A throwaway attnpatch target over a throwaway module, for tests of the
plumbing that real targets cannot exercise (e.g. a point missing from the
installed version)."""

from __future__ import annotations

import contextlib
import sys
import types
import uuid
from collections.abc import Iterator

from attnpatch import _patching
from attnpatch._patching import PatchPoint


@contextlib.contextmanager
def fake_target(*, missing: bool) -> Iterator[tuple[str, types.ModuleType]]:
    """Register a target named ``fake_<id>`` that wraps ``library.function`` of a new
    module ``library``; with ``missing`` its point names an attribute the module
    lacks, as a target does for a library version without that function. Yields
    (target name, library module); unregisters everything afterwards."""
    tag = uuid.uuid4().hex[:8]
    name, library_name, implementation_name = f"fake_{tag}", f"fake_library_{tag}", f"fake_target_{tag}"
    library = types.ModuleType(library_name)
    library.function = lambda x: x + 1
    implementation = types.ModuleType(implementation_name)
    attribute = f"gone_in_this_version_{tag}" if missing else "function"
    implementation.POINTS = [
        PatchPoint(library_name, attribute, lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs) * 10)
    ]
    sys.modules[library_name], sys.modules[implementation_name] = library, implementation
    _patching.register_target(name, library_name, implementation_name)
    try:
        yield name, library
    finally:
        _patching.set_switch(frozenset())
        with _patching._lock:
            for point in _patching._points.pop(name, ()):
                point.remove()
            _patching._installed.discard(name)
            del _patching.TARGETS[name]
        del sys.modules[library_name], sys.modules[implementation_name]
