"""Run a call the way it runs on a GPU, without one, and list what it reads on the host.

``FakeTensorMode`` makes tensors with ``device="cuda"`` on a CPU-only build:
they carry shape, dtype and device but no data, so every operation whose result
depends on a value (``.item()``, ``bool(t)``, ``nonzero()``, a boolean index)
raises there. ``HostReads`` lists those operations as they are dispatched, also
the ones whose exception something catches (attnpatch's wrappers fall back to
the unpatched call on any error), and works on real tensors too.

attnpatch decides "may I read values here?" with ``masks.may_inspect_values``:
never for a fake tensor, never for CUDA, and never with
``masks.FORCE_GENERAL_PATH``. So a fake tensor takes the CUDA branch whatever
its device, and a real CPU tensor takes it with the flag set.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnpatch
from attnpatch import masks
from tests.torch_baseline import unpatched_or_skip

aten = torch.ops.aten
ATTNPATCH_DIR = str(Path(attnpatch.__file__).parent)

# Named for the record; the tags below already cover most of them.
VALUE_READS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
DATA_DEPENDENT_TAGS = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}


def reads_values(func: Any, args: tuple) -> bool:
    """Whether an aten op needs the values of its inputs on the host: a scalar
    read, an output whose shape depends on values, or a boolean index (a hidden
    ``nonzero()``)."""
    if func in VALUE_READS or DATA_DEPENDENT_TAGS.intersection(getattr(func, "tags", ())):
        return True
    if func in INDEX_OPS and len(args) > 1:
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None
        )
    return False


class HostReads(TorchDispatchMode):
    """Records every aten op dispatched inside it (``ops``), and separately those
    that read values on the host (``reads``), each with the innermost attnpatch
    source line on the Python stack (None when attnpatch is not on it).
    A higher-order op (flex attention) is recorded as one op, not its insides."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.reads: list[tuple[str, str | None]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[str(func)] += 1
        if reads_values(func, args):
            self.reads.append((str(func), _attnpatch_frame()))
        return func(*args, **(kwargs or {}))

    def read_ops(self) -> collections.Counter[str]:
        return collections.Counter(name for name, _ in self.reads)

    def reads_in_attnpatch(self) -> list[tuple[str, str | None]]:
        return [read for read in self.reads if read[1] is not None]


def _attnpatch_frame() -> str | None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(ATTNPATCH_DIR):
            return f"{Path(frame.filename).relative_to(ATTNPATCH_DIR)}:{frame.lineno} {frame.name}"
    return None


def describe(result: Any) -> list[tuple]:
    """Shape, dtype and device of every tensor in a (nested) result; other leaves as they are."""
    return [(tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else x for x in tree_leaves(result)]


@contextlib.contextmanager
def general_path() -> Iterator[None]:
    """The branch CUDA takes, on real CPU tensors."""
    saved = masks.FORCE_GENERAL_PATH
    masks.FORCE_GENERAL_PATH = True
    try:
        yield
    finally:
        masks.FORCE_GENERAL_PATH = saved


def trace(run: Callable[[], Any], *, patch: str | None) -> tuple[HostReads, list[tuple]]:
    """``run()`` with attnpatch on (``patch``: its targets, "" for all) or off."""
    scope = attnpatch.patched(patch or None) if patch is not None else contextlib.nullcontext()
    with scope, HostReads() as reads:
        result = run()
    return reads, describe(result)


def assert_no_new_host_reads(
    run: Callable[[], Any], patch: str = "", *, fix_runs: bool = True
) -> tuple[HostReads, HostReads]:
    """The check of this test tier: ``run()`` patched adds no host read to the same
    call unpatched, returns results of the same shape, dtype and device, and
    (``fix_runs``) attnpatch's fix did run: the patched call dispatches ops the
    unpatched one does not, which a wrapper that failed and fell back would not."""
    # Where this torch cannot run the call unpatched (e.g. a CUDA build without a
    # driver initialises CUDA for some ops on fake CUDA tensors), there is nothing
    # to compare with: skip saying why. A call that fails only patched fails here.
    where = "on fake tensors" if detect_fake_mode() is not None else "on real tensors"
    unpatched, unpatched_result = unpatched_or_skip(lambda: trace(run, patch=None), f"this {where}")
    patched, patched_result = trace(run, patch=patch)
    added = patched.read_ops() - unpatched.read_ops()
    assert not added, f"attnpatch added host reads: {patched.reads_in_attnpatch() or patched.reads}"
    assert patched_result == unpatched_result
    if fix_runs:
        assert patched.ops - unpatched.ops, "attnpatch's fix did not run (did its wrapper fall back?)"
    return unpatched, patched


def fake_mode() -> FakeTensorMode:
    return FakeTensorMode()


# The two ways a case takes attnpatch's CUDA branch without a GPU. Some torch
# releases cannot run a call on fake CUDA tensors at all (a CUDA build without a
# driver initialises CUDA for some of their ops), so each case runs both ways:
# where the fake one skips, the real one still covers the target.
BRANCHES = ["fake-cuda", "cpu-general-path"]


@contextlib.contextmanager
def cuda_branch(branch: str) -> Iterator[str]:
    """``branch`` of ``BRANCHES``: fake tensors (make them on "cuda"), or real CPU
    tensors with the general path forced, where every aten op that runs is the
    real one. Yields the device to make the case's tensors on."""
    with fake_mode() if branch == "fake-cuda" else general_path():
        yield "cuda" if branch == "fake-cuda" else "cpu"


def fake_like(module: torch.nn.Module, device: str, *, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Fake tensors on ``device`` for every parameter (requiring grad if asked) and
    buffer of ``module`` (call inside a FakeTensorMode), for ``torch.func.functional_call``."""

    def fake(t: torch.Tensor, grad: bool) -> torch.Tensor:
        if not t.is_floating_point():
            return torch.zeros(t.shape, device=device, dtype=t.dtype)
        return torch.randn(t.shape, device=device, dtype=t.dtype).requires_grad_(grad)

    return {
        **{name: fake(t, requires_grad) for name, t in module.named_parameters()},
        **{name: fake(t, False) for name, t in module.named_buffers()},
    }
