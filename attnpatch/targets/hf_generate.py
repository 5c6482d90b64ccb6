"""Target ``hf_generate``: placeholder until implemented (no patch points yet)."""

POINTS: list = []
