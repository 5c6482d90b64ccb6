"""Run PyTorch's own attention tests without, then with attnpatch, and compare.

    python -m tests.upstream [--src PYTORCH_CHECKOUT] [--fetch] [--device cpu] [--report DIR]

Exit status 0 when every test that passes without attnpatch passes with it, apart
from the tests suite.NAN_ASSERTING names; 1 otherwise; 2 when the checkout is
missing. The report (counts, wall times, versions, every difference) is written
as upstream-<device>.md and .json under --report.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tests.upstream import suite
from tests.upstream.compare import Comparison, Result, compare, read_junit

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).with_name("stubs")
PYTORCH_REPO = "https://github.com/pytorch/pytorch.git"


def run_pytest(test_dir: Path, *, patched: bool, device: str, junit: Path, extra: list[str]) -> tuple[float, float]:
    """Runs one pass; returns (wall seconds, CPU seconds of the pytest process)."""
    env = dict(os.environ)
    env.pop("ATTNPATCH", None)  # the baseline must not be auto-activated
    env["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = device
    # The stubs come after the checkout's own test folder (pytest puts that first),
    # so a checkout that has the real helper modules uses them.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STUBS), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "pytest.ini"  # neither this repository's settings nor the checkout's
        ini.write_text("[pytest]\n")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ini),
            "--rootdir",
            str(test_dir),
            f"--junitxml={junit}",
            "-o",
            "junit_family=xunit1",
            *(["--attnpatch"] if patched else []),
            *(f"--deselect={entry}" for entry in suite.OUT_OF_SCOPE),
            *extra,
            *suite.FILES,
        ]
        print(("patched" if patched else "baseline") + ": " + " ".join(command[1:]), flush=True)
        start, cpu_start = time.perf_counter(), children_cpu_seconds()
        done = subprocess.run(command, cwd=test_dir, env=env, capture_output=True, text=True)
        seconds, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_start
    header = "attnpatch: active for this session" in done.stdout
    if header != patched or not junit.exists():
        sys.exit(
            f"pytest did not run as asked (patched={patched}, plugin active={header}):\n"
            f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    print(done.stdout.strip().splitlines()[-1], flush=True)
    return seconds, cpu


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def release_tag() -> str:
    import torch

    return "v" + torch.__version__.split("+")[0]


def default_src() -> Path:
    return Path.home() / ".cache" / "attnpatch" / f"pytorch-{release_tag()}"


def fetch(dest: Path) -> None:
    """A sparse, blob-less clone of the release tag of the installed torch."""
    tag = release_tag()
    subprocess.run(
        [
            "git",
            "clone",
            "--depth",
            "1",
            "--branch",
            tag,
            "--filter=blob:none",
            "--no-checkout",
            PYTORCH_REPO,
            str(dest),
        ],
        check=True,
    )
    subprocess.run(
        [
            "git",
            "-C",
            str(dest),
            "sparse-checkout",
            "set",
            "--no-cone",
            *(f"/test/{path}" for path in (*suite.FILES, *suite.HELPERS)),
        ],
        check=True,
    )
    subprocess.run(["git", "-C", str(dest), "checkout"], check=True)


def source_description(src: Path, label: str | None) -> dict:
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    files = {path: hashlib.sha256((src / "test" / path).read_bytes()).hexdigest() for path in suite.FILES}
    return {
        "label": label or str(src),
        "git_head": head.stdout.strip() if head.returncode == 0 else None,
        "sha256": files,
    }


def counts(results: dict[str, Result]) -> dict[str, int]:
    tally = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for result in results.values():
        tally[result.outcome] += 1
    return tally


def versions() -> dict:
    import torch

    import attnpatch

    return {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "attnpatch": attnpatch.__version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
    }


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def pair_row(test_id: str, pair: tuple[Result, Result]) -> str:
    before, after = pair
    message = (after.message or before.message).replace("|", "\\|")
    return f"| `{test_id}` | {before.outcome} | {after.outcome} | {message} |"


def write_report(out: Path, device: str, meta: dict, base: dict, patched: dict, cmp: Comparison) -> None:
    out.mkdir(parents=True, exist_ok=True)
    groups = ("regressions", "nan_expected", "fixed", "fail_both")
    data = {
        "meta": meta,
        "baseline": counts(base),
        "patched": counts(patched),
        "stale_nan_entries": cmp.stale_nan_entries,
        "unmatched_nan_entries": cmp.unmatched_nan_entries,
        **{
            name: {test_id: [asdict(r) for r in pair] for test_id, pair in getattr(cmp, name).items()}
            for name in groups
        },
    }
    (out / f"upstream-{device}.json").write_text(json.dumps(data, indent=1) + "\n")

    lines = [
        f"# PyTorch's own attention tests with attnpatch: {device}",
        "",
        f"torch {meta['torch']} ({meta['torch_git']}), attnpatch {meta['attnpatch']}, Python {meta['python']}, "
        f"{meta['cores']} cores, {meta['date']}. Produced by `python -m tests.upstream` (`make upstream`).",
        "",
        f"Test files: {meta['source']['label']}.",
        "",
        "| file | sha256 |",
        "|---|---|",
        *(f"| test/{path} | `{digest}` |" for path, digest in meta["source"]["sha256"].items()),
        "",
        "| run | passed | failed | error | skipped | wall s | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | "
            + " | ".join(str(c[k]) for k in ("passed", "failed", "error", "skipped"))
            + f" | {meta['seconds'][name]:.0f} | {seconds(meta.get('cpu_seconds', {}).get(name))} |"
            for name, c in (("baseline", counts(base)), ("patched", counts(patched)))
        ),
        "",
        *(
            [
                f"Load average at the start: {', '.join(f'{x:.1f}' for x in meta['load_average'])} "
                "(on a shared machine CPU seconds are the steadier figure).",
                "",
            ]
            if "load_average" in meta
            else []
        ),
        "Left out of both runs (suite.OUT_OF_SCOPE):",
        "",
        *(f"- `{entry}`: {why}" for entry, why in suite.OUT_OF_SCOPE.items()),
        "",
        "Expected to differ (suite.NAN_ASSERTING):",
        "",
        *(f"- `{entry}`: {why}" for entry, why in suite.NAN_ASSERTING.items()),
        "",
    ]
    titles = {
        "regressions": "Pass without attnpatch, not with it (must be empty)",
        "nan_expected": "Assert NaN on fully masked rows (suite.NAN_ASSERTING): expected to differ",
        "fixed": "Fail without attnpatch, pass with it",
        "fail_both": "Fail without and with attnpatch (this release against these test files)",
    }
    for name in groups:
        rows = getattr(cmp, name)
        lines += [f"## {titles[name]}: {len(rows)}", ""]
        if rows:
            lines += [
                "| test | without | with | message (start) |",
                "|---|---|---|---|",
                *(pair_row(test_id, pair) for test_id, pair in rows.items()),
                "",
            ]
    if cmp.stale_nan_entries:
        lines += [
            "## suite.NAN_ASSERTING entries that no longer differ",
            "",
            *(f"- `{entry}`" for entry in cmp.stale_nan_entries),
            "",
        ]
    (out / f"upstream-{device}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.upstream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src",
        type=Path,
        help="a PyTorch source checkout (the folder holding test/); "
        "default ~/.cache/attnpatch/pytorch-v<installed torch version>",
    )
    parser.add_argument(
        "--fetch", action="store_true", help="clone the installed torch's release tag into --src if missing"
    )
    parser.add_argument("--device", default="cpu", help="device types to instantiate (PyTorch's only_for), default cpu")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--source-label", help="how the report names the test files' origin (default: --src)")
    parser.add_argument("--keep", type=Path, help="keep both runs' junit files and meta.json in this folder")
    parser.add_argument("--reuse", type=Path, help="compare the runs kept in this folder instead of running")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args(argv)

    if args.reuse:  # compare again, e.g. after editing suite.NAN_ASSERTING
        meta = json.loads((args.reuse / "meta.json").read_text())
        results = {name: read_junit(args.reuse / f"{name}.xml") for name in ("baseline", "patched")}
    else:
        src = (args.src or default_src()).resolve()
        if not (src / "test" / suite.FILES[0]).exists():
            if not args.fetch:
                print(f"no PyTorch checkout at {src}; pass --fetch to clone the release tag", file=sys.stderr)
                return 2
            fetch(src)
        meta = {
            **versions(),
            "device": args.device,
            "source": source_description(src, args.source_label),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg(),
            "seconds": {},
            "cpu_seconds": {},
        }
        keep = args.keep or Path(tempfile.mkdtemp(prefix="attnpatch-upstream-"))
        keep.mkdir(parents=True, exist_ok=True)
        results = {}
        for name, patched in (("baseline", False), ("patched", True)):
            junit = keep / f"{name}.xml"
            meta["seconds"][name], meta["cpu_seconds"][name] = run_pytest(
                src / "test", patched=patched, device=args.device, junit=junit, extra=args.pytest_args
            )
            results[name] = read_junit(junit)
        (keep / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"junit files and meta.json kept in {keep} (--reuse {keep} compares them again)")

    cmp = compare(results["baseline"], results["patched"], suite.NAN_ASSERTING)
    write_report(args.report, args.device, meta, results["baseline"], results["patched"], cmp)
    print(f"baseline {counts(results['baseline'])}, patched {counts(results['patched'])}")
    print(
        f"{len(cmp.regressions)} regressions, {len(cmp.nan_expected)} NaN-asserting (expected), "
        f"{len(cmp.fixed)} fixed, {len(cmp.fail_both)} failing in both; "
        f"report: {args.report / f'upstream-{args.device}.md'}"
    )
    for test_id, (_before, after) in cmp.regressions.items():
        print(f"REGRESSION {test_id}: {after.outcome}: {after.message}")
    for entry in cmp.stale_nan_entries:
        print(f"STALE suite.NAN_ASSERTING entry (no test there differs): {entry}")
    for entry in cmp.unmatched_nan_entries:
        print(f"suite.NAN_ASSERTING entry that matched no test in this run: {entry}")
    return 1 if cmp.regressions or cmp.stale_nan_entries else 0


if __name__ == "__main__":
    sys.exit(main())
