"""Quadratic layer loss tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of the Q/K stage and ternary warm-up
(method §7)."""

from __future__ import annotations

import pytest
import torch

from gsq.quant.gptq import gptq_quantize, layer_output_error
from gsq.quant.layerwise import QuadraticObjective, quadratic_error
from gsq.quant.quantizers import InitConfig, make_quantizer
from gsq.quant.trainer import TrainConfig, train_quantizers
from gsq.quant.types import QuantSpec


def _hessian(n, d, seed, mix_seed=0):
    """H = 2/n XᵀX of correlated inputs: same mixing for the same `mix_seed`, fresh samples."""
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=torch.Generator().manual_seed(mix_seed))
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix
    return 2.0 / n * X.T @ X


@pytest.fixture
def setup():
    gen = torch.Generator().manual_seed(0)
    W_f = torch.randn(8, 32, generator=gen)
    W_q = W_f + 0.1 * torch.randn(8, 32, generator=gen)
    return W_f, W_q, _hessian(256, 32, 1), _hessian(128, 32, 2)


def _trace_ratio(W_q, W_f, H):
    dW, W = (W_q - W_f).double(), W_f.double()
    return float(torch.trace(dW @ H.double() @ dW.T) / torch.trace(W @ H.double() @ W.T))


def test_quadratic_error_is_the_trace(setup):
    W_f, W_q, H, _ = setup
    dW = (W_q - W_f).double()
    expected = float(torch.trace(dW @ H.double() @ dW.T))
    assert float(quadratic_error(W_q, W_f, H)) == pytest.approx(expected, rel=1e-5)
    assert float(quadratic_error(W_q, W_f, H)) == pytest.approx(layer_output_error(W_f, W_q, H),
                                                                rel=1e-5)
    # ‖ΔW·L‖²_F with H = L Lᵀ
    L = torch.linalg.cholesky(H.double())
    frobenius = float(((dW @ L) ** 2).sum())
    assert float(quadratic_error(W_q, W_f, H)) == pytest.approx(frobenius, rel=1e-5)


def test_objective_loss_is_normalised_trace(setup):
    W_f, W_q, H_train, H_val = setup
    obj = QuadraticObjective("q", W_f, H_train, H_val)
    loss = obj.loss({"q": W_q}, torch.arange(1))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert float(loss) == pytest.approx(_trace_ratio(W_q, W_f, H_train), rel=1e-5)
    assert obj.val_loss({"q": W_q}) == pytest.approx(_trace_ratio(W_q, W_f, H_val), rel=1e-5)
    assert obj.val_loss({"q": W_f}) == 0.0
    assert obj.n_train >= 1 and obj.dtype == torch.float32


def test_objective_loss_is_differentiable(setup):
    W_f, W_q, H_train, H_val = setup
    obj = QuadraticObjective("q", W_f, H_train, H_val)
    W = W_q.clone().requires_grad_(True)
    obj.loss({"q": W}, torch.arange(1)).backward()
    expected = 2 * (W_q - W_f) @ H_train / float(torch.trace(W_f @ H_train @ W_f.T))
    torch.testing.assert_close(W.grad, expected, rtol=1e-4, atol=1e-7)


def test_objective_accepts_bf16_weights(setup):
    W_f, W_q, H_train, H_val = setup
    obj = QuadraticObjective("q", W_f, H_train, H_val)
    W16 = W_q.to(torch.bfloat16)
    assert float(obj.loss({"q": W16}, torch.arange(1))) == pytest.approx(
        _trace_ratio(W16.float(), W_f, H_train), rel=1e-4)


def test_quadratic_training_improves_on_gptq(setup):
    """The Q/K stage end to end: GSQ on the quadratic loss beats its GPTQ init on held-out H."""
    W_f = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    H_train, H_val = _hessian(2048, 64, 6), _hessian(2048, 64, 7)
    init = gptq_quantize(W_f, H_train, QuantSpec(2, 16))
    obj = QuadraticObjective("q", W_f, H_train, H_val, steps_per_epoch=20)
    q = {"q": make_quantizer(init, InitConfig(), torch.Generator().manual_seed(0))}
    cfg = TrainConfig(epochs=10, batch_size=1, micro_batch_size=1, cosine=False)
    run = train_quantizers(q, obj, cfg, seed=0)
    assert run.steps == 200
    assert run.best_val < 0.95 * run.init_val
    assert run.init_val == pytest.approx(_trace_ratio(init.dequantize(), W_f, H_val), rel=1e-4)


def test_objective_with_all_zero_weight_is_finite(setup):
    _, _, H_train, H_val = setup
    W_f = torch.zeros(8, 32)
    obj = QuadraticObjective("q", W_f, H_train, H_val)
    assert obj.val_loss({"q": W_f}) == 0.0
    assert torch.isfinite(obj.loss({"q": W_f}, torch.arange(1)))
