"""Issue 5.2: many threads entering and leaving patched() while calling the
patched ops; apply()/remove() racing with calls; the original objects are back
afterwards; 10,000 apply/remove cycles leak nothing."""

from __future__ import annotations

import gc
import sys
import threading
import tracemalloc

import pytest
import torch
import torch.nn as nn

import attnpatch

from ._common import assert_restored, causal, left_pad, originals, same

THREADS = 8
ROUNDS = 30


def _setup():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    kpm = left_pad([1, 4])
    mask = causal()
    fully_masked = torch.zeros(2, 4, dtype=torch.bool)
    fully_masked[0, :3] = True  # pad queries of row 0 see only pad keys
    return mha, x, kpm, mask, fully_masked


def _call(mha, x, kpm, mask, fast: bool):
    mha.train(not fast)
    with torch.no_grad() if fast else torch.enable_grad():
        out, w = mha(x, x, x, key_padding_mask=kpm, attn_mask=mask)
    return out.detach(), w.detach()


def _expected(mha, x, kpm, mask, fast):
    """(unpatched, patched) results, computed single-threaded."""
    unpatched = _call(mha, x, kpm, mask, fast)
    with attnpatch.patched():
        patched = _call(mha, x, kpm, mask, fast)
    return unpatched, patched


def _run_threads(target, n=THREADS):
    errors = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("fast", [False, True], ids=["python-path", "fast-path"])
def test_threads_in_nested_scopes_always_see_the_patch(fast):
    saved = originals()
    mha, x, kpm, mask, rows = _setup()
    (bad_out, _), (good_out, good_w) = _expected(mha, x, kpm, mask, fast)
    assert torch.isnan(bad_out).any(), "the bug must show without attnpatch"
    shared_scope = attnpatch.patched()  # one object used by every thread: depth is per thread

    def work(i):
        for r in range(ROUNDS):
            scope = shared_scope if r % 2 else attnpatch.patched("mha") if i % 2 else attnpatch.patched()
            with scope:
                if r % 3 == 0:
                    with attnpatch.patched("sdpa"):
                        out, w = _call(mha, x, kpm, mask, fast)
                else:
                    out, w = _call(mha, x, kpm, mask, fast)
            assert same(out, good_out) and same(w, good_w)

    _run_threads(work)
    assert all(e["holders"] == 0 for e in attnpatch.status().values())
    assert_restored(saved)


@pytest.mark.parametrize("fast", [False, True], ids=["python-path", "fast-path"])
def test_apply_remove_racing_with_calls(fast):
    """A call racing with apply()/remove() gets either the unpatched or the patched
    answer, never an error and never a mixture in its valid rows."""
    saved = originals()
    mha, x, kpm, mask, rows = _setup()
    (bad_out, bad_w), (good_out, good_w) = _expected(mha, x, kpm, mask, fast)
    callers = 2
    finished = []  # one entry per caller that is done (list.append is atomic)
    seen = {"patched": 0, "unpatched": 0}

    def toggling(action):
        r = 0
        while len(finished) < callers:
            action(r)
            r += 1

    def work(i):
        if i == 0:
            toggling(lambda r: attnpatch.apply() if r % 2 == 0 else attnpatch.remove())
            return
        if i == 1:
            toggling(lambda r: attnpatch.patched("mha").start().stop())
            return
        try:
            for _ in range(60):
                out, w = _call(mha, x, kpm, mask, fast)
                if same(out, good_out) and same(w, good_w):
                    seen["patched"] += 1
                else:
                    assert same(out, bad_out) and same(w, bad_w), "a call saw a half-installed patch"
                    seen["unpatched"] += 1
        finally:
            finished.append(i)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave threads finely
    try:
        _run_threads(work, n=2 + callers)
    finally:
        sys.setswitchinterval(interval)
    attnpatch.remove()
    assert seen["patched"] > 0 and seen["unpatched"] > 0, seen
    assert_restored(saved)
    out, _ = _call(mha, x, kpm, mask, fast)
    assert same(out, bad_out), "after remove() the original behaviour is back"


def test_originals_restored_after_exception_in_scopes():
    saved = originals()

    @attnpatch.patched()
    def boom():
        raise KeyError("x")

    def work(i):
        for _ in range(50):
            with pytest.raises(KeyError):
                boom()
            with pytest.raises(ValueError):
                with attnpatch.patched("sdpa"):
                    raise ValueError

    _run_threads(work)
    assert_restored(saved)


def _cycles(n):
    for _ in range(n):
        attnpatch.apply()
        attnpatch.remove()
        with attnpatch.patched():
            with attnpatch.patched("sdpa,mha"):
                pass


def test_ten_thousand_cycles_leak_nothing():
    saved = originals()
    _cycles(200)  # warm up caches and one-off allocations
    gc.collect()
    objects_before = len(gc.get_objects())
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        _cycles(10_000)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    objects_after = len(gc.get_objects())
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    grown = sum(d.size_diff for d in after.filter_traces(filters).compare_to(before.filter_traces(filters), "filename"))
    # A leak of one small object per cycle would be >= 10,000 objects / >= 300 KB.
    # The margin below that absorbs one-off objects (lazy caches of whatever ran
    # earlier in the same process), which are not per-cycle growth.
    assert objects_after - objects_before < 2000, objects_after - objects_before
    assert grown < 64 * 1024, grown
    assert_restored(saved)
