"""Compare with what the same torch does without attnpatch, where torch itself
cannot run a case on some release (e.g. fullgraph compiles that older torch
releases cannot trace)."""

import re

import pytest
import torch

import attnpatch


def compiled_under_patch(compile_and_run, targets=None):
    """``compile_and_run()`` (it compiles with ``fullgraph=True`` and calls the
    result) with attnpatch on (``targets``: those only), and what it returns.

    Where that raises, it runs again with attnpatch off: if this torch cannot
    compile the case on its own either, the test skips and says so (there is
    nothing to compare with); if it can, the failure is attnpatch's and is
    raised."""
    torch._dynamo.reset()
    try:
        with attnpatch.patched(targets):
            return compile_and_run()
    except Exception as patched_error:
        torch._dynamo.reset()
        try:
            compile_and_run()
        except Exception as unpatched_error:  # noqa: BLE001 - any failure of torch's own
            pytest.skip(
                f"torch {torch.__version__} cannot compile this without attnpatch either ({_describe(unpatched_error)})"
            )
        raise patched_error
    finally:
        torch._dynamo.reset()


def unpatched_or_skip(run, what):
    """``run()`` with attnpatch off (the baseline a test compares with); where
    this torch cannot run it at all, the test skips and says so."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - any failure of the library's own
        pytest.skip(f"torch {torch.__version__} cannot run {what} without attnpatch either ({_describe(error)})")


def _describe(error):
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [""]
    # A wrapper's first line can be a mere heading ("backend='inductor' raised:"):
    # the cause is on the next one.
    first_line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    # Object addresses differ run to run; without them one cause reads the same
    # in every test that meets it (the versions table counts skips by reason).
    first_line = re.sub(r" at 0x[0-9a-fA-F]+", "", first_line)
    return f"{type(error).__name__}: {first_line[:200]}"
