"""Target ``hf_attention``: placeholder until implemented (no patch points yet)."""

POINTS: list = []
