"""A transformers model computing with llama.cpp's CPU arithmetic (`gsq eval --numerics llama.cpp`).

Why: a GGUF file can hold gsq's weights bit for bit and llama.cpp still reports a slightly different
perplexity, because its CPU backend never multiplies a weight by fp32 activations. Each matmul first
rounds its activations (the right operand) to the weight type's "vec_dot" partner, and attention
runs on an fp16 KV cache. This module applies the same roundings in PyTorch, so that the part of a
gsq-vs-llama.cpp gap that comes from those roundings can be told apart from a wrong export.

What is emulated (llama.cpp as bundled with llama-cpp-python 0.3.36, CPU, flash attention off):
  * linear layers and MoE expert projections (gate, up and down each by its own merged
    `ffn_*_exps` tensor; the router is F32 in every file), by the weight's GGUF type:
      - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_0 -> Q8_0/Q8_1 activations: int8 per 32 values,
        q = round(x * 127 / amax), value q * fp16(amax / 127);
      - K-quants and TQ types -> Q8_K activations: int8 per 256 values, with m the value of largest
        magnitude, q = min(127, round(x * -127 / m)), value q * (1 / (-127 / m)), fp32 scale;
      - F16 / BF16 -> activations rounded to fp16 / bf16; F32 -> unchanged.
  * attention: Q, K and V rounded to fp16 (K and V live in an fp16 cache; Q meets K in an F16
    matmul), softmax in fp32, the probabilities rounded to fp16 before they meet V.
Rounding is to nearest, ties to even, as llama.cpp's x86 kernels do. Not emulated: the order of
float sums inside llama.cpp's dot products (a relative effect of about 1e-7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsq.errors import GSQError
from gsq.gguf import TYPES, model_hparams, tensor_name, tensor_slot

ATTENTION_NAME = "gsq_llamacpp"
EXPERTS_NAME = "gsq_llamacpp"  # transformers experts implementation (MoE models)
_ROUNDINGS_ATTR = "_gsq_llamacpp_roundings"  # (gate, up, down) on an experts module

# GGUF weight type -> how llama.cpp's CPU backend rounds the activations that meet it (the type
# table's activation partner).
ACTIVATION_ROUNDING = {name: t.activation for name, t in TYPES.items()}


# --------------------------------------------------------------------------------------------
# Pure tensor math: one rounding per llama.cpp activation format


def _blocks(x: Tensor, size: int) -> Tensor:
    """x [..., n] fp32 -> [..., n / size, size]; GSQError if n is not whole blocks."""
    if x.shape[-1] % size:
        raise GSQError(f"activation rows of {x.shape[-1]} values are not whole blocks of {size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _const(value: float, like: Tensor) -> Tensor:
    """`value` as a tensor like `like`: `value / t` with a Python scalar is computed as
    value * (1 / t) by PyTorch, one rounding more than C's division."""
    return torch.full_like(like, value)


def round_q8_0(x: Tensor) -> Tensor:
    """x [..., n] (n a multiple of 32) as llama.cpp's Q8_0 activations hold it, fp32 [..., n]."""
    b = _blocks(x.float(), 32)
    amax = b.abs().amax(dim=-1, keepdim=True)  # [..., n/32, 1]
    inv = torch.where(amax > 0, _const(127.0, amax) / amax, torch.zeros_like(amax))
    d = (amax / 127.0).half().float()  # the block scale is stored as fp16
    return (torch.round(b * inv) * d).reshape(x.shape)


def round_q8_k(x: Tensor) -> Tensor:
    """x [..., n] (n a multiple of 256) as llama.cpp's Q8_K activations hold it, fp32 [..., n].

    The scale follows the signed value of largest magnitude m (the first one on ties):
    iscale = -127 / m, so m itself maps to -127 and nothing rounds past +127."""
    b = _blocks(x.float(), 256)
    first_max = b.abs().argmax(dim=-1, keepdim=True)  # [..., n/256, 1]
    m = b.gather(-1, first_max)
    iscale = torch.where(m != 0, _const(-127.0, m) / m, torch.zeros_like(m))
    d = torch.where(m != 0, _const(1.0, m) / iscale, torch.zeros_like(m))
    q = torch.round(b * iscale).clamp(max=127)
    return (q * d).reshape(x.shape)


def round_activations(x: Tensor, rounding: str | None) -> Tensor:
    """x rounded as `rounding` ('q8_0', 'q8_K', 'f16', 'bf16' or None) says, in x's dtype."""
    if rounding is None:
        return x
    if rounding == "f16":
        return x.half().to(x.dtype)
    if rounding == "bf16":
        return x.bfloat16().to(x.dtype)
    rounded = round_q8_0(x) if rounding == "q8_0" else round_q8_k(x)
    return rounded.to(x.dtype)


def f16_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                  scaling: float) -> Tensor:
    """llama.cpp's attention without flash attention, for query [b, h, n, d], key and value
    [b, h_kv, m, d] (after RoPE) and an additive float mask [b, 1, n, m] or None (then causal,
    the n queries being the last n of the m positions). Returns [b, n, h, d]."""
    rep = query.shape[1] // key.shape[1]
    q = query.half().float()
    k = key.half().float().repeat_interleave(rep, dim=1)
    v = value.half().float().repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scaling  # [b, h, n, m] fp32
    if mask is None:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril(m - n)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., : scores.shape[-1]], float("-inf"))
    else:
        scores = scores + mask[..., : scores.shape[-1]].float()
    probs = F.softmax(scores, dim=-1).half().float()
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Model plumbing


def _attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **_: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature around `f16_attention`."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return f16_attention(query, key, value, attention_mask, scaling), None


def _register_attention() -> None:
    """Make ATTENTION_NAME a transformers attention implementation (eager-style float mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                     top_k_weights: Tensor) -> Tensor:
    """transformers' experts-function signature: routed experts `(T, H)` -> `(T, H)` with the
    fused weights gate_up_proj `(E, 2I, H)` (gate rows first) and down_proj `(E, H, I)`, gate
    and up computed apart (two llama.cpp matmuls, each rounding its input by its own type)."""
    round_gate, round_up, round_down = getattr(module, _ROUNDINGS_ATTR)
    out = torch.zeros_like(hidden_states)
    inter = module.down_proj.shape[-1]
    for e in top_k_index.unique().tolist():
        if e >= module.gate_up_proj.shape[0]:  # transformers' "no expert" index
            continue
        tokens, slot = torch.where(top_k_index == e)
        x = hidden_states[tokens]
        w = module.gate_up_proj[e]
        gate = F.linear(round_activations(x, round_gate), w[:inter])
        up = F.linear(round_activations(x, round_up), w[inter:])
        h = module.act_fn(gate) * up
        y = F.linear(round_activations(h, round_down), module.down_proj[e])
        out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
    return out


def _register_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_NAME, _experts_forward)


def _is_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module (3-D gate_up_proj and down_proj parameters)."""
    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in ("gate_up_proj", "down_proj"))


def _rounding_of(gguf_name: str, tensor_types: dict[str, str], module: str) -> str | None:
    qtype = tensor_types.get(gguf_name)
    if qtype is None:
        raise GSQError(f"the GGUF file has no tensor '{gguf_name}' for module '{module}'")
    if qtype not in ACTIVATION_ROUNDING:
        raise GSQError(f"--numerics llama.cpp does not know how llama.cpp rounds the "
                       f"activations of a {qtype} tensor ('{gguf_name}')")
    return ACTIVATION_ROUNDING[qtype]


def linear_roundings(model: nn.Module, tensor_types: dict[str, str]) -> dict[str, Any]:
    """HF module name -> activation rounding, from the GGUF tensor types of the file the model
    was read from (`tensor_types`: GGUF tensor name -> type name): one rounding per linear, a
    (gate, up, down) triple per fused-experts module (from ffn_{gate,up,down}_exps). lm_head
    reads the type of `output.weight`, or of `token_embd.weight` when the file ties them as
    llama.cpp does."""
    hp = model_hparams(model.config)
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if _is_experts(module):
            slots = [tensor_slot(f"{name}.0.{part}.weight", hp)[0]
                     for part in ("gate_proj", "up_proj", "down_proj")]
            out[name] = tuple(_rounding_of(s, tensor_types, name) for s in slots)
            continue
        if not isinstance(module, nn.Linear):
            continue
        gguf_name = tensor_name(f"{name}.weight", hp)
        if gguf_name == "output.weight" and gguf_name not in tensor_types:
            gguf_name = "token_embd.weight"
        out[name] = _rounding_of(gguf_name, tensor_types, name)
    return out


@contextlib.contextmanager
def llamacpp_numerics(model: nn.Module, roundings: dict[str, Any]) -> Iterator[None]:
    """Within the block, `model` computes as llama.cpp's CPU backend does: every linear named in
    `roundings` rounds its input first, experts modules round each projection's input, and
    attention runs in fp16 (see the module docstring)."""
    _register_attention()
    modules = dict(model.named_modules())
    experts = {name: r for name, r in roundings.items() if isinstance(r, tuple)}
    hooks = [modules[name].register_forward_pre_hook(_input_rounder(rounding))
             for name, rounding in roundings.items()
             if rounding is not None and name not in experts]
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    experts_before = getattr(model.config, "_experts_implementation", None)
    if experts:
        _register_experts()
        for name, r in experts.items():
            setattr(modules[name], _ROUNDINGS_ATTR, r)
        model.set_experts_implementation(EXPERTS_NAME)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(before)
        if experts:
            model.set_experts_implementation(experts_before)
            for name in experts:
                delattr(modules[name], _ROUNDINGS_ATTR)


def _input_rounder(rounding: str):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (round_activations(args[0], rounding), *args[1:])
    return hook
