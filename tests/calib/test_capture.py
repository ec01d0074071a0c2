"""Capture of block-0 inputs and block kwargs (GPTQ "Catcher")."""

from __future__ import annotations

import torch

from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.models.llama import LlamaAdapter


def test_capture_block_inputs_equal_embeddings(tiny_llama):
    model = tiny_llama(0)
    ids = torch.randint(0, 256, (5, 10), generator=torch.Generator().manual_seed(0))
    h = capture_block_inputs(model, LlamaAdapter(), ids, torch.device("cpu"), batch_size=2)
    assert h.shape == (5, 10, 64)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(h, expected, rtol=0, atol=0)
    for module in model.modules():
        assert not module._forward_pre_hooks


def test_capture_block_context_drops_cache_kwargs(tiny_llama):
    model = tiny_llama(0)
    ctx = capture_block_context(model, LlamaAdapter(), 16, torch.device("cpu"))
    assert "position_embeddings" in ctx
    cos, sin = ctx["position_embeddings"]
    assert cos.shape[-2] == 16 and cos.shape[0] == 1  # batch 1: broadcasts over any batch
    dropped = ("past_key_values", "past_key_value", "use_cache", "cache_position", "hidden_states")
    for key in dropped:
        assert key not in ctx
