"""The Llama adapter and the model_type registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsq.calib.capture import capture_block_context
from gsq.errors import GSQError
from gsq.models.llama import LlamaAdapter
from gsq.models.registry import adapter_for, supported_model_types


def test_registry():
    assert isinstance(adapter_for("llama"), LlamaAdapter)
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(supported_model_types())
    with pytest.raises(GSQError, match="unsupported architecture 'gpt2'"):
        adapter_for("gpt2")
    with pytest.raises(GSQError):
        adapter_for("llama-3")  # never substring matching


def test_stages_cover_every_linear_of_a_block_exactly_once(tiny_llama):
    model = tiny_llama(0)
    adapter = LlamaAdapter()
    names = adapter.linear_names()
    assert len(names) == len(set(names)) == 7
    assert [s.name for s in adapter.stages] == ["qk", "vo", "mlp"]
    assert [s.objective for s in adapter.stages] == ["quadratic", "attention", "block"]
    for block in adapter.blocks(model):
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert linears == set(names)
    assert len(adapter.blocks(model)) == 2
    prefix = adapter.first_block_prefix().format(i=1)
    assert model.get_submodule(prefix + "mlp.down_proj") is adapter.blocks(model)[1].mlp.down_proj


def test_block_forward_matches_the_decoder_layer(tiny_llama):
    model = tiny_llama(0)
    adapter = LlamaAdapter()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        ctx = capture_block_context(model, adapter, 12, torch.device("cpu"))
        h = hidden[0]
        for i, block in enumerate(adapter.blocks(model)):
            h = adapter.block_forward(block, h, ctx)
            if i < len(hidden) - 2:  # the last hidden state is after the final norm
                torch.testing.assert_close(h, hidden[i + 1], rtol=1e-5, atol=1e-5)
        final = model.model.norm(h)
    torch.testing.assert_close(final, hidden[-1], rtol=1e-5, atol=1e-5)


def test_residual_split(tiny_llama):
    model = tiny_llama(0)
    adapter = LlamaAdapter()
    block = adapter.blocks(model)[0]
    ctx = capture_block_context(model, adapter, 8, torch.device("cpu"))
    h = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mid = adapter.attention_residual(block, h, ctx)
        out = adapter.mlp_residual(block, mid)
        torch.testing.assert_close(out, adapter.block_forward(block, h, ctx))
        torch.testing.assert_close(out - mid, block.mlp(block.post_attention_layernorm(mid)))
