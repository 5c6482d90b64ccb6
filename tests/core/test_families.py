"""PointFamily: one patch for every module whose name matches a pattern, found on import."""

from __future__ import annotations

import importlib
import inspect
import sys
import types
import uuid
import warnings

import pytest

import attnpatch
from attnpatch import _patching
from attnpatch._patching import PlainFunctionPoint, PointFamily, Skip

MODULES = {
    "mod_a": "def f(x):\n    return x + 1\n",
    "mod_b": "def f(x):\n    return x + 2\n",
    "mod_c": "def g(x):\n    return x\n",  # nothing to patch: not listed at all
    "mod_d": "def f(x):\n    'another shape'\n    return x\n",  # skipped quietly, with the reason
}


def times_ten(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs) * 10


def make(module_name):
    point = PlainFunctionPoint(module_name, "f", optional=True)

    def prepare(original):
        if original.__doc__:
            raise Skip(f"{point.qualname} has another shape")
        return times_ten

    point.prepare = prepare
    return point


@pytest.fixture
def family_target(tmp_path):
    """A target ``family_<id>`` patching ``f`` in every ``pkg_<id>.mod_*``, a package on disk."""
    tag = uuid.uuid4().hex[:8]
    package, name, implementation_name = f"pkg_{tag}", f"family_{tag}", f"family_target_{tag}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    for module, source in MODULES.items():
        (tmp_path / package / f"{module}.py").write_text(source)
    family = PointFamily(f"{package}.mod_*", "f", make)
    implementation = types.ModuleType(implementation_name)
    implementation.POINTS, implementation.FAMILIES = [], [family]
    sys.modules[implementation_name] = implementation
    sys.path.insert(0, str(tmp_path))
    _patching.register_target(name, package, implementation_name)
    importlib.import_module(package)
    try:
        yield name, package, family
    finally:
        _patching.set_switch(frozenset())
        with _patching._lock:
            for point in _patching._points.pop(name, ()):
                point.remove()
            _patching._families.pop(name, None)
            _patching._installed.discard(name)
            del _patching.TARGETS[name]
            if family in _patching._watcher.families:
                _patching._watcher.families.remove(family)
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[module]
        del sys.modules[implementation_name]


def test_patched_before_and_after_import_and_restored_exactly(family_target):
    name, package, family = family_target
    mod_a = importlib.import_module(f"{package}.mod_a")  # imported before apply()
    original_a = mod_a.f
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipping a module of another shape is quiet
        attnpatch.apply([name])
        assert mod_a.f(1) == 20
        mod_b = importlib.import_module(f"{package}.mod_b")  # imported after: patched on import
        original_b = mod_b.f.__wrapped__
        assert mod_b.f(1) == 30
        mod_c = importlib.import_module(f"{package}.mod_c")
        mod_d = importlib.import_module(f"{package}.mod_d")
    assert mod_d.f(1) == 1

    report = attnpatch.status()[name]
    assert report["families"] == [{"family": f"f of {package}.mod_*", "found": 3, "installed": 2, "skipped": 1}]
    found = {p["target"]: (p["state"], p["note"]) for p in report["points"]}
    assert found[f"{package}.mod_d.f"] == ("skipped", f"{package}.mod_d.f has another shape")
    assert f"{package}.mod_c.f" not in found

    # The modules keep their real loader: source and reloads work as without attnpatch.
    assert type(mod_b.__loader__).__name__ == "SourceFileLoader" and mod_b.__spec__.loader is mod_b.__loader__
    assert "return x + 2" in inspect.getsource(original_b)

    attnpatch.remove()
    assert mod_a.f is original_a and mod_b.f is original_b and mod_c.g(1) == 1
    mod_e = _new_module(package, "mod_e")  # imported while off: untouched until the next apply()
    assert mod_e.f(1) == 1
    attnpatch.apply([name])
    assert mod_a.f(1) == 20 and mod_e.f(1) == 10


def _new_module(package, module):
    path = sys.modules[package].__path__[0]
    with open(f"{path}/{module}.py", "w") as source:
        source.write("def f(x):\n    return x\n")
    importlib.invalidate_caches()
    return importlib.import_module(f"{package}.{module}")


def test_apply_imports_nothing(family_target):
    name, package, _ = family_target
    attnpatch.apply([name])
    assert not [m for m in sys.modules if m.startswith(package + ".")]


def test_cycles_put_back_one_replacement_and_never_a_displaced_one(family_target):
    """Each apply/remove cycle puts the same replacement function back, built once
    (a scope per request or per test stays cheap with hundreds of model files
    imported), so a reference kept from one scope works in the next. One that
    another library displaced is never put back: it passes through for good,
    even where the point is installed again over the very same original."""
    name, package, _ = family_target
    mod_a = importlib.import_module(f"{package}.mod_a")
    original = mod_a.f
    with attnpatch.patched([name]):
        first = mod_a.f
        assert first(1) == 20
    assert first(1) == 2  # off: passes through
    with attnpatch.patched([name]):
        assert mod_a.f is first and first(1) == 20
        mod_a.f = original  # another patcher puts back what it found before us
    assert attnpatch.status()[name]["points"][0]["state"] == "displaced"
    with attnpatch.patched([name]):
        assert mod_a.f is not first and mod_a.f(1) == 20
        assert first(1) == 2, "the displaced copy stays off"
    assert mod_a.f is original


@pytest.mark.parametrize("how", ["another library's function", "reload"])
def test_an_original_changed_while_off_is_the_one_wrapped_next(family_target, how):
    """While attnpatch is off, between two scopes, the function changes: another
    library puts its own there, or the module is reloaded with new code. The next
    scope wraps the new function (a replacement kept from the old one would run
    the old code and bypass the new function), and removal puts the new one back."""
    name, package, _ = family_target
    mod_a = importlib.import_module(f"{package}.mod_a")
    old = mod_a.f
    with attnpatch.patched([name]):
        first = mod_a.f
        assert first(1) == 20
    assert mod_a.f is old
    if how == "reload":
        with open(mod_a.__file__, "w") as source:
            source.write("def f(x):\n    return x + 1000\n")  # another size: no stale bytecode
        importlib.invalidate_caches()
        importlib.reload(mod_a)
    else:
        mod_a.f = lambda x: old(x) + 3
    new = mod_a.f
    assert new is not old and new(1) != old(1)
    with attnpatch.patched([name]):
        assert mod_a.f is not first and mod_a.f is not new
        assert mod_a.f(1) == new(1) * 10
    assert mod_a.f is new
