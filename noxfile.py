"""The version matrix: the whole test suite on every supported torch minor
release, each with transformers 4.57 (the last 4.x) and the newest 5.x.

    nox -s tests                                        # every entry, in sequence
    nox -s "tests(torch='2.15', transformers='5.24')"   # one entry
    nox -l                                              # the entries

(or `make matrix`, `make matrix TORCH=2.15 TRANSFORMERS=5.24`). Each entry
builds its environment with uv from the package index, runs pytest, and stores
pass/fail/skip per test file in benchmarks/results/versions.json and .md (and
the README's table). ATTNPATCH_MATRIX_DROP_ENVS=1 deletes each environment
after its run (about 5 GB each), and uv's cache when it lies in .nox/ (as
`make matrix` puts it; each entry then downloads its torch again, ~3 GB).

The oldest entry also takes the oldest wrapt we support, so that it tests every
floor at once. torch comes from the package index as published there (on Linux, CUDA builds;
they run on a machine without a GPU, and the GPU tests then skip).
"""

import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests"]

# The matrix itself lives beside its results table, where the tests read it too.
sys.path.insert(0, str(Path(__file__).parent))
from benchmarks.versions import entry_name, matrix_entries, pins  # noqa: E402


def entries():
    """The matrix, or the entries that ATTNPATCH_MATRIX_TORCH /
    ATTNPATCH_MATRIX_TRANSFORMERS pick (what `make matrix TORCH=... TRANSFORMERS=...` sets)."""
    only_torch = os.environ.get("ATTNPATCH_MATRIX_TORCH") or None
    only_tf = os.environ.get("ATTNPATCH_MATRIX_TRANSFORMERS") or None
    return [(t, tf) for t, tf in matrix_entries() if only_torch in (None, t) and only_tf in (None, tf)]


def _run_suite(session, entry, *pins):
    # setuptools: torch's inductor needs it, and torch < 2.6 declares it only for
    # Python >= 3.12 (a pip-made venv of an older Python ships it; uv's does not).
    session.install(*pins, "setuptools", "-e", ".[hf,test,export]")
    junit = Path(session.create_tmp()) / "junit.xml"
    started = time.monotonic()
    # xunit1 reports name each test's file; exit code 1 (failures) is recorded
    # first and reported after.
    recording = not session.posargs and os.environ.get("ATTNPATCH_MATRIX_RECORD") != "0"
    session.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
        f"--junitxml={junit}", *session.posargs, success_codes=[0, 1],
        # tests/test_versions.py checks the table this run is rewriting: it skips.
        env={"ATTNPATCH_MATRIX_RECORDING": "1" if recording else "0"},
    )
    if not recording:
        session.log("not recorded in the results table (pytest arguments given, or ATTNPATCH_MATRIX_RECORD=0)")
    else:
        session.run("python", "-m", "benchmarks.versions", "record", entry, str(junit),
                    str(time.monotonic() - started))
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    if os.environ.get("ATTNPATCH_MATRIX_DROP_ENVS") == "1":
        shutil.rmtree(session.virtualenv.location, ignore_errors=True)
        # uv's cache holds every entry's torch unpacked (about 5 GB each): drop
        # it too, but only a cache of our own (`make matrix` puts it in .nox/).
        cache = Path(os.environ.get("UV_CACHE_DIR", "")).resolve()
        if Path(".nox").resolve() in cache.parents:
            shutil.rmtree(cache, ignore_errors=True)
    if failed:
        session.error(f"{entry}: {failed} tests failed")


@nox.session
@nox.parametrize(["torch", "transformers"], entries())
def tests(session, torch, transformers):
    """The whole suite on one torch and one transformers release."""
    _run_suite(session, entry_name(torch, transformers),
               *(f"{package}=={release}" for package, release in pins(torch, transformers).items()))
