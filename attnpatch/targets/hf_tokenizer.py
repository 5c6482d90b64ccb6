"""Target ``hf_tokenizer``: placeholder until implemented (no patch points yet)."""

POINTS: list = []
