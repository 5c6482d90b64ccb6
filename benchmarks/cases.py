"""The benchmark cases. Each builds its inputs once and returns the variants to
time: ``unpatched`` (the baseline), ``patched`` (attnpatch on), and for some
cases the workarounds users write by hand, all on the same inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

BASELINE = "unpatched"
GENERAL_PATH = "patched-general-path"  # attnpatch on, masks.FORCE_GENERAL_PATH set (see run.switch)
TORCH_TARGETS_ONLY = "patched, torch targets only"  # sdpa, mha, transformer: no hf_* targets
SOFTMAX_ON = "patched, softmax target on"  # the opt-in target alone (default targets do not touch softmax)
# attnpatch off; the kernel, then by hand the one pass over its output that any fix
# reading no value on the host must make (row flags computed outside the timing):
# the least the general path can cost, measured beside it.
FLOOR = "floor: the output pass alone"


@dataclass
class Case:
    group: str
    name: str
    shape: str
    dtype: str
    variants: dict[str, Callable[[], object]]
    targets: dict[str, float] = field(default_factory=dict)  # variant -> max ratio
    notes: dict[str, str] = field(default_factory=dict)  # variant -> remark
    note: str = ""  # about the whole case (e.g. a reduced shape)
    memory: bool = False  # also measure peak memory of unpatched vs patched


def wants_patch(variant: str) -> bool:
    return variant.startswith("patched")


# ---------------------------------------------------------------- inputs


def left_padded_lengths(batch: int, seq_len: int) -> list[int]:
    """Real lengths from just under full down to 3/4 of the row: every row carries
    some padding (so even a batch of one has fully masked rows)."""
    return [seq_len - max(1, (seq_len // 4) * (b + 1) // batch) for b in range(batch)]


def keep_mask(batch: int, seq_len: int, *, left: bool = True) -> torch.Tensor:
    """(B, 1, L, L) SDPA mask, True = attend: causal plus padding. Left padding
    leaves the pad queries with no key (fully masked rows); right padding does not."""
    lengths = torch.tensor(left_padded_lengths(batch, seq_len))
    pos = torch.arange(seq_len)
    real = pos[None, :] >= (seq_len - lengths)[:, None] if left else pos[None, :] < lengths[:, None]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return causal[None, None] & real[:, None, None, :]


def key_padding(batch: int, seq_len: int) -> torch.Tensor:
    """(B, S) nn.MultiheadAttention key_padding_mask, True = pad, left padding."""
    lengths = torch.tensor(left_padded_lengths(batch, seq_len))
    return torch.arange(seq_len)[None, :] < (seq_len - lengths)[:, None]


def float_mask(keep: torch.Tensor, dtype: torch.dtype, fill: float) -> torch.Tensor:
    """The additive mask as users build it by hand: ``(1 - keep) * fill``, computed
    in ``dtype`` (so -1e8 overflows to -inf in float16, as it does for them)."""
    return (~keep).to(dtype) * fill


def unmask_unattended(mask: torch.Tensor, min_value: float) -> torch.Tensor:
    """transformers' old ``AttentionMaskConverter._unmask_unattended``: a row that
    is all ``min_value`` attends to everything instead (its output is then the
    mean of the values, not 0)."""
    return mask.mul(~torch.all(mask == min_value, dim=-1, keepdim=True))


def check_rows(out: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor) -> str:
    """How a workaround's output compares with the contract on the same inputs."""
    flagged = rows.unsqueeze(-1).expand_as(out)
    nan = bool(out.isnan().any())
    zero = bool((out[flagged] == 0).all())
    valid_equal = torch.equal(out[~flagged], reference[~flagged])
    return f"NaN={'yes' if nan else 'no'}, masked rows 0={'yes' if zero else 'no'}, valid rows bitwise={'yes' if valid_equal else 'no'}"


# ---------------------------------------------------------------- 1. SDPA and 5. workarounds

SDPA_SHAPES = [(8, 16, 128, 64), (8, 16, 512, 64), (4, 16, 1024, 64), (1, 32, 2048, 128)]


def sdpa_cases(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> list[Case]:
    batch, heads, seq_len, dim = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    keep = keep_mask(batch, seq_len).to(device)
    right = keep_mask(batch, seq_len, left=False).to(device)
    sdpa = lambda **kw: F.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731 - looked up per call
    masked_target = 1.10 if seq_len < 512 else 1.05
    label = "x".join(map(str, shape))
    dname = str(dtype).replace("torch.", "")
    rows = ~keep.any(-1)

    masked = Case(
        "sdpa",
        "left-padded causal mask (fully masked rows)",
        label,
        dname,
        {BASELINE: lambda: sdpa(attn_mask=keep), "patched": lambda: sdpa(attn_mask=keep)},
        targets={"patched": masked_target},
        memory=True,
    )
    min_value = torch.finfo(dtype).min
    workarounds = {
        "workaround: float mask -1e8": float_mask(keep, dtype, -1e8),
        "workaround: float mask finfo.min": float_mask(keep, dtype, min_value),
        "workaround: unmask unattended rows": unmask_unattended(float_mask(keep, dtype, min_value), min_value),
    }
    reference = sdpa(attn_mask=keep)
    for name, mask in workarounds.items():
        masked.variants[name] = (lambda m: lambda: sdpa(attn_mask=m))(mask)
        masked.notes[name] = "mask built once, outside the timing; " + check_rows(sdpa(attn_mask=mask), reference, rows)
    fp16_min = float_mask(keep, torch.float16, -1e8).min().item()
    masked.notes["workaround: float mask -1e8"] += (
        f"; the same mask in float16 holds {fp16_min}: the rows are fully masked (NaN-prone) again"
    )

    return [
        masked,
        Case(
            "sdpa",
            "no mask",
            label,
            dname,
            {BASELINE: lambda: sdpa(), "patched": lambda: sdpa()},
            targets={"patched": 1.01},
        ),
        Case(
            "sdpa",
            "is_causal only",
            label,
            dname,
            {BASELINE: lambda: sdpa(is_causal=True), "patched": lambda: sdpa(is_causal=True)},
            targets={"patched": 1.01},
        ),
        Case(
            "sdpa",
            "right-padded causal mask (no fully masked row)",
            label,
            dname,
            {BASELINE: lambda: sdpa(attn_mask=right), "patched": lambda: sdpa(attn_mask=right)},
            targets={"patched": 1.01},
        ),
    ]


# ---------------------------------------------------------------- 2. nn.MultiheadAttention


def mha_cases(seq_len: int, device: str, batch: int = 8, embed: int = 512, heads: int = 8) -> list[Case]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed, heads, batch_first=True, device=device)
    x = torch.randn(batch, seq_len, embed, device=device)
    pad = key_padding(batch, seq_len).to(device)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    pad_float = torch.zeros(pad.shape, device=device).masked_fill(pad, -1e8)
    causal_float = torch.zeros(causal.shape, device=device).masked_fill(causal, -1e8)
    label = f"B={batch} L={seq_len} E={embed} H={heads}"

    def train_step(need_weights: bool, kpm: torch.Tensor = pad, am: torch.Tensor = causal) -> Callable[[], object]:
        def step() -> object:
            mha.train()
            out, _ = mha(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
            out.sum().backward()
            grads = [p.grad for p in mha.parameters()]
            mha.zero_grad(set_to_none=True)
            return out.detach(), grads

        return step

    rows = (causal[None] | pad[:, None, :]).all(-1)  # (B, L) fully masked queries

    def outcome(step: Callable[[], object]) -> str:
        """How one call's output and gradients compare with the contract."""
        out, grads = step()
        nan = bool(out.isnan().any()) or any(bool(g.isnan().any()) for g in grads)
        bias_rows = torch.equal(out[rows], mha.out_proj.bias.detach().expand_as(out[rows]))
        return f"NaN in output or grads={'yes' if nan else 'no'}, masked rows = out_proj bias={'yes' if bias_rows else 'no'}"

    def infer(need_weights: bool) -> Callable[[], object]:
        def run() -> object:
            mha.eval()
            with torch.no_grad():
                return mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=need_weights)

        return run

    return [
        Case(
            "mha",
            "train fwd+bwd, need_weights=True",
            label,
            "float32",
            {
                BASELINE: train_step(True),
                "patched": train_step(True),
                "workaround: need_weights=False (PyTorch's own path)": train_step(False),
                "workaround: float masks -1e8": train_step(True, pad_float, causal_float),
            },
            targets={"patched": 1.05},
            memory=True,
            notes={
                "patched": "unpatched: " + outcome(train_step(True)),
                "workaround: need_weights=False (PyTorch's own path)": outcome(train_step(False)),
                "workaround: float masks -1e8": outcome(train_step(True, pad_float, causal_float)),
            },
        ),
        Case(
            "mha",
            "train fwd+bwd, need_weights=False",
            label,
            "float32",
            {BASELINE: train_step(False), "patched": train_step(False)},
            targets={"patched": 1.05},
        ),
        Case(
            "mha",
            "inference (eval, no_grad, fast path)",
            label,
            "float32",
            {BASELINE: infer(False), "patched": infer(False)},
            targets={"patched": 1.05},
            memory=True,
        ),
    ]


# ---------------------------------------------------------------- 3. nn.TransformerEncoder


def transformer_case(device: str, batch: int = 8, seq_len: int = 256, d_model: int = 512) -> Case:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model, 8, 4 * d_model, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).to(device).eval()
    x = torch.randn(batch, seq_len, d_model, device=device)
    pad = key_padding(batch, seq_len).to(device)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)

    def run() -> object:
        with torch.no_grad():
            return encoder(x, mask=causal, src_key_padding_mask=pad, is_causal=True)

    return Case(
        "transformer",
        "TransformerEncoder 6 layers inference, causal+padding",
        f"B={batch} L={seq_len} d={d_model}",
        "float32",
        {BASELINE: run, "patched": run},
        targets={"patched": 1.05},
        memory=True,
    )


# ---------------------------------------------------------------- 3b. the opt-in softmax target


def softmax_cases(device: str, quick: bool) -> list[Case]:
    """What the opt-in ``softmax`` target costs softmax-heavy code, mostly code
    with no fully masked row at all (where it can only cost)."""
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    batch, features, classes = (16, 64, 100) if quick else (256, 512, 1000)
    logits = randn(batch, classes)
    head = nn.Linear(features, classes).to(device)
    x, target = randn(batch, features), torch.randint(0, classes, (batch,), generator=gen).to(device)

    def classifier_inference() -> object:
        with torch.no_grad():
            return F.softmax(logits, dim=-1)

    def classifier_training_step() -> object:
        head.zero_grad(set_to_none=True)
        probs = head(x).softmax(-1)
        loss = -probs[torch.arange(batch, device=device), target].log().mean()
        loss.backward()
        return loss

    small = [randn(32, 64) for _ in range(100)]

    def softmax_loop() -> object:
        with torch.no_grad():
            return [torch.softmax(t, -1) for t in small]

    b, h, length, d = (2, 2, 32, 16) if quick else (8, 8, 128, 64)
    q, k, v = randn(b, h, length, d), randn(b, h, length, d), randn(b, h, length, d)
    left, right = ~keep_mask(b, length).to(device), ~keep_mask(b, length, left=False).to(device)

    def attention(drop: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                scores = (q @ k.transpose(-2, -1)) * d**-0.5
                return scores.masked_fill(drop, float("-inf")).softmax(-1) @ v

        return run

    def case(name: str, shape: str, fn: Callable[[], object], note: str = "") -> Case:
        return Case("softmax", name, shape, "float32", {BASELINE: fn, SOFTMAX_ON: fn}, note=note)

    return [
        case("classifier head, F.softmax (no_grad)", f"{batch}x{classes}", classifier_inference),
        case(
            "classifier head, Linear + Tensor.softmax + NLL, forward and backward",
            f"{batch}x{features}->{classes}",
            classifier_training_step,
        ),
        case("plain loop of 100 torch.softmax calls (no_grad)", "100 x 32x64", softmax_loop),
        case("hand-written attention, right-padded (no fully masked row)", f"{b}x{h}x{length}x{d}", attention(right)),
        case(
            "hand-written attention, left-padded (fully masked rows fixed)",
            f"{b}x{h}x{length}x{d}",
            attention(left),
            note="unpatched gives NaN rows here; patched gives 0",
        ),
    ]


# ---------------------------------------------------------------- 4. transformers models


def hf_cases(device: str, quick: bool) -> list[Case]:
    import transformers

    from attnpatch.targets import hf_attention, hf_generate

    placeholder = not hf_attention.POINTS and not hf_generate.POINTS
    note = (
        (
            "attnpatch's transformers targets are placeholders in this build: "
            "'patched' is the torch targets alone (HF calls torch SDPA)"
        )
        if placeholder
        else ""
    )

    def tiny(config_cls: type, name: str) -> Case:
        config = config_cls(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
        lengths, width = [12, 9, 6, 3], 12
        ids = torch.randint(3, 1000, (len(lengths), width), device=device)
        attention = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, : width - n] = 0
            attention[row, width - n :] = 1
        new_tokens = 4 if quick else 24

        def generate() -> object:
            return model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

        return Case(
            "hf",
            f"tiny random {name} generate(), left-padded batch",
            f"B=4 prompt<=12 +{new_tokens} tokens",
            "float32",
            {BASELINE: generate, "patched": generate, TORCH_TARGETS_ONLY: generate},
            targets={"patched": 1.03},
            note=note,
            notes={TORCH_TARGETS_ONLY: "what the hf_* targets add is the difference to 'patched'"},
        )

    cases = [tiny(transformers.LlamaConfig, "Llama"), tiny(transformers.Qwen2Config, "Qwen2")]
    if not quick:
        config = transformers.LlamaConfig(
            vocab_size=8000,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=1024,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
        batch, seq_len = 4, 256
        ids = torch.randint(3, 8000, (batch, seq_len), device=device)
        attention = (~key_padding(batch, seq_len)).long().to(device)

        def forward() -> object:
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=attention).logits

        cases.append(
            Case(
                "hf",
                "random Llama forward, left-padded",
                f"B={batch} L={seq_len} hidden=512 4 layers",
                "float32",
                {BASELINE: forward, "patched": forward, TORCH_TARGETS_ONLY: forward},
                note=note,
                memory=True,
            )
        )
    return cases


# ---------------------------------------------------------------- 7. the general path


def general_target(length: int) -> float:
    return 1.02 if length >= 512 else 1.03


def general_sdpa_cases(device: str, quick: bool) -> list[Case]:
    """The path CUDA and torch.compile take (no value read on the host), forced on
    CPU: SDPA with a mask reused across calls (a model's layers share one) and
    with a mask built afresh per call (each forward builds its own), at prefill
    and at a single-token decode step."""
    batch, heads, dim = 8, 16, 64
    gen = torch.Generator().manual_seed(0)
    cases = []
    for q_len, length in [(128, 128)] if quick else [(128, 128), (512, 512), (1, 256), (1, 512), (1, 1024), (1, 2048)]:
        q = torch.randn(batch, heads, q_len, dim, generator=gen).to(device)
        k, v = (torch.randn(batch, heads, length, dim, generator=gen).to(device) for _ in range(2))
        lengths = torch.tensor(left_padded_lengths(batch, length), device=device)
        real = torch.arange(length, device=device)[None, :] >= (length - lengths)[:, None]  # (B, S) keys
        if q_len == 1:
            build = lambda real=real, shape=(batch, 1, 1, length): real.view(shape)  # noqa: E731 - a new tensor each call
            what = "decode step (Lq=1), padding mask"
        else:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            build = lambda real=real, causal=causal: causal[None, None] & real[:, None, None, :]  # noqa: E731
            what = "prefill, left-padded causal mask"
        reused = build()
        fresh = lambda q=q, k=k, v=v, build=build: F.scaled_dot_product_attention(q, k, v, attn_mask=build())  # noqa: E731
        same = lambda q=q, k=k, v=v, m=reused: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
        kept = kept_rows(reused)
        shape = f"B={batch} H={heads} Lq={q_len} S={length} D={dim}"
        target = general_target(length)
        cases.append(
            Case(
                "general",
                f"SDPA {what}, mask reused",
                shape,
                "float32",
                {BASELINE: same, GENERAL_PATH: same, FLOOR: lambda same=same, kept=kept: clear_by_hand(same(), kept)},
                targets={GENERAL_PATH: target},
                notes={FLOOR: FLOOR_NOTE},
            )
        )
        cases.append(
            Case(
                "general",
                f"SDPA {what}, mask built per call",
                shape,
                "float32",
                {
                    BASELINE: fresh,
                    GENERAL_PATH: fresh,
                    FLOOR: lambda fresh=fresh, kept=kept: clear_by_hand(fresh(), kept),
                },
                targets={GENERAL_PATH: target},
                notes={
                    GENERAL_PATH: "both variants build the mask inside the timed call",
                    FLOOR: FLOOR_NOTE + "; the pass over the new mask that finds them is not counted",
                },
            )
        )
    return cases


FLOOR_NOTE = "row flags computed once, outside the timing"


def kept_rows(keep: torch.Tensor) -> torch.Tensor:
    """Per query row of a keep mask: True where the row admits a key."""
    return keep.any(-1, keepdim=True)


def clear_by_hand(out: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The one pass over a float32 output: the bits of each row that admits no key
    multiplied by 0 (+0.0), the others by 1 (unchanged)."""
    out.view(torch.int32).mul_(kept)
    return out


def general_mha_cases(device: str, quick: bool) -> list[Case]:
    """nn.MultiheadAttention training (forward and backward) on the general path."""
    cases = []
    for seq_len in [128] if quick else [128, 512]:
        for case in mha_cases(seq_len, device, batch=2 if quick else 8):
            if case.name.startswith("train"):
                cases.append(
                    Case(
                        "general",
                        "MHA " + case.name,
                        case.shape,
                        case.dtype,
                        {BASELINE: case.variants[BASELINE], GENERAL_PATH: case.variants["patched"]},
                        targets={GENERAL_PATH: general_target(seq_len)},
                    )
                )
    return cases


def general_generate_cases(device: str, quick: bool) -> list[Case]:
    """Tiny-model generate() with every target, on the general path."""
    return [
        Case(
            "general",
            case.name,
            case.shape,
            case.dtype,
            {BASELINE: case.variants[BASELINE], GENERAL_PATH: case.variants["patched"]},
            targets={GENERAL_PATH: 1.03},
        )
        for case in hf_cases(device, quick)
        if "generate" in case.name
    ]


def compiled_sdpa_cases(device: str, quick: bool) -> list[Case]:
    """torch.compile (inductor) of an SDPA call: the fix is traced into the graph.
    One compiled function serves both variants (dynamo keeps a graph for each
    state of the patch, told apart by its guards); compiling happens in warm-up."""
    batch, heads, dim = 8, 16, 64
    gen = torch.Generator().manual_seed(0)
    cases = []
    for q_len, length in [(128, 128)] if quick else [(128, 128), (512, 512), (1, 1024)]:
        q = torch.randn(batch, heads, q_len, dim, generator=gen).to(device)
        k, v = (torch.randn(batch, heads, length, dim, generator=gen).to(device) for _ in range(2))
        lengths = torch.tensor(left_padded_lengths(batch, length), device=device)
        real = torch.arange(length, device=device)[None, :] >= (length - lengths)[:, None]
        if q_len == 1:
            mask = real.view(batch, 1, 1, length)
        else:
            mask = (
                torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None] & real[:, None, None, :]
            )

        @torch.compile(fullgraph=True, dynamic=False)
        def attend(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        @torch.compile(fullgraph=True, dynamic=False)
        def attend_then_clear(q, k, v, mask, unattended):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).masked_fill(unattended, 0.0)

        run = lambda attend=attend, q=q, k=k, v=v, mask=mask: attend(q, k, v, mask)  # noqa: E731
        unattended = ~mask.any(-1, keepdim=True)
        floor = lambda q=q, k=k, v=v, mask=mask, rows=unattended: attend_then_clear(q, k, v, mask, rows)  # noqa: E731
        cases.append(
            Case(
                "compiled",
                "torch.compile(SDPA), left-padded mask",
                f"B={batch} H={heads} Lq={q_len} S={length} D={dim}",
                "float32",
                {BASELINE: run, "patched": run, FLOOR: floor},
                targets={"patched": general_target(length)},
                notes={FLOOR: "the output pass compiled with the kernel; " + FLOOR_NOTE},
            )
        )
    return cases


def tiny_sdpa_inputs(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(1, 1, 4, 8, device=device)
    return q, q.clone(), q.clone()


def tiny_padded_mask(device: str) -> torch.Tensor:
    """A causal keep mask for ``tiny_sdpa_inputs`` with the first token a left pad:
    query row 0 admits no key."""
    causal = torch.ones(4, 4, dtype=torch.bool, device=device).tril()
    return causal & (torch.arange(4, device=device) >= 1)
