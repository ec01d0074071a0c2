"""llama.cpp architectures: their keys, tensor names and row layouts (formats.md B.2, B.3).

One `Architecture` entry per llama.cpp architecture gsq writes and reads: its gguf id
(`gguf.MODEL_ARCH`, which gives the HF -> GGUF tensor names through `gguf.get_tensor_name_map`),
the transformers `model_type`s it covers, whether llama.cpp wants the rows of attn_q / attn_k in
its interleaved rotary order, and the check of a transformers config for anything llama.cpp would
run differently. Adding an architecture is adding an entry (and, where its keys differ from
llama's, to `add_hparams`).

`model_hparams(config)` reads what llama.cpp needs from a transformers config (duck-typed: this
layer does not import transformers); `tensor_name`, `qk_heads`, `permute_rows` / `rotary_rows`
and `match_tensors` map tensors between the two namings and row orders.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from gsq.errors import GSQError
from gsq.gguf.codec import decode_tensor
from gsq.gguf.reader import GGUFTensor


def _check_llama(config: Any) -> None:
    """GSQError for a Llama config llama.cpp's `llama` architecture would run differently."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GSQError("GGUF export does not support Llama models with linear biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GSQError(f"GGUF export needs hidden_act 'silu'; got '{config.hidden_act}'")
    rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise GSQError(f"GGUF export does not support rope scaling '{rope_type}'")


@dataclass(frozen=True)
class Architecture:
    """How gsq writes and reads one llama.cpp architecture."""

    name: str  # general.architecture
    model_arch: gguf.MODEL_ARCH  # gguf's id: tensor names and key names
    hf_model_types: tuple[str, ...]  # transformers config.model_type values it covers
    permute_qk: bool  # llama.cpp's rotary pairs are interleaved: attn_q / attn_k rows reordered
    check_config: Callable[[Any], None]  # GSQError for configs llama.cpp would run differently


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("llama", gguf.MODEL_ARCH.LLAMA, ("llama",), True, _check_llama),
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

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]


def _rope(config: Any) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})


def model_hparams(config: Any) -> HParams:
    """HParams from a transformers config; GSQError for model types without an architecture
    entry and for anything its llama.cpp architecture would run differently."""
    arch = _arch_of_model_type(getattr(config, "model_type", "?"))
    arch.check_config(config)
    rope = _rope(config)
    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    return HParams(
        n_layer=int(config.num_hidden_layers), n_ctx=int(config.max_position_embeddings),
        d_model=int(config.hidden_size), d_ff=int(config.intermediate_size), n_head=n_head,
        n_kv_head=int(getattr(config, "num_key_value_heads", None) or n_head), head_dim=head_dim,
        rms_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        n_vocab=int(config.vocab_size), tied=bool(getattr(config, "tie_word_embeddings", False)),
        arch=arch.name)


def add_hparams(writer: Any, hp: HParams) -> None:
    """The `{arch}.*` keys of B.2 on a gguf.GGUFWriter (general.architecture is written by
    GGUFWriter itself)."""
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
    writer.add_quantization_version(2)


def check_file_hparams(fields: dict[str, Any], hp: HParams, path: str | Path) -> None:
    """Block and head counts of a file's keys against `hp` (the q/k permutation needs the heads;
    tensor shapes alone would not notice); GSQError naming the first that differs."""
    keys = gguf.Keys
    want = {keys.LLM.BLOCK_COUNT: hp.n_layer, keys.Attention.HEAD_COUNT: hp.n_head,
            keys.Attention.HEAD_COUNT_KV: hp.n_kv_head, keys.LLM.EMBEDDING_LENGTH: hp.d_model}
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


def tensor_name(hf_name: str, hp: HParams) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight' (B.3)."""
    name = _name_map(hp.arch, hp.n_layer).get_name(hf_name, try_suffixes=(".weight",))
    if name is None:
        raise GSQError(f"tensor '{hf_name}' has no llama.cpp '{hp.arch}' counterpart")
    return name


def qk_heads(gguf_name: str, hp: HParams) -> int | None:
    """Heads of the rows to permute: n_head for attn_q, n_kv_head for attn_k, None for other
    tensors and for architectures whose rotary layout matches HF's."""
    if not hp.architecture.permute_qk:
        return None
    if gguf_name.endswith(".attn_q.weight"):
        return hp.n_head
    if gguf_name.endswith(".attn_k.weight"):
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


def hf_values(t: GGUFTensor, heads: int | None) -> torch.Tensor:
    """The decoded tensor (fp32, `t.shape`) in HF row order: attn_q / attn_k rows (`heads` from
    `qk_heads`) taken back from llama.cpp's interleaved rotary order; None: as stored."""
    values = decode_tensor(t)
    return torch.from_numpy(rotary_rows(values, heads, True) if heads else values)


def match_tensors(tensors: list[GGUFTensor], model: torch.nn.Module, hp: HParams,
                  path: str | Path, owner: str = "the base model") -> dict[str, str]:
    """GGUF name -> HF parameter name for every entry of `model.state_dict()` (`lm_head.weight`
    left out when tied: llama.cpp reuses token_embd); GSQError naming the first tensor the file
    lacks or whose shape differs (`owner` names the model in it). File tensors without a
    counterpart are left out."""
    by_name = {t.name: t for t in tensors}
    out = {}
    for hf_name, value in model.state_dict().items():
        if hp.tied and hf_name == "lm_head.weight":
            continue
        gguf_name = tensor_name(hf_name, hp)
        t = by_name.get(gguf_name)
        if t is None:
            raise GSQError(f"{owner} does not match '{path}': the file has no tensor "
                           f"'{gguf_name}' (for '{hf_name}')")
        if tuple(t.shape) != tuple(value.shape):
            raise GSQError(f"{owner} does not match '{path}': '{gguf_name}' is "
                           f"{list(t.shape)} in the file but {list(value.shape)} in {owner}")
        out[gguf_name] = hf_name
    return out
