"""apply/remove/patched/status: idempotent, counted, restoring the very objects."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
import wrapt

import attnpatch

ORIGINALS = {
    (F, "scaled_dot_product_attention"): F.scaled_dot_product_attention,
    (F, "multi_head_attention_forward"): F.multi_head_attention_forward,
    (torch, "_native_multi_head_attention"): torch._native_multi_head_attention,
    (torch, "_transformer_encoder_layer_fwd"): torch._transformer_encoder_layer_fwd,
}


def _all_original():
    return all(getattr(owner, name) is original for (owner, name), original in ORIGINALS.items())


def _all_wrapped():
    return all(isinstance(getattr(owner, name), wrapt.FunctionWrapper) for (owner, name) in ORIGINALS)


def test_apply_is_idempotent_and_remove_restores_identity():
    attnpatch.apply()
    first = F.scaled_dot_product_attention
    attnpatch.apply()
    assert F.scaled_dot_product_attention is first
    assert _all_wrapped()
    attnpatch.remove()
    assert _all_original()


def test_targets_pick_and_options_toggle():
    attnpatch.apply("sdpa")
    assert isinstance(F.scaled_dot_product_attention, wrapt.FunctionWrapper)
    assert F.multi_head_attention_forward is ORIGINALS[(F, "multi_head_attention_forward")]
    attnpatch.apply(sdpa=False)  # everything but sdpa
    assert F.scaled_dot_product_attention is ORIGINALS[(F, "scaled_dot_product_attention")]
    assert isinstance(F.multi_head_attention_forward, wrapt.FunctionWrapper)
    with pytest.raises(ValueError, match="unknown attnpatch target"):
        attnpatch.apply("nope")
    with pytest.raises(TypeError, match="unknown attnpatch option"):
        attnpatch.apply(nope=True)


def test_targets_lists_the_targets_once_their_modules_are_imported():
    """Importing a target module binds the package ``attnpatch.targets`` over the
    function ``attnpatch.targets()``; the call must still answer."""
    import attnpatch.targets.torch_sdpa

    assert attnpatch.targets() == sorted(attnpatch._patching.TARGETS)
    assert "sdpa" in attnpatch.targets() and "softmax" in attnpatch.targets()


def test_patched_scopes_nest_and_count():
    with attnpatch.patched():
        with attnpatch.patched("sdpa"):
            assert _all_wrapped()
        assert _all_wrapped()
    assert _all_original()


def test_switch_and_scope_hold_independently():
    with attnpatch.patched():
        attnpatch.apply()
        attnpatch.remove()
        assert _all_wrapped(), "an open scope keeps the patches"
    assert _all_original()
    attnpatch.apply()
    with attnpatch.patched():
        pass
    assert _all_wrapped(), "closing a scope leaves the switch's patches"


def test_restores_on_exception_and_works_as_decorator():
    with pytest.raises(KeyError):
        with attnpatch.patched():
            raise KeyError("boom")
    assert _all_original()

    @attnpatch.patched("sdpa")
    def inside():
        return isinstance(F.scaled_dot_product_attention, wrapt.FunctionWrapper)

    assert inside() and _all_original()


def test_start_stop():
    p = attnpatch.patched()
    p.start()
    assert _all_wrapped()
    p.stop()
    assert _all_original()
    with pytest.raises(RuntimeError):
        p.stop()


def test_status_reports_points():
    assert attnpatch.status()["sdpa"]["state"] == "off"
    attnpatch.apply("sdpa")
    report = attnpatch.status()["sdpa"]
    assert report["state"] == "installed"
    assert report["points"] == [
        {"target": "torch.nn.functional.scaled_dot_product_attention", "state": "installed", "note": ""}
    ]


def test_wrapt_wrapper_on_top_survives_removal():
    attnpatch.apply("sdpa")
    seen = []

    def spy(wrapped, instance, args, kwargs):
        seen.append(1)
        return wrapped(*args, **kwargs)

    theirs = wrapt.wrap_function_wrapper(F, "scaled_dot_product_attention", spy)
    try:
        attnpatch.remove()
        assert F.scaled_dot_product_attention is theirs
        assert theirs.__wrapped__ is ORIGINALS[(F, "scaled_dot_product_attention")], "we are spliced out"
        q = torch.randn(1, 1, 2, 4)
        F.scaled_dot_product_attention(q, q, q)
        assert seen == [1]
    finally:
        wrapt.unwrap_object(F, "scaled_dot_product_attention", theirs)
    assert _all_original()


def test_plain_replacement_on_top_is_left_alone_and_ours_passes_through():
    attnpatch.apply("sdpa")
    ours = F.scaled_dot_product_attention
    calls = []

    def replacement(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    F.scaled_dot_product_attention = replacement
    try:
        attnpatch.remove()
        assert F.scaled_dot_product_attention is replacement
        assert attnpatch.status()["sdpa"]["points"][0]["state"] == "displaced"
        q = torch.randn(1, 1, 2, 4)
        mask = torch.tensor([[False, False], [True, True]])
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        assert calls == [1] and torch.equal(
            out, ORIGINALS[(F, "scaled_dot_product_attention")](q, q, q, attn_mask=mask)
        )
    finally:
        F.scaled_dot_product_attention = ORIGINALS[(F, "scaled_dot_product_attention")]


def test_threads_entering_and_leaving_scopes():
    errors = []
    barrier = threading.Barrier(8)
    q = torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[False] * 3, [True, False, False], [True, True, True]])

    def worker():
        try:
            barrier.wait()
            for _ in range(50):
                with attnpatch.patched():
                    out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                    assert _all_wrapped()
                    assert not out.isnan().any()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _all_original()


def _python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_apply_before_torch_import_defers_then_installs():
    out = _python(
        """
        import sys, attnpatch
        attnpatch.apply()
        print("torch" in sys.modules, attnpatch.status()["sdpa"]["state"])
        import torch, wrapt
        print(attnpatch.status()["sdpa"]["state"], isinstance(torch.nn.functional.scaled_dot_product_attention, wrapt.FunctionWrapper))
        """
    )
    assert out.splitlines() == ["False deferred until torch is imported", "installed True"]


def test_environment_variable_activates_without_code():
    code = """
        import torch, wrapt
        print(isinstance(torch.nn.functional.scaled_dot_product_attention, wrapt.FunctionWrapper),
              isinstance(torch.nn.functional.multi_head_attention_forward, wrapt.FunctionWrapper))
        """
    assert _python(code, ATTNPATCH="1") == "True True"
    assert _python(code, ATTNPATCH="sdpa") == "True False"
    assert _python(code) == "False False"
    assert _python(code, ATTNPATCH="0") == "False False"


def test_unset_variable_imports_nothing():
    out = _python("import sys; print(sorted(m for m in sys.modules if m.startswith(('attnpatch', 'torch', 'wrapt'))))")
    assert out == "[]"


def test_attnpatch_run_sets_the_variable_for_the_child():
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    code = "import os, torch, attnpatch; print(os.environ['ATTNPATCH'], attnpatch.status()['mha']['state'])"
    out = subprocess.run(
        [sys.executable, "-m", "attnpatch", "run", "--", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "1 installed"
