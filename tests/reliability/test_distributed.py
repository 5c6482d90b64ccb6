"""Issue 5.1: a real gloo DDP job (2 spawned ranks), DataLoader workers started
with ``spawn`` and plain subprocesses, activated only by ``ATTNPATCH=1`` in the
environment (the .pth hook). Each job runs once without the variable to show
the NaN, and once with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _env(activate: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    if activate:
        env["ATTNPATCH"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(script: str, *args: str, activate: bool) -> str:
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        env=_env(activate),
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module", params=[False, True], ids=["ATTNPATCH-unset", "ATTNPATCH=1"])
def ddp_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _run("_ddp_job.py", str(out), activate=request.param)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return request.param, ranks, torch.load(out / "single.pt")


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_ddp_job(ddp_run):
    activated, ranks, single = ddp_run
    for rank, result in enumerate(ranks):
        assert result["probe"]["env"] == ("1" if activated else None)
        expected = "installed" if activated else "off"
        assert result["probe"]["states"]["mha"] == expected
        assert result["probe"]["states"]["transformer"] == expected
        losses = result["losses"]
        grads = [g for step in result["grads"] for g in step.values()]
        if not activated:
            # The bug, first: left padding + causal mask poisons the loss on every rank.
            assert not _finite(*losses)
            assert not _finite(*grads)
            assert not _finite(result["eval"])
            continue
        assert _finite(*losses, *grads, *result["params"].values(), result["eval"])
        # Bitwise the single-process run on the same data (DDP averages g0/2 + g1/2).
        for step in range(len(losses)):
            assert torch.equal(losses[step], single["losses"][rank][step])
            for name, grad in result["grads"][step].items():
                assert torch.equal(grad, single["grads"][step][name]), name
        for name, param in result["params"].items():
            assert torch.equal(param, single["params"][name]), name
        assert torch.equal(result["eval"], single["eval"][rank])


@pytest.mark.parametrize("activate", [False, True], ids=["ATTNPATCH-unset", "ATTNPATCH=1"])
def test_spawned_workers_and_subprocesses_inherit_activation(activate):
    report = json.loads(_run("_env_probe.py", activate=activate).strip().splitlines()[-1])
    for where in ("main", "spawn_worker", "subprocess"):
        assert report[where] == {"nan": not activate, "mha": "installed" if activate else "off"}, where
