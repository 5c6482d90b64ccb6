"""The pure mask logic, checked against a float64 reference with hypothesis."""

import math

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


@given(any_mask(), st.booleans())
def test_fully_masked_rows_matches_definition(mask, drop):
    assert torch.equal(masks.fully_masked_rows(mask, drop=drop), _python_rows(mask, drop))


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


def test_may_inspect_values_only_for_plain_cpu_tensors():
    assert masks.may_inspect_values(torch.ones(2))
    assert not masks.may_inspect_values(torch.ones(2, device="meta"))


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
def test_patched_sdpa_matches_float64_reference(batch, heads, q_len, k_len, dim, dtype, mask_rank, as_float, nan_kernel, seed):
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
