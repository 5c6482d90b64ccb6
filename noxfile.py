"""The version matrix: the whole test suite on every supported torch minor
release, each with transformers 4.57 (the last 4.x) and the newest 5.x, on
Python 3.11; and some of those pairs on the other supported Pythons (the oldest
pair on the oldest Python, the newest on the newest; benchmarks/versions.py).

    nox -s tests                                                        # every entry, in sequence
    nox -s "tests(python='3.13', torch='2.15', transformers='5.24')"    # one entry
    nox -l                                                              # the entries

(or `make matrix`, `make matrix PY=3.13 TORCH=2.15 TRANSFORMERS=5.24`; any of
the three alone picks every entry with that release). Each entry's Python is
pyenv's (or a pythonX.Y on PATH); uv never downloads one, so a missing Python
fails its entry with a message that says so. Each entry
builds its environment with uv from the package index, runs pytest, and stores
pass/fail/skip per test file in benchmarks/results/versions.json and .md (and
the README's table). ATTNPATCH_MATRIX_DROP_ENVS=1 deletes each environment
after its run (about 5 GB each), and uv's cache when it lies in .nox/ (as
`make matrix` puts it; each entry then downloads its torch again, ~3 GB).

The entries of the oldest (torch, transformers) pair also take the oldest wrapt
we support, so that the oldest entry tests every floor at once. torch comes
from the package index as published there (on Linux, CUDA builds; they run on a
machine without a GPU, and the GPU tests then skip).
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
nox.options.error_on_missing_interpreters = True

# The matrix itself lives beside its results table, where the tests read it too.
sys.path.insert(0, str(Path(__file__).parent))
from benchmarks.versions import PYTHONS, entry_name, find_python, matrix_entries, pins  # noqa: E402


def entries():
    """The matrix, or the entries that ATTNPATCH_MATRIX_PYTHON / _TORCH /
    _TRANSFORMERS pick (what `make matrix PY=... TORCH=... TRANSFORMERS=...` sets)."""
    only = [os.environ.get(f"ATTNPATCH_MATRIX_{name}") or None for name in ("PYTHON", "TORCH", "TRANSFORMERS")]
    return [entry for entry in matrix_entries() if all(pick in (None, got) for pick, got in zip(only, entry))]


# uv looks for pythonX.Y on PATH, where pyenv puts only its selected versions:
# put every installed one there, and never let uv download one instead.
os.environ["UV_PYTHON_DOWNLOADS"] = "never"
for _minor in PYTHONS:
    _found = find_python(_minor)
    if _found:
        os.environ["PATH"] = os.path.dirname(_found) + os.pathsep + os.environ["PATH"]


def _run_suite(session, entry, *pins):
    # setuptools: torch's inductor needs it, and torch < 2.6 declares it only for
    # Python >= 3.12 (a pip-made venv of an older Python ships it; uv's does not).
    session.install(*pins, "setuptools", "-e", ".[hf,test,export]")
    junit = Path(session.create_tmp()) / "junit.xml"
    started = time.monotonic()
    # xunit1 reports name each test's file; exit code 1 (failures) is recorded
    # first and reported after.
    recording = not session.posargs and os.environ.get("ATTNPATCH_MATRIX_RECORD") != "0"
    # --durations: where each entry's time goes, in its log.
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        "--durations=40",
        f"--junitxml={junit}",
        *session.posargs,
        success_codes=[0, 1],
        # tests/test_versions.py checks the table this run is rewriting: it skips.
        env={"ATTNPATCH_MATRIX_RECORDING": "1" if recording else "0"},
    )
    if not recording:
        session.log("not recorded in the results table (pytest arguments given, or ATTNPATCH_MATRIX_RECORD=0)")
    else:
        session.run("python", "-m", "benchmarks.versions", "record", entry, str(junit), str(time.monotonic() - started))
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
@nox.parametrize(["python", "torch", "transformers"], entries())
def tests(session, torch, transformers):
    """The whole suite on one Python, one torch and one transformers release."""
    python = session.python
    _run_suite(
        session,
        entry_name(python, torch, transformers),
        *(f"{package}=={release}" for package, release in pins(python, torch, transformers).items()),
    )
