"""A small mutation run: does the test suite catch deliberate bugs in attnpatch?

    .venv/bin/python tools/mutation/run.py              # every mutant, report to tools/mutation/report.md
    .venv/bin/python tools/mutation/run.py M01 P01      # only these (report printed, not written)
    .venv/bin/python tools/mutation/run.py --list       # the mutants, nothing run
    .venv/bin/python tools/mutation/run.py --worktree   # the working tree as it is (uncommitted tests
                                                        # included), instead of the last commit

Each mutant in ``MUTANTS`` below is one small edit of ``attnpatch/masks.py``,
``attnpatch/_patching.py`` or ``attnpatch/targets/``: a file, an exact piece of
its text (found exactly once, or the mutant is reported "stale": the code moved
on, update the mutant), what replaces it, and the test files that should notice.
The script exports the tree (``git archive``, by default of HEAD) into a
temporary folder, never touching the working tree that others run tests in,
runs those test files on the unchanged copy (the baseline: they must pass, or
nothing can be concluded), then applies each mutant alone, runs its test files
(``pytest -x``, fixed order, the copy's ``attnpatch`` first on the path), and
puts the file back. A mutant is *killed* when a test fails (or the run times
out), *survived* when every test passes. ``--rev`` picks another commit.

A survivor is a hole or a harmless change. Either a test is added that kills it
(then it stays in the list, killed from then on), or its ``harmless`` entry
says why no user can tell; until the test lands, its ``hole`` entry names the
test that would kill it. The report lists every mutant, what killed it (the
first failing test), and every survivor with that reason. Not run in CI: it
takes minutes (about 30 runs of a few test files each, 5 to 10 minutes on 2
busy cores; the baseline alone about 2). Run it after changing the code that a
mutant edits (a stale mutant says so) or the tests that should kill one, with
the .venv of ``make test`` (torch and transformers installed).

The exit status is 0 when every mutant was killed or is marked harmless, 1 when
one survived that is not (a hole included), is stale or ran no test, 2 when the
baseline fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "tools" / "mutation" / "report.md"
TIMEOUT = 600  # seconds for one mutant's tests: a mutant that hangs counts as killed


@dataclass
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str
    harmless: str = ""  # for a known survivor: why no user can tell the difference
    hole: str = ""  # for a known survivor that matters: the test that would kill it, not yet in the suite


SOFTMAX = ("tests/core/test_softmax.py", "tests/core/test_masks.py")
MASKS = ("tests/core/test_masks.py", "tests/core/test_general_path.py", "tests/core/test_sdpa.py")
LIFECYCLE = ("tests/core/test_families.py", "tests/core/test_lifecycle.py", "tests/reliability/test_other_patchers.py")

MUTANTS = [
    # --- attnpatch/masks.py ---------------------------------------------------
    Mutant(
        "M01",
        "attnpatch/masks.py",
        "all_masked = input[index].amax(-1) == NEG_INF",
        "all_masked = input[index].amin(-1) == NEG_INF",
        SOFTMAX,
        "softmax, CPU path: a row with any -inf counts as fully masked (+inf/-inf row zeroed, not NaN)",
    ),
    Mutant(
        "M02",
        "attnpatch/masks.py",
        "clear_result_rows(out, input.amax(-1, keepdim=True) == NEG_INF, keepdim=True)",
        "clear_result_rows(out, input.amin(-1, keepdim=True) == NEG_INF, keepdim=True)",
        SOFTMAX,
        "softmax, general path: the same (amin for amax)",
    ),
    Mutant(
        "M03",
        "attnpatch/masks.py",
        "    return mask.amax(-1, keepdim) == NEG_INF\n",
        "    return mask.amin(-1, keepdim) == NEG_INF\n",
        MASKS,
        "fully_masked_rows, eager float mask: one -inf key masks the whole row",
    ),
    Mutant(
        "M04",
        "attnpatch/masks.py",
        "return words.amin(-1, keepdim) == _ALL_TRUE_WORD if drop",
        "return words.amax(-1, keepdim) == _ALL_TRUE_WORD if drop",
        MASKS,
        "fully_masked_rows, large bool drop mask read as int32 words: one all-masked word masks the row",
    ),
    Mutant(
        "M05",
        "attnpatch/masks.py",
        "mask.shape[-1] >= 1 << 15",
        "mask.shape[-1] >= 1 << 17",
        ("tests/core/test_masks.py", "tests/core/test_compile.py"),
        "key count in int16 for rows of up to 131071 keys (a row of 65536 admitted keys counts 0)",
    ),
    Mutant(
        "M06",
        "attnpatch/masks.py",
        "safe = mask if in_place else mask.clone()",
        "safe = mask",
        MASKS + ("tests/core/test_mha.py",),
        "admit_rows writes into the caller's float mask",
    ),
    Mutant(
        "M07",
        "attnpatch/masks.py",
        "if (out.requires_grad and torch.is_grad_enabled()) or not is_plain(out)",
        "if not is_plain(out)",
        MASKS + ("tests/core/test_mha.py",),
        "clear_result_rows clears in place an output autograd recorded",
    ),
    Mutant(
        "M08",
        "attnpatch/masks.py",
        "if entry is None or entry[0]() is not mask or entry[1] != mask._version:",
        "if entry is None or entry[0]() is not mask:",
        MASKS + ("tests/core/test_mha.py",),
        "mask cache ignores in-place changes of the mask (stale rows)",
    ),
    Mutant(
        "M09",
        "attnpatch/masks.py",
        "if ref is not None and ref() is rows and last_keepdim == keepdim and kept.dtype == dtype:",
        "if ref is not None and last_keepdim == keepdim and kept.dtype == dtype:",
        MASKS,
        "kept-rows cache reused for other rows (clears the wrong rows)",
    ),
    Mutant(
        "M10",
        "attnpatch/masks.py",
        "return mask.amax(-1) <= lowest",
        "return mask.amin(-1) <= lowest",
        ("tests/hf/test_attention.py", "tests/hf/test_eager_models.py"),
        "hf_fully_masked_rows: one masked key masks the row (valid rows zeroed)",
    ),
    Mutant(
        "M11",
        "attnpatch/masks.py",
        "    if not torch.equal(keep, positions < lengths.unsqueeze(-1)):\n        return None\n",
        "",
        ("tests/hf/test_generate.py",),
        "right_padding_lengths takes left padding and holes for right padding",
    ),
    Mutant(
        "M12",
        "attnpatch/masks.py",
        "mask.shape[-1] >= 1 << 15",
        "mask.shape[-1] >= 1 << 16",
        ("tests/core/test_masks.py",),
        "key count in int16 for rows of up to 65535 keys (wraps from 32768)",
        harmless="the count wraps modulo 65536 and so does the key number it is compared with "
        "(int16 compare, eager and inductor, torch 2.13): for a row of under 65536 keys, count == 0 "
        "and count == keys hold exactly when they would in int32. 1 << 15 is a safe margin, not a bound",
    ),
    # --- attnpatch/_patching.py -----------------------------------------------
    Mutant(
        "P01",
        "attnpatch/_patching.py",
        "if self._prepared is None or self._prepared[0] is not original:",
        "if self._prepared is None:",
        LIFECYCLE + ("tests/hf/test_attention.py",),
        "PlainFunctionPoint keeps the replacement of an original that changed while off (runs the stale one)",
    ),
    Mutant(
        "P02",
        "attnpatch/_patching.py",
        "if self._spare is None or self._spare[0].__wrapped__ is not original:",
        "if self._spare is None:",
        LIFECYCLE + ("tests/core/test_softmax.py",),
        "PatchPoint keeps the wrapper of an original that changed while off (runs the stale one)",
    ),
    Mutant(
        "P03",
        "attnpatch/_patching.py",
        '            self._prepared = None\n            self.state, self.note = "displaced"',
        '            self.state, self.note = "displaced"',
        LIFECYCLE,
        "PlainFunctionPoint reuses a displaced replacement (which comes back to life)",
    ),
    Mutant(
        "P04",
        "attnpatch/_patching.py",
        "if point._token is not token",
        "if point._token is None",
        LIFECYCLE,
        "an old installation's wrapper acts again once the point is reinstalled (fix applied twice)",
    ),
    Mutant(
        "P05",
        "attnpatch/_patching.py",
        "        self._token = None  # from now on the wrapper passes every call through\n",
        "",
        LIFECYCLE + ("tests/core/test_softmax.py",),
        "after remove(), a wrapper still referenced somewhere keeps fixing calls",
    ),
    Mutant(
        "P06",
        "attnpatch/_patching.py",
        "        _holders.subtract(_switch)\n",
        "",
        ("tests/core/test_lifecycle.py",),
        "apply() twice counts twice: remove() leaves targets installed",
    ),
    Mutant(
        "P07",
        "attnpatch/_patching.py",
        "if on_module and type(original) is types.FunctionType and not _from_torch(original):",
        "if False:",
        ("tests/core/test_compile.py",),
        "another library's Python function in SDPA's place gets a wrapt proxy (dynamo traces past the fix)",
    ),
    Mutant(
        "P08",
        "attnpatch/_patching.py",
        "        self.loader.exec_module(module)\n        _on_import(sys.modules.get(module.__name__, module))\n",
        "        self.loader.exec_module(module)\n",
        ("tests/core/test_families.py", "tests/hf/test_eager_models.py"),
        "model files imported after apply() are not patched",
    ),
    Mutant(
        "P09",
        "attnpatch/_patching.py",
        "        return [name for name in fresh if self.matches(name)]\n",
        "        return []\n",
        ("tests/hf/test_eager_models.py", "tests/core/test_families.py"),
        "model files imported before apply() are never found (discovery broken)",
    ),
    # --- attnpatch/targets/ -----------------------------------------------------
    Mutant(
        "T01",
        "attnpatch/targets/torch_softmax.py",
        "and dim in (-1, input.dim() - 1)",
        "and dim == -1",
        ("tests/core/test_softmax.py",),
        "softmax target: dim=ndim-1 (the last dim, named positively) not fixed",
    ),
    Mutant(
        "T02",
        "attnpatch/targets/torch_softmax.py",
        " or not known.issuperset(kwargs):",
        ":",
        ("tests/core/test_softmax.py",),
        "softmax target swallows an unknown keyword argument instead of torch's error",
    ),
    Mutant(
        "T03",
        "attnpatch/targets/torch_sdpa.py",
        "backward = torch.is_grad_enabled() and (",
        "backward = False and (",
        ("tests/core/test_general_path.py", "tests/core/test_sdpa.py"),
        "sdpa target never gives fully masked rows a key before a backward (0 * NaN in gradients)",
    ),
    Mutant(
        "T04",
        "attnpatch/targets/torch_mha.py",
        "rows = per_head_rows.amin(1)",
        "rows = per_head_rows.amax(1)",
        ("tests/core/test_mha.py", "tests/core/test_general_path.py"),
        "native MHA: a row masked in some heads only is cleared as if masked in all",
    ),
    Mutant(
        "T05",
        "attnpatch/targets/torch_transformer.py",
        "return masks.native_rows_per_head(head_rows, mask_type).amax(1)",
        "return masks.native_rows_per_head(head_rows, mask_type).amin(1)",
        ("tests/core/test_transformer.py", "tests/core/test_general_path.py"),
        "encoder layer: a row masked in some heads only keeps its NaN",
    ),
    Mutant(
        "T06",
        "attnpatch/targets/hf_attention.py",
        "safe_mask = mask.masked_fill(rows.unsqueeze(-1), masks.NEG_INF)",
        "safe_mask = mask",
        ("tests/hf/test_eager_models.py", "tests/hf/test_attention.py"),
        "eager: rows marked with the lowest finite value are not turned to -inf (pad rows not zeroed)",
    ),
    Mutant(
        "T07",
        "attnpatch/targets/hf_attention.py",
        '    if any(names[i - 2 : i] != ["nn", "functional"] for i in softmaxes):\n',
        "    if False:\n",
        ("tests/hf/test_eager_models.py",),
        "eager: functions whose softmax the safe copy cannot reach (gpt_oss's F.softmax) are patched anyway",
    ),
    Mutant(
        "T08",
        "attnpatch/targets/hf_attention.py",
        '== "sdpa" and mask.dtype == torch.bool and _sdpa_fixes_it(',
        '== "sdpa" and _sdpa_fixes_it(',
        ("tests/hf/test_attention.py",),
        "transformers' sdpa: float masks passed through as if torch's kernel fixed them (rows of the lowest value)",
    ),
    Mutant(
        "T09",
        "attnpatch/targets/hf_tokenizer.py",
        '    if "padding_side" not in kwargs:\n',
        "    if True:\n",
        ("tests/hf/test_tokenizer.py",),
        "tokenizer target overrides the caller's own padding_side",
    ),
]


def export_tree(destination: Path, rev: str | None) -> None:
    """The tracked files of ``rev`` (git archive), or of the working tree as they
    are now (``rev`` None: uncommitted and untracked, not ignored, files too)."""
    if rev is not None:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
        return
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[str, str, float]:
    """(outcome, detail, seconds): outcome 'passed', 'failed', 'timeout' or 'no test'."""
    shutil.rmtree(tree / ".hypothesis", ignore_errors=True)  # no failing example replayed from a previous mutant
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    env["PYTHONPATH"] = str(tree)  # the copy's attnpatch, ahead of the editable install
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {TIMEOUT} s", time.monotonic() - started
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    if result.returncode == 0:
        if not re.search(r"\b\d+ passed", output):
            return "no test", "every test skipped or deselected", seconds
        return "passed", "", seconds
    failing = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)
    detail = failing.group(1) if failing else (output.strip().splitlines() or ["?"])[-1]
    return "failed", detail, seconds


def check_copy(tree: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    where = subprocess.run(
        [sys.executable, "-c", "import attnpatch; print(attnpatch.__file__)"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"the copy's attnpatch is not the one imported ({where}); nothing would be mutated")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--rev", default="HEAD", help="commit to test (default HEAD)")
    parser.add_argument("--worktree", action="store_true", help="the working tree as it is, not a commit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unchanged copy")
    parser.add_argument("--report", type=Path, help=f"where to write the report (default, full runs: {REPORT})")
    options = parser.parse_args()

    chosen = [m for m in MUTANTS if not options.ids or m.id in options.ids]
    if options.list:
        for m in chosen:
            print(f"{m.id}  {m.file}: {m.what}\n      tests: {' '.join(m.tests)}")
        return 0
    unknown = set(options.ids) - {m.id for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s): {sorted(unknown)}")
    report_path = options.report or (REPORT if not options.ids else None)
    rev = None if options.worktree else options.rev
    source = (
        "the working tree"
        if rev is None
        else (
            rev
            + " = "
            + subprocess.run(
                ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
            ).stdout.strip()
        )
    )

    started = time.monotonic()
    tree = Path(tempfile.mkdtemp(prefix="attnpatch-mutation-"))
    rows = []
    try:
        export_tree(tree, rev)
        check_copy(tree)
        print(f"mutation run of {source} in {tree}", flush=True)
        if not options.no_baseline:
            every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            outcome, detail, seconds = run_tests(tree, every_test)
            print(f"baseline: {outcome} in {seconds:.0f} s {detail}", flush=True)
            if outcome != "passed":
                print("the unchanged copy fails its tests: fix that first", file=sys.stderr)
                return 2
        for m in chosen:
            path = tree / m.file
            pristine = path.read_text()
            if pristine.count(m.old) != 1:
                rows.append((m, "stale", f"the text to mutate occurs {pristine.count(m.old)} times", 0.0))
            else:
                path.write_text(pristine.replace(m.old, m.new))
                try:
                    outcome, detail, seconds = run_tests(tree, m.tests)
                finally:
                    path.write_text(pristine)
                verdict = {"failed": "killed", "timeout": "killed", "passed": "survived"}.get(outcome, outcome)
                rows.append((m, verdict, detail, seconds))
            m_row = rows[-1]
            print(f"{m.id}: {m_row[1]:8} {m_row[3]:5.0f} s  {m_row[2]}", flush=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)

    elapsed = time.monotonic() - started
    text = render(rows, source, elapsed)
    if report_path:
        report_path.write_text(text)
        print(f"report: {report_path}")
    else:
        print(text)
    bad = [m.id for m, verdict, _, _ in rows if verdict != "killed" and not (verdict == "survived" and m.harmless)]
    if bad:
        print(f"unexplained: {' '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def render(rows: list, source: str, elapsed: float) -> str:
    import platform

    import torch

    try:
        import transformers

        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}, no transformers"
    counts = {
        v: sum(1 for _, verdict, _, _ in rows if verdict == v) for v in ("killed", "survived", "stale", "no test")
    }
    lines = [
        "# Mutation run",
        "",
        f"`python tools/mutation/run.py` on {source}; {versions}, Python {platform.python_version()}.",
        f"{len(rows)} mutants: {counts['killed']} killed, {counts['survived']} survived"
        + (f", {counts['stale']} stale" if counts["stale"] else "")
        + (f", {counts['no test']} ran no test" if counts["no test"] else "")
        + f"; {elapsed / 60:.1f} min in all (baseline included).",
        "",
        "| mutant | file | what it breaks | result | killed by / why harmless | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m, verdict, detail, seconds in rows:
        why = (
            ("harmless, see below" if m.harmless else "a hole, see below" if m.hole else detail)
            if verdict == "survived"
            else detail
        )
        lines.append(
            f"| {m.id} | {m.file.removeprefix('attnpatch/')} | {m.what} | {verdict} | {_cell(why)} | {seconds:.0f} |"
        )
    survivors = [(m, verdict, detail) for m, verdict, detail, _ in rows if verdict != "killed"]
    lines += ["", "## Not killed", ""]
    if not survivors:
        lines.append("None: every mutant was killed.")
    for m, verdict, detail in survivors:
        if m.harmless:
            lines.append(f"- {m.id}, harmless: {m.harmless}.")
        elif m.hole:
            lines.append(f"- {m.id}, a hole: {m.hole}.")
        elif verdict == "stale":
            lines.append(f"- {m.id}, stale ({detail}): update its text to the code as it is now.")
        elif verdict == "no test":
            lines.append(f"- {m.id}, ran no test ({detail}): run it where its tests can run.")
        else:
            lines.append(f"- {m.id}, unexplained: add a test that kills it, or say why it is harmless.")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return f"`{text}`" if text.startswith("tests/") else text.replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
