"""Run as ``python probe.py GROUP MODE``: the cases of one group, each observed as a
JSON-able dict, printed as one JSON line ``{case: observations}``.

MODE is ``off`` (no attnpatch), ``env`` (the process was started with
``ATTNPATCH=1``: every default target, as a cluster would run it) or ``scope``
(cases open ``attnpatch.patched()`` where they say so). test_transparency.py
runs each group without and with attnpatch and compares the two outputs case by
case: every observation must be the same, except those whose name starts with
``fix_``, which record what the fix changes (masked rows) and are checked apart.

A case that raises is observed as its error (type and message), so an error
that attnpatch adds or changes shows as a difference; a crash kills the whole
process, which is why the groups that could crash run apart.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import io
import json
import pickle
import re
import sys
import traceback
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore")
GROUP, MODE = sys.argv[1], sys.argv[2]
CASES: dict[str, dict] = {}


def case(group: str):
    def register(function):
        CASES.setdefault(group, {})[function.__name__] = function
        return function

    return register


def scope():
    """The attnpatch scope the ``scope`` mode's cases run their forward under."""
    if MODE == "scope":
        import attnpatch

        return attnpatch.patched()
    return torch.autograd.grad_mode.set_grad_enabled(torch.is_grad_enabled())  # a no-op context


def digest(tensor) -> str:
    """The exact bits of a tensor (NaN included), shape and dtype."""
    tensor = tensor.detach().contiguous().cpu()
    data = tensor.view(torch.uint8) if tensor.numel() else tensor
    return f"{tuple(tensor.shape)} {tensor.dtype} " + hashlib.sha1(data.numpy().tobytes()).hexdigest()[:16]


def error(exc: BaseException) -> str:
    return without_addresses(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")


def without_addresses(text: str) -> str:
    """Object addresses differ from process to process."""
    return re.sub(r" at 0x[0-9a-f]+", "", text)


# --- inputs: a left-padded causal batch; batch row 0's first two queries see no key

SEQ, DIM, HEADS = 4, 8, 2
PAD = torch.tensor([[True, True, False, False], [False] * SEQ])  # nn.MultiheadAttention: True = pad
CAUSAL = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
KEEP = ~(PAD[:, None, None, :] | CAUSAL)  # SDPA convention, (2, 1, 4, 4)
MASKED = torch.zeros(2, SEQ, dtype=torch.bool)
MASKED[0, :2] = True  # the fully masked query rows
VALID = ~MASKED


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, SEQ, DIM, generator=generator)


def heads(x):
    return x.view(2, SEQ, HEADS, DIM // HEADS).transpose(1, 2)


def sdpa(x, mask=KEEP):
    q = heads(x)
    return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(2, SEQ, DIM)


def mha_module(seed: int = 0, dropout: float = 0.0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    return nn.MultiheadAttention(DIM, HEADS, dropout=dropout, batch_first=True)


def encoder_layer(seed: int = 0) -> nn.TransformerEncoderLayer:
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(DIM, HEADS, 16, dropout=0.0, batch_first=True)


class HoldsAttention(nn.Module):
    """A module that keeps the attention function as an attribute (set while
    attnpatch is on, in the ``env`` mode), as many model zoos do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.attn_fn = F.scaled_dot_product_attention
        self.dropped = functools.partial(F.scaled_dot_product_attention, dropout_p=0.0)

    def forward(self, x):
        q = heads(self.proj(x))
        return self.attn_fn(q, q, q, attn_mask=KEEP) + self.dropped(q, q, q, attn_mask=KEEP)


# The calls of every torch target, with fully masked rows in the input.
def call_sdpa_bool():
    return sdpa(inputs())


def call_sdpa_float():
    return sdpa(inputs(), torch.zeros(KEEP.shape).masked_fill(~KEEP, float("-inf")))


def call_mha_training():
    mha = mha_module(dropout=0.5).train()
    x = inputs().requires_grad_()
    out, weights = mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)
    out[VALID].sum().backward()
    return out


def call_mha_fast_path():
    mha = mha_module().eval()
    x = inputs()
    with torch.no_grad():
        return mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)[0]


def call_encoder_fast_path():
    layer = encoder_layer().eval()
    with torch.no_grad():
        return layer(inputs(), src_mask=CAUSAL, src_key_padding_mask=PAD)


TORCH_CALLS = {
    "sdpa_bool": call_sdpa_bool,
    "sdpa_float": call_sdpa_float,
    "mha_training": call_mha_training,
    "mha_fast_path": call_mha_fast_path,
    "encoder_fast_path": call_encoder_fast_path,
}


# --- group "state": global state, what watches autograd, introspection, serialization


@case("state")
def random_stream_after_each_target():
    seen = {}
    for name, call in TORCH_CALLS.items():
        torch.manual_seed(1)
        call()
        seen[name] = digest(torch.rand(8)) + " " + digest(torch.get_rng_state())
    return seen


@case("state")
def global_state_after_each_target():
    for call in TORCH_CALLS.values():
        call()
    return {
        "default_dtype": str(torch.get_default_dtype()),
        "default_device": str(torch.get_default_device()) if hasattr(torch, "get_default_device") else "",
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "threads": torch.get_num_threads(),
        "autocast_cpu": torch.is_autocast_cpu_enabled(),
    }


@case("state")
def calls_under_another_default_dtype_and_device():
    """CPU tensors given explicitly while the default device is meta and the
    default dtype float64: nothing attnpatch makes may land elsewhere."""
    seen = {}
    x, mha, layer = inputs(), mha_module(), encoder_layer().eval()
    float_mask = torch.zeros(KEEP.shape).masked_fill(~KEEP, float("-inf"))
    calls = {
        "sdpa_bool": lambda: sdpa(x),
        "sdpa_float": lambda: sdpa(x, float_mask),
        "mha_weights": lambda: mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)[0],
        "mha_fast_path": lambda: mha.eval()(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)[0],
        "encoder_fast_path": lambda: layer(x, src_mask=CAUSAL, src_key_padding_mask=PAD),
    }
    torch.set_default_dtype(torch.float64)
    torch.set_default_device("meta")
    try:
        for name, call in calls.items():
            try:
                with torch.no_grad():
                    out = call()
                seen[name] = [str(out.device), digest(out[VALID])]
            except Exception as exc:  # noqa: BLE001 - the error is the observation
                seen[name] = error(exc)
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(torch.float32)
    return seen


@case("state")
def first_masked_call_under_watchers():
    """The first masked call of a dtype (where attnpatch once checked torch's
    kernels inside the call) under a profiler, saved-tensor hooks and no_grad."""
    packed = []
    q = heads(inputs()).to(torch.float64)
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        with torch.profiler.profile() as profile:
            out = F.scaled_dot_product_attention(q, q, q, attn_mask=KEEP)
    return {
        "ops": sorted({event.name for event in profile.events()}),
        "packed": len(packed),
        "valid": digest(out.transpose(1, 2)[VALID]),
        "fix_masked": digest(out.transpose(1, 2)[MASKED]),
    }


@case("state")
def saved_tensors_of_calls_without_masked_rows():
    """A call with no fully masked row saves what it saves without attnpatch."""
    counts = {}
    for name in ("sdpa", "mha"):
        packed = []
        x = inputs().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, packed=packed: packed.append(tuple(t.shape)) or t, lambda t: t
        ):
            if name == "sdpa":
                out = sdpa(x, ~CAUSAL)
            else:
                out = mha_module()(x, x, x, attn_mask=CAUSAL)[0]
        out.sum().backward()
        counts[name] = {"packed": sorted(packed), "grad": digest(x.grad), "out": digest(out)}
    return counts


@case("state")
def anomaly_mode_without_masked_rows():
    with torch.autograd.detect_anomaly(check_nan=True):
        x = inputs().requires_grad_()
        out = mha_module()(x, x, x, attn_mask=CAUSAL)[0]
        out.sum().backward()
    return {"grad": digest(x.grad)}


def patched_objects():
    import torch.utils.checkpoint

    return {
        "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
        "torch._C._nn.scaled_dot_product_attention": torch._C._nn.scaled_dot_product_attention,
        "F.multi_head_attention_forward": F.multi_head_attention_forward,
        "torch._native_multi_head_attention": torch._native_multi_head_attention,
        "torch._transformer_encoder_layer_fwd": torch._transformer_encoder_layer_fwd,
        "checkpoint.CheckpointFunction": torch.utils.checkpoint.CheckpointFunction,
        "checkpoint._checkpoint_without_reentrant_generator": torch.utils.checkpoint._checkpoint_without_reentrant_generator,
    }


@case("state")
def introspection():
    seen = {}
    for name, obj in patched_objects().items():
        try:
            signature = without_addresses(str(inspect.signature(obj)))
        except (TypeError, ValueError) as exc:
            signature = error(exc)
        seen[name] = {
            "predicates": [
                p.__name__
                for p in (
                    inspect.isbuiltin,
                    inspect.isfunction,
                    inspect.isroutine,
                    inspect.ismethod,
                    inspect.isclass,
                    callable,
                )
                if p(obj)
            ],
            "signature": signature,
            "names": [getattr(obj, a, None) for a in ("__name__", "__qualname__", "__module__")],
            "doc": hashlib.sha1((obj.__doc__ or "").encode()).hexdigest()[:12],
            # What __wrapped__ leads to: torch's own object, with or without attnpatch.
            "unwrapped_module": getattr(inspect.unwrap(obj), "__module__", None),
            "hash_and_eq": hash(obj) == hash(obj) and obj == obj and not (obj != obj),
        }
    return seen


@case("state")
def pickling_and_copying():
    seen = {}
    objects = {**patched_objects(), "partial": functools.partial(F.scaled_dot_product_attention, dropout_p=0.1)}
    for name, obj in objects.items():
        row = {}
        for how, act in {
            "pickle": lambda o: hashlib.sha1(pickle.dumps(o)).hexdigest()[:12],
            "pickle_roundtrip": lambda o: pickle.loads(pickle.dumps(o)) == o,
            "copy": lambda o: copy.copy(o) == o,
            "deepcopy": lambda o: copy.deepcopy(o) == o,
        }.items():
            try:
                row[how] = act(obj)
            except Exception as exc:  # noqa: BLE001 - the error is the observation
                row[how] = error(exc)
        seen[name] = row
    return seen


@case("state")
def modules_holding_patched_functions():
    """torch.save / torch.load, deepcopy (an EMA copy), cloudpickle (Ray) and a
    spawned process (multiprocessing, DataLoader workers) of modules that hold
    patched functions. Outputs compared on valid rows."""
    model = HoldsAttention()
    mha = mha_module()
    x = inputs()
    seen = {}
    buffer = io.BytesIO()
    torch.save({"model": model, "mha": mha}, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    seen["torch_save_load"] = digest(loaded["model"](x)[:, :, 2:]) == digest(model(x)[:, :, 2:])
    seen["deepcopy"] = digest(copy.deepcopy(model)(x)[:, :, 2:]) == digest(model(x)[:, :, 2:])
    seen["deepcopy_mha"] = digest(copy.deepcopy(mha)(x, x, x)[0]) == digest(mha(x, x, x)[0])
    try:
        import cloudpickle
    except ImportError:
        seen["cloudpickle"] = "not installed"
    else:
        seen["cloudpickle"] = digest(cloudpickle.loads(cloudpickle.dumps(model))(x)[:, :, 2:])
    return seen


@case("state")
def spawned_process_gets_a_module_holding_sdpa():
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return {"valid_rows": pool.apply(_run_in_child, (HoldsAttention(), inputs()))}


def _run_in_child(model, x):
    return digest(model(x)[:, :, 2:])


# --- group "autograd": checkpointing with a scope, forward-mode AD, double backward


def _grads(function, x, reentrant=None):
    """Output and input gradient of ``function`` (checkpointed when ``reentrant``
    is not None), its forward inside the mode's scope and its backward after."""
    from torch.utils.checkpoint import checkpoint

    x = x.clone().requires_grad_()
    with scope():
        out = function(x) if reentrant is None else checkpoint(function, x, use_reentrant=reentrant)
    out[VALID].sum().backward()
    return out, x.grad


def _same(a, b) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))


@case("autograd")
def checkpoint_recomputes_as_the_forward_ran():
    mha = mha_module()
    callers = {
        "mha": lambda x: mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)[0],
        "sdpa_float": lambda x: sdpa(x, torch.zeros(KEEP.shape).masked_fill(~KEEP, float("-inf"))),
        "sdpa_bool": lambda x: sdpa(x),
    }
    seen = {}
    for name, function in callers.items():
        plain_out, plain_grad = _grads(function, inputs())
        for reentrant in (True, False):
            try:
                out, grad = _grads(function, inputs(), reentrant)
                seen[f"{name}_reentrant_{reentrant}"] = {
                    "same_as_without_checkpoint": _same(out, plain_out) and _same(grad, plain_grad),
                    "fix_grad_finite": bool(grad.isfinite().all()),
                }
            except Exception as exc:  # noqa: BLE001 - the error is the observation
                seen[f"{name}_reentrant_{reentrant}"] = error(exc)
    return seen


@case("autograd")
def composable_checkpoint_recomputes_as_the_forward_ran():
    """``torch.distributed._composable.checkpoint(module)`` (FSDP2's API), which
    imported torch's checkpointing internals by name."""
    from torch.distributed._composable import checkpoint as checkpoint_module

    grads = []
    for checkpointed in (False, True):
        layer = Attends(mha_module())
        if checkpointed:
            checkpoint_module(layer)
        out, grad = _grads(layer, inputs())
        grads.append(grad)
    return {"same_as_without_checkpoint": _same(grads[0], grads[1]), "fix_grad_finite": bool(grads[1].isfinite().all())}


@case("autograd")
def forward_mode_ad_and_double_backward():
    import torch.autograd.forward_ad as forward_ad

    mha = mha_module()
    x, tangent = inputs(0), inputs(1)
    seen = {}
    with scope():
        with forward_ad.dual_level():
            out = mha(*(forward_ad.make_dual(x, tangent),) * 3, key_padding_mask=PAD, attn_mask=CAUSAL)[0]
            seen["forward_ad_valid"] = digest(forward_ad.unpack_dual(out).tangent[VALID])
        seen["jvp_valid"] = digest(
            torch.func.jvp(lambda x: mha(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)[0], (x,), (tangent,))[1][
                VALID
            ]
        )
        x2 = x.clone().requires_grad_()
        out = mha(x2, x2, x2, attn_mask=CAUSAL)[0]  # no fully masked row: double backward is finite
        (grad,) = torch.autograd.grad(out.sum(), x2, create_graph=True)
        (grad2,) = torch.autograd.grad(grad.sum(), x2)
        seen["double_backward"] = digest(grad2)
    return seen


# --- group "trace": torch.jit.trace / script, fx, compile (apart: a crash is possible)


def _traced_valid(traced, eager, *args) -> dict:
    out = traced(*args)
    out = out[0] if isinstance(out, tuple) else out
    return {"valid_as_eager": _same(out[VALID], eager[VALID]), "fix_masked_finite": bool(out[MASKED].isfinite().all())}


class Attends(nn.Module):
    """``layer`` called on the left-padded causal batch (tracers need a module
    to hold the parameters)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        if isinstance(self.layer, nn.MultiheadAttention):
            return self.layer(x, x, x, key_padding_mask=PAD, attn_mask=CAUSAL)[0]
        if isinstance(self.layer, nn.TransformerEncoderLayer):
            return self.layer(x, src_mask=CAUSAL, src_key_padding_mask=PAD)
        return sdpa(x)


@case("trace")
def jit_trace_of_each_target():
    seen = {}
    x = inputs()
    for name, module, fast_path in [
        ("sdpa", Attends(nn.Identity()), False),
        ("mha_training", Attends(mha_module()), False),
        ("mha_fast_path", Attends(mha_module()).eval(), True),
        ("encoder_fast_path", Attends(encoder_layer()).eval(), True),
    ]:
        try:
            with torch.no_grad() if fast_path else torch.enable_grad():
                with scope():
                    traced = torch.jit.trace(module, (x,))
                seen[name] = _traced_valid(traced, module(x).detach(), x)
        except Exception as exc:  # noqa: BLE001 - the error is the observation
            seen[name] = error(exc)
    return seen


@case("trace")
def jit_script_fx_and_compile():
    seen = {}
    x = inputs()
    try:
        scripted = torch.jit.script(mha_module())
        seen["script_mha"] = digest(scripted(x, x, x, attn_mask=CAUSAL)[0])
    except Exception as exc:  # noqa: BLE001
        seen["script_mha"] = error(exc)
    try:
        model = HoldsAttention()
        graph = torch.fx.symbolic_trace(model)
        seen["fx"] = {
            "targets": sorted(str(n.target) for n in graph.graph.nodes if n.op == "call_function"),
            "runs": _same(graph(x)[:, :, 2:], model(x)[:, :, 2:]),
        }
    except Exception as exc:  # noqa: BLE001
        seen["fx"] = error(exc)
    try:
        compiled = torch.compile(lambda x: sdpa(x, ~CAUSAL), backend="eager", fullgraph=True)
        seen["compile"] = digest(compiled(x))
    except Exception as exc:  # noqa: BLE001
        seen["compile"] = error(exc)
    return seen


# --- group "onnx": the TorchScript-based exporter (apart: a crash is possible)


@case("onnx")
def torchscript_onnx_export():
    import onnxruntime

    seen = {}
    x = inputs()
    for name, module in [("sdpa", Attends(nn.Identity())), ("mha", Attends(mha_module()))]:
        try:
            buffer = io.BytesIO()
            with scope():
                torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17)
            session = onnxruntime.InferenceSession(buffer.getvalue())
            (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            out, eager = torch.from_numpy(out), module(x).detach()
            seen[name] = {
                "valid_close": bool(torch.allclose(out[VALID], eager[VALID], atol=1e-5)),
                "fix_masked_rows": digest(out[MASKED]),
            }
        except Exception as exc:  # noqa: BLE001
            seen[name] = error(exc)
    return seen


@case("onnx")
def torchscript_onnx_export_of_a_left_padded_llama():
    """jit.trace and the TorchScript-based ONNX exporter on a tiny left-padded
    Llama, eager and sdpa attention: valid rows as in eager; pad rows as the
    fixed eager model's (attnpatch.patched() for that reference only)."""
    import onnxruntime

    import attnpatch

    seen = {}
    for attn in ("eager", "sdpa"):
        model = LogitsOf(tiny_llama(attn).eval())
        try:
            buffer = io.BytesIO()
            with torch.no_grad():
                with scope():
                    traced = torch.jit.trace(model, (IDS, ATTENTION))
                    torch.onnx.export(model, (IDS, ATTENTION), buffer, dynamo=False, opset_version=17)
                plain = model(IDS, ATTENTION)
                with attnpatch.patched():
                    fixed = model(IDS, ATTENTION)
                traced_out = traced(IDS, ATTENTION)
            session = onnxruntime.InferenceSession(buffer.getvalue())
            feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), (IDS, ATTENTION))}
            out = torch.from_numpy(session.run(None, feeds)[0])
            valid, pads = ATTENTION.bool(), ~ATTENTION.bool()
            # Valid rows of the ONNX model are part of the fix: without attnpatch,
            # on torch 2.5 the NaN of pad rows reaches them in ONNX Runtime.
            seen[attn] = {
                "traced_valid_close": bool(torch.allclose(traced_out[valid], plain[valid], atol=1e-5)),
                "fix_onnx_valid_close": bool(torch.allclose(out[valid], plain[valid], atol=1e-5)),
                "fix_pads_as_fixed_eager": [
                    bool(torch.allclose(o[pads], fixed[pads], atol=1e-5)) for o in (traced_out, out)
                ],
            }
        except Exception as exc:  # noqa: BLE001 - the error is the observation
            seen[attn] = error(exc)
    return seen


class LogitsOf(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask):
        return self.model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits


# --- group "hf": transformers models, generate(), gradient checkpointing, serialization


def tiny_llama(attn: str):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn)


IDS = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
ATTENTION = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


@case("hf")
def llama_forward_state_and_serialization():
    seen = {}
    for attn in ("eager", "sdpa"):
        model = tiny_llama(attn).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            logits = model(input_ids=IDS, attention_mask=ATTENTION).logits
        seen[attn] = {
            "valid": digest(logits[ATTENTION.bool()]),
            "rng_after": digest(torch.rand(4)),
            "deepcopy": digest(copy.deepcopy(model)(input_ids=IDS[1:]).logits),
        }
        buffer = io.BytesIO()
        torch.save(model, buffer)
        seen[attn]["torch_save"] = type(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)).__name__
    return seen


@case("hf")
def gradient_checkpointing_training_step():
    seen = {}
    for attn in ("eager", "sdpa"):
        grads = []
        for checkpointing in (False, True):
            model = tiny_llama(attn).train()
            if checkpointing:
                model.gradient_checkpointing_enable()
            with scope():
                loss = model(input_ids=IDS, attention_mask=ATTENTION, labels=IDS.masked_fill(ATTENTION == 0, -100)).loss
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        seen[attn] = {
            "same_with_checkpointing": _same(grads[0], grads[1]),
            "fix_finite": bool(grads[1].isfinite().all()),
        }
    return seen


@case("hf")
def pickling_transformers_objects():
    """The attention table's entries and model files' functions (replaced by
    plain functions under attnpatch), generate() and from_pretrained."""
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    seen = {}
    for name, obj in {
        "sdpa_entry": ALL_ATTENTION_FUNCTIONS["sdpa"],
        "eager_llama": modeling_llama.eager_attention_forward,
        "generate": transformers.LlamaForCausalLM.generate,
        "from_pretrained": transformers.PreTrainedTokenizerFast.from_pretrained,
    }.items():
        try:
            seen[name] = [pickle.loads(pickle.dumps(obj)) == obj, copy.deepcopy(obj) == obj]
        except Exception as exc:  # noqa: BLE001
            seen[name] = error(exc)
    return seen


@case("hf")
def generate_state():
    model = tiny_llama("sdpa").eval()
    torch.manual_seed(1)
    out = model.generate(IDS[1:], attention_mask=ATTENTION[1:], max_new_tokens=3, do_sample=True)
    return {"rng_after": digest(torch.rand(4)), "tokens": out.tolist(), "grad_enabled": torch.is_grad_enabled()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = {}
    for name, run in CASES[GROUP].items():
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001 - the error is the observation
            results[name] = {"error": error(exc), "where": traceback.format_exc().splitlines()[-3][:200]}
    print(json.dumps(results, sort_keys=True, default=str))
