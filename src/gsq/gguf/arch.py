"""llama.cpp architectures: their keys, tensor names and row layouts (formats.md B.2, B.3).

One `Architecture` entry per llama.cpp architecture gsq writes and reads: its gguf id
(`gguf.MODEL_ARCH`, which gives the HF -> GGUF tensor names through `gguf.get_tensor_name_map`),
the transformers `model_type`s it covers, whether llama.cpp wants the rows of attn_q / attn_k in
its interleaved rotary order, how its experts are sized, and the checks of a transformers config
for anything llama.cpp would run differently. The facts follow llama.cpp's own converter
(convert_hf_to_gguf.py) and loader (src/models/<arch>.cpp):

| arch     | HF model types          | q/k rows    | extras                                  |
|----------|-------------------------|-------------|-----------------------------------------|
| llama    | llama, mistral, mixtral | interleaved | rope_freqs (llama3 rope); Mixtral's     |
|          |                         |             | expert keys (feed_forward_length is the |
|          |                         |             | expert width)                           |
| qwen2    | qwen2                   | as in HF    | q/k/v biases                            |
| qwen3    | qwen3                   | as in HF    | attn_q_norm / attn_k_norm               |
| qwen3moe | qwen3_moe               | as in HF    | q/k norms, expert keys with             |
|          |                         |             | expert_feed_forward_length; top-k       |
|          |                         |             | weights always renormalised             |

Experts are 3-D tensors `ffn_{gate,up,down}_exps` `[n_expert, out, in]`; the checkpoint holds one
2-D tensor per expert (`...experts.{e}.gate_proj.weight`), which is slice `e` of the merged one
(`tensor_slot`). Routers (`ffn_gate_inp`) and 1-D tensors are always F32, as the converter
writes them (`always_f32`).

`model_hparams(config)` reads what llama.cpp needs from a transformers config (duck-typed: this
layer does not import transformers); `file_hparams(fields, tensors)` reads the same from a GGUF
file and `hf_config(hp)` turns it back into a transformers config (model type + keyword
arguments). `tensor_slot`, `qk_heads`, `permute_rows` / `rotary_rows` and `match_tensors` map
tensors between the two namings and row orders.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from gsq.errors import GSQError
from gsq.gguf.codec import decode_tensor
from gsq.gguf.reader import GGUFTensor, field_value

ROPE_FREQS = "rope_freqs.weight"  # llama3 rope: per-frequency divisors, F32 [head_dim / 2]


# --------------------------------------------------------------------------------------------
# Config checks: what llama.cpp would run differently


def _rope(config: Any) -> dict:
    """The config's rope parameters (transformers 5 `rope_parameters`, or the older
    `rope_scaling`) with the rope type under 'rope_type'."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    rope.pop("type", None)
    return rope


# rope type -> the parameters besides rope_theta that llama.cpp reproduces (others are refused)
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def _check_rope(config: Any, rope_types: tuple[str, ...]) -> None:
    rope = _rope(config)
    kind = rope["rope_type"]
    if kind not in rope_types:
        raise GSQError(f"GGUF export does not support rope scaling '{kind}' for "
                       f"'{config.model_type}' models (supported: {', '.join(rope_types)})")
    extra = sorted(k for k, v in rope.items() if v is not None
                   and k not in ("rope_type", "rope_theta", *_ROPE_KEYS[kind]))
    if kind == "yarn" and rope.get("truncate") in (None, True):
        extra = [k for k in extra if k != "truncate"]  # the default, as llama.cpp does
    if extra:
        raise GSQError(f"GGUF export does not support {kind} rope parameters "
                       f"{', '.join(extra)} (llama.cpp would compute another rope)")
    if float(getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise GSQError("GGUF export needs rotary embeddings over the whole head "
                       "(partial_rotary_factor 1)")


def _check_common(config: Any, rope_types: tuple[str, ...]) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GSQError(f"GGUF export needs hidden_act 'silu'; got '{config.hidden_act}'")
    _check_rope(config, rope_types)


def _check_full_attention(config: Any) -> None:
    """Qwen's sliding-window layers: llama.cpp's qwen architectures have none."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "use_sliding_window", False) or types != {"full_attention"}:
        raise GSQError(f"GGUF export does not support sliding-window attention layers "
                       f"('{config.model_type}' with use_sliding_window)")


def _check_llama(config: Any) -> None:
    """llama, mistral and mixtral configs, which llama.cpp runs as its `llama` architecture."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GSQError("GGUF export does not support Llama models with linear biases")
    _check_common(config, ("default", "linear", "yarn", "llama3"))


def _check_qwen2(config: Any) -> None:
    _check_common(config, ("default", "linear", "yarn"))
    _check_full_attention(config)
    head_dim = getattr(config, "head_dim", None)
    if head_dim and head_dim * config.num_attention_heads != config.hidden_size:
        raise GSQError("GGUF export needs head_dim x heads = hidden_size for qwen2 models "
                       "(llama.cpp's qwen2 architecture assumes it)")


def _check_qwen3(config: Any) -> None:
    _check_common(config, ("default", "linear", "yarn"))
    _check_full_attention(config)
    if getattr(config, "attention_bias", False):
        raise GSQError("GGUF export does not support Qwen3 models with attention biases")


def _check_qwen3moe(config: Any) -> None:
    _check_qwen3(config)
    if not getattr(config, "norm_topk_prob", False):
        raise GSQError("GGUF export needs norm_topk_prob true for qwen3_moe models: llama.cpp "
                       "always renormalises the top-k expert weights")
    if list(getattr(config, "mlp_only_layers", None) or []) or \
            int(getattr(config, "decoder_sparse_step", 1) or 1) != 1:
        raise GSQError("GGUF export needs every qwen3_moe layer sparse (no mlp_only_layers, "
                       "decoder_sparse_step 1): llama.cpp's qwen3moe has no dense layers")


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Architecture:
    """How gsq writes and reads one llama.cpp architecture."""

    name: str  # general.architecture
    model_arch: gguf.MODEL_ARCH  # gguf's id: tensor names and key names
    hf_model_types: tuple[str, ...]  # transformers config.model_type values it covers
    permute_qk: bool  # llama.cpp's rotary pairs are interleaved: attn_q / attn_k rows reordered
    check_config: Callable[[Any], None]  # GSQError for configs llama.cpp would run differently
    moe_model_type: str | None = None  # model type of a file with experts (read back)
    expert_ff_key: bool = False  # expert width in {arch}.expert_feed_forward_length

    def model_type(self, hp: HParams) -> str:
        """The transformers model type a file of this architecture is read back as."""
        return self.moe_model_type if hp.n_expert and self.moe_model_type else \
            self.hf_model_types[0]


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("llama", gguf.MODEL_ARCH.LLAMA, ("llama", "mistral", "mixtral"), True,
                 _check_llama, moe_model_type="mixtral"),
    Architecture("qwen2", gguf.MODEL_ARCH.QWEN2, ("qwen2",), False, _check_qwen2),
    Architecture("qwen3", gguf.MODEL_ARCH.QWEN3, ("qwen3",), False, _check_qwen3),
    Architecture("qwen3moe", gguf.MODEL_ARCH.QWEN3MOE, ("qwen3_moe",), False, _check_qwen3moe,
                 moe_model_type="qwen3_moe", expert_ff_key=True),
)}
SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES.values() for t in a.hf_model_types)


def architecture(name: str) -> Architecture:
    """The entry of a GGUF `general.architecture`; GSQError naming the supported ones."""
    if name not in ARCHITECTURES:
        raise GSQError(f"architecture '{name}' is not supported; gsq reads and writes "
                       f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _arch_of_model_type(model_type: str) -> Architecture:
    for arch in ARCHITECTURES.values():
        if model_type in arch.hf_model_types:
            return arch
    raise GSQError(f"GGUF export supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                   f"this model is '{model_type}'")


# --------------------------------------------------------------------------------------------
# Hyper-parameters


@dataclass(frozen=True)
class HParams:
    """What llama.cpp reads from the GGUF keys of a llama-like architecture (B.2)."""

    n_layer: int
    n_ctx: int
    d_model: int
    d_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    n_vocab: int
    tied: bool  # lm_head shares the embedding matrix (no output.weight tensor)
    arch: str = "llama"  # general.architecture
    rope: tuple[tuple[str, Any], ...] = ()  # rope scaling: sorted (key, value), no rope_theta
    n_expert: int = 0
    n_expert_used: int = 0
    d_ff_expert: int = 0  # expert width where the architecture keys it apart from d_ff

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def rope_params(self) -> dict:
        """transformers' rope_parameters (rope_theta included)."""
        return {"rope_type": "default", **dict(self.rope), "rope_theta": self.rope_theta}


def model_hparams(config: Any) -> HParams:
    """HParams from a transformers config; GSQError for model types without an architecture
    entry and for anything its llama.cpp architecture would run differently."""
    arch = _arch_of_model_type(getattr(config, "model_type", "?"))
    arch.check_config(config)
    rope = _rope(config)
    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    scaling = {k: rope[k] for k in _ROPE_KEYS[rope["rope_type"]] if rope.get(k) is not None}
    if rope["rope_type"] == "yarn":
        scaling.setdefault("original_max_position_embeddings",
                           int(config.max_position_embeddings))
    n_expert = int(getattr(config, "num_local_experts", None)
                   or getattr(config, "num_experts", None) or 0)
    return HParams(
        n_layer=int(config.num_hidden_layers), n_ctx=_context_length(config),
        d_model=int(config.hidden_size), d_ff=int(config.intermediate_size), n_head=n_head,
        n_kv_head=int(getattr(config, "num_key_value_heads", None) or n_head), head_dim=head_dim,
        rms_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        n_vocab=int(config.vocab_size), tied=bool(getattr(config, "tie_word_embeddings", False)),
        arch=arch.name,
        rope=tuple(sorted({**scaling, "rope_type": rope["rope_type"]}.items()))
        if rope["rope_type"] != "default" else (),
        n_expert=n_expert, n_expert_used=int(getattr(config, "num_experts_per_tok", 0) or 0)
        if n_expert else 0,
        d_ff_expert=int(config.moe_intermediate_size) if n_expert and arch.expert_ff_key else 0)


def _context_length(config: Any) -> int:
    """max_position_embeddings, capped at a Mistral/Mixtral sliding window: llama.cpp's llama
    architecture attends to the whole context, which equals sliding-window attention exactly
    as long as the context is no longer than the window."""
    n_ctx = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and config.model_type in ("mistral", "mixtral"):
        return min(n_ctx, int(window))
    return n_ctx


def add_hparams(writer: Any, hp: HParams) -> None:
    """The `{arch}.*` keys of B.2 on a gguf.GGUFWriter (general.architecture is written by
    GGUFWriter itself). Keys beyond a plain Llama's are written only where they apply, after
    the others."""
    writer.add_block_count(hp.n_layer)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.d_model)
    writer.add_feed_forward_length(hp.d_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_kv_head)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.d_model:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_vocab_size(hp.n_vocab)
    _add_rope_scaling(writer, hp.rope_params)
    if hp.n_expert:
        writer.add_expert_count(hp.n_expert)
        writer.add_expert_used_count(hp.n_expert_used)
        if hp.architecture.expert_ff_key:
            writer.add_expert_feed_forward_length(hp.d_ff_expert)
    writer.add_quantization_version(2)


def _add_rope_scaling(writer: Any, rope: dict) -> None:
    """Linear and YaRN rope as keys (as the converter writes them); llama3's is a tensor."""
    kind = rope["rope_type"]
    if kind not in ("linear", "yarn"):
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
    writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))


def extra_tensors(hp: HParams) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that have no checkpoint counterpart: llama3 rope's
    `rope_freqs.weight` (F32)."""
    rope = hp.rope_params
    if rope["rope_type"] != "llama3":
        return {}
    return {ROPE_FREQS: llama3_rope_factors(rope, hp.head_dim)}


def _wavelengths(theta: float, head_dim: int) -> np.ndarray:
    """2π / ω_i of the rotary frequencies ω_i = theta^(-2i/head_dim), float64 [head_dim / 2]."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    return 2 * math.pi / freqs.astype(np.float64)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The divisor of each rotary frequency under llama3 rope scaling, float32 [head_dim / 2],
    as llama.cpp's converter computes it (1 for short wavelengths, `factor` for long ones, a
    smooth blend between)."""
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for wavelen in _wavelengths(float(rope["rope_theta"]), head_dim):
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Reading a file's hyper-parameters back


def _key(fields: dict[str, Any], template: str, arch: str, default: Any = None) -> Any:
    """A key's value; float32 values as the shortest decimal that rounds to them (1e-06, not
    9.99999997e-07: the value of the config they were written from)."""
    key = template.format(arch=arch)
    if key not in fields:
        return default
    value = field_value(fields[key])
    return float(str(np.float32(value))) if isinstance(value, float) else value


def file_hparams(fields: dict[str, Any], tensors: list[GGUFTensor],
                 path: str | Path) -> HParams:
    """HParams of a GGUF file of a supported architecture, from its keys and tensors (the
    inverse of `add_hparams`); GSQError for other architectures and missing keys."""
    if "general.architecture" not in fields:
        raise GSQError(f"GGUF file '{path}' has no general.architecture key")
    arch = architecture(str(field_value(fields["general.architecture"]))).name
    k, names = gguf.Keys, {t.name: t for t in tensors}

    def need(template: str) -> Any:
        value = _key(fields, template, arch)
        if value is None:
            raise GSQError(f"GGUF file '{path}' has no key '{template.format(arch=arch)}'")
        return value

    n_head = int(need(k.Attention.HEAD_COUNT))
    d_model = int(need(k.LLM.EMBEDDING_LENGTH))
    head_dim = int(_key(fields, k.Attention.KEY_LENGTH, arch, 0) or d_model // n_head)
    embd = names.get("token_embd.weight")
    n_vocab = _key(fields, k.LLM.VOCAB_SIZE, arch) or (embd.shape[0] if embd else None)
    if n_vocab is None:
        raise GSQError(f"GGUF file '{path}' has neither a vocab_size key nor token_embd")
    theta = float(_key(fields, k.Rope.FREQ_BASE, arch, 10000.0))
    n_expert = int(_key(fields, k.LLM.EXPERT_COUNT, arch, 0) or 0)
    return HParams(
        n_layer=int(need(k.LLM.BLOCK_COUNT)), n_ctx=int(need(k.LLM.CONTEXT_LENGTH)),
        d_model=d_model, d_ff=int(need(k.LLM.FEED_FORWARD_LENGTH)), n_head=n_head,
        n_kv_head=int(_key(fields, k.Attention.HEAD_COUNT_KV, arch, n_head)), head_dim=head_dim,
        rms_eps=float(need(k.Attention.LAYERNORM_RMS_EPS)), rope_theta=theta,
        n_vocab=int(n_vocab), tied="output.weight" not in names, arch=arch,
        rope=_file_rope(fields, arch, names.get(ROPE_FREQS), theta, head_dim, path),
        n_expert=n_expert,
        n_expert_used=int(_key(fields, k.LLM.EXPERT_USED_COUNT, arch, 0) or 0),
        d_ff_expert=int(_key(fields, k.LLM.EXPERT_FEED_FORWARD_LENGTH, arch, 0) or 0))


def _file_rope(fields: dict[str, Any], arch: str, freqs: GGUFTensor | None, theta: float,
               head_dim: int, path: str | Path) -> tuple[tuple[str, Any], ...]:
    """A file's rope scaling as transformers' rope parameters (sorted items, no rope_theta)."""
    k = gguf.Keys.Rope
    kind = str(_key(fields, k.SCALING_TYPE, arch, "none"))
    rope: dict[str, Any] = {}
    if kind in ("linear", "yarn"):
        rope = {"rope_type": kind, "factor": float(_key(fields, k.SCALING_FACTOR, arch, 1.0))}
    if kind == "yarn":
        rope["original_max_position_embeddings"] = int(
            _key(fields, k.SCALING_ORIG_CTX_LEN, arch, 0)
            or _key(fields, gguf.Keys.LLM.CONTEXT_LENGTH, arch))
        for name, template in (("beta_fast", k.SCALING_YARN_BETA_FAST),
                               ("beta_slow", k.SCALING_YARN_BETA_SLOW)):
            if _key(fields, template, arch) is not None:
                rope[name] = float(_key(fields, template, arch))
    elif kind not in ("none", "linear"):
        raise GSQError(f"GGUF file '{path}' has rope scaling '{kind}', which gsq does not read")
    if freqs is not None:
        if rope:
            raise GSQError(f"GGUF file '{path}' has both {ROPE_FREQS} and {kind} rope scaling")
        rope = llama3_rope_params(decode_tensor(freqs).astype(np.float64), theta, head_dim, path)
    return tuple(sorted(rope.items()))


def llama3_rope_params(factors: np.ndarray, theta: float, head_dim: int,
                       path: str | Path = "?") -> dict:
    """transformers' llama3 rope parameters that reproduce a file's `rope_freqs` divisors
    `factors` [head_dim / 2] ({} when every divisor is 1).

    The divisors fix `factor` (the largest) and two wavelength boundaries L = old/low_freq and
    H = old/high_freq: waves shorter than H keep divisor 1, longer than L get `factor`, between
    they blend with weight s = (old/λ - low) / (high - low), i.e. 1/λ = 1/L + s (1/H - 1/L).
    Only L and H are identified, so low_freq_factor is taken as 1 (as in every Llama 3.x
    config). GSQError unless the parameters reproduce every divisor."""
    if factors.shape != (head_dim // 2,):
        raise GSQError(f"GGUF file '{path}': {ROPE_FREQS} has {factors.size} values, expected "
                       f"{head_dim // 2}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return {}
    factor = float(factors.max())
    inv = 1 / _wavelengths(theta, head_dim)  # 1/λ, decreasing along the head
    short, long = np.isclose(factors, 1.0, rtol=1e-6), np.isclose(factors, factor, rtol=1e-6)
    mid = ~short & ~long
    s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    inv_l, inv_h = _llama3_bounds(inv, short, long, mid, s)
    for tidy in (_round_value, float):  # the round values of the original config, if they fit
        rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": float(tidy(inv_h / inv_l)),
                "original_max_position_embeddings": _round_value(1 / inv_l)}
        back = llama3_rope_factors({**rope, "rope_theta": theta}, head_dim)
        if np.allclose(back, factors, rtol=1e-5, atol=0):
            return rope
    raise GSQError(f"GGUF file '{path}': {ROPE_FREQS} is not a llama3 rope scaling gsq can "
                   f"express in transformers")


def _round_value(x: float) -> float | int:
    r = round(float(x), 3)
    return int(r) if r == int(r) else r


def _llama3_bounds(inv: np.ndarray, short: np.ndarray, long: np.ndarray, mid: np.ndarray,
                   s: np.ndarray) -> tuple[float, float]:
    """(1/L, 1/H) for `llama3_rope_params`: a line fit 1/λ = 1/L + s (1/H - 1/L) over two or
    more blended waves, else values inside the bounds the waves allow: 1/L above every long
    wave's 1/λ and at most the others', 1/H at least every non-short wave's and below the
    short ones'."""
    if mid.sum() >= 2:
        slope, inv_l = np.polyfit(s, inv[mid], 1)
        return float(inv_l), float(inv_l + slope)
    floor = float(inv[long].max()) if long.any() else 0.0
    ceil = float(inv[short].min()) if short.any() else 4.0 * float(inv.max())
    if not mid.any():
        inv_l = _whole_context(floor + (ceil - floor) / 3, floor, ceil)
        return inv_l, (inv_l + ceil) / 2
    v, w = float(inv[mid][0]), float(s[0])  # 1/H = 1/L + (v - 1/L) / w must stay below ceil
    low = max(floor, (v - w * ceil) / (1 - w))
    inv_l = _whole_context((low + v) / 2, low, v)
    return inv_l, inv_l + (v - inv_l) / w


def _whole_context(inv_l: float, low: float, high: float) -> float:
    """1/L moved to the nearest whole original context length L that keeps it in (low, high]
    (transformers wants an integer original_max_position_embeddings), else unchanged."""
    whole = 1 / max(1, round(1 / inv_l))
    return whole if low < whole <= high else inv_l


def hf_config(hp: HParams) -> tuple[str, dict]:
    """(model_type, keyword arguments of `AutoConfig.for_model`) of a model llama.cpp would run
    as `hp` describes: the inverse of `model_hparams`."""
    arch = hp.architecture
    model_type = arch.model_type(hp)
    kwargs = dict(
        vocab_size=hp.n_vocab, hidden_size=hp.d_model, intermediate_size=hp.d_ff,
        num_hidden_layers=hp.n_layer, num_attention_heads=hp.n_head,
        num_key_value_heads=hp.n_kv_head, head_dim=hp.head_dim, max_position_embeddings=hp.n_ctx,
        rms_norm_eps=hp.rms_eps, rope_parameters=hp.rope_params, tie_word_embeddings=hp.tied,
        hidden_act="silu")
    if model_type in ("mistral", "mixtral"):
        kwargs["sliding_window"] = None
    if hp.n_expert:
        kwargs.update(num_experts_per_tok=hp.n_expert_used)
        kwargs["num_local_experts" if model_type == "mixtral" else "num_experts"] = hp.n_expert
    if arch.expert_ff_key:
        kwargs.update(moe_intermediate_size=hp.d_ff_expert, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[])
    return model_type, kwargs


def check_file_hparams(fields: dict[str, Any], hp: HParams, path: str | Path) -> None:
    """Block and head counts of a file's keys against `hp` (the q/k permutation needs the heads;
    tensor shapes alone would not notice); GSQError naming the first that differs."""
    keys = gguf.Keys
    arch = field_value(fields["general.architecture"]) if "general.architecture" in fields \
        else hp.arch
    if arch != hp.arch:
        raise GSQError(f"the base model does not match '{path}': its architecture is '{arch}' "
                       f"in the file but '{hp.arch}' for the base model")
    want = {keys.LLM.BLOCK_COUNT: hp.n_layer, keys.Attention.HEAD_COUNT: hp.n_head,
            keys.Attention.HEAD_COUNT_KV: hp.n_kv_head, keys.LLM.EMBEDDING_LENGTH: hp.d_model,
            keys.LLM.EXPERT_COUNT: hp.n_expert, keys.LLM.EXPERT_USED_COUNT: hp.n_expert_used}
    for template, value in want.items():
        key = template.format(arch=hp.arch)
        if key in fields and int(fields[key].contents()) != value:
            raise GSQError(f"the base model does not match '{path}': {key} is "
                           f"{int(fields[key].contents())} in the file but {value} in the base")


# --------------------------------------------------------------------------------------------
# Tensor names and row orders


@functools.lru_cache(maxsize=16)
def _name_map(arch: str, n_layer: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(ARCHITECTURES[arch].model_arch, n_layer)


_EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<e>\d+)\.(?P<tail>[^.]+(?:\.weight)?)$")


def tensor_slot(hf_name: str, hp: HParams) -> tuple[str, int | None]:
    """(GGUF tensor name, expert index) of a checkpoint tensor: the expert index is the slice
    of a merged `ffn_*_exps` tensor an expert's projection fills, None for other tensors.
    'model.layers.0.self_attn.q_proj.weight' -> ('blk.0.attn_q.weight', None);
    'model.layers.3.mlp.experts.5.up_proj.weight' -> ('blk.3.ffn_up_exps.weight', 5)."""
    match = _EXPERT.match(hf_name)
    merged = f"{match['head']}.{match['tail']}" if match else hf_name
    name = _name_map(hp.arch, hp.n_layer).get_name(merged, try_suffixes=(".weight", ".bias"))
    if name is None or (match is not None) != name.endswith("_exps.weight"):
        raise GSQError(f"tensor '{hf_name}' has no llama.cpp '{hp.arch}' counterpart")
    return name, int(match["e"]) if match else None


def tensor_name(hf_name: str, hp: HParams) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight' (B.3); GSQError for
    an expert's projection (a slice of a merged tensor: `tensor_slot`)."""
    name, expert = tensor_slot(hf_name, hp)
    if expert is not None:
        raise GSQError(f"tensor '{hf_name}' is expert {expert} of '{name}', not a tensor")
    return name


def always_f32(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp keeps in F32 whatever the file type: 1-D ones (norms, biases,
    rope_freqs) and the expert routers `ffn_gate_inp` (as its converter and quantizer do)."""
    return len(shape) == 1 or gguf_name.endswith(".ffn_gate_inp.weight")


def qk_heads(gguf_name: str, hp: HParams) -> int | None:
    """Heads of the rows to permute: n_head for attn_q, n_kv_head for attn_k, None for other
    tensors and for architectures whose rotary layout matches HF's."""
    if not hp.architecture.permute_qk:
        return None
    if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
        return hp.n_head
    if gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
        return hp.n_kv_head
    return None


def permute_rows(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary rows -> llama.cpp's interleaved ones (B.3), for any [out, ...]
    tensor: a weight [out, in], codes [out, in] or scales [out, in/G] alike."""
    out = x.shape[0]
    if out % (2 * n_heads):
        raise GSQError(f"{out} rows cannot be split into {n_heads} heads of rotary pairs")
    return (x.reshape(n_heads, 2, out // n_heads // 2, *x.shape[1:]).transpose(1, 2)
            .reshape(x.shape))


def rotary_rows(x: np.ndarray, n_heads: int, to_hf: bool) -> np.ndarray:
    """Reorder the rows of an `(out, ...)` array between HF's half-split rotary layout and
    llama.cpp's interleaved one (`permute_rows` is the HF -> llama.cpp direction in torch)."""
    out = x.shape[0]
    if out % (2 * n_heads):
        raise GSQError(f"{out} rows cannot be split into {n_heads} heads of rotary pairs")
    half = out // n_heads // 2
    split = (n_heads, half, 2) if to_hf else (n_heads, 2, half)
    return np.ascontiguousarray(x.reshape(*split, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape))


def expert_slice(t: GGUFTensor, expert: int) -> GGUFTensor:
    """Expert `expert`'s `(out, in)` part of a merged `[n_expert, out, in]` tensor: its rows of
    blocks (experts are stored one after the other) and their absolute offset in the file."""
    if len(t.shape) != 3 or not 0 <= expert < t.shape[0]:
        raise GSQError(f"'{t.name}' {list(t.shape)} has no expert {expert}")
    rows = t.data.shape[0] // t.shape[0]  # one expert's rows of blocks
    data = t.data[expert * rows:(expert + 1) * rows]
    return GGUFTensor(t.name, t.type_name, t.shape[1:], data, t.offset + expert * data.nbytes)


def hf_values(t: GGUFTensor, heads: int | None, expert: int | None = None) -> torch.Tensor:
    """The decoded tensor (fp32, `t.shape`, or expert `expert`'s slice of a merged one) in HF
    row order: attn_q / attn_k rows (`heads` from `qk_heads`) taken back from llama.cpp's
    interleaved rotary order; None: as stored."""
    if expert is not None:
        t = expert_slice(t, expert)
    values = decode_tensor(t)
    return torch.from_numpy(rotary_rows(values, heads, True) if heads else values)


def match_slots(tensors: list[GGUFTensor], weights: dict[str, tuple[int, ...]], hp: HParams,
                path: str | Path, owner: str = "the base model",
                ) -> dict[tuple[str, int | None], str]:
    """(GGUF name, expert index) -> checkpoint name for every entry of `weights` (checkpoint
    name -> shape; an expert's projection is slice `e` of a merged tensor; `lm_head.weight` is
    left out when tied: llama.cpp reuses token_embd); GSQError naming the first tensor the file
    lacks or whose shape differs (`owner` names the model in it). File tensors without a
    counterpart are left out."""
    by_name = {t.name: t for t in tensors}
    out = {}
    for hf_name, shape in weights.items():
        if hp.tied and hf_name == "lm_head.weight":
            continue
        gguf_name, expert = tensor_slot(hf_name, hp)
        t = by_name.get(gguf_name)
        if t is None:
            raise GSQError(f"{owner} does not match '{path}': the file has no tensor "
                           f"'{gguf_name}' (for '{hf_name}')")
        file_shape = tuple(t.shape[1:] if expert is not None else t.shape)
        if file_shape != tuple(shape) or (expert is not None and expert >= t.shape[0]):
            raise GSQError(f"{owner} does not match '{path}': '{gguf_name}' is "
                           f"{list(t.shape)} in the file but {list(shape)} in {owner}"
                           + (f" (expert {expert})" if expert is not None else ""))
        out[(gguf_name, expert)] = hf_name
    return out


def match_tensors(tensors: list[GGUFTensor], model: torch.nn.Module, hp: HParams,
                  path: str | Path, owner: str = "the base model") -> dict[str, str]:
    """GGUF name -> HF parameter name for every entry of a dense `model.state_dict()`
    (`match_slots` over its parameters; a model with merged expert parameters needs
    `match_slots` with its checkpoint names)."""
    weights = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    return {name: hf for (name, _), hf in match_slots(tensors, weights, hp, path, owner).items()}
