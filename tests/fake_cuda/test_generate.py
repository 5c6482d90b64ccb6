"""Target hf_generate reads values on purpose: to re-align a right-padded batch
it must know each row's length, so it reads the padding mask (or the pad runs
of input_ids) on the host, once per generate() call, before decoding starts.
That sync is outside the hot path. Everything per token (the attention fix in
every layer of every step) adds none: counted on real CPU tensors with the
general path forced, patched against unpatched."""

import pytest
import torch

from .probe import general_path, trace

pytest.importorskip("transformers", reason="needs transformers")

from tests.hf.helpers import left_padded, right_padded, tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [14]]
READS_ALIGNMENT = ("targets/hf_generate.py", "masks.py")  # where re-alignment reads, by design
ALIGNMENT_FUNCTIONS = ("_realigned_call", "right_padding_lengths", "trailing_pad_lengths", "_generate_wrapper")


def _added_reads(model, ids, mask, new_tokens):
    def run():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )

    with torch.no_grad(), general_path():
        unpatched, _ = trace(run, patch=None)
        patched, _ = trace(run, patch="")
    return patched.read_ops() - unpatched.read_ops(), patched.reads_in_attnpatch()


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_reads_only_to_realign_once_per_call(attn, padding):
    model = tiny_model("llama", attn)
    ids, mask = (left_padded if padding == "left" else right_padded)(PROMPTS)
    added_short, where = _added_reads(model, ids, mask, 2)
    added_long, _ = _added_reads(model, ids, mask, 6)
    assert added_short, "re-alignment reads the padding: the comparison must see it"
    assert added_short == added_long, "reads per token: the hot path syncs"
    for op, location in where:
        assert location is not None and location.split(":")[0].endswith(READS_ALIGNMENT), (op, location)
        assert location.split()[-1] in ALIGNMENT_FUNCTIONS, (op, location)
