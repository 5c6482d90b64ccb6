"""Target hf_attention, eager: every model file's ``eager_attention_forward``, found on import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import attnpatch
from tests.hf.helpers import left_padded, tiny_causal_lm
from tests.torch_baseline import compiled_under_patch

# Beyond Llama and Qwen2 (tests/hf/test_attention.py). Mixture-of-experts models
# are left out on purpose: their expert kernels batch tokens by route, so
# changing pad rows legitimately moves valid rows by rounding.
ARCHITECTURES = [
    "mistral",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
    "gpt_neox",
    "starcoder2",
    "cohere",
    "phi",
    "stablelm",
    "gpt2",
    "opt",
]
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]  # left-padded to width 6
IDS, MASK = left_padded(PROMPTS)
VALID, PADS = MASK.bool(), ~MASK.bool()


def eager_point(model):
    """The status entry of the eager function of ``model``'s own file, or None."""
    target = f"{type(model).__module__}.eager_attention_forward"
    points = attnpatch.status()["hf_attention"]["points"]
    return next((p for p in points if p["target"] == target), None)


def pad_weight_rows(out):
    """Attention weights of every layer at the pad queries: (layers, pads, heads, keys)."""
    return torch.stack([weights.transpose(1, 2)[PADS] for weights in out.attentions])


@pytest.mark.parametrize("kind", ARCHITECTURES)
@torch.no_grad()
def test_left_padded_eager_forward(kind):
    model = tiny_causal_lm(kind, "eager")
    module = sys.modules[type(model).__module__]
    if not hasattr(module, "eager_attention_forward"):
        pytest.skip(
            f"{module.__name__} in transformers {transformers.__version__}: "
            "no eager_attention_forward (eager attention is inline)"
        )
    plain = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    with attnpatch.patched("hf_attention"):
        # A model file that has the function must have been found and patched:
        # a broken discovery or shape check fails here, it does not skip.
        point = eager_point(model)
        assert point is not None, f"{module.__name__}.eager_attention_forward was not found"
        assert point["state"] == "installed", point
        patched = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    # Without attnpatch: pad queries average over pad keys (finite garbage, not 0).
    garbage = pad_weight_rows(plain)
    assert torch.isfinite(garbage).all() and bool((garbage != 0).any())
    # With it: pad rows 0, valid rows bitwise what transformers computes.
    assert torch.equal(pad_weight_rows(patched), torch.zeros_like(garbage))
    assert torch.equal(patched.logits[VALID], plain.logits[VALID])
    assert torch.isfinite(patched.logits).all()


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_found_on_import_without_importing_model_files_up_front():
    """A fresh interpreter: apply() imports no model file; those imported later are
    patched on import, those imported before on apply(); remove() puts back the
    very function objects."""
    out = run_python("""
        import sys, attnpatch, transformers
        from transformers.models.mistral import modeling_mistral
        before = modeling_mistral.eager_attention_forward
        models = lambda: {m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m}
        loaded = models()
        attnpatch.apply()
        assert models() == loaded, models() - loaded
        assert modeling_mistral.eager_attention_forward is not before  # imported before apply()
        from transformers.models.gpt_neox import modeling_gpt_neox  # imported after
        assert modeling_gpt_neox.eager_attention_forward.__wrapped__.__module__ == modeling_gpt_neox.__name__
        original = modeling_gpt_neox.eager_attention_forward.__wrapped__
        family = attnpatch.status()["hf_attention"]["families"][0]
        attnpatch.remove()
        assert modeling_mistral.eager_attention_forward is before
        assert modeling_gpt_neox.eager_attention_forward is original
        print(family["family"], "|", family["found"], family["installed"])
    """)
    assert out.strip() == "eager_attention_forward of transformers.models.*.modeling_* | 2 2"


def test_other_shapes_are_skipped_quietly_with_the_reason():
    """gpt_oss computes its softmax with attention sinks through ``F.softmax``:
    not the shape the safe copy covers, so it is left alone, without a warning."""
    out = run_python("""
        import warnings, attnpatch
        warnings.simplefilter("error")
        attnpatch.apply()
        from transformers.models.gpt_oss import modeling_gpt_oss
        original = modeling_gpt_oss.eager_attention_forward
        [point] = [p for p in attnpatch.status()["hf_attention"]["points"] if "gpt_oss" in p["target"]]
        assert modeling_gpt_oss.eager_attention_forward is original
        print(point["state"], "|", point["note"])
    """)
    state, note = out.strip().split(" | ")
    assert state == "skipped" and "softmax other than nn.functional.softmax" in note


def test_status_counts_patched_and_skipped_models():
    out = run_python("""
        from attnpatch import cli
        import attnpatch
        attnpatch.apply()
        from transformers.models.mistral import modeling_mistral
        from transformers.models.gpt_oss import modeling_gpt_oss
        cli.main(["status"])
    """)
    assert "eager_attention_forward of transformers.models.*.modeling_*: 2 found on import, 1 patched, 1 skipped" in out
    assert "skipped    transformers.models.gpt_oss.modeling_gpt_oss.eager_attention_forward" in out


@torch.no_grad()
def test_compiled_model_of_a_found_module():
    torch._dynamo.reset()
    model = tiny_causal_lm("gpt_neox", "eager")
    with attnpatch.patched("hf_attention"):
        reference = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    out = compiled_under_patch(
        lambda: torch.compile(model, fullgraph=True, backend="eager")(
            input_ids=IDS, attention_mask=MASK, output_attentions=True
        ),
        "hf_attention",
    )
    torch.testing.assert_close(out.logits, reference.logits)
    assert torch.equal(pad_weight_rows(out), torch.zeros_like(pad_weight_rows(out)))
