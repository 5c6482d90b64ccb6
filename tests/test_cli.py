"""The ``attnpatch`` command: ``run`` and ``status``."""

import json
import os
import subprocess
import sys

import pytest

import attnpatch
from attnpatch import AttnPatchWarning, cli
from tests.fake_target import fake_target

# Run in the child: does it see ATTNPATCH, and is attnpatch active there?
CHILD = """
import os, attnpatch, torch
mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
x = torch.randn(2, 4, 8)
pad = torch.tensor([[True, True, False, False], [False] * 4])
out, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=torch.ones(4, 4, dtype=torch.bool).triu(1))
status = attnpatch.status()
print(os.environ["ATTNPATCH"], status["sdpa"]["state"], status["mha"]["state"], bool(out.isnan().any()))
"""


def attnpatch_command(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "attnpatch", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_run_activates_attnpatch_in_the_child():
    result = attnpatch_command("run", "--", sys.executable, "-c", CHILD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "installed", "installed", "False"]


def test_run_targets_picks_targets():
    result = attnpatch_command("run", "--targets", "sdpa", "--", sys.executable, "-c", CHILD)
    assert result.returncode == 0, result.stderr
    # mha off: the NaN of nn.MultiheadAttention(need_weights=True) is back.
    assert result.stdout.split() == ["sdpa", "installed", "off", "True"]


def test_run_passes_the_exit_code_through():
    result = attnpatch_command("run", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert result.returncode == 3


def test_run_without_command_or_with_unknown_command():
    assert attnpatch_command("run").returncode == 2
    assert attnpatch_command("run", "--", "no-such-command-attnpatch").returncode == 127


def test_status_json_is_attnpatch_status(capsys):
    with attnpatch.patched(["sdpa", "mha"]):
        assert cli.main(["status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == attnpatch.status()


def test_status_in_a_process_started_with_ATTNPATCH():
    result = attnpatch_command("status", "--json", env_extra={"ATTNPATCH": "sdpa"})
    report = json.loads(result.stdout)
    assert report["sdpa"]["state"] == "deferred until torch is imported"
    assert report["mha"]["state"] == "off"


def test_status_apply_explains_each_state():
    result = attnpatch_command("status", "--apply")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "installed  torch.nn.functional.scaled_dot_product_attention" in out
    assert "installed: patched now" in out


def test_status_says_why_a_target_is_skipped(capsys):
    with fake_target(missing=True) as (name, _), pytest.warns(AttnPatchWarning):
        attnpatch.apply([name])
        cli.main(["status"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("skipped "))
    assert "not found in this version" in line
    assert "skipped: cannot be patched here" in out


def test_status_apply_leaves_the_opt_in_softmax_target_off():
    result = attnpatch_command("status", "--apply")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["softmax"])
    assert line.split()[1] == "off" and "opt-in" in line
    report = json.loads(attnpatch_command("status", "--json", env_extra={"ATTNPATCH": "1,softmax"}).stdout)
    assert report["softmax"]["state"] == "deferred until torch is imported" and report["softmax"]["default"] is False
