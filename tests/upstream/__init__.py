"""PyTorch's own tests of SDPA, nn.MultiheadAttention and the attention-bias API,
run from a PyTorch source checkout first without attnpatch, then with it (every
default target, through ``pytest --attnpatch``), and compared test by test.

    python -m tests.upstream --src PYTORCH_CHECKOUT   # or: make upstream

The test files are PyTorch's (BSD-3-Clause), read from the checkout at run time:
none of them is copied into this repository. ``--fetch`` makes a sparse clone of
the release tag of the installed torch when the checkout is missing (network).
Which files run, and which tests are left out or expected to differ (each with
why), is in ``suite.py``.
"""
