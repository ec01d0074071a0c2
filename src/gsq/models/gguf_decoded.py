"""A `.gguf` model whose tensor types transformers' GGUF reader lacks (Q2_0, which gsq writes for
2-bit g64 linears), loaded by decoding its tensors with gsq's own decoders.

transformers rejects the whole file for one type id the `gguf` package does not know, but it builds
the config and the tokenizer from the keys alone, so it is given a tensor-less copy of the keys
(`metadata_only_gguf`). The model is made from that config (`from_config`) and every parameter is
then filled from the file: decoded to fp32 (`decode_tensor`), attn_q / attn_k rows taken back from
llama.cpp's interleaved rotary order to HF's (`rotary_rows`), cast to the requested dtype. Buffers
(the rotary inv_freq) stay as `from_config` makes them. Only the architectures gsq
exports (`gsq.gguf.ARCHITECTURES`) are read this way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gsq.errors import GSQError
from gsq.gguf import (
    ARCHITECTURES,
    GGUFTensor,
    field_value,
    hf_values,
    match_tensors,
    metadata_only_gguf,
    missing_types,
    model_hparams,
    qk_heads,
)

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def load_decoded_gguf(path: Path, fields: dict[str, Any], tensors: list[GGUFTensor],
                      dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file read by `read_gguf` (`fields`, `tensors`), every
    parameter decoded by gsq and cast to `dtype`; GSQError for other architectures, missing
    tensors or shapes that do not match the keys."""
    from transformers import AutoModelForCausalLM

    _check_architecture(path, fields, tensors)
    log.info("loading GGUF %s (tensor types %s decoded by gsq, to %s)", path,
             ", ".join(missing_types(tensors)), dtype)
    config, tokenizer = gguf_config_and_tokenizer(path, fields, tensors)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fill_parameters(model, tensors, path)
    return model, tokenizer


def gguf_config_and_tokenizer(path: Path, fields: dict[str, Any],
                              tensors: list[GGUFTensor]) -> tuple[Any, Any]:
    """transformers' config (tied embeddings and vocabulary size as the tensors say) and
    tokenizer of a `llama` GGUF file, built from its keys alone."""
    _check_architecture(path, fields, tensors)
    config, tokenizer = _config_and_tokenizer(path, fields)
    names = {t.name for t in tensors}
    config.tie_word_embeddings = "output.weight" not in names  # llama.cpp reuses token_embd
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is not None:
        config.vocab_size = int(embd.shape[0])  # the keys may lack llama.vocab_size
    return config, tokenizer


def _check_architecture(path: Path, fields: dict[str, Any], tensors: list[GGUFTensor]) -> None:
    """GSQError unless the file's `general.architecture` is one this module reads."""
    if "general.architecture" not in fields:
        raise GSQError(f"cannot load GGUF model '{path}': it has no general.architecture key")
    arch = str(field_value(fields["general.architecture"]))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GSQError(
            f"GGUF model '{path}' has architecture '{arch}' and {', '.join(missing_types(tensors))}"
            f" tensors, which transformers cannot read; gsq decodes them itself only for the "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} architecture")


def _config_and_tokenizer(path: Path, fields: dict[str, Any]) -> tuple[Any, Any]:
    """transformers' config and tokenizer built from the file's keys (a tensor-less copy)."""
    from transformers import AutoConfig, AutoTokenizer

    with metadata_only_gguf(fields, path.name) as meta:
        folder, name = str(meta.parent), meta.name
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GSQError(f"cannot load GGUF model '{path}': {reason}") from err
    return config, tokenizer


def fill_parameters(model: torch.nn.Module, tensors: list[GGUFTensor], path: Path) -> None:
    """Write every parameter of `model` from the file's decoded tensors (q/k rows in HF order).

    GSQError naming the first tensor the file lacks or whose shape differs from the model's; file
    tensors without a counterpart are ignored with a warning."""
    try:
        hp = model_hparams(model.config)
    except GSQError as err:
        raise GSQError(f"cannot load GGUF model '{path}': {err}") from None
    by_gguf = match_tensors(tensors, model, hp, path, owner="the model its keys describe")
    params = dict(model.named_parameters())  # a tied lm_head is not listed twice
    written = set()
    for t in tensors:
        hf_name = by_gguf.get(t.name)
        if hf_name is None or hf_name not in params:
            continue
        with torch.no_grad():
            params[hf_name].copy_(hf_values(t, qk_heads(t.name, hp)))
        written.add(hf_name)
    unwritten = sorted(set(params) - written)
    if unwritten:
        raise GSQError(f"cannot load GGUF model '{path}': the file holds no tensor for "
                       f"'{unwritten[0]}'")
    unused = sorted({t.name for t in tensors} - set(by_gguf))
    if unused:
        log.warning("GGUF model %s: ignoring %d tensors gsq cannot place in the model (%s)",
                    path, len(unused), ", ".join(unused[:4]))
