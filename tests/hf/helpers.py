"""Tiny random Llama / Qwen2 models and a tiny in-memory tokenizer: no downloads."""

from __future__ import annotations

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

PAD, BOS, EOS = 0, 1, 2
VOCAB = 64
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Beijing", "is", "the", "capital", "of", "Apple"]


def tiny_model(kind: str = "llama", attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A 2-layer random decoder. The config has no pad_token_id on purpose: the pad
    token then has a random (not zero) embedding, so a pad query row that attends
    to pad keys gets a non-zero output unless attnpatch zeroes it."""
    config_class, model_class = MODELS[kind]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def left_padded(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def right_padded(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    return ids, mask


def save_tiny_tokenizer(directory: str, padding_side: str = "right", words: list[str] = WORDS) -> str:
    """A word-level tokenizer over ``words`` (the first four: pad, bos, eos, unk),
    saved as a right-padding tokenizer (like Qwen2's), to be loaded back with
    AutoTokenizer.from_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
    tokenizer.save_pretrained(directory)
    return directory


# Small settings every causal-LM config below accepts (unknown keys are kept as
# plain attributes), plus what some architectures need on top.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=None,
    tie_word_embeddings=False,
)
TINY_EXTRA = {
    "gpt_neox": dict(rotary_pct=1.0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gemma2": dict(query_pre_attn_scalar=8, sliding_window=64),
    "gemma3_text": dict(query_pre_attn_scalar=8, sliding_window=64),
}


def tiny_causal_lm(model_type: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A 2-layer random causal LM of any architecture transformers knows by
    ``model_type`` (``"mistral"``, ``"gpt_neox"``, ...), like ``tiny_model``."""
    config = transformers.AutoConfig.for_model(model_type, **TINY, **TINY_EXTRA.get(model_type, {}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model
