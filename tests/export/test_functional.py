"""attnpatch.functional in ONNX Runtime: a model calling the functions, exported
with attnpatch never applied, carries the fix (torch.export: tests/core/test_functional.py)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from tests.core.test_functional import B, E, L, _Model, _qkv
from tests.torch_baseline import unpatched_or_skip


def test_onnx_runtime():
    ort = pytest.importorskip("onnxruntime", reason="ONNX tests need the 'export' extra (onnxruntime)")
    pytest.importorskip("onnx", reason="ONNX tests need the 'export' extra (onnx)")
    pytest.importorskip("onnxscript", reason="ONNX tests need the 'export' extra (onnxscript)")
    model, inputs = _Model(), (_qkv()[0], torch.randn(B, L, E))
    expected = model(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the ONNX exporter reports every step
        try:
            # Nothing is patched here: where this torch cannot export the model
            # (torch 2.5 refuses module-level mask tensors), the test skips.
            program = unpatched_or_skip(
                lambda: torch.onnx.export(model, inputs, dynamo=True, verbose=False), "ONNX export of this case"
            )
        finally:
            logging.disable(level)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    for got, want in zip(session.run(None, feeds), expected):
        got = torch.from_numpy(got)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
