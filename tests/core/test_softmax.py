"""Target softmax (opt-in): F.softmax, torch.softmax and Tensor.softmax over the last dim."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch
from attnpatch import masks as attnpatch_masks  # imported here: the fixture below needs it even when run alone

NEG_INF = float("-inf")
ORIGINALS = (F.softmax, torch.softmax, torch.Tensor.softmax)

# Every way to call a last-dim softmax the target covers.
CALLS = {
    "F.softmax": lambda x, **kw: F.softmax(x, -1, **kw),
    "F.softmax dim=": lambda x, **kw: F.softmax(x, dim=x.dim() - 1, **kw),
    "torch.softmax": lambda x, **kw: torch.softmax(x, -1, **kw),
    "Tensor.softmax": lambda x, **kw: x.softmax(-1, **kw),
    "Tensor.softmax via class": lambda x, **kw: torch.Tensor.softmax(x, dim=-1, **kw),
    "nn.Softmax": lambda x, **kw: nn.Softmax(-1)(x) if not kw else F.softmax(x, -1, **kw),
}


def scores_with_masked_rows(dtype=torch.float32):
    """(2, 3, 5) scores; rows [0, 1] and [1, 2] are all -inf, row [0, 2] partly."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=dtype)
    x[0, 1] = NEG_INF
    x[1, 2] = NEG_INF
    x[0, 2, :3] = NEG_INF
    return x


def masked(x):
    return (x == NEG_INF).all(-1)


@pytest.fixture(params=["cpu path", "general path"])
def path(request, monkeypatch):
    """Both ways an eager softmax is fixed: CPU's (NaN rows looked at on the host)
    and the one CUDA takes (no value read), forced here."""
    monkeypatch.setattr(attnpatch_masks, "FORCE_GENERAL_PATH", request.param == "general path")
    return request.param


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_masked_rows_give_0_other_rows_bitwise(path, call, dtype):
    x = scores_with_masked_rows(dtype)
    plain = CALLS[call](x)
    assert plain[masked(x)].isnan().all()  # the bug, without attnpatch
    with attnpatch.patched("softmax"):
        out = CALLS[call](x)
    rows = masked(x)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.equal(out[~rows], plain[~rows])
    assert out.dtype == plain.dtype


@pytest.mark.parametrize("call", ["F.softmax", "torch.softmax", "Tensor.softmax"])
def test_dtype_argument(path, call):
    x = scores_with_masked_rows(torch.float16)
    plain = CALLS[call](x, dtype=torch.float32)
    with attnpatch.patched("softmax"):
        out = CALLS[call](x, dtype=torch.float32)
    rows = masked(x)
    assert out.dtype == torch.float32
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.equal(out[~rows], plain[~rows])


def test_nan_and_inf_input_stay_nan(path):
    x = torch.randn(3, 4)
    x[0, 1] = float("nan")
    x[1] = float("inf")
    x[2, :3] = NEG_INF
    x[2, 3] = float("nan")
    plain = x.softmax(-1)
    with attnpatch.patched("softmax"):
        out = x.softmax(-1)
    assert torch.equal(out.isnan(), plain.isnan()) and out.isnan().any(-1).all()


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
def test_row_with_plus_and_minus_inf_stays_nan(path, grad):
    """A row holding +inf and -inf is not fully masked: softmax gives NaN there
    (inf - inf), and so must the target, whichever of its entries come first.
    Every other row, the fully masked one included, is fixed as usual."""
    inf = float("inf")
    x = torch.tensor(
        [
            [inf, NEG_INF, NEG_INF, NEG_INF],
            [NEG_INF, NEG_INF, inf, NEG_INF],
            [NEG_INF, inf, 0.5, -2.0],
            [NEG_INF, NEG_INF, NEG_INF, NEG_INF],
            [0.1, NEG_INF, 2.0, -1.0],
        ]
    ).requires_grad_(grad)
    plain = x.softmax(-1)
    assert plain[:4].isnan().all() and not plain[4].isnan().any()  # what torch gives
    with attnpatch.patched("softmax"):
        out = x.softmax(-1)
    assert out[:3].isnan().all()
    assert torch.equal(out[3], torch.zeros(4))
    assert torch.equal(out[4], plain[4])


def test_other_dims_and_no_masked_rows_pass_through():
    x = scores_with_masked_rows()
    with attnpatch.patched("softmax"):
        assert F.softmax(x, 0).isnan().any()  # not the last dim: PyTorch's own softmax
        y = torch.randn(4, 7)
        assert torch.equal(y.softmax(-1), torch.softmax(y, -1)) and torch.equal(F.softmax(y, 1), y.softmax(1))
        assert torch.equal(torch.softmax(torch.tensor(2.0), 0), torch.tensor(1.0))  # 0-dim
        assert torch.softmax(torch.empty(0, 3), -1).shape == (0, 3)


@pytest.mark.parametrize("call", ["F.softmax", "torch.softmax", "Tensor.softmax"])
def test_gradients(path, call):
    x = scores_with_masked_rows().requires_grad_(True)
    weights = torch.randn(2, 3, 5)
    rows = masked(x.detach())
    CALLS[call](x).mul(weights)[~rows].sum().backward()  # a loss that ignores masked rows
    plain_grad, x.grad = x.grad, None
    assert plain_grad.isnan().any()  # 0 * NaN: the bug reaches the gradient

    with attnpatch.patched("softmax"):
        out = CALLS[call](x)
        out.mul(weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[rows], torch.zeros_like(x.grad[rows]))
    assert torch.equal(x.grad[~rows], plain_grad[~rows])


def test_hand_written_attention():
    """The code this target is for: masked_fill(-inf) + softmax, left-padded causal."""
    torch.manual_seed(0)
    q = k = v = torch.randn(2, 2, 5, 8, requires_grad=True)
    pad = torch.tensor([[True, True, False, False, False], [False] * 5])
    drop = torch.ones(5, 5, dtype=torch.bool).triu(1) | pad[:, None, None, :]

    def attention():
        scores = (q @ k.transpose(-2, -1)) / 8**0.5
        return scores.masked_fill(drop, NEG_INF).softmax(-1) @ v

    plain = attention()
    assert plain[0, :, :2].isnan().all()
    with attnpatch.patched("softmax"):
        out = attention()
        out[:, :, 2:].sum().backward()
    assert torch.equal(out[0, :, :2], torch.zeros(2, 2, 8))
    assert torch.equal(out[:, :, 2:], plain[:, :, 2:])
    assert torch.isfinite(q.grad).all()


def test_bad_input_raises_pytorchs_own_error():
    cases = [
        lambda: torch.softmax(torch.randn(2, 3), 5),
        lambda: torch.softmax(torch.arange(6).view(2, 3), -1),
        lambda: F.softmax(torch.randn(2, 3), -1, dtype="float"),
        lambda: torch.randn(2, 3).softmax(-1, torch.int64),
        lambda: torch.softmax(torch.randn(2, 3), -1, bogus=1),
    ]
    for case in cases:
        with pytest.raises(Exception) as plain:
            case()
        with attnpatch.patched("softmax"), pytest.raises(Exception) as patched:
            case()
        assert type(patched.value) is type(plain.value)
        assert str(patched.value) == str(plain.value)


def test_off_by_default_and_restored_exactly():
    attnpatch.apply()
    assert attnpatch.status()["softmax"]["state"] == "off"
    assert (F.softmax, torch.softmax, torch.Tensor.softmax) == ORIGINALS
    attnpatch.apply(softmax=True)
    assert attnpatch.status()["softmax"]["state"] == "installed"
    assert attnpatch.status()["sdpa"]["state"] == "installed"  # the defaults and softmax
    assert F.softmax is not ORIGINALS[0] and "softmax" in torch.Tensor.__dict__
    attnpatch.remove()
    assert F.softmax is ORIGINALS[0] and torch.softmax is ORIGINALS[1]
    assert "softmax" not in torch.Tensor.__dict__  # the inherited method again, no copy left behind
    assert torch.Tensor.softmax is ORIGINALS[2]


@pytest.mark.parametrize("value,on", [("1", False), ("all", False), ("softmax", True), ("1,softmax", True)])
def test_environment_variable(value, on):
    env = dict(os.environ, ATTNPATCH=value)
    code = "import attnpatch, torch; s = attnpatch.status(); print(s['softmax']['state'], s['sdpa']['state'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    softmax, sdpa = result.stdout.split()
    assert softmax == ("installed" if on else "off")
    assert sdpa == ("off" if value == "softmax" else "installed")


def test_tensor_subclass_with_torch_function_gets_its_own_dispatch():
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = scores_with_masked_rows().as_subclass(Logged)
    plain = x.softmax(-1)
    seen.clear()
    with attnpatch.patched("softmax"):
        out = x.softmax(-1)
    # PyTorch's own dispatch, exactly as without attnpatch: the handler sees softmax itself.
    assert [f.__name__ for f in seen] == ["softmax"]
    assert torch.equal(out.isnan(), plain.isnan())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("call", ["F.softmax", "torch.softmax", "Tensor.softmax"])
def test_compile_fullgraph(call, backend):
    torch._dynamo.reset()
    x = scores_with_masked_rows().requires_grad_(True)
    rows = masked(x.detach())

    def fn(t):
        return CALLS[call](t * 2)

    with attnpatch.patched("softmax"):
        eager = fn(x)
        out = torch.compile(fn, fullgraph=True, backend=backend)(x)
        out.sum().backward()
    torch._dynamo.reset()
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    torch.testing.assert_close(out, eager)
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[rows], torch.zeros_like(x.grad[rows]))
