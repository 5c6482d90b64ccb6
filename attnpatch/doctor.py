"""``attnpatch doctor``: is this machine affected, and does attnpatch fix it?

Runs each known reproduction on this machine twice, first without attnpatch and
then inside ``attnpatch.patched()``, and judges both runs against the contract:

* unpatched: ``NaN`` (NaN in an output or a gradient), ``wrong`` (finite, but not
  the contract's answer: a pad row that is not 0, a garbage continuation) or ``ok``;
* patched: ``ok``, or ``still broken (why)``. Rows that are valid must also come
  out exactly as they did without attnpatch (within tolerance on GPU).

Tiny random models only, no downloads; a few seconds on CPU. The exit code is 1
when any case is still broken with attnpatch on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import attnpatch

# Left-padded causal batch used by every torch case: row 0 has 2 pad tokens in
# front, so its queries 0 and 1 see only pad keys (fully masked rows).
BATCH, SEQ, EMBED, HEADS = 2, 5, 16, 2
LENGTHS = [3, 5]


@dataclass
class Check:
    """One run of a case, judged against the contract."""

    nan: bool
    problem: str = ""  # finite but not the contract's answer; "" when fine
    valid: list[Any] = field(default_factory=list)  # results at valid positions


@dataclass
class Case:
    name: str
    where: str  # device/backend
    run: Callable[[], Check] | None = None
    skip: str = ""


def _has_nan(*tensors: Any) -> bool:
    return any(t is not None and bool(t.isnan().any()) for t in tensors)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:100]


# --- torch cases ----------------------------------------------------------------


def _padding(device: str) -> tuple[Any, Any, Any]:
    """(key_padding_mask True = pad, causal drop mask, fully masked (B, L) rows)."""
    import torch

    positions = torch.arange(SEQ, device=device)
    pad = positions[None, :] < (SEQ - torch.tensor(LENGTHS, device=device))[:, None]
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool, device=device).triu(1)
    # A query sees keys 0..i; it is fully masked when all of those are pads.
    masked_rows = pad.clone()
    return pad, causal, masked_rows


def _mha_case(device: str, need_weights: bool, fast_path: bool) -> Callable[[], Check]:
    def run() -> Check:
        import torch
        from torch import nn

        torch.manual_seed(0)
        pad, causal, rows = _padding(device)
        mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True).to(device)
        x = torch.randn(BATCH, SEQ, EMBED, device=device)
        if fast_path:  # eval + no_grad: the fused native kernel
            mha.eval()
            with torch.no_grad():
                out, weights = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=need_weights)
            grads: list[Any] = []
        else:
            x.requires_grad_(True)
            out, weights = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=need_weights)
            out[~rows].sum().backward()  # the loss ignores pad rows, as a real loss would
            grads = [x.grad, *(p.grad for p in mha.parameters())]
        out, weights = out.detach(), None if weights is None else weights.detach()
        problem = ""
        if not torch.equal(out[rows], mha.out_proj.bias.detach().expand_as(out[rows])):
            problem = "fully masked rows are not out_proj(0)"
        elif weights is not None and bool((weights[rows] != 0).any()):
            problem = "weights of fully masked rows are not 0"
        valid = [out[~rows]] + ([] if weights is None else [weights[~rows]]) + [g for g in grads[:1]]
        return Check(_has_nan(out, weights, *grads), problem, valid)

    return run


def _encoder_case(device: str) -> Callable[[], Check]:
    def run() -> Check:
        import torch
        from torch import nn

        torch.manual_seed(0)
        pad, causal, rows = _padding(device)
        layer = nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=32, batch_first=True)
        encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).to(device).eval()
        x = torch.randn(BATCH, SEQ, EMBED, device=device)
        with torch.no_grad():  # the fused inference kernel
            out = encoder(x, mask=causal, src_key_padding_mask=pad)
        # The fused kernel gives fully masked rows a finite value, not 0 (README,
        # "Limits"), so only NaN counts here.
        return Check(_has_nan(out), "", [out[~rows]])

    return run


def _sdpa_case(device: str, backend: Any) -> Callable[[], Check]:
    def run() -> Check:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        torch.manual_seed(0)
        pad, causal, rows = _padding(device)
        keep = (~causal)[None, None] & ~pad[:, None, None, :]  # (B, 1, L, L), True = attend
        dtype = torch.float32 if device == "cpu" else torch.float16
        q, k, v = (torch.randn(BATCH, HEADS, SEQ, 8, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        head_rows = rows[:, None, :].expand(BATCH, HEADS, SEQ)
        out[~head_rows].float().sum().backward()
        out = out.detach()
        problem = ""
        if bool((out[head_rows] != 0).any()):
            problem = "fully masked rows are not 0"
        elif q.grad is not None and bool((q.grad[head_rows] != 0).any()):
            problem = "fully masked rows pass gradient to the query"
        return Check(_has_nan(out, q.grad, k.grad, v.grad), problem, [out[~head_rows], k.grad, v.grad])

    return run


def _sdpa_backends(device: str) -> list[tuple[str, Any]]:
    from torch.nn.attention import SDPBackend

    names = (
        ["MATH", "FLASH_ATTENTION"]
        if device == "cpu"
        else ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]
    )
    short = {"MATH": "math", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn"}
    return [(short[n], getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


# --- transformers cases -----------------------------------------------------------


def _tiny_model(kind: str, implementation: str, device: str) -> Any:
    import torch
    import transformers

    config_class, model_class = {
        "Llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "Qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation=implementation)  # type: ignore[attr-defined]
    dtype = torch.float32 if device == "cpu" else torch.float16
    return model.to(device=device, dtype=dtype).eval()


def _hf_forward_case(kind: str, implementation: str, device: str) -> Callable[[], Check]:
    def run() -> Check:
        import torch

        model = _tiny_model(kind, implementation, device)
        input_ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], device=device)
        attention_mask = (input_ids != 0).long()
        # What attention hands to o_proj at the pad positions must be 0.
        attention_outputs: list[Any] = []
        hooks = [
            layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args: attention_outputs.append(args[0]))
            for layer in model.model.layers
        ]
        try:
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            for hook in hooks:
                hook.remove()
        pads = attention_mask == 0
        problem = ""
        if any(bool((a[pads] != 0).any()) for a in attention_outputs):
            problem = "pad rows attend to pad keys instead of giving 0"
        return Check(_has_nan(logits, *attention_outputs), problem, [logits[~pads]])

    return run


def _hf_generate_case(kind: str, device: str) -> Callable[[], Check]:
    def run() -> Check:
        import torch

        model = _tiny_model(kind, "sdpa", device)
        prompts = [[5, 9], [21, 22, 23, 24, 25]]
        width = max(map(len, prompts))
        # Right padding, as Qwen2's tokenizer does it.
        input_ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)
        attention_mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            batch = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)[:, width:]
            alone = [
                model.generate(input_ids=torch.tensor([p], device=device), **settings)[0, len(p) :] for p in prompts
            ]
        wrong_rows = [i for i, expected in enumerate(alone) if not torch.equal(batch[i], expected)]
        problem = f"row(s) {wrong_rows} decode differently than alone" if wrong_rows else ""
        return Check(False, problem, [])

    return run


def _hf_skip_reason(target: str) -> str:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers not installed"
    try:
        module = importlib.import_module(attnpatch._patching.TARGETS[target][1])
    except Exception as exc:  # noqa: BLE001
        return f"target not available: {_short(exc)}"
    return "" if getattr(module, "POINTS", None) else "target not available"


# --- the user's own model (--model) ---------------------------------------------

# Two prompts of very different lengths, so that the short one is padded a lot.
PROMPTS = ["The quick brown fox jumps over the lazy dog, and then it", "Hello"]
IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")


class DoctorError(Exception):
    """A model that cannot be loaded: reported in one line, exit code 2."""


@dataclass
class UserModel:
    """What ``--model`` loaded: the tokenizer now, each implementation on first use."""

    source: str
    trust_remote_code: bool
    device: str
    tokenizer: Any
    architecture: str
    padding_side: str  # the tokenizer's own
    notes: list[str]
    models: dict[str, Any] = field(default_factory=dict)

    def model(self, implementation: str) -> Any:
        if implementation not in self.models:
            import transformers
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # the table reports progress
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.source, attn_implementation=implementation, trust_remote_code=self.trust_remote_code
                )
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            self.models[implementation] = model.to(self.device).eval()  # type: ignore[arg-type]
        return self.models[implementation]


def load_user_model(source: str, trust_remote_code: bool, device: str) -> UserModel:
    """The tokenizer and config of ``source`` (a local directory or a hub id),
    checked; a ``DoctorError`` saying what is wrong otherwise. Code shipped with a
    checkpoint runs only with ``trust_remote_code``."""
    import os

    try:
        import transformers
    except ImportError as exc:
        raise DoctorError("--model needs transformers (pip install 'attnpatch[hf]')") from exc
    if os.path.exists(source):
        if not os.path.isdir(source):
            raise DoctorError(f"{source} is a file; give the directory a model was saved to (with config.json)")
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise DoctorError(f"{source} is not a saved model: it has no config.json")
    elif os.sep in source.rstrip(os.sep).lstrip(".") or source.startswith((".", "~")):
        raise DoctorError(f"{source}: no such directory")
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        text = str(exc)
        if "trust_remote_code" in text and not trust_remote_code:
            raise DoctorError(
                f"{source} needs code that ships with the checkpoint; attnpatch doctor does not run it "
                "unless you pass --trust-remote-code (read that code first)"
            ) from exc
        where = "" if os.path.exists(source) else " (not a local directory; as a hub id it needs network access)"
        raise DoctorError(f"could not load {source}{where}: {_short(exc)}") from exc
    notes = []
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DoctorError(f"the tokenizer of {source} has neither a pad nor an eos token to pad a batch with")
        tokenizer.pad_token = tokenizer.eos_token
        notes.append("the tokenizer has no pad token; padded with its eos token, as is usual")
    architecture = (config.architectures or [type(config).__name__])[0]
    return UserModel(source, trust_remote_code, device, tokenizer, architecture, tokenizer.padding_side, notes)


def _batch(user: UserModel, padding_side: str) -> Any:
    tokenizer, saved = user.tokenizer, user.tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = saved
    return {key: value.to(user.device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}


def _attention_outputs(model: Any) -> tuple[list[Any], list[Any]]:
    """Forward pre-hooks that record what each attention module hands to its output
    projection (its last child with a 2-D weight: ``o_proj``, ``dense``, ``c_proj``)."""
    seen: list[Any] = []
    hooks = []
    for module in model.modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        projections = [m for m in module.children() if getattr(getattr(m, "weight", None), "ndim", 0) == 2]
        if projections:
            hooks.append(projections[-1].register_forward_pre_hook(lambda _, args: seen.append(args[0])))
    return seen, hooks


def _user_forward_case(user: UserModel, implementation: str) -> Callable[[], Check]:
    def run() -> Check:
        import torch

        model = user.model(implementation)
        batch = _batch(user, "left")
        pads = batch["attention_mask"] == 0
        seen, hooks = _attention_outputs(model)
        try:
            with torch.no_grad():
                logits = model(**batch).logits
        finally:
            for hook in hooks:
                hook.remove()
        outputs = [a for a in seen if a.shape[:2] == pads.shape]
        problem = ""
        if any(bool((a[pads] != 0).any()) for a in outputs):
            problem = "pad rows attend to pad keys instead of giving 0"
        return Check(_has_nan(logits[~pads], *(a[~pads] for a in outputs)), problem, [logits[~pads]])

    return run


def _user_generate_case(user: UserModel, implementation: str) -> Callable[[], Check]:
    def run() -> Check:
        import torch

        model = user.model(implementation)
        batch = _batch(user, "right")
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=user.tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            together = model.generate(**batch, **settings)[:, width:]
            alone = []
            for row in range(len(PROMPTS)):
                length = int(batch["attention_mask"][row].sum())
                ids = batch["input_ids"][row : row + 1, :length]
                alone.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)[0, length:])
        wrong = [row for row, expected in enumerate(alone) if not torch.equal(together[row], expected)]
        problem = f"row(s) {wrong} decode differently than alone" if wrong else ""
        return Check(False, problem, [])

    return run


# On CPU, transformers' flex_attention path (generate() in particular) compiles
# C++ kernels with inductor: minutes, or a compiler error where none is set up.
SLOW_ON_CPU = {"flex_attention": "compiles C++ kernels on CPU (minutes); ask for it with --attn flex_attention"}


def build_model_cases(user: UserModel, implementations: list[str] | None = None) -> list[Case]:
    cases = []
    for implementation in implementations or IMPLEMENTATIONS:
        where = f"{user.device}/{implementation}"
        slow = SLOW_ON_CPU.get(implementation) if user.device == "cpu" and not implementations else None
        if slow:
            for name in ("left-padded forward", "right-padded generate"):
                cases.append(Case(f"{user.architecture} {name}", where, skip=slow))
            continue
        try:
            with quiet():
                user.model(implementation)
        except Exception as exc:  # noqa: BLE001 - e.g. "does not support an attention implementation through ..."
            for name in ("left-padded forward", "right-padded generate"):
                cases.append(Case(f"{user.architecture} {name}", where, skip=f"not supported: {_short(exc)}"))
            continue
        cases.append(Case(f"{user.architecture} left-padded forward", where, _user_forward_case(user, implementation)))
        cases.append(
            Case(f"{user.architecture} right-padded generate", where, _user_generate_case(user, implementation))
        )
    return cases


# --- running --------------------------------------------------------------------


def build_cases(devices: list[str]) -> list[Case]:
    cases: list[Case] = []
    for device in devices:
        cases += [
            Case("MHA need_weights=True", device, _mha_case(device, True, fast_path=False)),
            Case("MHA need_weights=False", device, _mha_case(device, False, fast_path=False)),
            Case("MHA fast path (eval, no_grad)", device, _mha_case(device, False, fast_path=True)),
            Case("TransformerEncoder inference", device, _encoder_case(device)),
        ]
        cases += [
            Case("F.scaled_dot_product_attention", f"{device}/{name}", _sdpa_case(device, backend))
            for name, backend in _sdpa_backends(device)
        ]
    attention_skip, generate_skip = _hf_skip_reason("hf_attention"), _hf_skip_reason("hf_generate")
    for device in devices:
        for kind in ("Llama", "Qwen2"):
            for implementation in ("eager", "sdpa", "flex_attention"):
                run = None if attention_skip else _hf_forward_case(kind, implementation, device)
                cases.append(Case(f"{kind} left-padded forward", f"{device}/{implementation}", run, attention_skip))
            run = None if generate_skip else _hf_generate_case(kind, device)
            cases.append(Case(f"{kind} right-padded generate", f"{device}/sdpa", run, generate_skip))
    return cases


def _valid_rows_changed(before: Check, after: Check, device: str) -> bool:
    import torch

    for old, new in zip(before.valid, after.valid):
        if old is None or new is None:
            continue
        finite = old.isfinite()  # compare only what was meaningful without attnpatch
        if device.startswith("cpu"):
            same = torch.equal(old[finite], new[finite])
        else:  # GPU kernels need not be row-deterministic
            same = torch.allclose(old[finite].float(), new[finite].float(), rtol=1e-3, atol=1e-3)
        if not same:
            return True
    return False


@contextlib.contextmanager
def quiet() -> Any:
    """Silence the warnings and log lines the reproductions trigger (transformers'
    right-padding warning, attnpatch's one-time re-alignment note): the table says it."""
    loggers = [logging.getLogger(name) for name in ("attnpatch", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def diagnose(case: Case) -> dict[str, str]:
    row = {"case": case.name, "where": case.where, "unpatched": "", "patched": "", "detail": ""}
    if case.run is None:
        return {**row, "unpatched": f"skipped ({case.skip})", "patched": "-"}
    with quiet():
        try:
            before = case.run()
        except Exception as exc:  # noqa: BLE001 - e.g. a backend that refuses this input here
            return {**row, "unpatched": "skipped (cannot run here)", "patched": "-", "detail": _short(exc)}
        try:
            with attnpatch.patched():
                after = case.run()
        except Exception as exc:  # noqa: BLE001
            return {**row, "unpatched": _verdict(before), "patched": "still broken (error)", "detail": _short(exc)}
    row["unpatched"] = _verdict(before)
    row["detail"] = "" if before.nan else before.problem
    if after.nan:
        row["patched"] = "still broken (NaN)"
    elif after.problem:
        row["patched"], row["detail"] = "still broken (wrong)", after.problem
    elif _valid_rows_changed(before, after, case.where):
        row["patched"], row["detail"] = "still broken (valid rows changed)", "valid rows differ from unpatched"
    else:
        row["patched"] = "ok"
    return row


def _verdict(check: Check) -> str:
    return "NaN" if check.nan else "wrong" if check.problem else "ok"


def versions() -> dict[str, str]:
    import torch

    def version_of(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    if torch.cuda.is_available():
        cuda = f"{torch.version.cuda} ({torch.cuda.get_device_name(0)})"
    else:
        cuda = f"not available (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else "not available"
    return {
        "attnpatch": attnpatch.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version_of("transformers"),
        "wrapt": version_of("wrapt"),
        "cuda": cuda,
    }


def _table(rows: list[dict[str, str]]) -> str:
    columns = ["case", "where", "unpatched", "patched"]
    titles = {"case": "case", "where": "device/backend", "unpatched": "unpatched", "patched": "patched"}
    widths = {c: max(len(titles[c]), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(titles[c].ljust(widths[c]) for c in columns).rstrip()]
    lines.append("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        line = "  ".join(r[c].ljust(widths[c]) for c in columns).rstrip()
        lines.append(line + (f"  # {r['detail']}" if r["detail"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnpatch doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="check your own model instead: a saved model directory (config, weights, tokenizer) or, online, a hub id",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="with --model: allow running code that ships with the checkpoint",
    )
    parser.add_argument(
        "--attn",
        metavar="LIST",
        help="with --model: attention implementations to try, "
        f"comma-separated (default: {','.join(IMPLEMENTATIONS)}; flex_attention only on GPU)",
    )
    args = parser.parse_args(argv)
    if (args.trust_remote_code or args.attn) and not args.model:
        parser.error("--trust-remote-code and --attn go with --model")

    started = time.perf_counter()
    if any(entry["holders"] for entry in attnpatch.status().values()):
        # e.g. ATTNPATCH=1 in the environment: the first run must be without it.
        attnpatch.remove()
        print(
            "attnpatch doctor: attnpatch was active (ATTNPATCH?); turned it off for the unpatched runs", file=sys.stderr
        )
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = versions()
    if args.model:
        try:
            with quiet():
                user = load_user_model(args.model, args.trust_remote_code, devices[-1])
                cases = build_model_cases(user, args.attn.split(",") if args.attn else None)
        except DoctorError as exc:
            print(f"attnpatch doctor: {exc}", file=sys.stderr)
            return 2
        info["model"] = f"{args.model} ({user.architecture})"
        info["tokenizer"] = f"pads on the {user.padding_side}" + "".join(f"; {note}" for note in user.notes)
    if not args.json:
        print("\n".join(f"{name:13s} {value}" for name, value in info.items()) + "\n", flush=True)
    if not args.model:
        cases = build_cases(devices)
    rows = []
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.name} ({case.where}) ...", end=" ", file=sys.stderr, flush=True)
        row = diagnose(case)
        print(f"unpatched {row['unpatched']}, patched {row['patched']}", file=sys.stderr, flush=True)
        rows.append(row)
    broken = [r for r in rows if r["patched"].startswith("still broken")]
    if args.json:
        print(json.dumps({"versions": info, "cases": rows, "still_broken": len(broken)}, indent=2))
    else:
        print(_table(rows))
        seconds = time.perf_counter() - started
        verdict = (
            f"{len(broken)} case(s) still broken with attnpatch on"
            if broken
            else "attnpatch fixes every case that ran here"
        )
        print(f"\n{verdict} ({seconds:.1f} s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
