"""The version matrix's results table: what each (Python, torch, transformers)
entry of ``noxfile.py`` gave, per test file.

``python -m benchmarks.versions record ENTRY JUNIT_XML`` runs inside an entry's
environment after its test run: it reads the installed versions and pytest's
JUnit report, stores them under ENTRY in ``versions.json`` and rewrites
``versions.md``. ``python -m benchmarks.versions render`` only rewrites the
Markdown and the README's "Supported versions" table from the JSON;
tests/test_versions.py checks that all three agree. ``python -m
benchmarks.versions find-python 3.10`` prints the interpreter an entry on that
Python runs with (pyenv's, else one on PATH), or says that there is none.
"""

from __future__ import annotations

import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The matrix (noxfile.py runs it): the newest patch release of every torch minor
# release we support. The floor is 2.5, the first release with aten._safe_softmax
# (on an older torch attnpatch uses a composite of plain ops instead, but no
# older torch was run).
TORCH = {
    "2.5": "2.5.1",
    "2.6": "2.6.0",
    "2.7": "2.7.1",
    "2.8": "2.8.0",
    "2.9": "2.9.1",
    "2.10": "2.10.0",
    "2.11": "2.11.0",
    "2.12": "2.12.1",
    "2.13": "2.13.0",
    "2.14": "2.14.1",
    "2.15": "2.15.0",
}
TRANSFORMERS = {"4.57": "4.57.6", "5.24": "5.24.0"}
# transformers 5 needs torch >= 2.6 (it treats an older torch as absent).
TRANSFORMERS_MIN_TORCH = {"5.24": "2.6"}
# The oldest wrapt with the API attnpatch uses (unwrap_object and its errors),
# which the entries of the oldest (torch, transformers) pair install.
WRAPT_FLOOR = "2.4.0"
# The Pythons we support, oldest first (pyproject's requires-python and
# classifiers follow the ones that passed). Every (torch, transformers) pair
# runs on GRID_PYTHON; each other Python runs the pairs listed for it: the
# oldest pair on the oldest Python and the newest pair on the newest, so that
# the two edge entries (`make test`, every commit) test every floor and every
# ceiling at once, and one pair in between on 3.12.
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
GRID_PYTHON = "3.11"
OTHER_PYTHONS = {
    "3.10": [("2.5", "4.57")],
    "3.12": [("2.14", "5.24")],
    "3.13": [("2.15", "5.24")],
}


def _pairs() -> list[tuple[str, str]]:
    """Every (torch, transformers) pair the releases allow, oldest first."""
    return [
        (torch, tf)
        for torch in TORCH
        for tf in TRANSFORMERS
        if _release(torch) >= _release(TRANSFORMERS_MIN_TORCH.get(tf, "0"))
    ]


def matrix_entries() -> list[tuple[str, str, str]]:
    """Every (Python, torch, transformers) entry of the matrix, as minor
    releases, ordered by torch, then transformers, then Python: the first is
    the oldest of all three, the last the newest."""
    entries = [(GRID_PYTHON, torch, tf) for torch, tf in _pairs()]
    entries += [(python, torch, tf) for python, pairs in OTHER_PYTHONS.items() for torch, tf in pairs]
    return sorted(entries, key=lambda e: (_release(e[1]), _release(e[2]), _release(e[0])))


def entry_name(python_minor: str, torch_minor: str, transformers_minor: str) -> str:
    return f"Python {python_minor} / torch {torch_minor} / transformers {transformers_minor}"


def pins(python_minor: str, torch_minor: str, transformers_minor: str) -> dict[str, str]:
    """The releases an entry installs (its Python is the interpreter nox runs
    it with). The entries of the oldest (torch, transformers) pair take the
    oldest wrapt too (every floor at once); the others take the newest wrapt."""
    pinned = {"torch": TORCH[torch_minor], "transformers": TRANSFORMERS[transformers_minor]}
    if (torch_minor, transformers_minor) == _pairs()[0]:
        pinned["wrapt"] = WRAPT_FLOOR
    return pinned


def find_python(minor: str) -> str | None:
    """An interpreter of Python ``minor`` (e.g. "3.10"): pyenv's newest
    installed X.Y.Z, else a ``pythonX.Y`` on PATH that runs (a pyenv shim of a
    version that is not selected does not), else None."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = sorted(
        (d for d in (root / "versions").glob(f"{minor}.*") if re.fullmatch(rf"{re.escape(minor)}\.\d+", d.name)),
        key=lambda d: _release(d.name),
        reverse=True,
    )
    candidates = [str(d / "bin" / f"python{minor}") for d in found]
    candidates.append(shutil.which(f"python{minor}") or "")
    for candidate in filter(None, candidates):
        try:
            ran = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except OSError:
            continue
        if ran.returncode == 0 and ran.stdout.strip() == minor:
            return candidate
    return None


ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "benchmarks" / "results" / "versions.json"
RESULTS_MD = ROOT / "benchmarks" / "results" / "versions.md"
README = ROOT / "README.md"
README_START = (
    "<!-- versions-table: generated by `python -m benchmarks.versions render` from benchmarks/results/versions.json -->"
)
README_END = "<!-- versions-table: end -->"
OUTCOMES = ("passed", "failed", "skipped", "error")


def installed_versions() -> dict[str, str]:
    def version_of(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        **{name: version_of(name) for name in ("torch", "transformers", "wrapt", "tokenizers")},
    }


def _test_file(case: ET.Element) -> str:
    # xunit1 reports carry the file; a collection error carries only the module.
    if case.get("file"):
        return case.get("file")
    module = case.get("classname", "")
    parts = module.split(".")
    while parts and not (ROOT / Path(*parts)).with_suffix(".py").exists():
        parts.pop()
    return str(Path(*parts).with_suffix(".py")) if parts else module or "(unknown)"


def per_file_outcomes(junit_xml: Path) -> tuple[dict[str, dict[str, int]], list[str], dict[str, int]]:
    """Counts of passed/failed/skipped/error per test file, the ids of the tests
    that failed or errored, and how many tests skipped for each reason."""
    files: dict[str, dict[str, int]] = {}
    broken: list[str] = []
    skips: dict[str, int] = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = _test_file(case)
        counts = files.setdefault(name, dict.fromkeys(OUTCOMES, 0))
        tags = {child.tag for child in case}
        if "error" in tags:
            outcome = "error"
        elif "failure" in tags:
            outcome = "failed"
        elif "skipped" in tags:
            outcome = "skipped"
            reason = case.find("skipped").get("message", "").removeprefix("Skipped: ")
            skips[reason] = skips.get(reason, 0) + 1
        else:
            outcome = "passed"
        counts[outcome] += 1
        if outcome in ("failed", "error"):
            broken.append(f"{name}::{case.get('name')}")
    return dict(sorted(files.items())), broken, dict(sorted(skips.items()))


def load() -> dict:
    if RESULTS_JSON.exists():
        return json.loads(RESULTS_JSON.read_text())
    return {"entries": {}}


def record(entry: str, junit_xml: Path, seconds: float | None = None) -> dict:
    files, broken, skips = per_file_outcomes(junit_xml)
    totals = {outcome: sum(counts[outcome] for counts in files.values()) for outcome in OUTCOMES}
    result = {
        "versions": installed_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "platform": f"{platform.system()} {platform.machine()}, {_device()}",
        "totals": totals,
        "green": totals["failed"] == 0 and totals["error"] == 0 and totals["passed"] > 0,
        "broken": broken,
        "skip_reasons": skips,
        "files": files,
    }
    if seconds is not None:
        result["seconds"] = round(seconds)
    # `make test` runs both edge entries at once: one writer at a time.
    with RESULTS_JSON.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load()
        data["entries"][entry] = result
        data["entries"] = dict(sorted(data["entries"].items(), key=lambda item: _entry_key(item[1])))
        RESULTS_JSON.write_text(json.dumps(data, indent=1) + "\n")
        render(data)
    return result


def _device() -> str:
    import torch

    return (
        "CUDA"
        if torch.cuda.is_available()
        else f"CPU (torch built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for CPU'})"
    )


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _entry_key(result: dict) -> tuple:
    versions = result["versions"]
    return (
        _release(versions["torch"]),
        _release(versions["transformers"]),
        _release(versions["python"]),
        _release(versions["wrapt"]),
    )


def _summary(totals: dict[str, int]) -> str:
    text = f"{totals['passed']} passed, {totals['skipped']} skipped"
    if totals["failed"] or totals["error"]:
        text = f"**{totals['failed']} failed, {totals['error']} errors**, " + text
    return text


def supported_range(data: dict) -> dict[str, str]:
    """Oldest Python, torch and wrapt that every entry using them passed with."""
    green = [result for result in data["entries"].values() if result["green"]]
    return {
        package: min((r["versions"][package] for r in green), key=_release, default="none")
        for package in ("python", "torch", "wrapt")
    }


def pythons_passed(data: dict) -> list[str]:
    """The Python minor releases with at least one entry run, every entry run
    on them green (pyproject's classifiers list exactly these)."""
    runs: dict[str, list[bool]] = {}
    for result in data["entries"].values():
        runs.setdefault(_minor(result["versions"]["python"]), []).append(result["green"])
    return sorted((python for python, green in runs.items() if all(green)), key=_release)


def _minor(version: str) -> str:
    return ".".join(str(part) for part in _release(version)[:2])


def readme_table(data: dict, per_file: str | None = "benchmarks/results/versions.md") -> str:
    """The README's tables: what is supported (the oldest release every entry
    passed with, and up) and what was run; then a grid, one row per Python and
    torch release of the matrix and one column per transformers release, each
    cell the whole suite's outcome."""
    entries = data["entries"]
    floor = supported_range(data)
    passed = pythons_passed(data)

    def tested(package: str) -> str:
        return ", ".join(sorted({r["versions"][package] for r in entries.values()}, key=_release))

    lines = [
        "| library | supported | tested |",
        "|---|---|---|",
        f"| Python | {', '.join(passed) if passed else 'none'} | {tested('python')} |",
        f"| torch | {_minor(floor['torch'])} + | {tested('torch')} |",
        f"| transformers | 4.57 and 5.x | {tested('transformers')} |",
        f"| wrapt | {floor['wrapt']} + (< 3) | {tested('wrapt')} |",
        "",
        "| Python | torch \\ transformers | " + " | ".join(TRANSFORMERS.values()) + " |",
        "|---|---|" + "---|" * len(TRANSFORMERS),
    ]
    in_matrix = set(matrix_entries())
    for python in PYTHONS:
        torches = [t for t in TORCH if any((python, t, tf) in in_matrix for tf in TRANSFORMERS)]
        for torch_minor in torches:
            cells = []
            for tf_minor in TRANSFORMERS:
                result = entries.get(entry_name(python, torch_minor, tf_minor))
                if (python, torch_minor, tf_minor) in in_matrix:
                    cells.append(_summary(result["totals"]) if result else "not run yet")
                elif _release(torch_minor) < _release(TRANSFORMERS_MIN_TORCH.get(tf_minor, "0")):
                    cells.append(f"— (needs torch {TRANSFORMERS_MIN_TORCH[tf_minor]} +)")
                else:
                    cells.append("—")
            lines.append(f"| {python} | {TORCH[torch_minor]} | " + " | ".join(cells) + " |")
    oldest, newest = matrix_entries()[0], matrix_entries()[-1]
    lines.append("")
    lines.append(
        f"Every torch and transformers pair runs on Python {GRID_PYTHON}; the other Pythons run the pairs"
        f" shown (— : not in the matrix). The entries of torch {oldest[1]} / transformers {oldest[2]}"
        f" run with wrapt {WRAPT_FLOOR}, the oldest supported, the others with the newest wrapt;"
        f" `make test` runs the oldest entry ({entry_name(*oldest)}) and the newest"
        f" ({entry_name(*newest)}) on every commit."
        + (f" Per test file: [{per_file}]({per_file})." if per_file else "")
    )
    return "\n".join(lines)


def markdown(data: dict) -> str:
    lines = [
        "# attnpatch version matrix",
        "",
        "The whole test suite on each entry of `noxfile.py` (`make matrix`, or one entry:",
        "`make matrix PY=3.13 TORCH=2.15 TRANSFORMERS=5.24`). Generated by `python -m benchmarks.versions`",
        "from [versions.json](versions.json); do not edit by hand.",
        "",
        readme_table(data, per_file=None),
        "",
    ]
    for name, result in data["entries"].items():
        v = result["versions"]
        lines += [
            f"## {name}",
            "",
            f"torch {v['torch']}, transformers {v['transformers']}, wrapt {v['wrapt']}, "
            f"tokenizers {v['tokenizers']}, Python {v['python']}; {result['platform']}; {result['date']}"
            + (f"; {result['seconds']} s" if "seconds" in result else "")
            + f". {_summary(result['totals'])}.",
            "",
        ]
        for note in result.get("notes", []):
            lines += [f"Note: {note}", ""]
        if result["broken"]:
            lines += ["Failed:", ""] + [f"- `{test}`" for test in result["broken"]] + [""]
        if result.get("skip_reasons"):
            lines += (
                ["Skipped:", ""] + [f"- {count} x {reason}" for reason, count in result["skip_reasons"].items()] + [""]
            )
        lines += ["| test file | passed | failed | skipped | errors |", "|---|---:|---:|---:|---:|"]
        for test_file, counts in result["files"].items():
            lines.append(f"| {test_file} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
        lines.append("")
    return "\n".join(lines)


def readme_with_table(readme: str, data: dict) -> str:
    start, end = readme.index(README_START), readme.index(README_END)
    return readme[: start + len(README_START)] + "\n\n" + readme_table(data) + "\n\n" + readme[end:]


def render(data: dict | None = None) -> None:
    data = load() if data is None else data
    RESULTS_MD.write_text(markdown(data))
    README.write_text(readme_with_table(README.read_text(), data))


def main(argv: list[str]) -> int:
    if argv[:1] == ["record"] and len(argv) in (3, 4):
        result = record(argv[1], Path(argv[2]), float(argv[3]) if len(argv) == 4 else None)
        print(f"{argv[1]}: {_summary(result['totals'])}")
        return 0
    if argv == ["render"]:
        render()
        return 0
    if argv[:1] == ["find-python"] and len(argv) == 2:
        found = find_python(argv[1])
        if found is None:
            print(
                f"Python {argv[1]} not found (neither in pyenv's versions nor as python{argv[1]} on PATH):"
                f" install it, e.g. `pyenv install {argv[1]}`",
                file=sys.stderr,
            )
            return 1
        print(found)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
