"""Stage objectives: sub-block output MSE against cached FP targets, with swapped-in weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsq.calib.capture import capture_block_context
from gsq.calib.objectives import ActivationObjective, map_batches
from gsq.models.llama import LlamaAdapter


def _setup(tiny_llama):
    model = tiny_llama(0)
    adapter = LlamaAdapter()
    block = adapter.blocks(model)[0]
    ctx = capture_block_context(model, adapter, 8, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x_train, x_val = torch.randn(6, 8, 64, generator=gen), torch.randn(3, 8, 64, generator=gen)

    def fn(b, x):
        return adapter.attention_residual(b, x, ctx)

    y_train, y_val = map_batches(lambda x: fn(block, x), x_train, 2), map_batches(
        lambda x: fn(block, x), x_val, 2)
    obj = ActivationObjective(block, fn, (x_train, y_train), (x_val, y_val), 2, torch.device("cpu"))
    return block, fn, obj, (x_train, y_train, x_val, y_val)


def test_original_weights_give_zero_loss(tiny_llama):
    block, _, obj, _ = _setup(tiny_llama)
    weights = {"self_attn.v_proj": block.self_attn.v_proj.weight}
    assert float(obj.loss(weights, torch.arange(6))) == 0.0
    assert obj.val_loss(weights) == 0.0
    assert obj.n_train == 6 and obj.dtype == torch.float32


def test_swapped_weights_change_the_output_but_not_the_module(tiny_llama):
    block, fn, obj, (x_train, y_train, x_val, y_val) = _setup(tiny_llama)
    W0 = block.self_attn.v_proj.weight.clone()
    W = (W0 + 0.05 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(1)))
    W.requires_grad_(True)
    idx = torch.tensor([4, 1])
    loss = obj.loss({"self_attn.v_proj": W}, idx)
    loss.backward()
    assert W.grad is not None and W.grad.abs().sum() > 0
    assert torch.equal(block.self_attn.v_proj.weight, W0)  # module untouched
    with torch.no_grad():
        block.self_attn.v_proj.weight.copy_(W)
        expected = F.mse_loss(fn(block, x_train[idx]), y_train[idx])
        expected_val = F.mse_loss(fn(block, x_val), y_val)
        block.self_attn.v_proj.weight.copy_(W0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    val = obj.val_loss({"self_attn.v_proj": W.detach()})
    assert val > 0
    assert val == pytest.approx(float(expected_val), rel=1e-5)


def test_map_batches():
    x = torch.arange(10.0).view(5, 2)
    out = map_batches(lambda c: c * 2, x, 2)
    assert torch.equal(out, x * 2)


def test_autocast_bf16_runs_16_bit_matmuls_with_an_fp32_loss(tiny_llama):
    block, fn, obj, (x_train, y_train, x_val, y_val) = _setup(tiny_llama)
    obj16 = ActivationObjective(block, fn, (x_train, y_train), (x_val, y_val), 2,
                                torch.device("cpu"), autocast="bf16")
    W0 = block.self_attn.v_proj.weight
    W = (W0 + 0.05 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(1)))
    W.requires_grad_(True)
    idx = torch.tensor([4, 1])
    loss32 = obj.loss({"self_attn.v_proj": W}, idx)
    loss16 = obj16.loss({"self_attn.v_proj": W}, idx)
    assert loss16.dtype == torch.float32
    assert float(loss16.detach()) != float(loss32.detach())  # bf16 matmuls round differently
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=0.1)
    loss16.backward()
    assert W.grad is not None and W.grad.dtype == torch.float32 and W.grad.abs().sum() > 0
    assert obj16.val_loss({"self_attn.v_proj": W.detach()}) == pytest.approx(
        obj.val_loss({"self_attn.v_proj": W.detach()}), rel=0.1)
