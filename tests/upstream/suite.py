"""Which of PyTorch's own test files run, and which of their tests are left out or
expected to differ, each with why. Node ids are relative to the checkout's test/
folder; an entry also covers every test under it (as pytest's --deselect does)."""

# The attention-bias API (TestAttnBias), SDPA (TestSDPA, TestSDPAFailureModes),
# nn.MultiheadAttention and the transformer layers (TestTransformers,
# test_multihead_attention.py) and the SDPA backend registry. The other files of
# test/nn/attention (FlashAttention 3/4, cuDNN) are CUDA-only.
FILES = (
    "test_transformers.py",
    "nn/test_multihead_attention.py",
    "nn/attention/test_open_registry.py",
)

# Files the tests above import from test/ in some releases; fetched with them.
HELPERS = ("test_cpp_extensions_open_device_registration.py",)

# Left out of both runs.
OUT_OF_SCOPE = {
    # Builds a C++ extension (ninja, test/cpp_extensions) that registers a fake
    # PrivateUse1 device; it tests dispatch to that device's kernel, not attention
    # on CPU, and cannot build without PyTorch's source tree and a compiler.
    "test_transformers.py::TestSDPAPrivateUse1Only": "builds a C++ extension for a fake PrivateUse1 device",
}

# Pass without attnpatch only because they expect NaN on fully masked rows, or
# compare with a reference that is NaN there, where attnpatch gives 0 by design
# (README, "The contract"). They run in both runs and must differ.
NAN_ASSERTING = {
    # Compare F.multi_head_attention_forward (need_weights=True) with a NumPy
    # reference whose softmax is NaN on rows where attn_mask and key_padding_mask
    # leave no key, through np.testing.assert_allclose, which counts NaN == NaN as
    # equal; under attnpatch those rows are out_proj(0) and their weights 0.
    "nn/test_multihead_attention.py::TestMultiheadAttentionNN::test_multihead_attention_average_attn_weights_False": "NumPy reference is NaN on fully masked rows (assert_allclose, NaN == NaN)",
    "nn/test_multihead_attention.py::TestMultiheadAttentionNN::test_multihead_attention_average_attn_weights_True": "NumPy reference is NaN on fully masked rows (assert_allclose, NaN == NaN)",
}
