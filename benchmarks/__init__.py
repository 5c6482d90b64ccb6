"""Benchmarks: what attnpatch costs next to unpatched PyTorch and the usual workarounds.

Run ``python -m benchmarks.run`` (``--quick`` for a smoke run in seconds).
"""
