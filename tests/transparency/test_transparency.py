"""attnpatch is invisible outside fully masked rows: generic machinery of torch and
Python (random streams, global state, profilers and saved-tensor hooks,
introspection, pickle / copy / torch.save / spawn, checkpointing, forward-mode
AD, tracing, export) behaves with attnpatch as without it.

Each group of cases in probe.py runs in a fresh interpreter twice: without
attnpatch and with it (``ATTNPATCH=1`` at start-up, as a cluster sets it, or a
``patched()`` scope in the cases that need one), and the two observations must
be equal case by case. So a crash, an added error, a moved random stream or a
changed pickle is a failing test, not a dead test run. Observations named
``fix_*`` are what the fix changes; they are checked apart: the bug without
attnpatch, the contract's answer with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("probe.py")
# Groups that cannot crash share one process per run; "trace" and "onnx" run
# apart (torch.jit.trace under attnpatch once died with SIGSEGV).
GROUPS = {"state": "env", "autograd": "scope", "trace": "scope", "onnx": "scope", "hf": "scope"}


def run_probe(group: str, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    if mode == "env":
        env["ATTNPATCH"] = "1"
    result = subprocess.run(
        [sys.executable, str(PROBE), group, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=PROBE.parent,
    )
    assert result.returncode == 0, f"probe {group} ({mode}) died, exit {result.returncode}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def without_fix(observed):
    """``observed`` less the ``fix_*`` entries, at any depth."""
    if isinstance(observed, dict):
        return {k: without_fix(v) for k, v in observed.items() if not k.startswith("fix_")}
    return observed


def fix_entries(observed, path=""):
    if isinstance(observed, dict):
        for key, value in observed.items():
            yield from ([(f"{path}{key}", value)] if key.startswith("fix_") else fix_entries(value, f"{path}{key}."))


@pytest.fixture(scope="module")
def observed():
    """Each group's observations, without and with attnpatch (run once per module)."""
    cache = {}

    def get(group: str) -> tuple[dict, dict]:
        if group not in cache:
            cache[group] = run_probe(group, "off"), run_probe(group, GROUPS[group])
        return cache[group]

    return get


def _needs(group: str) -> None:
    if group == "hf":
        pytest.importorskip("transformers")
    if group == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")


@pytest.mark.parametrize("group", list(GROUPS))
def test_generic_machinery_sees_no_difference(group, observed):
    _needs(group)
    without, with_attnpatch = observed(group)
    assert with_attnpatch.keys() == without.keys()
    differences = {
        name: {"without": without_fix(without[name]), "with": without_fix(with_attnpatch[name])}
        for name in without
        if without_fix(without[name]) != without_fix(with_attnpatch[name])
    }
    assert not differences, json.dumps(differences, indent=1, sort_keys=True)


def test_checkpoint_recomputation_gets_the_fix_of_its_forward(observed):
    """A forward inside ``patched()``, backward after it: the bug without
    attnpatch (non-finite gradients), finite gradients with it."""
    without, with_attnpatch = observed("autograd")
    fixes = dict(fix_entries(with_attnpatch["checkpoint_recomputes_as_the_forward_ran"]))
    assert fixes and all(fixes.values()), fixes
    bugs = dict(fix_entries(without["checkpoint_recomputes_as_the_forward_ran"]))
    assert not bugs["mha_reentrant_True.fix_grad_finite"] and not bugs["mha_reentrant_False.fix_grad_finite"]


def test_traced_and_exported_graphs_carry_the_fix(observed):
    _needs("onnx")
    without, with_attnpatch = observed("trace")
    for name in ("sdpa", "mha_training", "mha_fast_path", "encoder_fast_path"):
        assert with_attnpatch["jit_trace_of_each_target"][name]["fix_masked_finite"], name
    assert not without["jit_trace_of_each_target"]["mha_training"]["fix_masked_finite"]  # NaN
    # The TorchScript-based ONNX exporter, run in ONNX Runtime: MHA's fully masked
    # rows are NaN without attnpatch; with it they are out_proj(0), which is 0
    # (its bias starts at 0), as SDPA's rows are.
    without, with_attnpatch = (run["torchscript_onnx_export"] for run in observed("onnx"))
    assert with_attnpatch["mha"]["fix_masked_rows"] == with_attnpatch["sdpa"]["fix_masked_rows"]
    assert without["mha"]["fix_masked_rows"] != with_attnpatch["mha"]["fix_masked_rows"]


def test_traced_and_exported_llama_carries_the_fix(observed):
    """A tiny left-padded Llama through jit.trace and the TorchScript-based ONNX
    exporter: pad rows as the fixed eager model's with attnpatch (eager
    attention: not without it), valid rows as eager either way."""
    _needs("onnx")
    _needs("hf")
    without, with_attnpatch = (run["torchscript_onnx_export_of_a_left_padded_llama"] for run in observed("onnx"))
    for attn in ("eager", "sdpa"):
        assert with_attnpatch[attn] == {
            "traced_valid_close": True,
            "fix_onnx_valid_close": True,
            "fix_pads_as_fixed_eager": [True, True],
        }, attn
    assert without["eager"]["fix_pads_as_fixed_eager"] == [False, False]


def test_hf_gradient_checkpointing_gets_the_fix(observed):
    """transformers' gradient checkpointing, forward in a scope and backward
    after it: the recomputation gets the fix its forward had (else the pad rows
    it recomputes differ from the forward's, and so do the gradients)."""
    _needs("hf")
    _, with_attnpatch = observed("hf")
    for attn, seen in with_attnpatch["gradient_checkpointing_training_step"].items():
        assert seen == {"same_with_checkpointing": True, "fix_finite": True}, attn
