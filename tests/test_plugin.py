"""The pytest plugin: off unless asked; --attnpatch / ini for the session; the
attnpatch_scope fixture for one test."""

import torch  # noqa: F401 - see below

import attnpatch

pytest_plugins = ["pytester"]

# torch is imported here, before any inner session runs in this process
# (runpytest): an inner session that holds a target while torch is not imported
# registers wrapt's import hook for torch, and pytester then takes the hook's
# finder off sys.meta_path when that session ends (it restores sys.meta_path), so
# a later inner session importing torch would not install anything. With torch
# imported first, what the tests see no longer depends on which of them ran
# first. (Deferring until torch is imported: test_lifecycle, in a fresh process.)

# Inner test files. Each counts who holds the "sdpa" target: 0 means attnpatch is off.
HOLDERS = """
import attnpatch

def holders():
    return attnpatch.status()["sdpa"]["holders"]
"""


def all_off() -> bool:
    return all(entry["holders"] == 0 for entry in attnpatch.status().values())


def test_plugin_does_nothing_unless_asked(pytester):
    pytester.makepyfile(
        HOLDERS
        + """
import sys

def test_off():
    assert holders() == 0
    assert "torch" not in sys.modules
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "attnpatch: active" not in result.stdout.str()


def test_option_activates_for_the_whole_session(pytester):
    pytester.makepyfile(
        HOLDERS
        + """
import torch

def test_active_and_fixes_the_nan():
    assert holders() == 1
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    pad = torch.tensor([[True, True, False, False], [False] * 4])
    out, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert not out.isnan().any()

def test_remove_in_a_test_does_not_end_the_session_activation():
    attnpatch.remove()
    assert holders() == 1
"""
    )
    result = pytester.runpytest("--attnpatch", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["attnpatch: active for this session"])
    assert all_off()  # the session's scope was closed at the end


def test_ini_option_activates(pytester):
    pytester.makeini("[pytest]\nattnpatch = true\n")
    pytester.makepyfile(HOLDERS + "\ndef test_active():\n    assert holders() == 1\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert all_off()


def test_fixture_activates_for_one_test_only(pytester):
    pytester.makepyfile(
        HOLDERS
        + """
def test_with_fixture(attnpatch_scope):
    assert holders() == 1

def test_after_it():
    assert holders() == 0
"""
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    assert all_off()
