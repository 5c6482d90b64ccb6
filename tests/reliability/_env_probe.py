"""Run by test_distributed.py as ``python _env_probe.py``. Reports, as one JSON
line, whether nn.MultiheadAttention gives NaN on a left-padded causal batch in
this process, in a DataLoader worker started with ``spawn``, and in a plain
``subprocess`` child that inherits the environment unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset


def nan_in_mha() -> dict:
    import attnpatch

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(2, 3, 4, requires_grad=True)
    causal = torch.ones(3, 3, dtype=torch.bool).triu(1)
    pad = torch.tensor([[True, False, False], [False, False, False]])
    out, weights = mha(x, x, x, attn_mask=causal, key_padding_mask=pad)
    out[:, -1].sum().backward()  # only valid rows in the loss
    return {
        "nan": bool(out.isnan().any() or weights.isnan().any() or x.grad.isnan().any()),
        "mha": attnpatch.status()["mha"]["state"],
    }


class Probe(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> str:
        return json.dumps(nan_in_mha())


if __name__ == "__main__":
    torch.set_num_threads(1)
    loader = DataLoader(Probe(), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    (worker,) = list(loader)
    child = subprocess.run(
        [sys.executable, "-c", "import json, _env_probe; print(json.dumps(_env_probe.nan_in_mha()))"],
        check=True,
        capture_output=True,
        text=True,
        cwd=sys.path[0],
    )
    print(
        json.dumps(
            {
                "main": nan_in_mha(),
                "spawn_worker": json.loads(worker),
                "subprocess": json.loads(child.stdout.strip().splitlines()[-1]),
            }
        )
    )
