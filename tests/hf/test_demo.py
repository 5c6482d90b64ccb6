"""``make demo`` (``python -m attnpatch.demo``) tells both halves of the story."""

import os
import re
import subprocess
import sys


def test_demo_shows_both_bugs_and_their_fix():
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    result = subprocess.run(
        [sys.executable, "-m", "attnpatch.demo"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    # Half 1: NaN without attnpatch, finite and bitwise-equal valid values with it.
    assert out.count("without attnpatch: output NaN in 2 pad") == 3
    assert out.count("values that were finite before are bitwise identical: True") == 3

    # Half 2: the right-padding tokenizer makes the short prompt decode differently
    # in a batch; with attnpatch every row decodes as alone.
    assert "the tokenizer pads on the right" in out
    without = re.findall(r"batched, without attnpatch: +'.*'  \((.*)\)", out)
    with_ = re.findall(r"batched, with attnpatch: +'.*'  \((.*)\)", out)
    assert "DIFFERENT from alone" in without
    assert with_ == ["same as alone"] * len(without) and len(with_) >= 2

    # The tokenizer target on its own.
    assert (
        "the tokenizer target on its own: loaded while attnpatch is on, the tokenizer pads on the left; "
        "batched with it, generate() unpatched decodes every row as alone"
    ) in out
    assert out.rstrip().endswith("ok: attnpatch removed every NaN, and every row decodes as it would alone")
