"""A gsq quantized directory as a live transformers model: its codes written into the weights
(one block at a time: `gsq.models.quantized_stream`).

Records are named as in the checkpoint (`gsq.io.quantized_dir`); the model's adapter finds each
one's live weight (`ModelAdapter.model_weight`: a Linear's weight, or for an MoE expert a slice
of a fused parameter), so loading needs the model plumbing of `gsq.models` on top of the
directory format of `gsq.io`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gsq.errors import GSQError
from gsq.io.quantized_dir import load_records
from gsq.models.registry import adapter_for
from gsq.quant.types import QuantizedWeight


def apply_records(model: nn.Module, records: dict[str, QuantizedWeight]) -> None:
    """Overwrite each quantized linear's weight with its exact dequantized value s·codes.

    Records are named as in the checkpoint; the model's adapter finds their live weights (an MoE
    expert's projection is a slice of a fused parameter).
    """
    adapter = adapter_for(model.config.model_type)
    for name, qw in records.items():
        try:
            weight = adapter.model_weight(model, name)
        except (AttributeError, IndexError) as err:
            raise GSQError(f"quantized module '{name}' is not part of the model") from err
        if tuple(weight.shape) != qw.shape:
            raise GSQError(
                f"shape mismatch for {name}: model {tuple(weight.shape)}, codes {qw.shape}")
        with torch.no_grad():
            weight.copy_(qw.dequantize(weight.dtype))


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a gsq directory with transformers and rebuild the quantized weights from the codes.

    Returns (model, tokenizer, records).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = load_records(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    apply_records(model, records)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer, records
