"""Adapters for sparse mixture-of-experts decoders: Qwen3-MoE and Mixtral.

Block layout (transformers 5.x), as in Llama apart from the MLP:
  h_mid = h + self_attn(input_layernorm(h))
  out   = h_mid + moe(post_attention_layernorm(h_mid))
  moe(x) = Σ_{e in top-k(router(x))} p_e(x) · down_e(act(gate_e(x)) * up_e(x))
In memory the MoE block (`block.mlp`) holds a router `gate` (weight `(E, hidden)`, kept in full
precision, as are the norms) and `experts` with FUSED parameters `gate_up_proj` `(E, 2I, hidden)`
(gate rows first) and `down_proj` `(E, hidden, I)`. Checkpoints store one 2-D tensor per expert
projection, and so does gsq: each expert linear is its own record, named as in the checkpoint,
  Qwen3-MoE: model.layers.{i}.mlp.experts.{e}.gate_proj / up_proj / down_proj
  Mixtral:   model.layers.{i}.block_sparse_moe.experts.{e}.w1 / w3 / w2   (gate / up / down)
so exporters map records 1:1 onto checkpoint tensors; `weight` maps a name to its slice of the
fused parameter. Qwen3-MoE blocks listed in `mlp_only_layers` (or off `decoder_sparse_step`) have
a dense Llama MLP and are handled as in `LlamaAdapter`.

Calibration of the experts (see `hessian_collector`): a forward pre-hook on `experts` receives the
normalised hidden states and the full-precision router's top-k choice; the tokens are sorted by
expert once per batch and every expert's Hessian is updated by one batched matmul, on exactly the
tokens routed to it. The down projections' inputs act(gate_e x) * up_e x are computed the same way
from the experts' current (already quantized, "true sequential") gate/up weights. A linear named
in `pooled` instead sees every token entering its MoE layer, as if the router had sent them all
to its expert: the fallback the block loop gives experts that received too few tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cached_property

import torch
from torch import Tensor, nn

from gsq.errors import GSQError
from gsq.models.base import StageSpec, collect_linear_hessians
from gsq.models.llama import LlamaAdapter
from gsq.quant.hessian import (
    GroupedHessianAccumulator,
    HessianAccumulator,
    gather_rows,
    group_rows,
)

GATE, UP, DOWN = 0, 1, 2
# padded expert batches are cut so that one holds at most this many values (memory bound)
PAD_ELEMENTS = 2**27


class MoEAdapter(LlamaAdapter):
    """Llama-style attention plus a routed MoE MLP; subclasses give the checkpoint naming."""

    moe_prefix = "mlp."  # checkpoint prefix of the MoE block relative to the decoder block
    expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @cached_property
    def _name_re(self) -> re.Pattern:
        parts = "|".join(map(re.escape, self.expert_parts))
        return re.compile(rf"{re.escape(self.moe_prefix)}experts\.(\d+)\.({parts})$")

    # -- layout --

    @staticmethod
    def _moe(block: nn.Module) -> nn.Module | None:
        """The block's sparse MoE module, or None for a dense-MLP block."""
        mlp = getattr(block, "mlp", None)
        return mlp if hasattr(mlp, "experts") and hasattr(mlp, "gate") else None

    def expert_name(self, e: int, part: int) -> str:
        return f"{self.moe_prefix}experts.{e}.{self.expert_parts[part]}"

    def _parse(self, name: str) -> tuple[int, int] | None:
        match = self._name_re.match(name)
        if match is None:
            return None
        return int(match.group(1)), self.expert_parts.index(match.group(2))

    def experts(self, block: nn.Module) -> dict[str, tuple[str, ...]]:
        moe = self._moe(block)
        if moe is None:
            return {}
        return {f"{self.moe_prefix}experts.{e}": tuple(self.expert_name(e, p) for p in range(3))
                for e in range(self._n_experts(moe))}

    @staticmethod
    def _n_experts(moe: nn.Module) -> int:
        return moe.experts.gate_up_proj.shape[0]

    def experts_per_token(self, block: nn.Module) -> int:
        moe = self._moe(block)
        return 0 if moe is None else int(moe.gate.top_k)

    def block_stages(self, block: nn.Module) -> tuple[StageSpec, ...]:
        moe = self._moe(block)
        if moe is None:
            return self.stages
        n = self._n_experts(moe)
        gate_up = tuple(self.expert_name(e, p) for e in range(n) for p in (GATE, UP))
        down = tuple(self.expert_name(e, DOWN) for e in range(n))
        mlp = StageSpec("mlp", gate_up + down, "block", gptq_order=(gate_up, down))
        return tuple(s for s in self.stages if s.name != "mlp") + (mlp,)

    # -- weights --

    @staticmethod
    def _fused(moe: nn.Module) -> tuple[Tensor, Tensor, int]:
        """(gate_up_proj `(E, 2I, H)`, down_proj `(E, H, I)`, I) of the experts."""
        experts = moe.experts
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
            raise GSQError(f"unsupported expert layout in {type(experts).__name__} "
                           "(transposed or biased fused weights)")
        return experts.gate_up_proj, experts.down_proj, experts.down_proj.shape[-1]

    def weight(self, block: nn.Module, name: str) -> Tensor:
        parsed = self._parse(name)
        if parsed is None:
            return super().weight(block, name)
        e, part = parsed
        gate_up, down, inter = self._fused(block.mlp)
        if part == DOWN:
            return down[e]
        return gate_up[e, :inter] if part == GATE else gate_up[e, inter:]

    def trial_params(self, block: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Dense linears as usual; expert weights stacked into the fused parameters, the other
        experts' slices taken from the live (hard) parameters."""
        parsed = {n: self._parse(n) for n in weights}
        params = super().trial_params(block, {n: w for n, w in weights.items() if not parsed[n]})
        given = {p: weights[n] for n, p in parsed.items() if p is not None}
        if not given:
            return params
        gate_up, down, inter = self._fused(block.mlp)
        gate_up, down = gate_up.detach(), down.detach()
        if any(part != DOWN for _, part in given):
            rows = [torch.cat([given.get((e, GATE), gate_up[e, :inter]),
                               given.get((e, UP), gate_up[e, inter:])])
                    for e in range(gate_up.shape[0])]
            params["mlp.experts.gate_up_proj"] = torch.stack(rows)  # (E, 2I, H)
        if any(part == DOWN for _, part in given):
            params["mlp.experts.down_proj"] = torch.stack(
                [given.get((e, DOWN), down[e]) for e in range(down.shape[0])])  # (E, H, I)
        return params

    def checkpoint_linears(self, model: nn.Module) -> list[str]:
        """Linear modules, plus per sparse block its router (a Linear for inference engines,
        which must be told to leave it unquantized) and every expert projection, in checkpoint
        naming."""
        names = super().checkpoint_linears(model)
        for i, block in enumerate(self.blocks(model)):
            if self._moe(block) is not None:
                names.append(f"{self.first_block_prefix().format(i=i)}{self.moe_prefix}gate")
        return names + self.expert_linears(model)

    def expert_linears(self, model: nn.Module) -> list[str]:
        return [self.first_block_prefix().format(i=i) + name
                for i, block in enumerate(self.blocks(model))
                for linears in self.experts(block).values() for name in linears]

    def merged_experts(self, model: nn.Module) -> dict[str, list[str]]:
        """Per MoE layer and projection: the merged name (the expert index dropped, e.g.
        "model.layers.3.mlp.experts.gate_proj", Mixtral's "...block_sparse_moe.experts.w1") ->
        the expert records to stack along a new leading expert axis, in expert order. These are
        the merged names llama.cpp's converter and the `gguf` package's tensor-name map turn into
        `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`; the router, named
        f"{prefix}{moe_prefix}gate", becomes `ffn_gate_inp`."""
        merged: dict[str, list[str]] = {}
        for i, block in enumerate(self.blocks(model)):
            prefix = self.first_block_prefix().format(i=i) + self.moe_prefix
            n = len(self.experts(block))
            for part in self.expert_parts if n else ():
                merged[f"{prefix}experts.{part}"] = [f"{prefix}experts.{e}.{part}"
                                                      for e in range(n)]
        return merged

    # -- routing and Hessians --

    @torch.no_grad()
    def expert_token_counts(self, block: nn.Module, h: Tensor) -> Tensor:
        moe = self._moe(block)
        x = block.post_attention_layernorm(h).reshape(-1, h.shape[-1])
        _, _, top_k = moe.gate(x)  # (tokens, k) expert ids of the full-precision router
        return torch.bincount(top_k.reshape(-1), minlength=self._n_experts(moe)).cpu()

    @contextmanager
    def hessian_collector(self, block: nn.Module, names: list[str],
                          pooled: frozenset[str] = frozenset(),
                          ) -> Iterator[dict[str, HessianAccumulator]]:
        parsed = {n: self._parse(n) for n in names}
        dense = [n for n in names if parsed[n] is None]
        routed = {n: p for n, p in parsed.items() if p is not None}
        with ExitStack() as stack:
            accs = dict(stack.enter_context(super().hessian_collector(block, dense)))
            if routed:
                accs.update(stack.enter_context(self._expert_hessians(block, routed, pooled)))
            yield {n: accs[n] for n in names}

    @contextmanager
    def _expert_hessians(self, block: nn.Module, routed: dict[str, tuple[int, int]],
                         pooled: frozenset[str]) -> Iterator[dict]:
        moe = self._moe(block)
        gate_up, down, inter = self._fused(moe)
        n_exp, hidden, dev = gate_up.shape[0], gate_up.shape[-1], gate_up.device
        # experts whose gate/up (x) or down (act(gate x) * up x) inputs are wanted, by routing
        want_x = sorted({e for n, (e, p) in routed.items() if p != DOWN and n not in pooled})
        want_a = sorted({e for n, (e, p) in routed.items() if p == DOWN and n not in pooled})
        pool_x = any(p != DOWN for n, (_, p) in routed.items() if n in pooled)
        pool_a = sorted({e for n, (e, p) in routed.items() if p == DOWN and n in pooled})
        acc_x = GroupedHessianAccumulator(n_exp, hidden, dev)
        acc_a = GroupedHessianAccumulator(n_exp, inter, dev)
        acc_pool_x = HessianAccumulator(hidden, dev)
        acc_pool_a = {e: HessianAccumulator(inter, dev) for e in pool_a}

        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach()  # (T, H) normalised
            top_k = args[1] if len(args) > 1 else kwargs["top_k_index"]  # (T, k) expert ids
            # (E, M) token of each expert's m-th assignment (-1: padding), (E,) tokens per expert
            slots, counts = group_rows(top_k.reshape(-1), n_exp)
            tokens = torch.where(slots >= 0, slots // top_k.shape[-1], -1)
            self._add_routed(x, tokens, counts.cpu(), want_x, want_a, acc_x, acc_a, module)
            if pool_x:
                acc_pool_x.add(x)
            for e in pool_a:
                acc_pool_a[e].add(_expert_inner(module, e, x))

        handle = moe.experts.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield {n: (acc_pool_a[e] if p == DOWN else acc_pool_x) if n in pooled
                   else (acc_a if p == DOWN else acc_x).member(e)
                   for n, (e, p) in routed.items()}
        finally:
            handle.remove()

    @staticmethod
    def _add_routed(x: Tensor, tokens: Tensor, counts: Tensor, want_x: list[int],
                    want_a: list[int], acc_x: GroupedHessianAccumulator,
                    acc_a: GroupedHessianAccumulator, experts: nn.Module) -> None:
        """Batched Hessian updates of the wanted experts from their routed tokens: `x` `(T, H)`,
        `tokens` `(E, M)` the rows of x routed to each expert (-1 past `counts`). Experts go in
        chunks whose padded `(S, M, ·)` batches hold at most `PAD_ELEMENTS` values."""
        width, hidden = tokens.shape[1], x.shape[-1]
        inter = experts.down_proj.shape[-1]
        chunk = max(1, PAD_ELEMENTS // max(1, width * max(hidden, 2 * inter)))
        for wanted, acc, inner in ((want_x, acc_x, False), (want_a, acc_a, True)):
            for ids in torch.tensor(wanted, dtype=torch.long).split(chunk):
                rows = gather_rows(x, tokens[ids.to(tokens.device)])  # (S, M, H), zero padding
                acc.add_padded(_expert_inner(experts, ids, rows) if inner else rows, counts[ids],
                               ids)


def _expert_inner(experts: nn.Module, e, x: Tensor) -> Tensor:
    """Inputs of the down projection(s), act(x gate_eᵀ) * (x up_eᵀ): `x` `(T, H)` for one expert
    `e` (int) -> `(T, I)`, or `(S, M, H)` for experts `e` `(S,)` -> `(S, M, I)` (zero rows stay
    zero)."""
    inter = experts.down_proj.shape[-1]
    w = experts.gate_up_proj[e]  # (2I, H) or (S, 2I, H)
    out = torch.matmul(x.to(w.dtype), w.transpose(-1, -2))  # (..., 2I)
    return experts.act_fn(out[..., :inter]) * out[..., inter:]


class Qwen3MoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe",)
    moe_prefix = "mlp."
    expert_parts = ("gate_proj", "up_proj", "down_proj")


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)
    moe_prefix = "block_sparse_moe."  # the checkpoint's name; transformers renames it to "mlp"
    expert_parts = ("w1", "w3", "w2")  # gate, up, down


__all__ = ["MixtralAdapter", "MoEAdapter", "Qwen3MoeAdapter", "collect_linear_hessians"]
