"""model_type -> adapter, and what gsq can do with each architecture.

Architecture is chosen by `config.model_type`, never by name substrings. What each architecture
supports (`support_table()`) comes from one place per fact:
  quantize            an adapter is registered for the model type (rtn, gptq and gsq alike);
  compressed-tensors  the adapter says its quantized linears export as compressed-tensors;
  gguf                the GGUF layer's own table of the model types it writes;
  refine              gguf and quantize: `gsq refine` reads the file with the GGUF layer and runs
                      the adapter's block loop.
`check_architecture` refuses a model type, or a model type plus what the run will need (an export
format, a GGUF target), from its config alone, before any weight is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gsq.errors import GSQError
from gsq.models.base import ModelAdapter
from gsq.models.llama import LlamaAdapter
from gsq.models.moe import MixtralAdapter, Qwen3MoeAdapter

QUANTIZE, COMPRESSED_TENSORS, GGUF, REFINE = "quantize", "compressed-tensors", "gguf", "refine"
CAPABILITIES = (QUANTIZE, COMPRESSED_TENSORS, GGUF, REFINE)

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


register_adapter(LlamaAdapter)
register_adapter(Qwen3MoeAdapter)
register_adapter(MixtralAdapter)


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter for a `config.model_type`; GSQError naming the type if unsupported."""
    if model_type not in _ADAPTERS:
        raise GSQError(f"unsupported architecture '{model_type}': gsq supports "
                       f"{', '.join(supported_model_types())}")
    return _ADAPTERS[model_type]()


# --------------------------------------------------------------------------------------------
# What each architecture supports


def _gguf_model_types() -> tuple[str, ...]:
    """The model types the GGUF layer writes (its table, not repeated here)."""
    from gsq.gguf import SUPPORTED_MODEL_TYPES

    return tuple(SUPPORTED_MODEL_TYPES)


def _check_gguf_config(config: Any) -> None:
    """GSQError for a config the GGUF layer would refuse (rope scaling, biases, ...)."""
    from gsq.gguf import model_hparams

    model_hparams(config)


def supports(model_type: str, capability: str) -> bool:
    """Whether gsq can do `capability` (one of CAPABILITIES) for `model_type` models."""
    if capability not in CAPABILITIES:
        raise ValueError(f"capability must be one of {', '.join(CAPABILITIES)}; "
                         f"got {capability!r}")
    adapter = _ADAPTERS.get(model_type)
    if capability == QUANTIZE:
        return adapter is not None
    if capability == COMPRESSED_TENSORS:
        return adapter is not None and adapter.compressed_tensors
    gguf = model_type in _gguf_model_types()
    return gguf if capability == GGUF else gguf and adapter is not None


def support_table() -> dict[str, dict[str, bool]]:
    """model_type -> {capability: supported} over every model type gsq quantizes."""
    return {t: {c: supports(t, c) for c in CAPABILITIES} for t in supported_model_types()}


def check_architecture(model_type: str | None, config: Any | None = None,
                       needs: Iterable[str] = ()) -> None:
    """GSQError, naming what is supported, unless gsq quantizes `model_type` and can do every
    capability in `needs` for it. With `config` (a transformers config), GGUF needs are also
    checked against its details (rope scaling, biases) as the GGUF writer would."""
    if model_type not in _ADAPTERS:
        raise GSQError(f"unsupported architecture '{model_type}': gsq supports "
                       f"{', '.join(supported_model_types())}")
    for need in dict.fromkeys(needs):
        if not supports(model_type, need):
            able = [t for t in supported_model_types() if supports(t, need)]
            raise GSQError(f"{need} is not supported for '{model_type}' models; it is for "
                           f"{', '.join(able) or 'none yet'}")
        if need in (GGUF, REFINE) and config is not None:
            _check_gguf_config(config)
