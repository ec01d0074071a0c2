"""A `.gguf` model of an architecture gsq writes, loaded by decoding its tensors with gsq's own
decoders into a transformers model built from the file's keys.

Why not transformers' GGUF reader: it rejects a whole file for one type id the `gguf` package does
not know (Q2_0, which gsq writes for 2-bit g64 linears), and it builds some of these
architectures wrongly from the keys: no rope scaling (linear, YaRN, llama3's rope_freqs), no
Qwen3 head_dim or Qwen3-MoE expert width, and llama-architecture files with experts (Mixtral)
become dense Llamas. Here the config comes from `gsq.gguf.file_hparams` / `hf_config` (the
inverse of what the export writes), the tokenizer from transformers' GGUF tokenizer reader
given a tensor-less copy of the keys (`metadata_only_gguf`), and every parameter is decoded to
fp32 (`decode_tensor`: gguf.quants' decoders, or gsq's for the types the package lacks), with
attn_q / attn_k rows taken back from llama.cpp's interleaved rotary order to HF's
(`rotary_rows`), then cast to the requested dtype. Buffers (the rotary inv_freq) are what the
config makes them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gsq.errors import GSQError
from gsq.gguf import (
    ARCHITECTURES,
    ROPE_FREQS,
    GGUFTensor,
    field_value,
    file_hparams,
    hf_config,
    hf_values,
    match_slots,
    metadata_only_gguf,
    model_hparams,
    qk_heads,
)

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# tokenizer keys -> config attributes (as transformers' GGUF reader sets them)
_TOKEN_IDS = {"tokenizer.ggml.bos_token_id": "bos_token_id",
              "tokenizer.ggml.eos_token_id": "eos_token_id",
              "tokenizer.ggml.unknown_token_id": "unk_token_id",
              "tokenizer.ggml.padding_token_id": "pad_token_id"}


def reads_architecture(fields: dict[str, Any]) -> bool:
    """True if the file's `general.architecture` is one this module loads."""
    arch = fields.get("general.architecture")
    return arch is not None and str(field_value(arch)) in SUPPORTED_ARCHITECTURES


def load_decoded_gguf(path: Path, fields: dict[str, Any], tensors: list[GGUFTensor],
                      dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file read by `read_gguf` (`fields`, `tensors`), every
    parameter decoded by gsq and cast to `dtype`; GSQError for other architectures, missing
    tensors or shapes that do not match the keys."""
    from transformers import AutoModelForCausalLM

    config, tokenizer = gguf_config_and_tokenizer(path, fields, tensors)
    log.info("loading GGUF %s (%s, decoded by gsq to %s)", path, config.model_type, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fill_parameters(model, tensors, path)
    return model, tokenizer


def gguf_config_and_tokenizer(path: Path, fields: dict[str, Any],
                              tensors: list[GGUFTensor]) -> tuple[Any, Any]:
    """transformers' config (as gsq reads the file's keys: `file_hparams`, `hf_config`) and
    tokenizer of a GGUF file of an architecture gsq writes, without its weights."""
    from transformers import AutoConfig

    try:
        hp = file_hparams(fields, tensors, path)
    except GSQError as err:
        raise GSQError(f"cannot load GGUF model '{path}': {err}") from None
    model_type, kwargs = hf_config(hp)
    kwargs.update({attr: int(field_value(fields[key])) for key, attr in _TOKEN_IDS.items()
                   if key in fields})
    return AutoConfig.for_model(model_type, **kwargs), gguf_tokenizer(path, fields)


def gguf_tokenizer(path: Path, fields: dict[str, Any]) -> Any:
    """transformers' tokenizer built from a GGUF file's keys (given a tensor-less copy of them,
    so that types the gguf package lacks do not matter), of the class AutoTokenizer picks for
    the file's model type. The class is named here because AutoTokenizer would first rebuild a
    config from the whole file with gguf's reader, which takes seconds for a 50k-token
    vocabulary, only to learn the model type."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    model_type = None
    if reads_architecture(fields):
        hp_arch = ARCHITECTURES[str(field_value(fields["general.architecture"]))]
        model_type = hp_arch.hf_model_types[0]
    cls = tokenizer_class_from_name(TOKENIZER_MAPPING_NAMES.get(model_type) or
                                    "TokenizersBackend") if model_type else None
    with metadata_only_gguf(fields, path.name) as meta:
        try:
            return (cls or AutoTokenizer).from_pretrained(str(meta.parent), gguf_file=meta.name)
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GSQError(f"transformers cannot build a tokenizer from '{path}': "
                           f"{reason}") from err


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of `model` under its checkpoint name (a tied lm_head once, as the
    embedding); an MoE model's fused expert parameters as one `(out, in)` view per expert
    projection, named as in the checkpoint (`...experts.{e}.gate_proj.weight`): the slices of
    the merged `ffn_*_exps` tensors the adapter maps them to."""
    from gsq.models.registry import adapter_for

    params = dict(model.named_parameters())
    adapter = adapter_for(model.config.model_type)
    experts = {f"{name}.weight": adapter.model_weight(model, name)
               for name in adapter.expert_linears(model)}
    fused = {view.untyped_storage().data_ptr() for view in experts.values()}
    dense = {name: p for name, p in params.items()
             if p.untyped_storage().data_ptr() not in fused}
    return {**dense, **experts}


def model_slots(tensors: list[GGUFTensor], model: torch.nn.Module, hp, path: str | Path,
                owner: str = "the base model") -> dict[tuple[str, int | None], str]:
    """(GGUF name, expert index) -> checkpoint name of every tensor of `model`
    (`checkpoint_tensors`: an expert's projection is slice e of a merged tensor); GSQError
    naming the first tensor the file lacks or whose shape differs (`gsq.gguf.match_slots`)."""
    weights = {name: tuple(p.shape) for name, p in checkpoint_tensors(model).items()}
    return match_slots(tensors, weights, hp, path, owner)


def fill_parameters(model: torch.nn.Module, tensors: list[GGUFTensor], path: Path) -> None:
    """Write every parameter of `model` from the file's decoded tensors (q/k rows in HF order).

    GSQError naming the first tensor the file lacks or whose shape differs from the model's; file
    tensors without a counterpart are ignored with a warning."""
    try:
        hp = model_hparams(model.config)
    except GSQError as err:
        raise GSQError(f"cannot load GGUF model '{path}': {err}") from None
    params = checkpoint_tensors(model)
    slots = model_slots(tensors, model, hp, path, owner="the model its keys describe")
    by_name = {t.name: t for t in tensors}
    for (gguf_name, expert), hf_name in slots.items():
        value = hf_values(by_name[gguf_name], qk_heads(gguf_name, hp), expert)
        with torch.no_grad():
            params[hf_name].copy_(value)
    unwritten = sorted(set(params) - set(slots.values()))
    if unwritten:
        raise GSQError(f"cannot load GGUF model '{path}': the file holds no tensor for "
                       f"'{unwritten[0]}'")
    used = {name for name, _ in slots} | {ROPE_FREQS}  # rope_freqs is read into the config
    unused = sorted(t.name for t in tensors if t.name not in used)
    if unused:
        log.warning("GGUF model %s: ignoring %d tensors gsq cannot place in the model (%s)",
                    path, len(unused), ", ".join(unused[:4]))
