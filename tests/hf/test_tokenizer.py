"""Target hf_tokenizer, and the seed scenario end to end."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import attnpatch
from tests.hf.helpers import save_tiny_tokenizer, tiny_model

SEED_PROMPTS = ["Beijing is the capital of", "Apple"]


@pytest.fixture
def tokenizer_dir(tmp_path):
    return save_tiny_tokenizer(str(tmp_path / "tok"), padding_side="right")


def test_loads_pad_left_while_active(tokenizer_dir):
    with attnpatch.patched():
        assert AutoTokenizer.from_pretrained(tokenizer_dir).padding_side == "left"
        # An explicit choice wins.
        assert AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="right").padding_side == "right"
    assert AutoTokenizer.from_pretrained(tokenizer_dir).padding_side == "right"
    attnpatch.apply(hf_tokenizer=False)
    assert AutoTokenizer.from_pretrained(tokenizer_dir).padding_side == "right"
    attnpatch.apply()
    assert AutoTokenizer.from_pretrained(tokenizer_dir).padding_side == "left"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_seed_scenario(tokenizer_dir, kind):
    model = tiny_model(kind, "sdpa")

    def generate(batch):
        return model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
        )

    with attnpatch.patched():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        alone = [generate(tokenizer([p], return_tensors="pt"))[0, -6:].tolist() for p in SEED_PROMPTS]
        batch = tokenizer(SEED_PROMPTS, padding=True, return_tensors="pt")
        together = generate(batch)[:, -6:].tolist()
    assert together == alone
