"""Adapter for the Llama family: Llama, Mistral, Qwen2, Qwen3 and SmolLM (all share this layout).

Block layout (transformers `*DecoderLayer`):
  h_mid = h + self_attn(input_layernorm(h))          # q/k/v/o_proj inside self_attn
  out   = h_mid + mlp(post_attention_layernorm(h_mid))  # gate/up/down_proj inside mlp
Qwen3's q_norm/k_norm live inside self_attn and need nothing here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gsq.models.base import ModelAdapter, StageSpec


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    compressed_tensors = True
    stages = (
        StageSpec("qk", ("self_attn.q_proj", "self_attn.k_proj"), "quadratic"),
        StageSpec("vo", ("self_attn.v_proj", "self_attn.o_proj"), "attention",
                  gptq_order=(("self_attn.v_proj",), ("self_attn.o_proj",))),
        StageSpec("mlp", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "block",
                  gptq_order=(("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))),
    )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.embed_tokens, model.model.rotary_emb]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def first_block_prefix(self) -> str:
        return "model.layers.{i}."

    def attention_residual(self, block: nn.Module, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        out = block.self_attn(hidden_states=block.input_layernorm(h), **ctx)
        return h + (out[0] if isinstance(out, tuple) else out)

    def mlp_residual(self, block: nn.Module, h: Tensor) -> Tensor:
        return h + block.mlp(block.post_attention_layernorm(h))
