"""Issue 5.4: other patchers. A wrapt wrapper on top of ours, a library that
replaces the attribute after us with a plain function, and attnpatch imported
twice under different names: nothing crashes, remove() leaves the others'
patches working, and status() says what it found."""

from __future__ import annotations

import importlib
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import wrapt

import attnpatch

from ._common import assert_restored, causal, left_pad, originals, same

KPM = left_pad([1, 4])
MASK = causal()


def _mha_call(fast=False):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).train(not fast)
    x = torch.randn(2, 4, 8)
    with torch.no_grad() if fast else torch.enable_grad():
        return mha(x, x, x, key_padding_mask=KPM, attn_mask=MASK)[0].detach()


def _points(target):
    return {p["target"]: p for p in attnpatch.status()[target]["points"]}


POINTS = [
    (F, "scaled_dot_product_attention", "sdpa"),
    (F, "multi_head_attention_forward", "mha"),
    (torch, "_native_multi_head_attention", "mha"),
]


@pytest.mark.parametrize("module,name,target", POINTS, ids=[p[1] for p in POINTS])
def test_wrapt_wrapper_on_top_of_ours(module, name, target):
    saved = originals()
    bug = _mha_call(fast=name == "_native_multi_head_attention")
    calls = []

    def theirs(wrapped, instance, args, kwargs):
        calls.append(name)
        return wrapped(*args, **kwargs)

    attnpatch.apply()
    handle = wrapt.wrap_object(module, name, wrapt.FunctionWrapper, (theirs,))
    try:
        fast = name == "_native_multi_head_attention"
        if name != "scaled_dot_product_attention":
            assert torch.isfinite(_mha_call(fast)).all()  # both active
            assert calls
        attnpatch.remove()  # splices ours out from under theirs
        assert getattr(module, name) is handle
        assert handle.__wrapped__ is saved[f"{'F' if module is F else 'torch'}.{name}"]
        qualname = f"{module.__name__}.{name}"
        assert _points(target)[qualname]["state"] == "off"
        calls.clear()
        out = _mha_call(fast)
        if name != "scaled_dot_product_attention":
            assert calls, "their wrapper still runs"
            assert same(out, bug), "and ours is gone"
        q = torch.randn(1, 1, 2, 4)
        assert same(F.scaled_dot_product_attention(q, q, q), saved["F.scaled_dot_product_attention"](q, q, q))
    finally:
        attnpatch.remove()
        wrapt.unwrap_object(module, name, handle, missing_ok=True)
    assert_restored(saved)


@pytest.mark.parametrize("module,name,target", POINTS, ids=[p[1] for p in POINTS])
def test_plain_function_replacing_ours(module, name, target):
    saved = originals()
    fast = name == "_native_multi_head_attention"
    bug = _mha_call(fast)
    attnpatch.apply()
    previous = getattr(module, name)
    calls = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return previous(*args, **kwargs)

    setattr(module, name, theirs)
    try:
        good = _mha_call(fast)
        assert torch.isfinite(good).all()
        attnpatch.remove()
        qualname = f"{module.__name__}.{name}"
        assert getattr(module, name) is theirs, "their replacement is left alone"
        assert _points(target)[qualname]["state"] == "displaced"
        assert "another library" in _points(target)[qualname]["note"]
        calls.clear()
        if name != "scaled_dot_product_attention":
            assert same(_mha_call(fast), bug), "ours passes straight through"
            assert calls, "theirs still runs"
        # On again on top of theirs, then off again: still no crash, no recursion,
        # and no stale copy of our patch left active underneath.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", attnpatch.AttnPatchWarning)
            attnpatch.apply()
        if name != "multi_head_attention_forward":
            assert torch.isfinite(_mha_call(fast)).all()
        else:  # the Python path is now another library's function: left alone, and said so
            assert _points(target)[qualname]["state"] == "skipped"
            assert "theirs" in _points(target)[qualname]["note"]
            assert same(_mha_call(fast), bug)
        attnpatch.remove()
        assert getattr(module, name) is theirs
        calls.clear()
        if name != "scaled_dot_product_attention":
            assert same(_mha_call(fast), bug)
            assert calls
    finally:
        attnpatch.remove()
        setattr(module, name, saved[f"{'F' if module is F else 'torch'}.{name}"])
    assert_restored(saved)


@pytest.fixture
def second_attnpatch(tmp_path, monkeypatch):
    """The package copied under another name and imported from another path."""
    source = importlib.util.find_spec("attnpatch").submodule_search_locations[0]
    shutil.copytree(source, tmp_path / "attnpatch_copy")
    for path in (tmp_path / "attnpatch_copy").rglob("*.py"):
        path.write_text(
            path.read_text()
            .replace("attnpatch.", "attnpatch_copy.")
            .replace("from attnpatch import", "from attnpatch_copy import")
            .replace("import attnpatch\n", "import attnpatch_copy\n")
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = importlib.import_module("attnpatch_copy")
    assert copy is not attnpatch and copy._patching is not attnpatch._patching
    yield copy
    copy.remove()
    for mod in [m for m in sys.modules if m == "attnpatch_copy" or m.startswith("attnpatch_copy.")]:
        del sys.modules[mod]


@pytest.mark.parametrize("order", ["ours-first", "copy-first"])
def test_imported_twice_under_different_names(second_attnpatch, order):
    saved = originals()
    bug_slow, bug_fast = _mha_call(), _mha_call(fast=True)
    first, second = (attnpatch, second_attnpatch) if order == "ours-first" else (second_attnpatch, attnpatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnpatch.AttnPatchWarning)
        first.apply()
        second.apply()
    assert torch.isfinite(_mha_call()).all() and torch.isfinite(_mha_call(fast=True)).all()
    for copy in (first, second):
        assert all(p["state"] in ("installed", "skipped") for p in copy.status()["mha"]["points"])
    if "transformers" in sys.modules:
        # Both copies watch imports of model files (a finder each on sys.meta_path,
        # each asking the finders behind it): finding one must end, not recurse.
        import transformers.models.olmo

        name = "transformers.models.olmo.modeling_olmo"
        spec = next(
            filter(
                None,
                (
                    f.find_spec(name, transformers.models.olmo.__path__)
                    for f in sys.meta_path
                    if hasattr(f, "find_spec")
                ),
            ),
            None,
        )
        assert spec is not None and spec.name == name
    first.remove()  # the other's patch stays on top: ours is displaced, theirs works
    assert torch.isfinite(_mha_call(fast=True)).all()
    second.remove()
    assert same(_mha_call(), bug_slow) and same(_mha_call(fast=True), bug_fast)
    # Turning the first off and on again and off keeps everything sound.
    first.apply()
    first.remove()
    assert same(_mha_call(), bug_slow) and same(_mha_call(fast=True), bug_fast)
    # wrapt splices each copy out from under the other: the originals are back.
    assert_restored(saved)
    assert all(p["state"] == "off" for p in second.status()["mha"]["points"] + first.status()["mha"]["points"])
