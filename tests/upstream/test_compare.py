"""The comparison behind `make upstream` finds what attnpatch breaks, and nothing else."""

from tests.upstream.compare import Result, compare, read_junit

PASS, FAIL, SKIP = Result("passed"), Result("failed", "AssertionError: Tensor-likes are not close!"), Result("skipped")
NAN = {"m.py::TestMHA::test_nan_reference": "compares with a NaN reference"}


def test_pass_to_fail_is_a_regression_unless_listed_as_nan_asserting():
    baseline = {"m.py::TestSDPA::test_a": PASS, "m.py::TestMHA::test_nan_reference": PASS}
    patched = {"m.py::TestSDPA::test_a": FAIL, "m.py::TestMHA::test_nan_reference": FAIL}

    result = compare(baseline, patched, NAN)

    assert list(result.regressions) == ["m.py::TestSDPA::test_a"]
    assert list(result.nan_expected) == ["m.py::TestMHA::test_nan_reference"]
    assert result.stale_nan_entries == []


def test_a_test_missing_from_the_patched_run_is_a_regression():
    result = compare({"m.py::T::test_gone": PASS}, {}, {})

    assert result.regressions["m.py::T::test_gone"][1].outcome == "missing"


def test_other_transitions_are_sorted_not_flagged():
    baseline = {
        "m.py::T::test_fixed": FAIL,
        "m.py::T::test_broken": FAIL,
        "m.py::T::test_skip": SKIP,
        "m.py::T::test_same": PASS,
    }
    patched = {
        "m.py::T::test_fixed": PASS,
        "m.py::T::test_broken": FAIL,
        "m.py::T::test_skip": SKIP,
        "m.py::T::test_same": PASS,
    }

    result = compare(baseline, patched, {})

    assert not result.regressions
    assert list(result.fixed) == ["m.py::T::test_fixed"]
    assert list(result.fail_both) == ["m.py::T::test_broken"]


def test_a_nan_entry_whose_tests_do_not_differ_is_stale():
    same = {"m.py::TestMHA::test_nan_reference": PASS}

    assert compare(same, same, NAN).stale_nan_entries == list(NAN)


def test_a_nan_entry_that_matches_no_test_is_reported_not_stale():
    result = compare({"m.py::T::test_a": PASS}, {"m.py::T::test_a": PASS}, NAN)

    assert result.unmatched_nan_entries == list(NAN) and result.stale_nan_entries == []


def test_an_entry_covers_the_tests_under_it_only():
    entry = {"m.py::TestMHA": "whole class"}
    baseline = {"m.py::TestMHA::test_x": PASS, "m.py::TestMHAFast::test_x": PASS}
    patched = {"m.py::TestMHA::test_x": FAIL, "m.py::TestMHAFast::test_x": FAIL}

    result = compare(baseline, patched, entry)

    assert list(result.nan_expected) == ["m.py::TestMHA::test_x"]
    assert list(result.regressions) == ["m.py::TestMHAFast::test_x"]


def test_junit_cases_become_node_ids_with_outcome_and_message_on_one_line(tmp_path):
    xml = tmp_path / "run.xml"
    xml.write_text(
        "<testsuites><testsuite>"
        '<testcase classname="test_transformers.TestAttnBiasCPU" name="test_ok_cpu"/>'
        '<testcase classname="nn.test_multihead_attention.TestMHA" name="test_bad">'
        '<failure message="AssertionError: not close&#10;second line">trace</failure></testcase>'
        '<testcase classname="test_transformers.TestSDPACPU" name="test_gpu"><skipped message="no CUDA"/></testcase>'
        '<testcase classname="test_transformers.TestSDPACPU" name="test_setup"><error message="boom"/></testcase>'
        "</testsuite></testsuites>"
    )

    assert read_junit(xml) == {
        "test_transformers.py::TestAttnBiasCPU::test_ok_cpu": PASS,
        "nn/test_multihead_attention.py::TestMHA::test_bad": Result("failed", "AssertionError: not close second line"),
        "test_transformers.py::TestSDPACPU::test_gpu": Result("skipped", "no CUDA"),
        "test_transformers.py::TestSDPACPU::test_setup": Result("error", "boom"),
    }
