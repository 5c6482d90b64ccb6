"""The pure mask logic, checked against a float64 reference with hypothesis."""

import contextlib
import math
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnpatch import masks

from .helpers import reference_attention

NEG_INF = float("-inf")


def _python_rows(mask: torch.Tensor, drop: bool) -> torch.Tensor:
    flat = mask.reshape(-1, mask.shape[-1]).tolist()
    if mask.dtype == torch.bool:
        out = [all(row) if drop else not any(row) for row in flat]
    else:
        out = [all(x == NEG_INF for x in row) for row in flat]
    return torch.tensor(out, dtype=torch.bool).reshape(mask.shape[:-1])


mask_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4)
float_entries = st.sampled_from([NEG_INF, 0.0, -1e9, -3.5, 2.0, math.nan, float("inf")])


@st.composite
def any_mask(draw):
    shape = draw(mask_shapes)
    n = math.prod(shape)
    if draw(st.booleans()):
        # bias towards all-masked rows so the interesting case is common
        values = draw(st.lists(st.booleans() if draw(st.booleans()) else st.just(False), min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.bool).reshape(shape)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    values = draw(st.lists(float_entries if draw(st.booleans()) else st.just(NEG_INF), min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


@given(any_mask(), st.booleans(), st.booleans())
def test_fully_masked_rows_matches_definition(mask, drop, traced):
    """Both formulations: eager plain tensors' and the one torch.compile, export and
    tensor subclasses get (``traced``)."""
    with _as_if_traced(traced):
        assert torch.equal(masks.fully_masked_rows(mask, drop=drop), _python_rows(mask, drop))


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("drop", [False, True], ids=["keep", "drop"])
def test_a_row_with_no_key_at_all_is_fully_masked(drop, traced):
    with _as_if_traced(traced):
        assert masks.fully_masked_rows(torch.ones(2, 3, 0, dtype=torch.bool), drop=drop).all()


@pytest.mark.parametrize("drop", [False, True], ids=["keep", "drop"])
@pytest.mark.parametrize("keepdim", [False, True])
def test_large_bool_mask_read_as_words_matches_definition(drop, keepdim):
    """A bool mask of 64 Ki elements or more is read four keys at a time (as int32
    words): a word of all True or all False is not yet a row of them."""
    mask = torch.zeros(16, 4096, dtype=torch.bool)
    mask[1] = True
    mask[2, :4] = True  # one word all True, the rest False
    mask[3, 5] = True  # one True key
    mask[4] = True
    mask[4, -1] = False  # all True but one key
    mask[5] = True
    mask[5, 4:8] = False  # all True but one word
    assert masks._packs_into_int32(mask)  # the formulation this test is about
    expected = _python_rows(mask, drop)
    rows = masks.fully_masked_rows(mask, drop=drop, keepdim=keepdim)
    assert torch.equal(rows, expected.unsqueeze(-1) if keepdim else expected)


@pytest.mark.parametrize("drop", [False, True], ids=["keep", "drop"])
def test_long_rows_are_counted_without_overflow(drop):
    """Where keys are counted (torch.compile, export, tensor subclasses), a row of
    65536 keys, as many as int16 wraps around at, is still told apart."""
    mask = torch.full((3, 1 << 16), drop)  # row 0: every key masked
    mask[1, 7] = not drop  # one key admitted
    mask[2] = not drop  # every key admitted
    with _as_if_traced(True):
        assert masks.fully_masked_rows(mask, drop=drop).tolist() == [True, False, False]


def test_a_mask_changed_in_place_is_looked_at_again(monkeypatch):
    """The fully masked rows of the last mask are remembered (every layer of a
    forward gets the same mask), but a mask changed in place between two calls
    has its rows found again: a row that admits keys now is not cleared."""
    import torch.nn.functional as F

    import attnpatch

    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", True)  # CPU's kernels fix these rows themselves
    q, k, v = torch.randn(3, 1, 2, 3, 4).unbind()
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0] = False
    with attnpatch.patched("sdpa"):
        before = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        mask[0] = True  # in place: row 0 admits every key now
        after = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(before[..., 0, :], torch.zeros(1, 2, 4))
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert plain[..., 0, :].ne(0).any()
    assert torch.equal(after, plain)


def _as_if_traced(traced: bool):
    """Make the mask functions take the formulations they use for tensors that are
    not plain eager tensors (compile, export, DTensor, torch.func)."""
    if not traced:
        return contextlib.nullcontext()
    return mock.patch.object(masks, "is_plain_in_eager", lambda tensor: False)


@given(any_mask(), st.booleans())
def test_admit_rows_opens_only_flagged_rows(mask, drop):
    before = mask.clone()
    rows = masks.fully_masked_rows(mask, drop=drop)
    safe = masks.admit_rows(mask, rows, drop=drop)
    assert torch.equal(mask, before) or mask.isnan().any(), "caller's mask must not be mutated"
    assert not masks.fully_masked_rows(safe, drop=drop).any()
    kept = ~rows
    if mask.dtype == torch.bool:
        assert torch.equal(safe[kept], mask[kept])
    else:
        assert torch.equal(safe[kept].isnan(), mask[kept].isnan())
        finite = ~mask[kept].isnan()
        assert torch.equal(safe[kept][finite], mask[kept][finite])


def test_nan_entry_keeps_row_unmasked():
    mask = torch.tensor([[NEG_INF, math.nan], [NEG_INF, NEG_INF]])
    assert masks.fully_masked_rows(mask).tolist() == [False, True]


def test_clear_rows_zeroes_and_fills():
    out = torch.arange(12.0).reshape(2, 3, 2)
    rows = torch.tensor([[True, False, False], [False, False, True]])
    cleared = masks.clear_rows(out, rows)
    assert cleared[0, 0].tolist() == [0.0, 0.0] and cleared[1, 2].tolist() == [0.0, 0.0]
    assert torch.equal(cleared[~rows], out[~rows])
    filled = masks.clear_rows(out, rows, torch.tensor([7.0, 8.0]))
    assert filled[0, 0].tolist() == [7.0, 8.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("large", [False, True], ids=["masked_fill_", "bitwise"])
def test_clear_result_rows_on_the_general_path_writes_plus_zero_and_no_other_bit(monkeypatch, dtype, keepdim, large):
    """The in-place clear that CUDA takes (forced here), for small outputs and for
    large ones (bitwise): a flagged row becomes +0.0 whatever it held (NaN, -0.0,
    inf), and every bit of every other row stays; rows of another shape or
    another call get their own answer."""
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", True)
    monkeypatch.setattr(masks, "_BITWISE_FROM", 0 if large else 1 << 40)
    special = torch.tensor([math.nan, -0.0, float("inf"), -2.5, NEG_INF, 3.0])
    for flags in ([[True, False, True]], [[False, True, False]], [[False, False, False, True]]):
        rows = torch.tensor(flags)
        out = special.repeat(*rows.shape, 1).to(dtype)
        before = out.clone()
        cleared = masks.clear_result_rows(out, rows.unsqueeze(-1) if keepdim else rows, keepdim=keepdim)
        assert cleared is out
        assert torch.equal(out[rows].view(torch.uint8), torch.zeros_like(out[rows]).view(torch.uint8))
        assert torch.equal(out[~rows].view(torch.uint8), before[~rows].view(torch.uint8))


def test_may_inspect_values_only_for_plain_cpu_tensors():
    assert masks.may_inspect_values(torch.ones(2))
    assert not masks.may_inspect_values(torch.ones(2, device="meta"))


HAS_ATEN_SAFE_SOFTMAX = hasattr(torch.ops.aten, "_safe_softmax")


@pytest.mark.skipif(not HAS_ATEN_SAFE_SOFTMAX, reason="this torch has no aten._safe_softmax to compare with")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dim,out_dtype", [(-1, None), (1, None), (-1, torch.float64)])
@pytest.mark.parametrize("ours", ["composite", "general path"])
def test_safe_softmax_stand_ins_are_aten_safe_softmax(monkeypatch, ours, dtype, dim, out_dtype):
    """The stand-in for a torch without the op, and the eager softmax of the path
    CUDA takes (forced here): the same forward, bitwise, and the same gradient
    (zero for an all -inf row, NaN only where the op has NaN, as in a row that
    holds +inf and -inf)."""
    monkeypatch.setattr(masks, "FORCE_GENERAL_PATH", True)
    stand_in = masks.composite_safe_softmax if ours == "composite" else masks.safe_softmax
    scores = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    scores[0, :, 1] = NEG_INF  # with dim=1: a fully masked column
    scores[0, 2] = NEG_INF  # with dim=-1: a fully masked row
    scores[1, 3, 2] = math.nan
    scores[1, 1, :2] = NEG_INF
    scores[1, 0] = NEG_INF
    scores[1, 0, 3] = float("inf")  # +inf and -inf: not fully masked, NaN as in softmax
    grad = torch.randn(2, 4, 5, dtype=out_dtype or dtype)
    results = []
    for softmax in (torch.ops.aten._safe_softmax.default, stand_in):
        x = scores.clone().requires_grad_()
        out = softmax(x, dim, dtype=out_dtype)
        (x_grad,) = torch.autograd.grad(out, x, grad)
        results.append((out, x_grad))
    (aten_out, aten_grad), (ours_out, ours_grad) = results
    assert torch.equal(ours_out.nan_to_num(7.0), aten_out.nan_to_num(7.0))
    assert torch.equal(ours_grad.nan_to_num(7.0), aten_grad.nan_to_num(7.0))
    assert torch.equal(ours_grad[0, 2], torch.zeros(5, dtype=dtype))


def test_without_aten_safe_softmax_the_composite_runs(tmp_path):
    """A torch without aten._safe_softmax (older than 2.5): the CUDA/compile
    path of safe_softmax takes the composite, with no AttributeError."""
    script = (
        "import torch\n"
        "namespace = type(torch.ops.aten)\n"
        "lookup = namespace.__getattr__\n"
        "def hide(self, name):\n"
        "    if name == '_safe_softmax':\n"
        "        raise AttributeError(name)\n"
        "    return lookup(self, name)\n"
        "namespace.__getattr__ = hide\n"
        "vars(torch.ops.aten).pop('_safe_softmax', None)\n"
        "assert not hasattr(torch.ops.aten, '_safe_softmax')\n"
        "from attnpatch import masks\n"
        "assert masks._traceable_safe_softmax is masks.composite_safe_softmax\n"
        "scores = torch.tensor([[0.5, -1.0], [float('-inf'), float('-inf')]])\n"
        "out = masks.safe_softmax(scores.t(), 0)\n"  # not the last dim: the traceable path
        "assert torch.equal(out.t()[0], torch.softmax(scores[0], 0))\n"
        "assert torch.equal(out.t()[1], torch.zeros(2))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@settings(deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    q_len=st.integers(1, 6),
    k_len=st.integers(1, 6),
    dim=st.sampled_from([4, 8]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    mask_rank=st.sampled_from([2, 3, 4]),
    as_float=st.booleans(),
    nan_kernel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_patched_sdpa_matches_float64_reference(
    batch, heads, q_len, k_len, dim, dtype, mask_rank, as_float, nan_kernel, seed
):
    """Masked rows exactly 0, other rows close to float64, bitwise to unpatched;
    with torch's kernel and with a NaN-producing stand-in underneath."""
    import torch.nn.functional as F

    from .helpers import naive_sdpa

    real_sdpa = F.scaled_dot_product_attention
    if nan_kernel:
        F.scaled_dot_product_attention = naive_sdpa
    try:
        _check_sdpa_example(batch, heads, q_len, k_len, dim, dtype, mask_rank, as_float, seed)
    finally:
        F.scaled_dot_product_attention = real_sdpa


def _check_sdpa_example(batch, heads, q_len, k_len, dim, dtype, mask_rank, as_float, seed):
    import torch.nn.functional as F

    import attnpatch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, k_len, dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads, k_len, dim, generator=gen).to(dtype)
    mask_shape = {2: (q_len, k_len), 3: (heads, q_len, k_len), 4: (batch, 1, q_len, k_len)}[mask_rank]
    keep = torch.rand(mask_shape, generator=gen) < 0.5
    keep[..., 0, :] = False  # at least one fully masked row
    mask = torch.zeros(mask_shape, dtype=dtype).masked_fill(~keep, NEG_INF) if as_float else keep

    unpatched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with attnpatch.patched("sdpa"):
        patched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    rows = ~keep.expand(batch, heads, q_len, k_len).any(-1)
    assert torch.equal(patched[rows], torch.zeros_like(patched[rows]))
    valid = ~rows
    assert torch.equal(patched[valid], unpatched[valid])
    assert not patched.isnan().any()
    expected = reference_attention(q, k, v, keep.expand(batch, heads, q_len, k_len))
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(patched.double(), expected, atol=tol, rtol=tol)
