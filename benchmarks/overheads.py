"""6. Costs that have nothing to do with tensors: the wrapper itself, importing
attnpatch, and the ``.pth`` start-up hook."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attnpatch

PTH = Path(attnpatch.__file__).with_name("attnpatch.pth")


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ATTNPATCH", None)
    return env


def _run_ms(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1e3


def import_time_ms(runs: int) -> float:
    """Median wall time of ``import attnpatch`` in a fresh interpreter (measured
    inside it, so interpreter start-up is excluded)."""
    code = "import time; t = time.perf_counter(); import attnpatch; print(time.perf_counter() - t)"
    times = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", code], env=_clean_env(), check=True, capture_output=True, text=True
        ).stdout
        times.append(float(out) * 1e3)
    return statistics.median(times)


def pth_hook_cost(runs: int) -> dict[str, float]:
    """What the ``.pth`` line adds to start-up with ``ATTNPATCH`` unset.

    attnpatch is installed in this interpreter, so its hook cannot be taken out of
    site-packages without disturbing other processes. Instead both arms start
    ``python -S`` (no site), run the normal ``site.main()`` and then
    ``site.addsitedir`` on a temporary directory that holds a copy of
    ``attnpatch.pth`` (hook present) or nothing (hook absent). The runs go in
    pairs, one of each arm in alternating order; the median of the pairs'
    differences is the hook's cost (a shared machine's start-up times drift by
    more than the hook costs, so unpaired medians swing either way). The in-process
    figure is the time to process the same directory with ``site.addsitedir``
    minus an empty one, averaged over many calls.
    """
    with tempfile.TemporaryDirectory() as tmp:
        with_hook, without_hook = Path(tmp, "with"), Path(tmp, "without")
        with_hook.mkdir()
        without_hook.mkdir()
        shutil.copy(PTH, with_hook / PTH.name)
        env = _clean_env()
        code = "import site, sys; site.main(); site.addsitedir(sys.argv[1])"
        arms: dict[str, list[float]] = {"with": [], "without": []}
        for i in range(runs):
            order = ("with", "without") if i % 2 == 0 else ("without", "with")
            for arm in order:
                directory = with_hook if arm == "with" else without_hook
                arms[arm].append(_run_ms([sys.executable, "-S", "-c", code, str(directory)], env))
        startup_with = statistics.median(arms["with"])
        startup_without = statistics.median(arms["without"])
        startup_delta = statistics.median(a - b for a, b in zip(arms["with"], arms["without"]))

        import site

        saved = os.environ.pop("ATTNPATCH", None)
        try:
            in_process = {}
            for arm, directory in (("with", with_hook), ("without", without_hook)):
                n = 2000
                start = time.perf_counter()
                for _ in range(n):
                    site.addsitedir(str(directory), set())  # a fresh known-paths set each time
                in_process[arm] = (time.perf_counter() - start) / n * 1e6
        finally:
            if saved is not None:
                os.environ["ATTNPATCH"] = saved
            for directory in (with_hook, without_hook):
                while str(directory) in sys.path:
                    sys.path.remove(str(directory))
    return {
        "startup_with_hook_ms": startup_with,
        "startup_without_hook_ms": startup_without,
        "startup_delta_ms": startup_delta,
        "in_process_hook_us": in_process["with"] - in_process["without"],
    }
