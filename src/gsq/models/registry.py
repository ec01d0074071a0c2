"""model_type -> adapter.

Architecture is chosen by `config.model_type`, never by name substrings.
"""

from __future__ import annotations

from gsq.errors import GSQError
from gsq.models.base import ModelAdapter
from gsq.models.llama import LlamaAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


register_adapter(LlamaAdapter)


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter for a `config.model_type`; GSQError naming the type if unsupported."""
    if model_type not in _ADAPTERS:
        raise GSQError(f"unsupported architecture '{model_type}': gsq supports "
                       f"{', '.join(supported_model_types())}")
    return _ADAPTERS[model_type]()
