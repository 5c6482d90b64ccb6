"""``python -m attnpatch.demo`` (``make demo``): both bugs without attnpatch, and the fix.

1. NaN. A batch of two sequences of length 5; the first is left-padded by 2
   tokens. With a causal mask, its queries 0 and 1 may only see pad keys, so
   their rows of attention scores are all ``-inf`` and softmax turns them into
   NaN. Each reproduction runs without attnpatch, then inside ``attnpatch.patched()``.
2. Right padding. A tokenizer that pads on the right (as Qwen2's does) makes a
   decoder-only model's batched ``generate()`` continue after the pads: a short
   prompt decodes differently than alone. attnpatch re-aligns the batch
   (``hf_generate``), and tokenizers loaded while it is on pad on the left
   (``hf_tokenizer``), which fixes the batch on its own.

Tiny random models, no downloads; a few seconds on CPU.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

import attnpatch
from attnpatch.doctor import quiet

EMBED, HEADS, SEQ = 16, 2, 5
PAD = torch.tensor([[True, True, False, False, False], [False] * 5])  # True = pad key
CAUSAL = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)  # True = may not attend
VALID = ~PAD  # here the fully masked query rows are exactly the pad positions


def describe_nan(name: str, t: torch.Tensor) -> str:
    """Where ``t`` (batch, position, ...) holds NaN: pad rows, and valid rows it spread to."""
    rows = t.isnan().flatten(2).any(-1)
    pad, valid = int(rows[PAD].sum()), int(rows[VALID].sum())
    return f"{name} NaN in {pad} pad + {valid} valid rows" if pad + valid else f"{name} finite"


def mha_need_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    x = torch.randn(2, SEQ, EMBED, requires_grad=True)
    out, weights = mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)  # need_weights=True is the default
    out[VALID].sum().backward()  # the loss ignores the pad rows
    return {"output": out.detach(), "weights": weights.detach(), "grad": x.grad}


def mha_fast_path() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True).eval()
    x = torch.randn(2, SEQ, EMBED)
    with torch.no_grad():  # eval + no_grad: PyTorch's fused native kernel
        out, _ = mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL, need_weights=False)
    return {"output": out}


def encoder_inference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, SEQ, EMBED)
    with torch.no_grad():
        return {"output": encoder(x, mask=CAUSAL, src_key_padding_mask=PAD)}


def show(title: str, reproduction) -> bool:
    before = reproduction()
    with attnpatch.patched():
        after = reproduction()
    print(title)
    print("  without attnpatch: " + ", ".join(describe_nan(k, v) for k, v in before.items()))
    print("  with attnpatch:    " + ", ".join(describe_nan(k, v) for k, v in after.items()))
    finite = all(bool(v.isfinite().all()) for v in after.values())
    # Whatever was finite without attnpatch must be bitwise the same with it.
    same = all(torch.equal(before[k][before[k].isfinite()], after[k][before[k].isfinite()]) for k in before)
    print(f"                     values that were finite before are bitwise identical: {same}")
    return finite and same


# --- 2. right padding and batched generate() --------------------------------------

WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "Beijing",
    "is",
    "the",
    "capital",
    "of",
    "China",
    "Apple",
    "makes",
    "phones",
    "and",
    "a",
    "city",
    "in",
    "north",
    "big",
    "old",
    "new",
    "river",
    "tea",
    "green",
]
PROMPTS = ["Beijing is the capital of China and", "Apple"]
NEW_TOKENS = 4


def save_right_padding_tokenizer(directory: str) -> None:
    """A word-level tokenizer over WORDS that pads on the right, as Qwen2's does."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    ).save_pretrained(directory)


def tiny_decoder() -> torch.nn.Module:
    """A 2-layer random Llama-style decoder over WORDS (the pad token has a random
    embedding, as in a real checkpoint whose pad token is an ordinary token)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def decode(model: torch.nn.Module, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy continuations of ``prompts``, batched in one generate() call."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)  # type: ignore[operator]
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :])


def right_padding() -> bool:
    import transformers

    with tempfile.TemporaryDirectory() as directory, quiet():
        save_right_padding_tokenizer(directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        model = tiny_decoder()
        alone = [decode(model, tokenizer, [prompt])[0] for prompt in PROMPTS]
        before = decode(model, tokenizer, PROMPTS)
        with attnpatch.patched():
            after = decode(model, tokenizer, PROMPTS)
        # hf_tokenizer alone: load the tokenizer while it is on; generate() stays unpatched.
        with attnpatch.patched("hf_tokenizer"):
            left_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        tokenizer_only = decode(model, left_tokenizer, PROMPTS)

    print(
        f"Batched generate() of a tiny random decoder, greedy, {NEW_TOKENS} new tokens; the tokenizer "
        f"pads on the {tokenizer.padding_side}, like Qwen2's"
    )
    width = max(len(p) for p in PROMPTS) + 2
    for row, prompt in enumerate(PROMPTS):
        print(f"  {repr(prompt):{width}s} alone: {alone[row]!r}")
        for label, got in (("batched, without attnpatch", before), ("batched, with attnpatch", after)):
            verdict = "same as alone" if got[row] == alone[row] else "DIFFERENT from alone"
            print(f"  {'':{width}s}   {label + ':':28s} {got[row]!r}  ({verdict})")
    print(
        f"  the tokenizer target on its own: loaded while attnpatch is on, the tokenizer pads on the "
        f"{left_tokenizer.padding_side}; batched with it, generate() unpatched decodes "
        + ("every row as alone" if tokenizer_only == alone else f"{tokenizer_only!r}, not as alone")
    )
    broken = before != alone
    fixed = after == alone and tokenizer_only == alone and left_tokenizer.padding_side == "left"
    return broken and fixed


def main() -> int:
    print(f"torch {torch.__version__}, attnpatch {attnpatch.__version__}\n")
    print("1. Fully masked rows: batch of 2, row 0 left-padded by 2, causal mask\n")
    results = [
        show("nn.MultiheadAttention(need_weights=True), training, loss on valid rows only", mha_need_weights),
        show("nn.MultiheadAttention fast path (eval + no_grad)", mha_fast_path),
        show("nn.TransformerEncoder, 2 layers (eval + no_grad, fused kernel)", encoder_inference),
    ]
    print("\n2. Right padding\n")
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("  (skipped: transformers is not installed; pip install 'attnpatch[hf]')")
    else:
        results.append(right_padding())
    ok = all(results)
    print(
        "\nok: attnpatch removed every NaN, and every row decodes as it would alone"
        if ok
        else "\nFAILED: attnpatch left something broken"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
