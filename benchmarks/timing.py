"""Timing and peak-memory helpers: interleaved, warmed-up, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    *,
    switch: Callable[[str], None],
    device: str,
    budget_s: float,
    min_repeats: int,
    max_repeats: int,
    warmup: int = 2,
    min_sample_s: float = 0.02,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per variant per repeat.

    ``switch(name)`` puts the process in the state the variant needs (attnpatch
    on or off); it is called outside the timed region. Variants alternate within
    every repeat, and the order flips each repeat, so slow drifts of a shared
    machine hit all of them alike. A sample loops the call until it lasts
    ``min_sample_s`` so that tiny calls are not lost in timer noise. As many
    repeats as fit in ``budget_s``, within ``[min_repeats, max_repeats]``.
    """
    inner: dict[str, int] = {}
    once_s: dict[str, float] = {}
    for name, fn in variants.items():
        switch(name)
        for _ in range(warmup):
            fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        once = max(time.perf_counter() - start, 1e-7)
        inner[name] = max(1, min(10_000, int(min_sample_s / once)))
        once_s[name] = once

    per_repeat = sum(once_s[name] * inner[name] for name in variants)
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(per_repeat, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            fn, n = variants[name], inner[name]
            switch(name)
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Interquartile range over the median: how noisy a set of samples is."""
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / statistics.median(values)


def paired_ratio(patched: list[float], baseline: list[float]) -> float:
    """Median over repeats of patched/baseline from the same repeat: robust to load
    that comes and goes on a shared machine."""
    return statistics.median(p / b for p, b in zip(patched, baseline))


def paired_ratio_quartiles(patched: list[float], baseline: list[float]) -> tuple[float, float]:
    """First and third quartile of the per-repeat ratios: the spread of the figure."""
    ratios = [p / b for p, b in zip(patched, baseline)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    quartiles = statistics.quantiles(ratios, n=4)
    return quartiles[0], quartiles[2]


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Peak bytes the allocator held while ``fn`` ran (CUDA: allocator stats; CPU:
    the profiler's memory timeline, which counts the tensors the call touched)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max((sum(s) for s in sizes), default=0)
