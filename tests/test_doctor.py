"""``attnpatch doctor``: the reproductions of this machine, without then with attnpatch."""

import json
import os
import subprocess
import sys

import pytest

import attnpatch
from attnpatch import doctor

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def report():
    """One real run of ``python -m attnpatch doctor --json`` (about 10 s on CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    result = subprocess.run(
        [sys.executable, "-m", "attnpatch", "doctor", "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    return result


def rows_of(report):
    return {(row["case"], row["where"]): row for row in json.loads(report.stdout)["cases"]}


def test_doctor_reproduces_the_nan_on_cpu_and_attnpatch_fixes_it(report):
    assert report.returncode == 0, report.stderr
    rows = rows_of(report)
    for case in ("MHA need_weights=True", "MHA fast path (eval, no_grad)", "TransformerEncoder inference"):
        assert (rows[case, "cpu"]["unpatched"], rows[case, "cpu"]["patched"]) == ("NaN", "ok")
    # CPU SDPA is safe in torch 2.13: "unpatched ok" is the right answer there.
    assert rows["F.scaled_dot_product_attention", "cpu/math"]["unpatched"] == "ok"
    assert all(row["patched"] in ("ok", "-") for row in rows.values())


def test_doctor_covers_transformers(report):
    pytest.importorskip("transformers")
    rows = rows_of(report)
    assert (
        rows["Qwen2 right-padded generate", "cpu/sdpa"]["unpatched"],
        rows["Qwen2 right-padded generate", "cpu/sdpa"]["patched"],
    ) == ("wrong", "ok")
    # Eager attention averages over pad keys instead of giving 0 (finite, not the contract).
    assert rows["Llama left-padded forward", "cpu/eager"]["unpatched"] == "wrong"
    assert rows["Llama left-padded forward", "cpu/eager"]["patched"] == "ok"


def test_doctor_prints_versions_and_a_progress_line_per_case(report):
    data = json.loads(report.stdout)
    assert set(data["versions"]) >= {"python", "torch", "transformers", "wrapt", "cuda"}
    assert data["versions"]["torch"] == torch.__version__
    progress = [line for line in report.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == len(data["cases"])


def fake_case(name, run):
    return doctor.Case(name, "cpu", run)


def nan_always():
    return doctor.Check(nan=True)


def test_exit_code_is_1_when_a_case_is_still_broken(monkeypatch, capsys):
    def valid_rows_move():  # finite both times, but not the same valid rows
        return doctor.Check(nan=False, valid=[torch.tensor([1.0 + attnpatch.status()["sdpa"]["holders"]])])

    cases = [fake_case("still NaN", nan_always), fake_case("valid rows move", valid_rows_move)]
    monkeypatch.setattr(doctor, "build_cases", lambda devices: cases)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "still broken (NaN)" in out
    assert "still broken (valid rows changed)" in out
    assert "2 case(s) still broken" in out


def test_fixed_cases_exit_0(monkeypatch, capsys):
    def nan_unless_patched():
        return doctor.Check(nan=attnpatch.status()["sdpa"]["holders"] == 0)

    monkeypatch.setattr(doctor, "build_cases", lambda devices: [fake_case("fixed", nan_unless_patched)])
    assert doctor.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"][0] == {
        "case": "fixed",
        "where": "cpu",
        "unpatched": "NaN",
        "patched": "ok",
        "detail": "",
    }


def test_a_case_that_cannot_run_here_is_skipped_not_broken():
    def refuses():
        raise RuntimeError("No available kernel. Aborting execution.")

    row = doctor.diagnose(fake_case("backend", refuses))
    assert row["unpatched"] == "skipped (cannot run here)" and row["patched"] == "-"
    assert "No available kernel" in row["detail"]


def test_hf_cases_are_skipped_while_a_target_is_a_placeholder(monkeypatch):
    pytest.importorskip("transformers")
    from attnpatch.targets import hf_attention

    monkeypatch.setattr(hf_attention, "POINTS", [])
    cases = [c for c in doctor.build_cases(["cpu"]) if "left-padded forward" in c.name]
    assert cases and all(doctor.diagnose(c)["unpatched"] == "skipped (target not available)" for c in cases)
