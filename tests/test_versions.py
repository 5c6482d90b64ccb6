"""The version matrix's results agree with what the project says and asks for:
the README's "Supported versions" tables and benchmarks/results/versions.md are
generated from versions.json, every entry is green, pyproject.toml's floors
are the oldest releases the matrix passed, with no cap on torch, and its Python
classifiers are exactly the Pythons that passed."""

import os
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from benchmarks import versions

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("ATTNPATCH_MATRIX_RECORDING") == "1",
        reason="a matrix entry is rewriting the table these tests check (they run in CI and `make test`)",
    ),
    # They read files only: one leg of `make test` runs them.
    pytest.mark.any_version,
]

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def data():
    return versions.load()


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((versions.ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def requirements(project):
    return {Requirement(text).name: Requirement(text) for text in project["dependencies"]}


def test_every_entry_run_is_green(data):
    broken = {name: r["broken"] for name, r in data["entries"].items() if not r["green"]}
    assert not broken


def test_the_oldest_entry_was_run_and_every_entry_with_its_pins(data):
    """The floors rest on the oldest entry (the README's grid shows any entry
    not run yet as such; `make test` runs the newest in every CI run)."""
    names = {versions.entry_name(*entry): entry for entry in versions.matrix_entries()}
    assert versions.entry_name(*versions.matrix_entries()[0]) in data["entries"]
    for name, result in data["entries"].items():
        assert name in names, f"{name}: not an entry of the matrix (stale?)"
        python = names[name][0]
        assert Version(result["versions"]["python"]).release[:2] == Version(python).release, (
            f"{name}: ran on Python {result['versions']['python']}"
        )
        for package, release in versions.pins(*names[name]).items():
            assert result["versions"][package] == release, f"{name}: ran {package} {result['versions'][package]}"


def test_readme_and_markdown_are_generated_from_the_json(data):
    readme = versions.README.read_text()
    assert readme == versions.readme_with_table(readme, data), "run: python -m benchmarks.versions render"
    assert versions.RESULTS_MD.read_text() == versions.markdown(data), "run: python -m benchmarks.versions render"


def test_torch_floor_is_the_oldest_release_the_matrix_passed_and_has_no_cap(data, requirements):
    torch_req = requirements["torch"]
    floor = Version(versions.supported_range(data)["torch"])
    assert [spec.operator for spec in torch_req.specifier] == [">="]
    assert Version(next(iter(torch_req.specifier)).version) == Version(f"{floor.major}.{floor.minor}")
    assert Version(next(iter(versions.TORCH))) == Version(f"{floor.major}.{floor.minor}")


def test_wrapt_floor_is_the_oldest_release_the_matrix_passed(data, requirements):
    specs = {spec.operator: Version(spec.version) for spec in requirements["wrapt"].specifier}
    assert specs[">="] == Version(versions.supported_range(data)["wrapt"]) == Version(versions.WRAPT_FLOOR)
    assert specs["<"] == Version("3")  # the next major release may change the wrapper API


def test_python_classifiers_and_floor_are_the_pythons_that_passed(data, project):
    """Every supported Python has a green entry, pyproject's classifiers name
    exactly those, and requires-python is the oldest of them."""
    passed = versions.pythons_passed(data)
    assert passed == list(versions.PYTHONS)
    classifiers = [
        c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")
    ]
    assert classifiers == passed
    assert project["requires-python"] == f">={passed[0]}"


def test_make_test_runs_the_oldest_and_newest_entries():
    makefile = (versions.ROOT / "Makefile").read_text()
    # CI runs `make test`: its rule (prerequisites, such as lint, may come first) and the recipe's first line.
    rule = re.search(r"^test:.*\n\t(.*)$", makefile, re.M)
    assert rule, "no `test:` rule with a recipe in the Makefile"
    legs = rule.group(1).split()
    assert {"test-edge-oldest", "test-edge-newest"} <= set(legs)
    assert "lint" in rule.group(0).splitlines()[0].split()[1:], "make test runs make lint first"
    for leg, entry in (
        ("test-edge-oldest", versions.matrix_entries()[0]),
        ("test-edge-newest", versions.matrix_entries()[-1]),
    ):
        python, torch_minor, transformers_minor = entry
        assert f"\n{leg}: EDGE_PYTHON := {python}\n" in makefile
        assert (
            f"\n{leg}: EDGE_ENTRY := tests(python='{python}', torch='{torch_minor}', transformers='{transformers_minor}')\n"
            in makefile
        )
