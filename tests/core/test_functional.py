"""attnpatch.functional: the fix as plain functions, with nothing patched.

Each function shows the bug without it (torch's own call: NaN; for SDPA, whose
CPU kernel already gives 0, a NaN-producing stand-in for a GPU kernel), the fix
with it, valid rows bitwise the unpatched call, and every result bitwise the
patched call. attnpatch stays off throughout (the autouse fixture checks it)."""

from __future__ import annotations

import collections
import copy
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import attnpatch
from attnpatch import functional as AF
from attnpatch import masks
from tests.torch_baseline import unpatched_or_skip

from .helpers import causal_drop_mask, has_nan, left_padded_keep_mask, left_padding, naive_sdpa, to_float_mask

B, H, L, D, E = 2, 2, 5, 8, 16
LENGTHS = [3, 5]  # batch element 0 is left-padded by 2
PADS = left_padding(LENGTHS, L)  # (B, L): under causal masking, the fully masked query rows
KEEP = left_padded_keep_mask(LENGTHS, L)
ROWS = KEEP.logical_not().all(-1).expand(B, H, L)  # SDPA's fully masked rows
FIX_REDUCTIONS = ("amax", "amin", "any", "all", "sum")  # how the fix finds fully masked rows


@pytest.fixture(params=["cpu path", "general path"])
def path(request, monkeypatch):
    """CPU's path (values looked at on the host) and the one CUDA and tracing
    take (no value read), forced."""
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", request.param == "general path")
    return request.param


def _qkv(grad=False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=gen).requires_grad_(grad) for _ in range(3)]


def _results(call, tensors):
    """``call()``'s output and, where inputs require grad, their gradients."""
    out = call()
    grads = torch.autograd.grad(out.sum(), tensors) if tensors and out.requires_grad else ()
    return [out.detach(), *grads]


def _assert_bitwise(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.equal(a, b)


def _over(kernel):
    """``AF.scaled_dot_product_attention``'s own wrapper around another kernel: on
    CPU, torch's SDPA kernel already gives fully masked rows 0, so a stand-in
    for the GPU kernels that give NaN shows the bug and the fix."""
    return type(AF.scaled_dot_product_attention)(kernel, AF.scaled_dot_product_attention._self_wrapper)


# --- scaled_dot_product_attention -------------------------------------------


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
def test_sdpa_with_a_nan_kernel(monkeypatch, path, float_mask):
    mask = to_float_mask(KEEP) if float_mask else KEEP
    q, k, v = _qkv(grad=True)
    unpatched = naive_sdpa(q, k, v, attn_mask=mask)
    assert has_nan(unpatched), "the stand-in kernel shows the bug"
    got = _results(lambda: _over(naive_sdpa)(q, k, v, attn_mask=mask), [q, k, v])
    out, q_grad = got[0], got[1]
    assert torch.equal(out[ROWS], torch.zeros_like(out[ROWS]))
    assert torch.equal(out[~ROWS], unpatched.detach()[~ROWS])
    assert not has_nan(*got)
    assert torch.equal(q_grad[ROWS], torch.zeros_like(q_grad[ROWS]))
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)  # where the patch finds it
    with attnpatch.patched("sdpa"):
        patched = _results(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v])
    _assert_bitwise(got, patched)


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
def test_sdpa_with_torchs_kernel_is_the_patched_call(path, float_mask):
    mask = to_float_mask(KEEP) if float_mask else KEEP
    q, k, v = _qkv(grad=True)
    unpatched = _results(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v])
    got = _results(lambda: AF.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v])
    with attnpatch.patched("sdpa"):
        patched = _results(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v])
    _assert_bitwise(got, patched)
    assert torch.equal(got[0][~ROWS], unpatched[0][~ROWS])
    assert torch.equal(got[0][ROWS], torch.zeros_like(got[0][ROWS]))
    assert not has_nan(*got)


@pytest.mark.parametrize(
    "call",
    [
        lambda f, q, k, v: f(q, k, v[:, :, :3], attn_mask=KEEP),  # keys and values of different lengths
        lambda f, q, k, v: f(q, k),
        lambda f, q, k, v: f(q, k, v, KEEP[..., :2]),
        lambda f, q, k, v: f(q, k, v, KEEP.int()),
    ],
    ids=["value length", "no value", "mask shape", "mask dtype"],
)
def test_sdpa_bad_input_raises_pytorchs_own_error(path, call):
    q, k, v = _qkv()
    with pytest.raises(Exception) as expected:
        call(F.scaled_dot_product_attention, q, k, v)
    with pytest.raises(type(expected.value)) as got:
        call(AF.scaled_dot_product_attention, q, k, v)
    assert str(got.value) == str(expected.value)


# --- nn.MultiheadAttention and multi_head_attention_forward ------------------


def _module_pair(batch_first, mode):
    """An nn.MultiheadAttention and an AF.MultiheadAttention with the same weights."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(E, H, batch_first=batch_first)
    nn.init.normal_(plain.out_proj.bias)  # non-zero, so "row == bias" means something
    fixed = AF.MultiheadAttention(E, H, batch_first=batch_first)
    fixed.load_state_dict(plain.state_dict())
    return plain.train(mode == "train"), fixed.train(mode == "train")


def _mha_results(module, x, mode, need_weights, attn_mask=None):
    """Output, weights and (off the fast path) the gradients of the input and parameters."""
    x = x.detach().requires_grad_(mode != "fast path")
    attn_mask = causal_drop_mask(L) if attn_mask is None else attn_mask
    with torch.set_grad_enabled(mode != "fast path"):
        out, weights = module(x, x, x, key_padding_mask=PADS, attn_mask=attn_mask, need_weights=need_weights)
        if mode == "fast path":
            return [out, weights]
        return [out.detach(), weights, *torch.autograd.grad(out.sum(), [x, *module.parameters()])]


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no weights"])
@pytest.mark.parametrize("mode", ["train", "eval", "fast path"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_is_the_patched_module(batch_first, mode, need_weights):
    plain, fixed = _module_pair(batch_first, mode)
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    unpatched = _mha_results(plain, x, mode, need_weights)
    got = _mha_results(fixed, x, mode, need_weights)
    with attnpatch.patched("mha"):
        patched = _mha_results(plain, x, mode, need_weights)
    _assert_bitwise(got, patched)
    assert not has_nan(*got)
    out, plain_out = (t if batch_first else t.transpose(0, 1) for t in (got[0], unpatched[0]))
    assert torch.equal(out[PADS], plain.out_proj.bias.detach().expand(int(PADS.sum()), E))  # out_proj(0)
    assert torch.equal(out[~PADS], plain_out[~PADS])
    if need_weights:
        assert torch.equal(got[1][PADS], torch.zeros_like(got[1][PADS]))
        assert has_nan(*unpatched), "without attnpatch this is the bug"


def test_multihead_attention_fast_path_with_a_mask_per_head():
    """Rows masked in some heads only: the fast path's kernel cannot zero one
    head, so the patched target recomputes them; so does the module."""
    plain, fixed = _module_pair(True, "fast path")
    per_head = causal_drop_mask(L).repeat(B * H, 1, 1)
    per_head[1, 3, :] = True  # batch 0, head 1: query 3 sees no key
    x = torch.randn(B, L, E)
    got = _mha_results(fixed, x, "fast path", True, per_head)
    with attnpatch.patched("mha"):
        patched = _mha_results(plain, x, "fast path", True, per_head)
    _assert_bitwise(got, patched)
    assert not has_nan(*got)


def test_multi_head_attention_forward_called_directly():
    plain, _ = _module_pair(False, "train")
    x = torch.randn(L, B, E, requires_grad=True)

    def call(forward):
        out, weights = forward(
            x,
            x,
            x,
            E,
            H,
            plain.in_proj_weight,
            plain.in_proj_bias,
            None,
            None,
            False,
            0.0,
            plain.out_proj.weight,
            plain.out_proj.bias,
            key_padding_mask=PADS,
            attn_mask=causal_drop_mask(L),
        )
        return [out.detach(), weights, *torch.autograd.grad(out.sum(), [x, plain.in_proj_weight])]

    unpatched = call(F.multi_head_attention_forward)
    got = call(AF.multi_head_attention_forward)
    with attnpatch.patched("mha"):
        patched = call(F.multi_head_attention_forward)
    assert has_nan(*unpatched)
    _assert_bitwise(got, patched)
    assert not has_nan(*got)


def test_multihead_attention_state_dict_and_copies():
    plain, fixed = _module_pair(True, "train")
    assert isinstance(fixed, nn.MultiheadAttention)
    assert fixed.state_dict().keys() == plain.state_dict().keys()
    clone = pickle.loads(pickle.dumps(copy.deepcopy(fixed)))
    assert type(clone) is AF.MultiheadAttention
    x = torch.randn(B, L, E)
    _assert_bitwise(_mha_results(clone, x, "train", True), _mha_results(fixed, x, "train", True))


# --- softmax -----------------------------------------------------------------


def test_softmax_is_the_opt_in_target(path):
    scores = torch.randn(B, H, L, L).masked_fill(~KEEP, float("-inf")).requires_grad_()
    unpatched = _results(lambda: F.softmax(scores, -1), [scores])
    got = _results(lambda: AF.softmax(scores, -1), [scores])
    with attnpatch.patched("softmax"):
        patched = _results(lambda: F.softmax(scores, -1), [scores])
    assert has_nan(*unpatched), "without attnpatch this is the bug"
    _assert_bitwise(got, patched)
    assert torch.equal(got[0][ROWS], torch.zeros_like(got[0][ROWS]))
    assert torch.equal(got[0][~ROWS], unpatched[0][~ROWS])
    assert torch.equal(got[1][ROWS], torch.zeros_like(got[1][ROWS]))
    # As the target: any other dim is plain softmax (here, NaN where a column is all -inf).
    torch.testing.assert_close(AF.softmax(scores, 2), F.softmax(scores, 2), rtol=0, atol=0, equal_nan=True)


# --- nothing patched, torch's kernels called ----------------------------------


def test_importing_patches_nothing():
    """In a fresh interpreter: torch's functions are the same objects before and
    after the import, no import hook or finder is added, no target is on."""
    code = """
import sys, torch, torch.nn.functional as F, wrapt.importer
def seen():
    return [F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
            F.multi_head_attention_forward, torch._native_multi_head_attention, F.softmax,
            torch.softmax, torch.Tensor.softmax, torch.nn.MultiheadAttention.forward]
before, finders = seen(), list(sys.meta_path)
import attnpatch.functional
assert all(a is b for a, b in zip(before, seen())), "a torch function was replaced"
assert sys.meta_path == finders, "an import finder was added"
assert not getattr(wrapt.importer, "_post_import_hooks", {}), "a post-import hook was registered"
assert all(entry["state"] == "off" for entry in attnpatch.status().values())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _calls_all():
    """Each function once, on tensors and masks made afresh (under a fake mode,
    fake ones; the fix looks at a mask it has seen before only once)."""
    q, k, v = _qkv(grad=True)
    _, fixed = _module_pair(True, "train")
    x = torch.randn(B, L, E, requires_grad=True)
    keep, pads = left_padded_keep_mask(LENGTHS, L), left_padding(LENGTHS, L)
    scores = torch.randn(B, H, L, L).masked_fill(~keep, float("-inf"))
    out = AF.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    mha_out, _ = fixed(x, x, x, key_padding_mask=pads, attn_mask=causal_drop_mask(L), need_weights=False)
    with torch.no_grad():  # the fast path
        fast_out, _ = fixed.eval()(x, x, x, key_padding_mask=pads, need_weights=False)
    return out, mha_out, fast_out, AF.softmax(scores, -1)


def test_while_attnpatch_is_on_the_fix_runs_once(path):
    """The functions call torch's original kernels: with attnpatch on, they do
    the same work (the same aten ops) and give the same results."""
    with _OpLog() as off:
        expected = _calls_all()
    with attnpatch.patched(softmax=True), _OpLog() as on:  # every target
        got = _calls_all()
    assert on.ops == off.ops
    _assert_bitwise(got, expected)


def test_a_torch_function_mode_gets_the_function_and_its_call_back_the_fix():
    """``torch.device(...)`` (and ``set_default_device``) is a TorchFunctionMode.
    A patched target relies on the mode calling back through the patched name;
    the functions here hand the mode themselves, so the call back is fixed."""
    seen = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    plain, fixed = _module_pair(True, "train")
    x = torch.randn(B, L, E)

    def calls():
        # Not the fast path: torch's module leaves it under a mode.
        sdpa_out, mha_out, _, softmax_out = _calls_all()
        return _mha_results(fixed, x, "train", True), [sdpa_out, mha_out, softmax_out]

    outside = calls()
    for mode in (torch.device("cpu"), Recorder()):
        with mode:
            inside = calls()
            assert has_nan(*_mha_results(plain, x, "train", True))  # the bug, under a mode too
        for got, expected in zip(inside, outside):
            _assert_bitwise(got, expected)
            assert not has_nan(*got)
    assert any(func is AF.scaled_dot_product_attention for func in seen)
    assert any(func is AF.multi_head_attention_forward for func in seen)
    assert AF.scaled_dot_product_attention == F.scaled_dot_product_attention  # what a handler compares with


def test_pickles_and_copies_as_itself():
    for function in (AF.scaled_dot_product_attention, AF.multi_head_attention_forward, AF.softmax):
        assert pickle.loads(pickle.dumps(function)) is function
        assert copy.deepcopy(function) is function


# --- tracing: fake tensors, torch.compile, torch.export, torch.func -----------


@pytest.mark.parametrize("where", ["fake", "meta"])
def test_fake_and_meta_tensors_take_the_fix(where):
    """Under FakeTensorMode (what compile and export trace with) and on the meta
    device no value exists: a call that finishes took no data-dependent branch;
    the fix's ops show it ran. (torch's module leaves the fast path on meta.)"""
    tensors = FakeTensorMode(allow_non_fake_inputs=True) if where == "fake" else torch.device("meta")
    with tensors, _OpLog() as log:
        got = _calls_all()
    expected = _calls_all()
    assert all(type(t) is FakeTensor if where == "fake" else t.is_meta for t in got)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]
    assert sum(log.ops[op] for op in FIX_REDUCTIONS) >= 3, log.ops  # SDPA's and MHA's masks (both paths)
    assert log.ops["_safe_softmax"] >= 1


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, *args):
    """``fn(*args)`` compiled with ``fullgraph=True``, and the aten ops of the
    graph AOT autograd hands the compiler."""
    from torch._dynamo.backends.common import aot_autograd

    ops = collections.Counter()

    def record(graph_module, example_inputs):
        ops.update(
            str(n.target).split(".")[1]
            for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("aten.")
        )
        return graph_module

    return torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))(*args), ops


@torch.no_grad()
@pytest.mark.parametrize("case", ["sdpa", "mha train", "mha fast path", "softmax"])
def test_compile_fullgraph(fresh_dynamo, case):
    q, _, _ = _qkv()
    _, fixed = _module_pair(True, "train" if case == "mha train" else "fast path")
    scores = torch.randn(B, H, L, L).masked_fill(~KEEP, float("-inf"))
    fn, arg = {
        "sdpa": (lambda q: AF.scaled_dot_product_attention(q, q, q, attn_mask=KEEP), q),
        "mha train": (
            lambda x: fixed(x, x, x, key_padding_mask=PADS, attn_mask=causal_drop_mask(L))[0],
            torch.randn(B, L, E),
        ),
        "mha fast path": (lambda x: fixed(x, x, x, key_padding_mask=PADS, need_weights=False)[0], torch.randn(B, L, E)),
        "softmax": (lambda s: AF.softmax(s, -1), scores),
    }[case]
    with torch.enable_grad() if case == "mha train" else torch.no_grad():
        expected = fn(arg)
        got, ops = _compiled(fn, arg)
    assert not has_nan(got)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # torch's CPU SDPA kernel gives 0 by itself: the graph shows the fix is there.
    assert sum(ops[op] for op in (*FIX_REDUCTIONS, "_safe_softmax")) >= 1, ops


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _module_pair(True, "eval")[1].eval()

    def forward(self, q, x):
        return AF.scaled_dot_product_attention(q, q, q, attn_mask=KEEP), self.attn(
            x, x, x, key_padding_mask=PADS, attn_mask=causal_drop_mask(L)
        )[0]


def test_torch_export():
    model, inputs = _Model(), (_qkv()[0], torch.randn(B, L, E))
    expected = model(*inputs)
    program = unpatched_or_skip(lambda: torch.export.export(model, inputs), "torch.export of this case")
    got = program.module()(*inputs)
    assert not has_nan(*got)
    _assert_bitwise(got, expected)
    ops = collections.Counter(str(n.target).split(".")[1] for n in program.graph.nodes if n.op == "call_function")
    # One per attention call: SDPA's finds its fully masked rows; MHA's weights need the safe softmax.
    assert sum(ops[op] for op in FIX_REDUCTIONS) == 1 and ops["_safe_softmax"] == 1, ops


def test_vmap_per_sample(path):
    """torch.func transforms wrap tensors in ones that cannot be read on the host."""
    q, k, v = _qkv()
    batched = torch.func.vmap(lambda q, k, v, m: AF.scaled_dot_product_attention(q, k, v, attn_mask=m))(q, k, v, KEEP)
    one_by_one = torch.stack([AF.scaled_dot_product_attention(q[i], k[i], v[i], attn_mask=KEEP[i]) for i in range(B)])
    assert torch.equal(batched, one_by_one)
    assert torch.equal(batched[ROWS], torch.zeros_like(batched[ROWS]))
