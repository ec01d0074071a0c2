"""Model adapters: the only code that knows Hugging Face module names (code-style layering rule 2).

An adapter tells the pipeline where the decoder blocks are, which linears form each stage, and how
to run a block's attention and MLP sub-blocks on hidden states `(batch, seq, hidden)`. Streaming
weights from disk, MoE experts and multi-process runs plug in here without touching the block loop.

A "linear" is named by its checkpoint name relative to the block (e.g. "self_attn.q_proj", or an
MoE expert's "mlp.experts.5.gate_proj"); `weight(block, name)` gives its live `(out, in)` weight,
which for an expert is a slice of a fused 3-D parameter. The pipeline reads and writes weights,
collects Hessians and swaps in trial weights only through the adapter (`weight`,
`hessian_collector`, `trial_params`), so these names need not be modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from gsq.quant.hessian import HessianAccumulator


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

    # -- per-block layout and weight access (overridden where linears are not plain modules) --

    def block_stages(self, block: nn.Module) -> tuple[StageSpec, ...]:
        """The stages of this block (MoE models mix dense and expert MLPs between blocks)."""
        return self.stages

    def weight(self, block: nn.Module, name: str) -> Tensor:
        """The live `(out, in)` weight of linear `name` (a view: writes reach the model)."""
        return block.get_submodule(name).weight

    def trial_params(self, block: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameters (paths relative to the block) that put `weights` `{linear: (out, in)}` in
        place for `torch.func.functional_call`, keeping their autograd graph."""
        return {f"{name}.weight": w for name, w in weights.items()}

    @contextmanager
    def hessian_collector(self, block: nn.Module, names: list[str],
                          pooled: frozenset[str] = frozenset(),
                          ) -> Iterator[dict[str, HessianAccumulator]]:
        """Accumulate H = (2/n) Σ x xᵀ of each named linear's inputs while the block runs.

        `pooled` names routed linears (MoE experts) whose H is taken over every token entering
        their layer instead of the tokens routed to them (the starved-expert fallback); dense
        linears see every token anyway.
        """
        with collect_linear_hessians(block, names) as accs:
            yield accs

    def experts(self, block: nn.Module) -> dict[str, tuple[str, ...]]:
        """Routed experts of the block: expert key (its checkpoint prefix relative to the block,
        e.g. "mlp.experts.5") -> its linears, in expert order; {} for a dense block."""
        return {}

    def experts_per_token(self, block: nn.Module) -> int:
        """Experts the router picks for each token (top-k); 0 for a dense block."""
        return 0

    def expert_token_counts(self, block: nn.Module, h: Tensor) -> Tensor:
        """Tokens the block's router sends to each expert `(E,)` for post-attention hidden
        states `h` `(batch, seq, hidden)` (each token counts once per expert of its top-k)."""
        raise NotImplementedError

    def model_weight(self, model: nn.Module, full_name: str) -> Tensor:
        """`weight` of a linear named in full (e.g. "model.layers.3.mlp.experts.5.gate_proj")."""
        pattern = re.escape(self.first_block_prefix()).replace(r"\{i\}", r"(\d+)")
        match = re.match(pattern, full_name)
        if match is None:
            return model.get_submodule(full_name).weight
        return self.weight(self.blocks(model)[int(match.group(1))], full_name[match.end():])

    def checkpoint_linears(self, model: nn.Module) -> list[str]:
        """Full checkpoint names (without ".weight") of every 2-D linear weight the model's
        checkpoint holds, quantizable or not: what an exporter lists as quantized or ignored."""
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def expert_linears(self, model: nn.Module) -> list[str]:
        """The routed experts' linears among `checkpoint_linears` (engines run them as fused
        MoE layers, with constraints of their own); [] for a dense model."""
        return []

    def merged_experts(self, model: nn.Module) -> dict[str, list[str]]:
        """Merged expert tensors (as GGUF stores them) -> their per-expert records, in expert
        order; {} for a dense model (see `MoEAdapter.merged_experts`)."""
        return {}


@contextmanager
def collect_linear_hessians(block: nn.Module,
                            linear_names: list[str]) -> Iterator[dict[str, HessianAccumulator]]:
    """H = (2/n) Σ x xᵀ of each named `nn.Linear`'s inputs while the block runs (forward
    pre-hooks, always removed)."""
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    for name in linear_names:
        linear = block.get_submodule(name)
        acc = HessianAccumulator(linear.in_features, device=linear.weight.device)
        accumulators[name] = acc
        handles.append(linear.register_forward_pre_hook(
            lambda module, args, acc=acc: acc.add(args[0].detach())))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
