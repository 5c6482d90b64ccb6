"""The benchmark suite runs end to end in --quick mode and writes its results.

No timing is asserted: this machine's load decides the figures, not the code.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROW_KEYS = {
    "group",
    "case",
    "shape",
    "dtype",
    "variant",
    "median_ms",
    "unpatched_ms",
    "ratio",
    "ratio_q1",
    "ratio_q3",
    "target",
    "meets_target",
    "peak_mem_ratio",
    "repeats",
    "note",
}
META_KEYS = {"device", "torch", "transformers", "attnpatch", "python", "date", "mode"}
OVERHEAD_KEYS = {
    "wrapper_no_mask_us",
    "import_attnpatch_ms",
    "startup_with_hook_ms",
    "startup_without_hook_ms",
    "startup_delta_ms",
    "in_process_hook_us",
    "general_path_mask_reused_us",
    "general_path_mask_per_call_us",
}


def test_quick_run_writes_json_and_markdown(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[1/" in done.stdout  # progress is shown

    result = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert META_KEYS <= set(result["meta"])
    assert result["meta"]["device"] == "cpu" and result["meta"]["mode"] == "quick"
    assert OVERHEAD_KEYS <= set(result["overheads"])
    rows = result["rows"]
    assert rows and all(ROW_KEYS <= set(row) for row in rows)
    assert {"sdpa", "mha", "transformer", "general", "compiled"} <= {row["group"] for row in rows}
    assert any(row["variant"] == "patched-general-path" for row in rows)
    assert all(row["ratio"] > 0 and row["median_ms"] > 0 for row in rows)
    assert any(row["variant"].startswith("workaround") for row in rows)

    table = (tmp_path / "cpu-quick.md").read_text()
    assert "| group | case |" in table and "wrapper cost per call" in table and "added per masked SDPA call" in table
    assert result["meta"]["torch"] in table


def test_cuda_request_without_cuda_is_skipped_cleanly(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cuda", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0
    assert "no CUDA" in done.stderr
    assert not list(tmp_path.iterdir())


def test_floor_variant_gives_the_general_paths_output_bit_for_bit():
    """The floor is the least the general path can cost only if it does the same
    work: the same output, fully masked rows +0.0, every other bit as the kernel's."""
    import torch

    from benchmarks import cases, run
    from benchmarks.cases import FLOOR, GENERAL_PATH

    try:
        for case in cases.general_sdpa_cases("cpu", quick=True):
            outputs = {}
            for variant in (GENERAL_PATH, FLOOR):
                run.switch(variant)
                outputs[variant] = case.variants[variant]()
            run.switch(cases.BASELINE)
            floor = outputs[FLOOR]
            assert floor.view(torch.int32).eq(0).all(-1).any()  # some rows were cleared
            assert torch.equal(floor.view(torch.int32), outputs[GENERAL_PATH].view(torch.int32))
    finally:
        run.switch(cases.BASELINE)
