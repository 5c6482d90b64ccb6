"""Test-by-test comparison of the run without attnpatch (baseline) and with it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

MESSAGE_CHARS = 240


@dataclass(frozen=True)
class Result:
    outcome: str  # passed, failed, error or skipped
    message: str = ""


@dataclass
class Comparison:
    regressions: dict[str, tuple[Result, Result]] = field(default_factory=dict)
    nan_expected: dict[str, tuple[Result, Result]] = field(default_factory=dict)
    stale_nan_entries: list[str] = field(default_factory=list)
    unmatched_nan_entries: list[str] = field(default_factory=list)
    fixed: dict[str, tuple[Result, Result]] = field(default_factory=dict)
    fail_both: dict[str, tuple[Result, Result]] = field(default_factory=dict)


def listed(test_id: str, entries) -> bool:
    """True when an entry (a node id or a node id prefix, as --deselect takes) covers test_id."""
    return any(
        test_id == entry or test_id.startswith(entry + "::") or test_id.startswith(entry + "[") for entry in entries
    )


def compare(baseline: dict[str, Result], patched: dict[str, Result], nan_asserting) -> Comparison:
    """Sort every test by what attnpatch changed. A test missing from the patched run
    counts as not passed there."""
    result = Comparison()
    for test_id in sorted(set(baseline) | set(patched)):
        before = baseline.get(test_id, Result("missing"))
        after = patched.get(test_id, Result("missing"))
        pair = (before, after)
        if listed(test_id, nan_asserting):
            result.nan_expected[test_id] = pair
        elif before.outcome == "passed" and after.outcome != "passed":
            result.regressions[test_id] = pair
        elif before.outcome in ("failed", "error") and after.outcome == "passed":
            result.fixed[test_id] = pair
        elif before.outcome in ("failed", "error") and after.outcome in ("failed", "error"):
            result.fail_both[test_id] = pair
    # An entry whose tests ran and do not differ no longer says anything true about
    # this release: the list must be trimmed. One that matches no test that ran is
    # only reported (a run narrowed with -k, or a test renamed upstream).
    for entry in nan_asserting:
        pairs = [pair for test_id, pair in result.nan_expected.items() if listed(test_id, [entry])]
        if not pairs:
            result.unmatched_nan_entries.append(entry)
        elif not any(before.outcome == "passed" and after.outcome != "passed" for before, after in pairs):
            result.stale_nan_entries.append(entry)
    return result


def node_id(classname: str, name: str) -> str:
    """junit's 'nn.test_multihead_attention.TestX' + name -> 'nn/test_multihead_attention.py::TestX::name'."""
    module, _, cls = classname.rpartition(".")
    return f"{module.replace('.', '/')}.py::{cls}::{name}" if module else f"{cls}::{name}"


def read_junit(path: Path) -> dict[str, Result]:
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                # The start of the message, on one line: enough to tell NaN from a wrong value.
                message = " ".join((child.get("message") or child.text or "").split())[:MESSAGE_CHARS]
                break
        results[node_id(case.get("classname", ""), case.get("name", ""))] = Result(outcome, message)
    return results
