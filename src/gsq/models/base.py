"""Model adapters: the only code that knows Hugging Face module names (code-style layering rule 2).

An adapter tells the pipeline where the decoder blocks are, which linears form each stage, and how
to run a block's attention and MLP sub-blocks on hidden states `(batch, seq, hidden)`. Streaming
weights from disk, MoE experts and multi-process runs plug in here without touching the block loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class StageSpec:
    """Linears optimised together, and the loss they are trained on (method §3.1)."""

    name: str  # "qk", "vo", "mlp"
    linears: tuple[str, ...]  # names relative to the block, e.g. "self_attn.q_proj"
    objective: str  # "quadratic" (each linear alone), "attention" (attn sub-block), "block"
    # GPTQ order inside the stage: linears of a later group see the earlier groups' quantized
    # outputs in their Hessians ("true sequential"); empty = one group
    gptq_order: tuple[tuple[str, ...], ...] = ()

    def gptq_groups(self, names: list[str]) -> list[list[str]]:
        """`names` (the stage's linears left after skips) split into GPTQ groups, in order."""
        order = self.gptq_order or (self.linears,)
        groups = [[n for n in group if n in names] for group in order]
        return [g for g in groups if g]


class ModelAdapter:
    """Interface of a decoder-only family; see `LlamaAdapter` for the reference implementation."""

    model_types: tuple[str, ...] = ()
    stages: tuple[StageSpec, ...] = ()
    # its quantized linears export as compressed-tensors (gsq.models.registry.support_table)
    compressed_tensors: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that run before block 0 (token embeddings, rotary embeddings)."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last block and the LM head."""
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module:
        """hidden `(..., hidden)` after `final_norm` -> logits `(..., vocab)`."""
        raise NotImplementedError

    def norm_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every RMSNorm of the model by full name (blocks' and the final one): the
        full-precision gains the end-to-end scale stage may train."""
        return {name: module for name, module in model.named_modules()
                if type(module).__name__.endswith("RMSNorm")
                and isinstance(getattr(module, "weight", None), nn.Parameter)}

    def first_block_prefix(self) -> str:
        """Name prefix of block i's modules in the full model, e.g. 'model.layers.{i}.'."""
        raise NotImplementedError

    def attention_residual(self, block: nn.Module, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        """h + attn(norm(h)): the block's hidden states after its attention sub-block."""
        raise NotImplementedError

    def mlp_residual(self, block: nn.Module, h: Tensor) -> Tensor:
        """h + mlp(norm(h)): the block's output given the post-attention hidden states."""
        raise NotImplementedError

    def block_forward(self, block: nn.Module, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        return self.mlp_residual(block, self.attention_residual(block, h, ctx))

    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for stage in self.stages for name in stage.linears)
